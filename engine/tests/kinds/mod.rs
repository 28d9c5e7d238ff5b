//! Small stage kinds for engine tests: enough shapes (several outputs, typed inputs,
//! free-form params, external inputs) to exercise checking and keys without ML.
#![allow(dead_code)] // each test file uses a different subset

use rlhf_engine::{
    ArtifactKind, ExternalPolicy, InputPort, OutputPort, Ports, PortsError, Registry, Stage,
    StageContext, StageError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `split`: one dataset output per name in `parts` (like `dataset` with a split).
pub struct Split;

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitParams {
    pub source: String,
    pub parts: Vec<String>,
}

impl Stage for Split {
    type Params = SplitParams;
    const KIND: &'static str = "split";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "Test kind: one dataset per part";

    fn ports(params: &SplitParams) -> Result<Ports, PortsError> {
        if params.parts.is_empty() {
            return Err(PortsError::new(
                Some("parts"),
                "`parts` must name at least one part",
            ));
        }
        Ok(Ports {
            inputs: vec![InputPort::stage("source", &params.source, &[])
                .allow_external(ExternalPolicy::StageOrPath)],
            outputs: params
                .parts
                .iter()
                .map(|p| OutputPort::new(p, ArtifactKind::Dataset))
                .collect(),
        })
    }

    fn run(_: &SplitParams, _: &mut StageContext) -> Result<(), StageError> {
        Ok(())
    }
}

/// `train`: reads a dataset, writes a model.
pub struct Train;

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    pub data: String,
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    #[serde(default)]
    pub schedule: Schedule,
}

#[derive(Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    #[default]
    Constant,
    Cosine,
}

fn default_learning_rate() -> f64 {
    1e-3
}

impl Stage for Train {
    type Params = TrainParams;
    const KIND: &'static str = "train";
    const VERSION: u32 = 3;
    const ABOUT: &'static str = "Test kind: dataset in, model out";

    fn ports(params: &TrainParams) -> Result<Ports, PortsError> {
        Ok(Ports {
            inputs: vec![InputPort::stage(
                "data",
                &params.data,
                &[ArtifactKind::Dataset],
            )],
            outputs: vec![OutputPort::new("model", ArtifactKind::Model)],
        })
    }

    fn run(_: &TrainParams, _: &mut StageContext) -> Result<(), StageError> {
        Ok(())
    }
}

/// `judge`: reads any number of models, writes metrics.
pub struct Judge;

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JudgeParams {
    pub models: Vec<String>,
}

impl Stage for Judge {
    type Params = JudgeParams;
    const KIND: &'static str = "judge";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "Test kind: models in, metrics out";

    fn ports(params: &JudgeParams) -> Result<Ports, PortsError> {
        Ok(Ports {
            inputs: params
                .models
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    InputPort::stage(&format!("model{i}"), m, ArtifactKind::MODELS)
                        .at_param(&format!("models.{i}"))
                })
                .collect(),
            outputs: vec![OutputPort::new("metrics", ArtifactKind::Metrics)],
        })
    }

    fn run(_: &JudgeParams, _: &mut StageContext) -> Result<(), StageError> {
        Ok(())
    }
}

/// `shell`: the shape of the `command` kind (program, named inputs that may be files
/// or stages or hub ids, free params, declared outputs).
pub struct Shell;

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShellParams {
    pub run: Vec<String>,
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    pub outputs: Vec<String>,
    #[serde(default = "files")]
    pub artifact: ArtifactKind,
}

fn files() -> ArtifactKind {
    ArtifactKind::Files
}

impl Stage for Shell {
    type Params = ShellParams;
    const KIND: &'static str = "shell";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "Test kind shaped like `command`";

    fn ports(params: &ShellParams) -> Result<Ports, PortsError> {
        if params.run.is_empty() {
            return Err(PortsError::new(Some("run"), "`run` must name a program"));
        }
        Ok(Ports {
            inputs: params
                .inputs
                .iter()
                .map(|(name, reference)| {
                    InputPort::stage(name, reference, &[])
                        .at_param(&format!("inputs.{name}"))
                        .allow_external(ExternalPolicy::StageOrPathOrHub)
                })
                .collect(),
            outputs: vec![OutputPort::new("out", params.artifact)],
        })
    }

    fn run(_: &ShellParams, _: &mut StageContext) -> Result<(), StageError> {
        Ok(())
    }
}

pub fn registry() -> Registry {
    let mut registry = Registry::new();
    registry
        .register::<Split>()
        .register::<Train>()
        .register::<Judge>()
        .register::<Shell>();
    registry
}

/// Parses and checks pipeline text (`--set` arguments applied) as `pipeline.yaml`.
pub fn check(
    text: &str,
    overrides: &[&str],
) -> Result<rlhf_engine::check::Pipeline, rlhf_engine::diagnostic::PipelineError> {
    let mut raw = rlhf_engine::spec::parse(std::path::Path::new("pipeline.yaml"), text)?;
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    rlhf_engine::overrides::apply(&mut raw, &overrides)?;
    rlhf_engine::check::check(&raw, &registry())
}

/// The error text of a pipeline that must not check.
pub fn error(text: &str, overrides: &[&str]) -> String {
    match check(text, overrides) {
        Ok(_) => panic!("the pipeline checked, but an error was expected:\n{text}"),
        Err(e) => e.to_string(),
    }
}
