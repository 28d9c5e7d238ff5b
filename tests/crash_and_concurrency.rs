//! A run killed mid-stage, and two runs on one cache at once: the cache stays
//! consistent and every stage executes exactly once.

mod common;

use common::{names, pipeline, stage, Project};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

#[test]
fn sigkill_mid_stage_leaves_cache_consistent() {
    // `b` writes half its output, drops a marker, then sleeps (only the first time,
    // while the marker does not exist yet): the test kills rlhf there.
    let project = Project::new();
    project.write(
        "p.yaml",
        &pipeline(&[
            stage("a", "echo a > {out}/f.txt", "{}", "{}"),
            stage(
                "b",
                "echo first-half > {out}/f.txt; if [ ! -e started ]; then touch started; sleep 30; fi; echo second-half >> {out}/f.txt",
                "{ a: a }",
                "{}",
            ),
            stage("c", "cat {inputs.b}/f.txt > {out}/f.txt", "{ b: b }", "{}"),
        ]),
    );
    let mut command = project.command(&["run", "p.yaml", "--json"]);
    // Its own process group, so the kill takes rlhf and the stage's shell together.
    command
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !project.path("started").exists() {
        assert!(Instant::now() < deadline, "stage b never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    assert!(killed.success());
    child.wait().unwrap();
    assert_eq!(project.records(), 1, "only `a` finished before the kill");

    let rerun = project.run(&[]);
    rerun.assert_code(0);
    assert_eq!(rerun.statuses()["a"], "cached");
    assert_eq!(
        rerun.with_status("ran"),
        names(&["b", "c"]),
        "the interrupted stage and its dependent run"
    );
    let output = std::fs::read_to_string(rerun.output_dir("c").join("f.txt")).unwrap();
    assert_eq!(
        output, "first-half\nsecond-half\n",
        "no partial artifact was trusted"
    );
    project.rlhf(&["cache", "verify"]).assert_code(0);
    assert_eq!(
        project.run(&[]).with_status("cached"),
        names(&["a", "b", "c"])
    );
}

#[test]
fn concurrent_runs_execute_each_stage_once() {
    // Each stage appends its name to runs.log (outside the cache) and takes a moment,
    // so the two runs overlap on every stage.
    let project = Project::new();
    let mut stages = vec![stage("s0", "sleep 0.1; echo 0 > {out}/f.txt", "{}", "{}")];
    for i in 1..6 {
        let script = format!(
            "sleep 0.1; cat {{inputs.up}}/f.txt > {{out}}/f.txt; echo {i} >> {{out}}/f.txt"
        );
        stages.push(stage(
            &format!("s{i}"),
            &script,
            &format!("{{ up: s{} }}", i - 1),
            "{}",
        ));
    }
    stages.push(stage(
        "side",
        "sleep 0.1; echo side > {out}/f.txt",
        "{}",
        "{}",
    ));
    project.write("p.yaml", &pipeline(&stages));

    let spawn = || {
        project
            .command(&["run", "p.yaml", "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    let outputs = [
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    ];
    for output in &outputs {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut executions = project.executions();
    executions.sort();
    assert_eq!(
        executions,
        names(&["s0", "s1", "s2", "s3", "s4", "s5", "side"]),
        "every stage executed exactly once"
    );
    // Each stage ran in one run and was found cached by the other.
    for name in ["s0", "s1", "s2", "s3", "s4", "s5", "side"] {
        let statuses: Vec<String> = outputs
            .iter()
            .map(|o| {
                let run = common::Run {
                    code: 0,
                    stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                    stderr: String::new(),
                };
                run.statuses()[name].clone()
            })
            .collect();
        let mut sorted = statuses.clone();
        sorted.sort();
        assert_eq!(sorted, ["cached", "ran"], "stage {name}: {statuses:?}");
    }
    project.rlhf(&["cache", "verify"]).assert_code(0);
}
