//! `rlhf cache ls|gc|verify`.

use super::{open_cache, print_error, print_json};
use rlhf_engine::lockfile;
use rlhf_engine::run::exit;
use std::collections::BTreeSet;
use std::path::Path;

pub fn ls(cache_dir: &Path, json: bool) -> i32 {
    let cache = match open_cache(cache_dir) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (records, corrupt) = match cache.list_records() {
        Ok(r) => r,
        Err(e) => {
            print_error(&e.to_string(), None);
            return exit::STAGE_FAILED;
        }
    };
    let artifacts = cache.list_artifacts().unwrap_or_default();
    let bytes: u64 = artifacts.iter().map(|a| a.bytes).sum();
    for record in &records {
        if json {
            print_json(&serde_json::json!({
                "stage": record.stage, "kind": record.kind, "key": record.key,
                "outputs": record.outputs, "seconds": record.seconds, "created_unix": record.created_unix,
            }));
        } else {
            let outputs: Vec<String> = record
                .outputs
                .iter()
                .map(|(n, d)| format!("{n}={}", &d[..12.min(d.len())]))
                .collect();
            println!(
                "{}  {:<20} {:<18} {}",
                &record.key[..12.min(record.key.len())],
                record.stage,
                record.kind,
                outputs.join(" ")
            );
        }
    }
    for error in &corrupt {
        eprintln!("warning: {error}");
    }
    eprintln!(
        "{} records, {} artifacts, {:.1} MB in {}",
        records.len(),
        artifacts.len(),
        bytes as f64 / 1e6,
        cache_dir.display()
    );
    exit::OK
}

pub fn gc(cache_dir: &Path, apply: bool, json: bool) -> i32 {
    let cache = match open_cache(cache_dir) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let roots = cache.roots().unwrap_or_default();
    let mut keep_keys = BTreeSet::new();
    let mut keep_artifacts = BTreeSet::new();
    for root in &roots {
        match lockfile::read(root) {
            Ok(Some(lock)) => {
                for stage in lock.stages.values() {
                    keep_keys.insert(stage.key.clone());
                    keep_artifacts.extend(stage.outputs.values().cloned());
                }
            }
            Ok(None) => {}
            Err(e) => {
                print_error(
                    &format!("{e}"),
                    Some("fix or delete that lock file; gc keeps everything until then"),
                );
                return exit::STAGE_FAILED;
            }
        }
    }
    let _exclusive = if apply {
        match cache.lock_exclusive() {
            Ok(l) => Some(l),
            Err(e) => {
                print_error(&e.to_string(), None);
                return exit::STAGE_FAILED;
            }
        }
    } else {
        None
    };
    let report = match cache.gc(&keep_keys, &keep_artifacts, apply) {
        Ok(r) => r,
        Err(e) => {
            print_error(&e.to_string(), None);
            return exit::STAGE_FAILED;
        }
    };
    if json {
        print_json(&serde_json::json!({
            "applied": report.applied, "records": report.records,
            "artifacts": report.artifacts.iter().map(|(d, b)| serde_json::json!({"digest": d, "bytes": b})).collect::<Vec<_>>(),
            "bytes": report.bytes, "roots": roots,
        }));
    }
    let verb = if report.applied {
        "deleted"
    } else {
        "would delete"
    };
    eprintln!(
        "{verb} {} records and {} artifacts ({:.1} MB); kept what {} lock file(s) reference{}",
        report.records.len(),
        report.artifacts.len(),
        report.bytes as f64 / 1e6,
        roots.len(),
        if report.applied {
            ""
        } else {
            " (dry run: pass --apply to delete)"
        }
    );
    exit::OK
}

pub fn verify(cache_dir: &Path, json: bool) -> i32 {
    let cache = match open_cache(cache_dir) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let _exclusive = cache.lock_exclusive();
    let report = match cache.verify() {
        Ok(r) => r,
        Err(e) => {
            print_error(&e.to_string(), None);
            return exit::STAGE_FAILED;
        }
    };
    if json {
        print_json(&serde_json::json!({
            "checked": report.checked,
            "damaged": report.damaged.iter().map(|(d, r)| serde_json::json!({"digest": d, "reason": r})).collect::<Vec<_>>(),
            "removed_records": report.removed_records,
        }));
    }
    for (digest, reason) in &report.damaged {
        eprintln!("damaged  {digest}: {reason}");
    }
    eprintln!(
        "checked {} artifacts: {} damaged (removed, with {} records; the next run recomputes them)",
        report.checked,
        report.damaged.len(),
        report.removed_records.len()
    );
    if report.damaged.is_empty() {
        exit::OK
    } else {
        exit::STAGE_FAILED
    }
}
