//! Action records: atomic round trip, and every kind of corruption is an error naming
//! the file (the engine warns and treats it as a miss), never a panic.

mod common;

use common::{new_cache, record};
use rlhf_cache::{CacheError, Record};
use std::fs;
use std::path::PathBuf;

fn record_path(cache: &rlhf_cache::Cache, key: &str) -> PathBuf {
    cache.dir().join("v1/records").join(format!("{key}.json"))
}

fn expect_corrupt(result: Result<Option<Record>, CacheError>, wanted: &str) {
    match result {
        Err(CacheError::CorruptRecord { path, reason }) => {
            assert!(path.ends_with("k1.json"), "{}", path.display());
            assert!(
                reason.contains(wanted),
                "reason `{reason}` lacks `{wanted}`"
            );
        }
        other => panic!("expected CorruptRecord, got {other:?}"),
    }
}

#[test]
fn record_round_trips_exactly() {
    let (_dir, cache) = new_cache();
    let digest = "a".repeat(64);
    let mut written = record("k1", &[("model", &digest)]);
    written.inputs.insert("data".into(), "b".repeat(64));
    written.metrics = serde_json::json!({"loss": 0.25});
    cache.write_record(&written).unwrap();
    assert_eq!(cache.read_record("k1").unwrap(), Some(written));
}

#[test]
fn missing_record_is_none() {
    let (_dir, cache) = new_cache();
    assert_eq!(cache.read_record("k1").unwrap(), None);
}

#[test]
fn garbage_json_record_is_corrupt() {
    let (_dir, cache) = new_cache();
    fs::write(record_path(&cache, "k1"), b"\x00\xffnot json").unwrap();
    expect_corrupt(cache.read_record("k1"), "not JSON");
}

#[test]
fn record_of_another_format_is_corrupt() {
    let (_dir, cache) = new_cache();
    let mut json = serde_json::to_value(record("k1", &[])).unwrap();
    json["format"] = serde_json::json!(2);
    fs::write(record_path(&cache, "k1"), json.to_string()).unwrap();
    expect_corrupt(cache.read_record("k1"), "record format 2");
}

#[test]
fn truncated_record_is_corrupt() {
    let (_dir, cache) = new_cache();
    cache.write_record(&record("k1", &[])).unwrap();
    let path = record_path(&cache, "k1");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    expect_corrupt(cache.read_record("k1"), "not JSON");
}

#[test]
fn record_with_a_missing_field_is_corrupt() {
    let (_dir, cache) = new_cache();
    fs::write(record_path(&cache, "k1"), br#"{"format": 1, "key": "k1"}"#).unwrap();
    expect_corrupt(cache.read_record("k1"), "not a record");
}

#[test]
fn record_stored_under_another_key_is_corrupt() {
    let (_dir, cache) = new_cache();
    let json = serde_json::to_vec(&record("other", &[])).unwrap();
    fs::write(record_path(&cache, "k1"), json).unwrap();
    expect_corrupt(cache.read_record("k1"), "other");
}

#[test]
fn corrupt_record_message_names_the_file_and_gives_a_hint() {
    let (_dir, cache) = new_cache();
    fs::write(record_path(&cache, "k1"), b"{").unwrap();
    let message = cache.read_record("k1").unwrap_err().to_string();
    assert!(
        message.contains("k1.json") && message.contains("hint:"),
        "{message}"
    );
}

#[test]
fn list_records_separates_good_and_corrupt() {
    let (_dir, cache) = new_cache();
    cache.write_record(&record("good", &[])).unwrap();
    fs::write(record_path(&cache, "k1"), b"[]").unwrap();
    let (good, corrupt) = cache.list_records().unwrap();
    assert_eq!(good.len(), 1);
    assert_eq!(good[0].key, "good");
    assert_eq!(corrupt.len(), 1);
    assert!(matches!(corrupt[0], CacheError::CorruptRecord { .. }));
}

#[test]
fn remove_record_removes_it_and_tolerates_absence() {
    let (_dir, cache) = new_cache();
    cache.write_record(&record("k1", &[])).unwrap();
    cache.remove_record("k1").unwrap();
    assert_eq!(cache.read_record("k1").unwrap(), None);
    cache.remove_record("k1").unwrap();
}

#[test]
fn record_keys_that_are_not_file_names_are_refused() {
    let (_dir, cache) = new_cache();
    assert!(matches!(
        cache.write_record(&record("../evil", &[])),
        Err(CacheError::InvalidKey { .. })
    ));
    assert!(matches!(
        cache.read_record("a/b"),
        Err(CacheError::InvalidKey { .. })
    ));
}
