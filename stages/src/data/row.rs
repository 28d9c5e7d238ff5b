//! The one internal row model every dataset is mapped into, and its on-disk form: a
//! Dataset artifact is a folder holding `data.jsonl`, one [`Row`] per line.
//!
//! # Schema of `data.jsonl`
//!
//! Every line is a JSON object with these optional keys (absent keys are left out, never
//! `null`; keys are written in this order, so equal rows give equal bytes):
//!
//! | key | type | meaning |
//! | --- | --- | --- |
//! | `prompt` | string | the raw prompt text, before any template |
//! | `completion` | string | the reference completion (SFT target) |
//! | `messages` | `[{"role", "content"}]` | a chat; rendered with a chat template |
//! | `chosen`, `rejected` | string | a preference pair's two completions of `prompt` (or of the chat `messages`) |
//! | `margin` | number | how strongly `chosen` is preferred (optional) |
//! | `text` | string | plain LM text (pretraining) |
//! | `answer` | string | a gold answer for rule-based judging (exact match) |
//! | `category` | string | a label kept from the source (e.g. Dolly's category) |
//!
//! A row may carry several shapes at once: the built-in arithmetic generator writes
//! `prompt`, `completion`, `chosen`, `rejected`, `text` and `answer` on every row, so one
//! dataset feeds pretraining, SFT, DPO and GRPO alike. Each consumer asks for the shape
//! it needs ([`Row::prompt_completion`], [`Row::preference`], …) and gets a clear
//! error naming the row when it is missing. The layout equals the TRL reference files
//! (`{"prompt", "completion"}`, `{"prompt", "chosen", "rejected"}`, …).

use super::error::DataError;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

/// The file inside a Dataset artifact that holds its rows.
pub const DATA_FILE: &str = "data.jsonl";

/// The fields [`Row::text_field`] knows, in schema order.
pub const TEXT_FIELDS: [&str; 6] = [
    "prompt",
    "completion",
    "messages",
    "chosen",
    "rejected",
    "text",
];

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// One example. See the module docs for the meaning of each field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
}

/// A prompt and its reference completion, borrowed from a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptCompletion<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
}

/// A preference pair, borrowed from a row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PreferencePair<'a> {
    pub prompt: &'a str,
    pub chosen: &'a str,
    pub rejected: &'a str,
    pub margin: Option<f64>,
}

/// Which shape a consumer needs; used in "row N has no …" errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowShape {
    PromptCompletion,
    Preference,
    Prompt,
    Text,
}

impl RowShape {
    fn needs(self) -> &'static str {
        match self {
            RowShape::PromptCompletion => {
                "`prompt` and `completion` (or `messages` ending with an assistant turn)"
            }
            RowShape::Preference => "`prompt` (or `messages`), `chosen` and `rejected`",
            RowShape::Prompt => "`prompt` (or `messages`)",
            RowShape::Text => "`text` (or `prompt` and `completion`)",
        }
    }
}

