//! The machinery the training stage kinds (pretrain, sft, reward_model, dpo) share, as
//! free functions rather than a trainer class (../shared/STYLE.md, torchtune row):
//!
//! - [`settings`]: the optimiser/schedule params every training kind accepts.
//! - [`model_input`]: "a model input", whatever its artifact kind (Model, Adapter → base +
//!   LoRA, RewardModel), with its tokenizer and prompt template; writing adapters.
//! - [`training_loop`]: one linear loop (micro-batches, accumulation, clip, AdamW step,
//!   schedule, metrics, eval, checkpoints) driven by a per-stage `micro_step` closure.
//! - [`checkpoint`]: atomic checkpoints in the stage's scratch dir, and resume.
//! - [`evaluation`]: held-out exact match by greedy generation (BENCH.md).
//!
//! Artifacts the training kinds write:
//!
//! | kind | artifact | files |
//! | --- | --- | --- |
//! | pretrain | model | config.json, model.safetensors (HF names), tokenizer files, template.json |
//! | sft, dpo (`lora`) | adapter | adapter_config.json + adapter_model.safetensors (PEFT names), base.json `{"base_model_digest"}`, tokenizer files, template.json |
//! | sft, dpo (`lora: null`) | model | as pretrain |
//! | reward_model | reward_model | as a model, plus `score.weight` (1, hidden); config.json says LlamaForSequenceClassification, num_labels 1, pad_token_id |
//! | reference_logprobs | files | reference_logprobs.safetensors (chosen, rejected, chosen_tokens, rejected_tokens), reference.json |
//!
//! Every one also holds metrics.jsonl (per step: loss, learning_rate, grad_norm, kind
//! extras; `eval_*` at step 0, every `eval_every` and the last step) and metrics.json.
//! Wall-clock figures (seconds, tokens/s, examples/s) go to the run log only.
//!
//! Determinism: the data order of epoch `e` is a function of (stage seed, e); LoRA
//! dropout of optimiser step `s` draws from ChaCha8(seed, stream s). Both are functions of
//! the step count, so a checkpoint only needs the weights, the optimiser state, the step
//! and the metric lines written so far. Checked: sft gives the same adapter digest with
//! RAYON_NUM_THREADS=1 and 2 (a tiny model, and 8 steps on the BENCH.md model with
//! candle's element-wise pool at 1 and 2 threads): candle's CPU matmul splits output
//! blocks, not the reduction, across threads. The kill-and-resume test checks resumed =
//! uninterrupted.
//!
//! Speed: candle's element-wise ops run on a spinning barrier pool (CANDLE_NUM_THREADS,
//! default = RAYON_NUM_THREADS). On a loaded 2-core machine the spinning costs 2× or more
//! (the libgomp trap of BENCH.md); `CANDLE_NUM_THREADS=1` keeps gemm on 2 rayon threads
//! and runs element-wise ops inline.

pub mod checkpoint;
pub mod evaluation;
pub mod model_input;
pub mod pairs;
pub mod settings;
pub mod training_loop;

use rlhf_engine::StageError;

/// Final hidden states (b, t, d) of a right-padded batch, each shared prompt run once
/// ([`crate::model::hidden_states_sharing_prompts`]).
pub fn batch_hidden_states(
    model: &crate::model::CausalLm,
    batch: &crate::data::batch::Batch,
    rng: Option<&mut rand_chacha::ChaCha8Rng>,
) -> Result<candle_core::Tensor, StageError> {
    let device = candle_core::Device::Cpu;
    let ids = batch.input_ids_tensor(&device).or_fail("batch")?; // (b, t)
    let attention = batch.attention_mask_tensor(&device).or_fail("batch")?; // (b, t)
    let mut rng = rng;
    crate::model::hidden_states_sharing_prompts(model, &batch.rows(), &ids, &attention, &mut rng)
        .or_fail("forward pass")
}

