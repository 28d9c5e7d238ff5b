//! The cache directory: its versioned layout, and the per-key directories the engine
//! hands to stages (staging dirs for outputs, scratch dirs for checkpoints, log dirs).
//!
//! Layout, everything under `<dir>/v1/` so a future format can live beside it:
//!
//! ```text
//! objects/<digest>/                 artifact (files read-only), immutable
//! objects/<digest>.manifest.json    written after the directory is in place: no manifest = Missing
//! records/<key>.json                action record: key -> outputs, metrics, timings
//! locks/<key>.lock                  per-key lock (flock); locks/objects/<digest>.lock per artifact
//! cache.lock                        shared by runs, exclusive for gc / verify
//! scratch/<key>/                    checkpoints that survive a killed run
//! staging/<name>/ + <name>.lock     outputs being built; swept by gc once their lock is free
//! logs/<key>/                       stdout/stderr of command stages, timings.jsonl
//! stat/<blake3(path)>.json          stat cache of external inputs
//! roots/<blake3(path)>.json         lock files that use this cache (gc roots)
//! quarantine/                       artifacts being deleted (moved here first, atomically)
//! ```

use crate::error::{CacheError, IoResultExt};
use crate::fsutil::{self, remove_dir_all_if_exists, remove_file_if_exists, validate_key};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

/// Bumped when the on-disk layout changes incompatibly; everything lives under `v<N>/`.
pub const LAYOUT_VERSION: u32 = 1;

pub(crate) const SUBDIRS: [&str; 9] = [
    "objects",
    "records",
    "locks",
    "scratch",
    "staging",
    "logs",
    "stat",
    "roots",
    "quarantine",
];

/// A cache directory. Cheap to open; every method works on the filesystem directly, so
/// several processes may use one cache at once (see the locking methods).
#[derive(Clone, Debug)]
pub struct Cache {
    dir: PathBuf,
    root: PathBuf,
    /// `root` with symlinks resolved: one name per cache for in-process lock bookkeeping.
    canonical_root: PathBuf,
}

impl Cache {
    /// Opens (creating if needed) the cache at `dir`.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        let root = dir.join(format!("v{LAYOUT_VERSION}"));
        for sub in SUBDIRS {
            let path = root.join(sub);
            fs::create_dir_all(&path).at(&path)?;
        }
        let object_locks = root.join("locks").join("objects");
        fs::create_dir_all(&object_locks).at(&object_locks)?;
        let canonical_root = fs::canonicalize(&root).at(&root)?;
        Ok(Cache {
            dir: dir.to_path_buf(),
            root,
            canonical_root,
        })
    }

    /// The directory given to [`Cache::open`].
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `v1/cache.lock`, by its canonical path.
    pub(crate) fn cache_lock_path(&self) -> PathBuf {
        self.canonical_root.join("cache.lock")
    }

    /// `<dir>/v1/<sub>`.
    pub(crate) fn sub(&self, sub: &str) -> PathBuf {
        self.root.join(sub)
    }

    /// A fresh empty directory under `v1/staging` (same filesystem as the store, so the
    /// commit is a rename). Removed on drop unless committed.
    pub fn staging_dir(&self) -> Result<StagingDir, CacheError> {
        let staging = self.sub("staging");
        let name = fsutil::unique_name("stage-");
        // Lock first, then create the directory, so gc never sees an unlocked live dir.
        let lock_path = staging.join(format!("{name}.lock"));
        let lock = open_lock_file(&lock_path)?;
        lock.lock().at(&lock_path)?;
        let path = staging.join(&name);
        fs::create_dir(&path).at(&path)?;
        Ok(StagingDir {
            path,
            lock_path,
            lock: Some(lock),
            committed: false,
        })
    }

    /// `v1/scratch/<key>`, created if missing. It survives crashes (checkpoints for resume);
    /// the engine clears it once the stage's outputs are committed.
    pub fn scratch_dir(&self, key: &str) -> Result<PathBuf, CacheError> {
        validate_key(key)?;
        let path = self.sub("scratch").join(key);
        fs::create_dir_all(&path).at(&path)?;
        Ok(path)
    }

    /// Deletes `v1/scratch/<key>` (missing is fine).
    pub fn clear_scratch(&self, key: &str) -> Result<(), CacheError> {
        validate_key(key)?;
        remove_dir_all_if_exists(&self.sub("scratch").join(key))
    }

    /// `v1/logs/<key>`, created if missing: stdout/stderr of command stages, timings.jsonl.
    pub fn log_dir(&self, key: &str) -> Result<PathBuf, CacheError> {
        validate_key(key)?;
        let path = self.sub("logs").join(key);
        fs::create_dir_all(&path).at(&path)?;
        Ok(path)
    }

    /// Moves `path` (a directory under this cache) into `v1/quarantine` with one atomic
    /// rename, then deletes it there; a crash in between leaves only quarantine garbage.
    pub(crate) fn quarantine_and_delete(&self, path: &Path) -> Result<(), CacheError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = self
            .sub("quarantine")
            .join(fsutil::unique_name(&format!("{name}-")));
        match fs::rename(path, &target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(CacheError::io(path, e)),
        }
        remove_dir_all_if_exists(&target)
    }
}

/// Opens (creating) a lock file for reading and writing.
pub(crate) fn open_lock_file(path: &Path) -> Result<File, CacheError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .at(path)
}

/// A directory where a stage builds one output. Committed with
/// [`Cache::commit_artifact`]; otherwise removed on drop.
#[derive(Debug)]
pub struct StagingDir {
    pub(crate) path: PathBuf,
    lock_path: PathBuf,
    lock: Option<File>,
    pub(crate) committed: bool,
}

impl StagingDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        // Directory first, lock file last: a crash in between leaves an orphan lock
        // file (swept by gc), never an unlocked half-built directory.
        if !self.committed {
            let _ = remove_dir_all_if_exists(&self.path);
        }
        let _ = remove_file_if_exists(&self.lock_path);
        self.lock.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_creates_the_versioned_layout() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        for sub in SUBDIRS {
            assert!(dir.path().join("v1").join(sub).is_dir(), "{sub} missing");
        }
        assert_eq!(cache.dir(), dir.path());
    }

    #[test]
    fn uncommitted_staging_dir_is_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let staging = cache.staging_dir().unwrap();
        let path = staging.path().to_path_buf();
        fs::write(path.join("f"), b"x").unwrap();
        assert!(path.starts_with(dir.path().join("v1/staging")));
        drop(staging);
        assert!(!path.exists());
        assert_eq!(
            fs::read_dir(dir.path().join("v1/staging")).unwrap().count(),
            0
        );
    }

    #[test]
    fn scratch_dir_survives_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let scratch = cache.scratch_dir("k1").unwrap();
        fs::write(scratch.join("ckpt"), b"1").unwrap();
        let again = Cache::open(dir.path()).unwrap().scratch_dir("k1").unwrap();
        assert_eq!(fs::read(again.join("ckpt")).unwrap(), b"1");
        cache.clear_scratch("k1").unwrap();
        assert!(!scratch.exists());
        assert!(cache.scratch_dir("../escape").is_err());
    }
}
