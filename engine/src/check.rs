//! From a raw pipeline to a checked one: every stage's params parsed by its kind,
//! references resolved to stage outputs or external files, artifact kinds matched,
//! cycles refused, stages ordered. Everything is checked before anything runs, and all
//! problems are reported together.

use crate::artifact::ArtifactKind;
use crate::diagnostic::{one_of, Diagnostic, PipelineError};
use crate::registry::{ConfigureError, Registry};
use crate::spec::{RawPipeline, RawStage};
use crate::stage::{ExternalPolicy, InputPort, OutputPort};
use crate::yaml::Loc;
use serde_json::Value as Json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// A pipeline whose every stage, reference and edge has been checked.
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub file: PathBuf,
    pub name: String,
    pub seed: u64,
    /// In a topological order (ties broken by order in the file).
    pub stages: Vec<CheckedStage>,
}

#[derive(Clone, Debug)]
pub struct CheckedStage {
    pub name: String,
    pub kind: String,
    pub kind_version: u32,
    /// Params with defaults filled in, as the kind will receive them.
    pub params: Json,
    pub inputs: Vec<ResolvedInput>,
    pub outputs: Vec<OutputPort>,
    /// Stages this one waits for without reading their outputs.
    pub after: Vec<String>,
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// Output `output` of stage `stage`.
    Stage { stage: String, output: String },
    /// A local file or folder (absolute or relative to the working directory).
    Path(PathBuf),
    /// A `hf://` reference, resolved at run time.
    Hub(String),
}

#[derive(Clone, Debug)]
pub struct ResolvedInput {
    pub name: String,
    /// The params path that held the reference.
    pub param: String,
    pub reference: String,
    pub source: Source,
    /// The artifact kind of a stage output; `None` for external inputs.
    pub kind: Option<ArtifactKind>,
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&CheckedStage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Stages `name` depends on, directly or not, plus `name` itself.
    pub fn ancestors_and_self(&self, name: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![name.to_string()];
        while let Some(n) = todo.pop() {
            if !seen.insert(n.clone()) {
                continue;
            }
            if let Some(stage) = self.stage(&n) {
                todo.extend(stage.upstream());
            }
        }
        seen
    }
}

impl CheckedStage {
    /// Names of the stages this one depends on (inputs and `after`).
    pub fn upstream(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.after.iter().cloned().collect();
        for input in &self.inputs {
            if let Source::Stage { stage, .. } = &input.source {
                names.insert(stage.clone());
            }
        }
        names
    }
}

/// Seed of a stage: a pure function of the pipeline seed and the stage name, so
/// reordering or adding stages never changes another stage's randomness.
pub fn stage_seed(pipeline_seed: u64, stage: &str) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"rlhf-stage-seed\0");
    hasher.update(&pipeline_seed.to_le_bytes());
    hasher.update(stage.as_bytes());
    let bytes = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

struct Configured<'a> {
    raw: &'a RawStage,
    kind: &'static str,
    kind_version: u32,
    params: Json,
    inputs: Vec<InputPort>,
    outputs: Vec<OutputPort>,
}

