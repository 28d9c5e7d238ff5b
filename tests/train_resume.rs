//! Kill-and-resume of a training stage through the real binary: an `sft` run is SIGKILLed
//! once it has checkpointed, the next `rlhf run` resumes from the checkpoint, and the
//! adapter it commits has the same digest as an uninterrupted run's (tiny model, seconds).

mod common;

use common::Project;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const STEPS: usize = 200;

fn pipeline(tokenizer: &Path) -> String {
    format!(
        r#"name: resume
seed: 3
stages:
  pairs: {{ kind: dataset, source: sft.jsonl }}
  base:
    kind: load_pretrained
    init: {{ hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
            intermediate_size: 64, max_position_embeddings: 64, tokenizer: "{}" }}
  sft:
    kind: sft
    model: base
    data: pairs
    template: "{{prompt}}"
    lora: {{ r: 4, alpha: 8, dropout: 0.1, targets: all-linear }}
    batch_size: 4
    max_steps: {STEPS}
    checkpoint_every: 5
"#,
        tokenizer.display()
    )
}

/// A project with the pipeline and 200 SFT rows of the BENCH.md data; `None` without ../shared.
fn project() -> Option<Project> {
    let tokenizer = rlhf_stages::testing::shared_path("bench/trl/tokenizer")?;
    let data = rlhf_stages::testing::shared_path("bench/trl/data/sft.jsonl")?;
    let project = Project::new();
    let text = std::fs::read_to_string(data).unwrap();
    let rows: Vec<&str> = text.lines().take(200).collect();
    project.write("sft.jsonl", &(rows.join("\n") + "\n"));
    project.write("p.yaml", &pipeline(&tokenizer));
    Some(project)
}

/// The step of the newest checkpoint under `dir` (any `checkpoints/latest`), if any.
fn latest_checkpoint_step(dir: &Path) -> Option<usize> {
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "latest")
                && p.parent().is_some_and(|d| d.ends_with("checkpoints"))
            {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                return text.trim().trim_start_matches("step-").parse().ok();
            }
        }
    }
    None
}

fn sft_digest(run: &common::Run) -> String {
    let stages = run.stages();
    let sft = stages
        .iter()
        .find(|s| s["stage"] == "sft")
        .expect("sft in --json");
    sft["outputs"]["model"]["digest"]
        .as_str()
        .expect("digest")
        .to_string()
}

#[test]
fn sft_killed_mid_run_resumes_and_commits_the_uninterrupted_digest() {
    let Some(project) = project() else { return };
    let straight = project.rlhf_with(project.command_with_cache(
        &["run", "p.yaml", "--json"],
        &project.path("cache-straight"),
    ));
    straight.assert_code(0);
    let expected = sft_digest(&straight);

    let mut child = project
        .command(&["run", "p.yaml", "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn rlhf");
    let started = Instant::now();
    let killed_after = loop {
        if let Some(step) = latest_checkpoint_step(&project.cache()) {
            if step >= 20 {
                child.kill().expect("SIGKILL rlhf"); // Child::kill is SIGKILL on Unix
                break step;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("rlhf finished ({status}) before it could be killed mid-way");
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    child.wait().unwrap();
    assert!(killed_after < STEPS, "killed after the last step");

    let resumed = project.run(&[]);
    resumed.assert_code(0);
    assert!(
        resumed.stderr.contains("resumed at step"),
        "the rerun did not resume:\n{}",
        resumed.stderr
    );
    assert_eq!(
        sft_digest(&resumed),
        expected,
        "resumed run committed other bytes"
    );
}
