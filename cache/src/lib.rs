//! rlhf-cache: the content-addressed artifact store and the action records of rlhf.
//!
//! - An *artifact* is a directory, stored once under `v1/objects/<digest>`, where the
//!   digest is blake3 over its sorted `relative/path\0<file digest>\n` lines. It is built
//!   in a [`StagingDir`] and committed atomically ([`Cache::commit_artifact`]).
//! - A *record* maps a stage key to the digests of what the stage produced
//!   ([`Record`]); it is written after its artifacts, so it never points at a partial one.
//! - *Locks* make concurrent runs safe: one exclusive lock per key, and a cache-wide
//!   lock that runs hold shared and gc/verify take exclusively.
//! - External inputs are hashed by content behind a stat cache
//!   ([`Cache::digest_external`]).
//!
//! Nothing here knows about ML or about pipelines; the engine decides keys and roots.

mod artifact;
mod digest;
mod error;
mod fsutil;
mod gc;
mod lock;
mod record;
mod statcache;
mod store;
mod verify;

pub use artifact::{ArtifactHealth, ArtifactInfo};
pub use digest::{combine_file_digests, digest_dir, digest_file, is_digest, Digest};
pub use error::CacheError;
pub use gc::GcReport;
pub use lock::{CacheLock, KeyLock};
pub use record::{Record, RECORD_FORMAT};
pub use statcache::{ExternalDigest, RACY_WINDOW};
pub use store::{Cache, StagingDir, LAYOUT_VERSION};
pub use verify::VerifyReport;
