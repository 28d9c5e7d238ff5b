//! The directory digest definition: what it ignores and what it must notice.

mod common;

use common::write_tree;
use rlhf_cache::{digest_dir, digest_file, CacheError};
use std::fs;
use std::time::{Duration, SystemTime};

const FILES: [(&str, &[u8]); 4] = [
    ("config.json", b"{\"hidden\": 8}"),
    ("model.safetensors", b"weights"),
    ("tokenizer/tokenizer.json", b"{}"),
    ("tokenizer/deep/vocab.txt", b"a\nb\n"),
];

#[test]
fn digest_dir_is_independent_of_creation_order() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    write_tree(a.path(), &FILES);
    let mut reversed = FILES;
    reversed.reverse();
    write_tree(b.path(), &reversed);
    assert_eq!(digest_dir(a.path()).unwrap(), digest_dir(b.path()).unwrap());
}

#[test]
fn digest_dir_is_independent_of_mtimes_and_permissions() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), &FILES);
    let before = digest_dir(dir.path()).unwrap();
    let path = dir.path().join("model.safetensors");
    let file = fs::File::options().write(true).open(&path).unwrap();
    file.set_modified(SystemTime::now() - Duration::from_secs(86_400))
        .unwrap();
    let mut permissions = fs::metadata(&path).unwrap().permissions();
    permissions.set_readonly(true);
    fs::set_permissions(&path, permissions).unwrap();
    assert_eq!(digest_dir(dir.path()).unwrap(), before);
}

#[test]
fn digest_dir_ignores_empty_directories() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), &FILES);
    let before = digest_dir(dir.path()).unwrap();
    fs::create_dir_all(dir.path().join("empty/nested")).unwrap();
    assert_eq!(digest_dir(dir.path()).unwrap(), before);
}

#[test]
fn digest_dir_changes_with_any_byte() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), &FILES);
    let before = digest_dir(dir.path()).unwrap();
    fs::write(dir.path().join("tokenizer/deep/vocab.txt"), b"a\nc\n").unwrap();
    assert_ne!(digest_dir(dir.path()).unwrap(), before);
}

#[test]
fn digest_dir_changes_with_a_rename() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), &FILES);
    let before = digest_dir(dir.path()).unwrap();
    fs::rename(
        dir.path().join("config.json"),
        dir.path().join("config2.json"),
    )
    .unwrap();
    assert_ne!(digest_dir(dir.path()).unwrap(), before);
}

#[test]
fn digest_dir_changes_with_a_file_moved_to_another_directory() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), &FILES);
    let before = digest_dir(dir.path()).unwrap();
    fs::rename(
        dir.path().join("tokenizer/tokenizer.json"),
        dir.path().join("tokenizer/deep/tokenizer.json"),
    )
    .unwrap();
    assert_ne!(digest_dir(dir.path()).unwrap(), before);
}

#[test]
fn digest_dir_changes_with_an_added_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), &FILES);
    let before = digest_dir(dir.path()).unwrap();
    fs::write(dir.path().join("tokenizer/empty"), b"").unwrap();
    assert_ne!(digest_dir(dir.path()).unwrap(), before);
}

#[test]
fn digest_file_is_the_same_for_small_and_large_hashing_paths() {
    // 3 MiB goes through the rayon path; blake3 of the same bytes in memory must agree.
    let dir = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let path = dir.path().join("big");
    fs::write(&path, &bytes).unwrap();
    assert_eq!(
        digest_file(&path).unwrap(),
        blake3::hash(&bytes).to_hex().to_string()
    );
}

#[cfg(unix)]
#[test]
fn digest_dir_follows_symlinks_of_external_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    let linked = dir.path().join("linked");
    write_tree(&real, &FILES);
    write_tree(&linked, &FILES[..2]);
    std::os::unix::fs::symlink(real.join("tokenizer"), linked.join("tokenizer")).unwrap();
    assert_eq!(digest_dir(&linked).unwrap(), digest_dir(&real).unwrap());
}

#[cfg(unix)]
#[test]
fn digest_dir_reports_a_symlink_loop_instead_of_recursing_forever() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), &FILES);
    std::os::unix::fs::symlink(dir.path(), dir.path().join("tokenizer/loop")).unwrap();
    let error = digest_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&error, CacheError::SymlinkLoop { path } if path.ends_with("tokenizer/loop")),
        "{error}"
    );
}

#[test]
fn digest_of_a_missing_path_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let error = digest_dir(&missing).unwrap_err();
    assert!(error.is_not_found());
    assert!(error.to_string().contains("nope"), "{error}");
}
