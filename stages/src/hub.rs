//! `hf://` references resolved through hf-hub (the engine's [`HubResolver`] seam).
//!
//! - `hf://org/name[@revision]` → a folder with the model's files (config, weights or
//!   index + shards, tokenizer files, generation config).
//! - `hf://datasets/org/name[@revision][/path/in/repo]` → that file, or a folder with the
//!   repository's data files.
//!
//! The cache is the Python one (`models--org--name/{refs,snapshots,blobs}`), found from
//! HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub. hf-hub ignores
//! HF_HUB_OFFLINE, HF_TOKEN and HF_HUB_CACHE, so they are handled here. Offline (or when
//! the hub cannot be reached) a cached snapshot is used; with none, the error says how
//! to point the stage at a local folder.

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};
use rlhf_engine::hub::{HubError, HubResolver, ResolvedHub};
use std::path::{Path, PathBuf};

/// A parsed `hf://` reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubReference {
    pub repo_id: String,
    pub repo_type: RepoKind,
    /// `main` when not given.
    pub revision: String,
    /// A file inside a dataset repository.
    pub path: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl HubReference {
    pub fn parse(reference: &str) -> Result<Self, HubError> {
        let bad = |why: &str| HubError {
            message: format!("`{reference}` is not a valid hub reference: {why}"),
            hint: Some(
                "write hf://org/name[@revision] or hf://datasets/org/name[@revision][/path]".into(),
            ),
        };
        let rest = reference
            .strip_prefix("hf://")
            .ok_or_else(|| bad("it must start with hf://"))?;
        let (repo_type, rest) = match rest.strip_prefix("datasets/") {
            Some(rest) => (RepoKind::Dataset, rest),
            None => (RepoKind::Model, rest),
        };
        let mut parts = rest.splitn(3, '/');
        let org = parts
            .next()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("missing organisation"))?;
        let name_and_revision = parts
            .next()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("missing repository name"))?;
        let path = parts.next().filter(|s| !s.is_empty()).map(str::to_string);
        if path.is_some() && repo_type == RepoKind::Model {
            return Err(bad(
                "a path inside a model repository is not supported; name the repository",
            ));
        }
        let (name, revision) = match name_and_revision.split_once('@') {
            Some((name, revision)) if !revision.is_empty() => (name, revision.to_string()),
            Some(_) => return Err(bad("empty revision after @")),
            None => (name_and_revision, "main".to_string()),
        };
        Ok(HubReference {
            repo_id: format!("{org}/{name}"),
            repo_type,
            revision,
            path,
        })
    }

    fn repo(&self) -> Repo {
        let kind = match self.repo_type {
            RepoKind::Model => RepoType::Model,
            RepoKind::Dataset => RepoType::Dataset,
        };
        Repo::with_revision(self.repo_id.clone(), kind, self.revision.clone())
    }
}

/// Resolves `hf://` references with hf-hub, honouring the HF_* environment.
#[derive(Clone, Debug)]
pub struct HfHubResolver {
    pub cache_dir: PathBuf,
    pub offline: bool,
    pub endpoint: Option<String>,
    pub token: Option<String>,
}

/// Files of a model repository worth fetching (weights are added from the listing).
const MODEL_FILES: [&str; 9] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
];

const DATA_EXTENSIONS: [&str; 6] = [".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt"];

