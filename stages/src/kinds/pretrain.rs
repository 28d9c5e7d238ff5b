//! Stage kind `pretrain`: causal-LM training of every weight on text rows (`text`, or
//! prompt + completion untemplated), each followed by eos, padded to the longest in its
//! batch (no packing, as TRL's SFTTrainer with `packing=False`). Usually starts from a
//! `load_pretrained` `init:` model.
//!
//! ```yaml
//! pretrain:
//!   kind: pretrain
//!   model: init                  # a model stage
//!   data: corpus                 # rows with `text`
//!   eval: arith.eval             # optional: held-out exact match (prompt/completion rows)
//!   template: "{prompt}"         # how eval prompts are shown; also written as template.json
//!   learning_rate: 1.0e-3
//!   batch_size: 32
//!   epochs: 3
//!   optimizer: { schedule: cosine, warmup_steps: 100, weight_decay: 0.01 }
//! ```
//!
//! Output: a `model` folder (config.json, model.safetensors, tokenizer files,
//! template.json). metrics.json: `eval_accuracy_start`, `eval_accuracy`, `train_loss`, `steps`.

use crate::data::batch::collate_texts;
use crate::model::save_model_folder;
use crate::train::evaluation::accuracy_metrics;
use crate::train::model_input::{resolve_model_input, TextCodec};
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
pub struct PretrainParams {
    /// The model to train (every weight): a model stage.
    pub model: String,
    /// A dataset of `text` rows (or prompt + completion, concatenated).
    pub data: String,
    /// A held-out prompt/completion dataset: greedy exact match before/during/after.
    #[serde(default)]
    pub eval: Option<String>,
    /// Plain template for eval prompts (kept with the model as template.json).
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub add_bos: bool,
    /// Texts are cut to this many tokens.
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
    #[serde(default = "crate::kinds::sft::default_eval_max_new_tokens")]
    pub eval_max_new_tokens: usize,
}

fn default_learning_rate() -> f64 {
    1e-3
}
fn default_batch_size() -> usize {
    32
}
fn default_epochs() -> usize {
    1
}

impl PretrainParams {
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

pub struct PretrainStage;

impl Stage for PretrainStage {
    type Params = PretrainParams;
    const KIND: &'static str = "pretrain";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "Causal-LM training of every weight on text";

    fn ports(params: &PretrainParams) -> Result<Ports, PortsError> {
        params
            .settings(0)
            .check()
            .map_err(|(param, message)| PortsError::new(Some(param), message))?;
        let mut inputs = vec![
            InputPort::stage("model", &params.model, &[ArtifactKind::Model]),
            InputPort::stage("data", &params.data, &[ArtifactKind::Dataset]),
        ];
        if let Some(eval) = &params.eval {
            inputs.push(InputPort::stage("eval", eval, &[ArtifactKind::Dataset]));
        }
        Ok(Ports {
            inputs,
            outputs: vec![OutputPort::new("model", ArtifactKind::Model)],
        })
    }

    fn run(params: &PretrainParams, ctx: &mut StageContext) -> Result<(), StageError> {
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
        let encoder = codec.encoder();
        let texts: Vec<Vec<u32>> = rows
            .iter()
            .map(|row| encoder.encode_lm_text(row))
            .collect::<Result<_, _>>()
            .or_fail("encoding `data`")?;
        let lengths: Vec<usize> = texts.iter().map(Vec::len).collect();
        let mut varmap = VarMap::new();
        let (model, _) = input.load_trainable(None, &varmap, ctx.seed)?;
        let pad = codec.special.pad;
        let micro_step = |indices: &[usize], rng: &mut rand_chacha::ChaCha8Rng| {
            let refs: Vec<&[u32]> = indices.iter().map(|&i| texts[i].as_slice()).collect();
            let batch = collate_texts(&refs, pad);
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
        let dest = ctx.output_dir("model")?.to_path_buf();
        save_model_folder(
            &model,
            &dest,
            Some(input.tokenizer_dir()),
            &[],
            &Default::default(),
        )
        .or_fail("writing the model")?;
        codec
            .template
            .save(&dest)
            .or_fail("writing template.json")?;
        set_summary_metrics(ctx, &summary, &varmap, texts.len());
        Ok(())
    }
}
