//! `rlhf validate`, `rlhf dag` and `rlhf schema`: look at pipelines without running.

use super::load;
use rlhf_engine::run::exit;
use std::path::Path;

pub fn validate(file: &Path, overrides: &[String]) -> i32 {
    let registry = rlhf_stages::registry();
    match load(file, overrides, &registry) {
        Ok(pipeline) => {
            eprintln!("{}: ok ({} stages)", file.display(), pipeline.stages.len());
            exit::OK
        }
        Err(code) => code,
    }
}

pub fn dag(file: &Path, overrides: &[String], format: &str) -> i32 {
    let registry = rlhf_stages::registry();
    let pipeline = match load(file, overrides, &registry) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let text = match format {
        "dot" => rlhf_engine::graph::render_dot(&pipeline),
        "mermaid" => rlhf_engine::graph::render_mermaid(&pipeline),
        _ => rlhf_engine::graph::render_text(&pipeline),
    };
    print!("{text}");
    exit::OK
}

pub fn schema() -> i32 {
    let registry = rlhf_stages::registry();
    let schema = rlhf_engine::schema::pipeline_schema(&registry);
    match serde_json::to_string_pretty(&schema) {
        Ok(text) => {
            println!("{text}");
            exit::OK
        }
        Err(e) => {
            super::print_error(&format!("cannot print the schema: {e}"), None);
            exit::STAGE_FAILED
        }
    }
}
