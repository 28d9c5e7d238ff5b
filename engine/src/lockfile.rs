//! The lock file `<pipeline>.lock` beside a pipeline: the resolved external inputs and,
//! per stage, its key, input digests and output digests. Sorted, versioned, pretty JSON,
//! so it reads well in a diff and a shared recipe plus its lock can be checked elsewhere
//! (`rlhf run --locked`, `rlhf run --verify`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const LOCK_FORMAT: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    pub lock_format: u32,
    pub pipeline: String,
    /// Reference as written (`data/raw.csv`, `hf://org/name`) → what it resolved to.
    pub externals: BTreeMap<String, LockedExternal>,
    pub stages: BTreeMap<String, LockedStage>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedExternal {
    pub digest: String,
    /// The commit a hub reference resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedStage {
    pub kind: String,
    pub key: String,
    pub inputs: BTreeMap<String, String>,
    pub outputs: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot read the lock file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the lock file {path} is not a valid rlhf lock file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot write the lock file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `pipelines/x.yaml` → `pipelines/x.lock`.
pub fn lock_path(pipeline_file: &Path) -> PathBuf {
    pipeline_file.with_extension("lock")
}

pub fn read(path: &Path) -> Result<Option<LockFile>, LockError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LockError::Read {
                path: path.into(),
                source,
            })
        }
    };
    let lock: LockFile = serde_json::from_str(&text).map_err(|e| LockError::Invalid {
        path: path.into(),
        reason: e.to_string(),
    })?;
    if lock.lock_format != LOCK_FORMAT {
        return Err(LockError::Invalid {
            path: path.into(),
            reason: format!(
                "lock_format {} (this rlhf reads {LOCK_FORMAT})",
                lock.lock_format
            ),
        });
    }
    Ok(Some(lock))
}

/// Writes atomically (temp file in the same folder, fsync, rename).
pub fn write(path: &Path, lock: &LockFile) -> Result<(), LockError> {
    let err = |source| LockError::Write {
        path: path.into(),
        source,
    };
    let text =
        serde_json::to_string_pretty(lock).map_err(|e| err(std::io::Error::other(e)))? + "\n";
    if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
        return Ok(());
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(err)?;
    std::io::Write::write_all(&mut tmp, text.as_bytes()).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}
