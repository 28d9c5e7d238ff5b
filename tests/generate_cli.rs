//! `rlhf generate` end to end: a completion from a cached model equals the library's
//! greedy completion through the same template, `--interactive` answers every stdin
//! line, sampling is seeded, and an uncached stage says to run it first.

mod common;

use common::Project;
use rlhf_stages::kinds::evaluate::models::load_model;
use rlhf_stages::kinds::evaluate::scoring::complete_prompt;
use rlhf_stages::model::GenerationSettings;
use std::io::Write;
use std::process::Stdio;

fn project(fixture: &std::path::Path) -> Project {
    let project = Project::new();
    project.write(
        "p.yaml",
        &format!(
            "name: chat\nseed: 1\nstages:\n  base:\n    kind: load_pretrained\n    model: {}\n",
            fixture.display()
        ),
    );
    project
}

fn greedy(fixture: &std::path::Path, prompt: &str, max_new_tokens: usize) -> String {
    let loaded = load_model(fixture, &|_| None).unwrap();
    let settings = GenerationSettings {
        max_new_tokens,
        eos_token_ids: loaded.eos_token_ids.clone(),
        pad_token_id: loaded.special.pad,
        ..GenerationSettings::greedy()
    };
    complete_prompt(&loaded, prompt, &settings).unwrap()
}

#[test]
fn generate_prints_the_greedy_completion_through_the_template() {
    let Some(fixture) = rlhf_stages::testing::shared_path("fixtures/tiny-llama") else {
        return;
    };
    let project = project(&fixture);
    let missing = project.rlhf(&["generate", "p.yaml", "base", "--prompt", "Q: 2+2="]);
    missing.assert_code(1);
    assert!(
        missing.stderr.contains("not cached")
            && missing.stderr.contains("rlhf run p.yaml --until base"),
        "{}",
        missing.stderr
    );

    project.run(&[]).assert_code(0);
    let out = project.rlhf(&[
        "generate",
        "p.yaml",
        "base",
        "--prompt",
        "Q: 2+2=",
        "--max-new-tokens",
        "8",
    ]);
    out.assert_code(0);
    let expected = greedy(&fixture, "Q: 2+2=", 8);
    assert_eq!(out.stdout, format!("{expected}\n"));
    assert!(!expected.is_empty());
}

#[test]
fn interactive_mode_answers_each_stdin_line_until_eof() {
    let Some(fixture) = rlhf_stages::testing::shared_path("fixtures/tiny-llama") else {
        return;
    };
    let project = project(&fixture);
    project.run(&[]).assert_code(0);
    let mut command = project.command(&[
        "generate",
        "p.yaml",
        "base",
        "--interactive",
        "--max-new-tokens",
        "6",
    ]);
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Q: 1+1=\n\nQ: 9-3=\\nA:\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    let expected = format!(
        "{}\n{}\n",
        greedy(&fixture, "Q: 1+1=", 6),
        greedy(&fixture, "Q: 9-3=\nA:", 6)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        expected,
        "blank lines are skipped; `\\n` stands for a newline"
    );
}

#[test]
fn sampling_is_reproducible_for_a_seed() {
    let Some(fixture) = rlhf_stages::testing::shared_path("fixtures/tiny-llama") else {
        return;
    };
    let project = project(&fixture);
    project.run(&[]).assert_code(0);
    let sample = |seed: &str| {
        let run = project.rlhf(&[
            "generate",
            "p.yaml",
            "base",
            "--prompt",
            "Hello",
            "--temperature",
            "1.5",
            "--seed",
            seed,
            "--max-new-tokens",
            "12",
        ]);
        run.assert_code(0);
        run.stdout
    };
    assert_eq!(sample("3"), sample("3"));
    assert_ne!(
        sample("3"),
        sample("4"),
        "a different seed draws different tokens"
    );
    let unknown = project.rlhf(&["generate", "p.yaml", "bsae", "--prompt", "x"]);
    unknown.assert_code(2);
    assert!(
        unknown.stderr.contains("did you mean `base`"),
        "{}",
        unknown.stderr
    );
}
