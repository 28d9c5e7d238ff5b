//! Seeded, stable selection of rows: shuffling, sampling, splitting and token-length
//! filters.
//!
//! Randomness comes from one place: a row's rank is blake3(seed as 8 little-endian
//! bytes ‖ the row's `data.jsonl` line). Sorting by rank is a shuffle that depends only
//! on the seed and the rows' content: the same seed gives the same order run after run,
//! on any machine and thread count, and even when the source lists its rows in another
//! order. Splits cut that order into consecutive pieces, in the alphabetical order of
//! the split names (`eval` before `train`).

use super::error::DataError;
use super::row::Row;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The size of one split: a count of rows, or a fraction of them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum SplitSize {
    Count(u64),
    Fraction(f64),
}

/// Split name → size, e.g. `{train: 0.95, eval: 0.05}` or `{train: 1000, eval: 100}`.
pub type SplitSpec = BTreeMap<String, SplitSize>;

/// Token-length bounds; a row outside any of them is dropped. Prompt = `prompt` (or a
/// chat's messages before the last assistant turn); completion = `completion`, the
/// longer of `chosen`/`rejected`, a chat's last assistant turn, or `text`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LengthFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_prompt_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prompt_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_completion_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<usize>,
    /// Prompt plus completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_tokens: Option<usize>,
}

impl LengthFilter {
    pub fn is_empty(&self) -> bool {
        *self == LengthFilter::default()
    }

    /// Whether a row with these token counts passes.
    pub fn keeps(&self, prompt_tokens: usize, completion_tokens: usize) -> bool {
        let at_least = |bound: Option<usize>, n: usize| bound.is_none_or(|b| n >= b);
        let at_most = |bound: Option<usize>, n: usize| bound.is_none_or(|b| n <= b);
        at_least(self.min_prompt_tokens, prompt_tokens)
            && at_most(self.max_prompt_tokens, prompt_tokens)
            && at_least(self.min_completion_tokens, completion_tokens)
            && at_most(self.max_completion_tokens, completion_tokens)
            && at_most(self.max_total_tokens, prompt_tokens + completion_tokens)
    }
}

/// The texts a length filter measures: (prompt, completion).
pub fn measured_texts(row: &Row) -> (String, String) {
    if let Some((before, last)) = row.split_last_assistant() {
        let prompt: Vec<&str> = before.iter().map(|m| m.content.as_str()).collect();
        return (prompt.join("\n"), last.to_string());
    }
    let prompt = row.prompt.clone().unwrap_or_default();
    let completion = match (&row.completion, &row.chosen, &row.rejected, &row.text) {
        (Some(completion), ..) => completion.clone(),
        (None, Some(chosen), Some(rejected), _) => {
            if chosen.len() >= rejected.len() {
                chosen.clone()
            } else {
                rejected.clone()
            }
        }
        (None, _, _, Some(text)) => text.clone(),
        _ => String::new(),
    };
    (prompt, completion)
}

/// Keeps the rows that pass `filter`; `count_tokens` turns a text into a token count.
/// For preference rows the longer of chosen/rejected (in tokens) is measured.
pub fn filter_by_length(
    rows: Vec<Row>,
    filter: &LengthFilter,
    count_tokens: &dyn Fn(&str) -> Result<usize, DataError>,
) -> Result<(Vec<Row>, usize), DataError> {
    if filter.is_empty() {
        return Ok((rows, 0));
    }
    let mut kept = Vec::with_capacity(rows.len());
    let mut dropped = 0;
    for row in rows {
        let (prompt, completion) = measured_texts(&row);
        let completion_tokens = match (&row.completion, &row.chosen, &row.rejected) {
            (None, Some(chosen), Some(rejected)) => {
                count_tokens(chosen)?.max(count_tokens(rejected)?)
            }
            _ => count_tokens(&completion)?,
        };
        if filter.keeps(count_tokens(&prompt)?, completion_tokens) {
            kept.push(row);
        } else {
            dropped += 1;
        }
    }
    Ok((kept, dropped))
}

/// blake3(seed ‖ row line): the rank of a row in the seeded shuffle.
pub fn row_rank(seed: u64, row: &Row) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed.to_le_bytes());
    hasher.update(row.to_json_line().as_bytes());
    *hasher.finalize().as_bytes()
}

/// Indices of `rows` in seeded shuffle order (ties, i.e. identical rows, by index).
pub fn shuffled_order(rows: &[Row], seed: u64) -> Vec<usize> {
    let mut ranked: Vec<([u8; 32], usize)> = rows
        .iter()
        .enumerate()
        .map(|(index, row)| (row_rank(seed, row), index))
        .collect();
    ranked.sort_unstable();
    ranked.into_iter().map(|(_, index)| index).collect()
}

