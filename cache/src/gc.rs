//! Garbage collection: GC roots (the lock files that use this cache), and `gc`, which
//! deletes every record and artifact the caller does not keep, plus leftovers of
//! crashed runs (staging dirs, scratch and log dirs of dropped keys, quarantine) and
//! stat-cache entries of files that are gone or changed.

use crate::digest::{is_digest, walk_files, Digest, SymlinkPolicy};
use crate::error::{CacheError, IoResultExt};
use crate::fsutil::{
    remove_dir_all_if_exists, remove_file_if_exists, validate_key, write_atomic, TEMP_PREFIX,
};
use crate::lock::try_acquire;
use crate::store::Cache;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What [`Cache::gc`] deleted (or, on a dry run, would delete).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GcReport {
    /// Keys of dropped records.
    pub records: Vec<String>,
    /// Dropped artifacts and their sizes in bytes.
    pub artifacts: Vec<(Digest, u64)>,
    /// Total bytes of the dropped artifacts.
    pub bytes: u64,
    /// False for a dry run: nothing was deleted.
    pub applied: bool,
    /// Leftovers swept: staging dirs of dead runs, scratch and log dirs of dropped keys,
    /// quarantine, stale roots and stat entries, lock files of dropped keys, manifests
    /// left without their directory.
    pub swept: Vec<PathBuf>,
}

/// Temp files younger than this may belong to a writer that is still running.
const TEMP_FILE_MIN_AGE: Duration = Duration::from_secs(600);

#[derive(Serialize, Deserialize)]
struct RootEntry {
    lock_file: PathBuf,
}

impl Cache {
    /// Records the absolute path of a lock file that uses this cache (`v1/roots/`).
    pub fn register_root(&self, lock_file: &Path) -> Result<(), CacheError> {
        let absolute = absolute_path(lock_file)?;
        let name = blake3::hash(absolute.to_string_lossy().as_bytes()).to_hex();
        let path = self.sub("roots").join(format!("{name}.json"));
        let entry = RootEntry {
            lock_file: absolute,
        };
        let json =
            serde_json::to_vec_pretty(&entry).map_err(|e| CacheError::io(&path, e.into()))?;
        write_atomic(&path, &json, true)
    }

    /// Registered lock files that still exist, sorted.
    pub fn roots(&self) -> Result<Vec<PathBuf>, CacheError> {
        Ok(self
            .root_entries()?
            .into_iter()
            .filter(|(_, lock_file)| lock_file.is_file())
            .map(|(_, lock_file)| lock_file)
            .collect())
    }

