//! Stage kind `reward_model`: a Bradley–Terry reward model — a scalar head on the last
//! real token's hidden state of a causal LM (full fine-tuning by default, or LoRA) —
//! trained on preference pairs, with an optional per-pair margin.
//!
//! ```yaml
//! rm:
//!   kind: reward_model
//!   model: sft                   # a model or adapter (merged into the base first)
//!   data: prefs                  # prompt / chosen / rejected (+ margin)
//!   eval: eval_prefs             # optional: held-out pair accuracy, margin, loss
//!   lora: null                   # or { r: 8, alpha: 16, targets: all-linear }
//!   logprob_feature: true        # add w · mean log p(reply) to the head's score
//!   lm_loss_coef: 0.0            # + coef · NLL of the chosen replies (keeps the LM's skill)
//!   learning_rate: 1.0e-4
//!   batch_size: 16
//!   epochs: 1
//! ```
//!
//! The score is the head on the last real token's hidden state, plus (with
//! `logprob_feature`, the default) a learned weight times the reply's mean token log-prob
//! under the model's own LM head, starting from weight 1 and a zero head — i.e. from the
//! starting policy's own ranking, which training then improves (`RewardHead`).
//!
//! Output: a `reward_model` HF folder loadable as transformers'
//! `LlamaForSequenceClassification` (`score.weight` (1, hidden), `num_labels: 1`,
//! `pad_token_id`), LoRA merged in, tokenizer files and template.json; with the log-prob
//! feature also `score.logprob_weight` (1,), which transformers ignores — its scores then
//! lack that term, so set `logprob_feature: false` for a model to serve there. metrics.json:
//! `eval_accuracy`, `eval_margin`, `eval_loss`, and `eval_policy_logprob_accuracy`
//! (how well the starting model ranks the held-out pairs by its own log-probs).

