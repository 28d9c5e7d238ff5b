//! The `human` judge's part of a `collect_preferences` run: the sampled completions become
//! items (written beside the labels file); if some still lack labels the stage waits,
//! otherwise the standing labels become preference pairs with a strength and a margin.

use super::items::{items_of_prompt, write_items, Item};
use super::log::{agreement_on, LabelEvent, LabelState};
use super::{items_path, HumanJudge};
use crate::data::batch::shuffle;
use crate::data::row::Row;
use crate::train::StageResultExt;
use rlhf_engine::{StageContext, StageError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One line of `pairs.jsonl` for the human judge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HumanPair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// `significantly` when the labellers' mean preference is 1.5 or more, else `slightly`.
    pub strength: String,
    /// The mean preference of chosen over rejected (1 = slightly … 2 = significantly); the
    /// `margin` of the dataset row, which the reward model can use.
    pub margin: f64,
    pub labellers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub comments: Vec<String>,
    pub item: String,
    pub judge: String,
}

/// Turns each prompt's sampled completions into items, then waits or writes the pairs.
/// `all_pairs`: every pair of distinct completions; otherwise they are shuffled (seeded)
/// and paired off two by two.
pub fn finish(
    judge: &HumanJudge,
    all_pairs: bool,
    ctx: &mut StageContext,
    rows: &[Row],
    completions: Vec<Vec<String>>,
) -> Result<(), StageError> {
    let mut rng = crate::rl::run_log::step_rng(ctx.seed, 0);
    let mut items: Vec<Item> = Vec::new();
    for (row, mut texts) in rows.iter().zip(completions) {
        if !all_pairs {
            shuffle(&mut texts, &mut rng);
        }
        items.extend(items_of_prompt(
            row.prompt.as_deref().unwrap_or(""),
            &texts,
            all_pairs,
        ));
    }
    let labels_path = Path::new(&judge.labels);
    let items_file = items_path(labels_path);
    write_items(&items_file, &items).or_fail("writing the items to label")?;
    let state = labels_as_keyed(ctx)?;
    let standing = state.standing();
    let needed = judge.labels_per_item.max(1);
    let missing: usize = items
        .iter()
        .map(|i| needed.saturating_sub(standing.get(i.id.as_str()).map_or(0, |l| l.len())))
        .sum();
    if missing > 0 {
        let complete = items.len()
            - items
                .iter()
                .filter(|i| standing.get(i.id.as_str()).map_or(0, |l| l.len()) < needed)
                .count();
        return Err(StageError::Waiting {
            message: format!(
                "waiting for {missing} labels ({complete} of {} pairs done; items in {}) — run `rlhf label <pipeline> --stage {}`",
                items.len(),
                items_file.display(),
                ctx.stage
            ),
        });
    }
    let mut pairs = Vec::new();
    let mut ties = 0usize;
    for item in &items {
        let labels = standing.get(item.id.as_str()).cloned().unwrap_or_default();
        match pair_of(item, &labels) {
            Some(pair) => pairs.push(pair),
            None => ties += 1,
        }
    }
    write_pairs(ctx.output_dir("pairs")?, &pairs)?;
    set_metrics(ctx, rows.len(), &items, &pairs, ties, &state);
    eprintln!(
        "{}: {} pairs from {} labelled items, {ties} judged about the same",
        ctx.stage,
        pairs.len(),
        items.len()
    );
    Ok(())
}

