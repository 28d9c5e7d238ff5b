//! Artifact store rules: atomic commit (crashes at every step leave nothing a later run
//! trusts), deduplication, the cheap check on every hit, and the full rehash of verify.

mod common;

use common::{commit, count_entries, make_writable, new_cache, record, write_tree};
use rlhf_cache::{digest_dir, ArtifactHealth, CacheError};
use std::fs;
use std::time::{Duration, SystemTime};

const FILES: [(&str, &[u8]); 3] = [
    ("config.json", b"{\"hidden\": 8}"),
    ("model.safetensors", b"0123456789abcdef"),
    ("tok/tokenizer.json", b"{}"),
];

#[test]
fn committed_artifact_digest_is_the_directory_digest_and_checks_ok() {
    let (_dir, cache) = new_cache();
    let staging = cache.staging_dir().unwrap();
    write_tree(staging.path(), &FILES);
    let expected = digest_dir(staging.path()).unwrap();
    let digest = cache.commit_artifact(staging).unwrap();
    assert_eq!(digest, expected);
    assert_eq!(cache.check_artifact(&digest), ArtifactHealth::Ok);
    assert_eq!(digest_dir(&cache.artifact_path(&digest)).unwrap(), digest);
    let infos = cache.list_artifacts().unwrap();
    assert_eq!(infos.len(), 1);
    assert_eq!((infos[0].files, infos[0].bytes), (3, 13 + 16 + 2));
}

#[test]
fn committed_files_are_read_only() {
    let (_dir, cache) = new_cache();
    let digest = commit(&cache, &FILES);
    let path = cache.artifact_path(&digest).join("model.safetensors");
    assert!(fs::metadata(&path).unwrap().permissions().readonly());
}

#[test]
fn commit_of_identical_content_twice_gives_one_object() {
    let (dir, cache) = new_cache();
    let first = commit(&cache, &FILES);
    let second = commit(&cache, &FILES);
    assert_eq!(first, second);
    assert_eq!(cache.list_artifacts().unwrap().len(), 1);
    // objects/ holds the directory and its manifest, and the second copy is gone.
    assert_eq!(count_entries(&dir.path().join("cache/v1/objects")), 2);
    assert_eq!(count_entries(&dir.path().join("cache/v1/staging")), 0);
}

#[test]
fn staging_dir_left_behind_by_a_crash_is_not_an_artifact() {
    let (_dir, cache) = new_cache();
    let staging = cache.staging_dir().unwrap();
    write_tree(staging.path(), &FILES);
    let digest = digest_dir(staging.path()).unwrap();
    std::mem::forget(staging); // the process "dies" before committing
    assert_eq!(cache.check_artifact(&digest), ArtifactHealth::Missing);
    assert!(cache.list_artifacts().unwrap().is_empty());
}

#[test]
fn object_dir_without_manifest_is_missing_and_recommitted_whole() {
    let (dir, cache) = new_cache();
    let digest = digest_of(&FILES);
    // A crash after the rename, before the manifest: here with a partial directory too.
    let object = cache.artifact_path(&digest);
    write_tree(&object, &FILES[..1]);
    assert_eq!(cache.check_artifact(&digest), ArtifactHealth::Missing);
    assert!(cache.list_artifacts().unwrap().is_empty());
    assert_eq!(commit(&cache, &FILES), digest);
    assert_eq!(cache.check_artifact(&digest), ArtifactHealth::Ok);
    assert_eq!(
        fs::read(object.join("model.safetensors")).unwrap(),
        FILES[1].1
    );
    assert_eq!(count_entries(&dir.path().join("cache/v1/quarantine")), 0);
}

#[test]
fn manifest_deleted_after_commit_makes_the_artifact_missing() {
    let (_dir, cache) = new_cache();
    let digest = commit(&cache, &FILES);
    let manifest = cache
        .artifact_path(&digest)
        .with_file_name(format!("{digest}.manifest.json"));
    fs::remove_file(manifest).unwrap();
    assert_eq!(cache.check_artifact(&digest), ArtifactHealth::Missing);
}

