//! The content-addressed artifact store: commit a staging dir as `objects/<digest>`,
//! check an artifact cheaply on every cache hit, list and remove artifacts.
//!
//! Commit order (each step durable before the next), so a crash at any instant leaves
//! either no visible artifact or a complete one:
//! 1. hash every file of the staging dir, fsync files and directories, mark files read-only;
//! 2. rename the staging dir to `objects/<digest>` and fsync `objects/`;
//! 3. write `objects/<digest>.manifest.json` atomically.
//!
//! An object directory without a manifest is an interrupted commit: [`ArtifactHealth::Missing`].

use crate::digest::{
    combine_file_digests, digest_file, is_digest, walk_tree, Digest, SymlinkPolicy,
};
use crate::error::{CacheError, IoResultExt};
use crate::fsutil::{remove_file_if_exists, sync_dir, system_time_nanos, write_atomic};
use crate::lock::acquire;
use crate::store::{Cache, StagingDir};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, Metadata};
use std::path::{Path, PathBuf};

const MANIFEST_FORMAT: u32 = 1;

/// What [`Cache::check_artifact`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArtifactHealth {
    Ok,
    /// Not in the store, or its commit never finished (no manifest).
    Missing,
    /// Present but not what was committed; the reason names the file.
    Damaged(String),
}

/// One artifact as listed by [`Cache::list_artifacts`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactInfo {
    pub digest: Digest,
    pub files: usize,
    pub bytes: u64,
}

/// `objects/<digest>.manifest.json`: what the artifact held when committed.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Manifest {
    pub format: u32,
    pub digest: Digest,
    pub files: Vec<ManifestFile>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ManifestFile {
    /// Relative, `/`-separated.
    pub path: String,
    pub size: u64,
    pub digest: Digest,
    /// Modification time at commit; a file whose mtime differs is rehashed on check.
    pub mtime_ns: i64,
}

impl Manifest {
    pub(crate) fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

fn mtime_ns(metadata: &Metadata) -> i64 {
    metadata
        .modified()
        .map(|t| system_time_nanos(t) as i64)
        .unwrap_or(0)
}

impl Cache {
    /// `v1/objects/<digest>`.
    pub fn artifact_path(&self, digest: &str) -> PathBuf {
        self.sub("objects").join(digest)
    }

    pub(crate) fn manifest_path(&self, digest: &str) -> PathBuf {
        self.sub("objects").join(format!("{digest}.manifest.json"))
    }

    fn object_lock_path(&self, digest: &str) -> PathBuf {
        self.sub("locks")
            .join("objects")
            .join(format!("{digest}.lock"))
    }

    /// Hashes the staging dir and moves it into the store as `objects/<digest>` (see the
    /// module docs for the crash-safe order). Committing identical content again returns
    /// the same digest and keeps one object. Symlinks in the staging dir are refused.
    pub fn commit_artifact(&self, mut staging: StagingDir) -> Result<Digest, CacheError> {
        if !staging.path.starts_with(self.sub("staging")) {
            return Err(CacheError::ForeignStagingDir {
                path: staging.path.clone(),
            });
        }
        let manifest = seal_staging_dir(&staging.path)?;
        let digest = manifest.digest.clone();
        // Concurrent commits of the same content (from different keys) take turns.
        let _object_lock = acquire(&self.object_lock_path(&digest), true)?;
        if self.check_artifact(&digest) == ArtifactHealth::Ok {
            return Ok(digest); // `staging` is dropped, so its copy is deleted
        }
        let target = self.artifact_path(&digest);
        let manifest_path = self.manifest_path(&digest);
        remove_file_if_exists(&manifest_path)?;
        if fs::symlink_metadata(&target).is_ok() {
            self.quarantine_and_delete(&target)?;
        }
        fs::rename(&staging.path, &target).at(&target)?;
        staging.committed = true;
        let objects = self.sub("objects");
        sync_dir(&objects)?;
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| CacheError::CorruptManifest {
                path: manifest_path.clone(),
                reason: format!("cannot serialise: {e}"),
            })?;
        write_atomic(&manifest_path, &json, true)?;
        Ok(digest)
    }

    /// Cheap health check, run on every cache hit: the directory and manifest exist,
    /// exactly the manifest's files are present with its sizes, and files whose mtime
    /// changed still hash to the manifest's digest.
    pub fn check_artifact(&self, digest: &str) -> ArtifactHealth {
        if !is_digest(digest) {
            return ArtifactHealth::Missing;
        }
        let directory = self.artifact_path(digest);
        match fs::symlink_metadata(&directory) {
            Ok(m) if m.is_dir() => {}
            _ => return ArtifactHealth::Missing,
        }
        let manifest = match self.read_manifest(digest) {
            Ok(Some(manifest)) => manifest,
            Ok(None) => return ArtifactHealth::Missing,
            Err(e) => return ArtifactHealth::Damaged(e.to_string()),
        };
        match compare_with_manifest(&directory, &manifest, false) {
            Ok(None) => ArtifactHealth::Ok,
            Ok(Some(reason)) => ArtifactHealth::Damaged(reason),
            Err(e) => ArtifactHealth::Damaged(e.to_string()),
        }
    }

