//! The list of stage kinds. One list drives dispatch, the "unknown kind" error, the
//! JSON Schema of pipeline files and the CLI help.

use crate::context::StageContext;
use crate::stage::{Ports, PortsError, Stage, StageError};
use serde_json::Value;
use std::collections::BTreeMap;
use std::marker::PhantomData;

/// A stage kind behind a trait object; implemented for every [`Stage`] by the registry.
pub trait StageKind: Send + Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> u32;
    fn about(&self) -> &'static str;
    /// JSON Schema of the params (the mapping minus `kind` and `after`).
    fn params_schema(&self) -> Value;
    /// Parses params; on success gives them back with defaults filled in, plus the ports.
    fn configure(&self, params: &Value) -> Result<Configured, ConfigureError>;
    /// Runs with params as returned by [`StageKind::configure`].
    fn run(&self, params: &Value, ctx: &mut StageContext) -> Result<(), StageError>;
}

/// Params with defaults filled in, and the ports they declare.
#[derive(Clone, Debug)]
pub struct Configured {
    pub params: Value,
    pub ports: Ports,
}

#[derive(Debug)]
pub enum ConfigureError {
    /// serde refused the params; `path` is the dotted path of the offending value.
    Params { path: String, message: String },
    /// The params parsed but do not make sense together.
    Ports(PortsError),
}

struct Kind<S>(PhantomData<fn() -> S>);

impl<S: Stage> StageKind for Kind<S> {
    fn kind(&self) -> &'static str {
        S::KIND
    }

    fn version(&self) -> u32 {
        S::VERSION
    }

    fn about(&self) -> &'static str {
        S::ABOUT
    }

    fn params_schema(&self) -> Value {
        serde_json::to_value(schemars::schema_for!(S::Params)).unwrap_or(Value::Null)
    }

    fn configure(&self, params: &Value) -> Result<Configured, ConfigureError> {
        let typed: S::Params = parse_params(params)?;
        let ports = S::ports(&typed).map_err(ConfigureError::Ports)?;
        let params = serde_json::to_value(&typed).map_err(|e| ConfigureError::Params {
            path: String::new(),
            message: e.to_string(),
        })?;
        Ok(Configured { params, ports })
    }

    fn run(&self, params: &Value, ctx: &mut StageContext) -> Result<(), StageError> {
        let typed: S::Params = parse_params(params).map_err(|e| match e {
            ConfigureError::Params { path, message } => {
                StageError::failed(format!("params of `{}` at `{path}`: {message}", ctx.stage))
            }
            ConfigureError::Ports(p) => StageError::failed(p.message),
        })?;
        S::run(&typed, ctx)
    }
}

fn parse_params<T: serde::de::DeserializeOwned>(params: &Value) -> Result<T, ConfigureError> {
    serde_path_to_error::deserialize(params).map_err(|e| {
        // Dotted, with list indexes as numbers (`models.1`), like InputPort::param.
        let path = e
            .path()
            .iter()
            .filter_map(|segment| match segment {
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Enum { variant } => Some(variant.clone()),
                serde_path_to_error::Segment::Unknown => None,
            })
            .collect::<Vec<_>>()
            .join(".");
        ConfigureError::Params {
            path,
            message: e.into_inner().to_string(),
        }
    })
}

/// All stage kinds known to this binary, by name.
#[derive(Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Box<dyn StageKind>>,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    /// Adds a kind; a later kind with the same name replaces the earlier one.
    pub fn register<S: Stage>(&mut self) -> &mut Self {
        self.kinds.insert(S::KIND, Box::new(Kind::<S>(PhantomData)));
        self
    }

    pub fn get(&self, kind: &str) -> Option<&dyn StageKind> {
        self.kinds.get(kind).map(|k| k.as_ref())
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }

    pub fn kinds(&self) -> impl Iterator<Item = &dyn StageKind> + '_ {
        self.kinds.values().map(|k| k.as_ref())
    }
}
