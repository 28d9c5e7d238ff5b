//! A process killed (SIGKILL) at an arbitrary instant while committing artifacts and
//! writing records leaves nothing a later run would trust wrongly: every object is Ok or
//! Missing (never Damaged), every record points at healthy artifacts, and gc sweeps the rest.

mod common;

use common::{new_cache, record, write_tree};
use rlhf_cache::{ArtifactHealth, Cache};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "RLHF_CACHE_CRASH_TEST_CHILD_DIR";

/// Commits artifacts and records forever, until the parent kills it.
#[test]
#[ignore = "child process of commits_killed_at_any_instant_leave_a_consistent_cache"]
fn commit_forever_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let cache = Cache::open(Path::new(&dir)).unwrap();
    let big = vec![7u8; 3 << 20];
    for round in 0u64.. {
        let staging = cache.staging_dir().unwrap();
        let label = round.to_string();
        write_tree(
            staging.path(),
            &[
                ("model.safetensors", &big),
                ("round.txt", label.as_bytes()),
                ("sub/a", b"a"),
            ],
        );
        let digest = cache.commit_artifact(staging).unwrap();
        cache
            .write_record(&record(&format!("key-{round}"), &[("model", &digest)]))
            .unwrap();
        if round == 0 {
            std::fs::write(cache.dir().join("child-started"), b"yes").unwrap();
        }
    }
}

#[test]
fn commits_killed_at_any_instant_leave_a_consistent_cache() {
    for kill_after_ms in [5u64, 40, 90, 170] {
        let (_dir, cache) = new_cache();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "commit_forever_child", "--include-ignored"])
            .env(CHILD_ENV, cache.dir())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cache.dir().join("child-started").exists() {
            assert!(Instant::now() < deadline, "child never committed");
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(kill_after_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_consistent(&cache);
    }
}

fn assert_consistent(cache: &Cache) {
    let objects = std::fs::read_dir(cache.dir().join("v1/objects")).unwrap();
    for entry in objects {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let digest = name.trim_end_matches(".manifest.json");
        let health = cache.check_artifact(digest);
        assert!(
            matches!(health, ArtifactHealth::Ok | ArtifactHealth::Missing),
            "{digest}: {health:?}"
        );
    }
    let (records, corrupt) = cache.list_records().unwrap();
    assert!(corrupt.is_empty(), "{corrupt:?}");
    assert!(!records.is_empty());
    for record in &records {
        for digest in record.outputs.values() {
            assert_eq!(
                cache.check_artifact(digest),
                ArtifactHealth::Ok,
                "{}",
                record.key
            );
        }
    }
    // gc then leaves only complete artifacts and nothing in staging.
    let keep: BTreeSet<String> = records.iter().map(|r| r.key.clone()).collect();
    cache.gc(&keep, &BTreeSet::new(), true).unwrap();
    assert_eq!(
        std::fs::read_dir(cache.dir().join("v1/staging"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(cache.verify().unwrap().damaged, vec![]);
}
