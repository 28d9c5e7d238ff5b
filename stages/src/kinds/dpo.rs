//! Stage kind `dpo`: Direct Preference Optimisation of a policy against a frozen
//! reference whose log-probs come precomputed from a `reference_logprobs` stage (so a
//! rerun with another `beta` recomputes nothing but the training).
//!
//! ```yaml
//! ref: { kind: reference_logprobs, model: sft, data: prefs }
//! dpo:
//!   kind: dpo
//!   model: sft                   # the policy's start: an adapter keeps training its LoRA
//!   reference: ref
//!   data: prefs
//!   eval: arith.eval             # optional: held-out exact match
//!   beta: 0.1
//!   loss: sigmoid                # sigmoid | ipo | hinge
//!   label_smoothing: 0.0
//!   learning_rate: 2.0e-4
//!   batch_size: 16
//! ```
//!
//! Output: an adapter (model input a model + `lora`, or an adapter input) or a full model
//! (`lora: null` on a model input). Per-step metrics: loss, reward_accuracy,
//! chosen_rewards, rejected_rewards, margins; metrics.json: eval_accuracy(_start).

use crate::algo::dpo::{dpo_loss, DpoLossType};
use crate::data::batch::{collate_pairs, EncodedPair};
use crate::kinds::reference_logprobs::{read_reference, reference_info};
use crate::kinds::sft::{default_eval_max_new_tokens, default_lora};
use crate::model::LoraConfig;
use crate::train::evaluation::accuracy_metrics;
use crate::train::model_input::{resolve_model_input, write_trained_model, TextCodec};
use crate::train::pairs::{encode_pairs, pair_length, reply_logprobs, reply_token_counts};
use crate::train::settings::{
    default_checkpoint_every, default_max_length, default_true, OptimizerParams, TrainSettings,
};
use crate::train::training_loop::{run_training, MicroBatchOutput};
use crate::train::{log_throughput, read_dataset, set_summary_metrics, StageResultExt};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rlhf_engine::{
    ArtifactKind, InputPort, OutputPort, Ports, PortsError, Stage, StageContext, StageError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DpoParams {
    /// The policy to train: a model or adapter stage.
    pub model: String,
    /// A `reference_logprobs` stage computed on the same `data`.
    pub reference: String,
    /// Preference pairs (prompt, chosen, rejected).
    pub data: String,
    /// A held-out prompt/completion dataset: greedy exact match.
    #[serde(default)]
    pub eval: Option<String>,
    /// LoRA for a model input (`null`: full); an adapter input keeps its own adapter.
    #[serde(default = "default_lora")]
    pub lora: Option<LoraConfig>,
    #[serde(default = "default_beta")]
    pub beta: f64,
    #[serde(default)]
    pub loss: DpoLossType,
    #[serde(default)]
    pub label_smoothing: f64,
    /// Adds `rpo_alpha` × the chosen replies' per-token negative log-likelihood to the
    /// loss (RPO, Pang et al. 2024, arXiv:2404.19733; TRL `rpo_alpha`), which keeps DPO
    /// from lowering the likelihood of the right answers.
    #[serde(default)]
    pub rpo_alpha: Option<f64>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub add_bos: bool,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    #[serde(default)]
    pub max_steps: Option<usize>,
    #[serde(default)]
    pub optimizer: OptimizerParams,
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    #[serde(default)]
    pub eval_every: Option<usize>,
    #[serde(default = "default_true")]
    pub group_by_length: bool,
    #[serde(default = "default_eval_max_new_tokens")]
    pub eval_max_new_tokens: usize,
}

fn default_beta() -> f64 {
    0.1
}
fn default_learning_rate() -> f64 {
    2e-4
}
fn default_batch_size() -> usize {
    16
}
fn default_epochs() -> usize {
    1
}

impl DpoParams {
    fn settings(&self, seed: u64) -> TrainSettings {
        TrainSettings {
            learning_rate: self.learning_rate,
            batch_size: self.batch_size,
            epochs: self.epochs,
            max_steps: self.max_steps,
            optimizer: self.optimizer.clone(),
            checkpoint_every: self.checkpoint_every,
            eval_every: self.eval_every,
            group_by_length: self.group_by_length,
            seed,
        }
    }
}

pub struct DpoStage;

impl Stage for DpoStage {
    type Params = DpoParams;
    const KIND: &'static str = "dpo";
    const VERSION: u32 = 1; // rpo_alpha is a new param with a neutral default
    const ABOUT: &'static str = "Direct Preference Optimisation (sigmoid, ipo, hinge) against precomputed reference log-probs";

    fn ports(params: &DpoParams) -> Result<Ports, PortsError> {
        params
            .settings(0)
            .check()
            .map_err(|(param, message)| PortsError::new(Some(param), message))?;
        if !(params.beta.is_finite() && params.beta > 0.0) {
            return Err(PortsError::new(Some("beta"), "must be a positive number"));
        }
        if !(0.0..0.5).contains(&params.label_smoothing) {
            return Err(PortsError::new(
                Some("label_smoothing"),
                "must be in [0, 0.5)",
            ));
        }
        let mut inputs = vec![
            InputPort::stage("model", &params.model, ArtifactKind::MODELS),
            InputPort::stage("reference", &params.reference, &[ArtifactKind::Files]),
            InputPort::stage(
                "data",
                &params.data,
                &[ArtifactKind::Dataset, ArtifactKind::Preferences],
            ),
        ];
        if let Some(eval) = &params.eval {
            inputs.push(InputPort::stage("eval", eval, &[ArtifactKind::Dataset]));
        }
        let kind = if params.lora.is_some() {
            ArtifactKind::Adapter
        } else {
            ArtifactKind::Model
        };
        Ok(Ports {
            inputs,
            outputs: vec![OutputPort::new("model", kind)],
        })
    }

    fn run(params: &DpoParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let input = resolve_model_input(ctx, "model")?;
        let codec = TextCodec::load(
            &input,
            params.template.as_deref(),
            params.add_bos,
            params.max_length,
        )?;
        let rows = read_dataset(ctx, "data")?;
        let pairs = encode_pairs(&codec.encoder(), &rows)?;
        let reference = read_reference(&ctx.input("reference")?.path)?;
        let expected = reference_info(ctx, &reference.info.model_digest, &codec, pairs.len())?;
        if reference.info != expected || reference.chosen.len() != pairs.len() {
            return Err(StageError::failed_with_hint(
                format!(
                    "the reference log-probs ({}) were computed on other data or another encoding than `data` here",
                    ctx.input("reference")?.reference
                ),
                "give the reference_logprobs stage the same `data`, `template`, `add_bos` and `max_length` as dpo",
            ));
        }
        let eval_rows = match &params.eval {
            Some(_) => read_dataset(ctx, "eval")?,
            None => Vec::new(),
        };
        let lengths: Vec<usize> = pairs.iter().map(pair_length).collect();
        let mut varmap = VarMap::new();
        let (model, trained_as) = input.load_trainable(params.lora.as_ref(), &varmap, ctx.seed)?;
        let pad = codec.special.pad;
        let per_token = params.loss == DpoLossType::Ipo;
        let micro_step = |indices: &[usize], rng: &mut rand_chacha::ChaCha8Rng| {
            let refs: Vec<&EncodedPair> = indices.iter().map(|&i| &pairs[i]).collect();
            let batch = collate_pairs(&refs, pad);
            let n = indices.len();
            let summed = reply_logprobs(&model, &batch, Some(rng))?; // (2n,)
            let counts = Tensor::new(reply_token_counts(&batch), &Device::Cpu).or_fail("counts")?; // (2n,)
            let per_token_logprobs = (&summed / &counts).or_fail("per-token log-probs")?; // (2n,)
            let pick =
                |values: &[f32]| -> Vec<f32> { indices.iter().map(|&i| values[i]).collect() };
            let (mut ref_chosen, mut ref_rejected) =
                (pick(&reference.chosen), pick(&reference.rejected));
            let policy = if per_token {
                // IPO compares per-token averages (TRL divides by the reply lengths).
                let (ct, rt) = (
                    pick(&reference.chosen_tokens),
                    pick(&reference.rejected_tokens),
                );
                ref_chosen
                    .iter_mut()
                    .zip(&ct)
                    .for_each(|(v, c)| *v /= c.max(1.0));
                ref_rejected
                    .iter_mut()
                    .zip(&rt)
                    .for_each(|(v, c)| *v /= c.max(1.0));
                per_token_logprobs.clone()
            } else {
                summed
            };
            let device = Device::Cpu;
            let output = dpo_loss(
                &policy.narrow(0, 0, n).or_fail("split")?,
                &policy.narrow(0, n, n).or_fail("split")?,
                &Tensor::new(ref_chosen, &device).or_fail("reference")?,
                &Tensor::new(ref_rejected, &device).or_fail("reference")?,
                params.beta,
                params.loss,
                params.label_smoothing,
            )
            .or_fail("DPO loss")?;
            let mut loss = output.loss.clone();
            if let Some(alpha) = params.rpo_alpha {
                let chosen_nll = per_token_logprobs
                    .narrow(0, 0, n)
                    .or_fail("split")?
                    .mean_all()
                    .or_fail("nll")?
                    .neg()
                    .or_fail("nll")?;
                loss = (loss + (chosen_nll * alpha).or_fail("rpo")?).or_fail("rpo")?;
            }
            let mean = |t: &Tensor| -> Result<f64, StageError> {
                Ok(t.mean_all()
                    .or_fail("mean")?
                    .to_scalar::<f32>()
                    .or_fail("mean")? as f64)
            };
            let metrics = vec![
                (
                    "reward_accuracy",
                    output
                        .reward_accuracy
                        .to_scalar::<f32>()
                        .or_fail("accuracy")? as f64,
                ),
                ("chosen_rewards", mean(&output.chosen_rewards)?),
                ("rejected_rewards", mean(&output.rejected_rewards)?),
                ("margins", mean(&output.margins)?),
            ];
            Ok(MicroBatchOutput {
                loss,
                weight: n as f64,
                tokens: batch.real_tokens(),
                examples: n,
                metrics,
            })
        };
        let max_new_tokens = params.eval_max_new_tokens;
        let mut evaluate =
            |_step: usize| accuracy_metrics(&model, &codec, &eval_rows, max_new_tokens);
        let settings = params.settings(ctx.seed);
        let summary = run_training(
            ctx,
            &settings,
            &lengths,
            &mut varmap,
            &micro_step,
            &mut evaluate,
        )?;
        log_throughput(ctx, &summary)?;
        write_trained_model(
            &model,
            trained_as,
            &input,
            &codec.template,
            ctx.output_dir("model")?,
        )?;
        set_summary_metrics(ctx, &summary, &varmap, pairs.len());
        Ok(())
    }
}
