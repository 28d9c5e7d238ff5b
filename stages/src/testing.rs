//! Helpers for tests that read the shared fixtures, models and data in `../shared`
//! beside the repository. They are not copied into the repo; a test that needs them
//! fails loudly under CI (`CI=true`) when they are missing, and elsewhere skips with a
//! printed notice.

use std::path::PathBuf;

/// The `shared/` folder beside the repository root.
pub fn shared_root() -> PathBuf {
    let repo_root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    match std::env::var_os("RLHF_SHARED_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => repo_root.join("..").join("shared"),
    }
}

/// `shared/<relative>` if it exists. Under CI a missing file panics (a test must not
/// pass by skipping there); elsewhere it prints a notice and returns `None`.
pub fn shared_path(relative: &str) -> Option<PathBuf> {
    let path = shared_root().join(relative);
    if path.exists() {
        return Some(path);
    }
    let ci = std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false);
    if ci {
        panic!(
            "CI=true but the shared file {} is missing; CI must run with ../shared beside the repo",
            path.display()
        );
    }
    eprintln!(
        "skipping: {} not found (set RLHF_SHARED_DIR or place shared/ beside the repo)",
        path.display()
    );
    None
}