pub fn check(raw: &RawPipeline, registry: &Registry) -> Result<Pipeline, PipelineError> {
    let mut diags = Vec::new();
    let origin = raw.origin();
    let configured: Vec<Configured> = raw
        .stages
        .iter()
        .filter_map(|stage| configure_stage(raw, stage, registry, &mut diags))
        .collect();
    check_defaults_are_used(raw, registry, &mut diags);
    let outputs: BTreeMap<&str, &[OutputPort]> = configured
        .iter()
        .map(|c| (c.raw.name.as_str(), c.outputs.as_slice()))
        .collect();
    let all_names: Vec<&str> = raw.stages.iter().map(|s| s.name.as_str()).collect();
    // A reference to a stage that already failed to configure would only repeat that error.
    let broken: BTreeSet<&str> = all_names
        .iter()
        .copied()
        .filter(|n| !outputs.contains_key(n))
        .collect();
    let mut stages = Vec::new();
    for c in &configured {
        let mut inputs = Vec::new();
        for port in &c.inputs {
            let head = port.reference.split('.').next().unwrap_or_default();
            if broken.contains(port.reference.as_str()) || broken.contains(head) {
                continue;
            }
            match resolve(raw, c.raw, port, &outputs, &all_names) {
                Ok(input) => inputs.push(input),
                Err(d) => diags.push(d),
            }
        }
        for (after, loc) in &c.raw.after {
            if !all_names.contains(&after.as_str()) {
                diags.push(
                    Diagnostic::new(
                        &origin,
                        *loc,
                        format!("`after` of stage `{}` names no stage `{after}`", c.raw.name),
                    )
                    .expected(one_of(all_names.iter().copied()))
                    .suggest(after, all_names.iter().copied()),
                );
            }
        }
        stages.push(CheckedStage {
            name: c.raw.name.clone(),
            kind: c.kind.to_string(),
            kind_version: c.kind_version,
            params: c.params.clone(),
            inputs,
            outputs: c.outputs.clone(),
            after: c.raw.after.iter().map(|(n, _)| n.clone()).collect(),
            seed: stage_seed(raw.seed, &c.raw.name),
        });
    }
    if !diags.is_empty() {
        return Err(PipelineError { diagnostics: diags });
    }
    let ordered = crate::graph::topological_order(&stages).map_err(|cycle| {
        let first = raw.stage(&cycle[0]).map(|s| s.name_loc).unwrap_or_default();
        let mut path = cycle.clone();
        path.push(cycle[0].clone());
        PipelineError::one(
            Diagnostic::new(
                &origin,
                first,
                format!("the stages form a cycle: {}", path.join(" → ")),
            )
            .hint("a stage cannot depend on its own output, directly or through other stages"),
        )
    })?;
    Ok(Pipeline {
        file: raw.file.clone(),
        name: raw.name.clone(),
        seed: raw.seed,
        stages: ordered,
    })
}

/// Where a diagnostic about `stage`'s param `path` should point: the `--set` that set
/// it, or its place in the file.
fn place(raw: &RawPipeline, stage: &RawStage, path: &str, at_key: bool) -> (String, Loc) {
    for o in raw.overrides.iter().rev() {
        let covers = o.path == path
            || path.starts_with(&format!("{}.", o.path))
            || o.path.starts_with(&format!("{path}."));
        if o.stage == stage.name && covers && !path.is_empty() {
            return (o.origin(), Loc::default());
        }
    }
    let loc = if path.is_empty() {
        stage.name_loc
    } else {
        let (parent, last) = match path.rsplit_once('.') {
            Some((p, l)) => (p, l),
            None => ("", path),
        };
        let parent_node = stage.params.locate(parent);
        match (at_key, parent_node.key_loc(last)) {
            (true, Some(loc)) => loc,
            _ => {
                let node = stage.params.locate(path);
                if node.loc.is_known() {
                    node.loc
                } else {
                    stage.name_loc
                }
            }
        }
    };
    (raw.origin(), loc)
}

fn configure_stage<'a>(
    raw: &RawPipeline,
    stage: &'a RawStage,
    registry: &Registry,
    diags: &mut Vec<Diagnostic>,
) -> Option<Configured<'a>> {
    let origin = raw.origin();
    let Some(kind) = registry.get(&stage.kind) else {
        let names: Vec<&str> = registry.names().collect();
        diags.push(
            Diagnostic::new(
                &origin,
                stage.kind_loc,
                format!(
                    "unknown stage kind `{}` in stage `{}`",
                    stage.kind, stage.name
                ),
            )
            .expected(one_of(names.iter().copied()))
            .suggest(&stage.kind, names.iter().copied()),
        );
        return None;
    };
    let mut params = stage.params.to_json();
    apply_defaults(raw, kind.params_schema(), &mut params);
    match kind.configure(&params) {
        Ok(configured) => Some(Configured {
            raw: stage,
            kind: kind.kind(),
            kind_version: kind.version(),
            params: configured.params,
            inputs: configured.ports.inputs,
            outputs: configured.ports.outputs,
        }),
        Err(ConfigureError::Params { path, message }) => {
            diags.push(params_diagnostic(raw, stage, &path, &message));
            None
        }
        Err(ConfigureError::Ports(e)) => {
            let (origin, loc) = place(raw, stage, e.param.as_deref().unwrap_or(""), false);
            let mut d = Diagnostic::new(
                &origin,
                loc,
                format!("stage `{}`: {}", stage.name, e.message),
            );
            if let Some(hint) = e.hint {
                d = d.hint(hint);
            }
            diags.push(d);
            None
        }
    }
}

