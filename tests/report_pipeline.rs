//! `rlhf report` and the `evaluate` stage end to end through the real binary: a pipeline
//! whose `command` stage logs a known loss curve, and an evaluate stage over the
//! tiny-llama fixture. The report must plot every logged point and tabulate the
//! evaluated model; `rlhf show --json` must expose the per-model metrics.

mod common;

use common::Project;
use serde_json::Value;

/// Ten steps of a decaying loss and a linear lr schedule, in metrics.jsonl.
const TRAIN_SCRIPT: &str = r#"awk 'BEGIN { for (i = 1; i <= 10; i++) printf "{\"step\": %d, \"loss\": %.4f, \"lr\": %g}\n", i, 2.5 * exp(-i / 4) + 0.3, 0.001 * (1 - i / 10) }' > "$1/metrics.jsonl"
echo done > "$1/f.txt"
"#;

const DATA_SCRIPT: &str = r#"cat > "$1/data.jsonl" <<'ROWS'
{"prompt": "Q: 12+7=\nA: ", "completion": "19", "answer": "19"}
{"prompt": "Q: 3+4=\nA: ", "completion": "7", "answer": "7"}
{"prompt": "Q: 20-5=\nA: ", "completion": "15", "answer": "15"}
ROWS
"#;

fn project(fixture: &std::path::Path) -> Project {
    let project = Project::new();
    project.write("scripts/log_curve.sh", TRAIN_SCRIPT);
    project.write("scripts/rows.sh", DATA_SCRIPT);
    project.write(
        "p.yaml",
        &format!(
            r#"name: demo
seed: 7
stages:
  train:
    kind: command
    run: [sh, "{{inputs.script}}", "{{out}}"]
    inputs: {{ script: scripts/log_curve.sh }}
    outputs: [f.txt, metrics.jsonl]
  rows:
    kind: command
    run: [sh, "{{inputs.script}}", "{{out}}"]
    inputs: {{ script: scripts/rows.sh }}
    outputs: [data.jsonl]
    artifact: dataset
  base:
    kind: load_pretrained
    model: {fixture}
  eval:
    kind: evaluate
    models: [base]
    data: rows
    metrics: [rouge, perplexity, accuracy]
    max_new_tokens: 4
"#,
            fixture = fixture.display()
        ),
    );
    project
}

/// The `points` attribute of the polyline labelled `label`, as (x, y) pairs.
fn polyline_points(html: &str, label: &str) -> Vec<(f64, f64)> {
    let start = html
        .find(&format!(r#"data-label="{label}""#))
        .unwrap_or_else(|| panic!("no polyline for {label}"));
    let rest = &html[start..];
    let points = rest
        .split(r#" points=""#)
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    points
        .split(' ')
        .map(|pair| {
            let (x, y) = pair.split_once(',').unwrap();
            (x.parse().unwrap(), y.parse().unwrap())
        })
        .collect()
}

#[test]
fn report_plots_every_logged_step_and_tabulates_evaluated_models() {
    let Some(fixture) = rlhf_stages::testing::shared_path("fixtures/tiny-llama") else {
        return;
    };
    let project = project(&fixture);
    let run = project.run(&[]);
    run.assert_code(0);

    let show = project.rlhf(&["show", "p.yaml", "eval", "--json"]);
    show.assert_code(0);
    let record: Value = serde_json::from_str(show.stdout.trim()).unwrap();
    let base = &record["metrics"]["base"];
    assert_eq!(base["n"], 3, "{record}");
    assert!(base["perplexity"].as_f64().unwrap() > 1.0);
    let accuracy = base["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy));
    for key in ["rouge1", "rouge2", "rougeL"] {
        assert!(base[key].is_number(), "{key} missing: {record}");
    }

    let report = project.rlhf(&["report", "p.yaml"]);
    report.assert_code(0);
    assert_eq!(
        report.stdout.trim(),
        "demo-report/index.html",
        "beside the pipeline file"
    );
    let path = project.path("demo-report/index.html");
    let html = std::fs::read_to_string(&path).unwrap();
    let loss = polyline_points(&html, "loss");
    assert_eq!(loss.len(), 10, "one vertex per logged step");
    // Steps increase left to right; the loss decays, so each vertex sits lower (larger
    // SVG y) than the one before.
    assert!(
        loss.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 > w[0].1),
        "{loss:?}"
    );
    assert_eq!(polyline_points(&html, "lr").len(), 10);
    assert!(html.contains("<h2>Evaluation: eval</h2>"));
    let table = html.split(r#"<table class="evaluation">"#).nth(1).unwrap();
    assert!(table.contains("<td>base</td>") && table.contains("<th>perplexity</th>"));
    assert!(
        !html.contains("<script") && !html.contains("src="),
        "no external assets or scripts"
    );

    let again = project.rlhf(&["report", "p.yaml", "-o", "elsewhere"]);
    again.assert_code(0);
    assert_eq!(
        std::fs::read_to_string(project.path("elsewhere/index.html")).unwrap(),
        html,
        "the page is a pure function of the cache"
    );
}

#[test]
fn report_of_a_pipeline_never_run_lists_stages_without_plots() {
    let Some(fixture) = rlhf_stages::testing::shared_path("fixtures/tiny-llama") else {
        return;
    };
    let project = project(&fixture);
    let report = project.rlhf(&["report", "p.yaml"]);
    report.assert_code(0);
    let html = std::fs::read_to_string(project.path("demo-report/index.html")).unwrap();
    assert!(
        html.contains("<td>train</td><td>command</td><td>stale</td><td class=\"num\">0</td>"),
        "{html}"
    );
    assert!(!html.contains("<polyline"));
}
