//! One module per group of CLI commands, and how errors are printed.

pub mod cache;
pub mod generate;
pub mod inspect;
pub mod label;
pub mod report;
pub mod run;
pub mod status;

use rlhf_engine::diagnostic::PipelineError;
use rlhf_engine::run::{exit, RunError};
use std::path::Path;

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
