//! ROUGE and the Porter stemmer against Google's rouge-score and NLTK.
//!
//! Expected numbers: `stages/tests/reference/algo_eval_rouge.json`, written by
//! `stages/tests/reference/algo_eval_rouge.py` with rouge-score's `RougeScorer` and NLTK's
//! `PorterStemmer` themselves. Regenerate from the repo root with
//!     /work/pyenv/bin/python stages/tests/reference/algo_eval_rouge.py

use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use rlhf_stages::eval::metrics::{
    answer_from_completion, exact_match, perplexity, PerplexityAccumulator,
};
use rlhf_stages::eval::porter::stem;
use rlhf_stages::eval::rouge::{rouge_scores, RougeScore};
use serde_json::Value;

fn reference() -> &'static Value {
    static REFERENCE: OnceLock<Value> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/reference/algo_eval_rouge.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).expect("reference JSON is committed"))
            .expect("parses")
    })
}

fn check(actual: &RougeScore, expected: &Value, what: &str) {
    for (name, value) in [
        ("precision", actual.precision),
        ("recall", actual.recall),
        ("fmeasure", actual.fmeasure),
    ] {
        let want = expected[name].as_f64().unwrap();
        assert!(
            (value - want).abs() <= 1e-6,
            "{what} {name}: {value} vs rouge-score {want}"
        );
    }
}

#[test]
fn porter_stemmer_matches_nltk_on_every_word_of_the_table() {
    let table = reference()["stems"].as_object().unwrap();
    assert!(table.len() > 2000);
    let wrong: Vec<String> = table
        .iter()
        .filter(|(word, expected)| stem(word) != expected.as_str().unwrap())
        .map(|(word, expected)| format!("{word}: ours {} nltk {}", stem(word), expected))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} differ:\n{}",
        wrong.len(),
        table.len(),
        wrong.join("\n")
    );
}

#[test]
fn rouge_matches_rouge_score_on_all_pairs_with_and_without_stemming() {
    let pairs = reference()["pairs"].as_array().unwrap();
    assert!(pairs.len() >= 30);
    for (index, pair) in pairs.iter().enumerate() {
        let (target, prediction) = (
            pair["target"].as_str().unwrap(),
            pair["prediction"].as_str().unwrap(),
        );
        for (use_stemmer, key) in [(true, "stemmed"), (false, "unstemmed")] {
            let scores = rouge_scores(target, prediction, use_stemmer);
            let what = format!("pair {index} ({key}) {target:?} / {prediction:?}");
            check(
                &scores.rouge1,
                &pair[key]["rouge1"],
                &format!("{what} rouge1"),
            );
            check(
                &scores.rouge2,
                &pair[key]["rouge2"],
                &format!("{what} rouge2"),
            );
            check(
                &scores.rouge_l,
                &pair[key]["rougeL"],
                &format!("{what} rougeL"),
            );
        }
    }
}

#[test]
fn perplexity_is_exp_of_the_mean_nll_over_masked_tokens() {
    let nll = Tensor::new(&[[1.0f64, 2.0, 9.0], [3.0, 9.0, 9.0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1.0f64, 1.0, 0.0], [1.0, 0.0, 0.0]], &Device::Cpu).unwrap();
    assert!((perplexity(&nll, &mask).unwrap() - 2f64.exp()).abs() < 1e-12);
    // Across batches every token weighs the same: (1 + 2 + 3 + 5) / 4, not a mean of means.
    let mut accumulator = PerplexityAccumulator::default();
    accumulator.add(&nll, &mask).unwrap();
    let second = Tensor::new(&[[5.0f64]], &Device::Cpu).unwrap();
    accumulator
        .add(&second, &second.ones_like().unwrap())
        .unwrap();
    assert!((accumulator.perplexity().unwrap() - 2.75f64.exp()).abs() < 1e-12);
    assert_eq!(PerplexityAccumulator::default().perplexity(), None);
}

#[test]
fn exact_match_takes_the_text_up_to_the_first_newline_stripped() {
    assert_eq!(answer_from_completion(" 154\nQ: 1+1=\nA: 2"), "154");
    assert!(exact_match(" 154\n", " 154"));
    assert!(exact_match("\t154 \r\nrest", "154"));
    assert!(!exact_match("1545", "154"));
    assert!(
        !exact_match("\n154", "154"),
        "an empty first line is the answer"
    );
    assert!(!exact_match("15 4", "154"));
}
