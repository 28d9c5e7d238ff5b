//! The seam through which `hf://` references reach the engine. The engine treats a
//! hub repository like any external folder (hashed by content, recorded in the lock
//! file with its resolved revision) but leaves fetching it to an implementation that
//! lives outside this crate (hf-hub in `rlhf-stages`).

use std::path::PathBuf;

/// A hub reference resolved to local files.
#[derive(Clone, Debug)]
pub struct ResolvedHub {
    /// A local folder (or file) holding the repository's files at `revision`.
    pub local_path: PathBuf,
    /// The commit the reference resolved to (recorded in the lock file).
    pub revision: String,
}

/// Why a hub reference could not be resolved: a message and a hint saying what to do
/// (e.g. "offline and not cached: point `--set base.model=` at a local folder").
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct HubError {
    pub message: String,
    pub hint: Option<String>,
}

pub trait HubResolver: Send + Sync {
    /// Resolves `hf://org/name[@revision]` (a model) or
    /// `hf://datasets/org/name[@revision][/path/in/repo]` (a dataset or one file of it),
    /// fetching what is missing unless offline.
    fn resolve(&self, reference: &str) -> Result<ResolvedHub, HubError>;
}
