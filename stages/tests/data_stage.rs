//! The `dataset` and `train_tokenizer` stage kinds driven through the registry as the
//! engine drives them: params parsed strictly, ports declared, outputs and metrics
//! written, identical bytes run after run.

use rlhf_engine::metrics::MetricsSink;
use rlhf_engine::registry::ConfigureError;
use rlhf_engine::{ArtifactKind, ExternalPolicy, InputArtifact, StageContext};
use rlhf_stages::data::row::{read_rows, Row};
use rlhf_stages::data::synthetic::{generate, SyntheticSpec};
use rlhf_stages::data::template::PromptTemplate;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name)
}

struct Ran {
    _dir: tempfile::TempDir,
    outputs: BTreeMap<String, PathBuf>,
    metrics: serde_json::Map<String, Value>,
}

/// Configures and runs one stage; `inputs` are (port name, path, artifact kind).
fn run(
    kind: &str,
    params: Value,
    inputs: &[(&str, &Path, Option<ArtifactKind>)],
) -> Result<Ran, String> {
    let registry = rlhf_stages::registry();
    let stage = registry.get(kind).unwrap();
    let configured = stage.configure(&params).map_err(|e| format!("{e:?}"))?;
    let dir = tempfile::tempdir().unwrap();
    let mut ctx = StageContext::new(
        "test",
        kind,
        42,
        dir.path().join("scratch"),
        dir.path().join("logs"),
    );
    for (name, path, kind) in inputs {
        let input = InputArtifact {
            path: path.to_path_buf(),
            kind: *kind,
            digest: "0".repeat(64),
            reference: name.to_string(),
        };
        ctx = ctx.with_input(name, input);
    }
    let mut outputs = BTreeMap::new();
    for port in &configured.ports.outputs {
        let out = dir.path().join("out").join(&port.name);
        std::fs::create_dir_all(&out).unwrap();
        ctx = ctx.with_output(&port.name, out.clone());
        outputs.insert(port.name.clone(), out);
    }
    let first = outputs.values().next().cloned();
    ctx = ctx.with_metrics(MetricsSink::new(first, None));
    stage
        .run(&configured.params, &mut ctx)
        .map_err(|e| format!("{e} (hint: {:?})", e.hint()))?;
    let metrics = ctx.metrics.summary().clone();
    Ok(Ran {
        _dir: dir,
        outputs,
        metrics,
    })
}

#[test]
fn dataset_stage_writes_one_artifact_per_split_with_row_counts() {
    let params = json!({ "source": "data/dolly.jsonl", "format": "dolly", "split": { "train": 0.7, "eval": 0.3 } });
    let ran = run(
        "dataset",
        params,
        &[("source", &fixture("dolly.jsonl"), None)],
    )
    .unwrap();
    assert_eq!(ran.outputs.keys().collect::<Vec<_>>(), ["eval", "train"]);
    let eval = read_rows(&ran.outputs["eval"]).unwrap();
    let train = read_rows(&ran.outputs["train"]).unwrap();
    assert_eq!((eval.len(), train.len()), (1, 2));
    assert_eq!(ran.metrics["rows_eval"], 1);
    assert_eq!(ran.metrics["rows_train"], 2);
    assert_eq!(ran.metrics["rows_skipped"], 0);
    assert_eq!(ran.metrics["format"], "dolly");
}

#[test]
fn dataset_stage_outputs_identical_bytes_run_after_run() {
    let Some(path) =
        rlhf_stages::testing::shared_path("data/self-instruct-seed-tasks/dolly_format.jsonl")
    else {
        return;
    };
    let params = json!({ "source": "x", "format": "dolly", "split": { "train": 0.95, "eval": 0.05 }, "shuffle": true });
    let first = run("dataset", params.clone(), &[("source", &path, None)]).unwrap();
    let second = run("dataset", params, &[("source", &path, None)]).unwrap();
    for name in ["train", "eval"] {
        let a = std::fs::read(first.outputs[name].join("data.jsonl")).unwrap();
        let b = std::fs::read(second.outputs[name].join("data.jsonl")).unwrap();
        assert_eq!(a, b, "{name}");
    }
    assert_eq!(
        (
            first.metrics["rows_train"].as_u64(),
            first.metrics["rows_eval"].as_u64()
        ),
        (Some(166), Some(9))
    );
}

#[test]
fn no_split_gives_a_single_output_named_data() {
    let ran = run(
        "dataset",
        json!({ "source": "x", "format": "text", "on_error": "skip" }),
        &[("source", &fixture("text.jsonl"), None)],
    )
    .unwrap();
    assert_eq!(ran.outputs.keys().collect::<Vec<_>>(), ["data"]);
    assert_eq!(read_rows(&ran.outputs["data"]).unwrap().len(), 2);
    assert_eq!(ran.metrics["rows_skipped"], 1);
    assert_eq!(ran.metrics["rows_read"], 3);
}

