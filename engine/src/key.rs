//! Stage keys: what a stage's result is cached under.
//!
//! A key is blake3 over the canonical JSON of [`KeyMaterial`]: the key format version,
//! the kind and its version, the params with defaults filled in, the stage's seed, and
//! the *content digests* of its inputs. Because inputs enter by content and not by the
//! upstream stage's key, an upstream rerun that produces identical bytes leaves every
//! stage below it cached (early cutoff).
//!
//! Deliberately NOT part of a key (changing them never reruns anything):
//! - where the cache lives (`--cache-dir`, `RLHF_CACHE_DIR`), log level, progress style,
//!   `--json`, and the thread count (`RAYON_NUM_THREADS`);
//! - the pipeline's `name`, its file path, comments, formatting and the order of stages
//!   in the file; `after:` edges (they order stages but feed nothing in);
//! - the names and paths of inputs: a reference (`model: sft`, `source: data/x.jsonl`) is
//!   replaced by a marker and the input enters the key by its content digest, so moving
//!   a file or renaming an upstream stage with identical output changes nothing;
//! - the stage's own name, except through its seed (derived from pipeline seed + name).
//!
//! Changing what goes into a key, or how it is serialised, must bump
//! [`KEY_FORMAT_VERSION`]; a golden-key test pins the current format.

use crate::check::CheckedStage;
use serde::Serialize;
use serde_json::Value as Json;
use std::collections::BTreeMap;

pub const KEY_FORMAT_VERSION: u32 = 1;

/// Everything a stage's outputs are a function of.
#[derive(Serialize)]
pub struct KeyMaterial<'a> {
    pub key_format: u32,
    pub kind: &'a str,
    pub kind_version: u32,
    pub params: Json,
    pub seed: u64,
    /// Input name → content digest.
    pub inputs: &'a BTreeMap<String, String>,
}

/// The params as they enter the key: each reference replaced by `{"input": NAME}`.
pub fn key_params(stage: &CheckedStage) -> Json {
    let mut params = stage.params.clone();
    for input in &stage.inputs {
        if let Some(slot) = json_at_mut(&mut params, &input.param) {
            *slot = serde_json::json!({ "input": input.name });
        }
    }
    params
}

fn json_at_mut<'a>(value: &'a mut Json, path: &str) -> Option<&'a mut Json> {
    let mut current = value;
    for segment in path.split('.').filter(|s| !s.is_empty()) {
        current = match current {
            Json::Object(map) => map.get_mut(segment)?,
            Json::Array(items) => items.get_mut(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// The key of `stage` given the content digests of its inputs.
pub fn stage_key(stage: &CheckedStage, input_digests: &BTreeMap<String, String>) -> String {
    let material = KeyMaterial {
        key_format: KEY_FORMAT_VERSION,
        kind: &stage.kind,
        kind_version: stage.kind_version,
        params: key_params(stage),
        seed: stage.seed,
        inputs: input_digests,
    };
    let value = serde_json::to_value(&material).unwrap_or(Json::Null);
    let mut canonical = String::new();
    write_canonical(&value, &mut canonical);
    blake3::hash(canonical.as_bytes()).to_hex().to_string()
}

/// JSON with object keys sorted at every level and no whitespace. Written by hand so
/// that it does not depend on serde_json's `preserve_order` feature, which any crate
/// in the build could switch on.
pub fn write_canonical(value: &Json, out: &mut String) {
    match value {
        Json::Object(map) => {
            let mut entries: Vec<(&String, &Json)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Json::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Json::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Dotted paths of every leaf, for "param `lr` changed 1e-4 → 2e-4" explanations.
pub fn flatten(value: &Json) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    flatten_into(value, String::new(), &mut out);
    out
}

fn flatten_into(value: &Json, prefix: String, out: &mut BTreeMap<String, String>) {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match value {
        Json::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                flatten_into(v, join(k), out);
            }
        }
        Json::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                flatten_into(v, join(&i.to_string()), out);
            }
        }
        other => {
            out.insert(prefix, other.to_string());
        }
    }
}