impl HfHubResolver {
    /// Reads HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT and HF_TOKEN.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let cache_dir = match (var("HF_HUB_CACHE"), var("HF_HOME")) {
            (Some(cache), _) => PathBuf::from(cache),
            (None, Some(home)) => PathBuf::from(home).join("hub"),
            (None, None) => hf_hub::Cache::from_env().path().clone(),
        };
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.to_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        HfHubResolver {
            cache_dir,
            offline,
            endpoint: var("HF_ENDPOINT"),
            token: var("HF_TOKEN"),
        }
    }

    fn repo_dir(&self, reference: &HubReference) -> PathBuf {
        self.cache_dir.join(reference.repo().folder_name())
    }

    /// The cached snapshot for the reference's revision, if the cache holds one.
    pub fn cached(&self, reference: &HubReference) -> Option<ResolvedHub> {
        let repo_dir = self.repo_dir(reference);
        let commit = match std::fs::read_to_string(repo_dir.join("refs").join(&reference.revision))
        {
            Ok(commit) => commit.trim().to_string(),
            // A commit hash is a snapshot name without a ref.
            Err(_) => reference.revision.clone(),
        };
        let snapshot = repo_dir.join("snapshots").join(&commit);
        let local_path = match (&reference.repo_type, &reference.path) {
            (RepoKind::Dataset, Some(path)) => snapshot.join(path),
            (RepoKind::Model, _) if !snapshot.join("config.json").exists() => return None,
            _ => snapshot,
        };
        local_path.exists().then_some(ResolvedHub {
            local_path,
            revision: commit,
        })
    }

    fn not_available(&self, reference: &str, repo_type: RepoKind, why: &str) -> HubError {
        // A dataset stage takes its hub reference in `source`, a model stage in `model`.
        let local_copy = match repo_type {
            RepoKind::Model => "`--set STAGE.model=/path/to/local/folder` at a local copy (a folder in the hub's layout)",
            RepoKind::Dataset => "`--set STAGE.source=/path/to/local/file-or-folder` at a local copy (jsonl, json, csv or parquet)",
        };
        HubError {
            message: format!(
                "{reference} is not in the local Hugging Face cache ({}) and {why}",
                self.cache_dir.display()
            ),
            hint: Some(format!(
                "point {local_copy}, where STAGE is the failed stage, \
                 or go online (unset HF_HUB_OFFLINE) so it can be downloaded"
            )),
        }
    }

    fn fetch(&self, reference: &HubReference) -> Result<ResolvedHub, String> {
        let mut builder = ApiBuilder::from_cache(hf_hub::Cache::new(self.cache_dir.clone()))
            .with_progress(false)
            .with_token(self.token.clone());
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let api = builder.build().map_err(|e| e.to_string())?;
        let info = api
            .repo(reference.repo())
            .info()
            .map_err(|e| e.to_string())?;
        // Pin the download to the commit the revision names now (it goes in the lock file).
        let pinned = HubReference {
            revision: info.sha.clone(),
            ..reference.clone()
        };
        let repo = api.repo(pinned.repo());
        let available: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
        let wanted = match (&reference.repo_type, &reference.path) {
            (RepoKind::Dataset, Some(path)) => vec![path.clone()],
            (RepoKind::Dataset, None) => available
                .iter()
                .filter(|f| DATA_EXTENSIONS.iter().any(|ext| f.ends_with(ext)))
                .cloned()
                .collect(),
            (RepoKind::Model, _) => {
                model_files(&available, |name| repo.get(name).map_err(|e| e.to_string()))?
            }
        };
        let mut last = None;
        for file in &wanted {
            last = Some(repo.get(file).map_err(|e| format!("{file}: {e}"))?);
        }
        let snapshot = self.repo_dir(reference).join("snapshots").join(&info.sha);
        hf_hub::Cache::new(self.cache_dir.clone())
            .repo(reference.repo())
            .create_ref(&info.sha)
            .map_err(|e| e.to_string())?;
        let local_path = match &reference.path {
            Some(_) => last.unwrap_or(snapshot),
            None => snapshot,
        };
        Ok(ResolvedHub {
            local_path,
            revision: info.sha,
        })
    }
}

/// The model files to fetch from a repository listing: metadata, tokenizer, and the
/// weights (one safetensors file, or the index and every shard it names).
fn model_files(
    available: &[String],
    get: impl Fn(&str) -> Result<PathBuf, String>,
) -> Result<Vec<String>, String> {
    let has = |name: &str| available.iter().any(|f| f == name);
    let mut files: Vec<String> = MODEL_FILES
        .iter()
        .filter(|f| has(f))
        .map(|f| f.to_string())
        .collect();
    if has("model.safetensors") {
        files.push("model.safetensors".into());
    } else if has("model.safetensors.index.json") {
        let index_path = get("model.safetensors.index.json")?;
        files.push("model.safetensors.index.json".into());
        files.extend(shards_of(&index_path)?);
    } else {
        return Err(
            "the repository has no model.safetensors or model.safetensors.index.json".into(),
        );
    }
    Ok(files)
}

fn shards_of(index_path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(index_path).map_err(|e| e.to_string())?;
    let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let mut shards: Vec<String> = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

impl HubResolver for HfHubResolver {
    fn resolve(&self, reference: &str) -> Result<ResolvedHub, HubError> {
        let parsed = HubReference::parse(reference)?;
        if self.offline {
            return self.cached(&parsed).ok_or_else(|| {
                self.not_available(
                    reference,
                    parsed.repo_type,
                    "the hub is offline (HF_HUB_OFFLINE)",
                )
            });
        }
        match self.fetch(&parsed) {
            Ok(resolved) => Ok(resolved),
            Err(why) => self.cached(&parsed).ok_or_else(|| {
                self.not_available(
                    reference,
                    parsed.repo_type,
                    &format!("the hub could not be reached ({why})"),
                )
            }),
        }
    }
}
