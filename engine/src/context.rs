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
    /// Threads the stage may use for compute. Excluded from the key (see key.rs).
    pub threads: usize,
    /// Survives a killed run, so a stage can checkpoint here and resume; emptied once the
    /// stage's outputs are committed.
    pub scratch: PathBuf,
    /// Kept after the run, failed or not: logs of external programs, timings.
    pub log_dir: PathBuf,
    pub metrics: MetricsSink,
    pub progress: Progress,
    inputs: BTreeMap<String, InputArtifact>,
    outputs: BTreeMap<String, PathBuf>,
    lookup: Option<Box<dyn ArtifactLookup>>,
}

impl StageContext {
    /// A context with no inputs or outputs, a quiet progress reporter and a discarding
    /// metrics sink; the engine (or a test) fills in the rest with the `with_*` methods.
    pub fn new(stage: &str, kind: &str, seed: u64, scratch: PathBuf, log_dir: PathBuf) -> Self {
        StageContext {
            stage: stage.to_string(),
            kind: kind.to_string(),
            seed,
            threads: 1,
            scratch,
            log_dir,
            metrics: MetricsSink::discard(),
            progress: Progress::quiet(),
            inputs: BTreeMap::new(),
            outputs: BTreeMap::new(),
            lookup: None,
        }
    }

    pub fn with_input(mut self, name: &str, input: InputArtifact) -> Self {
        self.inputs.insert(name.to_string(), input);
        self
    }

    pub fn with_output(mut self, name: &str, dir: PathBuf) -> Self {
        self.outputs.insert(name.to_string(), dir);
        self
    }

    pub fn with_metrics(mut self, metrics: MetricsSink) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    pub fn with_lookup(mut self, lookup: Box<dyn ArtifactLookup>) -> Self {
        self.lookup = Some(lookup);
        self
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