#[test]
fn manifest_without_its_directory_is_missing_and_commit_restores_it() {
    let (_dir, cache) = new_cache();
    let digest = commit(&cache, &FILES);
    // A removal cut short after the directory went to quarantine.
    fs::remove_dir_all(cache.artifact_path(&digest)).unwrap();
    assert_eq!(cache.check_artifact(&digest), ArtifactHealth::Missing);
    assert_eq!(commit(&cache, &FILES), digest);
    assert_eq!(cache.check_artifact(&digest), ArtifactHealth::Ok);
}

#[test]
fn garbage_manifest_is_damage_not_a_panic() {
    let (_dir, cache) = new_cache();
    let digest = commit(&cache, &FILES);
    let manifest = cache
        .artifact_path(&digest)
        .with_file_name(format!("{digest}.manifest.json"));
    fs::write(&manifest, b"{\"format\": 1, \"dig").unwrap();
    match cache.check_artifact(&digest) {
        ArtifactHealth::Damaged(reason) => assert!(reason.contains("manifest"), "{reason}"),
        other => panic!("expected Damaged, got {other:?}"),
    }
}

#[test]
fn record_pointing_to_a_missing_artifact_is_not_trusted() {
    let (_dir, cache) = new_cache();
    let absent = digest_of(&FILES);
    cache
        .write_record(&record("k1", &[("model", &absent)]))
        .unwrap();
    let stored = cache.read_record("k1").unwrap().unwrap();
    assert_eq!(
        cache.check_artifact(&stored.outputs["model"]),
        ArtifactHealth::Missing
    );
    let report = cache.verify().unwrap();
    assert_eq!(report.removed_records, vec!["k1".to_string()]);
    assert!(cache.read_record("k1").unwrap().is_none());
}

#[test]
fn check_artifact_finds_an_edited_file_of_the_same_size() {
    let (_dir, cache) = new_cache();
    let digest = commit(&cache, &FILES);
    let path = cache.artifact_path(&digest).join("model.safetensors");
    make_writable(&path);
    fs::write(&path, b"0123456789ABCDEF").unwrap();
    let file = fs::File::options().write(true).open(&path).unwrap();
    file.set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    match cache.check_artifact(&digest) {
        ArtifactHealth::Damaged(reason) => {
            assert!(reason.contains("model.safetensors"), "{reason}")
        }
        other => panic!("expected Damaged, got {other:?}"),
    }
}

#[test]
fn check_artifact_finds_a_truncated_file() {
    let (_dir, cache) = new_cache();
    let digest = commit(&cache, &FILES);
    let path = cache.artifact_path(&digest).join("tok/tokenizer.json");
    make_writable(&path);
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1)
        .unwrap();
    match cache.check_artifact(&digest) {
        ArtifactHealth::Damaged(reason) => assert!(reason.contains("tokenizer.json"), "{reason}"),
        other => panic!("expected Damaged, got {other:?}"),
    }
}

#[test]
fn check_artifact_finds_a_deleted_and_an_added_file() {
    let (_dir, cache) = new_cache();
    let digest = commit(&cache, &FILES);
    let object = cache.artifact_path(&digest);
    fs::write(object.join("extra.txt"), b"").unwrap();
    assert!(
        matches!(cache.check_artifact(&digest), ArtifactHealth::Damaged(r) if r.contains("extra.txt"))
    );
    fs::remove_file(object.join("extra.txt")).unwrap();
    fs::remove_file(object.join("config.json")).unwrap();
    assert!(
        matches!(cache.check_artifact(&digest), ArtifactHealth::Damaged(r) if r.contains("config.json"))
    );
}

#[test]
fn touched_but_unchanged_file_still_checks_ok() {
    let (_dir, cache) = new_cache();
    let digest = commit(&cache, &FILES);
    let path = cache.artifact_path(&digest).join("config.json");
    let file = fs::File::open(&path).unwrap();
    file.set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    assert_eq!(cache.check_artifact(&digest), ArtifactHealth::Ok);
}

#[cfg(unix)]
#[test]
fn symlink_in_a_staging_dir_is_refused_naming_it() {
    let (dir, cache) = new_cache();
    let staging = cache.staging_dir().unwrap();
    write_tree(staging.path(), &FILES);
    std::os::unix::fs::symlink("/etc/hostname", staging.path().join("tok/link")).unwrap();
    let error = cache.commit_artifact(staging).unwrap_err();
    assert!(
        matches!(&error, CacheError::SymlinkInArtifact { path } if path.ends_with("tok/link")),
        "{error}"
    );
    assert!(error.to_string().contains("hint:"));
    assert_eq!(count_entries(&dir.path().join("cache/v1/objects")), 0);
    assert_eq!(count_entries(&dir.path().join("cache/v1/staging")), 0);
}

