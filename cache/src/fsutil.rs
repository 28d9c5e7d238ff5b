//! Small filesystem helpers shared by the store: atomic writes (tempfile in the same
//! directory, sync, rename), directory fsync, unique names, and key validation (keys
//! become file names, so they must not be able to escape their directory).

use crate::error::{CacheError, IoResultExt};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Name prefix of the temp files of [`write_atomic`] (gc sweeps old ones).
pub(crate) const TEMP_PREFIX: &str = ".tmp-";

/// Writes `bytes` to `path` so that readers see either the old file or the whole new one.
/// With `durable`, the data and the rename are fsynced before returning.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> Result<(), CacheError> {
    let directory = path.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(directory)
        .at(directory)?;
    temp.write_all(bytes).at(temp.path())?;
    if durable {
        temp.as_file().sync_all().at(temp.path())?;
    }
    temp.persist(path)
        .map_err(|e| CacheError::io(path, e.error))?;
    if durable {
        sync_dir(directory)?;
    }
    Ok(())
}

/// fsyncs a directory so that renames and creations inside it survive a power loss.
pub(crate) fn sync_dir(path: &Path) -> Result<(), CacheError> {
    #[cfg(unix)]
    {
        fs::File::open(path).at(path)?.sync_all().at(path)?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// A name no other process or thread will pick: pid, nanoseconds and a counter.
pub(crate) fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}-{nanos}-{count}", std::process::id())
}

/// Removes a directory tree; a missing one is not an error.
pub(crate) fn remove_dir_all_if_exists(path: &Path) -> Result<(), CacheError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CacheError::io(path, e)),
    }
}

/// Removes a file; a missing one is not an error.
pub(crate) fn remove_file_if_exists(path: &Path) -> Result<(), CacheError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CacheError::io(path, e)),
    }
}

/// Keys name files (`records/<key>.json`, `locks/<key>.lock`, `scratch/<key>`): ASCII
/// letters, digits, `-`, `_`, `.`, at most 200 characters, not starting with a dot.
pub(crate) fn validate_key(key: &str) -> Result<(), CacheError> {
    let reason = if key.is_empty() {
        Some("it is empty")
    } else if key.len() > 200 {
        Some("it is longer than 200 characters")
    } else if key.starts_with('.') {
        Some("it starts with a dot")
    } else if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        Some("only ASCII letters, digits, `-`, `_` and `.` are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(CacheError::InvalidKey {
            key: key.to_string(),
            reason: reason.to_string(),
        }),
        None => Ok(()),
    }
}

/// Nanoseconds since the epoch of a system time (negative before 1970).
pub(crate) fn system_time_nanos(time: SystemTime) -> i128 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_could_escape_their_directory_are_refused() {
        for key in ["", "../x", "a/b", ".hidden", "a b", &"k".repeat(201)] {
            assert!(validate_key(key).is_err(), "{key:?} accepted");
        }
        validate_key(&"a".repeat(64)).unwrap();
        validate_key("sft-1.2_x").unwrap();
    }

    #[test]
    fn write_atomic_replaces_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_atomic(&path, b"first version", true).unwrap();
        write_atomic(&path, b"2nd", false).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"2nd");
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temp files left behind");
    }
}
