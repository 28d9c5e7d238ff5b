//! `rlhf report`: gathers every stage's metrics from the cache and writes the static
//! HTML page of [`rlhf_stages::report`] (default `<pipeline dir>/<name>-report/index.html`).

use super::{print_error, print_run_error, Workspace};
use rlhf_engine::run::exit;
use rlhf_engine::status::State;
use rlhf_stages::report::{read_metrics_jsonl, render, StageSection};
use std::path::{Path, PathBuf};

pub fn report(file: &Path, overrides: &[String], cache_dir: &Path, output: Option<&Path>) -> i32 {
    let workspace = match Workspace::open(file, overrides, cache_dir) {
        Ok(w) => w,
        Err(code) => return code,
    };
    let (pipeline, cache) = (&workspace.pipeline, &workspace.cache);
    let statuses = match workspace.engine().status(pipeline) {
        Ok(s) => s,
        Err(e) => return print_run_error(&e),
    };
    let mut sections = Vec::new();
    for status in &statuses {
        let mut section = StageSection {
            name: status.stage.clone(),
            kind: status.kind.clone(),
            status: match status.status {
                State::Cached => "cached",
                State::Stale => "stale",
                State::Blocked => "blocked",
            }
            .to_string(),
            ..StageSection::default()
        };
        let record = status
            .key
            .as_deref()
            .filter(|_| status.status == State::Cached)
            .and_then(|k| cache.read_record(k).ok().flatten());
        if let Some(record) = record {
            for digest in record.outputs.values() {
                let dir = cache.artifact_path(digest);
                if section.steps.is_empty() && dir.join("metrics.jsonl").exists() {
                    section.steps =
                        read_metrics_jsonl(&dir.join("metrics.jsonl")).unwrap_or_default();
                }
                if section.summary.is_none() {
                    let text = std::fs::read_to_string(dir.join("metrics.json")).ok();
                    section.summary = text.and_then(|t| serde_json::from_str(&t).ok());
                }
            }
            if section.summary.is_none() && !record.metrics.is_null() {
                section.summary = Some(record.metrics.clone());
            }
        }
        sections.push(section);
    }
    let html = render(&pipeline.name, &file.display().to_string(), &sections);
    let dir = output
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_dir(file, &pipeline.name));
    let path = dir.join("index.html");
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, html)) {
        print_error(
            &format!("cannot write {}: {e}", path.display()),
            Some("pass a writable folder with -o DIR"),
        );
        return exit::STAGE_FAILED;
    }
    let cached = sections.iter().filter(|s| s.status == "cached").count();
    eprintln!("report: {cached} of {} stages cached", sections.len());
    println!("{}", path.display());
    exit::OK
}

/// `<pipeline dir>/<name>-report`.
fn default_dir(file: &Path, name: &str) -> PathBuf {
    let folder = format!("{name}-report");
    match file.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => parent.join(folder),
        None => PathBuf::from(folder),
    }
}
