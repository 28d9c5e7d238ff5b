//! `rlhf report`: one static HTML page for a pipeline, readable offline (inline SVG and
//! CSS, no scripts, no external assets): every cached stage's curves over steps from its
//! `metrics.jsonl` (one chart per logged key: loss, reward, kl, accuracy, lr, ...), its
//! final metrics, and a table comparing the models of each `evaluate` stage.
//!
//! The CLI gathers [`StageSection`]s from the cache; [`render`] turns them into HTML.
//! The page is a pure function of that input (no timestamps), so it diffs cleanly.

pub mod chart;

use chart::{escape, format_number, line_chart, Series};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Columns of the model comparison table, in this order; other keys follow sorted.
pub const EVALUATION_COLUMNS: [&str; 9] = [
    "rouge1",
    "rouge2",
    "rougeL",
    "perplexity",
    "reward_mean",
    "accuracy",
    "kl",
    "win_rate",
    "n",
];

/// What the page shows for one stage.
#[derive(Clone, Debug, Default)]
pub struct StageSection {
    pub name: String,
    pub kind: String,
    /// `cached`, `stale` or `blocked`; only cached stages have metrics.
    pub status: String,
    /// Per-step values from metrics.jsonl, in file order.
    pub steps: Vec<StepLine>,
    /// metrics.json (or the stage record's metrics), if any.
    pub summary: Option<Value>,
}

/// One line of metrics.jsonl.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepLine {
    pub step: f64,
    pub values: BTreeMap<String, f64>,
}

/// Reads metrics.jsonl: `{"step": N, name: value, ...}` per line; nulls and
/// non-numeric values are skipped, a line without `step` takes its line index.
pub fn read_metrics_jsonl(path: &Path) -> std::io::Result<Vec<StepLine>> {
    let text = std::fs::read_to_string(path)?;
    let mut lines = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let Ok(Value::Object(map)) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let step = map
            .get("step")
            .and_then(Value::as_f64)
            .unwrap_or(index as f64);
        let values = map
            .iter()
            .filter(|(key, _)| key.as_str() != "step")
            .filter_map(|(key, value)| value.as_f64().map(|v| (key.clone(), v)))
            .collect();
        lines.push(StepLine { step, values });
    }
    Ok(lines)
}

/// Each logged key's points (step, value), keys sorted.
pub fn curves(steps: &[StepLine]) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut curves: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for line in steps {
        for (key, value) in &line.values {
            curves
                .entry(key.clone())
                .or_default()
                .push((line.step, *value));
        }
    }
    curves
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.muted{color:#777;font-size:13px}.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{background:#fff;border:1px solid #eee}.chart .title{font-size:13px;font-weight:600}
.chart .tick{font-size:10px;fill:#555}.chart .axis{font-size:11px;fill:#555}.chart .legend{font-size:10px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ddd;padding:4px 10px;text-align:left}td.num{text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}.best{font-weight:700;background:#eef7ee}";

/// The whole page.
pub fn render(pipeline: &str, file: &str, stages: &[StageSection]) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t} — rlhf report</title><style>{STYLE}</style></head><body>\n<h1>{t}</h1><p class=\"muted\">{f}</p>\n",
        t = escape(pipeline),
        f = escape(file)
    );
    html.push_str(&overview_table(stages));
    for section in stages.iter().filter(|s| s.kind == "evaluate") {
        if let Some(Value::Object(models)) = &section.summary {
            let _ = write!(html, "<h2>Evaluation: {}</h2>", escape(&section.name));
            html.push_str(&evaluation_table(models));
        }
    }
    // An evaluate stage's metrics are the table above; it gets a section only for curves.
    let has_section =
        |s: &&StageSection| s.status == "cached" && (s.kind != "evaluate" || !s.steps.is_empty());
    for section in stages.iter().filter(has_section) {
        html.push_str(&stage_html(section));
    }
    html.push_str("</body></html>\n");
    html
}

fn overview_table(stages: &[StageSection]) -> String {
    let mut html = String::from(
        "<table><tr><th>stage</th><th>kind</th><th>status</th><th>steps logged</th></tr>",
    );
    for s in stages {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
            escape(&s.name),
            escape(&s.kind),
            escape(&s.status),
            s.steps.len()
        );
    }
    html.push_str("</table>\n");
    html
}