    /// The manifest of `digest`; `None` when it does not exist.
    pub(crate) fn read_manifest(&self, digest: &str) -> Result<Option<Manifest>, CacheError> {
        let path = self.manifest_path(digest);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::io(&path, e)),
        };
        let corrupt = |reason: String| CacheError::CorruptManifest {
            path: path.clone(),
            reason,
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("not a manifest ({e})")))?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(corrupt(format!("manifest format {}", manifest.format)));
        }
        if manifest.digest != digest {
            return Err(corrupt(format!(
                "it describes artifact {}",
                manifest.digest
            )));
        }
        Ok(Some(manifest))
    }

    /// Removes an artifact: manifest first (the object becomes Missing), then the
    /// directory moves to quarantine in one rename and is deleted there.
    pub fn remove_artifact(&self, digest: &str) -> Result<(), CacheError> {
        if !is_digest(digest) {
            return Err(CacheError::InvalidDigest {
                digest: digest.to_string(),
            });
        }
        let _object_lock = acquire(&self.object_lock_path(digest), true)?;
        remove_file_if_exists(&self.manifest_path(digest))?;
        self.quarantine_and_delete(&self.artifact_path(digest))
    }

    /// Every committed artifact (directory with a readable manifest), sorted by digest.
    pub fn list_artifacts(&self) -> Result<Vec<ArtifactInfo>, CacheError> {
        let mut infos = Vec::new();
        for digest in self.object_digests()? {
            if let Ok(Some(manifest)) = self.read_manifest(&digest) {
                infos.push(ArtifactInfo {
                    files: manifest.files.len(),
                    bytes: manifest.bytes(),
                    digest,
                });
            }
        }
        Ok(infos)
    }

    /// Digests of the directories under `objects/` (with or without manifest), sorted.
    pub(crate) fn object_digests(&self) -> Result<Vec<Digest>, CacheError> {
        let objects = self.sub("objects");
        let mut digests = Vec::new();
        for entry in fs::read_dir(&objects).at(&objects)? {
            let entry = entry.at(&objects)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_digest(&name) && entry.file_type().at(entry.path())?.is_dir() {
                digests.push(name);
            }
        }
        digests.sort();
        Ok(digests)
    }
}

/// Hashes, fsyncs and write-protects every file of a staging dir; returns its manifest.
fn seal_staging_dir(root: &Path) -> Result<Manifest, CacheError> {
    let tree = walk_tree(root, SymlinkPolicy::Refuse)?;
    let mut files = Vec::with_capacity(tree.files.len());
    for file in &tree.files {
        let digest = digest_file(&file.path)?;
        File::open(&file.path)
            .at(&file.path)?
            .sync_all()
            .at(&file.path)?;
        let mut permissions = file.metadata.permissions();
        permissions.set_readonly(true);
        fs::set_permissions(&file.path, permissions).at(&file.path)?;
        files.push(ManifestFile {
            path: file.relative.clone(),
            size: file.metadata.len(),
            digest,
            mtime_ns: mtime_ns(&file.metadata),
        });
    }
    for directory in &tree.directories {
        sync_dir(directory)?;
    }
    let pairs: Vec<(String, Digest)> = files
        .iter()
        .map(|f| (f.path.clone(), f.digest.clone()))
        .collect();
    Ok(Manifest {
        format: MANIFEST_FORMAT,
        digest: combine_file_digests(&pairs),
        files,
    })
}

/// Compares an artifact directory with its manifest. `Ok(None)` when they agree,
/// `Ok(Some(reason))` naming the first file that does not. `full` rehashes every file
/// (verify); otherwise only files whose mtime changed are rehashed (cheap check).
pub(crate) fn compare_with_manifest(
    directory: &Path,
    manifest: &Manifest,
    full: bool,
) -> Result<Option<String>, CacheError> {
    let tree = match walk_tree(directory, SymlinkPolicy::Refuse) {
        Ok(tree) => tree,
        Err(CacheError::SymlinkInArtifact { path }) => {
            return Ok(Some(format!("{} is a symlink", path.display())))
        }
        Err(e) => return Err(e),
    };
    let mut expected: BTreeMap<&str, &ManifestFile> = manifest
        .files
        .iter()
        .map(|f| (f.path.as_str(), f))
        .collect();
    for file in &tree.files {
        let shown = file.path.display();
        let Some(entry) = expected.remove(file.relative.as_str()) else {
            return Ok(Some(format!("{shown} was added after commit")));
        };
        if file.metadata.len() != entry.size {
            return Ok(Some(format!(
                "{shown} has {} bytes, {} when committed",
                file.metadata.len(),
                entry.size
            )));
        }
        if (full || mtime_ns(&file.metadata) != entry.mtime_ns)
            && digest_file(&file.path)? != entry.digest
        {
            return Ok(Some(format!(
                "{shown} changed after commit (content differs)"
            )));
        }
    }
    if let Some(path) = expected.keys().next() {
        return Ok(Some(format!(
            "{} is missing",
            directory.join(path).display()
        )));
    }
    if full {
        let pairs: Vec<(String, Digest)> = manifest
            .files
            .iter()
            .map(|f| (f.path.clone(), f.digest.clone()))
            .collect();
        if combine_file_digests(&pairs) != manifest.digest {
            return Ok(Some(format!(
                "{}: manifest does not hash to the artifact digest",
                directory.display()
            )));
        }
    }
    Ok(None)
}
