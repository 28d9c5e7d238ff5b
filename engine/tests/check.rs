//! Checking a pipeline before anything runs, with test kinds: references to outputs a
//! stage has or lacks, artifact kinds, cycles, duplicate names, `--set` mistakes and
//! YAML bombs. Each error must name the place, what was expected and the nearest name.

mod kinds;

use kinds::{check, error};

/// A stage `d` with two outputs, `d.train` and `d.eval`, then `rest`. Its source must be
/// an existing file: this test file is one (tests run in the crate folder).
fn with_split(rest: &str) -> String {
    format!("stages:\n  d: {{ kind: split, source: tests/check.rs, parts: [train, eval] }}\n{rest}")
}

#[test]
fn reference_to_a_named_output_resolves() {
    let pipeline = check(&with_split("  t: { kind: train, data: d.train }\n"), &[]).unwrap();
    let train = pipeline.stage("t").unwrap();
    assert_eq!(
        train.inputs[0].source,
        rlhf_engine::check::Source::Stage {
            stage: "d".into(),
            output: "train".into()
        }
    );
    assert_eq!(
        pipeline
            .stages
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["d", "t"]
    );
}

#[test]
fn reference_to_an_output_the_stage_does_not_have() {
    let message = error(&with_split("  t: { kind: train, data: d.trian }\n"), &[]);
    assert_eq!(
        message,
        "pipeline.yaml:3:27: stage `d` has no output `trian`\n  expected: one of `train`, `eval`\n  hint: did you mean `train`?"
    );
}

#[test]
fn reference_to_a_stage_with_several_outputs_must_name_one() {
    let message = error(&with_split("  t: { kind: train, data: d }\n"), &[]);
    assert_eq!(
        message,
        "pipeline.yaml:3:27: stage `d` has several outputs; say which one `data` of stage `t` reads\n  expected: one of `d.train`, `d.eval`"
    );
}

#[test]
fn artifact_kind_mismatch_names_both_kinds() {
    let message = error(&with_split("  j: { kind: judge, models: [d.eval] }\n"), &[]);
    assert_eq!(
        message,
        "pipeline.yaml:3:30: `models.0` of stage `j` needs a model or an adapter, but `d.eval` is a dataset\n  expected: a reference to a stage that outputs a model or an adapter"
    );
}

#[test]
fn dangling_reference_suggests_the_nearest_stage() {
    let message = error(
        &with_split(
            "  model: { kind: train, data: d.train }\n  j: { kind: judge, models: [modle] }\n",
        ),
        &[],
    );
    assert_eq!(
        message,
        "pipeline.yaml:4:30: `models.0` of stage `j` refers to `modle`, which is not a stage\n  expected: a stage name: one of `d`, `model`, `j`\n  hint: did you mean `model`?"
    );
}

#[test]
fn unknown_key_suggests_the_nearest_key() {
    let message = error(
        &with_split("  t: { kind: train, data: d.train, learning_rat: 0.1 }\n"),
        &[],
    );
    assert_eq!(
        message,
        "pipeline.yaml:3:36: unknown key `learning_rat` in stage `t` (kind `train`)\n  expected: one of `data`, `learning_rate`, `schedule`\n  hint: did you mean `learning_rate`?"
    );
}

#[test]
fn unknown_enum_value_suggests_the_nearest_value() {
    let message = error(
        &with_split("  t: { kind: train, data: d.train, schedule: cosin }\n"),
        &[],
    );
    assert!(
        message.contains("unknown value `cosin` for `schedule`"),
        "{message}"
    );
    assert!(message.contains("did you mean `cosine`?"), "{message}");
}

#[test]
fn wrong_type_names_the_expected_type() {
    let message = error(
        &with_split("  t: { kind: train, data: d.train, learning_rate: fast }\n"),
        &[],
    );
    assert!(
        message.starts_with(
            "pipeline.yaml:3:51: invalid value for `learning_rate` in stage `t` (kind `train`)"
        ),
        "{message}"
    );
    assert!(message.ends_with("\n  expected: f64"), "{message}");
}

#[test]
fn cycle_is_named_stage_by_stage() {
    let text = "stages:\n  a: { kind: shell, run: [x], outputs: [o], inputs: { i: c } }\n  b: { kind: shell, run: [x], outputs: [o], inputs: { i: a } }\n  c: { kind: shell, run: [x], outputs: [o], inputs: { i: b } }\n";
    assert_eq!(
        error(text, &[]),
        "pipeline.yaml:2:3: the stages form a cycle: a → b → c → a\n  hint: a stage cannot depend on its own output, directly or through other stages"
    );
}

#[test]
fn after_edges_count_for_cycles() {
    let text = "stages:\n  a: { kind: shell, run: [x], outputs: [o], after: [b] }\n  b: { kind: shell, run: [x], outputs: [o], inputs: { i: a } }\n";
    assert!(error(text, &[]).contains("the stages form a cycle: a → b → a"));
}

