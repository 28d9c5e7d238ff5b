//! Prompt templates: how a row's raw prompt becomes the text a model sees. One template
//! serves SFT, generation and evaluation of a model, so it travels with the model or
//! tokenizer artifact as `template.json` ([`PromptTemplate::save`] / [`PromptTemplate::load`]).
//!
//! - `plain`: a string where `{prompt}` stands for the raw prompt. The default,
//!   "User: {prompt}\n\nAssistant: ", is the layout of the Dolly SFT recipe (seeds/002);
//!   `"{prompt}"` alone passes prompts through untouched (the arithmetic task).
//! - `chat`: the tokenizer's own Jinja chat template (`chat_template` in
//!   tokenizer_config.json), rendered with minijinja the way transformers renders it:
//!   `trim_blocks` and `lstrip_blocks` on, Python string/dict methods (pycompat),
//!   `raise_exception`, a `tojson` that writes what Python's `json.dumps` writes, and the
//!   special tokens (`bos_token`, `eos_token`) as variables.

use super::error::DataError;
use super::row::{Message, Row};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

/// The Dolly recipe's layout (seeds/002).
pub const DEFAULT_TEMPLATE: &str = "User: {prompt}\n\nAssistant: ";
/// The file a template is kept in inside a model or tokenizer artifact.
pub const TEMPLATE_FILE: &str = "template.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PromptTemplate {
    /// `{prompt}` is replaced by the raw prompt.
    Plain { template: String },
    /// A Jinja chat template and the special tokens it may refer to.
    Chat {
        chat_template: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bos_token: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        eos_token: Option<String>,
        /// A system message put before every prompt (none by default).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        system: Option<String>,
    },
}

impl Default for PromptTemplate {
    fn default() -> Self {
        PromptTemplate::Plain {
            template: DEFAULT_TEMPLATE.to_string(),
        }
    }
}

/// A row rendered for training: the prompt as the model sees it and, when the row has
/// one, the completion text that follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedExample {
    pub prompt: String,
    pub completion: Option<String>,
}

impl PromptTemplate {
    /// A plain template; it must contain `{prompt}` exactly once.
    pub fn plain(template: &str) -> Result<Self, DataError> {
        if template.matches("{prompt}").count() != 1 {
            return Err(DataError::template(format!(
                "a prompt template must contain `{{prompt}}` exactly once: {template:?}"
            )));
        }
        Ok(PromptTemplate::Plain {
            template: template.to_string(),
        })
    }

    /// The template a YAML `template:` value names: `default` (the Dolly layout), `chat`
    /// (the chat template in `model_dir/tokenizer_config.json`), or a custom string with
    /// `{prompt}`.
    pub fn from_spec(spec: &str, model_dir: &Path) -> Result<Self, DataError> {
        match spec {
            "default" => Ok(PromptTemplate::default()),
            "chat" => {
                PromptTemplate::from_tokenizer_config(&model_dir.join("tokenizer_config.json"))
            }
            custom => PromptTemplate::plain(custom),
        }
    }

