//! Bad pipelines and bad command lines, through `rlhf run`: each gives the promised
//! message (file:line:col, what was expected, the nearest valid name), exit code 2, no
//! panic, and writes nothing to the cache. The expected stderr is written out in full
//! (a snapshot), with the project folder shown as `[DIR]`.

mod common;

use common::Project;

/// Runs `rlhf run p.yaml ARGS` on `text` and returns stderr after checking the contract.
fn refused(text: &str, args: &[&str]) -> String {
    let project = Project::new();
    project.write("p.yaml", text);
    project.write("data.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n");
    let mut all = vec!["run", "p.yaml", "--json"];
    all.extend_from_slice(args);
    let run = project.rlhf(&all);
    run.assert_code(2);
    assert!(run.stdout.is_empty(), "nothing runs: {}", run.stdout);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert_eq!(project.records(), 0, "nothing is written to the cache");
    assert!(
        !project.cache().join("v1/objects").exists()
            || std::fs::read_dir(project.cache().join("v1/objects"))
                .unwrap()
                .count()
                == 0
    );
    assert!(!project.path("p.lock").exists(), "no lock file is written");
    project.filter(&run.stderr)
}

const OK_STAGE: &str = "  a: { kind: command, run: [sh, -c, 'echo a > {out}/f'], outputs: [f] }\n";
const SPLIT: &str =
    "  d: { kind: dataset, source: data.jsonl, split: { train: 0.5, eval: 0.5 } }\n";

#[test]
fn unknown_key_in_a_stage_suggests_the_nearest_key() {
    assert_eq!(
        refused(
            "stages:\n  a: { kind: command, run: [echo], output: [x] }\n",
            &[]
        ),
        "error: p.yaml:2:36: unknown key `output` in stage `a` (kind `command`)
  expected: one of `run`, `inputs`, `params`, `env`, `outputs`, `artifact`
  hint: did you mean `outputs`?
"
    );
}

#[test]
fn wrong_type_names_what_was_expected() {
    assert_eq!(
        refused("stages:\n  a: { kind: command, run: echo, outputs: [x] }\n", &[]),
        "error: p.yaml:2:28: invalid value for `run` in stage `a` (kind `command`): invalid type: string \"echo\", expected a sequence
  expected: a sequence
"
    );
}

#[test]
fn unknown_kind_suggests_the_nearest_kind() {
    let stderr = refused(
        "stages:\n  a: { kind: comand, run: [echo], outputs: [x] }\n",
        &[],
    );
    // The list of kinds grows as kinds land; the line itself is what matters.
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert_eq!(
        lines[0],
        "error: p.yaml:2:14: unknown stage kind `comand` in stage `a`"
    );
    assert!(
        lines[1].starts_with("  expected: one of `") && lines[1].contains("`command`, `dataset`"),
        "{stderr}"
    );
    assert_eq!(lines[2], "  hint: did you mean `command`?");
}

#[test]
fn dangling_reference_names_the_stages() {
    assert_eq!(
        refused(
            &format!("stages:\n{OK_STAGE}  b: {{ kind: command, run: [echo], outputs: [x], inputs: {{ m: aa }} }}\n"),
            &[]
        ),
        "error: p.yaml:3:63: `aa` (`inputs.m` of stage `b`) is neither a stage nor an existing file or folder
  expected: a stage name (one of `a`, `b`), an existing file or folder, or `hf://org/name[@revision]`
  hint: did you mean `a`?
"
    );
}

#[test]
fn reference_to_an_output_the_stage_does_not_have() {
    assert_eq!(
        refused(
            &format!("stages:\n{SPLIT}  c: {{ kind: command, run: [cat], inputs: {{ x: d.test }}, outputs: [f] }}\n"),
            &[]
        ),
        "error: p.yaml:3:48: stage `d` has no output `test`
  expected: one of `eval`, `train`
"
    );
}

#[test]
fn artifact_kind_mismatch_names_both_kinds() {
    assert_eq!(
        refused(
            &format!("stages:\n{SPLIT}  e: {{ kind: dataset, source: d.train, tokenizer: d.eval }}\n"),
            &[]
        ),
        "error: p.yaml:3:51: `tokenizer` of stage `e` needs a tokenizer or a model, but `d.eval` is a dataset
  expected: a reference to a stage that outputs a tokenizer or a model
"
    );
}

