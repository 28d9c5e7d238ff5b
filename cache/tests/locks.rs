//! Key locks serialise work on one key across threads and processes; the cache lock
//! lets runs share the cache and keeps gc/verify out while they do.

mod common;

use common::new_cache;
use rlhf_cache::Cache;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "RLHF_CACHE_LOCK_TEST_CHILD_DIR";

#[test]
fn lock_key_serialises_threads_on_one_key() {
    let (_dir, cache) = new_cache();
    let counter = cache.dir().join("counter");
    fs::write(&counter, b"0").unwrap();
    let inside = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (cache, counter, inside) = (cache.clone(), counter.clone(), inside.clone());
            std::thread::spawn(move || {
                for _ in 0..25 {
                    let _lock = cache.lock_key("k1").unwrap();
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                    // A read-modify-write with a pause inside: loses updates unless serialised.
                    let value: u64 = fs::read_to_string(&counter).unwrap().parse().unwrap();
                    std::thread::sleep(Duration::from_micros(200));
                    fs::write(&counter, (value + 1).to_string()).unwrap();
                    inside.fetch_sub(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(fs::read_to_string(&counter).unwrap(), "100");
}

#[test]
fn try_lock_key_is_none_while_held_and_some_after_release() {
    let (_dir, cache) = new_cache();
    let held = cache.lock_key("k1").unwrap();
    assert_eq!(held.key(), "k1");
    assert!(cache.try_lock_key("k1").unwrap().is_none());
    assert!(
        cache.try_lock_key("k2").unwrap().is_some(),
        "other keys are independent"
    );
    drop(held);
    assert!(cache.try_lock_key("k1").unwrap().is_some());
}

#[test]
fn runs_share_the_cache_lock_and_exclude_an_exclusive_holder() {
    let (_dir, cache) = new_cache();
    let run_a = cache.lock_shared().unwrap();
    let run_b = cache.lock_shared().unwrap();
    assert!(!run_a.is_exclusive());
    assert!(cache.try_lock_exclusive().unwrap().is_none());
    drop((run_a, run_b));
    let gc = cache.try_lock_exclusive().unwrap().unwrap();
    assert!(gc.is_exclusive());
}

/// Runs only as the child half of `lock_key_serialises_processes` (it re-executes this
/// test binary with the cache dir in an env var); ignored in normal runs.
#[test]
#[ignore = "child process of lock_key_serialises_processes"]
fn lock_child_process() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let cache = Cache::open(Path::new(&dir)).unwrap();
    let busy = cache.try_lock_key("shared-key").unwrap().is_none();
    fs::write(cache.dir().join("child-saw-busy"), busy.to_string()).unwrap();
    let _lock = cache.lock_key("shared-key").unwrap();
    fs::write(cache.dir().join("child-acquired"), b"yes").unwrap();
}

#[test]
fn lock_key_serialises_processes() {
    let (_dir, cache) = new_cache();
    let held = cache.lock_key("shared-key").unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lock_child_process",
            "--include-ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, cache.dir())
        .spawn()
        .unwrap();
    let saw_busy = cache.dir().join("child-saw-busy");
    let acquired = cache.dir().join("child-acquired");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !saw_busy.exists() {
        assert!(Instant::now() < deadline, "child never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fs::read_to_string(&saw_busy).unwrap(), "true");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !acquired.exists(),
        "child took the lock while the parent held it"
    );
    drop(held);
    assert!(child.wait().unwrap().success());
    assert!(acquired.exists());
}

#[test]
fn a_dead_holder_releases_its_lock() {
    // The child takes the lock and exits without dropping it cleanly (process::exit):
    // the kernel releases flock locks with the process, so no stale lock remains.
    let (_dir, cache) = new_cache();
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "lock_and_exit_child", "--include-ignored"])
        .env(CHILD_ENV, cache.dir())
        .status()
        .unwrap();
    assert!(
        cache.dir().join("child-held").exists(),
        "child did not run: {status}"
    );
    assert!(cache.try_lock_key("k-dead").unwrap().is_some());
}

#[test]
#[ignore = "child process of a_dead_holder_releases_its_lock"]
fn lock_and_exit_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let cache = Cache::open(Path::new(&dir)).unwrap();
    let lock = cache.lock_key("k-dead").unwrap();
    fs::write(cache.dir().join("child-held"), b"yes").unwrap();
    std::mem::forget(lock);
    std::process::exit(0);
}

#[test]
fn gc_and_verify_run_under_the_callers_exclusive_lock() {
    let (dir, cache) = new_cache();
    let exclusive = cache.lock_exclusive().unwrap();
    // Another handle on the same cache, spelled differently, in the same process.
    let relative = dir.path().join("cache/../cache");
    let other = Cache::open(&relative).unwrap();
    other
        .gc(&Default::default(), &Default::default(), true)
        .unwrap();
    other.verify().unwrap();
    drop(exclusive);
    // Without it, they take the lock themselves, and it is free again afterwards.
    cache.verify().unwrap();
    assert!(cache.try_lock_exclusive().unwrap().is_some());
}

#[test]
fn verify_waits_briefly_for_a_run_that_is_letting_go() {
    // As when another thread spawns a child while this one drops its lock: the lock
    // stays held a moment after the run ends.
    let (_dir, cache) = new_cache();
    let run = cache.lock_shared().unwrap();
    let ending = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(run);
    });
    cache.verify().unwrap();
    ending.join().unwrap();
}

#[test]
fn gc_in_a_process_holding_only_the_shared_lock_is_busy() {
    let (_dir, cache) = new_cache();
    let _run = cache.lock_shared().unwrap();
    assert!(matches!(
        cache.gc(&Default::default(), &Default::default(), true),
        Err(rlhf_cache::CacheError::Busy { .. })
    ));
}
