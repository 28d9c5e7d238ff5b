//! Digests of external inputs (files and folders named in pipelines), with a stat cache
//! so an unchanged multi-GB file is not rehashed on every run.
//!
//! One small JSON file per canonical file path, `v1/stat/<blake3(path)>.json`, written
//! atomically (concurrent runs at worst both hash and both write the same entry). An
//! entry is trusted only while size, mtime and ctime (full nanoseconds), inode and
//! device are all unchanged. Timestamps are only as fine as the kernel's clock tick, so
//! a write in the same tick as the hashing could leave them all equal: like git's
//! "racy clean" rule, a file whose mtime or ctime was within [`RACY_WINDOW`] of the
//! moment hashing started gets no entry and is hashed again next time. Any later write
//! moves ctime past that moment, so an edit that restores the old mtime is still noticed.

use crate::digest::{combine_file_digests, digest_file, walk_files, Digest, SymlinkPolicy};
use crate::error::{CacheError, IoResultExt};
use crate::fsutil::{system_time_nanos, write_atomic};
use crate::store::Cache;
use serde::{Deserialize, Serialize};
use std::fs::{self, Metadata};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Files changed this close to the hashing time are not trusted by the stat cache.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// A digest of an external input and how much hashing it took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalDigest {
    pub digest: Digest,
    /// Files read and hashed.
    pub hashed_files: usize,
    /// Files whose digest came from the stat cache.
    pub reused_files: usize,
}

/// What the stat cache remembers about one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StatEntry {
    path: String,
    stat: FileStat,
    digest: Digest,
}

/// The identity of a file's content as far as `stat` can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FileStat {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    inode: u64,
    device: u64,
}

#[cfg(unix)]
fn file_stat(metadata: &Metadata) -> FileStat {
    use std::os::unix::fs::MetadataExt;
    FileStat {
        size: metadata.len(),
        mtime_ns: metadata.mtime() * 1_000_000_000 + metadata.mtime_nsec(),
        ctime_ns: metadata.ctime() * 1_000_000_000 + metadata.ctime_nsec(),
        inode: metadata.ino(),
        device: metadata.dev(),
    }
}

#[cfg(not(unix))]
fn file_stat(metadata: &Metadata) -> FileStat {
    let mtime_ns = metadata
        .modified()
        .map(|t| system_time_nanos(t) as i64)
        .unwrap_or(0);
    FileStat {
        size: metadata.len(),
        mtime_ns,
        ctime_ns: mtime_ns,
        inode: 0,
        device: 0,
    }
}

impl Cache {
    /// Digest of an external input: [`digest_file`] for a file, the
    /// [`crate::digest_dir`] definition for a folder (symlinks followed).
    pub fn digest_external(&self, path: &Path) -> Result<Digest, CacheError> {
        Ok(self.digest_external_with_stats(path)?.digest)
    }

    /// [`Cache::digest_external`], also saying how many files were hashed or reused.
    pub fn digest_external_with_stats(&self, path: &Path) -> Result<ExternalDigest, CacheError> {
        let metadata = fs::metadata(path).at(path)?;
        let mut result = ExternalDigest {
            digest: String::new(),
            hashed_files: 0,
            reused_files: 0,
        };
        if metadata.is_file() {
            result.digest = self.cached_file_digest(path, &mut result)?;
            return Ok(result);
        }
        if !metadata.is_dir() {
            return Err(CacheError::UnsupportedFileType {
                path: path.to_path_buf(),
            });
        }
        let mut pairs = Vec::new();
        for file in walk_files(path, SymlinkPolicy::Follow)? {
            let digest = self.cached_file_digest(&file.path, &mut result)?;
            pairs.push((file.relative, digest));
        }
        result.digest = combine_file_digests(&pairs);
        Ok(result)
    }

    fn stat_entry_path(&self, canonical: &Path) -> PathBuf {
        let name = blake3::hash(path_bytes(canonical).as_slice()).to_hex();
        self.sub("stat").join(format!("{name}.json"))
    }

    /// The digest of one file, from the stat cache when its entry still matches.
    fn cached_file_digest(
        &self,
        path: &Path,
        counts: &mut ExternalDigest,
    ) -> Result<Digest, CacheError> {
        let canonical = fs::canonicalize(path).at(path)?;
        let entry_path = self.stat_entry_path(&canonical);
        let before = file_stat(&fs::metadata(&canonical).at(&canonical)?);
        if let Some(entry) = read_entry(&entry_path) {
            if entry.stat == before && entry.path == canonical.to_string_lossy() {
                counts.reused_files += 1;
                return Ok(entry.digest);
            }
        }
        let hashing_started = system_time_nanos(SystemTime::now()) as i64;
        let digest = digest_file(&canonical)?;
        counts.hashed_files += 1;
        let after = file_stat(&fs::metadata(&canonical).at(&canonical)?);
        let racy_limit = hashing_started - RACY_WINDOW.as_nanos() as i64;
        let racy = before.mtime_ns.max(before.ctime_ns) >= racy_limit;
        if before == after && !racy {
            let entry = StatEntry {
                path: canonical.to_string_lossy().into_owned(),
                stat: before,
                digest: digest.clone(),
            };
            if let Ok(json) = serde_json::to_vec(&entry) {
                // A lost entry only costs a rehash next time, so no fsync.
                write_atomic(&entry_path, &json, false)?;
            }
        }
        Ok(digest)
    }
}

impl Cache {
    /// Stat entries that can never be used again: unreadable, or naming a path that is
    /// gone or no longer matches its recorded stat. gc sweeps them.
    pub(crate) fn stale_stat_entries(&self) -> Result<Vec<PathBuf>, CacheError> {
        let directory = self.sub("stat");
        let mut stale = Vec::new();
        for entry in fs::read_dir(&directory).at(&directory)? {
            let path = entry.at(&directory)?.path();
            let usable = read_entry(&path).is_some_and(|entry| {
                fs::metadata(&entry.path).is_ok_and(|m| file_stat(&m) == entry.stat)
            });
            if !usable {
                stale.push(path);
            }
        }
        stale.sort();
        Ok(stale)
    }
}

/// A stat entry, or `None` when missing or unreadable (it is only a cache).
fn read_entry(path: &Path) -> Option<StatEntry> {
    let bytes = fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(unix)]
fn path_bytes(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().to_vec()
}

#[cfg(not(unix))]
fn path_bytes(path: &Path) -> Vec<u8> {
    path.to_string_lossy().into_owned().into_bytes()
}
