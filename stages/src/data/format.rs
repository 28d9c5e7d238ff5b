//! Source formats and how each maps a record into a [`Row`].
//!
//! | format | source fields (default names) | row |
//! | --- | --- | --- |
//! | `dolly` | instruction, context, response, category | prompt = instruction, or instruction + "\n\n" + context when context is not blank; completion = response |
//! | `prompt_completion` | prompt, completion | prompt, completion |
//! | `prompt` | prompt | prompt only (prompts for generation, RL) |
//! | `chat` | messages: [{role, content}] | messages |
//! | `preference` | prompt, chosen, rejected, margin | prompt, chosen, rejected, margin; with no prompt field, chosen and rejected are Anthropic HH-RLHF dialogues (see [`split_hh_dialogues`]); chosen and rejected may also be whole conversations (message lists) sharing all but their last, assistant, turn |
//! | `text` | text | text |
//! | `rows` | the row schema itself (`row.rs`) | as is; unknown keys are errors |
//!
//! Every format except `rows` also keeps an optional gold `answer` (numbers are turned
//! into strings) and a `category`. `fields:` renames source columns:
//! `fields: {prompt: question, completion: answer}` reads the prompt from `question`.
//! `auto` picks the format from the first record's keys ([`Format::detect`]).

use super::error::{DataError, RowLocation};
use super::read::{kind_of, RawRecord, Record};
use super::row::{Message, Row};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Decide from the first record's keys.
    #[default]
    Auto,
    Rows,
    Dolly,
    PromptCompletion,
    Prompt,
    Chat,
    Preference,
    Text,
}

/// Source column names by canonical field name (`prompt` → `question`).
pub type FieldMap = BTreeMap<String, String>;

/// The marker that starts every assistant turn of an HH-RLHF dialogue.
pub const HH_ASSISTANT: &str = "\n\nAssistant:";

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Rows => "rows",
            Format::Dolly => "dolly",
            Format::PromptCompletion => "prompt_completion",
            Format::Prompt => "prompt",
            Format::Chat => "chat",
            Format::Preference => "preference",
            Format::Text => "text",
        }
    }

    /// The canonical field names `fields:` may rename for this format.
    pub fn field_names(self) -> &'static [&'static str] {
        match self {
            Format::Auto | Format::Rows => &[],
            Format::Dolly => &["instruction", "context", "response", "category", "answer"],
            Format::PromptCompletion => &["prompt", "completion", "category", "answer"],
            Format::Prompt => &["prompt", "category", "answer"],
            Format::Chat => &["messages", "role", "content", "category", "answer"],
            Format::Preference => &[
                "prompt", "chosen", "rejected", "margin", "role", "content", "category", "answer",
            ],
            Format::Text => &["text", "category"],
        }
    }

    /// The format a record looks like, from its keys; `None` when nothing fits.
    pub fn detect(record: &Record) -> Option<Format> {
        let has = |key: &str| record.contains_key(key);
        if has("messages") {
            Some(Format::Chat)
        } else if has("chosen") && has("rejected") {
            Some(Format::Preference)
        } else if has("instruction") && has("response") {
            Some(Format::Dolly)
        } else if has("prompt") && has("completion") {
            Some(Format::PromptCompletion)
        } else if has("prompt") {
            Some(Format::Prompt)
        } else if has("text") {
            Some(Format::Text)
        } else {
            None
        }
    }
}

/// Checks `fields:` against the format: every key must be a field it reads.
pub fn check_field_map(format: Format, fields: &FieldMap) -> Result<(), DataError> {
    let allowed = format.field_names();
    for key in fields.keys() {
        if !allowed.contains(&key.as_str()) {
            let expected = if allowed.is_empty() {
                format!("format `{}` takes no field renames", format.as_str())
            } else {
                format!("format `{}` reads {}", format.as_str(), allowed.join(", "))
            };
            return Err(DataError::param(
                &format!("fields.{key}"),
                format!("unknown field `{key}`: {expected}"),
            ));
        }
    }
    Ok(())
}