/// The labels the stage key was computed from. The log only grows, so if labels were given
/// while this run was going, its prefix with the keyed digest is what counts: the output
/// stays a function of the key. No declared input (the file did not exist when the run
/// was planned) means no labels.
fn labels_as_keyed(ctx: &StageContext) -> Result<LabelState, StageError> {
    let Some(input) = ctx.inputs().get("labels") else {
        return Ok(LabelState::default());
    };
    let bytes = std::fs::read(&input.path).map_err(|e| StageError::io(&input.path, e))?;
    let line_ends = bytes
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .map(|(i, _)| i + 1);
    let mut ends: Vec<usize> = std::iter::once(bytes.len())
        .chain(line_ends.rev())
        .collect();
    ends.push(0);
    let keyed = ends
        .into_iter()
        .find(|&end| blake3::hash(&bytes[..end]).to_hex().as_str() == input.digest);
    match keyed {
        Some(end) => Ok(LabelState::from_text(&String::from_utf8_lossy(&bytes[..end]))),
        None => Err(StageError::failed_with_hint(
            format!("{} changed during the run and is no longer the file the stage key was computed from", input.path.display()),
            "labels files are append-only; run `rlhf run` again",
        )),
    }
}

/// The item's pair by the labellers' mean preference; `None` when it is zero (a tie).
fn pair_of(item: &Item, labels: &BTreeMap<&str, &LabelEvent>) -> Option<HumanPair> {
    let mean = labels
        .values()
        .map(|l| f64::from(l.preference))
        .sum::<f64>()
        / labels.len().max(1) as f64;
    if mean == 0.0 {
        return None;
    }
    let (chosen, rejected) = if mean > 0.0 {
        (&item.first, &item.second)
    } else {
        (&item.second, &item.first)
    };
    Some(HumanPair {
        prompt: item.prompt.clone(),
        chosen: chosen.clone(),
        rejected: rejected.clone(),
        strength: if mean.abs() >= 1.5 {
            "significantly"
        } else {
            "slightly"
        }
        .to_string(),
        margin: mean.abs(),
        labellers: labels.keys().map(|s| s.to_string()).collect(),
        comments: labels
            .values()
            .filter_map(|l| l.comment.clone())
            .filter(|c| !c.is_empty())
            .collect(),
        item: item.id.clone(),
        judge: "human".to_string(),
    })
}

fn write_pairs(dest: &Path, pairs: &[HumanPair]) -> Result<(), StageError> {
    crate::kinds::collect_preferences::write_preference_artifact(dest, pairs, |p| Row {
        prompt: Some(p.prompt.clone()),
        chosen: Some(p.chosen.clone()),
        rejected: Some(p.rejected.clone()),
        margin: Some(p.margin),
        ..Row::default()
    })
}