/// Turns serde's message into ours: the place, what was expected, the nearest name.
fn params_diagnostic(raw: &RawPipeline, stage: &RawStage, path: &str, message: &str) -> Diagnostic {
    let who = format!("stage `{}` (kind `{}`)", stage.name, stage.kind);
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let name = rest.split('`').next().unwrap_or_default();
        let expected = expected_names(message);
        let (origin, loc) = place(raw, stage, path, true);
        let shown = if path.is_empty() {
            name.to_string()
        } else {
            path.to_string()
        };
        return Diagnostic::new(&origin, loc, format!("unknown key `{shown}` in {who}"))
            .expected(one_of(expected.iter().map(String::as_str)))
            .suggest(name, expected.iter().map(String::as_str));
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let name = rest.split('`').next().unwrap_or_default();
        let expected = expected_names(message);
        let (origin, loc) = place(raw, stage, path, false);
        return Diagnostic::new(
            &origin,
            loc,
            format!("unknown value `{name}` for `{path}` in {who}"),
        )
        .expected(one_of(expected.iter().map(String::as_str)))
        .suggest(name, expected.iter().map(String::as_str));
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or_default();
        let (origin, loc) = place(raw, stage, path, false);
        let full = if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}.{name}")
        };
        return Diagnostic::new(
            &origin,
            loc,
            format!("{who} is missing the required key `{full}`"),
        )
        .expected(format!("a `{name}:` entry"));
    }
    let (origin, loc) = place(raw, stage, path, false);
    let expected = message
        .split_once(", expected ")
        .map(|(_, e)| e.to_string());
    let mut d = Diagnostic::new(
        &origin,
        loc,
        format!("invalid value for `{path}` in {who}: {message}"),
    );
    if let Some(e) = expected {
        d = d.expected(e);
    }
    d
}