/// Maps one record into a row; `format` must not be `Auto` (resolve it first).
pub fn record_to_row(
    format: Format,
    fields: &FieldMap,
    record: RawRecord,
) -> Result<Row, DataError> {
    let reader = FieldReader {
        fields,
        record: &record.fields,
        location: &record.location,
    };
    let mut row = match format {
        Format::Auto => {
            return Err(
                reader.bad("the format is `auto` here; resolve it before mapping rows".into())
            )
        }
        Format::Rows => return rows_record(record),
        Format::Dolly => dolly(&reader)?,
        Format::PromptCompletion => Row {
            prompt: Some(reader.required("prompt")?),
            completion: Some(reader.required("completion")?),
            ..Row::default()
        },
        Format::Prompt => Row {
            prompt: Some(reader.required("prompt")?),
            ..Row::default()
        },
        Format::Chat => Row {
            messages: Some(chat_messages(&reader)?),
            ..Row::default()
        },
        Format::Preference => preference(&reader)?,
        Format::Text => Row {
            text: Some(reader.required("text")?),
            ..Row::default()
        },
    };
    row.answer = reader.answer()?;
    if row.category.is_none() {
        row.category = reader.optional("category")?;
    }
    Ok(row)
}

fn rows_record(record: RawRecord) -> Result<Row, DataError> {
    serde_json::from_value(Value::Object(record.fields)).map_err(|e| DataError::BadRow {
        location: record.location,
        message: format!("not a row of the `rows` schema: {e}"),
    })
}

fn dolly(reader: &FieldReader) -> Result<Row, DataError> {
    let instruction = reader.required("instruction")?;
    let context = reader.optional("context")?.unwrap_or_default();
    let prompt = if context.trim().is_empty() {
        instruction
    } else {
        format!("{instruction}\n\n{context}")
    };
    Ok(Row {
        prompt: Some(prompt),
        completion: Some(reader.required("response")?),
        category: reader.optional("category")?,
        ..Row::default()
    })
}

fn preference(reader: &FieldReader) -> Result<Row, DataError> {
    let chosen_column = reader.column("chosen");
    if let Some(Value::Array(_)) = reader.record.get(chosen_column) {
        return conversational_preference(reader);
    }
    let chosen = reader.required("chosen")?;
    let rejected = reader.required("rejected")?;
    let margin = reader.number("margin")?;
    let (prompt, chosen, rejected) = match reader.optional("prompt")? {
        Some(prompt) => (prompt, chosen, rejected),
        None => split_hh_dialogues(&chosen, &rejected).map_err(|message| reader.bad(message))?,
    };
    Ok(Row {
        prompt: Some(prompt),
        chosen: Some(chosen),
        rejected: Some(rejected),
        margin,
        ..Row::default()
    })
}

/// `chosen` and `rejected` as whole conversations (TRL's conversational preference
/// layout): they must share every turn but the last, which must be the assistant's.
/// A shared single user turn becomes `prompt`; longer shared turns stay `messages`.
fn conversational_preference(reader: &FieldReader) -> Result<Row, DataError> {
    let chosen = messages_at(reader, "chosen")?;
    let rejected = messages_at(reader, "rejected")?;
    let (Some((chosen_reply, chosen_turns)), Some((rejected_reply, rejected_turns))) =
        (chosen.split_last(), rejected.split_last())
    else {
        return Err(reader.bad("`chosen` and `rejected` conversations must not be empty".into()));
    };
    if chosen_reply.role != "assistant" || rejected_reply.role != "assistant" {
        return Err(reader.bad("`chosen` and `rejected` must end with an assistant turn".into()));
    }
    if chosen_turns != rejected_turns {
        return Err(reader.bad("`chosen` and `rejected` differ before their last turn".into()));
    }
    let mut row = Row {
        chosen: Some(chosen_reply.content.clone()),
        rejected: Some(rejected_reply.content.clone()),
        margin: reader.number("margin")?,
        ..Row::default()
    };
    match (reader.optional("prompt")?, chosen_turns) {
        (Some(prompt), []) => row.prompt = Some(prompt),
        (None, [only]) if only.role == "user" => row.prompt = Some(only.content.clone()),
        (None, []) => return Err(reader.missing("prompt")),
        (_, turns) => row.messages = Some(turns.to_vec()),
    }
    Ok(row)
}