#[test]
fn duplicate_stage_names_are_refused() {
    assert_eq!(
        refused(&format!("stages:\n{OK_STAGE}{OK_STAGE}"), &[]),
        "error: p.yaml:3:3: duplicate key `a`: each key may appear once in a mapping (stage names must be unique)\n"
    );
}

#[test]
fn cycle_names_the_stages_in_order() {
    let stage = |name: &str, reads: &str| {
        format!(
            "  {name}: {{ kind: command, run: [echo], outputs: [x], inputs: {{ m: {reads} }} }}\n"
        )
    };
    assert_eq!(
        refused(
            &format!(
                "stages:\n{}{}{}",
                stage("a", "c"),
                stage("b", "a"),
                stage("c", "b")
            ),
            &[]
        ),
        "error: p.yaml:2:3: the stages form a cycle: a → b → c → a
  hint: a stage cannot depend on its own output, directly or through other stages
"
    );
}

#[test]
fn unknown_top_level_key_suggests_the_nearest_key() {
    assert_eq!(
        refused(&format!("nmae: x\nstages:\n{OK_STAGE}"), &[]),
        "error: p.yaml:1:1: unknown top-level key `nmae`
  expected: one of `name`, `description`, `seed`, `defaults`, `stages`
  hint: did you mean `name`?
"
    );
}

#[test]
fn set_naming_an_unknown_stage_is_refused() {
    assert_eq!(
        refused(&format!("stages:\n{OK_STAGE}"), &["--set", "b.params.n=4"]),
        "error: --set b.params.n=4: no stage named `b`
  expected: `a`
  hint: did you mean `a`?
"
    );
}

#[test]
fn set_with_a_wrong_type_is_refused_like_the_file() {
    assert_eq!(
        refused(&format!("stages:\n{OK_STAGE}"), &["--set", "a.outputs=3"]),
        "error: --set a.outputs=3: invalid value for `outputs` in stage `a` (kind `command`): invalid type: integer `3`, expected a sequence
  expected: a sequence
"
    );
}

#[test]
fn billion_laughs_is_refused() {
    let mut text = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        text.push_str(&format!(
            "a{i}: &a{i} [{}]\n",
            vec![format!("*a{}", i - 1); 9].join(", ")
        ));
    }
    text.push_str(&format!("stages:\n{OK_STAGE}"));
    assert_eq!(
        refused(&text, &[]),
        "error: p.yaml:5:15: refused: YAML aliases expand to too many values (a \"billion laughs\" file?)\n"
    );
}

#[test]
fn deep_nesting_is_refused() {
    let text = format!("stages: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(
        refused(&text, &[]),
        "error: p.yaml:1:73: refused: lists or mappings nested deeper than 64 levels\n"
    );
}

#[test]
fn huge_file_is_refused() {
    let line = "  s: { kind: command, run: [echo, xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx], outputs: [x] }\n";
    let text = format!(
        "stages:\n{}",
        line.repeat(10 * 1024 * 1024 / line.len() + 1)
    );
    let stderr = refused(&text, &[]);
    assert!(stderr.starts_with("error: p.yaml: file is 104"), "{stderr}");
    assert!(
        stderr.ends_with(" bytes; pipeline files are limited to 4194304 bytes\n"),
        "{stderr}"
    );
}

#[test]
fn missing_pipeline_file_is_refused() {
    let project = Project::new();
    let run = project.rlhf(&["run", "missing.yaml"]);
    run.assert_code(2);
    assert_eq!(
        run.stderr,
        "error: missing.yaml: cannot read the pipeline file: No such file or directory (os error 2)
  hint: pass the path of a pipeline YAML file, e.g. pipelines/quickstart.yaml
"
    );
    assert!(!project.cache().exists());
}

#[test]
fn all_problems_are_listed_together() {
    let text = "stages:\n  a: { kind: comand, run: [echo], outputs: [x] }\n  b: { kind: command, run: [echo], output: [x] }\n";
    let stderr = refused(text, &[]);
    assert_eq!(stderr.matches("error: ").count(), 2, "{stderr}");
    assert!(
        stderr.ends_with("2 problems found; nothing was run\n"),
        "{stderr}"
    );
}
