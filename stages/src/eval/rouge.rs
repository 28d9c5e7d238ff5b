//! ROUGE-1, ROUGE-2 and ROUGE-L exactly as Google's `rouge-score` package computes them.
//!
//! Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries". Tokenisation,
//! n-gram counting and the LCS follow `rouge_score/tokenize.py` and `rouge_scorer.py`
//! (`RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=...)`); stemming is NLTK's
//! Porter stemmer ([`super::porter`]). Scores are `target` (the reference) against
//! `prediction`.

use std::collections::HashMap;

use super::porter;

/// Precision, recall and F1 of one ROUGE variant, each in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct RougeScore {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

impl RougeScore {
    /// Builds a score from precision and recall; F1 is 0 when both are 0 (`scoring.fmeasure`).
    fn new(precision: f64, recall: f64) -> Self {
        let fmeasure = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        Self {
            precision,
            recall,
            fmeasure,
        }
    }
}

/// The three scores the `evaluate` stage reports.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct RougeScores {
    pub rouge1: RougeScore,
    pub rouge2: RougeScore,
    #[serde(rename = "rougeL")]
    pub rouge_l: RougeScore,
}

/// rouge-score's tokenizer: lower-case, every run of characters other than `[a-z0-9]`
/// becomes a space, split on whitespace, Porter-stem tokens longer than 3 characters when
/// `use_stemmer`, drop empty tokens.
pub fn tokenize(text: &str, use_stemmer: bool) -> Vec<String> {
    let lowered = text.to_lowercase();
    let cleaned: String = lowered
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                ' '
            }
        })
        .collect();
    cleaned
        .split_ascii_whitespace()
        .map(|token| {
            if use_stemmer && token.len() > 3 {
                porter::stem(token)
            } else {
                token.to_string()
            }
        })
        .filter(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        .collect()
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    if n == 0 || tokens.len() < n {
        return counts;
    }
    for window in tokens.windows(n) {
        *counts.entry(window).or_insert(0) += 1;
    }
    counts
}

/// ROUGE-N from token lists: clipped n-gram overlap over the prediction's n-grams
/// (precision) and the target's (recall), each denominator at least 1 (`_score_ngrams`).
pub fn rouge_n(target: &[String], prediction: &[String], n: usize) -> RougeScore {
    let target_counts = ngram_counts(target, n);
    let prediction_counts = ngram_counts(prediction, n);
    let overlap: usize = target_counts
        .iter()
        .map(|(ngram, count)| (*count).min(prediction_counts.get(ngram).copied().unwrap_or(0)))
        .sum();
    let target_total: usize = target_counts.values().sum();
    let prediction_total: usize = prediction_counts.values().sum();
    RougeScore::new(
        overlap as f64 / prediction_total.max(1) as f64,
        overlap as f64 / target_total.max(1) as f64,
    )
}

/// Length of the longest common subsequence of two token lists (O(n·m) time, O(m) space).
fn lcs_length(target: &[String], prediction: &[String]) -> usize {
    let mut previous = vec![0usize; prediction.len() + 1];
    let mut current = vec![0usize; prediction.len() + 1];
    for target_token in target {
        for (j, prediction_token) in prediction.iter().enumerate() {
            current[j + 1] = if target_token == prediction_token {
                previous[j] + 1
            } else {
                previous[j + 1].max(current[j])
            };
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[prediction.len()]
}

/// ROUGE-L from token lists: LCS / |prediction| and LCS / |target|; all zero when either
/// side is empty (`_score_lcs`).
pub fn rouge_l(target: &[String], prediction: &[String]) -> RougeScore {
    if target.is_empty() || prediction.is_empty() {
        return RougeScore::default();
    }
    let lcs = lcs_length(target, prediction) as f64;
    RougeScore::new(lcs / prediction.len() as f64, lcs / target.len() as f64)
}

/// ROUGE-1, ROUGE-2 and ROUGE-L of `prediction` against the reference `target`, as
/// `RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer).score(target, prediction)`.
pub fn rouge_scores(target: &str, prediction: &str, use_stemmer: bool) -> RougeScores {
    let target_tokens = tokenize(target, use_stemmer);
    let prediction_tokens = tokenize(prediction, use_stemmer);
    RougeScores {
        rouge1: rouge_n(&target_tokens, &prediction_tokens, 1),
        rouge2: rouge_n(&target_tokens, &prediction_tokens, 2),
        rouge_l: rouge_l(&target_tokens, &prediction_tokens),
    }
}
