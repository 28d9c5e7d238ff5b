//! `rlhf label FILE --stage STAGE`: serves the labelling page of a `collect_preferences`
//! stage whose judge is `human`, on 127.0.0.1, until Ctrl-C (every label is already on disk).

use super::{load, print_error};
use rlhf_engine::run::exit;
use rlhf_stages::label::items::read_items;
use rlhf_stages::label::log::LabelLog;
use rlhf_stages::label::server::LabelServer;
use rlhf_stages::label::{items_path, HumanJudge};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct LabelOptions {
    pub stage: String,
    pub port: u16,
    pub labeller: Option<String>,
}

pub fn label(file: &Path, overrides: &[String], options: &LabelOptions) -> i32 {
    let registry = rlhf_stages::registry();
    let pipeline = match load(file, overrides, &registry) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let judge = match human_judge(&pipeline, &options.stage) {
        Ok(judge) => judge,
        Err((message, hint)) => {
            print_error(&message, Some(&hint));
            return exit::INVALID;
        }
    };
    let labels = PathBuf::from(&judge.labels);
    let items_file = items_path(&labels);
    let items = match read_items(&items_file) {
        Ok(items) => items,
        Err(e) => {
            let hint = format!(
                "run `rlhf run {}` first: it samples the pairs to label and stops at `{}`",
                file.display(),
                options.stage
            );
            print_error(&e.to_string(), Some(&hint));
            return exit::STAGE_FAILED;
        }
    };
    let log = match LabelLog::open(&labels) {
        Ok(log) => log,
        Err(e) => {
            print_error(
                &e.to_string(),
                Some("open the page of the server already running; several labellers can share it"),
            );
            return exit::STAGE_FAILED;
        }
    };
    let (server, port) = match LabelServer::bind(options.port) {
        Ok(bound) => bound,
        Err(e) => {
            print_error(
                &e.to_string(),
                Some("pick another port with --port (0 picks a free one)"),
            );
            return exit::STAGE_FAILED;
        }
    };
    let query = options
        .labeller
        .as_deref()
        .map(|n| format!("?labeller={}", percent_encode(n)))
        .unwrap_or_default();
    eprintln!(
        "{}: {} pairs to label; labels are appended to {} (Ctrl-C stops; nothing is lost)",
        options.stage,
        items.len(),
        labels.display()
    );
    println!("http://127.0.0.1:{port}/{query}");
    let _ = std::io::stdout().flush();
    let mut labelling = LabelServer::new(items, log, judge.labels_per_item);
    match labelling.serve(&server, port) {
        Ok(()) => exit::OK,
        Err(e) => {
            print_error(&e.to_string(), None);
            exit::STAGE_FAILED
        }
    }
}

/// The human judge of `stage`, or why the stage has none.
fn human_judge(
    pipeline: &rlhf_engine::check::Pipeline,
    stage: &str,
) -> Result<HumanJudge, (String, String)> {
    let names: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
    let Some(found) = pipeline.stages.iter().find(|s| s.name == stage) else {
        return Err((
            format!("no stage named `{stage}` in {}", pipeline.file.display()),
            format!("stages: {}", names.join(", ")),
        ));
    };
    let judge = found
        .params
        .get("judge")
        .filter(|j| j.get("kind").and_then(|k| k.as_str()) == Some("human"));
    let not_human = || {
        (
            format!("stage `{stage}` is not a `collect_preferences` stage with `judge: {{ kind: human, … }}`"),
            "label the stage whose judge is `{ kind: human, labels: labels/STAGE.jsonl }`".to_string(),
        )
    };
    let judge = judge
        .filter(|_| found.kind == "collect_preferences")
        .ok_or_else(not_human)?;
    let mut judge = judge.clone();
    if let Some(map) = judge.as_object_mut() {
        map.remove("kind");
    }
    serde_json::from_value(judge).map_err(|e| {
        (
            format!("stage `{stage}`: judge: {e}"),
            "see `rlhf schema`".to_string(),
        )
    })
}

/// Percent-encodes a labeller name for the printed URL.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
