//! What a running stage sees: its inputs as paths, its output directories, a scratch
//! directory that survives a killed run (for checkpoints), its seed, a metrics sink and
//! a progress reporter. Stages never learn where the cache is beyond these paths.

use crate::artifact::ArtifactKind;
use crate::metrics::MetricsSink;
use crate::progress::Progress;
use crate::stage::StageError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// An input resolved for a run: an upstream artifact in the cache, or an external
/// file or folder.
#[derive(Clone, Debug)]
pub struct InputArtifact {
    /// Read-only: never write into an input.
    pub path: PathBuf,
    /// `None` for external files and folders.
    pub kind: Option<ArtifactKind>,
    /// Content digest (blake3 hex).
    pub digest: String,
    /// The reference as written in the pipeline.
    pub reference: String,
}

/// Looks up artifacts in the cache by digest, e.g. the base model an adapter names.
pub trait ArtifactLookup: Send + Sync {
    fn artifact_path(&self, digest: &str) -> Option<PathBuf>;
}

pub struct StageContext {
    pub stage: String,
    pub kind: String,
    /// Derived from the pipeline seed and the stage name; the only randomness a stage may use.
    pub seed: u64,
    /// Threads the stage may use for compute (excluded from the key: results must not
    /// depend on it for deterministic kinds, and where they do the lock file says so).
    pub threads: usize,
    /// Survives a killed run; emptied once the stage's outputs are committed.
    pub scratch: PathBuf,
    pub metrics: MetricsSink,
    pub progress: Progress,
    inputs: BTreeMap<String, InputArtifact>,
    outputs: BTreeMap<String, PathBuf>,
    lookup: Option<Box<dyn ArtifactLookup>>,
}

impl StageContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stage: &str,
        kind: &str,
        seed: u64,
        threads: usize,
        scratch: PathBuf,
        inputs: BTreeMap<String, InputArtifact>,
        outputs: BTreeMap<String, PathBuf>,
        metrics: MetricsSink,
        progress: Progress,
        lookup: Option<Box<dyn ArtifactLookup>>,
    ) -> Self {
        StageContext {
            stage: stage.to_string(),
            kind: kind.to_string(),
            seed,
            threads,
            scratch,
            metrics,
            progress,
            inputs,
            outputs,
            lookup,
        }
    }

    /// The input declared under `name` in [`crate::stage::Ports`].
    pub fn input(&self, name: &str) -> Result<&InputArtifact, StageError> {
        self.inputs.get(name).ok_or_else(|| {
            StageError::failed(format!(
                "stage `{}` has no input named `{name}` (declared: {})",
                self.stage,
                self.inputs.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    pub fn inputs(&self) -> &BTreeMap<String, InputArtifact> {
        &self.inputs
    }

    /// The (initially empty) directory of the output declared under `name`.
    pub fn output_dir(&self, name: &str) -> Result<&Path, StageError> {
        self.outputs.get(name).map(PathBuf::as_path).ok_or_else(|| {
            StageError::failed(format!(
                "stage `{}` has no output named `{name}` (declared: {})",
                self.stage,
                self.outputs.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    pub fn outputs(&self) -> &BTreeMap<String, PathBuf> {
        &self.outputs
    }

    /// The cached artifact with this digest, if the cache holds it.
    pub fn artifact_path(&self, digest: &str) -> Option<PathBuf> {
        self.lookup.as_ref().and_then(|l| l.artifact_path(digest))
    }
}
