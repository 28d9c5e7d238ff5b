//! Benchmark: the engine's own cost on a generated 200-stage pipeline with everything
//! cached: load (parse + check), `status`, and a fully cached `run`, in process (no
//! binary start-up), so a release build of the engine alone can measure it.
//!
//!     cargo bench -p rlhf-engine --bench status_200
//!
//! The stages are a chain of 100, each with one fan-out stage reading it, of a small
//! `sh` kind defined here (the real `command` kind lives in the stages crate).

use rlhf_cache::Cache;
use rlhf_engine::run::{Engine, RunOptions};
use rlhf_engine::{
    ArtifactKind, ExternalPolicy, InputPort, OutputPort, Ports, PortsError, Registry, Stage,
    StageContext, StageError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

struct Sh;

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ShParams {
    script: String,
    #[serde(default)]
    inputs: BTreeMap<String, String>,
    #[serde(default)]
    params: BTreeMap<String, serde_json::Value>,
}

impl Stage for Sh {
    type Params = ShParams;
    const KIND: &'static str = "sh";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "Bench kind: sh -c SCRIPT with $OUT and $IN_<name>";

    fn ports(params: &ShParams) -> Result<Ports, PortsError> {
        let inputs = params
            .inputs
            .iter()
            .map(|(n, r)| {
                InputPort::stage(n, r, &[])
                    .at_param(&format!("inputs.{n}"))
                    .allow_external(ExternalPolicy::StageOrPath)
            })
            .collect();
        Ok(Ports {
            inputs,
            outputs: vec![OutputPort::new("out", ArtifactKind::Files)],
        })
    }

    fn run(params: &ShParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg(&params.script)
            .env("OUT", ctx.output_dir("out")?);
        for (name, input) in ctx.inputs() {
            command.env(format!("IN_{name}"), &input.path);
        }
        let status = command.status().map_err(|e| StageError::io("sh", e))?;
        if status.success() {
            Ok(())
        } else {
            Err(StageError::failed(format!("sh exited with {status}")))
        }
    }
}

fn pipeline() -> String {
    let mut text = String::from("name: status-200\nseed: 1\nstages:\n");
    for i in 0..100 {
        let (inputs, script) = if i == 0 {
            ("{}".to_string(), "echo 0 > $OUT/f".to_string())
        } else {
            (
                format!("{{ up: s{} }}", i - 1),
                format!("cat $IN_up/f > $OUT/f; echo {i} >> $OUT/f"),
            )
        };
        text.push_str(&format!(
            "  s{i}: {{ kind: sh, script: '{script}', inputs: {inputs}, params: {{ i: {i} }} }}\n"
        ));
        text.push_str(&format!(
            "  f{i}: {{ kind: sh, script: 'wc -l $IN_s/f > $OUT/f', inputs: {{ s: s{i} }} }}\n"
        ));
    }
    text
}

fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

fn main() {
    let mut registry = Registry::new();
    registry.register::<Sh>();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, pipeline()).expect("write");
    let load = || rlhf_engine::load_pipeline(&file, &[], &registry).expect("pipeline checks");
    let cache = Cache::open(&dir.path().join("cache")).expect("cache");
    let engine = Engine::new(&registry, cache, None);
    let options = RunOptions {
        threads: 1,
        ..RunOptions::default()
    };
    let started = Instant::now();
    let report = engine.run(&load(), &options).expect("first run");
    assert_eq!(report.exit_code(), 0);
    println!(
        "first run, 200 stages executed:            {:>8.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );

    let pipeline = load();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "load (parse + check), median of 15:         {:>8.2} ms",
        ms(median(15, || drop(load())))
    );
    let statuses = engine.status(&pipeline).expect("status");
    assert!(statuses
        .iter()
        .all(|s| s.status == rlhf_engine::status::State::Cached));
    println!(
        "status, 200 cached, median of 15:           {:>8.2} ms",
        ms(median(15, || drop(engine.status(&pipeline))))
    );
    println!(
        "run, 200 cached, median of 15:              {:>8.2} ms",
        ms(median(15, || assert_eq!(
            engine.run(&pipeline, &options).expect("run").exit_code(),
            0
        )))
    );
}