use crate::algo::reward::{bradley_terry_loss, pair_accuracy};
use crate::data::batch::{collate_pairs, EncodedPair};
use crate::data::row::Row;
use crate::model::{save_model_folder, CausalLm, LoraConfig, RewardHead, Trainability};
use crate::train::model_input::{resolve_model_input, TextCodec};
use crate::train::pairs::{encode_pairs, pair_length, score_pairs};
use crate::train::settings::{
    default_checkpoint_every, default_max_length, default_true, OptimizerParams, TrainSettings,
};
use crate::train::training_loop::{run_training, MicroBatchOutput};
use crate::train::{
    batch_hidden_states, log_throughput, read_dataset, set_summary_metrics, StageResultExt,
};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand_chacha::ChaCha8Rng;
use rlhf_engine::{
    ArtifactKind, InputPort, OutputPort, Ports, PortsError, Stage, StageContext, StageError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardModelParams {
    /// The model to start from: a model or adapter stage.
    pub model: String,
    /// Preference pairs (prompt, chosen, rejected, optional margin).
    pub data: String,
    /// Held-out preference pairs: accuracy, mean margin and loss.
    #[serde(default)]
    pub eval: Option<String>,
    /// LoRA on the (merged) base; `null` (default) trains every weight and the head.
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// Subtract each row's `margin` inside the loss (Llama 2).
    #[serde(default)]
    pub use_margin: bool,
    /// Add a learned weight times the reply's mean token log-prob (under the model's own
    /// LM head) to the head's score; see the module docs.
    #[serde(default = "default_true")]
    pub logprob_feature: bool,
    /// Adds this times the chosen replies' mean token NLL to the loss, so the model keeps
    /// the generative skill its rankings rest on (Yang et al. 2024, "Regularizing Hidden
    /// States Enables Learning Generalizable Reward Model"; DPO's `rpo_alpha` likewise).
    #[serde(default)]
    pub lm_loss_coef: f64,
    /// Keeps rewards near zero: c · mean((r_w + r_l)²) (TRL `center_rewards_coefficient`).
    #[serde(default)]
    pub center_rewards_coefficient: Option<f64>,
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
}

fn default_learning_rate() -> f64 {
    1e-4
}
fn default_batch_size() -> usize {
    16
}
fn default_epochs() -> usize {
    1
}

impl RewardModelParams {
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

pub struct RewardModelStage;

impl Stage for RewardModelStage {
    type Params = RewardModelParams;
    const KIND: &'static str = "reward_model";
    const VERSION: u32 = 2;
    const ABOUT: &'static str =
        "Bradley–Terry reward model: a scalar head on a causal LM, trained on preference pairs";

    fn ports(params: &RewardModelParams) -> Result<Ports, PortsError> {
        params
            .settings(0)
            .check()
            .map_err(|(param, message)| PortsError::new(Some(param), message))?;
        if !(params.lm_loss_coef.is_finite() && params.lm_loss_coef >= 0.0) {
            return Err(PortsError::new(
                Some("lm_loss_coef"),
                format!(
                    "must be a finite number ≥ 0 (got {}); 0 turns the term off",
                    params.lm_loss_coef
                ),
            ));
        }
        let prefs = [ArtifactKind::Dataset, ArtifactKind::Preferences];
        let mut inputs = vec![
            InputPort::stage("model", &params.model, ArtifactKind::MODELS),
            InputPort::stage("data", &params.data, &prefs),
        ];
        if let Some(eval) = &params.eval {
            inputs.push(InputPort::stage("eval", eval, &prefs));
        }
        Ok(Ports {
            inputs,
            outputs: vec![OutputPort::new("model", ArtifactKind::RewardModel)],
        })
    }

    fn run(params: &RewardModelParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let input = resolve_model_input(ctx, "model")?;
        let codec = TextCodec::load(
            &input,
            params.template.as_deref(),
            params.add_bos,
            params.max_length,
        )?;
        let rows = read_dataset(ctx, "data")?;
        let pairs = encode_pairs(&codec.encoder(), &rows)?;
        let margins = pair_margins(&rows, &codec, params.use_margin)?;
        let eval_pairs = match &params.eval {
            Some(_) => encode_pairs(&codec.encoder(), &read_dataset(ctx, "eval")?)?,
            None => Vec::new(),
        };
        let start = input
            .load_frozen()?
            .merge_lora()
            .or_fail("merging the adapter")?;
        let pad = codec.special.pad;
        if !eval_pairs.is_empty() {
            let [chosen, rejected, _, _] = score_pairs(&start, &eval_pairs, pad, 32)?;
            let right = chosen.iter().zip(&rejected).filter(|(c, r)| c > r).count();
            ctx.metrics.set(
                "eval_policy_logprob_accuracy",
                right as f64 / eval_pairs.len() as f64,
            );
        }
        let mut varmap = VarMap::new();
        let model = trainable_base(start, params.lora.as_ref(), &varmap, ctx.seed)?;
        let head = RewardHead::new(
            model.config.hidden_size,
            params.logprob_feature,
            &varmap,
            ctx.seed,
            &Device::Cpu,
        )
        .or_fail("creating the reward head")?;
        let lengths: Vec<usize> = pairs.iter().map(pair_length).collect();
        let center = params.center_rewards_coefficient;
        let micro_step = |indices: &[usize], rng: &mut ChaCha8Rng| {
            let refs: Vec<&EncodedPair> = indices.iter().map(|&i| &pairs[i]).collect();
            let margin = match &margins {
                Some(m) => Some(
                    Tensor::new(
                        indices.iter().map(|&i| m[i]).collect::<Vec<f32>>(),
                        &Device::Cpu,
                    )
                    .or_fail("margin")?,
                ),
                None => None,
            };
            let want_logprobs = params.lm_loss_coef != 0.0;
            let (chosen, rejected, chosen_logprobs, tokens) =
                pair_rewards(&model, &head, &refs, pad, Some(rng), want_logprobs)?;
            let mut loss = bradley_terry_loss(&chosen, &rejected, margin.as_ref(), center)
                .or_fail("Bradley–Terry loss")?;
            if let Some(logprobs) = chosen_logprobs {
                let nll = logprobs
                    .mean_all()
                    .or_fail("chosen NLL")?
                    .neg()
                    .or_fail("NLL")?;
                loss = (loss + (nll * params.lm_loss_coef).or_fail("NLL")?).or_fail("loss")?;
            }
            let metrics = vec![
                (
                    "accuracy",
                    pair_accuracy(&chosen, &rejected).or_fail("accuracy")?,
                ),
                ("margin", mean_margin(&chosen, &rejected)?),
            ];
            Ok(MicroBatchOutput {
                loss,
                weight: indices.len() as f64,
                tokens,
                examples: indices.len(),
                metrics,
            })
        };
        let mut evaluate = |_step: usize| evaluate_pairs(&model, &head, &eval_pairs, pad, center);
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
        let dest = ctx.output_dir("model")?.to_path_buf();
        let mut overrides = serde_json::Map::new();
        overrides.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForSequenceClassification"]),
        );
        overrides.insert("num_labels".into(), serde_json::json!(1));
        overrides.insert("pad_token_id".into(), serde_json::json!(pad));
        let extra = head.checkpoint_tensors();
        save_model_folder(
            &model,
            &dest,
            Some(input.tokenizer_dir()),
            &extra,
            &overrides,
        )
        .or_fail("writing the reward model")?;
        codec
            .template
            .save(&dest)
            .or_fail("writing template.json")?;
        set_summary_metrics(ctx, &summary, &varmap, pairs.len());
        Ok(())
    }
}

/// The merged starting model made trainable: every weight (no LoRA) or fresh LoRA.
fn trainable_base(
    start: CausalLm,
    lora: Option<&LoraConfig>,
    varmap: &VarMap,
    seed: u64,
) -> Result<CausalLm, StageError> {
    let tensors = start
        .named_weights(false)
        .or_fail("reading weights")?
        .into_iter()
        .collect();
    let trainability = if lora.is_some() {
        Trainability::Frozen
    } else {
        Trainability::Full(varmap)
    };
    let mut model =
        CausalLm::from_tensors(start.config.clone(), tensors, &Device::Cpu, trainability)
            .or_fail("building the reward model")?;
    if let Some(config) = lora {
        model
            .add_lora(config, varmap, seed)
            .or_fail("adding LoRA adapters")?;
    }
    Ok(model)
}

/// Per-pair margins when `use_margin` (rows without one count 0), in encoded-pair order.
fn pair_margins(
    rows: &[Row],
    codec: &TextCodec,
    use_margin: bool,
) -> Result<Option<Vec<f32>>, StageError> {
    if !use_margin {
        return Ok(None);
    }
    let encoder = codec.encoder();
    let mut margins = Vec::new();
    for row in rows {
        if encoder
            .encode_pair(row)
            .or_fail("encoding a pair")?
            .is_some()
        {
            margins.push(row.margin.unwrap_or(0.0) as f32);
        }
    }
    Ok(Some(margins))
}

/// Rewards of chosen and rejected replies, (b,) each, the chosen replies' mean token
/// log-probs (b,) when `want_chosen_logprobs`, and the real tokens scored.
fn pair_rewards(
    model: &CausalLm,
    head: &RewardHead,
    pairs: &[&EncodedPair],
    pad: u32,
    rng: Option<&mut ChaCha8Rng>,
    want_chosen_logprobs: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>, usize), StageError> {
    let batch = collate_pairs(pairs, pad);
    let device = Device::Cpu;
    let ids = batch.input_ids_tensor(&device).or_fail("batch")?; // (2b, t)
    let attention = batch.attention_mask_tensor(&device).or_fail("batch")?; // (2b, t)
    let replies = batch.loss_mask_tensor(&device).or_fail("batch")?; // (2b, t)
    let hidden = batch_hidden_states(model, &batch, rng)?; // (2b, t, d)
    let (rewards, logprobs) = head
        .rewards(
            model,
            &ids,
            &hidden,
            &attention,
            &replies,
            want_chosen_logprobs,
        )
        .or_fail("reward head")?; // (2b,), (2b,)
    let n = pairs.len();
    let chosen_logprobs = match logprobs.filter(|_| want_chosen_logprobs) {
        Some(logprobs) => Some(logprobs.narrow(0, 0, n).or_fail("split")?),
        None => None,
    };
    Ok((
        rewards.narrow(0, 0, n).or_fail("split")?,
        rewards.narrow(0, n, n).or_fail("split")?,
        chosen_logprobs,
        batch.real_tokens(),
    ))
}

fn mean_margin(chosen: &Tensor, rejected: &Tensor) -> Result<f64, StageError> {
    let margin = (chosen - rejected)
        .or_fail("margin")?
        .mean_all()
        .or_fail("margin")?;
    Ok(margin.to_scalar::<f32>().or_fail("margin")? as f64)
}

/// Held-out accuracy, mean margin and loss over `pairs`, in batches of 32.
fn evaluate_pairs(
    model: &CausalLm,
    head: &RewardHead,
    pairs: &[EncodedPair],
    pad: u32,
    center: Option<f64>,
) -> Result<Vec<(&'static str, f64)>, StageError> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let (mut chosen_all, mut rejected_all) = (Vec::new(), Vec::new());
    for chunk in pairs.chunks(32) {
        let refs: Vec<&EncodedPair> = chunk.iter().collect();
        let (chosen, rejected, _, _) = pair_rewards(model, head, &refs, pad, None, false)?;
        chosen_all.extend(chosen.detach().to_vec1::<f32>().or_fail("rewards")?);
        rejected_all.extend(rejected.detach().to_vec1::<f32>().or_fail("rewards")?);
    }
    let chosen = Tensor::new(chosen_all, &Device::Cpu).or_fail("rewards")?;
    let rejected = Tensor::new(rejected_all, &Device::Cpu).or_fail("rewards")?;
    let loss = bradley_terry_loss(&chosen, &rejected, None, center).or_fail("loss")?;
    Ok(vec![
        (
            "accuracy",
            pair_accuracy(&chosen, &rejected).or_fail("accuracy")?,
        ),
        ("margin", mean_margin(&chosen, &rejected)?),
        ("loss", loss.to_scalar::<f32>().or_fail("loss")? as f64),
    ])
}
