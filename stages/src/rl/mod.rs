//! What the RL stage kinds (`collect_preferences`, `grpo`, `ppo`) share:
//!
//! - [`judge`]: scoring completions — the rule judge (exact match against a row's gold
//!   answer, a required substring, length bounds), a reward-model artifact, or labels from
//!   a jsonl file.
//! - [`rollout`]: seeded, batched sampling of completions with the KV-cache generator, and
//!   the right-padded prompt+completion batches the losses are computed on.
//! - [`run_log`]: per-step metric lines replayed on resume, checkpoints (the training
//!   stages' format), and the per-step seeds that make a resumed run equal a straight one.
//!
//! Determinism: the prompts of RL step `s` and the sampling seed of step `s` are functions
//! of (stage seed, s) alone, so a checkpoint holds only the trainable weights, the optimiser
//! state, the step and the metric lines.

pub mod judge;
pub mod policy;
pub mod rl_loop;
pub mod rollout;
pub mod run_log;
