//! Benchmark: a pipeline whose external input is a 2 GiB file, run once (hashes the
//! file), rerun with everything cached (the stat cache must spare the rehash), and rerun
//! after `touch` (same bytes, new mtime: rehashed, stage still cached).
//!
//!     cargo bench --profile dev --bench rerun_2gb
//!
//! The file is real data (a 1 MiB random block repeated) in a temp dir; RLHF_BENCH_DIR
//! picks another folder (same disk as the cache, which lives beside it).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SIZE: u64 = 2 << 30;

fn rlhf(bin: &str, dir: &Path, args: &[&str]) -> (Duration, String) {
    let started = Instant::now();
    let output = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env_remove("RLHF_LOG")
        .output()
        .expect("run rlhf");
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "rlhf {args:?} failed:\n{stderr}");
    (
        elapsed,
        stderr.lines().last().unwrap_or_default().to_string(),
    )
}

fn write_big_file(path: &Path) {
    let mut block = vec![0u8; 1 << 20];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for byte in block.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    for i in 0..SIZE / block.len() as u64 {
        block[0] = i as u8; // no two blocks alike
        file.write_all(&block).expect("write");
    }
    file.flush().expect("flush");
}

fn main() {
    let bin = std::env::var("RLHF_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_rlhf").to_string());
    let dir = match std::env::var("RLHF_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d),
        Err(_) => tempfile::tempdir(),
    }
    .expect("tempdir");
    let data = dir.path().join("big.bin");
    let started = Instant::now();
    write_big_file(&data);
    println!("binary: {bin}");
    println!("wrote 2 GiB in {:.1} s", started.elapsed().as_secs_f64());
    std::fs::write(
        dir.path().join("p.yaml"),
        "stages:\n  head:\n    kind: command\n    run: [sh, -c, 'head -c 1000 {inputs.big} | wc -c > {out}/n']\n    inputs: { big: big.bin }\n    outputs: [n]\n",
    )
    .expect("write pipeline");
    // Files written within the stat cache's racy window are hashed again on purpose.
    std::thread::sleep(Duration::from_millis(2500));
    let report = |what: &str, (time, summary): (Duration, String)| {
        println!(
            "{what:<44} {:>9.1} ms   ({summary})",
            time.as_secs_f64() * 1e3
        )
    };
    report(
        "first run (hashes 2 GiB, runs the stage):",
        rlhf(&bin, dir.path(), &["run", "p.yaml"]),
    );
    for i in 0..3 {
        report(
            &format!("cached rerun #{}:", i + 1),
            rlhf(&bin, dir.path(), &["run", "p.yaml"]),
        );
    }
    let touched = Command::new("touch").arg(&data).status().expect("touch");
    assert!(touched.success());
    std::thread::sleep(Duration::from_millis(2500));
    report(
        "rerun after touch (rehash, stage cached):",
        rlhf(&bin, dir.path(), &["run", "p.yaml"]),
    );
    report(
        "cached rerun after that:",
        rlhf(&bin, dir.path(), &["run", "p.yaml"]),
    );
}
