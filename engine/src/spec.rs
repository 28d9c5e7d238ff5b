//! The pipeline file exactly as written: top-level keys, and for each stage its name,
//! kind, `after:` list and the remaining keys as the kind's params. Only the shape is
//! checked here; what the params mean is checked against each kind in `check.rs`.

use crate::diagnostic::{Diagnostic, PipelineError};
use crate::yaml::{self, Key, Loc, Node, NodeValue};
use std::path::{Path, PathBuf};

const TOP_LEVEL_KEYS: [&str; 5] = ["name", "description", "seed", "defaults", "stages"];

#[derive(Clone, Debug)]
pub struct RawPipeline {
    /// The file as given on the command line.
    pub file: PathBuf,
    pub name: String,
    pub seed: u64,
    pub defaults: Vec<(Key, Node)>,
    pub stages: Vec<RawStage>,
    /// `--set` arguments applied, for pointing errors at them.
    pub overrides: Vec<crate::overrides::Override>,
}

#[derive(Clone, Debug)]
pub struct RawStage {
    pub name: String,
    pub name_loc: Loc,
    pub kind: String,
    pub kind_loc: Loc,
    pub after: Vec<(String, Loc)>,
    /// The stage's mapping without `kind` and `after`.
    pub params: Node,
}

impl RawPipeline {
    /// Where diagnostics about this file say they come from.
    pub fn origin(&self) -> String {
        self.file.display().to_string()
    }

    /// The folder relative paths in the pipeline are resolved against.
    pub fn base_dir(&self) -> PathBuf {
        match self.file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    pub fn stage(&self, name: &str) -> Option<&RawStage> {
        self.stages.iter().find(|s| s.name == name)
    }
}

/// Reads and parses a pipeline file.
pub fn load(file: &Path) -> Result<RawPipeline, PipelineError> {
    let origin = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| {
        PipelineError::one(
            Diagnostic::new(
                &origin,
                Loc::default(),
                format!("cannot read the pipeline file: {e}"),
            )
            .hint("pass the path of a pipeline YAML file, e.g. pipelines/quickstart.yaml"),
        )
    })?;
    parse(file, &text)
}

/// Parses pipeline text; `file` is only used in messages and to resolve relative paths.
pub fn parse(file: &Path, text: &str) -> Result<RawPipeline, PipelineError> {
    let origin = file.display().to_string();
    let root = yaml::parse(text)
        .map_err(|e| PipelineError::one(Diagnostic::new(&origin, e.loc, e.message)))?;
    let mut diags = Vec::new();
    let entries = match &root.value {
        NodeValue::Map(entries) => entries.clone(),
        _ => {
            return Err(PipelineError::one(
                Diagnostic::new(
                    &origin,
                    root.loc,
                    format!(
                        "a pipeline file must be a mapping, found {}",
                        root.type_name()
                    ),
                )
                .expected("keys `name`, `seed`, `defaults`, `stages`"),
            ))
        }
    };
    for (key, _) in &entries {
        if !TOP_LEVEL_KEYS.contains(&key.name.as_str()) {
            diags.push(
                Diagnostic::new(
                    &origin,
                    key.loc,
                    format!("unknown top-level key `{}`", key.name),
                )
                .expected(crate::diagnostic::one_of(TOP_LEVEL_KEYS))
                .suggest(&key.name, TOP_LEVEL_KEYS),
            );
        }
    }
    let name = match root.get("name") {
        Some(n) => match n.as_str() {
            Some(s) => s.to_string(),
            None => {
                diags.push(type_error(&origin, n, "`name`", "a string"));
                String::new()
            }
        },
        None => file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let seed = match root.get("seed") {
        None => 0,
        Some(n) => match n.value {
            NodeValue::Int(i) if i >= 0 => i as u64,
            NodeValue::UInt(u) => u,
            _ => {
                diags.push(type_error(&origin, n, "`seed`", "a non-negative integer"));
                0
            }
        },
    };
    let defaults = match root.get("defaults") {
        None => Vec::new(),
        Some(Node {
            value: NodeValue::Map(entries),
            ..
        }) => entries.clone(),
        Some(Node {
            value: NodeValue::Null,
            ..
        }) => Vec::new(),
        Some(n) => {
            diags.push(type_error(
                &origin,
                n,
                "`defaults`",
                "a mapping of parameter names to values",
            ));
            Vec::new()
        }
    };
    let stages = match root.get("stages") {
        Some(Node {
            value: NodeValue::Map(entries),
            ..
        }) => entries
            .iter()
            .filter_map(|(key, node)| parse_stage(&origin, key, node, &mut diags))
            .collect(),
        Some(n) => {
            diags.push(type_error(
                &origin,
                n,
                "`stages`",
                "a mapping of stage names to stages",
            ));
            Vec::new()
        }
        None => {
            diags.push(
                Diagnostic::new(&origin, root.loc, "the pipeline has no `stages`")
                    .expected("a `stages:` mapping of stage names to stages"),
            );
            Vec::new()
        }
    };
    if !diags.is_empty() {
        return Err(PipelineError { diagnostics: diags });
    }
    Ok(RawPipeline {
        file: file.to_path_buf(),
        name,
        seed,
        defaults,
        stages,
        overrides: Vec::new(),
    })
}

fn type_error(origin: &str, node: &Node, what: &str, expected: &str) -> Diagnostic {
    Diagnostic::new(
        origin,
        node.loc,
        format!("{what} must be {expected}, found {}", node.type_name()),
    )
    .expected(expected)
}

/// Stage names are used in references (`stage.output`), cache paths and `--set`, so
/// they are kept to letters, digits, `_` and `-`.
pub fn valid_stage_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
}

