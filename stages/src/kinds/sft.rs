//! Stage kind `sft`: supervised fine-tuning on prompt/completion rows, with LoRA
//! (default) or full; loss on completion tokens only by default.
//!
//! ```yaml
//! sft:
//!   kind: sft
//!   model: base                 # a model (or adapter: its LoRA keeps training)
//!   data: arith.train           # rows with prompt + completion (or chat messages)
//!   eval: arith.eval            # optional: held-out exact match (eval_accuracy)
//!   template: "{prompt}"        # default: the model's template.json, else "User: {prompt}\n\nAssistant: "
//!   lora: { r: 16, alpha: 32, dropout: 0.05, targets: [q_proj, v_proj] }   # null: full fine-tuning
//!   learning_rate: 2.0e-4
//!   batch_size: 16
//!   epochs: 1
//!   optimizer: { schedule: linear, warmup_steps: 0, weight_decay: 0.0, max_grad_norm: 1.0 }
//! ```
//!
//! Output: an `adapter` (PEFT layout + base.json naming the base model's digest, tokenizer
//! files, template.json), or a `model` folder with `lora: null`. metrics.json holds
//! `eval_accuracy_start`, `eval_accuracy`, `train_loss`, `steps`, `trainable_parameters`.

use crate::data::batch::{collate_examples, EncodedExample};
use crate::model::{LoraConfig, LoraTargets};
use crate::train::evaluation::accuracy_metrics;
use crate::train::model_input::{resolve_model_input, write_trained_model, TextCodec};
use crate::train::settings::{
    default_checkpoint_every, default_max_length, default_true, OptimizerParams, TrainSettings,
};
use crate::train::training_loop::{run_training, MicroBatchOutput};
use crate::train::{
    log_throughput, next_token_loss, read_dataset, set_summary_metrics, StageResultExt,
};
use candle_nn::VarMap;
use rlhf_engine::{
    ArtifactKind, InputPort, OutputPort, Ports, PortsError, Stage, StageContext, StageError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SftParams {
    /// The model to fine-tune: a model or adapter stage.
    pub model: String,
    /// A dataset with prompt/completion rows.
    pub data: String,
    /// A held-out dataset: greedy exact match before, during and after training.
    #[serde(default)]
    pub eval: Option<String>,
    /// LoRA settings; `null` trains every weight and writes a full model.
    #[serde(default = "default_lora")]
    pub lora: Option<LoraConfig>,
    /// A plain prompt template with `{prompt}`; default: the model's template.json.
    #[serde(default)]
    pub template: Option<String>,
    /// Prepend the tokenizer's bos token to every prompt.
    #[serde(default)]
    pub add_bos: bool,
    /// Longest prompt + completion in tokens (completions are cut to fit).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Loss on completion tokens only; `false` trains on the prompt too.
    #[serde(default = "default_true")]
    pub completion_only: bool,
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
    /// Batch examples of similar length together (less padding).
    #[serde(default = "default_true")]
    pub group_by_length: bool,
    /// New tokens generated per held-out prompt.
    #[serde(default = "default_eval_max_new_tokens")]
    pub eval_max_new_tokens: usize,
}

/// The Dolly recipe's LoRA (seeds/002): r 16, alpha 32, dropout 0.05, q_proj and v_proj.
pub fn default_lora() -> Option<LoraConfig> {
    Some(LoraConfig {
        r: 16,
        alpha: 32.0,
        dropout: 0.05,
        targets: LoraTargets::Modules(vec!["q_proj".into(), "v_proj".into()]),
        use_rslora: false,
    })
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
pub fn default_eval_max_new_tokens() -> usize {
    6
}

impl SftParams {
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

pub struct SftStage;

impl Stage for SftStage {
    type Params = SftParams;
    const KIND: &'static str = "sft";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "Supervised fine-tuning on prompt/completion data, LoRA or full, completion-only loss";

    fn ports(params: &SftParams) -> Result<Ports, PortsError> {
        params
            .settings(0)
            .check()
            .map_err(|(param, message)| PortsError::new(Some(param), message))?;
        let mut inputs = vec![
            InputPort::stage("model", &params.model, ArtifactKind::MODELS),
            InputPort::stage("data", &params.data, &[ArtifactKind::Dataset]),
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

    fn run(params: &SftParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let input = resolve_model_input(ctx, "model")?;
        let codec = TextCodec::load(
            &input,
            params.template.as_deref(),
            params.add_bos,
            params.max_length,
        )?;
        let rows = read_dataset(ctx, "data")?;
        let eval_rows = match &params.eval {
            Some(_) => read_dataset(ctx, "eval")?,
            None => Vec::new(),
        };
        let examples: Vec<EncodedExample> = codec
            .encoder()
            .encode_examples(&rows)
            .or_fail("encoding `data`")?
            .into_iter()
            .flatten()
            .collect();
        let lengths: Vec<usize> = examples
            .iter()
            .map(|e| e.prompt.len() + e.completion.len())
            .collect();
        let mut varmap = VarMap::new();
        let (model, trained_as) = input.load_trainable(params.lora.as_ref(), &varmap, ctx.seed)?;
        let pad = codec.special.pad;
        let completion_only = params.completion_only;
        let micro_step = |indices: &[usize], rng: &mut rand_chacha::ChaCha8Rng| {
            let refs: Vec<&EncodedExample> = indices.iter().map(|&i| &examples[i]).collect();
            let mut batch = collate_examples(&refs, pad);
            if !completion_only {
                batch.loss_mask.clone_from(&batch.attention_mask);
            }
            let (loss, scored_tokens) = next_token_loss(&model, &batch, rng)?;
            Ok(MicroBatchOutput {
                loss,
                weight: scored_tokens,
                tokens: batch.real_tokens(),
                examples: indices.len(),
                metrics: Vec::new(),
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
        set_summary_metrics(ctx, &summary, &varmap, examples.len());
        Ok(())
    }
}
