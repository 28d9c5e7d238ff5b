//! The stat cache of external inputs: an unchanged file is not rehashed; any edit, even
//! one that keeps the size and puts the mtime back, is; and a file changed within the
//! racy window of the hashing is never trusted.

mod common;

use common::{new_cache, write_tree};
use rlhf_cache::{digest_dir, digest_file, RACY_WINDOW};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// Waits until files written so far are older than the racy window.
fn outwait_racy_window() {
    std::thread::sleep(RACY_WINDOW + Duration::from_millis(150));
}

fn write(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap();
}

/// A directory of input files, one set per test, all written once and then left to
/// settle past the racy window, so the tests share a single wait.
fn settled_inputs() -> &'static Path {
    static SETTLED: OnceLock<PathBuf> = OnceLock::new();
    SETTLED.get_or_init(|| {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap()
            .keep();
        write(&dir.join("unchanged.csv"), b"a,b\n1,2\n");
        write(&dir.join("mtime_back.csv"), b"a,b\n1,2\n");
        write(&dir.join("replaced.csv"), b"old-content");
        write(&dir.join("corrupt.csv"), b"abc");
        let files: [(&str, &[u8]); 3] = [
            ("config.json", b"{}"),
            ("w/model.safetensors", b"weights"),
            ("tok.json", b"t"),
        ];
        write_tree(&dir.join("model"), &files);
        outwait_racy_window();
        dir
    })
}

#[test]
fn unchanged_file_is_not_rehashed() {
    let (_dir, cache) = new_cache();
    let input = settled_inputs().join("unchanged.csv");
    let first = cache.digest_external_with_stats(&input).unwrap();
    assert_eq!((first.hashed_files, first.reused_files), (1, 0));
    assert_eq!(first.digest, digest_file(&input).unwrap());
    let second = cache.digest_external_with_stats(&input).unwrap();
    assert_eq!((second.hashed_files, second.reused_files), (0, 1));
    assert_eq!(second.digest, first.digest);
    // Another process (a fresh Cache on the same dir) sees the same entry.
    let reopened = rlhf_cache::Cache::open(cache.dir()).unwrap();
    assert_eq!(
        reopened
            .digest_external_with_stats(&input)
            .unwrap()
            .hashed_files,
        0
    );
}

#[test]
fn edit_of_same_size_with_the_mtime_put_back_is_rehashed() {
    let (_dir, cache) = new_cache();
    let input = settled_inputs().join("mtime_back.csv");
    let before = cache.digest_external_with_stats(&input).unwrap();
    assert_eq!(before.hashed_files, 1);
    // Same size, same mtime to the nanosecond, same inode: only ctime tells.
    let mtime = fs::metadata(&input).unwrap().modified().unwrap();
    write(&input, b"a,b\n1,3\n");
    fs::File::options()
        .write(true)
        .open(&input)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(fs::metadata(&input).unwrap().modified().unwrap(), mtime);
    let after = cache.digest_external_with_stats(&input).unwrap();
    assert_eq!(after.hashed_files, 1);
    assert_ne!(after.digest, before.digest);
    assert_eq!(after.digest, digest_file(&input).unwrap());
}

#[test]
fn edit_within_the_same_second_is_rehashed() {
    let (dir, cache) = new_cache();
    let input = dir.path().join("data.csv");
    write(&input, b"first!");
    let first = cache.digest_external_with_stats(&input).unwrap();
    write(&input, b"second");
    let second = cache.digest_external_with_stats(&input).unwrap();
    assert_eq!(second.hashed_files, 1);
    assert_ne!(second.digest, first.digest);
    assert_eq!(second.digest, digest_file(&input).unwrap());
}

#[test]
fn file_changed_within_the_racy_window_is_not_trusted_until_it_settles() {
    let (dir, cache) = new_cache();
    let input = dir.path().join("weights.bin");
    write(&input, b"fresh bytes");
    assert_eq!(
        cache
            .digest_external_with_stats(&input)
            .unwrap()
            .hashed_files,
        1
    );
    assert_eq!(
        cache
            .digest_external_with_stats(&input)
            .unwrap()
            .hashed_files,
        1
    );
    outwait_racy_window();
    assert_eq!(
        cache
            .digest_external_with_stats(&input)
            .unwrap()
            .hashed_files,
        1
    );
    assert_eq!(
        cache
            .digest_external_with_stats(&input)
            .unwrap()
            .hashed_files,
        0
    );
}

#[test]
fn folder_input_matches_digest_dir_and_rehashes_only_the_edited_file() {
    let (_dir, cache) = new_cache();
    let folder = settled_inputs().join("model");
    let first = cache.digest_external_with_stats(&folder).unwrap();
    assert_eq!(first.digest, digest_dir(&folder).unwrap());
    assert_eq!(first.hashed_files, 3);
    let second = cache.digest_external_with_stats(&folder).unwrap();
    assert_eq!((second.hashed_files, second.reused_files), (0, 3));
    write(&folder.join("tok.json"), b"u");
    let third = cache.digest_external_with_stats(&folder).unwrap();
    assert_eq!((third.hashed_files, third.reused_files), (1, 2));
    assert_eq!(third.digest, digest_dir(&folder).unwrap());
    assert_ne!(third.digest, first.digest);
}

#[test]
fn replaced_file_with_identical_stat_fields_but_new_inode_is_rehashed() {
    let (_dir, cache) = new_cache();
    let input = settled_inputs().join("replaced.csv");
    let before = cache.digest_external(&input).unwrap();
    // The usual "save" of editors: write a new file and rename it over the old one.
    let replacement = settled_inputs().join("replaced.csv.new");
    write(&replacement, b"new-content");
    fs::rename(&replacement, &input).unwrap();
    let after = cache.digest_external_with_stats(&input).unwrap();
    assert_eq!(after.hashed_files, 1);
    assert_ne!(after.digest, before);
}

#[test]
fn corrupt_stat_entry_is_a_miss_not_an_error() {
    let (_dir, cache) = new_cache();
    let input = settled_inputs().join("corrupt.csv");
    let digest = cache.digest_external(&input).unwrap();
    for entry in fs::read_dir(cache.dir().join("v1/stat")).unwrap() {
        fs::write(entry.unwrap().path(), b"{garbage").unwrap();
    }
    let again = cache.digest_external_with_stats(&input).unwrap();
    assert_eq!((again.digest, again.hashed_files), (digest, 1));
}
