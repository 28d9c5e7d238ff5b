//! Held-out evaluation used inside training stages: exact match of greedy answers
//! (BENCH.md: greedy, at most `max_new_tokens`, stop at eos, the text up to the first
//! newline stripped must equal the gold completion stripped).

use super::model_input::TextCodec;
use super::StageResultExt;
use crate::data::row::Row;
use crate::eval::metrics::exact_match;
use crate::model::{generate, CausalLm, GenerationSettings};
use crate::parallel::map_shards;
use rlhf_engine::StageError;

/// Prompts per generation batch.
const GENERATION_BATCH: usize = 100;

/// The training loop's `evaluate` callback for every training kind: held-out exact-match
/// `accuracy`, or no metric at all when there is no held-out set.
pub fn accuracy_metrics(
    model: &CausalLm,
    codec: &TextCodec,
    rows: &[Row],
    max_new_tokens: usize,
) -> Result<Vec<(&'static str, f64)>, StageError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let accuracy = exact_match_accuracy(model, codec, rows, max_new_tokens)?;
    Ok(vec![("accuracy", accuracy)])
}

/// Fraction of `rows` (prompt + completion, or prompt + answer) whose greedy answer is
/// exactly right.
pub fn exact_match_accuracy(
    model: &CausalLm,
    codec: &TextCodec,
    rows: &[Row],
    max_new_tokens: usize,
) -> Result<f64, StageError> {
    if rows.is_empty() {
        return Ok(f64::NAN);
    }
    let encoder = codec.encoder();
    let settings = GenerationSettings {
        max_new_tokens,
        eos_token_ids: vec![codec.special.eos],
        pad_token_id: codec.special.pad,
        ..GenerationSettings::greedy()
    };
    // Greedy answers do not depend on which rows share a batch, so the chunks can run
    // on every thread at once without changing the result.
    let chunk_size = rows
        .len()
        .div_ceil(rayon::current_num_threads())
        .clamp(1, GENERATION_BATCH);
    let chunks: Vec<&[Row]> = rows.chunks(chunk_size).collect();
    let correct = map_shards(chunks.len(), |k| -> Result<usize, StageError> {
        let chunk = chunks[k];
        let prompts = chunk
            .iter()
            .map(|row| encoder.encode_prompt(row))
            .collect::<Result<Vec<_>, _>>()
            .or_fail("encoding evaluation prompts")?;
        let output = generate(model, &prompts, &settings, None).or_fail("greedy generation")?;
        let mut correct = 0;
        for (row, tokens) in chunk.iter().zip(&output.tokens) {
            let text = codec
                .tokenizer
                .decode(tokens, true)
                .or_fail("decoding a generated answer")?;
            let gold = row
                .completion
                .as_deref()
                .or(row.answer.as_deref())
                .unwrap_or("");
            correct += usize::from(exact_match(&text, gold));
        }
        Ok(correct)
    })
    .into_iter()
    .sum::<Result<usize, StageError>>()?;
    Ok(correct as f64 / rows.len() as f64)
}