    /// (entry file, lock file) of every readable root entry, sorted by lock file.
    fn root_entries(&self) -> Result<Vec<(PathBuf, PathBuf)>, CacheError> {
        let directory = self.sub("roots");
        let mut entries = Vec::new();
        for entry in fs::read_dir(&directory).at(&directory)? {
            let path = entry.at(&directory)?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let parsed = fs::read(&path)
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<RootEntry>(&bytes).ok());
                if let Some(root) = parsed {
                    entries.push((path, root.lock_file));
                }
            }
        }
        entries.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(entries)
    }

    /// Deletes every record whose key is not in `keep_keys` and every artifact that is
    /// neither in `keep_artifacts` nor an output of a kept record; sweeps leftovers (see
    /// [`GcReport::swept`]), skipping anything whose lock is held. With `apply == false`
    /// nothing is deleted and the report says what would be. Applying takes the
    /// exclusive cache lock ([`CacheError::Busy`] while a run holds the cache; the caller
    /// must not hold a [`crate::CacheLock`] itself).
    pub fn gc(
        &self,
        keep_keys: &BTreeSet<String>,
        keep_artifacts: &BTreeSet<Digest>,
        apply: bool,
    ) -> Result<GcReport, CacheError> {
        let _exclusive = if apply {
            Some(self.exclusive_or_busy()?)
        } else {
            None
        };
        let mut report = GcReport {
            applied: apply,
            ..GcReport::default()
        };
        let mut kept_artifacts = keep_artifacts.clone();
        for key in self.record_keys()? {
            if keep_keys.contains(&key) {
                if let Ok(Some(record)) = self.read_record(&key) {
                    kept_artifacts.extend(record.outputs.into_values());
                }
            } else {
                if apply {
                    self.remove_record(&key)?;
                }
                report.records.push(key);
            }
        }
        self.collect_artifacts(&kept_artifacts, &mut report)?;
        self.sweep_staging(&mut report)?;
        for sub in ["scratch", "logs"] {
            self.sweep_key_dirs(sub, keep_keys, &mut report)?;
        }
        self.sweep_lock_files(keep_keys, &mut report)?;
        self.sweep_quarantine_and_roots(&mut report)?;
        Ok(report)
    }

    fn collect_artifacts(
        &self,
        kept: &BTreeSet<Digest>,
        report: &mut GcReport,
    ) -> Result<(), CacheError> {
        for digest in self.object_digests()? {
            if kept.contains(&digest) {
                continue;
            }
            let bytes = match self.read_manifest(&digest) {
                Ok(Some(manifest)) => manifest.bytes(),
                _ => directory_bytes(&self.artifact_path(&digest)),
            };
            if report.applied {
                self.remove_artifact(&digest)?;
            }
            report.bytes += bytes;
            report.artifacts.push((digest, bytes));
        }
        // Manifests left without their directory (a removal cut short).
        let objects = self.sub("objects");
        for entry in fs::read_dir(&objects).at(&objects)? {
            let path = entry.at(&objects)?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(digest) = name.strip_suffix(".manifest.json") {
                if is_digest(digest) && !self.artifact_path(digest).exists() {
                    self.sweep_path(&path, report)?;
                }
            }
        }
        Ok(())
    }

    /// Staging dirs whose lock is free belong to runs that died.
    fn sweep_staging(&self, report: &mut GcReport) -> Result<(), CacheError> {
        let staging = self.sub("staging");
        for entry in fs::read_dir(&staging).at(&staging)? {
            let path = entry.at(&staging)?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(directory) = name.strip_suffix(".lock") {
                // A lock file whose directory is gone (committed, or removed by a run
                // that died before deleting the lock file).
                if !staging.join(directory).exists() {
                    if let Some(_lock) = try_acquire(&path, true)? {
                        self.sweep_path(&path, report)?;
                    }
                }
                continue;
            }
            let lock_path = staging.join(format!("{name}.lock"));
            if let Some(_lock) = try_acquire(&lock_path, true)? {
                self.sweep_path(&path, report)?;
                if report.applied {
                    remove_file_if_exists(&lock_path)?;
                }
            }
        }
        Ok(())
    }

    /// `scratch/<key>` and `logs/<key>` of keys not kept and not locked by a run.
    fn sweep_key_dirs(
        &self,
        sub: &str,
        keep_keys: &BTreeSet<String>,
        report: &mut GcReport,
    ) -> Result<(), CacheError> {
        let directory = self.sub(sub);
        for entry in fs::read_dir(&directory).at(&directory)? {
            let path = entry.at(&directory)?.path();
            let key = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if keep_keys.contains(&key) || validate_key(&key).is_err() {
                continue;
            }
            if let Some(_lock) = self.try_lock_key(&key)? {
                self.sweep_path(&path, report)?;
            }
        }
        Ok(())
    }

    /// Lock files of dropped keys. Safe only because gc holds the exclusive cache lock, so
    /// no run (which holds it shared) can be waiting on them.
    fn sweep_lock_files(
        &self,
        keep_keys: &BTreeSet<String>,
        report: &mut GcReport,
    ) -> Result<(), CacheError> {
        let locks = self.sub("locks");
        for entry in fs::read_dir(&locks).at(&locks)? {
            let path = entry.at(&locks)?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let Some(key) = name.strip_suffix(".lock") else {
                continue;
            };
            if keep_keys.contains(key) || validate_key(key).is_err() {
                continue;
            }
            if let Some(_lock) = try_acquire(&path, true)? {
                self.sweep_path(&path, report)?;
            }
        }
        Ok(())
    }

    fn sweep_quarantine_and_roots(&self, report: &mut GcReport) -> Result<(), CacheError> {
        let quarantine = self.sub("quarantine");
        for entry in fs::read_dir(&quarantine).at(&quarantine)? {
            self.sweep_path(&entry.at(&quarantine)?.path(), report)?;
        }
        for (entry, lock_file) in self.root_entries()? {
            if !lock_file.exists() {
                self.sweep_path(&entry, report)?;
            }
        }
        for entry in self.stale_stat_entries()? {
            self.sweep_path(&entry, report)?;
        }
        for sub in ["objects", "records", "stat", "roots"] {
            self.sweep_temp_files(sub, report)?;
        }
        Ok(())
    }

    /// Temp files of atomic writes cut short by a crash. Only old ones: a process that
    /// does not hold the cache lock (e.g. `rlhf status` refreshing the stat cache) may be
    /// writing one right now.
    fn sweep_temp_files(&self, sub: &str, report: &mut GcReport) -> Result<(), CacheError> {
        let directory = self.sub(sub);
        for entry in fs::read_dir(&directory).at(&directory)? {
            let entry = entry.at(&directory)?;
            if !entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                continue;
            }
            let age = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if age.is_some_and(|age| age > TEMP_FILE_MIN_AGE) {
                self.sweep_path(&entry.path(), report)?;
            }
        }
        Ok(())
    }

    /// Lists `path` in the report, and deletes it (file or tree) when applying.
    fn sweep_path(&self, path: &Path, report: &mut GcReport) -> Result<(), CacheError> {
        if report.applied {
            match fs::symlink_metadata(path) {
                Ok(m) if m.is_dir() => remove_dir_all_if_exists(path)?,
                Ok(_) => remove_file_if_exists(path)?,
                Err(_) => return Ok(()),
            }
        }
        report.swept.push(path.to_path_buf());
        Ok(())
    }
}

/// Bytes of the regular files under `path` (0 where unreadable): for objects without a manifest.
fn directory_bytes(path: &Path) -> u64 {
    walk_files(path, SymlinkPolicy::Refuse)
        .map(|files| files.iter().map(|f| f.metadata.len()).sum())
        .unwrap_or(0)
}

/// `path` made absolute, with symlinks resolved in the part that exists.
fn absolute_path(path: &Path) -> Result<PathBuf, CacheError> {
    if let Ok(canonical) = fs::canonicalize(path) {
        return Ok(canonical);
    }
    let absolute = std::path::absolute(path).at(path)?;
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => match fs::canonicalize(parent) {
            Ok(parent) => Ok(parent.join(name)),
            Err(_) => Ok(absolute),
        },
        _ => Ok(absolute),
    }
}
