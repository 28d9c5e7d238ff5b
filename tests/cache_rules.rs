//! The cache rules of rlhf, one test each, driven through the real binary: what reruns
//! after which change, and what does not.

mod common;

use common::{diamond_project, names, pipeline, stage, Project};

#[test]
fn unchanged_rerun_runs_nothing() {
    let project = diamond_project();
    let first = project.run(&[]);
    first.assert_code(0);
    assert_eq!(first.with_status("ran"), names(&["a", "b", "c", "d", "e"]));
    let executions = project.executions().len();
    assert_eq!(executions, 5);

    let second = project.run(&[]);
    second.assert_code(0);
    assert_eq!(
        second.with_status("cached"),
        names(&["a", "b", "c", "d", "e"])
    );
    assert_eq!(
        project.executions().len(),
        executions,
        "a cached stage must not execute"
    );
    assert_eq!(first.keys(), second.keys());
}

#[test]
fn param_change_reruns_stage_and_descendants_only() {
    let project = diamond_project();
    project.run(&[]).assert_code(0);
    project.write(
        "p.yaml",
        &project
            .read("p.yaml")
            .replace("params: { m: 1 }", "params: { m: 2 }"),
    );

    let rerun = project.run(&[]);
    rerun.assert_code(0);
    assert_eq!(rerun.with_status("ran"), names(&["b", "d"]));
    assert_eq!(
        rerun.with_status("cached"),
        names(&["a", "c", "e"]),
        "the upstream and sibling branches stay cached"
    );
}

#[test]
fn identical_upstream_output_keeps_descendants_cached() {
    // `a` writes n / 10: n = 3 and n = 4 both give 0, so `a` reruns (its key changed)
    // but its output bytes are the same and nothing below it reruns (early cutoff).
    let project = Project::new();
    project.write(
        "p.yaml",
        &pipeline(&[
            stage(
                "a",
                "echo $(( {params.n} / 10 )) > {out}/f.txt",
                "{}",
                "{ n: 3 }",
            ),
            stage("b", "cat {inputs.a}/f.txt > {out}/f.txt", "{ a: a }", "{}"),
            stage("c", "cat {inputs.b}/f.txt > {out}/f.txt", "{ b: b }", "{}"),
        ]),
    );
    let first = project.run(&[]);
    first.assert_code(0);
    project.write("p.yaml", &project.read("p.yaml").replace("n: 3", "n: 4"));

    let rerun = project.run(&[]);
    rerun.assert_code(0);
    assert_eq!(rerun.with_status("ran"), names(&["a"]));
    assert_eq!(rerun.with_status("cached"), names(&["b", "c"]));
    assert_ne!(first.keys()["a"], rerun.keys()["a"]);
    assert_eq!(first.keys()["b"], rerun.keys()["b"]);
}

#[test]
fn editing_external_input_reruns_its_consumers() {
    let project = Project::new();
    project.write("raw.txt", "hello\n");
    project.write("other.txt", "other\n");
    project.write(
        "p.yaml",
        &pipeline(&[
            stage(
                "a",
                "cat {inputs.raw} > {out}/f.txt",
                "{ raw: raw.txt }",
                "{}",
            ),
            stage("b", "cat {inputs.a}/f.txt > {out}/f.txt", "{ a: a }", "{}"),
            stage(
                "c",
                "cat {inputs.o} > {out}/f.txt",
                "{ o: other.txt }",
                "{}",
            ),
        ]),
    );
    project.run(&[]).assert_code(0);
    // Same size, written right after the run: only the content (and the clock) differ,
    // so a stat cache that trusted size and a coarse mtime would miss it.
    project.write("raw.txt", "jello\n");

    let rerun = project.run(&[]);
    rerun.assert_code(0);
    assert_eq!(rerun.with_status("ran"), names(&["a", "b"]));
    assert_eq!(rerun.with_status("cached"), names(&["c"]));
    assert_eq!(
        std::fs::read_to_string(rerun.output_dir("b").join("f.txt")).unwrap(),
        "jello\n"
    );
}

#[test]
fn set_override_acts_like_an_edit() {
    let project = diamond_project();
    project.run(&[]).assert_code(0);

    let overridden = project.run(&["--set", "a.params.n=4"]);
    overridden.assert_code(0);
    assert_eq!(
        overridden.with_status("ran"),
        names(&["a", "b", "c", "d", "e"])
    );

    project.write(
        "p.yaml",
        &project
            .read("p.yaml")
            .replace("params: { n: 3 }", "params: { n: 4 }"),
    );
    let edited = project.run(&[]);
    edited.assert_code(0);
    assert_eq!(
        edited.with_status("cached"),
        names(&["a", "b", "c", "d", "e"])
    );
    assert_eq!(
        overridden.keys(),
        edited.keys(),
        "--set and the same edit give the same keys"
    );
}