#[test]
fn remove_artifact_leaves_nothing_under_objects() {
    let (dir, cache) = new_cache();
    let digest = commit(&cache, &FILES);
    cache.remove_artifact(&digest).unwrap();
    assert_eq!(cache.check_artifact(&digest), ArtifactHealth::Missing);
    assert_eq!(count_entries(&dir.path().join("cache/v1/objects")), 0);
    assert_eq!(count_entries(&dir.path().join("cache/v1/quarantine")), 0);
    assert!(matches!(
        cache.remove_artifact("not-a-digest"),
        Err(CacheError::InvalidDigest { .. })
    ));
}

#[test]
fn verify_quarantines_a_corrupted_artifact_and_removes_its_records() {
    let (dir, cache) = new_cache();
    let bad = commit(&cache, &FILES);
    let good = commit(&cache, &FILES[..1]);
    cache
        .write_record(&record("uses-bad", &[("model", &bad)]))
        .unwrap();
    cache
        .write_record(&record("uses-good", &[("model", &good)]))
        .unwrap();
    // Same size and the mtime put back: the cheap check cannot see it, the rehash must.
    let path = cache.artifact_path(&bad).join("model.safetensors");
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    make_writable(&path);
    fs::write(&path, b"0123456789abcdeX").unwrap();
    fs::File::open(&path).unwrap().set_modified(mtime).unwrap();
    assert_eq!(cache.check_artifact(&bad), ArtifactHealth::Ok);

    let report = cache.verify().unwrap();
    assert_eq!(report.checked, 2);
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(report.damaged[0].0, bad);
    assert!(
        report.damaged[0].1.contains("model.safetensors"),
        "{}",
        report.damaged[0].1
    );
    assert_eq!(report.removed_records, vec!["uses-bad".to_string()]);
    assert_eq!(cache.check_artifact(&bad), ArtifactHealth::Missing);
    assert_eq!(cache.check_artifact(&good), ArtifactHealth::Ok);
    assert!(cache.read_record("uses-good").unwrap().is_some());
    assert_eq!(count_entries(&dir.path().join("cache/v1/quarantine")), 0);
    // The next run recomputes it and commits it again.
    assert_eq!(commit(&cache, &FILES), bad);
    assert_eq!(cache.check_artifact(&bad), ArtifactHealth::Ok);
}

#[test]
fn verify_removes_object_dirs_of_interrupted_commits() {
    let (_dir, cache) = new_cache();
    let digest = digest_of(&FILES);
    write_tree(&cache.artifact_path(&digest), &FILES);
    let report = cache.verify().unwrap();
    assert_eq!(report.damaged.len(), 1);
    assert!(
        report.damaged[0].1.contains("no manifest"),
        "{}",
        report.damaged[0].1
    );
    assert!(!cache.artifact_path(&digest).exists());
}

#[test]
fn verify_refuses_to_run_while_a_run_holds_the_cache() {
    let (_dir, cache) = new_cache();
    let _run = cache.lock_shared().unwrap();
    assert!(matches!(cache.verify(), Err(CacheError::Busy { .. })));
}

#[test]
fn staging_dir_of_another_cache_is_refused() {
    let (_a, cache_a) = new_cache();
    let (_b, cache_b) = new_cache();
    let staging = cache_a.staging_dir().unwrap();
    assert!(matches!(
        cache_b.commit_artifact(staging),
        Err(CacheError::ForeignStagingDir { .. })
    ));
}

fn digest_of(files: &[(&str, &[u8])]) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), files);
    digest_dir(dir.path()).unwrap()
}

#[test]
fn concurrent_commits_of_identical_content_keep_one_healthy_object() {
    let (dir, cache) = new_cache();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let cache = cache.clone();
            std::thread::spawn(move || commit(&cache, &FILES))
        })
        .collect();
    let digests: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(digests.iter().all(|d| *d == digests[0]));
    assert_eq!(cache.check_artifact(&digests[0]), ArtifactHealth::Ok);
    assert_eq!(count_entries(&dir.path().join("cache/v1/objects")), 2);
    assert_eq!(count_entries(&dir.path().join("cache/v1/staging")), 0);
}
