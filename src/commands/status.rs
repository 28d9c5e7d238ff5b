//! `rlhf status` and `rlhf show`: what a run would do, and what a cached stage holds.

use super::{print_error, print_json, print_run_error, Workspace};
use rlhf_engine::run::exit;
use rlhf_engine::status::State;
use std::path::Path;

pub fn status(file: &Path, overrides: &[String], cache_dir: &Path, json: bool) -> i32 {
    let workspace = match Workspace::open(file, overrides, cache_dir) {
        Ok(w) => w,
        Err(code) => return code,
    };
    let statuses = match workspace.engine().status(&workspace.pipeline) {
        Ok(s) => s,
        Err(e) => return print_run_error(&e),
    };
    for s in &statuses {
        if json {
            print_json(s);
            continue;
        }
        let state = match s.status {
            State::Cached => "cached",
            State::Stale => "stale",
            State::Blocked => "blocked",
        };
        let reasons = if s.reasons.is_empty() {
            String::new()
        } else {
            format!(": {}", s.reasons.join("; "))
        };
        println!("{state:>8}  {} ({}){reasons}", s.stage, s.kind);
    }
    exit::OK
}

pub fn show(file: &Path, overrides: &[String], cache_dir: &Path, stage: &str, json: bool) -> i32 {
    let workspace = match Workspace::open(file, overrides, cache_dir) {
        Ok(w) => w,
        Err(code) => return code,
    };
    if let Err(code) = workspace.stage(stage) {
        return code;
    }
    let cache = &workspace.cache;
    let statuses = match workspace.engine().status(&workspace.pipeline) {
        Ok(s) => s,
        Err(e) => return print_run_error(&e),
    };
    let Some(status) = statuses.into_iter().find(|s| s.stage == stage) else {
        return exit::INVALID;
    };
    let record = status
        .key
        .as_deref()
        .and_then(|k| cache.read_record(k).ok().flatten());
    let Some(record) = record.filter(|_| status.status == State::Cached) else {
        print_error(
            &format!(
                "stage `{stage}` has no cached outputs ({})",
                status.reasons.join("; ")
            ),
            Some(&format!(
                "run `rlhf run {} --until {stage}` first",
                file.display()
            )),
        );
        return exit::STAGE_FAILED;
    };
    let outputs: serde_json::Map<String, serde_json::Value> = record
        .outputs
        .iter()
        .map(|(name, digest)| {
            (
                name.clone(),
                serde_json::json!({ "digest": digest, "path": cache.artifact_path(digest) }),
            )
        })
        .collect();
    if json {
        print_json(&serde_json::json!({
            "stage": stage,
            "kind": record.kind,
            "key": record.key,
            "outputs": outputs,
            "metrics": record.metrics,
            "seconds": record.seconds,
        }));
        return exit::OK;
    }
    println!("stage    {stage} ({})", record.kind);
    println!("key      {}", record.key);
    for (name, digest) in &record.outputs {
        println!(
            "output   {name}: {} ({digest})",
            cache.artifact_path(digest).display()
        );
    }
    if let serde_json::Value::Object(metrics) = &record.metrics {
        for (name, value) in metrics {
            println!("metric   {name}: {value}");
        }
    }
    exit::OK
}
