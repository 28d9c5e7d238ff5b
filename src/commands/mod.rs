//! One module per group of CLI commands, and how errors are printed.

pub mod cache;
pub mod generate;
pub mod inspect;
pub mod label;
pub mod report;
pub mod run;
pub mod status;

use rlhf_engine::check::{CheckedStage, Pipeline};
use rlhf_engine::diagnostic::PipelineError;
use rlhf_engine::hub::HubResolver;
use rlhf_engine::run::{exit, Engine, RunError};
use std::path::Path;

/// What the commands that look at a pipeline against the cache share: this binary's
/// stage kinds, the checked pipeline, the cache and hub access.
pub struct Workspace {
    pub registry: rlhf_engine::Registry,
    pub pipeline: Pipeline,
    pub cache: rlhf_cache::Cache,
    hub: Option<Box<dyn HubResolver>>,
}

impl Workspace {
    /// Loads and checks `file` with `overrides`, and opens the cache; on failure the
    /// error is printed and the exit code returned.
    pub fn open(file: &Path, overrides: &[String], cache_dir: &Path) -> Result<Self, i32> {
        let registry = rlhf_stages::registry();
        let pipeline = load(file, overrides, &registry)?;
        let cache = open_cache(cache_dir)?;
        Ok(Workspace {
            registry,
            pipeline,
            cache,
            hub: rlhf_stages::hub_resolver(),
        })
    }

    pub fn engine(&self) -> Engine<'_> {
        Engine::new(&self.registry, self.cache.clone(), self.hub.as_deref())
    }

    /// The stage named `name`; otherwise prints the nearest name and returns exit 2.
    pub fn stage(&self, name: &str) -> Result<&CheckedStage, i32> {
        self.pipeline.stage(name).ok_or_else(|| {
            let names = self.pipeline.stages.iter().map(|s| s.name.as_str());
            let hint = rlhf_engine::diagnostic::nearest(name, names)
                .map(|n| format!("did you mean `{n}`?"));
            print_error(
                &format!(
                    "no stage named `{name}` in {}",
                    self.pipeline.file.display()
                ),
                hint.as_deref(),
            );
            exit::INVALID
        })
    }
}

/// Prints `error:` / `hint:` lines on stderr.
pub fn print_error(message: &str, hint: Option<&str>) {
    eprintln!("error: {message}");
    if let Some(hint) = hint {
        eprintln!("hint: {hint}");
    }
}

pub fn print_pipeline_error(error: &PipelineError) -> i32 {
    let n = error.diagnostics.len();
    for d in &error.diagnostics {
        eprintln!("error: {d}");
    }
    if n > 1 {
        eprintln!("{n} problems found; nothing was run");
    }
    exit::INVALID
}

pub fn print_run_error(error: &RunError) -> i32 {
    match error {
        RunError::Invalid { message, hint } => {
            print_error(message, hint.as_deref());
            exit::INVALID
        }
        other => {
            print_error(&other.to_string(), None);
            exit::STAGE_FAILED
        }
    }
}

/// Loads and checks a pipeline with the stage kinds of this binary.
pub fn load(
    file: &Path,
    overrides: &[String],
    registry: &rlhf_engine::Registry,
) -> Result<rlhf_engine::check::Pipeline, i32> {
    rlhf_engine::load_pipeline(file, overrides, registry).map_err(|e| print_pipeline_error(&e))
}

pub fn open_cache(dir: &Path) -> Result<rlhf_cache::Cache, i32> {
    rlhf_cache::Cache::open(dir).map_err(|e| {
        print_error(
            &format!("cannot open the cache at {}: {e}", dir.display()),
            Some("pass a writable folder with --cache-dir or RLHF_CACHE_DIR"),
        );
        exit::STAGE_FAILED
    })
}

/// Prints one JSON value per line on stdout.
pub fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("error: cannot print JSON: {e}"),
    }
}
