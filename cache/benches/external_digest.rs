//! Benchmark of `Cache::digest_external` on one big file: the first digest (cold stat
//! cache: the whole file is hashed; the file is in the page cache since it was just
//! written) and the second (stat-cache hit: a few syscalls and one small JSON read).
//!
//!     cargo bench -p rlhf-cache --bench external_digest
//!     RLHF_BENCH_BYTES=268435456 cargo bench -p rlhf-cache --bench external_digest
//!
//! Size defaults to 2 GiB; the temp dir is created under `RLHF_BENCH_DIR` (default: the
//! system temp dir) and deleted at the end.

use rlhf_cache::{Cache, RACY_WINDOW};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::time::Instant;

const DEFAULT_BYTES: u64 = 2 << 30;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bytes: u64 = match std::env::var("RLHF_BENCH_BYTES") {
        Ok(text) => text.parse()?,
        Err(_) => DEFAULT_BYTES,
    };
    let parent = std::env::var_os("RLHF_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let temp = tempfile::tempdir_in(parent)?;
    let input = temp.path().join("big.bin");
    write_pseudo_random_file(&input, bytes)?;
    // A file modified within the racy window is (correctly) not trusted by the stat
    // cache; wait it out so the second digest measures a hit.
    std::thread::sleep(RACY_WINDOW + std::time::Duration::from_millis(100));
    let cache = Cache::open(&temp.path().join("cache"))?;

    let start = Instant::now();
    let first = cache.digest_external_with_stats(&input)?;
    let cold = start.elapsed();
    let start = Instant::now();
    let second = cache.digest_external_with_stats(&input)?;
    let warm = start.elapsed();

    assert_eq!(first.digest, second.digest);
    assert_eq!((first.hashed_files, second.hashed_files), (1, 0));
    let mib = bytes as f64 / (1 << 20) as f64;
    println!(
        "file: {bytes} bytes ({mib:.0} MiB), threads available: {}",
        rayon_threads()
    );
    println!(
        "first digest_external (hash):        {:>10.3} s  ({:.0} MiB/s)",
        cold.as_secs_f64(),
        mib / cold.as_secs_f64()
    );
    println!(
        "second digest_external (stat hit):   {:>10.1} us",
        warm.as_secs_f64() * 1e6
    );
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Incompressible bytes from a xorshift generator (fast; content is irrelevant to blake3).
fn write_pseudo_random_file(path: &std::path::Path, bytes: u64) -> std::io::Result<()> {
    let mut writer = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 1 << 20];
    let mut written = 0u64;
    while written < bytes {
        for chunk in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        let n = (bytes - written).min(block.len() as u64) as usize;
        writer.write_all(&block[..n])?;
        written += n as u64;
    }
    writer.flush()
}
