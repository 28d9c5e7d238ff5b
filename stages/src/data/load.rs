//! From a source path to rows: read every record, map it through the format, and
//! either stop at the first malformed one (naming file and line) or skip and count it.

use super::error::DataError;
use super::format::{check_field_map, record_to_row, FieldMap, Format};
use super::read::{read_records, RawRecord};
use super::row::Row;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::ops::ControlFlow;
use std::path::Path;

/// What to do with a record that is malformed or does not fit the format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop with an error naming the file and line.
    #[default]
    Fail,
    /// Skip the record and count it (`rows_skipped`).
    Skip,
}

/// How to read a source.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub format: Format,
    pub fields: FieldMap,
    pub on_error: OnError,
    /// Glob on file paths inside a folder source (`data/train-*`).
    pub files: Option<String>,
    /// Stop after this many rows (in file order).
    pub limit: Option<usize>,
}

/// Rows read from a source, with the format actually used and what was skipped.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub rows: Vec<Row>,
    pub format: Format,
    pub skipped: usize,
    /// The first few skip reasons, for the log.
    pub skip_examples: Vec<String>,
}

const SKIP_EXAMPLES: usize = 5;

/// Reads `path` (a file or a folder of files) into rows.
pub fn load_rows(path: &Path, options: &LoadOptions) -> Result<Loaded, DataError> {
    check_field_map(options.format, &options.fields)?;
    let mut loaded = Loaded {
        rows: Vec::new(),
        format: options.format,
        skipped: 0,
        skip_examples: Vec::new(),
    };
    if options.limit == Some(0) {
        return Ok(loaded);
    }
    let mut visit = |record: Result<RawRecord, DataError>| -> Result<ControlFlow<()>, DataError> {
        let row = record.and_then(|record| {
            if loaded.format == Format::Auto {
                loaded.format = detect_format(&record)?;
            }
            record_to_row(loaded.format, &options.fields, record)
        });
        match row {
            Ok(row) => loaded.rows.push(row),
            Err(error) if error.is_row_error() && options.on_error == OnError::Skip => {
                loaded.skipped += 1;
                if loaded.skip_examples.len() < SKIP_EXAMPLES {
                    loaded.skip_examples.push(error.to_string());
                }
            }
            Err(error) => return Err(error),
        }
        let full = options
            .limit
            .is_some_and(|limit| loaded.rows.len() >= limit);
        Ok(if full {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    };
    read_records(path, options.files.as_deref(), &mut visit)?;
    Ok(loaded)
}

fn detect_format(record: &RawRecord) -> Result<Format, DataError> {
    Format::detect(&record.fields).ok_or_else(|| DataError::Param {
        param: "format".to_string(),
        message: format!(
            "cannot tell the format of {} from its keys ({}); set `format:` (dolly, prompt_completion, prompt, chat, preference, text, rows) and `fields:`",
            record.location,
            record.fields.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    })
}