impl Row {
    /// The raw prompt/completion pair. Chat rows have none: a template renders them
    /// (see [`Row::split_last_assistant`] and `template::PromptTemplate::render_row`).
    pub fn prompt_completion(&self) -> Option<PromptCompletion<'_>> {
        match (&self.prompt, &self.completion) {
            (Some(prompt), Some(completion)) => Some(PromptCompletion { prompt, completion }),
            _ => None,
        }
    }

    /// The pair with a plain-text prompt; `None` for rows whose prompt is a multi-turn
    /// chat (`messages`): encode those with `batch::Encoder::encode_pair`.
    pub fn preference(&self) -> Option<PreferencePair<'_>> {
        match (&self.prompt, &self.chosen, &self.rejected) {
            (Some(prompt), Some(chosen), Some(rejected)) => Some(PreferencePair {
                prompt,
                chosen,
                rejected,
                margin: self.margin,
            }),
            _ => None,
        }
    }

    /// The text a language model is pretrained on: `text`, else prompt + completion.
    pub fn lm_text(&self) -> Option<String> {
        if let Some(text) = &self.text {
            return Some(text.clone());
        }
        self.prompt_completion()
            .map(|pc| format!("{}{}", pc.prompt, pc.completion))
    }

    /// Messages of a chat row up to (not including) its last assistant turn, and that
    /// turn's content: how a chat row becomes a prompt and a completion.
    pub fn split_last_assistant(&self) -> Option<(&[Message], &str)> {
        let messages = self.messages.as_deref()?;
        let last = messages.len().checked_sub(1)?;
        let message = &messages[last];
        (message.role == "assistant").then(|| (&messages[..last], message.content.as_str()))
    }

    /// Whether the row has what `shape` needs.
    pub fn has_shape(&self, shape: RowShape) -> bool {
        match shape {
            RowShape::PromptCompletion => {
                self.prompt_completion().is_some() || self.split_last_assistant().is_some()
            }
            RowShape::Preference => {
                self.chosen.is_some()
                    && self.rejected.is_some()
                    && (self.prompt.is_some() || self.messages.is_some())
            }
            RowShape::Prompt => self.prompt.is_some() || self.messages.is_some(),
            RowShape::Text => self.lm_text().is_some(),
        }
    }

    /// All text a tokenizer should learn from: every text-bearing field, in schema order.
    pub fn texts(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for text in [
            &self.prompt,
            &self.completion,
            &self.chosen,
            &self.rejected,
            &self.text,
        ]
        .into_iter()
        .flatten()
        {
            out.push(text);
        }
        for message in self.messages.iter().flatten() {
            out.push(&message.content);
        }
        out
    }

    /// The text of one field by its schema name (`messages` joins the contents with
    /// newlines); `None` when the row lacks it or the name is not a text field.
    pub fn text_field(&self, name: &str) -> Option<String> {
        match name {
            "prompt" => self.prompt.clone(),
            "completion" => self.completion.clone(),
            "chosen" => self.chosen.clone(),
            "rejected" => self.rejected.clone(),
            "text" => self.text.clone(),
            "messages" => {
                let contents: Option<Vec<&str>> = self
                    .messages
                    .as_ref()
                    .map(|m| m.iter().map(|m| m.content.as_str()).collect());
                contents.map(|c| c.join("\n"))
            }
            _ => None,
        }
    }

    /// The row as one line of `data.jsonl` (no newline).
    pub fn to_json_line(&self) -> String {
        // Serialising a struct of strings, numbers and vectors cannot fail; a NaN margin
        // is the one value JSON lacks, and serde_json writes it as null.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Checks that every row has `shape`; the error names the dataset and the first bad row.
pub fn require_shape(rows: &[Row], shape: RowShape, dataset: &Path) -> Result<(), DataError> {
    match rows.iter().position(|row| !row.has_shape(shape)) {
        None => Ok(()),
        Some(index) => Err(DataError::BadRow {
            location: super::error::RowLocation {
                file: dataset.join(DATA_FILE),
                position: super::error::Position::Line(index + 1),
            },
            message: format!("this stage needs {} on every row", shape.needs()),
        }),
    }
}

/// Writes rows as `dir/data.jsonl`.
pub fn write_rows(dir: &Path, rows: &[Row]) -> Result<(), DataError> {
    let path = dir.join(DATA_FILE);
    let file = std::fs::File::create(&path).map_err(|e| DataError::io(&path, e))?;
    let mut out = BufWriter::new(file);
    for row in rows {
        writeln!(out, "{}", row.to_json_line()).map_err(|e| DataError::io(&path, e))?;
    }
    out.flush().map_err(|e| DataError::io(&path, e))
}

/// Reads the rows of a Dataset artifact (`dir/data.jsonl`, or `dir` itself when it is
/// the file). This is what training stages call on their dataset inputs.
pub fn read_rows(dir: &Path) -> Result<Vec<Row>, DataError> {
    let path = if dir.is_dir() {
        dir.join(DATA_FILE)
    } else {
        dir.to_path_buf()
    };
    let file = std::fs::File::open(&path).map_err(|e| DataError::io(&path, e))?;
    let mut rows = Vec::new();
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| DataError::io(&path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let row: Row = serde_json::from_str(&line).map_err(|e| DataError::MalformedRecord {
            location: super::error::RowLocation {
                file: path.clone(),
                position: super::error::Position::Line(index + 1),
            },
            message: e.to_string(),
        })?;
        rows.push(row);
    }
    Ok(rows)
}
