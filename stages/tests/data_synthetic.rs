//! The built-in arithmetic generator: right answers, seeded determinism, distinct
//! problems, and the exact layout of the TRL reference data (bench/trl/data).

use rlhf_stages::data::row::{read_rows, Row};
use rlhf_stages::data::synthetic::{generate, words, Operation, SyntheticSpec};
use rlhf_stages::testing::shared_path;
use std::collections::{HashMap, HashSet};

fn spec(count: usize) -> SyntheticSpec {
    serde_json::from_value(serde_json::json!({ "count": count })).unwrap()
}

/// (a, operation, b) parsed back out of "Q: 12+7=\nA:".
fn parse_prompt(prompt: &str) -> (i64, char, i64) {
    let body = prompt
        .strip_prefix("Q: ")
        .unwrap()
        .strip_suffix("=\nA:")
        .unwrap();
    let at = body[1..].find(['+', '-', '*']).unwrap() + 1;
    let operation = body[at..].chars().next().unwrap();
    (
        body[..at].parse().unwrap(),
        operation,
        body[at + 1..].parse().unwrap(),
    )
}

#[test]
fn every_row_carries_the_right_answer_in_every_shape() {
    let rows = generate(&spec(2000), 1234).unwrap();
    assert_eq!(rows.len(), 2000);
    for row in &rows {
        let (a, operation, b) = parse_prompt(row.prompt.as_deref().unwrap());
        let answer = match operation {
            '+' => a + b,
            '-' => a - b,
            _ => unreachable!("default operations are + and -"),
        };
        assert!((0..=99).contains(&a) && (0..=99).contains(&b));
        assert_eq!(row.answer.as_deref(), Some(answer.to_string().as_str()));
        assert_eq!(
            row.completion.as_deref(),
            Some(format!(" {answer}").as_str())
        );
        assert_eq!(row.chosen, row.completion);
        let rejected: i64 = row.rejected.as_deref().unwrap().trim().parse().unwrap();
        assert!(
            [-10, -3, -2, -1, 1, 2, 3, 10].contains(&(rejected - answer)),
            "{row:?}"
        );
        let text = row.text.as_deref().unwrap();
        let qa_line = format!("{} {answer}", row.prompt.as_deref().unwrap());
        assert!(
            text == qa_line || text.contains(&answer.to_string()) || text.contains(&words(answer)),
            "{text}"
        );
    }
}

#[test]
fn same_seed_same_rows_and_another_seed_other_rows() {
    assert_eq!(
        generate(&spec(500), 7).unwrap(),
        generate(&spec(500), 7).unwrap()
    );
    assert_ne!(
        generate(&spec(500), 7).unwrap(),
        generate(&spec(500), 8).unwrap()
    );
}

#[test]
fn problems_are_distinct_so_splits_hold_out_whole_problems() {
    let rows = generate(&spec(20_000), 3).unwrap();
    let prompts: HashSet<&str> = rows.iter().map(|r| r.prompt.as_deref().unwrap()).collect();
    assert_eq!(
        prompts.len(),
        20_000,
        "the whole 2 × 100 × 100 universe, each once"
    );
    let error = generate(&spec(20_001), 3).unwrap_err().to_string();
    assert!(error.contains("only 20000 exist"), "{error}");
}

#[test]
fn plain_sentences_make_up_about_the_requested_share_of_text() {
    let rows = generate(&spec(4000), 11).unwrap();
    let plain = rows
        .iter()
        .filter(|r| !r.text.as_deref().unwrap().starts_with("Q: "))
        .count();
    let share = plain as f64 / rows.len() as f64;
    assert!((0.085..0.115).contains(&share), "plain share {share}");
}

#[test]
fn operations_and_ranges_are_configurable() {
    let spec: SyntheticSpec = serde_json::from_value(serde_json::json!({
        "count": 300, "operations": ["*"], "min": -5, "max": 20, "plain_text_fraction": 0.0, "wrong_offsets": [5]
    }))
    .unwrap();
    assert_eq!(spec.operations, [Operation::Multiply]);
    for row in generate(&spec, 0).unwrap() {
        let (a, operation, b) = parse_prompt(row.prompt.as_deref().unwrap());
        assert_eq!(operation, '*');
        assert!((-5..=20).contains(&a) && (-5..=20).contains(&b));
        assert_eq!(row.answer, Some((a * b).to_string()));
        assert_eq!(row.rejected, Some(format!(" {}", a * b + 5)));
        assert_eq!(row.text, Some(format!("Q: {a}*{b}=\nA: {}", a * b)));
        assert_eq!(row.category.as_deref(), Some("multiplication"));
    }
}

#[test]
fn numbers_in_words_follow_the_reference_generator() {
    assert_eq!(words(0), "zero");
    assert_eq!(words(40), "forty");
    assert_eq!(words(86), "eighty-six");
    assert_eq!(words(168), "one hundred and sixty-eight");
    assert_eq!(words(100), "one hundred");
    assert_eq!(words(-23), "minus twenty-three");
}

#[test]
fn rows_have_the_exact_layout_of_the_trl_reference_files() {
    let Some(data) = shared_path("bench/trl/data") else {
        return;
    };
    // The whole universe, so every reference problem has a generated twin.
    let ours: HashMap<String, Row> = generate(&spec(20_000), 1)
        .unwrap()
        .into_iter()
        .map(|row| (row.prompt.clone().unwrap(), row))
        .collect();
    let twin = |row: &Row| {
        ours.get(row.prompt.as_deref().unwrap())
            .unwrap_or_else(|| panic!("{row:?}"))
            .clone()
    };
    for file in ["sft.jsonl", "eval.jsonl"] {
        for row in read_rows(&data.join(file)).unwrap() {
            assert_eq!(twin(&row).completion, row.completion, "{file}");
        }
    }
    for row in read_rows(&data.join("grpo.jsonl")).unwrap() {
        assert_eq!(twin(&row).answer, row.answer);
    }
    let value = |text: &Option<String>| -> i64 { text.as_deref().unwrap().trim().parse().unwrap() };
    for row in read_rows(&data.join("prefs.jsonl")).unwrap() {
        let ours = twin(&row);
        assert_eq!(ours.chosen, row.chosen);
        for pair in [&row, &ours] {
            let offset = value(&pair.rejected) - value(&pair.chosen);
            assert!([-10, -3, -2, -1, 1, 2, 3, 10].contains(&offset), "{pair:?}");
        }
    }
    // Q/A pretraining lines are the prompt, a space and the answer.
    for row in read_rows(&data.join("pretrain.jsonl")).unwrap() {
        let text = row.text.as_deref().unwrap();
        let Some(at) = text.find("\nA: ") else {
            continue;
        };
        let ours = twin(&Row {
            prompt: Some(format!("{}\nA:", &text[..at])),
            ..Row::default()
        });
        assert_eq!(
            format!("{} {}", ours.prompt.unwrap(), ours.answer.unwrap()),
            text
        );
    }
}