#[test]
fn a_malformed_row_fails_the_stage_with_its_line_and_a_hint() {
    let error = run(
        "dataset",
        json!({ "source": "x", "format": "dolly" }),
        &[("source", &fixture("dolly_malformed.jsonl"), None)],
    )
    .err()
    .unwrap();
    assert!(error.contains("dolly_malformed.jsonl:2"), "{error}");
    assert!(error.contains("on_error: skip"), "{error}");
}

#[test]
fn synthetic_source_needs_no_input_and_splits_held_out_problems() {
    let params = json!({ "source": { "synthetic": { "count": 1000 } }, "split": { "train": 900, "eval": 100 }, "seed": 3 });
    let registry = rlhf_stages::registry();
    let configured = registry.get("dataset").unwrap().configure(&params).unwrap();
    assert!(configured.ports.inputs.is_empty());
    let ran = run("dataset", params, &[]).unwrap();
    let train = read_rows(&ran.outputs["train"]).unwrap();
    let eval = read_rows(&ran.outputs["eval"]).unwrap();
    assert_eq!((train.len(), eval.len()), (900, 100));
    let train_prompts: std::collections::HashSet<_> =
        train.iter().map(|r| r.prompt.clone()).collect();
    assert!(eval.iter().all(|r| !train_prompts.contains(&r.prompt)));
    let spec: SyntheticSpec = serde_json::from_value(json!({ "count": 1000 })).unwrap();
    let mut all = generate(&spec, 3).unwrap();
    let mut ours: Vec<Row> = train.into_iter().chain(eval).collect();
    let key = |r: &Row| r.prompt.clone();
    all.sort_by_key(key);
    ours.sort_by_key(key);
    assert_eq!(all, ours);
}

#[test]
fn a_dataset_artifact_input_is_read_from_its_data_jsonl() {
    let first = run(
        "dataset",
        json!({ "source": { "synthetic": { "count": 50 } } }),
        &[],
    )
    .unwrap();
    let artifact = &first.outputs["data"];
    // The engine writes metrics.json beside data.jsonl; it must not be read as rows.
    std::fs::write(artifact.join("metrics.json"), "{\"rows_data\": 50}\n").unwrap();
    let second = run(
        "dataset",
        json!({ "source": "arith", "sample": 10 }),
        &[("source", artifact, Some(ArtifactKind::Dataset))],
    )
    .unwrap();
    assert_eq!(second.metrics["format"], "rows");
    assert_eq!(read_rows(&second.outputs["data"]).unwrap().len(), 10);
}

#[test]
fn params_are_strict_and_checked_before_running() {
    let registry = rlhf_stages::registry();
    let dataset = registry.get("dataset").unwrap();
    let unknown = dataset
        .configure(&json!({ "source": "x", "formt": "dolly" }))
        .unwrap_err();
    assert!(
        matches!(unknown, ConfigureError::Params { .. }),
        "{unknown:?}"
    );
    let Err(ConfigureError::Ports(filters)) =
        dataset.configure(&json!({ "source": "x", "filters": { "max_prompt_tokens": 10 } }))
    else {
        panic!("filters without a tokenizer must be refused");
    };
    assert_eq!(filters.param.as_deref(), Some("filters"));
    let Err(ConfigureError::Ports(fields)) =
        dataset.configure(&json!({ "source": "x", "format": "text", "fields": { "prompt": "q" } }))
    else {
        panic!("a field the format does not read must be refused");
    };
    assert_eq!(fields.param.as_deref(), Some("fields.prompt"));
    let Err(ConfigureError::Ports(split)) =
        dataset.configure(&json!({ "source": "x", "split": { "train": 0.9, "eval": 0.2 } }))
    else {
        panic!("fractions above 1 must be refused");
    };
    assert_eq!(split.param.as_deref(), Some("split"));
}

#[test]
fn hub_and_path_sources_are_declared_as_external_inputs() {
    let registry = rlhf_stages::registry();
    let configured = registry
        .get("dataset")
        .unwrap()
        .configure(&json!({ "source": "hf://datasets/databricks/databricks-dolly-15k", "format": "dolly", "split": { "train": 0.95, "eval": 0.05 } }))
        .unwrap();
    let source = &configured.ports.inputs[0];
    assert_eq!(
        (source.name.as_str(), source.reference.as_str()),
        ("source", "hf://datasets/databricks/databricks-dolly-15k")
    );
    assert_eq!(source.external, ExternalPolicy::StageOrPathOrHub);
    assert!(source.accepts.contains(&ArtifactKind::Dataset));
    let names: Vec<_> = configured
        .ports
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.kind))
        .collect();
    assert_eq!(
        names,
        [
            ("eval", ArtifactKind::Dataset),
            ("train", ArtifactKind::Dataset)
        ]
    );
}

