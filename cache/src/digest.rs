//! Content digests: blake3 of a file's bytes, and of a directory as the blake3 of its
//! sorted `relative/path\0<file digest>\n` lines (files only, recursively). The directory
//! definition ignores creation order, mtimes, permissions and empty directories, so the
//! same content hashes the same on every machine.

use crate::error::{CacheError, IoResultExt};
use std::fs::{self, Metadata};
use std::path::{Path, PathBuf};

/// 64 lowercase hex characters (blake3).
pub type Digest = String;

/// Files at least this large are hashed with rayon across cores; below it the thread
/// hand-off costs more than it saves (blake3 docs suggest ~128 KiB).
const RAYON_THRESHOLD_BYTES: u64 = 1 << 20;

/// blake3 of the bytes of `path` (symlinks followed), memory-mapped, multi-threaded when large.
pub fn digest_file(path: &Path) -> Result<Digest, CacheError> {
    let size = fs::metadata(path).at(path)?.len();
    let mut hasher = blake3::Hasher::new();
    if size >= RAYON_THRESHOLD_BYTES {
        hasher.update_mmap_rayon(path).at(path)?;
    } else {
        hasher.update_mmap(path).at(path)?;
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Digest of a directory: blake3 over its sorted lines `relative/path\0<file digest>\n`
/// (relative paths with `/` separators, files only, recursively). Symlinks are followed,
/// as for external inputs; artifacts in the store refuse them (see [`walk_files`]).
pub fn digest_dir(path: &Path) -> Result<Digest, CacheError> {
    let files = walk_files(path, SymlinkPolicy::Follow)?;
    let mut lines = Vec::with_capacity(files.len());
    for file in &files {
        lines.push((file.relative.clone(), digest_file(&file.path)?));
    }
    Ok(combine_file_digests(&lines))
}

/// The directory digest of already-hashed files (`(relative path, file digest)` pairs, in
/// any order). Relative paths must use `/` separators.
pub fn combine_file_digests(files: &[(String, Digest)]) -> Digest {
    let mut sorted: Vec<&(String, Digest)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut hasher = blake3::Hasher::new();
    for (relative, digest) in sorted {
        hasher.update(relative.as_bytes());
        hasher.update(b"\0");
        hasher.update(digest.as_bytes());
        hasher.update(b"\n");
    }
    hasher.finalize().to_hex().to_string()
}

/// True when `text` looks like a digest: 64 lowercase hex characters.
pub fn is_digest(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What a directory walk does with a symlink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SymlinkPolicy {
    /// External inputs: hash what the link points at.
    Follow,
    /// Artifacts: a link would make the content depend on something outside the store.
    Refuse,
}

/// One regular file found by [`walk_files`].
#[derive(Debug)]
pub(crate) struct WalkedFile {
    /// Path relative to the walk root, `/`-separated.
    pub relative: String,
    pub path: PathBuf,
    /// Metadata of the file itself (of the target when a followed symlink).
    pub metadata: Metadata,
}

/// Every regular file under `root`, sorted by relative path; directories are also listed
/// in `directories` by [`walk_tree`] for callers that need to fsync them.
pub(crate) fn walk_files(
    root: &Path,
    policy: SymlinkPolicy,
) -> Result<Vec<WalkedFile>, CacheError> {
    Ok(walk_tree(root, policy)?.files)
}

pub(crate) struct WalkedTree {
    pub files: Vec<WalkedFile>,
    pub directories: Vec<PathBuf>,
}

/// Walks `root` recursively. Refuses non-UTF-8 names, special files, and (with
/// [`SymlinkPolicy::Refuse`]) symlinks; detects symlink loops when following.
pub(crate) fn walk_tree(root: &Path, policy: SymlinkPolicy) -> Result<WalkedTree, CacheError> {
    let mut tree = WalkedTree {
        files: Vec::new(),
        directories: Vec::new(),
    };
    let root_metadata = fs::metadata(root).at(root)?;
    let mut ancestors = vec![file_identity(&root_metadata)];
    walk_into(root, "", policy, &mut ancestors, &mut tree)?;
    tree.files
        .sort_by(|a, b| a.relative.as_bytes().cmp(b.relative.as_bytes()));
    Ok(tree)
}

fn walk_into(
    directory: &Path,
    prefix: &str,
    policy: SymlinkPolicy,
    ancestors: &mut Vec<(u64, u64)>,
    tree: &mut WalkedTree,
) -> Result<(), CacheError> {
    tree.directories.push(directory.to_path_buf());
    for entry in fs::read_dir(directory).at(directory)? {
        let entry = entry.at(directory)?;
        let path = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| CacheError::NonUtf8Path { path: path.clone() })?;
        let relative = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let mut metadata = fs::symlink_metadata(&path).at(&path)?;
        if metadata.file_type().is_symlink() {
            if policy == SymlinkPolicy::Refuse {
                return Err(CacheError::SymlinkInArtifact { path });
            }
            metadata = fs::metadata(&path).at(&path)?;
        }
        if metadata.is_dir() {
            let identity = file_identity(&metadata);
            if ancestors.contains(&identity) {
                return Err(CacheError::SymlinkLoop { path });
            }
            ancestors.push(identity);
            walk_into(&path, &relative, policy, ancestors, tree)?;
            ancestors.pop();
        } else if metadata.is_file() {
            tree.files.push(WalkedFile {
                relative,
                path,
                metadata,
            });
        } else {
            return Err(CacheError::UnsupportedFileType { path });
        }
    }
    Ok(())
}

/// (device, inode): what makes two paths the same directory.
#[cfg(unix)]
fn file_identity(metadata: &Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (metadata.dev(), metadata.ino())
}

#[cfg(not(unix))]
fn file_identity(_metadata: &Metadata) -> (u64, u64) {
    (0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_file_is_blake3_of_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        fs::write(&path, b"hello").unwrap();
        assert_eq!(
            digest_file(&path).unwrap(),
            blake3::hash(b"hello").to_hex().to_string()
        );
    }

    #[test]
    fn digest_dir_follows_the_documented_line_format() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/b"), b"B").unwrap();
        fs::write(dir.path().join("a"), b"A").unwrap();
        let a = blake3::hash(b"A").to_hex().to_string();
        let b = blake3::hash(b"B").to_hex().to_string();
        let expected = blake3::hash(format!("a\0{a}\nsub/b\0{b}\n").as_bytes())
            .to_hex()
            .to_string();
        assert_eq!(digest_dir(dir.path()).unwrap(), expected);
    }

    #[test]
    fn is_digest_accepts_only_64_lowercase_hex() {
        assert!(is_digest(&"a".repeat(64)));
        assert!(!is_digest(&"A".repeat(64)));
        assert!(!is_digest(&"a".repeat(63)));
        assert!(!is_digest(&"g".repeat(64)));
    }
}
