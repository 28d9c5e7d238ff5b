//! `rlhf status`: for every stage, whether `rlhf run` would reuse its cached outputs,
//! and if not, why — "param `lr` changed 1e-4 → 2e-4", "input `model` changed",
//! "never run" — without running anything.

use crate::check::{Pipeline, Source};
use crate::key::{flatten, stage_key};
use crate::lockfile;
use crate::run::{Engine, RunError, RunOptions};
use rlhf_cache::{ArtifactHealth, Record};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// A run would reuse the cached outputs.
    Cached,
    /// A run would execute the stage; `reasons` say why.
    Stale,
    /// Depends on a stage that will run first, so its key is not known yet.
    Blocked,
}

#[derive(Clone, Debug, Serialize)]
pub struct StageStatus {
    pub stage: String,
    pub kind: String,
    pub status: State,
    pub key: Option<String>,
    pub reasons: Vec<String>,
}

impl Engine<'_> {
    pub fn status(&self, pipeline: &Pipeline) -> Result<Vec<StageStatus>, RunError> {
        let old_lock = crate::run::read_lock(&lockfile::lock_path(&pipeline.file))?;
        let selected = self.selected(pipeline, &RunOptions::default());
        let externals = self.resolve_externals(pipeline, &selected);
        let mut produced: BTreeMap<(String, String), String> = BTreeMap::new();
        let mut states: BTreeMap<String, State> = BTreeMap::new();
        let mut out = Vec::new();
        for stage in &pipeline.stages {
            let mut status = StageStatus {
                stage: stage.name.clone(),
                kind: stage.kind.clone(),
                status: State::Blocked,
                key: None,
                reasons: Vec::new(),
            };
            let waiting: Vec<String> = stage
                .upstream()
                .into_iter()
                .filter(|u| states.get(u) != Some(&State::Cached))
                .collect();
            let mut digests = BTreeMap::new();
            for input in &stage.inputs {
                match &input.source {
                    Source::Stage { stage: up, output } => {
                        if let Some(d) = produced.get(&(up.clone(), output.clone())) {
                            digests.insert(input.name.clone(), d.clone());
                        }
                    }
                    _ => match externals.get(&input.reference) {
                        Some(Ok(resolved)) => {
                            digests.insert(input.name.clone(), resolved.digest.clone());
                        }
                        Some(Err((message, _))) => status.reasons.push(message.clone()),
                        None => {}
                    },
                }
            }
            if !waiting.is_empty() || !status.reasons.is_empty() {
                if !waiting.is_empty() {
                    status.reasons.push(format!(
                        "waits for {}",
                        waiting
                            .iter()
                            .map(|w| format!("`{w}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                states.insert(stage.name.clone(), State::Blocked);
                out.push(status);
                continue;
            }
            let key = stage_key(stage, &digests);
            let healthy = self.cache.read_record(&key).ok().flatten().filter(|r| {
                r.outputs
                    .values()
                    .all(|d| self.cache.check_artifact(d) == ArtifactHealth::Ok)
            });
            status.key = Some(key.clone());
            match healthy {
                Some(record) => {
                    status.status = State::Cached;
                    for (name, digest) in &record.outputs {
                        produced.insert((stage.name.clone(), name.clone()), digest.clone());
                    }
                }
                None => {
                    status.status = State::Stale;
                    let locked = old_lock.as_ref().and_then(|l| l.stages.get(&stage.name));
                    status.reasons = match locked {
                        None => vec!["never run".to_string()],
                        Some(entry) if entry.key == key => {
                            vec!["cached outputs are missing or damaged".to_string()]
                        }
                        Some(entry) => match self.cache.read_record(&entry.key).ok().flatten() {
                            Some(previous) => explain(&previous, &stage.params, &digests),
                            None => vec![
                                "its key changed (the previous record is no longer in the cache)"
                                    .to_string(),
                            ],
                        },
                    };
                }
            }
            states.insert(stage.name.clone(), status.status);
            out.push(status);
        }
        Ok(out)
    }
}

/// Why a stage's key changed, compared with the record of its previous key.
fn explain(
    previous: &Record,
    params: &serde_json::Value,
    digests: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut reasons = Vec::new();
    let old = flatten(&previous.params);
    let new = flatten(params);
    for (path, value) in &new {
        match old.get(path) {
            Some(before) if before != value => reasons.push(format!(
                "param `{path}` changed {} → {}",
                plain(before),
                plain(value)
            )),
            None => reasons.push(format!("param `{path}` set to {}", plain(value))),
            _ => {}
        }
    }
    for (path, before) in &old {
        if !new.contains_key(path) {
            reasons.push(format!("param `{path}` removed (was {})", plain(before)));
        }
    }
    for (name, digest) in digests {
        match previous.inputs.get(name) {
            Some(before) if before != digest => reasons.push(format!("input `{name}` changed")),
            None => reasons.push(format!("input `{name}` added")),
            _ => {}
        }
    }
    if reasons.is_empty() {
        reasons.push("the stage kind's version or the pipeline seed changed".to_string());
    }
    reasons
}

/// JSON strings without their quotes, for messages.
fn plain(json_text: &str) -> String {
    json_text.trim_matches('"').to_string()
}
