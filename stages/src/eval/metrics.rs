//! Perplexity from per-token negative log-likelihoods, and BENCH.md's exact-match rule.

use candle_core::{DType, Tensor};

use crate::algo::masked::masked_mean;
use crate::algo::AlgoError;

/// `exp(mean NLL)` over the tokens the mask selects.
///
/// Shapes: `token_nll` and `mask` `(b, t)` (or any equal shapes), the mask 1 on completion
/// tokens. One batch; for a dataset use [`PerplexityAccumulator`], which weighs every token
/// equally across batches (the mean of per-batch perplexities would not).
pub fn perplexity(token_nll: &Tensor, mask: &Tensor) -> Result<f64, AlgoError> {
    let mean = masked_mean(token_nll, mask)?;
    let mean = mean
        .to_dtype(DType::F64)
        .and_then(|m| m.to_scalar::<f64>())
        .map_err(|source| AlgoError::Tensor {
            function: "perplexity",
            source,
        })?;
    Ok(mean.exp())
}

/// Sums NLL and token counts over batches: perplexity = `exp(Σ nll / Σ tokens)`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerplexityAccumulator {
    pub total_nll: f64,
    pub tokens: f64,
}

impl PerplexityAccumulator {
    /// Adds one batch: `token_nll` and `mask` of equal shapes.
    pub fn add(&mut self, token_nll: &Tensor, mask: &Tensor) -> Result<(), AlgoError> {
        let f = |source| AlgoError::Tensor {
            function: "PerplexityAccumulator::add",
            source,
        };
        let mask = crate::algo::masked::mask_like("PerplexityAccumulator::add", token_nll, mask)?;
        let sum = |t: &Tensor| {
            t.to_dtype(DType::F64)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar::<f64>())
        };
        self.total_nll += sum(&(token_nll * &mask).map_err(f)?).map_err(f)?;
        self.tokens += sum(&mask).map_err(f)?;
        Ok(())
    }

    /// The perplexity so far; `None` before any selected token.
    pub fn perplexity(&self) -> Option<f64> {
        (self.tokens > 0.0).then(|| (self.total_nll / self.tokens).exp())
    }
}

/// Python's `str.strip()` whitespace: Unicode White_Space plus the separators U+001C..U+001F.
fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The answer a generated completion gives: its text up to the first `\n`, stripped
/// (BENCH.md; `parse_answer` in shared/bench/trl/common.py: `text.split("\n")[0].strip()`).
pub fn answer_from_completion(text: &str) -> &str {
    text.split('\n')
        .next()
        .unwrap_or("")
        .trim_matches(is_python_whitespace)
}

/// BENCH.md's exact match: the completion's answer equals the gold answer, stripped
/// (`parse_answer(text) == row["completion"].strip()`).
pub fn exact_match(completion: &str, gold_answer: &str) -> bool {
    answer_from_completion(completion) == gold_answer.trim_matches(is_python_whitespace)
}
