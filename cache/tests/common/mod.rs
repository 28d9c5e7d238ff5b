//! Helpers shared by the cache integration tests.
#![allow(dead_code)]

use rlhf_cache::{Cache, Digest, Record, RECORD_FORMAT};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use tempfile::TempDir;

pub fn new_cache() -> (TempDir, Cache) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&dir.path().join("cache")).unwrap();
    (dir, cache)
}

/// Writes `files` (relative path, bytes) under `root`, creating parent directories.
pub fn write_tree(root: &Path, files: &[(&str, &[u8])]) {
    for (relative, bytes) in files {
        let path = root.join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, bytes).unwrap();
    }
}

/// Commits an artifact holding `files`.
pub fn commit(cache: &Cache, files: &[(&str, &[u8])]) -> Digest {
    let staging = cache.staging_dir().unwrap();
    write_tree(staging.path(), files);
    cache.commit_artifact(staging).unwrap()
}

/// Committed files are read-only; tests that simulate damage make them writable first.
pub fn make_writable(path: &Path) {
    let mut permissions = fs::metadata(path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    permissions.set_readonly(false);
    fs::set_permissions(path, permissions).unwrap();
}

pub fn record(key: &str, outputs: &[(&str, &Digest)]) -> Record {
    Record {
        format: RECORD_FORMAT,
        key: key.to_string(),
        stage: "sft".to_string(),
        kind: "sft".to_string(),
        params: serde_json::json!({"learning_rate": 1e-4}),
        inputs: BTreeMap::new(),
        outputs: outputs
            .iter()
            .map(|(name, digest)| (name.to_string(), digest.to_string()))
            .collect(),
        metrics: serde_json::Value::Null,
        seconds: 1.5,
        created_unix: 1_700_000_000,
    }
}

/// Number of entries directly under `path`.
pub fn count_entries(path: &Path) -> usize {
    fs::read_dir(path).unwrap().count()
}