/// Models as rows, metrics as columns; the best value of each column in bold (lowest
/// perplexity and kl, highest otherwise; `n` is not ranked).
pub fn evaluation_table(models: &serde_json::Map<String, Value>) -> String {
    let mut columns: Vec<String> = EVALUATION_COLUMNS
        .iter()
        .filter(|c| models.values().any(|m| m.get(**c).is_some()))
        .map(|c| c.to_string())
        .collect();
    let mut others: Vec<String> = models
        .values()
        .filter_map(Value::as_object)
        .flat_map(|m| m.keys().cloned())
        .filter(|k| !EVALUATION_COLUMNS.contains(&k.as_str()))
        .collect();
    others.sort();
    others.dedup();
    columns.extend(others);
    // The best value of a column, when the models differ on it (a tie marks nothing).
    let best = |column: &str| -> Option<f64> {
        let values: Vec<f64> = models
            .values()
            .filter_map(|m| m.get(column).and_then(Value::as_f64))
            .collect();
        let low = values.iter().copied().reduce(f64::min)?;
        let high = values.iter().copied().reduce(f64::max)?;
        match column {
            _ if low == high || column == "n" => None,
            "perplexity" | "kl" => Some(low),
            _ => Some(high),
        }
    };
    let mut html = String::from("<table class=\"evaluation\"><tr><th>model</th>");
    for column in &columns {
        let _ = write!(html, "<th>{}</th>", escape(column));
    }
    html.push_str("</tr>");
    for (model, metrics) in models {
        let _ = write!(html, "<tr><td>{}</td>", escape(model));
        for column in &columns {
            let value = metrics.get(column);
            let number = value.and_then(Value::as_f64);
            let class = if number.is_some() && number == best(column) {
                " best"
            } else {
                ""
            };
            let text = match (number, value) {
                (Some(n), _) => format_number(n),
                (None, Some(v)) => value_text(v),
                (None, None) => "—".into(),
            };
            let _ = write!(html, "<td class=\"num{class}\">{text}</td>");
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>\n");
    html
}

fn stage_html(section: &StageSection) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<h2>{} <span class=\"muted\">({})</span></h2>",
        escape(&section.name),
        escape(&section.kind)
    );
    let curves = curves(&section.steps);
    if !curves.is_empty() {
        html.push_str("<div class=\"charts\">");
        for (key, points) in &curves {
            let series = Series {
                label: key.clone(),
                points: points.clone(),
            };
            html.push_str(&line_chart(key, "step", &[series]));
        }
        html.push_str("</div>\n");
    }
    if let Some(Value::Object(summary)) = &section.summary {
        let scalars: Vec<(&String, &Value)> = summary
            .iter()
            .filter(|(_, v)| !v.is_object() && !v.is_array())
            .collect();
        if !scalars.is_empty() && section.kind != "evaluate" {
            html.push_str("<table><tr><th>final metric</th><th>value</th></tr>");
            for (key, value) in scalars {
                let text = value_text(value);
                let _ = write!(
                    html,
                    "<tr><td>{}</td><td class=\"num\">{text}</td></tr>",
                    escape(key)
                );
            }
            html.push_str("</table>\n");
        }
    }
    if curves.is_empty() && section.summary.is_none() {
        html.push_str("<p class=\"muted\">no metrics logged</p>");
    }
    html
}

/// A metric value as table text: numbers compact, strings unquoted, the rest as JSON.
fn value_text(value: &Value) -> String {
    match value {
        Value::Number(n) => n.as_f64().map(format_number).unwrap_or_default(),
        Value::String(text) => escape(text),
        other => escape(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn models(value: Value) -> serde_json::Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn evaluation_table_marks_lowest_perplexity_and_highest_accuracy_but_no_ties() {
        let table = evaluation_table(&models(json!({
            "base": {"perplexity": 40.0, "accuracy": 0.1, "rouge1": 0.0, "n": 5},
            "sft": {"perplexity": 9.5, "accuracy": 0.6, "rouge1": 0.0, "n": 5},
        })));
        assert!(
            table.contains(r#"<td class="num best">9.5</td>"#),
            "{table}"
        );
        assert!(table.contains(r#"<td class="num best">0.6</td>"#));
        assert_eq!(
            table.matches("best").count(),
            2,
            "tied rouge1 and n are not marked: {table}"
        );
        let header = table.split("</tr>").next().unwrap();
        assert!(
            header.find("rouge1").unwrap() < header.find("perplexity").unwrap(),
            "fixed column order"
        );
    }

    #[test]
    fn curves_group_points_by_key_and_skip_missing_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1,\"loss\":2.0,\"lr\":0.1}\n{\"step\":2,\"loss\":null}\n{\"step\":3,\"loss\":1.0,\"eval_accuracy\":0.5}\n").unwrap();
        let curves = curves(&read_metrics_jsonl(&path).unwrap());
        assert_eq!(curves["loss"], vec![(1.0, 2.0), (3.0, 1.0)]);
        assert_eq!(curves["lr"], vec![(1.0, 0.1)]);
        assert_eq!(curves["eval_accuracy"], vec![(3.0, 0.5)]);
    }
}