#[test]
fn excluded_settings_do_not_invalidate() {
    let project = diamond_project();
    let first = project.run(&[]);
    first.assert_code(0);
    let all = names(&["a", "b", "c", "d", "e"]);

    // Log level, thread count, human vs JSON output.
    let mut logged = project.command(&["run", "p.yaml", "--json", "--threads", "1"]);
    logged.env("RLHF_LOG", "debug");
    let logged = project.rlhf_with(logged);
    logged.assert_code(0);
    assert_eq!(logged.with_status("cached"), all);
    project.rlhf(&["run", "p.yaml"]).assert_code(0);
    assert_eq!(
        project.executions().len(),
        5,
        "a run without --json reran something"
    );

    // Stage order in the file, comments, the pipeline's `name:`, and the input file moved
    // to another path with the same content.
    let mut blocks = common::diamond_stages();
    blocks.reverse();
    let reordered = format!(
        "# a comment\nname: renamed # another\nseed: 7\nstages:\n{}",
        blocks.concat()
    );
    std::fs::create_dir(project.path("moved")).unwrap();
    std::fs::rename(project.path("raw.txt"), project.path("moved/raw-data.txt")).unwrap();
    project.write(
        "p.yaml",
        &reordered.replace("raw.txt", "moved/raw-data.txt"),
    );
    let edited = project.run(&[]);
    edited.assert_code(0);
    assert_eq!(
        edited.with_status("cached"),
        all,
        "{}",
        project.read("p.yaml")
    );
    assert_eq!(first.keys(), edited.keys());

    // The cache location: another cache runs everything again, under the same keys.
    let elsewhere = project.rlhf_with(
        project.command_with_cache(&["run", "p.yaml", "--json"], &project.path("other-cache")),
    );
    elsewhere.assert_code(0);
    assert_eq!(elsewhere.with_status("ran"), all);
    assert_eq!(first.keys(), elsewhere.keys());
}

#[test]
fn corrupted_artifact_is_found_by_verify_and_recomputed() {
    let project = diamond_project();
    let first = project.run(&[]);
    first.assert_code(0);
    let file = project.path("").join(first.output_dir("b")).join("f.txt");
    let before = std::fs::read_to_string(&file).unwrap();
    damage(&file);

    let verify = project.rlhf(&["cache", "verify"]);
    assert_eq!(verify.code, 1, "{}", verify.stderr);
    assert!(
        verify.stderr.contains("f.txt"),
        "verify must name the damaged file: {}",
        verify.stderr
    );
    assert!(
        verify
            .stderr
            .contains(first.output_dir("b").file_name().unwrap().to_str().unwrap()),
        "{}",
        verify.stderr
    );

    let rerun = project.run(&[]);
    rerun.assert_code(0);
    assert_eq!(
        rerun.with_status("ran"),
        names(&["b"]),
        "only the stage whose output was damaged reruns"
    );
    assert_eq!(
        std::fs::read_to_string(project.path("").join(rerun.output_dir("b")).join("f.txt"))
            .unwrap(),
        before
    );
    project.rlhf(&["cache", "verify"]).assert_code(0);
}

#[test]
fn corrupted_artifact_is_recomputed_without_verify() {
    let project = diamond_project();
    let first = project.run(&[]);
    first.assert_code(0);
    damage(&project.path("").join(first.output_dir("c")).join("f.txt"));

    let rerun = project.run(&[]);
    rerun.assert_code(0);
    assert_eq!(rerun.with_status("ran"), names(&["c"]));
    assert!(
        rerun.stderr.contains("damaged"),
        "the damage is reported: {}",
        rerun.stderr
    );
}