fn set_metrics(
    ctx: &mut StageContext,
    prompts: usize,
    items: &[Item],
    pairs: &[HumanPair],
    ties: usize,
    state: &LabelState,
) {
    let standing = state.standing();
    let used: usize = items
        .iter()
        .map(|i| standing.get(i.id.as_str()).map_or(0, |l| l.len()))
        .sum();
    ctx.metrics.set("prompts", prompts as u64);
    ctx.metrics.set("items", items.len() as u64);
    ctx.metrics.set("pairs", pairs.len() as u64);
    ctx.metrics.set("ties_dropped", ties as u64);
    ctx.metrics.set("labels", used as u64);
    let labellers: std::collections::BTreeSet<&str> = items
        .iter()
        .flat_map(|i| {
            standing
                .get(i.id.as_str())
                .into_iter()
                .flat_map(|l| l.keys().copied())
        })
        .collect();
    ctx.metrics.set("labellers", labellers.len() as u64);
    ctx.metrics.set(
        "significantly",
        pairs
            .iter()
            .filter(|p| p.strength == "significantly")
            .count() as u64,
    );
    let margin = pairs.iter().map(|p| p.margin).sum::<f64>() / pairs.len().max(1) as f64;
    ctx.metrics.set("mean_margin", margin);
    let current: std::collections::BTreeSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
    let agreement = agreement_on(state, |item| current.contains(item));
    ctx.metrics
        .set("agreement_comparisons", agreement.comparisons as u64);
    if let Some(direction) = agreement.direction {
        ctx.metrics.set("agreement", direction);
    }
    if let Some(exact) = agreement.exact {
        ctx.metrics.set("agreement_exact", exact);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::label::log::{Event, LabelLog, Side};
    use rlhf_engine::metrics::MetricsSink;
    use rlhf_engine::InputArtifact;

    struct Fixture {
        dir: tempfile::TempDir,
        judge: HumanJudge,
    }

    impl Fixture {
        fn new(labels_per_item: usize) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let labels = dir.path().join("labels/prefs.jsonl").display().to_string();
            Fixture {
                dir,
                judge: HumanJudge {
                    labels,
                    labels_per_item,
                },
            }
        }

        /// Runs `finish` on two prompts with 2 completions each (one item per prompt).
        fn finish(
            &self,
        ) -> (
            Result<(), StageError>,
            std::path::PathBuf,
            serde_json::Map<String, serde_json::Value>,
        ) {
            let out = self.dir.path().join(format!("out{}", rand_suffix()));
            std::fs::create_dir_all(&out).unwrap();
            let mut ctx = StageContext::new(
                "prefs",
                "collect_preferences",
                1,
                self.dir.path().join("scratch"),
                self.dir.path().join("log"),
            )
            .with_output("pairs", out.clone())
            .with_metrics(MetricsSink::new(Some(out.clone()), None));
            // As the engine plans a run: the labels file, if it exists, is an input keyed by
            // the digest of its bytes.
            let labels = Path::new(&self.judge.labels);
            if let Ok(bytes) = std::fs::read(labels) {
                let digest = blake3::hash(&bytes).to_hex().to_string();
                let input = InputArtifact {
                    path: labels.to_path_buf(),
                    kind: None,
                    digest,
                    reference: self.judge.labels.clone(),
                };
                ctx = ctx.with_input("labels", input);
            }
            let rows: Vec<Row> = ["p1", "p2"]
                .iter()
                .map(|p| Row {
                    prompt: Some(p.to_string()),
                    ..Row::default()
                })
                .collect();
            let completions = vec![
                vec!["a1".to_string(), "b1".to_string()],
                vec!["a2".to_string(), "b2".to_string()],
            ];
            let result = finish(&self.judge, true, &mut ctx, &rows, completions);
            (result, out, ctx.metrics.summary().clone())
        }

        fn label(&self, item: &Item, labeller: &str, preference: i8) {
            let mut log = LabelLog::open(Path::new(&self.judge.labels)).unwrap();
            let event = LabelEvent {
                item: item.id.clone(),
                labeller: labeller.into(),
                choice: 3,
                a_is: Side::First,
                preference,
                comment: None,
                unix_ms: 0,
            };
            log.append(Event::Label(event)).unwrap();
        }
    }

    fn read_pairs(out: &Path) -> Vec<HumanPair> {
        std::fs::read_to_string(out.join("pairs.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn rand_suffix() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    }

    #[test]
    fn without_labels_the_stage_waits_and_writes_the_items_to_label() {
        let fixture = Fixture::new(1);
        let (result, _, _) = fixture.finish();
        match result {
            Err(StageError::Waiting { message }) => {
                assert!(
                    message.starts_with("waiting for 2 labels (0 of 2 pairs done"),
                    "{message}"
                );
                assert!(
                    message.contains("rlhf label <pipeline> --stage prefs"),
                    "{message}"
                );
            }
            other => panic!("expected Waiting, got {other:?}"),
        }
        let items =
            crate::label::items::read_items(&items_path(Path::new(&fixture.judge.labels))).unwrap();
        assert_eq!(
            items,
            vec![Item::new("p1", "a1", "b1"), Item::new("p2", "a2", "b2")]
        );
    }

    #[test]
    fn each_item_needs_labels_per_item_distinct_labellers() {
        let fixture = Fixture::new(2);
        let items = [Item::new("p1", "a1", "b1"), Item::new("p2", "a2", "b2")];
        fixture.label(&items[0], "ann", 2);
        fixture.label(&items[1], "ann", -1);
        fixture.label(&items[0], "bob", 1);
        let (result, _, _) = fixture.finish();
        assert!(
            matches!(&result, Err(StageError::Waiting { message }) if message.starts_with("waiting for 1 labels (1 of 2")),
            "{result:?}"
        );
        fixture.label(&items[1], "bob", 1); // disagrees with ann: mean 0, a tie
        let (result, out, metrics) = fixture.finish();
        result.unwrap();
        let pairs = read_pairs(&out);
        assert_eq!(pairs.len(), 1);
        let pair = &pairs[0];
        assert_eq!((pair.chosen.as_str(), pair.rejected.as_str()), ("a1", "b1"));
        assert_eq!(
            (pair.strength.as_str(), pair.margin),
            ("significantly", 1.5)
        );
        assert_eq!(pair.labellers, vec!["ann".to_string(), "bob".to_string()]);
        let rows = crate::data::row::read_rows(&out).unwrap();
        assert_eq!(
            rows[0].margin,
            Some(1.5),
            "the dataset row carries the margin for the reward model"
        );
        assert_eq!(metrics["ties_dropped"], serde_json::json!(1));
        assert_eq!(metrics["agreement"], serde_json::json!(0.5));
        assert_eq!(metrics["agreement_exact"], serde_json::json!(0.0));
    }

    #[test]
    fn a_negative_preference_chooses_the_second_completion_slightly() {
        let fixture = Fixture::new(1);
        fixture.label(&Item::new("p1", "a1", "b1"), "ann", -1);
        fixture.label(&Item::new("p2", "a2", "b2"), "ann", 2);
        fixture.label(&Item::new("p0", "old", "stale"), "ann", 2); // an item of an earlier run
        let (result, out, metrics) = fixture.finish();
        result.unwrap();
        let pairs = read_pairs(&out);
        assert_eq!(
            (
                pairs[0].chosen.as_str(),
                pairs[0].strength.as_str(),
                pairs[0].margin
            ),
            ("b1", "slightly", 1.0)
        );
        assert_eq!(pairs[0].judge, "human");
        assert_eq!(
            metrics["labels"],
            serde_json::json!(2),
            "labels of items no longer sampled do not count"
        );
    }
}

#[cfg(test)]
mod keyed_tests {
    use super::*;
    use rlhf_engine::InputArtifact;

    fn context_with(path: &Path, digest: String) -> StageContext {
        let input = InputArtifact {
            path: path.to_path_buf(),
            kind: None,
            digest,
            reference: "l.jsonl".into(),
        };
        StageContext::new(
            "prefs",
            "collect_preferences",
            1,
            path.with_extension("s"),
            path.with_extension("l"),
        )
        .with_input("labels", input)
    }

    #[test]
    fn labels_appended_after_the_key_was_computed_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.jsonl");
        let first = r#"{"event":"label","item":"i1","labeller":"ann","choice":1,"a_is":"first","preference":2,"unix_ms":0}"#;
        let later = r#"{"event":"label","item":"i2","labeller":"ann","choice":1,"a_is":"first","preference":2,"unix_ms":0}"#;
        let keyed = blake3::hash(format!("{first}\n").as_bytes())
            .to_hex()
            .to_string();
        std::fs::write(&path, format!("{first}\n{later}\n")).unwrap();
        let state = labels_as_keyed(&context_with(&path, keyed)).unwrap();
        assert_eq!(
            state.labelled_by("ann").into_iter().collect::<Vec<_>>(),
            vec!["i1"]
        );
        let rewritten = labels_as_keyed(&context_with(&path, "0".repeat(64)));
        assert!(
            matches!(rewritten, Err(StageError::Failed { .. })),
            "a file that is not an extension of the keyed one fails"
        );
        let undeclared = StageContext::new(
            "prefs",
            "collect_preferences",
            1,
            dir.path().join("s"),
            dir.path().join("l"),
        );
        assert!(
            labels_as_keyed(&undeclared).unwrap().labellers().is_empty(),
            "no declared input: no labels"
        );
    }
}
