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
//!
//! The protocol a run follows (what makes two concurrent runs safe and each stage run once):
//!
//! 1. hold [`Cache::lock_shared`] for the whole run (gc and verify wait for it);
//! 2. per stage: [`Cache::lock_key`] (flock: also excludes other threads; never take the
//!    same key twice in one thread), then [`Cache::read_record`]; a hit counts only if
//!    [`Cache::check_artifact`] is `Ok` for every output; a `CorruptRecord` is a miss;
//! 3. on a miss: build each output in a [`Cache::staging_dir`] (checkpoints in
//!    [`Cache::scratch_dir`]), [`Cache::commit_artifact`] each, then
//!    [`Cache::write_record`], then [`Cache::clear_scratch`]; drop the key lock.
//!
//! [`Cache::gc`] and [`Cache::verify`] take the exclusive cache lock themselves (or run
//! under the caller's [`Cache::lock_exclusive`]); they fail with [`CacheError::Busy`]
//! while a run holds it shared, and never wait.

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
