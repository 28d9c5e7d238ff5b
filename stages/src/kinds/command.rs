//! The `command` stage kind: runs an external program as a pipeline stage, so users
//! can plug their own scripts into a recipe (and the engine can be tested without ML).
//!
//! ```yaml
//! prep:
//!   kind: command
//!   run: [python3, scripts/prep.py, --n, "{params.n}", --in, "{inputs.raw}", --out, "{out}"]
//!   inputs: { raw: data/raw.csv, model: sft }   # files, folders or stage references
//!   params: { n: 1000 }                         # part of the key
//!   outputs: [data.jsonl]                       # must exist in {out} when the program exits 0
//! ```
//!
//! Placeholders: `{out}` (the empty output folder), `{inputs.NAME}`, `{params.NAME}`,
//! `{seed}`, `{scratch}` (kept across a killed run); `{{` and `}}` are literal braces.
//! The same values are in the environment as RLHF_OUT, RLHF_INPUT_<NAME>,
//! RLHF_PARAM_<NAME>, RLHF_SEED and RLHF_SCRATCH. The program runs in rlhf's working
//! directory; its stdout and stderr are kept in the stage's log folder.

use rlhf_engine::{
    ArtifactKind, ExternalPolicy, InputPort, OutputPort, Ports, PortsError, Stage, StageContext,
    StageError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Component, Path};
use std::process::{Command, Stdio};

pub struct CommandStage;

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandParams {
    /// The program and its arguments, with placeholders.
    pub run: Vec<String>,
    /// Name → a stage reference (`sft`, `dolly.train`) or a local file or folder.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// Values handed to the program; they are part of the stage's key.
    #[serde(default)]
    pub params: BTreeMap<String, Json>,
    /// Extra environment variables for the program (placeholders allowed).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Files or folders the program must create inside `{out}`.
    pub outputs: Vec<String>,
    /// What kind of artifact `{out}` is, so ML stages can consume it.
    #[serde(default = "default_artifact")]
    pub artifact: ArtifactKind,
}

fn default_artifact() -> ArtifactKind {
    ArtifactKind::Files
}

impl Stage for CommandStage {
    type Params = CommandParams;
    const KIND: &'static str = "command";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "Run an external program with declared inputs, params and outputs";

    fn ports(params: &CommandParams) -> Result<Ports, PortsError> {
        if params.run.is_empty() || params.run[0].trim().is_empty() {
            return Err(PortsError::new(Some("run"), "`run` must name a program")
                .with_hint("e.g. run: [python3, scripts/prep.py, \"{out}\"]"));
        }
        for (i, arg) in params.run.iter().enumerate() {
            check_placeholders(arg, params)
                .map_err(|m| PortsError::new(Some(&format!("run.{i}")), m))?;
        }
        for (name, value) in &params.env {
            check_placeholders(value, params)
                .map_err(|m| PortsError::new(Some(&format!("env.{name}")), m))?;
        }
        if params.outputs.is_empty() {
            return Err(PortsError::new(
                Some("outputs"),
                "`outputs` must list at least one file the program writes into {out}",
            ));
        }
        for (i, output) in params.outputs.iter().enumerate() {
            let path = Path::new(output);
            if output.is_empty()
                || path.is_absolute()
                || path
                    .components()
                    .any(|c| !matches!(c, Component::Normal(_)))
            {
                return Err(PortsError::new(
                    Some(&format!("outputs.{i}")),
                    format!(
                        "output `{output}` must be a relative path inside {{out}} without `..`"
                    ),
                ));
            }
        }
        let inputs = params
            .inputs
            .iter()
            .map(|(name, reference)| {
                InputPort::stage(name, reference, &[])
                    .at_param(&format!("inputs.{name}"))
                    .allow_external(ExternalPolicy::StageOrPathOrHub)
            })
            .collect();
        Ok(Ports {
            inputs,
            outputs: vec![OutputPort::new("out", params.artifact)],
        })
    }

    fn run(params: &CommandParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let out = ctx.output_dir("out")?.to_path_buf();
        let values = placeholder_values(params, ctx, &out)?;
        let argv: Vec<String> = params
            .run
            .iter()
            .map(|a| substitute(a, &values))
            .collect::<Result<_, _>>()
            .map_err(StageError::failed)?;
        let stdout_path = ctx.log_dir.join("stdout.txt");
        let stderr_path = ctx.log_dir.join("stderr.txt");
        let stdout =
            std::fs::File::create(&stdout_path).map_err(|e| StageError::io(&stdout_path, e))?;
        let stderr =
            std::fs::File::create(&stderr_path).map_err(|e| StageError::io(&stderr_path, e))?;
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        for (name, value) in &values {
            command.env(env_name(name), value);
        }
        for (name, value) in &params.env {
            command.env(
                name,
                substitute(value, &values).map_err(StageError::failed)?,
            );
        }
        let status = command.status().map_err(|e| {
            StageError::failed_with_hint(
                format!("cannot start `{}`: {e}", argv[0]),
                format!("check `run:` of stage `{}`; the program must be on PATH or a path from the working directory", ctx.stage),
            )
        })?;
        if !status.success() {
            let tail = last_lines(&stderr_path, 20);
            return Err(StageError::failed_with_hint(
                format!(
                    "`{}` exited with {status}{}",
                    argv.join(" "),
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!("; last lines of stderr:\n{tail}")
                    }
                ),
                format!("full logs: {}", ctx.log_dir.display()),
            ));
        }
        for output in &params.outputs {
            if !out.join(output).exists() {
                return Err(StageError::failed_with_hint(
                    format!(
                        "`{}` exited 0 but did not create the declared output `{output}`",
                        argv[0]
                    ),
                    "write every file listed in `outputs:` into the folder passed as {out}",
                ));
            }
        }
        Ok(())
    }
}

