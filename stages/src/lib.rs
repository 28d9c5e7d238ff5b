//! The stage kinds of rlhf and the ML they share.
//!
//! - [`model`]: causal LMs (Llama family), LoRA, heads, KV-cache generation.
//! - [`data`]: dataset sources and formats, prompt templates, tokenizers, batching.
//! - [`algo`]: losses and estimators as pure functions (GAE, KL, PPO, GRPO, DPO).
//! - [`eval`]: evaluation metrics (ROUGE as rouge-score computes it, perplexity, exact match).
//! - [`hub`]: `hf://` references fetched and cached through hf-hub.
//! - [`report`]: the static HTML report of a pipeline (curves and evaluation tables).
//! - [`label`]: human preference labelling (the `human` judge, the `rlhf label` server).
//! - [`parallel`]: data-parallel shards of a batch, one per thread.
//! - [`kinds`]: one module per stage kind, registered in [`registry`].

pub mod algo;
pub mod data;
pub mod eval;
pub mod hub;
pub mod kinds;
pub mod label;
pub mod model;
pub mod parallel;
pub mod report;
pub mod rl;
mod simd;
pub mod testing;
pub mod train;

/// Every stage kind this crate provides.
pub fn registry() -> rlhf_engine::Registry {
    let mut registry = rlhf_engine::Registry::new();
    kinds::register_all(&mut registry);
    registry
}

/// Access to the Hugging Face hub for `hf://` references, configured from the
/// environment (HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN).
pub fn hub_resolver() -> Option<Box<dyn rlhf_engine::hub::HubResolver>> {
    Some(Box::new(hub::HfHubResolver::from_env()))
}
