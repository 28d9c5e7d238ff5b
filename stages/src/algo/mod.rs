//! Losses and estimators as small documented pure functions.
//!
//! Each function takes and returns candle tensors, documents its shapes, formula and source,
//! and is checked against reference numbers from PyTorch / TRL formulas in
//! `stages/tests/algo_*.rs` (scripts and JSON under `stages/tests/reference/`). Losses use
//! only primitive ops, so gradients flow (candle 0.11's fused ops would drop them).

pub mod dpo;
mod error;
pub mod gae;
pub mod grpo;
pub mod kl;
pub mod lm;
pub mod masked;
pub mod ops;
pub mod optim;
pub mod ppo;
pub mod reward;
pub mod schedule;

pub use error::AlgoError;