#[test]
fn stage_reading_its_own_output_is_refused() {
    let text = "stages:\n  a: { kind: shell, run: [x], outputs: [o], inputs: { i: a } }\n";
    assert!(error(text, &[]).contains("stage `a` refers to its own output"));
}

#[test]
fn duplicate_stage_names_are_refused() {
    let text = "stages:\n  a: { kind: shell, run: [x], outputs: [o] }\n  a: { kind: shell, run: [y], outputs: [o] }\n";
    assert_eq!(
        error(text, &[]),
        "pipeline.yaml:3:3: duplicate key `a`: each key may appear once in a mapping (stage names must be unique)"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text =
        "stages:\n  a: { kind: shel, run: [x], outputs: [o] }\n  b: { kind: train, dta: x }\n  c: { kind: judge, models: [nowhere] }\n";
    let e = check(text, &[]).unwrap_err();
    assert_eq!(e.diagnostics.len(), 3, "{e}");
    assert!(e.diagnostics[0]
        .message
        .contains("unknown stage kind `shel`"));
    assert_eq!(
        e.diagnostics[0].hint.as_deref(),
        Some("did you mean `shell`?")
    );
}

#[test]
fn set_with_unknown_stage_or_wrong_type_is_refused() {
    let text = &with_split("  t: { kind: train, data: d.train }\n");
    assert_eq!(
        error(text, &["tt.learning_rate=0.1"]),
        "--set tt.learning_rate=0.1: no stage named `tt`\n  expected: one of `d`, `t`\n  hint: did you mean `t`?"
    );
    let message = error(text, &["t.learning_rate=[1, 2]"]);
    assert!(
        message.starts_with("--set t.learning_rate=[1, 2]: invalid value for `learning_rate`"),
        "{message}"
    );
    let message = error(text, &["t.schedule.x=1"]);
    assert!(message.starts_with("--set t.schedule.x=1:"), "{message}");
}

#[test]
fn set_overrides_a_nested_value_and_wins_over_the_file() {
    let text =
        "stages:\n  a: { kind: shell, run: [x], outputs: [o], params: { kl: { coef: 0.1 } } }\n";
    let pipeline = check(text, &["a.params.kl.coef=0.5", "a.params.kl.coef=0.25"]).unwrap();
    assert_eq!(
        pipeline.stage("a").unwrap().params["params"]["kl"]["coef"],
        0.25
    );
}

#[test]
fn billion_laughs_is_refused() {
    let mut text = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    text.push_str("stages: {}\n");
    let message = error(&text, &[]);
    assert!(
        message.contains("refused: YAML aliases expand to too many values"),
        "{message}"
    );
}

#[test]
fn deep_nesting_is_refused() {
    let text = format!("stages: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    assert!(error(&text, &[]).contains("refused: lists or mappings nested deeper than 64 levels"));
    let block: String = (1..100)
        .map(|i| format!("{}k{i}:\n", "  ".repeat(i)))
        .collect();
    assert!(error(&format!("stages:\n{block}"), &[]).contains("nested deeper than 64 levels"));
}

#[test]
fn huge_file_is_refused_before_parsing() {
    let text = format!("stages: {{}}\n# {}\n", "x".repeat(10 * 1024 * 1024));
    assert!(error(&text, &[]).contains("pipeline files are limited to 4194304 bytes"));
}

#[test]
fn second_yaml_document_is_refused() {
    let text = "stages:\n  a: { kind: shell, run: [x], outputs: [o] }\n---\nstages: {}\n";
    assert_eq!(
        error(text, &[]),
        "pipeline.yaml:3:1: a pipeline file is one YAML document; this one has another after `---`"
    );
}

#[test]
fn one_anchor_aliased_a_thousand_times_is_refused() {
    let text = format!(
        "a: &a [{}]\nb: [{}]\nstages: {{}}\n",
        vec!["x"; 5000].join(","),
        vec!["*a"; 999].join(",")
    );
    assert!(error(&text, &[])
        .contains("refused: more than 100000 YAML values (counting what aliases expand to)"));
}

#[test]
fn large_generated_pipeline_is_accepted() {
    // The budgets that stop bombs leave room for big honest files: 1,000 stages with a
    // shared anchored block each.
    let mut text = String::from(
        "stages:\n  s0: &shell { kind: shell, run: [sh, -c, 'echo 0 > $OUT/f'], outputs: [f], params: { a: 1, b: [1, 2, 3] } }\n",
    );
    for i in 1..1000 {
        text.push_str(&format!(
            "  s{i}: {{ kind: shell, run: [sh, -c, 'echo {i}'], outputs: [f], inputs: {{ up: s{} }}, params: {{ i: {i}, lr: 0.1, tags: [a, b] }} }}\n",
            i - 1
        ));
        if i % 100 == 0 {
            text.push_str(&format!("  copy{i}: *shell\n"));
        }
    }
    assert_eq!(check(&text, &[]).unwrap().stages.len(), 1009);
}