/// Next-token cross-entropy of a right-padded batch, averaged over the target tokens
/// where `batch.loss_mask` is 1 (position t predicts token t+1), with LoRA dropout drawn
/// from `rng`. The loss of pretraining (every token) and SFT (completions, or every token
/// when the batch's loss mask says so). Returns the loss and the number of tokens it
/// averages.
pub fn next_token_loss(
    model: &crate::model::CausalLm,
    batch: &crate::data::batch::Batch,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<(candle_core::Tensor, f64), StageError> {
    let device = candle_core::Device::Cpu;
    let time = batch.seq_len;
    let ids = batch.input_ids_tensor(&device).or_fail("batch")?; // (b, t)
    let loss_mask = batch.loss_mask_tensor(&device).or_fail("batch")?; // (b, t)
    let hidden = batch_hidden_states(model, batch, Some(rng))?; // (b, t, d)
    let logits = model.logits(&hidden).or_fail("forward pass")?; // (b, t, v)
    let target_mask = loss_mask.narrow(1, 1, time - 1).or_fail("shift")?; // (b, t-1)
    let scored = target_mask
        .to_dtype(candle_core::DType::F32)
        .and_then(|m| m.sum_all())
        .and_then(|m| m.to_scalar::<f32>())
        .or_fail("counting scored tokens")? as f64;
    // The fused log-softmax + gather reads the shifted logits in place and is one node
    // each way; the composite (`algo::lm::masked_token_cross_entropy`, the same
    // quantity) is about ten nodes over (b, t-1, vocab) tensors, each with its own
    // zero-filled gradient in backward.
    let logprobs = crate::model::logprobs::token_logprobs(
        &logits.narrow(1, 0, time - 1).or_fail("shift")?, // (b, t-1, v)
        &ids.narrow(1, 1, time - 1).or_fail("shift")?,    // (b, t-1)
    )
    .or_fail("next-token log-probabilities")?;
    let nll = logprobs.neg().or_fail("next-token loss")?;
    let loss = crate::algo::masked::masked_mean(&nll, &target_mask).or_fail("next-token loss")?;
    Ok((loss, scored))
}

/// Turns any error into a [`StageError`] that says what was being done.
pub trait StageResultExt<T> {
    fn or_fail(self, doing: &str) -> Result<T, StageError>;
}

impl<T, E: std::fmt::Display> StageResultExt<T> for Result<T, E> {
    fn or_fail(self, doing: &str) -> Result<T, StageError> {
        self.map_err(|e| StageError::failed(format!("{doing}: {e}")))
    }
}

/// The rows of the dataset input `name`.
pub fn read_dataset(
    ctx: &rlhf_engine::StageContext,
    name: &str,
) -> Result<Vec<crate::data::row::Row>, StageError> {
    let input = ctx.input(name)?;
    crate::data::row::read_rows(&input.path).or_fail(&format!("reading input `{name}`"))
}

/// Writes the wall-clock figures of a finished run to the run log (never the artifact).
pub fn log_throughput(
    ctx: &mut rlhf_engine::StageContext,
    summary: &training_loop::TrainSummary,
) -> Result<(), StageError> {
    let seconds = summary.seconds.max(1e-9);
    ctx.metrics.timing(
        summary.steps as u64,
        &[
            ("train_seconds", summary.seconds),
            ("train_tokens_per_second", summary.tokens as f64 / seconds),
            (
                "train_examples_per_second",
                summary.examples as f64 / seconds,
            ),
        ],
    )?;
    tracing::info!(
        stage = %ctx.stage,
        seconds = summary.seconds,
        tokens_per_second = summary.tokens as f64 / seconds,
        examples_per_second = summary.examples as f64 / seconds,
        "training finished"
    );
    eprintln!(
        "{}: {} steps in {:.1}s, {:.0} tokens/s, {:.1} examples/s",
        ctx.stage,
        summary.steps - summary.resumed_from_step,
        summary.seconds,
        summary.tokens as f64 / seconds,
        summary.examples as f64 / seconds
    );
    Ok(())
}

/// The metrics.json values every training kind writes.
pub fn set_summary_metrics(
    ctx: &mut rlhf_engine::StageContext,
    summary: &training_loop::TrainSummary,
    varmap: &candle_nn::VarMap,
    examples: usize,
) {
    ctx.metrics.set("steps", summary.steps as u64);
    ctx.metrics.set("examples", examples as u64);
    ctx.metrics.set("train_loss", summary.final_loss);
    let trainable: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    ctx.metrics.set("trainable_parameters", trainable as u64);
    for (name, value) in summary
        .history
        .last()
        .map(|l| l.values.clone())
        .unwrap_or_default()
    {
        if name.starts_with("eval_") {
            ctx.metrics.set(&name, value);
        }
    }
    if let Some(start) = summary.first_value("eval_accuracy") {
        ctx.metrics.set("eval_accuracy_start", start);
    }
}
