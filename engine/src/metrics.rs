//! Stage metrics: per-step values appended to `metrics.jsonl` and a final summary in
//! `metrics.json`, both inside the stage's first output so they travel with it.
//!
//! Only deterministic values belong there (loss, lr, accuracy): artifacts must hash the
//! same run after run. Wall-clock figures (seconds, tokens/s) go through
//! [`MetricsSink::timing`] into the run log beside the cache record instead.

use crate::stage::StageError;
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsSink {
    artifact_dir: Option<PathBuf>,
    timings_path: Option<PathBuf>,
    summary: Map<String, Value>,
    steps: Option<File>,
    timings: Option<File>,
}

impl MetricsSink {
    /// `artifact_dir`: where metrics.jsonl/metrics.json go; `timings_path`: a file
    /// outside the artifact for wall-clock figures.
    pub fn new(artifact_dir: Option<PathBuf>, timings_path: Option<PathBuf>) -> Self {
        MetricsSink {
            artifact_dir,
            timings_path,
            summary: Map::new(),
            steps: None,
            timings: None,
        }
    }

    /// A sink that keeps nothing (tests, dry runs).
    pub fn discard() -> Self {
        MetricsSink::new(None, None)
    }

    /// Appends one line `{"step": step, name: value, ...}` to metrics.jsonl.
    pub fn log(&mut self, step: u64, values: &[(&str, f64)]) -> Result<(), StageError> {
        let Some(dir) = &self.artifact_dir else {
            return Ok(());
        };
        let line = step_line(step, values);
        let path = dir.join("metrics.jsonl");
        let file = open_append(&mut self.steps, &path)?;
        writeln!(file, "{line}").map_err(|e| StageError::io(&path, e))
    }

    /// Wall-clock figures for a step (seconds, tokens/s): kept out of the artifact.
    pub fn timing(&mut self, step: u64, values: &[(&str, f64)]) -> Result<(), StageError> {
        let Some(path) = self.timings_path.clone() else {
            return Ok(());
        };
        let line = step_line(step, values);
        let file = open_append(&mut self.timings, &path)?;
        writeln!(file, "{line}").map_err(|e| StageError::io(&path, e))
    }

    /// Sets a final metric; written to metrics.json by [`MetricsSink::finish`].
    pub fn set(&mut self, name: &str, value: impl Into<Value>) {
        self.summary.insert(name.to_string(), value.into());
    }

    pub fn summary(&self) -> &Map<String, Value> {
        &self.summary
    }

    /// Writes metrics.json if any final metric was set. Called by the engine after `run`.
    pub fn finish(&mut self) -> Result<(), StageError> {
        self.steps = None;
        self.timings = None;
        let Some(dir) = &self.artifact_dir else {
            return Ok(());
        };
        if self.summary.is_empty() {
            return Ok(());
        }
        let path = dir.join("metrics.json");
        let text = serde_json::to_string_pretty(&Value::Object(self.summary.clone()))
            .map_err(|e| StageError::failed(format!("metrics are not valid JSON: {e}")))?;
        std::fs::write(&path, text + "\n").map_err(|e| StageError::io(&path, e))
    }
}

fn step_line(step: u64, values: &[(&str, f64)]) -> String {
    let mut map = Map::new();
    map.insert("step".into(), Value::from(step));
    for (name, value) in values {
        // JSON has no NaN/inf; a non-finite metric is written as null rather than lost.
        let v = serde_json::Number::from_f64(*value).map_or(Value::Null, Value::Number);
        map.insert((*name).to_string(), v);
    }
    Value::Object(map).to_string()
}

fn open_append<'a>(slot: &'a mut Option<File>, path: &Path) -> Result<&'a mut File, StageError> {
    if slot.is_none() {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| StageError::io(path, e))?;
        *slot = Some(file);
    }
    Ok(slot.as_mut().expect("just set"))
}
