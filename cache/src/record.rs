//! Action records: what a stage key produced (`v1/records/<key>.json`). A record is
//! written atomically after its outputs are committed, so a record never points at an
//! artifact that was not complete; an unreadable record is a [`CacheError::CorruptRecord`]
//! that the engine reports and treats as a miss.

use crate::digest::Digest;
use crate::error::{CacheError, IoResultExt};
use crate::fsutil::{remove_file_if_exists, validate_key, write_atomic};
use crate::store::Cache;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The record format this build reads and writes; any other value is a corrupt record.
pub const RECORD_FORMAT: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// [`RECORD_FORMAT`].
    pub format: u32,
    pub key: String,
    pub stage: String,
    pub kind: String,
    /// Canonical params, kept so a rerun can say "param `lr` changed".
    pub params: serde_json::Value,
    /// Input name -> content digest.
    pub inputs: BTreeMap<String, Digest>,
    /// Output name -> artifact digest.
    pub outputs: BTreeMap<String, Digest>,
    /// Final metrics summary (may be `Null`).
    pub metrics: serde_json::Value,
    pub seconds: f64,
    pub created_unix: u64,
}

impl Cache {
    pub(crate) fn record_path(&self, key: &str) -> PathBuf {
        self.sub("records").join(format!("{key}.json"))
    }

    /// The record of `key`; `Ok(None)` when there is none, `Err(CorruptRecord)` when the
    /// file is unreadable, not a record, of another format, or names another key.
    pub fn read_record(&self, key: &str) -> Result<Option<Record>, CacheError> {
        validate_key(key)?;
        let path = self.record_path(key);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::io(&path, e)),
        };
        let record = parse_record(&path, &bytes)?;
        if record.key != key {
            return Err(CacheError::CorruptRecord {
                path,
                reason: format!("it records key `{}`", record.key),
            });
        }
        Ok(Some(record))
    }

    /// Writes the record atomically and durably (tempfile in the same dir, sync, rename).
    pub fn write_record(&self, record: &Record) -> Result<(), CacheError> {
        validate_key(&record.key)?;
        let path = self.record_path(&record.key);
        let mut json =
            serde_json::to_vec_pretty(record).map_err(|e| CacheError::CorruptRecord {
                path: path.clone(),
                reason: format!("cannot serialise: {e}"),
            })?;
        json.push(b'\n');
        write_atomic(&path, &json, true)
    }

    /// Deletes the record of `key` (missing is fine).
    pub fn remove_record(&self, key: &str) -> Result<(), CacheError> {
        validate_key(key)?;
        remove_file_if_exists(&self.record_path(key))
    }

    /// Every record, sorted by key: the good ones, and the corrupt ones as errors.
    pub fn list_records(&self) -> Result<(Vec<Record>, Vec<CacheError>), CacheError> {
        let mut good = Vec::new();
        let mut corrupt = Vec::new();
        for key in self.record_keys()? {
            match self.read_record(&key) {
                Ok(Some(record)) => good.push(record),
                Ok(None) => {} // removed meanwhile by another process
                Err(e) => corrupt.push(e),
            }
        }
        Ok((good, corrupt))
    }

    /// The keys of every `records/<key>.json`, sorted (temp files skipped).
    pub(crate) fn record_keys(&self) -> Result<Vec<String>, CacheError> {
        let directory = self.sub("records");
        let mut keys = Vec::new();
        for entry in fs::read_dir(&directory).at(&directory)? {
            let entry = entry.at(&directory)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(key) = name.strip_suffix(".json") {
                if validate_key(key).is_ok() {
                    keys.push(key.to_string());
                }
            }
        }
        keys.sort();
        Ok(keys)
    }
}

fn parse_record(path: &Path, bytes: &[u8]) -> Result<Record, CacheError> {
    let corrupt = |reason: String| CacheError::CorruptRecord {
        path: path.to_path_buf(),
        reason,
    };
    // Read the format first, so a future format is reported as such, not as a field error.
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not JSON ({e})")))?;
    match value.get("format").and_then(serde_json::Value::as_u64) {
        Some(format) if format == u64::from(RECORD_FORMAT) => {}
        Some(format) => {
            return Err(corrupt(format!(
                "record format {format}, this rlhf reads format {RECORD_FORMAT}"
            )))
        }
        None => return Err(corrupt("no `format` number".to_string())),
    }
    serde_json::from_value(value).map_err(|e| corrupt(format!("not a record ({e})")))
}
