//! gc: a dry run deletes nothing, applying deletes exactly what is not kept, and
//! nothing a live run holds (locked key scratch, live staging dirs, the cache) is touched.

mod common;

use common::{commit, count_entries, new_cache, record};
use rlhf_cache::{ArtifactHealth, Cache, CacheError, Digest};
use std::collections::BTreeSet;
use std::fs;

struct Fixture {
    _dir: tempfile::TempDir,
    cache: Cache,
    kept: Digest,
    dropped: Digest,
    pinned: Digest,
}

/// Records `keep` -> kept and `drop` -> dropped, plus an artifact without any record.
fn fixture() -> Fixture {
    let (dir, cache) = new_cache();
    let kept = commit(&cache, &[("model.safetensors", b"kept weights")]);
    let dropped = commit(&cache, &[("a.txt", b"12345"), ("b/c.txt", b"678")]);
    let pinned = commit(&cache, &[("pinned", b"p")]);
    cache
        .write_record(&record("keep", &[("model", &kept)]))
        .unwrap();
    cache
        .write_record(&record("drop", &[("model", &dropped)]))
        .unwrap();
    Fixture {
        _dir: dir,
        cache,
        kept,
        dropped,
        pinned,
    }
}

fn keys(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn dry_run_deletes_nothing_and_reports() {
    let f = fixture();
    let report = f
        .cache
        .gc(&keys(&["keep"]), &BTreeSet::new(), false)
        .unwrap();
    assert!(!report.applied);
    assert_eq!(report.records, vec!["drop".to_string()]);
    let mut expected = vec![(f.dropped.clone(), 8), (f.pinned.clone(), 1)];
    expected.sort();
    assert_eq!(report.artifacts, expected);
    assert_eq!(report.bytes, 9);
    assert!(f.cache.read_record("drop").unwrap().is_some());
    for digest in [&f.kept, &f.dropped, &f.pinned] {
        assert_eq!(f.cache.check_artifact(digest), ArtifactHealth::Ok);
    }
}

#[test]
fn apply_deletes_exactly_what_is_not_kept() {
    let f = fixture();
    let keep_artifacts: BTreeSet<Digest> = [f.pinned.clone()].into();
    let report = f.cache.gc(&keys(&["keep"]), &keep_artifacts, true).unwrap();
    assert!(report.applied);
    assert_eq!(report.records, vec!["drop".to_string()]);
    assert_eq!(report.artifacts, vec![(f.dropped.clone(), 8)]);
    assert!(f.cache.read_record("drop").unwrap().is_none());
    assert!(f.cache.read_record("keep").unwrap().is_some());
    assert_eq!(f.cache.check_artifact(&f.dropped), ArtifactHealth::Missing);
    assert_eq!(
        f.cache.check_artifact(&f.kept),
        ArtifactHealth::Ok,
        "output of a kept record"
    );
    assert_eq!(
        f.cache.check_artifact(&f.pinned),
        ArtifactHealth::Ok,
        "kept by digest"
    );
    let listed: Vec<Digest> = f
        .cache
        .list_artifacts()
        .unwrap()
        .into_iter()
        .map(|a| a.digest)
        .collect();
    let mut expected = vec![f.kept.clone(), f.pinned.clone()];
    expected.sort();
    assert_eq!(listed, expected);
    // A second gc finds nothing more to delete.
    let again = f.cache.gc(&keys(&["keep"]), &keep_artifacts, true).unwrap();
    assert!(again.records.is_empty() && again.artifacts.is_empty() && again.swept.is_empty());
}

#[test]
fn locked_key_scratch_is_kept() {
    let (_dir, cache) = new_cache();
    let running = cache.scratch_dir("running").unwrap();
    let dead = cache.scratch_dir("dead").unwrap();
    let kept = cache.scratch_dir("kept").unwrap();
    fs::write(running.join("checkpoint"), b"step 10").unwrap();
    fs::write(dead.join("checkpoint"), b"step 3").unwrap();
    let _lock = cache.lock_key("running").unwrap();
    let report = cache.gc(&keys(&["kept"]), &BTreeSet::new(), true).unwrap();
    assert!(running.join("checkpoint").exists());
    assert!(kept.exists());
    assert!(!dead.exists());
    assert!(report.swept.contains(&dead));
    assert!(!report.swept.contains(&running));
}

#[test]
fn staging_dirs_of_dead_runs_are_swept_and_live_ones_kept() {
    let (dir, cache) = new_cache();
    let live = cache.staging_dir().unwrap();
    fs::write(live.path().join("half"), b"x").unwrap();
    // A crashed run leaves a staging dir whose lock nobody holds any more.
    let crashed = dir.path().join("cache/v1/staging/stage-12345-1-0");
    fs::create_dir_all(&crashed).unwrap();
    fs::write(crashed.join("partial.safetensors"), b"part").unwrap();
    let report = cache.gc(&BTreeSet::new(), &BTreeSet::new(), true).unwrap();
    assert!(!crashed.exists());
    assert!(report.swept.contains(&crashed));
    assert!(live.path().join("half").exists());
    // Only the live dir and its lock file remain.
    assert_eq!(count_entries(&dir.path().join("cache/v1/staging")), 2);
}

#[test]
fn gc_does_not_delete_under_a_running_run() {
    let f = fixture();
    let _run = f.cache.lock_shared().unwrap();
    let error = f
        .cache
        .gc(&BTreeSet::new(), &BTreeSet::new(), true)
        .unwrap_err();
    assert!(matches!(error, CacheError::Busy { .. }), "{error}");
    assert!(error.to_string().contains("hint:"));
    // The dry run still reports.
    let report = f
        .cache
        .gc(&BTreeSet::new(), &BTreeSet::new(), false)
        .unwrap();
    assert_eq!(report.artifacts.len(), 3);
    assert_eq!(f.cache.check_artifact(&f.dropped), ArtifactHealth::Ok);
}

#[test]
fn gc_removes_unfinished_commits_and_corrupt_records() {
    let (dir, cache) = new_cache();
    let orphan = cache.artifact_path(&"c".repeat(64));
    fs::create_dir_all(&orphan).unwrap();
    fs::write(orphan.join("half"), b"abc").unwrap();
    fs::write(dir.path().join("cache/v1/records/broken.json"), b"{").unwrap();
    let report = cache.gc(&BTreeSet::new(), &BTreeSet::new(), true).unwrap();
    assert_eq!(report.artifacts, vec![("c".repeat(64), 3)]);
    assert_eq!(report.records, vec!["broken".to_string()]);
    assert!(!orphan.exists());
    assert_eq!(count_entries(&dir.path().join("cache/v1/records")), 0);
}

#[test]
fn roots_lists_registered_lock_files_that_still_exist() {
    let (dir, cache) = new_cache();
    let lock_a = dir.path().join("a.lock");
    let lock_b = dir.path().join("b.lock");
    fs::write(&lock_a, b"a").unwrap();
    fs::write(&lock_b, b"b").unwrap();
    cache.register_root(&lock_a).unwrap();
    cache.register_root(&lock_b).unwrap();
    cache.register_root(&lock_b).unwrap(); // registering twice is one root
    let canonical = |p: &std::path::Path| fs::canonicalize(p).unwrap();
    assert_eq!(
        cache.roots().unwrap(),
        vec![canonical(&lock_a), canonical(&lock_b)]
    );
    fs::remove_file(&lock_b).unwrap();
    assert_eq!(cache.roots().unwrap(), vec![canonical(&lock_a)]);
    // gc forgets the stale root.
    cache.gc(&BTreeSet::new(), &BTreeSet::new(), true).unwrap();
    assert_eq!(count_entries(&dir.path().join("cache/v1/roots")), 1);
}

#[test]
fn register_root_accepts_a_relative_path_and_stores_it_absolute() {
    let (dir, cache) = new_cache();
    let lock = dir.path().join("rel.lock");
    fs::write(&lock, b"x").unwrap();
    let cwd = std::env::current_dir().unwrap();
    let relative = pathdiff(&lock, &cwd);
    cache.register_root(&relative).unwrap();
    let roots = cache.roots().unwrap();
    assert_eq!(roots, vec![fs::canonicalize(&lock).unwrap()]);
    assert!(roots[0].is_absolute());
}

/// `path` relative to `base` through `..` components (both absolute).
fn pathdiff(path: &std::path::Path, base: &std::path::Path) -> std::path::PathBuf {
    let mut relative = std::path::PathBuf::new();
    for _ in base.components().skip(1) {
        relative.push("..");
    }
    relative.join(path.strip_prefix("/").unwrap())
}

#[test]
fn stat_entries_of_deleted_inputs_are_swept_and_live_ones_kept() {
    let (dir, cache) = new_cache();
    let live = dir.path().join("live.csv");
    let gone = dir.path().join("gone.csv");
    fs::write(&live, b"1").unwrap();
    fs::write(&gone, b"2").unwrap();
    std::thread::sleep(rlhf_cache::RACY_WINDOW + std::time::Duration::from_millis(150));
    cache.digest_external(&live).unwrap();
    cache.digest_external(&gone).unwrap();
    let stat_dir = dir.path().join("cache/v1/stat");
    assert_eq!(count_entries(&stat_dir), 2);
    fs::remove_file(&gone).unwrap();
    let report = cache.gc(&BTreeSet::new(), &BTreeSet::new(), true).unwrap();
    assert_eq!(
        report
            .swept
            .iter()
            .filter(|p| p.starts_with(&stat_dir))
            .count(),
        1
    );
    assert_eq!(count_entries(&stat_dir), 1);
    assert_eq!(
        cache
            .digest_external_with_stats(&live)
            .unwrap()
            .hashed_files,
        0
    );
}

#[test]
fn old_temp_files_of_interrupted_writes_are_swept_and_fresh_ones_kept() {
    let (dir, cache) = new_cache();
    let records = dir.path().join("cache/v1/records");
    let old = records.join(".tmp-old");
    let fresh = records.join(".tmp-fresh");
    fs::write(&old, b"{\"form").unwrap();
    fs::write(&fresh, b"{\"form").unwrap();
    let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(an_hour_ago)
        .unwrap();
    let report = cache.gc(&BTreeSet::new(), &BTreeSet::new(), true).unwrap();
    assert_eq!(report.swept, vec![old.clone()]);
    assert!(!old.exists());
    assert!(fresh.exists());
}