/// Rows per split for `total` rows, in split-name order. Fractions are rounded down and,
/// when they add up to 1, the rows left over go one each to the largest remainders so
/// that no row is lost; counts must fit in `total`.
pub fn split_counts(spec: &SplitSpec, total: usize) -> Result<Vec<(String, usize)>, DataError> {
    check_split_spec(spec)?;
    let all_counts = spec.values().all(|s| matches!(s, SplitSize::Count(_)));
    if all_counts {
        let wanted: u64 = spec
            .values()
            .map(|s| if let SplitSize::Count(c) = s { *c } else { 0 })
            .sum();
        if wanted > total as u64 {
            return Err(DataError::param(
                "split",
                format!("the splits ask for {wanted} rows but only {total} are left after reading and filtering"),
            ));
        }
        return Ok(spec
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    if let SplitSize::Count(c) = s {
                        *c as usize
                    } else {
                        0
                    },
                )
            })
            .collect());
    }
    let fractions: Vec<(String, f64)> = spec
        .iter()
        .map(|(name, s)| {
            (
                name.clone(),
                if let SplitSize::Fraction(f) = s {
                    *f
                } else {
                    0.0
                },
            )
        })
        .collect();
    let sum: f64 = fractions.iter().map(|(_, f)| f).sum();
    let mut counts: Vec<(String, usize, f64)> = fractions
        .iter()
        .map(|(name, f)| {
            let exact = f * total as f64;
            (name.clone(), exact.floor() as usize, exact - exact.floor())
        })
        .collect();
    if (sum - 1.0).abs() < 1e-9 {
        let assigned: usize = counts.iter().map(|c| c.1).sum();
        let mut by_remainder: Vec<usize> = (0..counts.len()).collect();
        // Largest remainder first; ties keep name order (the sort is stable).
        by_remainder.sort_by(|&a, &b| counts[b].2.total_cmp(&counts[a].2));
        for &index in by_remainder
            .iter()
            .cycle()
            .take(total.saturating_sub(assigned))
        {
            counts[index].1 += 1;
        }
    }
    Ok(counts
        .into_iter()
        .map(|(name, count, _)| (name, count))
        .collect())
}

/// Checks a split spec on its own (before any row is read).
pub fn check_split_spec(spec: &SplitSpec) -> Result<(), DataError> {
    if spec.is_empty() {
        return Err(DataError::param(
            "split",
            "name at least one split, e.g. `{train: 0.9, eval: 0.1}`",
        ));
    }
    let counts = spec
        .values()
        .filter(|s| matches!(s, SplitSize::Count(_)))
        .count();
    if counts != 0 && counts != spec.len() {
        return Err(DataError::param(
            "split",
            "give every split a fraction (0.9) or every split a count (900), not a mix",
        ));
    }
    for (name, size) in spec {
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(DataError::param(
                &format!("split.{name}"),
                "a split name must be letters, digits, `_` or `-` (it becomes the output `stage.name`)",
            ));
        }
        if let SplitSize::Fraction(f) = size {
            if !(f.is_finite() && *f > 0.0 && *f <= 1.0) {
                return Err(DataError::param(
                    &format!("split.{name}"),
                    format!("fraction {f} is not in (0, 1]"),
                ));
            }
        }
    }
    let sum: f64 = spec
        .values()
        .map(|s| {
            if let SplitSize::Fraction(f) = s {
                *f
            } else {
                0.0
            }
        })
        .sum();
    if sum > 1.0 + 1e-9 {
        return Err(DataError::param(
            "split",
            format!("the fractions add up to {sum}, more than 1"),
        ));
    }
    Ok(())
}

/// How to pick and order rows after reading.
#[derive(Clone, Debug, Default)]
pub struct SelectPlan {
    /// Keep this many rows, chosen at random (seeded), before splitting.
    pub sample: Option<usize>,
    /// `None`: one output of every row.
    pub split: Option<SplitSpec>,
    /// Seeded shuffle of each output; `false` keeps the source order within each.
    pub shuffle: bool,
}

/// Applies a plan: returns (output name, rows) in name order; `data` with no split.
pub fn select(
    rows: Vec<Row>,
    plan: &SelectPlan,
    seed: u64,
) -> Result<Vec<(String, Vec<Row>)>, DataError> {
    let mut order = shuffled_order(&rows, seed);
    if let Some(sample) = plan.sample {
        order.truncate(sample);
    }
    let pieces: Vec<(String, Vec<usize>)> = match &plan.split {
        None => vec![("data".to_string(), order)],
        Some(spec) => {
            let mut rest = order.as_slice();
            let mut pieces = Vec::new();
            for (name, count) in split_counts(spec, rest.len())? {
                let (head, tail) = rest.split_at(count.min(rest.len()));
                pieces.push((name, head.to_vec()));
                rest = tail;
            }
            pieces
        }
    };
    let mut slots: Vec<Option<Row>> = rows.into_iter().map(Some).collect();
    Ok(pieces
        .into_iter()
        .map(|(name, mut indices)| {
            if !plan.shuffle {
                indices.sort_unstable();
            }
            let rows = indices
                .into_iter()
                .filter_map(|i| slots[i].take())
                .collect();
            (name, rows)
        })
        .collect())
}
