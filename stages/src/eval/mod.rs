//! Evaluation metrics: ROUGE as Google's rouge-score computes it, perplexity, exact match.

pub mod metrics;
pub mod porter;
pub mod rouge;
