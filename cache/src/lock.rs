//! Inter-process locks on the cache, built on `std::fs::File::lock` (flock on Linux).
//!
//! - A *key lock* (`v1/locks/<key>.lock`, exclusive) serialises the work on one stage key:
//!   the engine takes it, re-reads the record (another run may have finished the stage
//!   meanwhile), and runs the stage only on a miss.
//! - The *cache lock* (`v1/cache.lock`) is held shared by every run for its whole
//!   duration, and exclusively by gc and verify, so they never delete under a running run.
//!   gc and verify take it themselves (failing with [`CacheError::Busy`] while a run
//!   holds it), or run under the caller's when this process already holds it exclusively.
//!
//! flock locks belong to an open file description: two `lock_key` calls for one key
//! conflict even inside one process (so threads are serialised too), and taking the
//! same lock twice from one thread blocks forever. Locks are released on drop, and by
//! the kernel when a process dies, so a killed run never leaves a stale lock. Lock
//! files are never deleted while the cache is in use: deleting a lock file that a
//! waiter has open would let two holders in.

use crate::error::{CacheError, IoResultExt};
use crate::fsutil::validate_key;
use crate::store::{open_lock_file, Cache};
use std::collections::BTreeMap;
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Exclusive lock on one stage key; released on drop.
#[derive(Debug)]
pub struct KeyLock {
    key: String,
    path: PathBuf,
    _file: File,
}

impl KeyLock {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lock file, for messages ("waiting for another run on `sft` (lock …)").
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Shared or exclusive lock on the whole cache; released on drop.
#[derive(Debug)]
pub struct CacheLock {
    path: PathBuf,
    exclusive: bool,
    _file: File,
}

impl CacheLock {
    fn new(path: PathBuf, exclusive: bool, file: File) -> CacheLock {
        if exclusive {
            let mut holds = exclusive_holds();
            *holds.entry(path.clone()).or_insert(0) += 1;
        }
        CacheLock {
            path,
            exclusive,
            _file: file,
        }
    }

    pub fn is_exclusive(&self) -> bool {
        self.exclusive
    }
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        if self.exclusive {
            let mut holds = exclusive_holds();
            if let Some(count) = holds.get_mut(&self.path) {
                *count -= 1;
                if *count == 0 {
                    holds.remove(&self.path);
                }
            }
        }
    }
}

/// Exclusive cache locks this process holds, by lock-file path, so gc and verify can
/// run under a lock their caller took (a second flock would wait for the first).
fn exclusive_holds() -> MutexGuard<'static, BTreeMap<PathBuf, usize>> {
    static HOLDS: Mutex<BTreeMap<PathBuf, usize>> = Mutex::new(BTreeMap::new());
    // A panic while holding this tiny map cannot leave it inconsistent.
    HOLDS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How long gc and verify keep trying a busy cache before reporting it busy.
const BUSY_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

fn holds_exclusive(path: &Path) -> bool {
    exclusive_holds().get(path).is_some_and(|count| *count > 0)
}

/// Waits until this process holds a lock on `path` (exclusive or shared).
pub(crate) fn acquire(path: &Path, exclusive: bool) -> Result<File, CacheError> {
    let file = open_lock_file(path)?;
    if exclusive {
        file.lock().at(path)?;
    } else {
        file.lock_shared().at(path)?;
    }
    Ok(file)
}

/// Like [`acquire`] without waiting: `None` when another holder has a conflicting lock.
pub(crate) fn try_acquire(path: &Path, exclusive: bool) -> Result<Option<File>, CacheError> {
    let file = open_lock_file(path)?;
    let attempt = if exclusive {
        file.try_lock()
    } else {
        file.try_lock_shared()
    };
    match attempt {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(CacheError::io(path, e)),
    }
}

impl Cache {
    pub(crate) fn key_lock_path(&self, key: &str) -> PathBuf {
        self.sub("locks").join(format!("{key}.lock"))
    }

    /// Blocks until this process holds `v1/locks/<key>.lock` exclusively.
    pub fn lock_key(&self, key: &str) -> Result<KeyLock, CacheError> {
        validate_key(key)?;
        let path = self.key_lock_path(key);
        let file = acquire(&path, true)?;
        Ok(KeyLock {
            key: key.to_string(),
            path,
            _file: file,
        })
    }

    /// Like [`Cache::lock_key`], but `None` instead of waiting when another holder has it.
    pub fn try_lock_key(&self, key: &str) -> Result<Option<KeyLock>, CacheError> {
        validate_key(key)?;
        let path = self.key_lock_path(key);
        Ok(try_acquire(&path, true)?.map(|file| KeyLock {
            key: key.to_string(),
            path,
            _file: file,
        }))
    }

    /// Held (shared) by a run for its whole duration; many runs may hold it at once.
    pub fn lock_shared(&self) -> Result<CacheLock, CacheError> {
        let path = self.cache_lock_path();
        let file = acquire(&path, false)?;
        Ok(CacheLock::new(path, false, file))
    }

    /// Blocks until no run holds the cache. gc and verify need it; they take it
    /// themselves, or run under this one when the caller already holds it.
    pub fn lock_exclusive(&self) -> Result<CacheLock, CacheError> {
        let path = self.cache_lock_path();
        let file = acquire(&path, true)?;
        Ok(CacheLock::new(path, true, file))
    }

    /// The exclusive cache lock if no run holds the cache, `None` otherwise.
    pub fn try_lock_exclusive(&self) -> Result<Option<CacheLock>, CacheError> {
        let path = self.cache_lock_path();
        Ok(try_acquire(&path, true)?.map(|file| CacheLock::new(path, true, file)))
    }

    /// For gc and verify: `None` when this process already holds the exclusive cache
    /// lock (the caller took [`Cache::lock_exclusive`] first), the lock when it is free,
    /// and [`CacheError::Busy`] naming the cache while a run holds it.
    pub(crate) fn exclusive_or_busy(&self) -> Result<Option<CacheLock>, CacheError> {
        if holds_exclusive(&self.cache_lock_path()) {
            return Ok(None);
        }
        // A lock this process has just released can look held for a moment: a child
        // that another thread is spawning shares the lock file's description until it
        // execs. So a busy cache is tried again for a short while before giving up.
        let deadline = std::time::Instant::now() + BUSY_GRACE;
        loop {
            if let Some(lock) = self.try_lock_exclusive()? {
                return Ok(Some(lock));
            }
            if std::time::Instant::now() >= deadline {
                return Err(CacheError::Busy {
                    path: self.dir().to_path_buf(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