fn parse_stage(
    origin: &str,
    key: &Key,
    node: &Node,
    diags: &mut Vec<Diagnostic>,
) -> Option<RawStage> {
    if !valid_stage_name(&key.name) {
        diags.push(
            Diagnostic::new(origin, key.loc, format!("invalid stage name `{}`", key.name))
                .expected("a name of letters, digits, `_` and `-`, starting with a letter (dots separate outputs in references)"),
        );
        return None;
    }
    let NodeValue::Map(entries) = &node.value else {
        diags.push(type_error(
            origin,
            node,
            &format!("stage `{}`", key.name),
            "a mapping with a `kind`",
        ));
        return None;
    };
    let kind = match node.get("kind") {
        Some(k) => match k.as_str() {
            Some(s) => (s.to_string(), k.loc),
            None => {
                diags.push(type_error(
                    origin,
                    k,
                    &format!("`kind` of stage `{}`", key.name),
                    "a string",
                ));
                return None;
            }
        },
        None => {
            diags.push(
                Diagnostic::new(
                    origin,
                    key.loc,
                    format!("stage `{}` has no `kind`", key.name),
                )
                .expected("`kind: <stage kind>`, e.g. `kind: command`"),
            );
            return None;
        }
    };
    let after = match node.get("after") {
        None => Vec::new(),
        Some(Node {
            value: NodeValue::Seq(items),
            ..
        }) => {
            let mut names = Vec::new();
            for item in items {
                match item.as_str() {
                    Some(s) => names.push((s.to_string(), item.loc)),
                    None => {
                        diags.push(type_error(origin, item, "an `after` entry", "a stage name"))
                    }
                }
            }
            names
        }
        Some(Node {
            value: NodeValue::String(s),
            loc,
        }) => vec![(s.clone(), *loc)],
        Some(n) => {
            diags.push(type_error(origin, n, "`after`", "a list of stage names"));
            Vec::new()
        }
    };
    let params: Vec<(Key, Node)> = entries
        .iter()
        .filter(|(k, _)| k.name != "kind" && k.name != "after")
        .cloned()
        .collect();
    Some(RawStage {
        name: key.name.clone(),
        name_loc: key.loc,
        kind: kind.0,
        kind_loc: kind.1,
        after,
        params: Node::new(NodeValue::Map(params), node.loc),
    })
}
