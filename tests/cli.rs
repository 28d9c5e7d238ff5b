//! The CLI contract beyond the cache rules: `status` says why, `--force`, `--until`,
//! `--keep-going`, `cache gc`, and the committed JSON Schema being current.

mod common;

use common::{diamond_project, names, pipeline, stage, Project};
use serde_json::Value as Json;
use std::collections::BTreeMap;

/// Stage → (status, reasons) from `rlhf status --json`.
fn status(project: &Project, extra: &[&str]) -> BTreeMap<String, (String, Vec<String>)> {
    let mut args = vec!["status", "p.yaml", "--json"];
    args.extend_from_slice(extra);
    let run = project.rlhf(&args);
    run.assert_code(0);
    run.stages()
        .iter()
        .map(|s| {
            let reasons = s["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_string())
                .collect();
            (
                s["stage"].as_str().unwrap().to_string(),
                (s["status"].as_str().unwrap().to_string(), reasons),
            )
        })
        .collect()
}

fn entry(state: &str, reasons: &[&str]) -> (String, Vec<String>) {
    (
        state.to_string(),
        reasons.iter().map(|r| r.to_string()).collect(),
    )
}

#[test]
fn status_explains_why() {
    let project = diamond_project();
    let before = status(&project, &[]);
    assert_eq!(before["a"], entry("stale", &["never run"]));
    assert_eq!(before["d"], entry("blocked", &["waits for `b`, `c`"]));
    project.run(&[]).assert_code(0);
    assert!(status(&project, &[])
        .values()
        .all(|(s, r)| s == "cached" && r.is_empty()));

    let changed = status(&project, &["--set", "a.params.n=4"]);
    assert_eq!(
        changed["a"],
        entry("stale", &["param `params.n` changed 3 → 4"])
    );
    assert_eq!(changed["b"], entry("blocked", &["waits for `a`"]));
    assert_eq!(changed["d"], entry("blocked", &["waits for `b`, `c`"]));

    let sibling = status(&project, &["--set", "b.params.m=2"]);
    assert_eq!(sibling["a"].0, "cached");
    assert_eq!(sibling["c"].0, "cached");
    assert_eq!(
        sibling["b"],
        entry("stale", &["param `params.m` changed 1 → 2"])
    );
    assert_eq!(sibling["d"], entry("blocked", &["waits for `b`"]));

    project.write("raw.txt", "edited\n");
    assert_eq!(
        status(&project, &[])["a"],
        entry("stale", &["input `raw` changed"])
    );
    // Human output names the same reasons.
    let text = project.rlhf(&["status", "p.yaml"]);
    assert!(
        text.stdout
            .contains("stale  a (command): input `raw` changed"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout
            .contains("blocked  d (command): waits for `b`, `c`"),
        "{}",
        text.stdout
    );
}

#[test]
fn force_reruns_the_named_stage_only() {
    let project = diamond_project();
    project.run(&[]).assert_code(0);
    let forced = project.run(&["--force", "b"]);
    forced.assert_code(0);
    assert_eq!(
        forced.with_status("ran"),
        names(&["b"]),
        "b reproduces its bytes, so d stays cached"
    );
    assert_eq!(project.executions().iter().filter(|s| *s == "b").count(), 2);

    let typo = project.run(&["--force", "bb"]);
    typo.assert_code(2);
    assert!(
        typo.stderr.contains("no stage named `bb`") && typo.stderr.contains("did you mean `b`?"),
        "{}",
        typo.stderr
    );
}

#[test]
fn until_runs_the_stage_and_its_ancestors_only() {
    let project = diamond_project();
    let partial = project.run(&["--until", "b"]);
    partial.assert_code(0);
    assert_eq!(
        partial.statuses().into_keys().collect::<Vec<_>>(),
        names(&["a", "b"])
    );
    assert_eq!(partial.with_status("ran"), names(&["a", "b"]));

    let rest = project.run(&[]);
    assert_eq!(rest.with_status("cached"), names(&["a", "b"]));
    assert_eq!(rest.with_status("ran"), names(&["c", "d", "e"]));
}

fn failing_project() -> Project {
    let project = Project::new();
    project.write(
        "p.yaml",
        &pipeline(&[
            stage("f1", "echo broken-one >&2; exit 1", "{}", "{}"),
            stage("g", "cat {inputs.f}/f.txt > {out}/f.txt", "{ f: f1 }", "{}"),
            stage("f2", "echo broken-two >&2; exit 3", "{}", "{}"),
            stage("h", "echo h > {out}/f.txt", "{}", "{}"),
        ]),
    );
    project
}

#[test]
fn failure_stops_the_run_and_leaves_the_cache_as_it_was() {
    let project = failing_project();
    let run = project.run(&[]);
    run.assert_code(1);
    assert_eq!(run.statuses()["f1"], "failed");
    assert_eq!(run.with_status("skipped"), names(&["f2", "g", "h"]));
    assert_eq!(project.executions(), ["f1"]);
    assert_eq!(project.records(), 0);
    assert!(
        run.stderr.contains("error: stage `f1`") && run.stderr.contains("broken-one"),
        "{}",
        run.stderr
    );
}

#[test]
fn keep_going_skips_dependents_of_a_failed_stage_and_lists_all_failures() {
    let project = failing_project();
    let run = project.run(&["--keep-going"]);
    run.assert_code(1);
    let statuses = run.statuses();
    assert_eq!(run.with_status("failed"), names(&["f1", "f2"]));
    assert_eq!(statuses["g"], "skipped");
    assert_eq!(statuses["h"], "ran");
    assert_eq!(project.records(), 1, "only h is recorded");
    // The failures come last, after the per-stage lines, each with its stderr.
    let tail = &run.stderr[run
        .stderr
        .find("1 ran, 0 cached, 2 failed, 1 skipped")
        .expect(&run.stderr)..];
    assert!(
        tail.contains("error: stage `f1`") && tail.contains("broken-one"),
        "{tail}"
    );
    assert!(
        tail.contains("error: stage `f2`") && tail.contains("broken-two"),
        "{tail}"
    );
}

fn gc_json(project: &Project, extra: &[&str]) -> Json {
    let mut args = vec!["cache", "gc", "--json"];
    args.extend_from_slice(extra);
    let run = project.rlhf(&args);
    run.assert_code(0);
    serde_json::from_str(run.stdout.trim()).unwrap()
}

#[test]
fn gc_is_a_dry_run_by_default_and_apply_keeps_what_the_lock_references() {
    let project = diamond_project();
    let old = project.run(&[]);
    let new = project.run(&["--set", "a.params.n=4"]);
    new.assert_code(0);
    assert_eq!(project.records(), 10);
    let mut old_keys: Vec<String> = old.keys().into_values().collect();
    old_keys.sort();

    let dry = gc_json(&project, &[]);
    assert_eq!(dry["applied"], false);
    assert_eq!(
        dry["records"],
        serde_json::json!(old_keys),
        "the lock now references only the n=4 keys"
    );
    assert_eq!(project.records(), 10, "a dry run deletes nothing");
    assert_eq!(
        project.run(&[]).with_status("cached").len(),
        5,
        "the old results are still there"
    );

    // The run above made the n=3 keys the locked ones again; flip back and collect.
    project.run(&["--set", "a.params.n=4"]).assert_code(0);
    let applied = gc_json(&project, &["--apply"]);
    assert_eq!(applied["applied"], true);
    assert_eq!(applied["records"], serde_json::json!(old_keys));
    assert_eq!(project.records(), 5);
    assert_eq!(
        project
            .run(&["--set", "a.params.n=4"])
            .with_status("cached")
            .len(),
        5,
        "what the lock references is kept"
    );
    project.rlhf(&["cache", "verify"]).assert_code(0);
    assert_eq!(
        project.run(&[]).with_status("ran").len(),
        5,
        "what it did not reference is gone"
    );
}

#[test]
fn schema_is_current() {
    let run = Project::new().rlhf(&["schema"]);
    run.assert_code(0);
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/pipeline.schema.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == run.stdout,
        "{} is stale: run `cargo run -- schema > schemas/pipeline.schema.json`",
        path.display()
    );
}

#[test]
fn show_prints_the_outputs_of_a_cached_stage_only() {
    let project = diamond_project();
    let missing = project.rlhf(&["show", "p.yaml", "b"]);
    missing.assert_code(1);
    assert!(
        missing
            .stderr
            .contains("stage `b` has no cached outputs (waits for `a`)"),
        "{}",
        missing.stderr
    );
    assert!(
        missing
            .stderr
            .contains("hint: run `rlhf run p.yaml --until b` first"),
        "{}",
        missing.stderr
    );

    let run = project.run(&[]);
    let shown = project.rlhf(&["show", "p.yaml", "b", "--json"]);
    shown.assert_code(0);
    let shown: Json = serde_json::from_str(shown.stdout.trim()).unwrap();
    let ran = run
        .stages()
        .into_iter()
        .find(|s| s["stage"] == "b")
        .unwrap();
    assert_eq!(shown["key"], ran["key"]);
    assert_eq!(
        shown["outputs"]["out"]["digest"],
        ran["outputs"]["out"]["digest"]
    );
    assert_eq!(project.rlhf(&["show", "p.yaml", "bb"]).code, 2);
}

#[test]
fn dag_renders_every_edge() {
    let project = diamond_project();
    let text = project.rlhf(&["dag", "p.yaml"]);
    text.assert_code(0);
    assert_eq!(
        text.stdout,
        "a (command)\nb (command) ← a\nc (command) ← a\nd (command) ← b, c\ne (command) ← a\n"
    );
    let dot = project.rlhf(&["dag", "p.yaml", "--format", "dot"]).stdout;
    for edge in [
        "\"a\" -> \"b\"",
        "\"a\" -> \"c\"",
        "\"b\" -> \"d\"",
        "\"c\" -> \"d\"",
        "\"a\" -> \"e\"",
    ] {
        assert!(dot.contains(edge), "{edge} missing from\n{dot}");
    }
    let mermaid = project
        .rlhf(&["dag", "p.yaml", "--format", "mermaid"])
        .stdout;
    assert!(
        mermaid.starts_with("flowchart LR\n") && mermaid.contains("  c -->|out → c| d\n"),
        "{mermaid}"
    );
}

#[test]
fn broken_lock_file_is_invalid_input_and_names_the_way_out() {
    let project = diamond_project();
    project.run(&[]).assert_code(0);
    let lock = project.read("p.lock");
    project.write(
        "p.lock",
        &format!("<<<<<<< HEAD\n{lock}=======\n{lock}>>>>>>> other\n"),
    );
    for command in ["run", "status"] {
        let refused = project.rlhf(&[command, "p.yaml"]);
        refused.assert_code(2);
        assert!(
            refused
                .stderr
                .contains("p.lock is not a valid rlhf lock file"),
            "{}",
            refused.stderr
        );
        assert!(
            refused
                .stderr
                .contains("hint: fix the file (e.g. resolve a merge conflict), or delete it"),
            "{}",
            refused.stderr
        );
    }
    assert_eq!(project.executions().len(), 5, "nothing ran");
    std::fs::remove_file(project.path("p.lock")).unwrap();
    assert_eq!(
        project.run(&[]).with_status("cached").len(),
        5,
        "deleting the lock loses no cached result"
    );
}
