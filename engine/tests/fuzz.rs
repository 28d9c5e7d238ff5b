//! Property test: whatever bytes or YAML trees a pipeline file holds, and whatever
//! `--set` arguments come with it, parsing, overriding and checking return a value or
//! an error, never a panic (proptest reports a panic as a failure).

mod fuzz_support;
mod kinds;

use fuzz_support::{overrides, pipeline, tree};
use proptest::prelude::*;
use std::path::Path;

fn parse_and_check(text: &str, overrides: &[String]) {
    fuzz_support::parse_and_check(&kinds::registry(), text, overrides);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        parse_and_check(&String::from_utf8_lossy(&bytes), &[]);
    }

    #[test]
    fn arbitrary_yaml_trees_never_panic(text in tree(), sets in overrides()) {
        parse_and_check(&format!("stages: {text}\n"), &sets);
        parse_and_check(&text, &sets);
    }

    #[test]
    fn arbitrary_pipelines_never_panic(text in pipeline(), sets in overrides()) {
        parse_and_check(&text, &sets);
    }
}

#[test]
fn generated_pipelines_reach_the_checker() {
    // Guards the generator: a fixed pipeline in the generated shape checks, so random
    // ones get past parsing and exercise references, kinds and cycles.
    let text = "stages:\n  s0:\n    kind: \"split\"\n    \"source\": \"tests/fuzz.rs\"\n    \"parts\": [\"train\"]\n  s1:\n    kind: \"train\"\n    \"data\": \"s0.train\"\n";
    let raw = rlhf_engine::spec::parse(Path::new("fuzz.yaml"), text).unwrap();
    assert_eq!(
        rlhf_engine::check::check(&raw, &kinds::registry())
            .unwrap()
            .stages
            .len(),
        2
    );
}
