//! `rlhf run`: run what is not cached, print one line (or JSON object) per stage, then
//! the failures with their hints.

use super::{print_error, print_json, print_run_error, Workspace};
use rlhf_engine::run::{Outcome, RunOptions};
use std::path::Path;

pub fn run(
    file: &Path,
    overrides: &[String],
    cache_dir: &Path,
    options: &RunOptions,
    json: bool,
) -> i32 {
    // Before any tensor work: shards run one per thread, candle's per-op threads off.
    if let Err(message) = rlhf_stages::parallel::use_data_parallel_threads(options.threads) {
        eprintln!("warning: {message}; shards run one after another");
    }
    let workspace = match Workspace::open(file, overrides, cache_dir) {
        Ok(w) => w,
        Err(code) => return code,
    };
    let report = match workspace.engine().run(&workspace.pipeline, options) {
        Ok(r) => r,
        Err(e) => return print_run_error(&e),
    };
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    for stage in &report.stages {
        if json {
            print_json(stage);
        }
        let status = match stage.status {
            Outcome::Ran => "ran",
            Outcome::Cached => "cached",
            Outcome::Verified => "verified",
            Outcome::Mismatch => "MISMATCH",
            Outcome::Failed => "FAILED",
            Outcome::Skipped => "skipped",
            Outcome::Waiting => "waiting",
        };
        let time = if stage.seconds > 0.0 {
            format!(" ({:.1}s)", stage.seconds)
        } else {
            String::new()
        };
        eprintln!("{status:>9}  {}{time}", stage.stage);
    }
    let count = |o: Outcome| report.stages.iter().filter(|s| s.status == o).count();
    eprintln!(
        "{} ran, {} cached, {} failed, {} skipped{}",
        count(Outcome::Ran),
        count(Outcome::Cached),
        count(Outcome::Failed),
        count(Outcome::Skipped),
        if options.verify {
            format!(
                ", {} verified, {} mismatched",
                count(Outcome::Verified),
                count(Outcome::Mismatch)
            )
        } else {
            String::new()
        }
    );
    for stage in report.stages.iter().filter(|s| {
        s.kind == "evaluate"
            && matches!(s.status, Outcome::Ran | Outcome::Cached | Outcome::Verified)
    }) {
        eprint!("{}", evaluation_table(&stage.stage, &stage.metrics));
    }
    for stage in report.stages.iter().filter(|s| {
        matches!(
            s.status,
            Outcome::Failed | Outcome::Mismatch | Outcome::Waiting
        )
    }) {
        print_error(
            &format!(
                "stage `{}`: {}",
                stage.stage,
                stage.message.clone().unwrap_or_default()
            ),
            stage.hint.as_deref(),
        );
    }
    report.exit_code()
}

/// The metrics of an evaluate stage (`{model: {metric: value}}`) as a text table: one row
/// per model, one column per metric (`-` where a model lacks one). Empty when there is
/// nothing to show.
pub fn evaluation_table(stage: &str, metrics: &serde_json::Value) -> String {
    let Some(models) = metrics.as_object() else {
        return String::new();
    };
    let rows: Vec<(&String, &serde_json::Map<String, serde_json::Value>)> = models
        .iter()
        .filter_map(|(name, value)| value.as_object().map(|m| (name, m)))
        .collect();
    let mut columns: Vec<&String> = Vec::new();
    for (_, values) in &rows {
        for (name, value) in values.iter() {
            if value.is_number() && !columns.contains(&name) {
                columns.push(name);
            }
        }
    }
    if rows.is_empty() || columns.is_empty() {
        return String::new();
    }
    let width = rows
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut text = format!("\nevaluation `{stage}`\n{:<width$}", "model");
    for column in &columns {
        text.push_str(&format!("  {column:>12}"));
    }
    text.push('\n');
    for (name, values) in &rows {
        text.push_str(&format!("{name:<width$}"));
        for column in &columns {
            // Counts (`n`) are integers in metrics.json and print as such.
            let cell = match values.get(*column) {
                Some(v) if v.is_u64() || v.is_i64() => v.to_string(),
                Some(v) => v.as_f64().map_or("-".to_string(), |f| format!("{f:.4}")),
                None => "-".to_string(),
            };
            text.push_str(&format!("  {cell:>12}"));
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::evaluation_table;

    #[test]
    fn evaluation_table_prints_counts_as_integers_and_scores_with_four_decimals() {
        let metrics = serde_json::json!({ "sft": { "accuracy": 0.125, "n": 200 } });
        let table = evaluation_table("eval", &metrics);
        let row = table.lines().find(|l| l.starts_with("sft")).unwrap();
        assert!(row.contains("0.1250"), "{table}");
        assert!(row.trim_end().ends_with(" 200"), "{table}");
    }
}
