//! The contract between the engine and a stage kind: what a kind declares (parameters,
//! inputs, outputs) and what it gets when it runs (a [`StageContext`]).
//!
//! A kind is written once as an `impl Stage` with a typed params struct; the registry
//! wraps it into a [`StageKind`] trait object so the engine can hold all kinds in one list.

use crate::artifact::ArtifactKind;
use crate::context::StageContext;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// One stage kind, e.g. `sft` or `command`.
///
/// `Params` is the stage's YAML mapping minus `kind` and `after`. Derive
/// `Deserialize` with `#[serde(deny_unknown_fields)]` and give every optional field a
/// serde default: the engine re-serialises the parsed params (defaults filled in) into
/// the stage key, so a default written out explicitly keys the same as one left out.
pub trait Stage: Send + Sync + 'static {
    type Params: Serialize + DeserializeOwned + JsonSchema;
    /// The name used after `kind:` in pipeline files.
    const KIND: &'static str;
    /// Part of every key of this kind: bump it when the same inputs and params would
    /// now give different outputs.
    const VERSION: u32;
    /// One line for `--help`, the schema and "did you mean" errors.
    const ABOUT: &'static str;

    /// The inputs this stage reads and the outputs it writes, for these params.
    /// Errors here are reported against the stage with the message as given.
    fn ports(params: &Self::Params) -> Result<Ports, PortsError>;

    /// Does the work: read inputs from `ctx`, write every declared output into its
    /// directory. Returning `Err` leaves the cache as it was.
    fn run(params: &Self::Params, ctx: &mut StageContext) -> Result<(), StageError>;
}

/// What a stage reads and writes, declared before anything runs.
#[derive(Clone, Debug, Default)]
pub struct Ports {
    pub inputs: Vec<InputPort>,
    pub outputs: Vec<OutputPort>,
}

/// A reference found in the params: to another stage's output, or to something outside
/// the pipeline (a local file or folder, a `hf://` repository).
#[derive(Clone, Debug)]
pub struct InputPort {
    /// How the stage asks for it at run time: `ctx.input("model")`. Unique per stage.
    pub name: String,
    /// Dotted path of the param that holds the reference (`model`, `inputs.raw`,
    /// `models.1`), so errors point at the right line of the file.
    pub param: String,
    /// The reference as written: `sft`, `dolly.train`, `data/raw.csv`, `hf://org/name`.
    pub reference: String,
    /// Artifact kinds accepted from a stage; empty accepts any kind.
    pub accepts: Vec<ArtifactKind>,
    /// Whether the reference may name something outside the pipeline.
    pub external: ExternalPolicy,
}

/// Which non-stage references an input port accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExternalPolicy {
    /// Only another stage's output.
    StageOnly,
    /// A stage output, or a local file or folder (hashed by content).
    StageOrPath,
    /// A stage output, a local file or folder, or a `hf://` repository.
    StageOrPathOrHub,
}

impl InputPort {
    /// An input that must come from another stage.
    pub fn stage(name: &str, reference: &str, accepts: &[ArtifactKind]) -> Self {
        InputPort {
            name: name.to_string(),
            param: name.to_string(),
            reference: reference.to_string(),
            accepts: accepts.to_vec(),
            external: ExternalPolicy::StageOnly,
        }
    }

    /// Sets the param path when it differs from the input's name.
    pub fn at_param(mut self, param: &str) -> Self {
        self.param = param.to_string();
        self
    }

    pub fn allow_external(mut self, policy: ExternalPolicy) -> Self {
        self.external = policy;
        self
    }
}

/// One artifact a stage writes. A stage with one output is referenced by its name
/// alone (`sft`); with several, as `stage.output` (`dolly.train`).
#[derive(Clone, Debug)]
pub struct OutputPort {
    pub name: String,
    pub kind: ArtifactKind,
}

impl OutputPort {
    pub fn new(name: &str, kind: ArtifactKind) -> Self {
        OutputPort {
            name: name.to_string(),
            kind,
        }
    }
}

/// A semantic problem with params that serde alone cannot catch (e.g. a split whose
/// fractions exceed 1). `param` is a dotted path, as in [`InputPort::param`].
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct PortsError {
    pub param: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl PortsError {
    pub fn new(param: Option<&str>, message: impl Into<String>) -> Self {
        PortsError {
            param: param.map(str::to_string),
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Why a stage failed. Every variant carries enough to tell the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{message}")]
    Failed {
        message: String,
        hint: Option<String>,
    },
    /// The stage cannot finish until someone acts (e.g. human labels are missing). Not
    /// a failure: the run stops with its own exit code and resumes once the action is done.
    #[error("{message}")]
    Waiting { message: String },
}

impl StageError {
    pub fn failed(message: impl Into<String>) -> Self {
        StageError::Failed {
            message: message.into(),
            hint: None,
        }
    }

    pub fn failed_with_hint(message: impl Into<String>, hint: impl Into<String>) -> Self {
        StageError::Failed {
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    pub fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        StageError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn hint(&self) -> Option<&str> {
        match self {
            StageError::Failed { hint, .. } => hint.as_deref(),
            _ => None,
        }
    }
}
