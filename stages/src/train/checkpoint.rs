//! Checkpoints in a stage's scratch dir, written atomically, and resume from the latest.
//!
//! Layout: `scratch/checkpoints/step-00000100/{trainable.safetensors, optimizer.safetensors,
//! state.json}` and `scratch/checkpoints/latest` naming the newest complete one. A
//! checkpoint is built in a `tmp-*` dir, renamed into place, and only then does `latest`
//! (itself replaced by rename) point at it; older checkpoints are deleted afterwards. A
//! kill at any instant therefore leaves `latest` naming a complete checkpoint, or none.
//! The data position and the RNG streams are functions of the step (see [`super`]), so
//! `state.json` holds the step and the metric lines logged so far (replayed on resume so
//! `metrics.jsonl` is byte-identical to an uninterrupted run's).

use super::StageResultExt;
use crate::algo::optim::AdamW;
use candle_nn::VarMap;
use rlhf_engine::StageError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const FORMAT_VERSION: u32 = 2;

/// One line of metrics.jsonl: the step and its named values.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricLine {
    pub step: u64,
    pub values: Vec<(String, f64)>,
}

/// A [`MetricLine`] as stored in state.json: values as their f64 bit patterns, because
/// serde_json's default float parsing is not exact and a replayed line must be
/// byte-identical to the one an uninterrupted run writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredLine {
    pub step: u64,
    pub values: Vec<(String, u64)>,
}

impl From<&MetricLine> for StoredLine {
    fn from(line: &MetricLine) -> Self {
        StoredLine {
            step: line.step,
            values: line
                .values
                .iter()
                .map(|(k, v)| (k.clone(), v.to_bits()))
                .collect(),
        }
    }
}

impl From<&StoredLine> for MetricLine {
    fn from(line: &StoredLine) -> Self {
        MetricLine {
            step: line.step,
            values: line
                .values
                .iter()
                .map(|(k, v)| (k.clone(), f64::from_bits(*v)))
                .collect(),
        }
    }
}

/// What `state.json` records besides the tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format_version: u32,
    /// Optimiser steps completed.
    pub step: usize,
    /// Total steps of the run, to refuse a checkpoint of a differently sized run.
    pub total_steps: usize,
    pub history: Vec<StoredLine>,
}

impl CheckpointState {
    /// The metric lines logged up to this checkpoint.
    pub fn metric_lines(&self) -> Vec<MetricLine> {
        self.history.iter().map(MetricLine::from).collect()
    }
}

fn checkpoints_dir(scratch: &Path) -> PathBuf {
    scratch.join("checkpoints")
}

/// Writes a checkpoint of `varmap` and `optimizer` after `state.step` steps.
pub fn save_checkpoint(
    scratch: &Path,
    varmap: &VarMap,
    optimizer: &AdamW,
    state: &CheckpointState,
) -> Result<(), StageError> {
    let root = checkpoints_dir(scratch);
    let name = format!("step-{:08}", state.step);
    let tmp = root.join(format!("tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| StageError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| StageError::io(&tmp, e))?;
    varmap
        .save(tmp.join("trainable.safetensors"))
        .or_fail("writing the trainable weights of a checkpoint")?;
    optimizer
        .save(&tmp.join("optimizer.safetensors"))
        .or_fail("writing the optimiser state of a checkpoint")?;
    let state_path = tmp.join("state.json");
    let text = serde_json::to_string(state).or_fail("serialising checkpoint state")?;
    std::fs::write(&state_path, text).map_err(|e| StageError::io(&state_path, e))?;
    let done = root.join(&name);
    if done.exists() {
        std::fs::remove_dir_all(&done).map_err(|e| StageError::io(&done, e))?;
    }
    std::fs::rename(&tmp, &done).map_err(|e| StageError::io(&done, e))?;
    let latest_tmp = root.join("latest.tmp");
    std::fs::write(&latest_tmp, &name).map_err(|e| StageError::io(&latest_tmp, e))?;
    let latest = root.join("latest");
    std::fs::rename(&latest_tmp, &latest).map_err(|e| StageError::io(&latest, e))?;
    remove_other_checkpoints(&root, &name)
}

fn remove_other_checkpoints(root: &Path, keep: &str) -> Result<(), StageError> {
    let entries = std::fs::read_dir(root).map_err(|e| StageError::io(root, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("step-") && name != keep {
            let path = entry.path();
            std::fs::remove_dir_all(&path).map_err(|e| StageError::io(&path, e))?;
        }
    }
    Ok(())
}

/// Restores the latest checkpoint into `varmap` and `optimizer`, returning its state, or
/// `None` when there is none. A checkpoint of a run with another step count is an error
/// (the scratch dir belongs to one stage key, so this means a bug or a hand edit).
pub fn load_latest_checkpoint(
    scratch: &Path,
    varmap: &mut VarMap,
    optimizer: &mut AdamW,
    total_steps: usize,
) -> Result<Option<CheckpointState>, StageError> {
    let root = checkpoints_dir(scratch);
    let latest = root.join("latest");
    let Ok(name) = std::fs::read_to_string(&latest) else {
        return Ok(None);
    };
    let dir = root.join(name.trim());
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| StageError::io(&state_path, e))?;
    let state: CheckpointState = serde_json::from_str(&text)
        .or_fail(&format!("reading checkpoint {}", state_path.display()))?;
    if state.format_version != FORMAT_VERSION || state.total_steps != total_steps {
        return Err(StageError::failed_with_hint(
            format!(
                "checkpoint {} is for a run of {} steps (format {}), this run has {total_steps}",
                dir.display(),
                state.total_steps,
                state.format_version
            ),
            "delete the stage's scratch dir (`rlhf cache gc`) to start over",
        ));
    }
    varmap
        .load(dir.join("trainable.safetensors"))
        .or_fail(&format!("restoring weights from {}", dir.display()))?;
    optimizer
        .load(&dir.join("optimizer.safetensors"))
        .or_fail(&format!("restoring the optimiser from {}", dir.display()))?;
    Ok(Some(state))
}

pub fn new_state(step: usize, total_steps: usize, history: &[MetricLine]) -> CheckpointState {
    CheckpointState {
        format_version: FORMAT_VERSION,
        step,
        total_steps,
        history: history.iter().map(StoredLine::from).collect(),
    }
}
