//! Stage keys: the golden key that pins the key format, and the rules of what a key
//! depends on (content digests, params with defaults, seed) and what it ignores.

mod kinds;

use rlhf_engine::key::{key_params, stage_key, write_canonical, KeyMaterial, KEY_FORMAT_VERSION};
use std::collections::BTreeMap;

const PIPELINE: &str = "seed: 42
stages:
  d: { kind: split, source: tests/key.rs, parts: [train, eval] }
  t: { kind: train, data: d.train, learning_rate: 0.0002 }
";

fn digests(digest: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("data".to_string(), digest.to_string())])
}

/// If this test fails, the key format changed: every cached result of every user is
/// invalidated. That may be intended; then bump KEY_FORMAT_VERSION in engine/src/key.rs
/// and pin the new values here.
#[test]
fn golden_key_is_pinned() {
    let pipeline = kinds::check(PIPELINE, &[]).unwrap();
    let stage = pipeline.stage("t").unwrap();
    let inputs = digests(&"ab".repeat(32));
    let material = KeyMaterial {
        key_format: KEY_FORMAT_VERSION,
        kind: &stage.kind,
        kind_version: stage.kind_version,
        params: key_params(stage),
        seed: stage.seed,
        inputs: &inputs,
    };
    let mut canonical = String::new();
    write_canonical(&serde_json::to_value(&material).unwrap(), &mut canonical);
    assert_eq!(KEY_FORMAT_VERSION, 1);
    assert_eq!(
        canonical,
        r#"{"inputs":{"data":"abababababababababababababababababababababababababababababababab"},"key_format":1,"kind":"train","kind_version":3,"params":{"data":{"input":"data"},"learning_rate":0.0002,"schedule":"constant"},"seed":13838566654583379456}"#
    );
    assert_eq!(
        stage_key(stage, &inputs),
        blake3::hash(canonical.as_bytes()).to_hex().to_string()
    );
    assert_eq!(
        stage_key(stage, &inputs),
        "c48c46bf336cb87bbb657b213c536359c398a8292e2c5cfc1b0ed2b36c2d8347"
    );
}

#[test]
fn default_written_out_keys_the_same_as_left_out() {
    let explicit = kinds::check(
        &PIPELINE.replace(
            "learning_rate: 0.0002",
            "learning_rate: 0.001, schedule: constant",
        ),
        &[],
    )
    .unwrap();
    let implicit = kinds::check(&PIPELINE.replace(", learning_rate: 0.0002", ""), &[]).unwrap();
    let inputs = digests(&"cd".repeat(32));
    assert_eq!(
        stage_key(explicit.stage("t").unwrap(), &inputs),
        stage_key(implicit.stage("t").unwrap(), &inputs)
    );
}

#[test]
fn key_depends_on_input_content_not_on_the_reference() {
    // Two pipelines whose `t` reads differently named stages and outputs: same digest,
    // same key (early cutoff and renames cost nothing).
    let renamed = PIPELINE
        .replace("  d: ", "  data_v2: ")
        .replace("parts: [train, eval]", "parts: [fit, eval]")
        .replace("d.train", "data_v2.fit");
    let (a, b) = (
        kinds::check(PIPELINE, &[]).unwrap(),
        kinds::check(&renamed, &[]).unwrap(),
    );
    let inputs = digests(&"ef".repeat(32));
    assert_eq!(
        stage_key(a.stage("t").unwrap(), &inputs),
        stage_key(b.stage("t").unwrap(), &inputs)
    );
    assert_ne!(
        stage_key(a.stage("t").unwrap(), &inputs),
        stage_key(a.stage("t").unwrap(), &digests(&"ee".repeat(32)))
    );
}

#[test]
fn key_depends_on_params_and_pipeline_seed() {
    let base = kinds::check(PIPELINE, &[]).unwrap();
    let inputs = digests(&"01".repeat(32));
    let key = |p: &rlhf_engine::check::Pipeline| stage_key(p.stage("t").unwrap(), &inputs);
    assert_ne!(
        key(&base),
        key(&kinds::check(PIPELINE, &["t.learning_rate=0.0003"]).unwrap())
    );
    assert_ne!(
        key(&base),
        key(&kinds::check(&PIPELINE.replace("seed: 42", "seed: 43"), &[]).unwrap())
    );
    assert_eq!(
        key(&base),
        key(&kinds::check(&format!("name: other\n# comment\n{PIPELINE}"), &[]).unwrap())
    );
}