    /// The chat template of a tokenizer_config.json (a string, or a list of named
    /// templates of which `default` is taken), with its bos/eos tokens.
    pub fn from_tokenizer_config(path: &Path) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| DataError::tokenizer(path, format!("invalid JSON: {e}")))?;
        let chat_template = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template").and_then(|s| s.as_str()))
                .map(str::to_string)
                .ok_or_else(|| DataError::tokenizer(path, "`chat_template` list has no `default` entry"))?,
            _ => {
                return Err(DataError::tokenizer(
                    path,
                    "no `chat_template`; use a plain template (`template: \"User: {prompt}\\n\\nAssistant: \"`)",
                ))
            }
        };
        Ok(PromptTemplate::Chat {
            chat_template,
            bos_token: special_token(&config, "bos_token"),
            eos_token: special_token(&config, "eos_token"),
            system: None,
        })
    }

    /// Writes `dir/template.json`.
    pub fn save(&self, dir: &Path) -> Result<(), DataError> {
        let path = dir.join(TEMPLATE_FILE);
        let text =
            serde_json::to_string_pretty(self).map_err(|e| DataError::template(e.to_string()))?;
        std::fs::write(&path, text + "\n").map_err(|e| DataError::io(&path, e))
    }

    /// Reads `dir/template.json` if the artifact has one.
    pub fn load(dir: &Path) -> Result<Option<Self>, DataError> {
        let path = dir.join(TEMPLATE_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
        let template = serde_json::from_str(&text)
            .map_err(|e| DataError::template(format!("{}: {e}", path.display())))?;
        Ok(Some(template))
    }

    /// Compiles the template once for many renders.
    pub fn renderer(&self) -> Result<Renderer, DataError> {
        let environment = match self {
            PromptTemplate::Plain { template } => {
                PromptTemplate::plain(template)?;
                None
            }
            PromptTemplate::Chat { chat_template, .. } => Some(chat_environment(chat_template)?),
        };
        Ok(Renderer {
            template: self.clone(),
            environment,
        })
    }

    /// Whether an eos token must follow a completion: plain templates yes; a chat
    /// template closes assistant turns itself.
    pub fn appends_eos(&self) -> bool {
        matches!(self, PromptTemplate::Plain { .. })
    }
}

fn special_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        // Older configs write {"content": "<s>", "__type": "AddedToken", ...}.
        other => other
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
    }
}

/// A compiled template.
pub struct Renderer {
    template: PromptTemplate,
    environment: Option<Environment<'static>>,
}

impl Renderer {
    pub fn template(&self) -> &PromptTemplate {
        &self.template
    }

    /// The text the model sees for a raw prompt (a single user turn for chat templates).
    pub fn render_prompt(&self, prompt: &str) -> Result<String, DataError> {
        match &self.template {
            PromptTemplate::Plain { template } => Ok(template.replacen("{prompt}", prompt, 1)),
            PromptTemplate::Chat { .. } => self.render_chat(&[Message::new("user", prompt)], true),
        }
    }

    /// A chat rendered by the chat template; a plain template accepts only a single user
    /// turn (plus an optional leading system message, which it drops).
    pub fn render_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, DataError> {
        let (
            Some(environment),
            PromptTemplate::Chat {
                bos_token,
                eos_token,
                system,
                ..
            },
        ) = (&self.environment, &self.template)
        else {
            return self.render_prompt(single_user_turn(messages)?);
        };
        let mut all: Vec<Message> = Vec::with_capacity(messages.len() + 1);
        if let Some(system) = system {
            if messages.first().is_none_or(|m| m.role != "system") {
                all.push(Message::new("system", system));
            }
        }
        all.extend_from_slice(messages);
        let messages: Vec<Value> = all
            .iter()
            // Key order as in Python dicts, so `messages | tojson` matches transformers.
            .map(|m| {
                Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())])
            })
            .collect();
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token.clone().unwrap_or_default(),
            eos_token => eos_token.clone().unwrap_or_default(),
        };
        let template = environment.get_template("chat").map_err(jinja_error)?;
        template.render(context).map_err(jinja_error)
    }

    /// A row as (prompt text, completion text). Chat templates render the prompt with a
    /// generation prompt and take the completion as what the full conversation adds
    /// after it, so prompt tokens are exactly what generation starts from.
    pub fn render_row(&self, row: &Row) -> Result<RenderedExample, DataError> {
        if let Some((before, reply)) = row.split_last_assistant() {
            return self.render_turns(before, Some(reply));
        }
        if let Some(messages) = &row.messages {
            return self.render_turns(messages, None);
        }
        let prompt = row.prompt.as_deref().ok_or_else(|| {
            DataError::template("the row has no `prompt` or `messages` to render")
        })?;
        match &self.template {
            PromptTemplate::Plain { .. } => Ok(RenderedExample {
                prompt: self.render_prompt(prompt)?,
                completion: row.completion.clone(),
            }),
            PromptTemplate::Chat { .. } => {
                self.render_turns(&[Message::new("user", prompt)], row.completion.as_deref())
            }
        }
    }

    /// Prompt turns and an optional assistant reply → prompt text and completion text.
    pub fn render_turns(
        &self,
        prompt: &[Message],
        reply: Option<&str>,
    ) -> Result<RenderedExample, DataError> {
        let prompt_text = self.render_chat(prompt, true)?;
        let Some(reply) = reply else {
            return Ok(RenderedExample {
                prompt: prompt_text,
                completion: None,
            });
        };
        if matches!(self.template, PromptTemplate::Plain { .. }) {
            return Ok(RenderedExample {
                prompt: prompt_text,
                completion: Some(reply.to_string()),
            });
        }
        let mut full = prompt.to_vec();
        full.push(Message::new("assistant", reply));
        let full_text = self.render_chat(&full, false)?;
        let completion = full_text.strip_prefix(prompt_text.as_str()).ok_or_else(|| {
            DataError::template(
                "the chat template renders the prompt differently once the reply is added, so the reply cannot be cut off cleanly",
            )
        })?;
        Ok(RenderedExample {
            prompt: prompt_text,
            completion: Some(completion.to_string()),
        })
    }
}

