//! The labelling server's JSON API without a browser: what it refuses (other hosts, other
//! content types, bad choices, a stale side order, an undo with nothing to undo, a second
//! server on the same labels file) and that the side order a label records is the one shown.

mod common;
mod label_support;

use common::Project;
use label_support::{http, http_with, LabelProcess};
use serde_json::{json, Value};

const PIPELINE: &str = r#"name: label
seed: 3
stages:
  prompts: { kind: dataset, source: data/prompts.jsonl }
  base:
    kind: load_pretrained
    init: { hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
            intermediate_size: 64, max_position_embeddings: 64, tokenizer: "TOKENIZER" }
  prefs:
    kind: collect_preferences
    policy: base
    prompts: prompts
    judge: { kind: human, labels: labels/prefs.jsonl }
"#;

/// A project whose items file is written by hand (two items), and its server.
fn serving() -> Option<(Project, LabelProcess)> {
    let tokenizer = rlhf_stages::testing::shared_path("bench/trl/tokenizer")?;
    let project = Project::new();
    project.write("data/prompts.jsonl", "{\"prompt\": \"p\"}\n");
    project.write(
        "p.yaml",
        &PIPELINE.replace("TOKENIZER", &tokenizer.display().to_string()),
    );
    let items = [
        json!({ "id": "00000000000000a1", "prompt": "p", "first": "one", "second": "two" }),
        json!({ "id": "00000000000000a2", "prompt": "p", "first": "three", "second": "four" }),
    ];
    project.write(
        "labels/prefs.items.jsonl",
        &format!("{}\n{}\n", items[0], items[1]),
    );
    let server = LabelProcess::start(
        project.command(&["label", "p.yaml", "--stage", "prefs", "--port", "0"]),
    );
    Some((project, server))
}

fn post(server: &LabelProcess, path: &str, body: Value) -> (u16, Value) {
    let (code, _, text) = http("POST", server.port, path, Some(&body.to_string()));
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn the_api_refuses_other_hosts_other_content_types_and_bad_labels() {
    let Some((project, server)) = serving() else {
        return;
    };
    let port = server.port;
    let (code, _, _) = http_with("GET", port, "/", "Host: evil.example:80\r\n", "");
    assert_eq!(code, 421, "a request through DNS rebinding is refused");
    let (code, _, _) = http_with(
        "POST",
        port,
        "/api/state",
        &format!("Host: 127.0.0.1:{port}\r\nContent-Type: text/plain\r\n"),
        "{\"labeller\":\"ann\"}",
    );
    assert_eq!(
        code, 415,
        "a cross-site form post (no JSON content type) is refused"
    );
    let (code, state) = post(&server, "/api/state", json!({ "labeller": "ann" }));
    assert_eq!(code, 200);
    let item = state["item"].clone();
    let (code, _) = post(
        &server,
        "/api/label",
        json!({ "labeller": "ann", "item": item["id"], "choice": 9, "a_is": item["a_is"] }),
    );
    assert_eq!(code, 400);
    let other_side = if item["a_is"] == "first" {
        "second"
    } else {
        "first"
    };
    let (code, _) = post(
        &server,
        "/api/label",
        json!({ "labeller": "ann", "item": item["id"], "choice": 1, "a_is": other_side }),
    );
    assert_eq!(
        code, 409,
        "a label given against another side order is refused"
    );
    let (code, _) = post(&server, "/api/undo", json!({ "labeller": "ann" }));
    assert_eq!(code, 409, "nothing to undo yet");
    let (code, _) = post(
        &server,
        "/api/label",
        json!({ "labeller": "", "item": item["id"], "choice": 1, "a_is": item["a_is"] }),
    );
    assert_eq!(code, 400, "a labeller needs a name");
    assert_eq!(
        project.read("labels/prefs.jsonl"),
        "",
        "nothing refused reached the log"
    );
}

#[test]
fn a_label_records_the_side_order_shown_and_the_preference_of_first_over_second() {
    let Some((project, server)) = serving() else {
        return;
    };
    let (_, state) = post(&server, "/api/state", json!({ "labeller": "ann" }));
    let item = state["item"].clone();
    // "A is significantly better", whichever completion A was.
    let (code, next) = post(
        &server,
        "/api/label",
        json!({ "labeller": "ann", "item": item["id"], "choice": 1, "a_is": item["a_is"], "comment": "  ok  " }),
    );
    assert_eq!(code, 200);
    assert_eq!(next["progress"]["mine"], json!(1));
    assert_ne!(next["item"]["id"], item["id"]);
    let line: Value =
        serde_json::from_str(project.read("labels/prefs.jsonl").lines().next().unwrap()).unwrap();
    let expected = if item["a_is"] == "first" { 2 } else { -2 };
    assert_eq!(line["preference"], json!(expected));
    assert_eq!(line["a_is"], item["a_is"]);
    assert_eq!(line["comment"], json!("ok"));
    let shown_a = if item["a_is"] == "first" {
        "first"
    } else {
        "second"
    };
    let items: Vec<Value> = project
        .read("labels/prefs.items.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let labelled = items.iter().find(|i| i["id"] == item["id"]).unwrap();
    assert_eq!(
        item["a"], labelled[shown_a],
        "A on the page is the completion the record names"
    );
}

#[test]
fn a_second_server_on_the_same_labels_file_is_refused() {
    let Some((project, _server)) = serving() else {
        return;
    };
    let second = project.rlhf(&["label", "p.yaml", "--stage", "prefs", "--port", "0"]);
    second.assert_code(1);
    assert!(
        second.stderr.contains("is locked by another `rlhf label`"),
        "{}",
        second.stderr
    );
}

#[test]
fn label_names_a_stage_without_a_human_judge() {
    let Some((project, _server)) = serving() else {
        return;
    };
    let run = project.rlhf(&["label", "p.yaml", "--stage", "base"]);
    run.assert_code(2);
    assert!(
        run.stderr.contains(
            "stage `base` is not a `collect_preferences` stage with `judge: { kind: human"
        ),
        "{}",
        run.stderr
    );
}
