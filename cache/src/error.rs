//! Errors of the cache crate. Every variant names the path, key or digest it is about,
//! and the message carries a `hint:` line where the user can do something about it.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "corrupt cache record {path}: {reason}\n\
         hint: the stage will be recomputed; `rlhf cache verify` removes such records"
    )]
    CorruptRecord { path: PathBuf, reason: String },

    #[error(
        "corrupt artifact manifest {path}: {reason}\n\
         hint: `rlhf cache verify` removes the artifact so the next run recomputes it"
    )]
    CorruptManifest { path: PathBuf, reason: String },

    #[error(
        "symlink {path} inside an artifact\n\
         hint: artifacts must hold regular files only; copy the target instead of linking it"
    )]
    SymlinkInArtifact { path: PathBuf },

    #[error(
        "{path} is neither a regular file nor a directory (socket, fifo or device)\n\
         hint: only regular files and directories can be hashed or stored"
    )]
    UnsupportedFileType { path: PathBuf },

    #[error(
        "{path} is not valid UTF-8\n\
         hint: rename it; digests are defined over UTF-8 relative paths"
    )]
    NonUtf8Path { path: PathBuf },

    #[error("symlink loop at {path}: it leads back to a directory being hashed")]
    SymlinkLoop { path: PathBuf },

    #[error("invalid cache key `{key}`: {reason}")]
    InvalidKey { key: String, reason: String },

    #[error("invalid artifact digest `{digest}`: expected 64 lowercase hex characters")]
    InvalidDigest { digest: String },

    #[error(
        "staging dir {path} does not belong to the cache being committed to\n\
         hint: take the staging dir from the same `Cache` (`Cache::staging_dir`)"
    )]
    ForeignStagingDir { path: PathBuf },

    #[error(
        "the cache {path} is in use by a running `rlhf run`\n\
         hint: wait for it to finish, then retry"
    )]
    Busy { path: PathBuf },
}

impl CacheError {
    /// Wraps an io error with the path it happened on.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> CacheError {
        CacheError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// True for an io error whose cause is a missing file or directory.
    pub fn is_not_found(&self) -> bool {
        matches!(self, CacheError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Attaches a path to io results: `fs::read(p).at(p)?`.
pub(crate) trait IoResultExt<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T, CacheError>;
}

impl<T> IoResultExt<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T, CacheError> {
        self.map_err(|source| CacheError::io(path, source))
    }
}
