//! Human preference labelling: the `human` judge of `collect_preferences` and the local
//! web page `rlhf label` serves.
//!
//! Where things live (the pipeline names one path, `judge.labels`, e.g. `labels/prefs.jsonl`):
//! - `labels/prefs.items.jsonl` — the pairs to label, written by the stage (derived from the
//!   upstream policy and prompts, so it is not an input of the key);
//! - `labels/prefs.jsonl` — the labels, appended (and fsynced) by `rlhf label`, one event per
//!   line, undo included. It is a declared input of the stage, so its content digest enters
//!   the stage key: every label given makes the next `rlhf run` rerun the stage.
//!
//! Until every item has `labels_per_item` labels the stage returns
//! [`rlhf_engine::StageError::Waiting`] (`rlhf run` exits 3).
//!
//! - [`items`]: the items file (one pair of completions of one prompt per line);
//! - [`log`]: the durable label log, its replay (undo) and inter-labeller agreement;
//! - [`stage`]: the judge's part of the stage run (items out, pairs in);
//! - [`server`]: the tiny_http server behind `rlhf label`.

pub mod items;
pub mod log;
pub mod server;
pub mod stage;

use rlhf_engine::{ExternalPolicy, InputPort};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `judge: { kind: human, labels: labels/prefs.jsonl }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HumanJudge {
    /// The labels file `rlhf label` appends to (relative to the working directory, like every
    /// path in a pipeline). The items to label are written beside it as `<name>.items.jsonl`.
    pub labels: String,
    /// Distinct labellers each pair needs before the stage goes on.
    #[serde(default = "default_labels_per_item")]
    pub labels_per_item: usize,
}

fn default_labels_per_item() -> usize {
    1
}

/// The input port of the labels file, declared only once the file exists: a missing file
/// means "no labels yet" (the stage waits), not an invalid pipeline, and the first run
/// must be able to write the items to label before anyone has labelled anything.
pub fn labels_input(judge: &HumanJudge) -> Option<InputPort> {
    Path::new(&judge.labels).is_file().then(|| {
        InputPort::stage("labels", &judge.labels, &[])
            .at_param("judge.labels")
            .allow_external(ExternalPolicy::StageOrPath)
    })
}

/// `labels/prefs.jsonl` → `labels/prefs.items.jsonl`.
pub fn items_path(labels: &Path) -> PathBuf {
    let stem = labels
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "labels".into());
    labels.with_file_name(format!("{stem}.items.jsonl"))
}

/// Errors of the labelling tools, naming the file or the request at fault.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    BadLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(
        "{path} is locked by another `rlhf label` (one server per labels file; labellers share it)"
    )]
    Busy { path: PathBuf },
    #[error("cannot serve on {address}: {message}")]
    Serve { address: String, message: String },
}

impl LabelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        LabelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
