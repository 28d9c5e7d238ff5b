//! The rlhf engine: pipeline files in, a checked DAG of stages out, run against a
//! content-addressed cache so that only what changed reruns. It knows no ML: stage
//! kinds plug in through [`stage::Stage`] and the [`registry::Registry`].

pub mod artifact;
pub mod check;
pub mod context;
pub mod diagnostic;
pub mod graph;
pub mod hub;
pub mod key;
pub mod lockfile;
pub mod metrics;
pub mod overrides;
pub mod progress;
pub mod registry;
pub mod run;
pub mod schema;
pub mod spec;
pub mod stage;
pub mod status;
pub mod yaml;

pub use artifact::ArtifactKind;
pub use context::{InputArtifact, StageContext};
pub use registry::{Registry, StageKind};
pub use stage::{ExternalPolicy, InputPort, OutputPort, Ports, PortsError, Stage, StageError};

use std::path::Path;

/// Reads, overrides and checks a pipeline file: everything `rlhf` does before running.
pub fn load_pipeline(
    file: &Path,
    overrides: &[String],
    registry: &Registry,
) -> Result<check::Pipeline, diagnostic::PipelineError> {
    let mut raw = spec::load(file)?;
    overrides::apply(&mut raw, overrides)?;
    check::check(&raw, registry)
}