/// Splits two Anthropic HH-RLHF dialogues ("\n\nHuman: … \n\nAssistant: …") that share
/// everything but the last assistant reply into (prompt, chosen, rejected).
///
/// The prompt is `chosen` up to and including its last "\n\nAssistant:"; `rejected` must
/// start with that same prompt; the two replies (what follows, leading space kept) must
/// be non-blank and different. On ../shared/data/hh-rlhf-harmless-base-test this rule
/// reproduces `pairs.jsonl` exactly (2,304 pairs; 8 of 2,312 records refused).
pub fn split_hh_dialogues(
    chosen: &str,
    rejected: &str,
) -> Result<(String, String, String), String> {
    let Some(at) = chosen.rfind(HH_ASSISTANT) else {
        return Err(format!(
            "no `prompt` field, and `chosen` is not an HH-RLHF dialogue (no {HH_ASSISTANT:?} in it)"
        ));
    };
    let prompt = &chosen[..at + HH_ASSISTANT.len()];
    let Some(rejected_reply) = rejected.strip_prefix(prompt) else {
        return Err(
            "HH-RLHF dialogues `chosen` and `rejected` differ before the last assistant turn"
                .into(),
        );
    };
    let chosen_reply = &chosen[prompt.len()..];
    if chosen_reply.trim().is_empty() || rejected_reply.trim().is_empty() {
        return Err("an HH-RLHF reply is empty".into());
    }
    if chosen_reply == rejected_reply {
        return Err("the HH-RLHF replies `chosen` and `rejected` are identical".into());
    }
    Ok((
        prompt.to_string(),
        chosen_reply.to_string(),
        rejected_reply.to_string(),
    ))
}

fn chat_messages(reader: &FieldReader) -> Result<Vec<Message>, DataError> {
    messages_at(reader, "messages")
}

/// A list of {role, content} objects under the canonical field `name`.
fn messages_at(reader: &FieldReader, name: &str) -> Result<Vec<Message>, DataError> {
    let column = reader.column(name);
    let Some(value) = reader.record.get(column) else {
        return Err(reader.missing(name));
    };
    let Value::Array(items) = value else {
        return Err(reader.bad(format!(
            "`{column}` must be a list of messages, found {}",
            kind_of(value)
        )));
    };
    let role_key = reader.column("role");
    let content_key = reader.column("content");
    let mut messages = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let text = |key: &str| match item.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(reader.bad(format!(
                "`{column}[{index}].{key}` must be a string, found {}",
                kind_of(other)
            ))),
            None => Err(reader.bad(format!("`{column}[{index}]` has no `{key}`"))),
        };
        messages.push(Message {
            role: text(role_key)?,
            content: text(content_key)?,
        });
    }
    if messages.is_empty() {
        return Err(reader.bad(format!("`{column}` is empty")));
    }
    Ok(messages)
}

/// Reads canonical fields of one record through the rename map.
struct FieldReader<'a> {
    fields: &'a FieldMap,
    record: &'a Record,
    location: &'a RowLocation,
}

impl FieldReader<'_> {
    fn column<'b>(&'b self, name: &'b str) -> &'b str {
        self.fields.get(name).map_or(name, String::as_str)
    }

    fn bad(&self, message: String) -> DataError {
        DataError::BadRow {
            location: self.location.clone(),
            message,
        }
    }

    fn missing(&self, name: &str) -> DataError {
        let column = self.column(name);
        let present: Vec<&str> = self.record.keys().map(String::as_str).collect();
        let renamed = if column == name {
            String::new()
        } else {
            format!(" (source column `{column}`)")
        };
        self.bad(format!(
            "missing field `{name}`{renamed}; the record has: {}",
            present.join(", ")
        ))
    }

    fn optional(&self, name: &str) -> Result<Option<String>, DataError> {
        match self.record.get(self.column(name)) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.bad(format!(
                "field `{}` must be a string, found {}",
                self.column(name),
                kind_of(other)
            ))),
        }
    }

    fn required(&self, name: &str) -> Result<String, DataError> {
        self.optional(name)?.ok_or_else(|| self.missing(name))
    }

    /// A gold answer: strings as they are, numbers and booleans as written. A column
    /// that `fields:` already maps to another field (`completion: answer`) is not also
    /// read as the gold answer unless `fields:` says so.
    fn answer(&self) -> Result<Option<String>, DataError> {
        let column = self.column("answer");
        let taken = self
            .fields
            .iter()
            .any(|(name, source)| name != "answer" && source == column);
        if taken && !self.fields.contains_key("answer") {
            return Ok(None);
        }
        match self.record.get(column) {
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(Value::Bool(b)) => Ok(Some(b.to_string())),
            _ => self.optional("answer"),
        }
    }

    /// A number, or a string holding one (CSV has only strings).
    fn number(&self, name: &str) -> Result<Option<f64>, DataError> {
        let column = self.column(name);
        match self.record.get(column) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => {
                s.trim().parse::<f64>().map(Some).map_err(|_| {
                    self.bad(format!("field `{column}` must be a number, found {s:?}"))
                })
            }
            Some(other) => Err(self.bad(format!(
                "field `{column}` must be a number, found {}",
                kind_of(other)
            ))),
        }
    }
}
