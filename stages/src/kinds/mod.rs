//! One module per stage kind.

pub mod command;
pub mod dataset;
pub mod evaluate;
pub mod load_pretrained;
pub mod train_tokenizer;

use rlhf_engine::Registry;

/// Registers every stage kind of this crate.
pub fn register_all(registry: &mut Registry) {
    registry.register::<command::CommandStage>();
    registry.register::<dataset::DatasetStage>();
    registry.register::<evaluate::EvaluateStage>();
    registry.register::<load_pretrained::LoadPretrainedStage>();
    registry.register::<train_tokenizer::TrainTokenizerStage>();
}
