//! `--set STAGE.KEY=VALUE` overrides. The value is read as YAML (so `0.1` is a number,
//! `[a, b]` a list, `true` a boolean) and written into the stage's params before they
//! are checked, so an override is type-checked exactly like the file.

use crate::diagnostic::{Diagnostic, PipelineError};
use crate::spec::RawPipeline;
use crate::yaml::{self, Key, Loc, Node, NodeValue};

/// One applied override, kept so errors about its value can name it.
#[derive(Clone, Debug)]
pub struct Override {
    pub stage: String,
    /// Dotted path inside the stage's params.
    pub path: String,
    /// The argument as given, e.g. `ppo.kl.coef=0.1`.
    pub argument: String,
}

impl Override {
    pub fn origin(&self) -> String {
        format!("--set {}", self.argument)
    }
}

/// Applies `--set` arguments in order; a later one wins over an earlier one.
pub fn apply(pipeline: &mut RawPipeline, arguments: &[String]) -> Result<(), PipelineError> {
    let mut diags = Vec::new();
    for argument in arguments {
        if let Err(d) = apply_one(pipeline, argument) {
            diags.push(d);
        }
    }
    if diags.is_empty() {
        Ok(())
    } else {
        Err(PipelineError { diagnostics: diags })
    }
}

fn apply_one(pipeline: &mut RawPipeline, argument: &str) -> Result<(), Diagnostic> {
    let origin = format!("--set {argument}");
    let usage = "STAGE.KEY=VALUE, e.g. `--set sft.learning_rate=2e-4` or `--set ppo.kl.coef=0.1`";
    let Some((target, text)) = argument.split_once('=') else {
        return Err(
            Diagnostic::new(&origin, Loc::default(), "an override needs `=`").expected(usage),
        );
    };
    if target == "seed" {
        return match text.trim().parse::<u64>() {
            Ok(seed) => {
                pipeline.seed = seed;
                Ok(())
            }
            Err(_) => Err(Diagnostic::new(
                &origin,
                Loc::default(),
                format!("`seed` must be a non-negative integer, got `{text}`"),
            )),
        };
    }
    let Some((stage_name, path)) = target.split_once('.') else {
        return Err(Diagnostic::new(
            &origin,
            Loc::default(),
            format!("`{target}` names no parameter"),
        )
        .expected(usage));
    };
    let stage_names: Vec<String> = pipeline.stages.iter().map(|s| s.name.clone()).collect();
    let Some(stage) = pipeline.stages.iter_mut().find(|s| s.name == stage_name) else {
        return Err(Diagnostic::new(
            &origin,
            Loc::default(),
            format!("no stage named `{stage_name}`"),
        )
        .expected(crate::diagnostic::one_of(
            stage_names.iter().map(String::as_str),
        ))
        .suggest(stage_name, stage_names.iter().map(String::as_str)));
    };
    if path.is_empty() || path.split('.').any(str::is_empty) {
        return Err(Diagnostic::new(
            &origin,
            Loc::default(),
            format!("`{target}` is not a valid parameter path"),
        )
        .expected(usage));
    }
    if path == "kind" || path == "after" {
        return Err(Diagnostic::new(
            &origin,
            Loc::default(),
            format!("`{path}` of a stage cannot be overridden"),
        )
        .hint("edit the pipeline file to change a stage's kind or ordering"));
    }
    let value = yaml::parse(text).map_err(|e| {
        Diagnostic::new(
            &origin,
            Loc::default(),
            format!("the value `{text}` is not valid YAML: {}", e.message),
        )
    })?;
    set_path(&mut stage.params, path, strip_locations(value))
        .map_err(|message| Diagnostic::new(&origin, Loc::default(), message))?;
    pipeline.overrides.push(Override {
        stage: stage_name.to_string(),
        path: path.to_string(),
        argument: argument.to_string(),
    });
    Ok(())
}

/// Values from the command line have no place in the file.
fn strip_locations(mut node: Node) -> Node {
    node.loc = Loc::default();
    node.value = match node.value {
        NodeValue::Seq(items) => NodeValue::Seq(items.into_iter().map(strip_locations).collect()),
        NodeValue::Map(entries) => NodeValue::Map(
            entries
                .into_iter()
                .map(|(k, v)| {
                    (
                        Key {
                            name: k.name,
                            loc: Loc::default(),
                        },
                        strip_locations(v),
                    )
                })
                .collect(),
        ),
        other => other,
    };
    node
}

fn set_path(node: &mut Node, path: &str, value: Node) -> Result<(), String> {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    if matches!(node.value, NodeValue::Null) {
        node.value = NodeValue::Map(Vec::new());
    }
    match &mut node.value {
        NodeValue::Map(entries) => {
            let index = match entries.iter().position(|(k, _)| k.name == head) {
                Some(i) => i,
                None => {
                    entries.push((
                        Key {
                            name: head.to_string(),
                            loc: Loc::default(),
                        },
                        Node::new(NodeValue::Null, Loc::default()),
                    ));
                    entries.len() - 1
                }
            };
            let slot = &mut entries[index].1;
            match rest {
                None => {
                    *slot = value;
                    Ok(())
                }
                Some(rest) => set_path(slot, rest, value),
            }
        }
        NodeValue::Seq(items) => {
            let i: usize = head
                .parse()
                .map_err(|_| format!("`{head}` is not a list index"))?;
            let len = items.len();
            let slot = items
                .get_mut(i)
                .ok_or_else(|| format!("index {i} is past the end of a list of {len}"))?;
            match rest {
                None => {
                    *slot = value;
                    Ok(())
                }
                Some(rest) => set_path(slot, rest, value),
            }
        }
        _ => Err(format!(
            "`{head}` is inside {}, which has no keys",
            node.type_name()
        )),
    }
}
