//! Generators for the never-panic property tests: random trees and pipeline-shaped
//! files over words that mean something to the parser and to the stage kinds, random
//! `--set` arguments, and the check run on them. Shared by engine/tests/fuzz.rs (test
//! kinds) and the root tests/fuzz_stage_kinds.rs (the real kinds of the binary).
#![allow(dead_code)]

use proptest::prelude::*;
use rlhf_engine::Registry;
use std::path::Path;

/// Keys and scalars that mean something to the parser and the test kinds, so random
/// trees reach deep into checking instead of stopping at the first unknown key.
const WORDS: &[&str] = &[
    "kind",
    "stages",
    "after",
    "run",
    "inputs",
    "outputs",
    "params",
    "name",
    "seed",
    "defaults",
    "description",
    "data",
    "models",
    "source",
    "parts",
    "learning_rate",
    "schedule",
    "artifact",
    "split",
    "train",
    "judge",
    "shell",
    "s0",
    "s1",
    "s2",
    "s0.train",
    "s1.out",
    "s2.eval",
    "model",
    "dataset",
    "cosine",
    "hf://org/name",
    "tests/fuzz.rs",
    "",
    "..",
    "{out}",
    "command",
    "dataset",
    "format",
    "fields",
    "synthetic",
    "count",
    "limit",
    "sample",
    "tokenizer",
    "filters",
    "shuffle",
    "env",
    "eval",
    "prompt",
    "{inputs.s0}",
    "{params.n}",
];

/// Kind names: the test kinds and the real ones (unknown ones are errors, also fine).
const KINDS: &[&str] = &[
    "split",
    "train",
    "judge",
    "shell",
    "command",
    "dataset",
    "train_tokenizer",
    "sft",
    "dpo",
    "evaluate",
];

pub fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(WORDS).prop_map(str::to_string),
        1 => "[a-z0-9_.{}/-]{0,12}",
    ]
}

pub fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => word().prop_map(|w| serde_json::to_string(&w).unwrap_or_default()),
        1 => any::<i64>().prop_map(|i| i.to_string()),
        1 => any::<f64>().prop_map(|f| format!("{f:?}")),
        1 => Just("true".to_string()),
        1 => Just("null".to_string()),
        1 => Just("~".to_string()),
    ]
}

/// A YAML value in flow style (JSON is valid YAML).
pub fn tree() -> impl Strategy<Value = String> {
    scalar().prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5)
                .prop_map(|items| format!("[{}]", items.join(", "))),
            proptest::collection::vec((word(), inner), 0..6).prop_map(|entries| {
                let body: Vec<String> = entries
                    .iter()
                    .map(|(k, v)| format!("{}: {v}", serde_json::to_string(k).unwrap_or_default()))
                    .collect();
                format!("{{{}}}", body.join(", "))
            }),
        ]
    })
}

/// A pipeline-shaped file: stages s0..s2 with a (mostly real) kind and random params.
pub fn pipeline() -> impl Strategy<Value = String> {
    let kind = prop_oneof![
        proptest::sample::select(KINDS).prop_map(str::to_string),
        word(),
    ];
    let stage = (kind, proptest::collection::vec((word(), tree()), 0..5));
    (
        proptest::collection::vec(stage, 0..4),
        proptest::collection::vec((word(), tree()), 0..3),
    )
        .prop_map(|(stages, top)| {
            let mut text = String::from("stages:\n");
            for (i, (kind, params)) in stages.iter().enumerate() {
                text.push_str(&format!(
                    "  s{i}:\n    kind: {}\n",
                    serde_json::to_string(kind).unwrap_or_default()
                ));
                for (key, value) in params {
                    text.push_str(&format!(
                        "    {}: {value}\n",
                        serde_json::to_string(key).unwrap_or_default()
                    ));
                }
            }
            for (key, value) in top {
                text.push_str(&format!(
                    "{}: {value}\n",
                    serde_json::to_string(&key).unwrap_or_default()
                ));
            }
            text
        })
}

pub fn overrides() -> impl Strategy<Value = Vec<String>> {
    let argument = prop_oneof![
        (word(), word(), tree()).prop_map(|(stage, path, value)| format!("{stage}.{path}={value}")),
        "[a-z0-9_.=\\[\\]{}: -]{0,16}",
    ];
    proptest::collection::vec(argument, 0..3)
}

/// Everything `rlhf validate` does; the result is irrelevant, only that it returns.
pub fn parse_and_check(registry: &Registry, text: &str, overrides: &[String]) {
    let Ok(mut raw) = rlhf_engine::spec::parse(Path::new("fuzz.yaml"), text) else {
        return;
    };
    if rlhf_engine::overrides::apply(&mut raw, overrides).is_err() {
        return;
    }
    if let Ok(pipeline) = rlhf_engine::check::check(&raw, registry) {
        // A checked pipeline renders and keys without trouble too.
        let _ = rlhf_engine::graph::render_dot(&pipeline);
        for stage in &pipeline.stages {
            let _ = rlhf_engine::key::stage_key(stage, &Default::default());
        }
    }
}
