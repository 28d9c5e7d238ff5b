//! One module per stage kind.

pub mod collect_preferences;
pub mod command;
pub mod dataset;
pub mod dpo;
pub mod evaluate;
pub mod grpo;
pub mod load_pretrained;
pub mod ppo;
pub mod pretrain;
pub mod reference_logprobs;
pub mod reward_model;
pub mod sft;
pub mod train_tokenizer;

use rlhf_engine::Registry;

/// Registers every stage kind of this crate.
pub fn register_all(registry: &mut Registry) {
    registry.register::<collect_preferences::CollectPreferencesStage>();
    registry.register::<command::CommandStage>();
    registry.register::<dataset::DatasetStage>();
    registry.register::<evaluate::EvaluateStage>();
    registry.register::<grpo::GrpoStage>();
    registry.register::<load_pretrained::LoadPretrainedStage>();
    registry.register::<ppo::PpoStage>();
    registry.register::<dpo::DpoStage>();
    registry.register::<pretrain::PretrainStage>();
    registry.register::<reference_logprobs::ReferenceLogprobsStage>();
    registry.register::<reward_model::RewardModelStage>();
    registry.register::<sft::SftStage>();
    registry.register::<train_tokenizer::TrainTokenizerStage>();
}