/// Placeholder name (`out`, `inputs.raw`, `params.n`, `seed`, `scratch`) → value.
fn placeholder_values(
    params: &CommandParams,
    ctx: &StageContext,
    out: &Path,
) -> Result<BTreeMap<String, String>, StageError> {
    let mut values = BTreeMap::new();
    values.insert("out".to_string(), out.display().to_string());
    values.insert("seed".to_string(), ctx.seed.to_string());
    values.insert("scratch".to_string(), ctx.scratch.display().to_string());
    for name in params.inputs.keys() {
        values.insert(
            format!("inputs.{name}"),
            ctx.input(name)?.path.display().to_string(),
        );
    }
    for (name, value) in &params.params {
        let text = match value {
            Json::String(s) => s.clone(),
            other => other.to_string(),
        };
        values.insert(format!("params.{name}"), text);
    }
    Ok(values)
}

/// `inputs.raw` → `RLHF_INPUT_RAW`.
fn env_name(placeholder: &str) -> String {
    let upper = |s: &str| {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect::<String>()
    };
    match placeholder.split_once('.') {
        Some(("inputs", name)) => format!("RLHF_INPUT_{}", upper(name)),
        Some(("params", name)) => format!("RLHF_PARAM_{}", upper(name)),
        _ => format!("RLHF_{}", upper(placeholder)),
    }
}

/// Splits a template into literal text and placeholder names.
fn parse_template(text: &str) -> Result<Vec<(bool, String)>, String> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                parts.push((false, std::mem::take(&mut literal)));
                parts.push((true, name));
            }
            '}' => {
                return Err(format!(
                    "unmatched `}}` in `{text}` (write `}}}}` for a literal brace)"
                ))
            }
            c => literal.push(c),
        }
    }
    parts.push((false, literal));
    Ok(parts)
}

fn check_placeholders(text: &str, params: &CommandParams) -> Result<(), String> {
    for (is_name, name) in parse_template(text)? {
        if !is_name {
            continue;
        }
        let known = match name.split_once('.') {
            Some(("inputs", n)) => params.inputs.contains_key(n),
            Some(("params", n)) => params.params.contains_key(n),
            None => matches!(name.as_str(), "out" | "seed" | "scratch"),
            _ => false,
        };
        if !known {
            let mut valid: Vec<String> = vec!["out".into(), "seed".into(), "scratch".into()];
            valid.extend(params.inputs.keys().map(|k| format!("inputs.{k}")));
            valid.extend(params.params.keys().map(|k| format!("params.{k}")));
            return Err(format!(
                "unknown placeholder `{{{name}}}` in `{text}`; known: {}",
                valid
                    .iter()
                    .map(|v| format!("{{{v}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    Ok(())
}

fn substitute(text: &str, values: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    for (is_name, part) in parse_template(text)? {
        if is_name {
            out.push_str(
                values
                    .get(&part)
                    .ok_or_else(|| format!("unknown placeholder `{{{part}}}`"))?,
            );
        } else {
            out.push_str(&part);
        }
    }
    Ok(out)
}

fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(run: &[&str]) -> CommandParams {
        CommandParams {
            run: run.iter().map(|s| s.to_string()).collect(),
            inputs: BTreeMap::from([("raw".to_string(), "data.csv".to_string())]),
            params: BTreeMap::from([("n".to_string(), Json::from(3))]),
            env: BTreeMap::new(),
            outputs: vec!["x.txt".into()],
            artifact: ArtifactKind::Files,
        }
    }

    #[test]
    fn placeholders_are_substituted_and_braces_escaped() {
        let values = BTreeMap::from([
            ("out".to_string(), "/o".to_string()),
            ("params.n".to_string(), "3".to_string()),
        ]);
        assert_eq!(
            substitute("{out}/a-{params.n}-{{x}}", &values).unwrap(),
            "/o/a-3-{x}"
        );
    }

    #[test]
    fn unknown_placeholder_is_refused_before_running() {
        let err = CommandStage::ports(&params(&["echo", "{inputs.nope}"])).unwrap_err();
        assert!(
            err.message.contains("unknown placeholder `{inputs.nope}`"),
            "{}",
            err.message
        );
        assert_eq!(err.param.as_deref(), Some("run.1"));
    }

    #[test]
    fn outputs_must_stay_inside_out() {
        let mut p = params(&["echo"]);
        p.outputs = vec!["../escape.txt".into()];
        assert!(CommandStage::ports(&p).is_err());
    }

    #[test]
    fn env_names_are_upper_case() {
        assert_eq!(env_name("inputs.raw-data"), "RLHF_INPUT_RAW_DATA");
        assert_eq!(env_name("params.n"), "RLHF_PARAM_N");
        assert_eq!(env_name("out"), "RLHF_OUT");
    }
}
