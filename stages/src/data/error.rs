//! Errors of the data module. Row-level problems carry the file and the line (or row
//! index) so a user can open the file at the right place; `on_error: skip` turns exactly
//! those into a counted skip ([`DataError::is_row_error`]).

use std::fmt;
use std::path::PathBuf;

/// Where one record sits in its source file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowLocation {
    pub file: PathBuf,
    pub position: Position,
}

/// A 1-based line (jsonl, csv) or a 0-based record index (json arrays, parquet rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    Line(usize),
    Index(usize),
    /// A row produced by a built-in generator (no file).
    Generated(usize),
}

impl fmt::Display for RowLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Position::Line(line) => write!(f, "{}:{line}", self.file.display()),
            Position::Index(index) => write!(f, "{} (row index {index})", self.file.display()),
            Position::Generated(index) => write!(f, "synthetic row {index}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The record could not be parsed at all (bad JSON, wrong CSV field count).
    #[error("{location}: malformed record: {message}")]
    MalformedRecord {
        location: RowLocation,
        message: String,
    },
    /// The record parsed but does not fit the format (a missing or mistyped field).
    #[error("{location}: {message}")]
    BadRow {
        location: RowLocation,
        message: String,
    },
    /// A whole file is unreadable in the declared way (invalid JSON document, bad parquet).
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("{path}: no data files found (looked for .jsonl, .json, .csv, .parquet, optionally .gz){filter}")]
    NoFiles { path: PathBuf, filter: String },
    #[error("{param}: {message}")]
    Param { param: String, message: String },
    #[error("template: {message}")]
    Template { message: String },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
}

impl DataError {
    /// Problems confined to one record; `on_error: skip` skips and counts these.
    pub fn is_row_error(&self) -> bool {
        matches!(
            self,
            DataError::MalformedRecord { .. } | DataError::BadRow { .. }
        )
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn param(param: &str, message: impl Into<String>) -> Self {
        DataError::Param {
            param: param.to_string(),
            message: message.into(),
        }
    }

    pub fn template(message: impl Into<String>) -> Self {
        DataError::Template {
            message: message.into(),
        }
    }

    pub fn tokenizer(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DataError::Tokenizer {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl From<DataError> for rlhf_engine::StageError {
    fn from(error: DataError) -> Self {
        let hint = match &error {
            DataError::MalformedRecord { .. } | DataError::BadRow { .. } => {
                Some("fix the record, remap field names with `fields:`, or set `on_error: skip`")
            }
            DataError::NoFiles { .. } => {
                Some("point `source` at a data file or a folder holding some")
            }
            _ => None,
        };
        match error {
            DataError::Io { path, source } => rlhf_engine::StageError::io(path, source),
            other => match hint {
                Some(hint) => rlhf_engine::StageError::failed_with_hint(other.to_string(), hint),
                None => rlhf_engine::StageError::failed(other.to_string()),
            },
        }
    }
}
