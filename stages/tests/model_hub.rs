//! `hf://` resolution against a fake hub cache in the Python layout
//! (`models--org--name/refs/main`, `snapshots/<sha>/…`): cached snapshots resolve
//! offline, and a missing one is an error that says how to use a local folder.

use rlhf_engine::hub::HubResolver;
use rlhf_stages::hub::{HfHubResolver, HubReference, RepoKind};
use std::path::Path;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn fake_cache(root: &Path) {
    let model = root.join("models--acme--tiny");
    std::fs::create_dir_all(model.join("refs")).unwrap();
    std::fs::write(model.join("refs/main"), SHA).unwrap();
    let snapshot = model.join("snapshots").join(SHA);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::write(snapshot.join("config.json"), "{}").unwrap();
    std::fs::write(snapshot.join("model.safetensors"), "x").unwrap();
    let dataset = root.join("datasets--acme--data");
    std::fs::create_dir_all(dataset.join("refs")).unwrap();
    std::fs::write(dataset.join("refs/main"), SHA).unwrap();
    std::fs::create_dir_all(dataset.join("snapshots").join(SHA).join("data")).unwrap();
    std::fs::write(
        dataset.join("snapshots").join(SHA).join("data/train.jsonl"),
        "{}\n",
    )
    .unwrap();
}

fn resolver(cache_dir: &Path, offline: bool) -> HfHubResolver {
    // Port 9 (discard) refuses connections: "online" here means an unreachable hub.
    HfHubResolver {
        cache_dir: cache_dir.to_path_buf(),
        offline,
        endpoint: Some("http://127.0.0.1:9".into()),
        token: None,
    }
}

#[test]
fn references_parse_into_repo_revision_and_path() {
    let model = HubReference::parse("hf://HuggingFaceTB/SmolLM2-135M@v1").unwrap();
    assert_eq!(
        (
            model.repo_id.as_str(),
            model.revision.as_str(),
            model.repo_type
        ),
        ("HuggingFaceTB/SmolLM2-135M", "v1", RepoKind::Model)
    );
    let data = HubReference::parse("hf://datasets/databricks/dolly/data/train.jsonl").unwrap();
    assert_eq!(
        (data.repo_id.as_str(), data.revision.as_str()),
        ("databricks/dolly", "main")
    );
    assert_eq!(data.path.as_deref(), Some("data/train.jsonl"));
    assert!(HubReference::parse("hf://only-org").is_err());
    assert!(HubReference::parse("https://huggingface.co/x/y").is_err());
}

#[test]
fn cached_model_resolves_offline_to_its_snapshot_and_commit() {
    let dir = tempfile::tempdir().unwrap();
    fake_cache(dir.path());
    let resolved = resolver(dir.path(), true)
        .resolve("hf://acme/tiny")
        .unwrap();
    assert_eq!(resolved.revision, SHA);
    assert!(resolved.local_path.join("config.json").exists());
    let by_commit = resolver(dir.path(), true)
        .resolve(&format!("hf://acme/tiny@{SHA}"))
        .unwrap();
    assert_eq!(by_commit.local_path, resolved.local_path);
}

#[test]
fn cached_dataset_file_resolves_offline() {
    let dir = tempfile::tempdir().unwrap();
    fake_cache(dir.path());
    let resolved = resolver(dir.path(), true)
        .resolve("hf://datasets/acme/data/data/train.jsonl")
        .unwrap();
    assert!(resolved.local_path.ends_with("data/train.jsonl") && resolved.local_path.is_file());
}

#[test]
fn offline_without_a_cached_copy_is_an_error_with_the_local_folder_hint() {
    let dir = tempfile::tempdir().unwrap();
    let error = resolver(dir.path(), true)
        .resolve("hf://acme/missing")
        .unwrap_err();
    assert!(
        error.message.contains("hf://acme/missing") && error.message.contains("offline"),
        "{}",
        error.message
    );
    assert!(error
        .hint
        .unwrap()
        .contains("--set STAGE.model=/path/to/local/folder"));
}

#[test]
fn unreachable_hub_falls_back_to_the_cache_and_otherwise_explains() {
    let dir = tempfile::tempdir().unwrap();
    fake_cache(dir.path());
    let resolved = resolver(dir.path(), false)
        .resolve("hf://acme/tiny")
        .unwrap();
    assert_eq!(resolved.revision, SHA);
    let error = resolver(dir.path(), false)
        .resolve("hf://acme/other")
        .unwrap_err();
    assert!(
        error.message.contains("could not be reached"),
        "{}",
        error.message
    );
    assert!(error.hint.is_some());
}

#[test]
fn environment_sets_cache_dir_offline_endpoint_and_token() {
    // The only test in this binary that touches the environment.
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HOME", dir.path());
    std::env::remove_var("HF_HUB_CACHE");
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_TOKEN", "hf_test");
    std::env::set_var("HF_ENDPOINT", "http://mirror.invalid");
    let resolver = HfHubResolver::from_env();
    assert_eq!(resolver.cache_dir, dir.path().join("hub"));
    assert!(resolver.offline);
    assert_eq!(resolver.token.as_deref(), Some("hf_test"));
    assert_eq!(resolver.endpoint.as_deref(), Some("http://mirror.invalid"));
    fake_cache(&dir.path().join("hub"));
    assert_eq!(resolver.resolve("hf://acme/tiny").unwrap().revision, SHA);
}
