//! Reading and tokenising 15,000 Dolly-sized rows: the cost of the data path before the
//! first SFT step.
//!
//!     cargo bench -p rlhf-stages --bench data_tokenize          (release)
//!     DATA_BENCH_ROWS=2000 cargo bench -p rlhf-stages --bench data_tokenize
//!
//! The rows are built from ../shared/data/self-instruct-seed-tasks/dolly_format.jsonl
//! (175 records in Dolly's schema): row k takes record k's instruction, record k+1's context and
//! the responses of records k and k+2, so that a JSON line
//! is about Dolly-15k's size (13.2 MB / 15,011 rows ≈ 880 bytes). Phases timed apart:
//! read + map (`load_rows`, format `dolly`), then render + tokenise through the default
//! "User: …\n\nAssistant: " template, row by row and as one batch, with two tokenizers:
//! the TRL reference tokenizer (byte-level BPE, vocab 512) and a vocab-8192 BPE trained
//! here on the same rows (training time reported too).
//!
//! Measured 2026-11-22 (release, 2 shared cores under load average 6–7, so pessimistic):
//! 15,000 rows, 12.4 MB: read + map 0.035 s (430k rows/s); tokenise row by row 6.97 s
//! (2,150 rows/s, 1.18 M tokens/s, vocab 512, 546 tokens/row) and 6.80 s (2,210 rows/s,
//! vocab 8192, 188 tokens/row); the batch path was slower (19.0 s / 9.9 s) because its
//! thread pool fought the other builds for the cores. Time goes to the ByteLevel
//! pre-tokenizer regex (fancy-regex's backtracking VM), not to BPE merges: both vocab
//! sizes cost the same per row.

use rlhf_stages::data::batch::Encoder;
use rlhf_stages::data::format::Format;
use rlhf_stages::data::load::{load_rows, LoadOptions};
use rlhf_stages::data::row::Row;
use rlhf_stages::data::template::PromptTemplate;
use rlhf_stages::data::tokenizer::{
    load_tokenizer, special_tokens, train_bpe, BpeSettings, SpecialTokens,
};
use std::io::Write;
use std::time::Instant;
use tokenizers::Tokenizer;

fn main() {
    let rows: usize = std::env::var("DATA_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15_000);
    let Some(source) =
        rlhf_stages::testing::shared_path("data/self-instruct-seed-tasks/dolly_format.jsonl")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dolly_sized.jsonl");
    let bytes = write_dolly_sized(&source, &file, rows);
    println!(
        "{rows} rows, {:.1} MB, {:.0} bytes per JSON line",
        bytes as f64 / 1e6,
        bytes as f64 / rows as f64
    );

    let start = Instant::now();
    let options = LoadOptions {
        format: Format::Dolly,
        ..LoadOptions::default()
    };
    let loaded = load_rows(&file, &options).expect("load");
    let read = start.elapsed().as_secs_f64();
    assert_eq!(loaded.rows.len(), rows);
    println!(
        "read + map (dolly):        {read:.3} s  {:>10.0} rows/s",
        rows as f64 / read
    );

    if let Some(dir) = rlhf_stages::testing::shared_path("bench/trl/tokenizer") {
        let tokenizer = load_tokenizer(&dir).expect("tokenizer");
        let special = special_tokens(&dir, &tokenizer).expect("special tokens");
        tokenise(
            "TRL tokenizer, vocab 512",
            &tokenizer,
            special,
            &loaded.rows,
            read,
        );
    }
    let start = Instant::now();
    let texts: Vec<&str> = loaded.rows.iter().flat_map(|r| r.texts()).collect();
    let settings = BpeSettings {
        vocab_size: 8192,
        ..BpeSettings::default()
    };
    let tokenizer = train_bpe(texts.into_iter(), &settings).expect("train");
    println!(
        "train BPE vocab 8192:      {:.3} s",
        start.elapsed().as_secs_f64()
    );
    let special = SpecialTokens {
        pad: 0,
        bos: Some(1),
        eos: 2,
    };
    tokenise(
        "trained BPE, vocab 8192",
        &tokenizer,
        special,
        &loaded.rows,
        read,
    );
}

fn tokenise(
    name: &str,
    tokenizer: &Tokenizer,
    special: SpecialTokens,
    rows: &[Row],
    read_seconds: f64,
) {
    let renderer = PromptTemplate::default().renderer().expect("template");
    let encoder = Encoder::new(tokenizer, &renderer, special);
    let start = Instant::now();
    let mut tokens = 0usize;
    for row in rows {
        let example = encoder
            .encode_example(row)
            .expect("encode")
            .expect("no max_length");
        tokens += example.prompt.len() + example.completion.len();
    }
    let one_by_one = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let batch = encoder.encode_examples(rows).expect("encode batch");
    let batched = start.elapsed().as_secs_f64();
    let batch_tokens: usize = batch
        .iter()
        .flatten()
        .map(|e| e.prompt.len() + e.completion.len())
        .sum();
    assert_eq!(batch_tokens, tokens, "batch and row-by-row encodings agree");
    let n = rows.len() as f64;
    println!("{name}: {:.0} tokens per row", tokens as f64 / n);
    println!(
        "  tokenise row by row:     {one_by_one:.3} s  {:>10.0} rows/s  {:>12.0} tokens/s",
        n / one_by_one,
        tokens as f64 / one_by_one
    );
    println!(
        "  tokenise as a batch:     {batched:.3} s  {:>10.0} rows/s  {:>12.0} tokens/s",
        n / batched,
        tokens as f64 / batched
    );
    let total = read_seconds + batched.min(one_by_one);
    println!(
        "  read + tokenise:         {total:.3} s  {:>10.0} rows/s",
        n / total
    );
}

/// Writes `rows` Dolly-schema lines built from the 175 self-instruct records; returns bytes.
fn write_dolly_sized(source: &std::path::Path, target: &std::path::Path, rows: usize) -> u64 {
    let records: Vec<serde_json::Value> = std::fs::read_to_string(source)
        .expect("source")
        .lines()
        .map(|line| serde_json::from_str(line).expect("json"))
        .collect();
    let field = |i: usize, key: &str| {
        records[i % records.len()][key]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(target).expect("create"));
    let mut bytes = 0u64;
    for k in 0..rows {
        let context = field(k + 1, "context");
        let response = [field(k, "response"), field(k + 2, "response")].join(" ");
        let line = serde_json::json!({
            "instruction": format!("{} (variant {k})", field(k, "instruction")),
            "context": context,
            "response": response,
            "category": field(k, "category"),
        })
        .to_string();
        bytes += line.len() as u64 + 1;
        writeln!(out, "{line}").expect("write");
    }
    bytes
}