#[test]
fn train_tokenizer_writes_identical_bytes_twice_with_config_and_template() {
    let data = run(
        "dataset",
        json!({ "source": { "synthetic": { "count": 2000 } } }),
        &[],
    )
    .unwrap();
    let params = json!({ "data": "arith", "vocab_size": 400, "template": "{prompt}" });
    let inputs = [(
        "data",
        data.outputs["data"].as_path(),
        Some(ArtifactKind::Dataset),
    )];
    let first = run("train_tokenizer", params.clone(), &inputs).unwrap();
    let second = run("train_tokenizer", params, &inputs).unwrap();
    let (a, b) = (&first.outputs["tokenizer"], &second.outputs["tokenizer"]);
    for file in ["tokenizer.json", "tokenizer_config.json", "template.json"] {
        assert_eq!(
            std::fs::read(a.join(file)).unwrap(),
            std::fs::read(b.join(file)).unwrap(),
            "{file}"
        );
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            config["pad_token"].as_str(),
            config["bos_token"].as_str(),
            config["eos_token"].as_str()
        ),
        (Some("<|pad|>"), Some("<|bos|>"), Some("<|eos|>"))
    );
    assert_eq!(
        PromptTemplate::load(a).unwrap(),
        Some(PromptTemplate::plain("{prompt}").unwrap())
    );
    assert_eq!(first.metrics["vocab_size"], 400);
    let tokenizer = rlhf_stages::data::tokenizer::load_tokenizer(a).unwrap();
    let special = rlhf_stages::data::tokenizer::special_tokens(a, &tokenizer).unwrap();
    assert_eq!((special.pad, special.bos, special.eos), (0, Some(1), 2));
}

#[test]
fn length_filters_use_the_tokenizer_input() {
    let data = run(
        "dataset",
        json!({ "source": { "synthetic": { "count": 500 } } }),
        &[],
    )
    .unwrap();
    let tok = run(
        "train_tokenizer",
        json!({ "data": "arith" }),
        &[(
            "data",
            data.outputs["data"].as_path(),
            Some(ArtifactKind::Dataset),
        )],
    )
    .unwrap();
    // Digits are single tokens and a space (or " -") one more: answers of up to two
    // digits fit in 3 tokens, three-digit answers do not.
    let params =
        json!({ "source": "arith", "tokenizer": "tok", "filters": { "max_completion_tokens": 3 } });
    let inputs = [
        (
            "source",
            data.outputs["data"].as_path(),
            Some(ArtifactKind::Dataset),
        ),
        (
            "tokenizer",
            tok.outputs["tokenizer"].as_path(),
            Some(ArtifactKind::Tokenizer),
        ),
    ];
    let ran = run("dataset", params, &inputs).unwrap();
    let kept = read_rows(&ran.outputs["data"]).unwrap();
    assert!(!kept.is_empty());
    let digits = |r: &Row| {
        r.completion
            .as_deref()
            .unwrap()
            .chars()
            .filter(char::is_ascii_digit)
            .count()
    };
    assert!(
        kept.iter().all(|r| digits(r) <= 2),
        "only answers of one or two digits fit"
    );
    assert!(kept.iter().any(|r| digits(r) == 2));
    assert_eq!(
        ran.metrics["rows_filtered"].as_u64().unwrap() as usize + kept.len(),
        500
    );
}

#[test]
fn params_schemas_describe_sources_splits_and_tokenizer_settings() {
    let registry = rlhf_stages::registry();
    let dataset = registry.get("dataset").unwrap().params_schema().to_string();
    for key in [
        "source",
        "synthetic",
        "format",
        "fields",
        "split",
        "shuffle",
        "limit",
        "sample",
        "filters",
        "on_error",
    ] {
        assert!(
            dataset.contains(&format!("\"{key}\"")),
            "{key} missing from the dataset schema"
        );
    }
    let tokenizer = registry
        .get("train_tokenizer")
        .unwrap()
        .params_schema()
        .to_string();
    for key in [
        "data",
        "vocab_size",
        "special_tokens",
        "individual_digits",
        "template",
    ] {
        assert!(
            tokenizer.contains(&format!("\"{key}\"")),
            "{key} missing from the train_tokenizer schema"
        );
    }
}

#[test]
fn train_tokenizer_on_text_only_reproduces_the_reference_tokenizer() {
    let (Some(pretrain), Some(reference)) = (
        rlhf_stages::testing::shared_path("bench/trl/data/pretrain.jsonl"),
        rlhf_stages::testing::shared_path("bench/trl/tokenizer/tokenizer.json"),
    ) else {
        return;
    };
    let ran = run(
        "train_tokenizer",
        json!({ "data": "pretrain.jsonl", "fields": ["text"] }),
        &[("data", &pretrain, None)],
    )
    .unwrap();
    assert_eq!(ran.metrics["texts"], 20_000);
    let ours: Value = serde_json::from_str(
        &std::fs::read_to_string(ran.outputs["tokenizer"].join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    let theirs: Value = serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    assert_eq!(ours["model"], theirs["model"]);
    let registry = rlhf_stages::registry();
    let Err(ConfigureError::Ports(error)) = registry
        .get("train_tokenizer")
        .unwrap()
        .configure(&json!({ "data": "x", "fields": ["txt"] }))
    else {
        panic!("an unknown field must be refused");
    };
    assert_eq!(error.param.as_deref(), Some("fields"));
}
