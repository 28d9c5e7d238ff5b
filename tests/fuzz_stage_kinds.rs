//! The never-panic property test of engine/tests/fuzz.rs, run against the stage kinds
//! of the real binary (`command`, `dataset`, ... as registered by rlhf-stages) plus the
//! engine's test kinds: random pipelines and `--set` arguments give a checked pipeline
//! or an error, never a panic.

#[path = "../engine/tests/fuzz_support/mod.rs"]
mod fuzz_support;
#[path = "../engine/tests/kinds/mod.rs"]
mod kinds;

use proptest::prelude::*;

fn registry() -> rlhf_engine::Registry {
    let mut registry = rlhf_stages::registry();
    registry
        .register::<kinds::Split>()
        .register::<kinds::Train>()
        .register::<kinds::Judge>();
    registry
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_pipelines_never_panic_with_the_real_kinds(text in fuzz_support::pipeline(), sets in fuzz_support::overrides()) {
        fuzz_support::parse_and_check(&registry(), &text, &sets);
    }

    #[test]
    fn arbitrary_yaml_trees_never_panic_with_the_real_kinds(text in fuzz_support::tree(), sets in fuzz_support::overrides()) {
        fuzz_support::parse_and_check(&registry(), &format!("stages: {text}\n"), &sets);
    }
}

#[test]
fn the_real_command_kind_is_in_the_registry() {
    let text = "stages:\n  s0:\n    kind: \"command\"\n    \"run\": [\"true\"]\n    \"outputs\": [\"f\"]\n";
    let raw = rlhf_engine::spec::parse(std::path::Path::new("fuzz.yaml"), text).unwrap();
    assert_eq!(
        rlhf_engine::check::check(&raw, &registry()).unwrap().stages[0].kind,
        "command"
    );
}
