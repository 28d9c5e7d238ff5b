//! The stage kinds of rlhf and the ML they share.
//!
//! - [`model`]: causal LMs (Llama family), LoRA, heads, KV-cache generation.
//! - [`data`]: dataset sources and formats, prompt templates, tokenizers, batching.
//! - [`algo`]: losses and estimators as pure functions (GAE, KL, PPO, GRPO, DPO, ROUGE).
//! - [`kinds`]: one module per stage kind, registered in [`registry`].

pub mod algo;
pub mod data;
pub mod eval;
pub mod hub;
pub mod kinds;
pub mod model;
pub mod testing;

/// Every stage kind this crate provides.
pub fn registry() -> rlhf_engine::Registry {
    let mut registry = rlhf_engine::Registry::new();
    kinds::register_all(&mut registry);
    registry
}

/// Access to the Hugging Face hub for `hf://` references, if this build has it.
pub fn hub_resolver() -> Option<Box<dyn rlhf_engine::hub::HubResolver>> {
    None
}
