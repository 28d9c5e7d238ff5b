//! The rule judge and file labels score completions as documented (no model needed).

use rlhf_stages::data::row::Row;
use rlhf_stages::rl::judge::{FileLabels, RuleJudge};
use rlhf_stages::rl::run_log::{step_prompts, step_seed};

fn row(answer: &str) -> Row {
    Row {
        prompt: Some("Q: 1+1=\nA:".into()),
        answer: Some(answer.into()),
        ..Row::default()
    }
}

#[test]
fn rule_judge_scores_exact_match_on_the_first_line_only() {
    let judge = RuleJudge::default();
    assert_eq!(judge.score(&row("2"), " 2"), 1.0);
    assert_eq!(judge.score(&row("2"), " 2\nQ: 5+5="), 1.0);
    assert_eq!(judge.score(&row("2"), " 22"), 0.0);
    assert_eq!(
        judge.score(&Row::default(), " 2"),
        0.0,
        "no gold answer scores as wrong"
    );
}

#[test]
fn rule_judge_adds_the_substring_reward_and_subtracts_the_length_penalty() {
    let judge = RuleJudge {
        exact_match: true,
        correct_reward: 2.0,
        wrong_reward: -1.0,
        contains: Some("7".into()),
        contains_reward: 0.5,
        min_chars: Some(2),
        max_chars: Some(3),
        length_penalty: 0.25,
        numeric_tolerance: None,
        numeric_reward: 1.0,
    };
    assert_eq!(judge.score(&row("17"), " 17"), 2.5);
    assert_eq!(judge.score(&row("17"), " 1"), -1.25, "too short");
    assert_eq!(
        judge.score(&row("17"), " 1777"),
        -1.0 + 0.5 - 0.25,
        "too long"
    );
}

#[test]
fn file_labels_list_a_prompts_completions_and_look_up_scores() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labels.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\":\"a\",\"completion\":\" x\",\"score\":1}\n{\"prompt\":\"ab\",\"completion\":\" y\",\"score\":2}\n{\"prompt\":\"a\",\"completion\":\" z\",\"score\":-1}\n",
    )
    .unwrap();
    let labels = FileLabels::load(dir.path()).unwrap();
    assert_eq!(
        labels.completions_of("a"),
        vec![(" x".to_string(), 1.0), (" z".to_string(), -1.0)]
    );
    assert_eq!(labels.score("ab", " y"), Some(2.0));
    assert_eq!(labels.score("ab", " x"), None);
}

#[test]
fn step_prompts_cover_every_row_once_per_epoch_and_depend_only_on_seed_and_step() {
    let rows = 10;
    let mut seen: Vec<usize> = (0..5).flat_map(|s| step_prompts(rows, 2, 9, s)).collect();
    seen.sort();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    assert_eq!(step_prompts(rows, 3, 9, 4), step_prompts(rows, 3, 9, 4));
    // Step 3 of 3 rows each spans the epoch boundary (rows 9, then the next epoch's first two).
    assert_eq!(step_prompts(rows, 3, 9, 3).len(), 3);
    assert_ne!(step_seed(9, 0), step_seed(9, 1));
}

#[test]
fn rule_judge_gives_numeric_partial_credit_within_the_tolerance() {
    let judge = RuleJudge {
        numeric_tolerance: Some(10.0),
        numeric_reward: 0.5,
        ..RuleJudge::default()
    };
    assert_eq!(judge.score(&row("20"), " 20"), 1.0 + 0.5);
    assert_eq!(judge.score(&row("20"), " 16"), 0.5 * 0.6);
    assert_eq!(judge.score(&row("-3"), " 30"), 0.0, "beyond the tolerance");
    assert_eq!(judge.score(&row("20"), " twenty"), 0.0, "not a number");
}