/// The names in "…, expected one of `a`, `b`" or "…, expected `a`".
fn expected_names(message: &str) -> Vec<String> {
    let Some((_, list)) = message.split_once("expected ") else {
        return Vec::new();
    };
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn schema_properties(schema: &Json) -> BTreeSet<String> {
    schema
        .get("properties")
        .and_then(Json::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

/// Fills in pipeline-level `defaults` for the keys a kind has and the stage left out.
fn apply_defaults(raw: &RawPipeline, schema: Json, params: &mut Json) {
    let properties = schema_properties(&schema);
    let Json::Object(map) = params else { return };
    for (key, value) in &raw.defaults {
        if properties.contains(&key.name) && !map.contains_key(&key.name) {
            map.insert(key.name.clone(), value.to_json());
        }
    }
}

fn check_defaults_are_used(raw: &RawPipeline, registry: &Registry, diags: &mut Vec<Diagnostic>) {
    let mut accepted = BTreeSet::new();
    for stage in &raw.stages {
        if let Some(kind) = registry.get(&stage.kind) {
            accepted.extend(schema_properties(&kind.params_schema()));
        }
    }
    for (key, _) in &raw.defaults {
        if !accepted.contains(&key.name) {
            diags.push(
                Diagnostic::new(
                    &raw.origin(),
                    key.loc,
                    format!("no stage of this pipeline takes the default `{}`", key.name),
                )
                .suggest(&key.name, accepted.iter().map(String::as_str)),
            );
        }
    }
}

fn resolve(
    raw: &RawPipeline,
    stage: &RawStage,
    port: &InputPort,
    outputs: &BTreeMap<&str, &[OutputPort]>,
    all_names: &[&str],
) -> Result<ResolvedInput, Diagnostic> {
    let (origin, loc) = place(raw, stage, &port.param, false);
    let reference = port.reference.as_str();
    let input = |source: Source, kind: Option<ArtifactKind>| ResolvedInput {
        name: port.name.clone(),
        param: port.param.clone(),
        reference: reference.to_string(),
        source,
        kind,
    };
    if reference.starts_with("hf://") {
        if port.external != ExternalPolicy::StageOrPathOrHub {
            return Err(Diagnostic::new(
                &origin,
                loc,
                format!(
                    "`{}` of stage `{}` cannot be a hub reference",
                    port.param, stage.name
                ),
            )
            .expected(expected_for(port, all_names))
            .hint("load it with a `load_pretrained` or `dataset` stage and reference that stage"));
        }
        return Ok(input(Source::Hub(reference.to_string()), None));
    }
    let (head, tail) = match reference.split_once('.') {
        Some((h, t)) => (h, Some(t)),
        None => (reference, None),
    };
    if head == stage.name && outputs.contains_key(head) {
        return Err(Diagnostic::new(
            &origin,
            loc,
            format!("stage `{}` refers to its own output", stage.name),
        )
        .hint("a stage cannot read what it writes; reference an upstream stage"));
    }
    if let Some(ports) = outputs.get(reference).or_else(|| outputs.get(head)) {
        let stage_name = if outputs.contains_key(reference) {
            reference
        } else {
            head
        };
        let wanted = if stage_name == reference { None } else { tail };
        let chosen = match wanted {
            Some(out) => ports.iter().find(|p| p.name == out),
            None if ports.len() == 1 => ports.first(),
            None => {
                let names: Vec<String> = ports
                    .iter()
                    .map(|p| format!("`{stage_name}.{}`", p.name))
                    .collect();
                return Err(Diagnostic::new(&origin, loc, format!("stage `{stage_name}` has several outputs; say which one `{}` of stage `{}` reads", port.param, stage.name))
                    .expected(format!("one of {}", names.join(", "))));
            }
        };
        let Some(output) = chosen else {
            let out = wanted.unwrap_or_default();
            let local = resolve_path(reference);
            if port.external != ExternalPolicy::StageOnly && local.exists() {
                return Ok(input(Source::Path(local), None));
            }
            let names: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
            return Err(Diagnostic::new(
                &origin,
                loc,
                format!("stage `{stage_name}` has no output `{out}`"),
            )
            .expected(one_of(names.iter().copied()))
            .suggest(out, names.iter().copied()));
        };
        if !port.accepts.is_empty() && !port.accepts.contains(&output.kind) {
            let wanted: Vec<&str> = port.accepts.iter().map(|k| k.as_str()).collect();
            return Err(Diagnostic::new(
                &origin,
                loc,
                format!(
                    "`{}` of stage `{}` needs {}, but `{reference}` is {}",
                    port.param,
                    stage.name,
                    article_list(&wanted),
                    article(output.kind.as_str())
                ),
            )
            .expected(format!(
                "a reference to a stage that outputs {}",
                article_list(&wanted)
            )));
        }
        return Ok(input(
            Source::Stage {
                stage: stage_name.to_string(),
                output: output.name.clone(),
            },
            Some(output.kind),
        ));
    }
    if port.external != ExternalPolicy::StageOnly {
        let local = resolve_path(reference);
        if local.exists() {
            return Ok(input(Source::Path(local), None));
        }
        return Err(Diagnostic::new(&origin, loc, format!("`{reference}` (`{}` of stage `{}`) is neither a stage nor an existing file or folder", port.param, stage.name))
            .expected(expected_for(port, all_names))
            .suggest(head, all_names.iter().copied()));
    }
    Err(Diagnostic::new(
        &origin,
        loc,
        format!(
            "`{}` of stage `{}` refers to `{reference}`, which is not a stage",
            port.param, stage.name
        ),
    )
    .expected(expected_for(port, all_names))
    .suggest(head, all_names.iter().copied()))
}

/// Paths in a pipeline are relative to the working directory, like every path on the
/// command line (`--set base.model=../models/x` means the same as in the file).
fn resolve_path(reference: &str) -> PathBuf {
    PathBuf::from(reference)
}

fn expected_for(port: &InputPort, all_names: &[&str]) -> String {
    let stages = one_of(all_names.iter().copied());
    match port.external {
        ExternalPolicy::StageOnly => format!("a stage name: {stages}"),
        ExternalPolicy::StageOrPath => {
            format!("a stage name ({stages}) or an existing file or folder")
        }
        ExternalPolicy::StageOrPathOrHub => {
            format!("a stage name ({stages}), an existing file or folder, or `hf://org/name[@revision]`")
        }
    }
}

fn article(word: &str) -> String {
    match word.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => format!("an {word}"),
        _ => format!("a {word}"),
    }
}

fn article_list(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| article(w))
        .collect::<Vec<_>>()
        .join(" or ")
}