/// Flips the first byte of a read-only cached file, keeping its size.
fn damage(file: &std::path::Path) {
    let mut permissions = std::fs::metadata(file).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    permissions.set_readonly(false);
    std::fs::set_permissions(file, permissions).unwrap();
    let mut bytes = std::fs::read(file).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn corrupt_record_is_a_warning_and_a_miss() {
    let project = diamond_project();
    let first = project.run(&[]);
    first.assert_code(0);
    let key = first.keys()["c"].clone();
    let record = project
        .cache()
        .join("v1/records")
        .join(format!("{key}.json"));
    std::fs::write(&record, "{ not json").unwrap();

    let rerun = project.run(&[]);
    rerun.assert_code(0);
    assert_eq!(rerun.with_status("ran"), names(&["c"]));
    assert!(
        rerun.stderr.contains("warning:") && rerun.stderr.contains(&key),
        "{}",
        rerun.stderr
    );
    let again = project.run(&[]);
    assert_eq!(
        again.with_status("cached"),
        names(&["a", "b", "c", "d", "e"]),
        "the record was rewritten"
    );
}

#[test]
fn locked_refuses_changed_external_input() {
    let project = diamond_project();
    project.run(&[]).assert_code(0);
    project.run(&["--locked"]).assert_code(0);
    project.write("raw.txt", "changed\n");

    let refused = project.run(&["--locked"]);
    refused.assert_code(2);
    assert!(
        refused.stderr.contains("`raw.txt` changed"),
        "{}",
        refused.stderr
    );
    assert!(refused.stdout.is_empty());
    assert_eq!(
        project.executions().len(),
        5,
        "nothing runs when the lock refuses"
    );
}

#[test]
fn verify_detects_nondeterministic_stage() {
    let project = Project::new();
    project.write(
        "p.yaml",
        &pipeline(&[
            stage("steady", "echo 42 > {out}/f.txt", "{}", "{}"),
            stage("clock", "date +%s%N > {out}/f.txt", "{}", "{}"),
        ]),
    );
    project.run(&[]).assert_code(0);

    let verify = project.run(&["--verify"]);
    verify.assert_code(1);
    assert_eq!(verify.statuses()["steady"], "verified");
    assert_eq!(verify.statuses()["clock"], "mismatch");
    assert!(
        verify.stderr.contains("stage `clock` does not reproduce"),
        "{}",
        verify.stderr
    );
    assert_eq!(
        project
            .executions()
            .iter()
            .filter(|s| *s == "steady")
            .count(),
        2,
        "--verify recomputes cached stages"
    );
}

#[test]
fn verify_passes_a_deterministic_pipeline() {
    let project = diamond_project();
    project.run(&[]).assert_code(0);
    let verify = project.run(&["--verify"]);
    verify.assert_code(0);
    assert_eq!(
        verify.with_status("verified"),
        names(&["a", "b", "c", "d", "e"])
    );
}

#[test]
fn editing_a_file_inside_an_external_folder_reruns_its_consumers() {
    let project = Project::new();
    project.write("data/one.txt", "1\n");
    project.write("data/two.txt", "2\n");
    project.write(
        "p.yaml",
        &pipeline(&[stage(
            "a",
            "cat {inputs.d}/one.txt {inputs.d}/two.txt > {out}/f.txt",
            "{ d: data }",
            "{}",
        )]),
    );
    project.run(&[]).assert_code(0);
    assert_eq!(project.run(&[]).with_status("cached"), names(&["a"]));

    project.write("data/two.txt", "3\n");
    assert_eq!(
        project.run(&[]).with_status("ran"),
        names(&["a"]),
        "a changed file inside the folder"
    );
    project.write("data/three.txt", "\n");
    assert_eq!(
        project.run(&[]).with_status("ran"),
        names(&["a"]),
        "a file added to the folder"
    );
    std::fs::rename(
        project.path("data/three.txt"),
        project.path("data/four.txt"),
    )
    .unwrap();
    assert_eq!(
        project.run(&[]).with_status("ran"),
        names(&["a"]),
        "a file renamed inside the folder"
    );
}

#[test]
fn after_orders_stages_without_entering_keys() {
    // `b` waits for `a` without reading it: it runs after `a`, and adding or removing
    // the `after:` edge does not rerun it.
    let project = Project::new();
    let b = stage("b", "cat stamp > {out}/f.txt", "{}", "{}")
        .replace("    outputs:", "    after: [a]\n    outputs:");
    project.write(
        "p.yaml",
        &pipeline(&[
            b.clone(),
            stage("a", "echo from-a > stamp; echo a > {out}/f.txt", "{}", "{}"),
        ]),
    );
    let first = project.run(&[]);
    first.assert_code(0);
    assert_eq!(project.executions(), ["a", "b"], "`after:` puts a before b");
    assert_eq!(
        std::fs::read_to_string(first.output_dir("b").join("f.txt")).unwrap(),
        "from-a\n"
    );

    project.write(
        "p.yaml",
        &project.read("p.yaml").replace("    after: [a]\n", ""),
    );
    assert_eq!(project.run(&[]).with_status("cached"), names(&["a", "b"]));
}

#[test]
fn missing_artifact_is_reported_and_recomputed() {
    let project = diamond_project();
    let first = project.run(&[]);
    first.assert_code(0);
    let object = first.output_dir("c");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("chmod -R u+w {0} && rm -r {0}", object.display()))
        .status()
        .unwrap();
    assert!(status.success());

    let rerun = project.run(&[]);
    rerun.assert_code(0);
    assert_eq!(rerun.with_status("ran"), names(&["c"]));
    let digest = object.file_name().unwrap().to_str().unwrap();
    assert!(
        rerun
            .stderr
            .contains(&format!("warning: artifact {digest}"))
            && rerun.stderr.contains("is missing"),
        "{}",
        rerun.stderr
    );
}