fn single_user_turn(messages: &[Message]) -> Result<&str, DataError> {
    let turns: Vec<&Message> = messages.iter().filter(|m| m.role != "system").collect();
    match turns.as_slice() {
        [only] if only.role == "user" => Ok(&only.content),
        _ => Err(DataError::template(
            "a plain template renders a single user turn; use `template: chat` for multi-turn conversations",
        )),
    }
}

fn jinja_error(error: JinjaError) -> DataError {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let _ = write!(message, ": {cause}");
        source = cause.source();
    }
    DataError::template(message)
}

fn chat_environment(source: &str) -> Result<Environment<'static>, DataError> {
    let mut environment = Environment::new();
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(jinja_error)?;
    environment.set_syntax(syntax);
    minijinja_contrib::add_to_environment(&mut environment);
    environment.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    environment.add_function("raise_exception", raise_exception);
    environment.add_filter("tojson", python_tojson);
    environment
        .add_template_owned("chat", source.to_string())
        .map_err(jinja_error)?;
    Ok(environment)
}

fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(
        ErrorKind::InvalidOperation,
        format!("the chat template raised: {message}"),
    ))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn python_tojson(value: &Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_python_json(&mut out, value, indent, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_python_json(
    out: &mut String,
    value: &Value,
    indent: Option<usize>,
    depth: usize,
) -> Result<(), JinjaError> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let separator = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => {
            let number = f64::try_from(value.clone()).unwrap_or(f64::NAN);
            out.push_str(&python_float(number));
        }
        ValueKind::String => write_python_string(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (index, item) in value.try_iter()?.enumerate() {
                out.push_str(if index == 0 { "" } else { separator });
                newline(out, depth + 1);
                write_python_json(out, &item, indent, depth + 1)?;
            }
            if value.len().unwrap_or(0) > 0 {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (index, key) in value.try_iter()?.enumerate() {
                out.push_str(if index == 0 { "" } else { separator });
                newline(out, depth + 1);
                write_python_string(out, &key.to_string());
                out.push_str(": ");
                write_python_json(out, &value.get_item(&key)?, indent, depth + 1)?;
            }
            if value.len().unwrap_or(0) > 0 {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                format!("tojson cannot write a value of kind {}", value.kind()),
            ))
        }
    }
    Ok(())
}

/// Python's `repr` of a float as json.dumps writes it (1.0, 0.5, 1e-05, NaN).
fn python_float(number: f64) -> String {
    if number.is_nan() {
        return "NaN".into();
    }
    if number.is_infinite() {
        return if number > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    // Rust writes 1e-5 where Python writes 1e-05 (the thresholds for switching to
    // exponents also differ slightly for very large or small values).
    let text = format!("{number:?}");
    match text.split_once('e') {
        Some((mantissa, exponent)) => {
            let value: i32 = exponent.parse().unwrap_or(0);
            let sign = if value < 0 { '-' } else { '+' };
            format!("{mantissa}e{sign}{:02}", value.abs())
        }
        None => text,
    }
}

/// A JSON string as `json.dumps(..., ensure_ascii=False)` writes it.
fn write_python_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
