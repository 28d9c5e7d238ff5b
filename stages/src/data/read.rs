//! Readers: jsonl, json (an array, or `{"data": [...]}`), csv and parquet files, each
//! optionally gzip-compressed (`.jsonl.gz`, `.json.gz`, `.csv.gz`), and folders of such
//! files (read recursively in sorted path order, so the row order is stable).
//!
//! Every reader turns records into JSON objects ([`Record`]) tagged with their place in
//! the file; formats (see `format.rs`) map those objects into rows. Malformed records are
//! handed to the caller as [`DataError::MalformedRecord`] so `on_error: skip` can count
//! them and go on; a file that is unreadable as a whole stops the read.

use super::error::{DataError, Position, RowLocation};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

/// One record: a JSON object of column name → value.
pub type Record = Map<String, Value>;

/// Receives each record (or the reason it is malformed); `Break` stops the read early
/// (e.g. once `limit` rows are in), an error stops it and is returned.
pub type Visitor<'a> =
    dyn FnMut(Result<RawRecord, DataError>) -> Result<ControlFlow<()>, DataError> + 'a;

/// A record and where it came from.
#[derive(Clone, Debug)]
pub struct RawRecord {
    pub location: RowLocation,
    pub fields: Record,
}

/// The file types a reader exists for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    JsonLines,
    Json,
    Csv,
    Parquet,
}

/// The type of `path` from its extension, and whether it is gzip-compressed.
pub fn file_type(path: &Path) -> Option<(FileType, bool)> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    let (stem, gzip) = match name.strip_suffix(".gz") {
        Some(stem) => (stem.to_string(), true),
        None => (name, false),
    };
    let extension = Path::new(&stem).extension()?.to_str()?.to_string();
    let file_type = match extension.as_str() {
        "jsonl" | "ndjson" => FileType::JsonLines,
        "json" => FileType::Json,
        "csv" => FileType::Csv,
        "parquet" if !gzip => FileType::Parquet,
        _ => return None,
    };
    Some((file_type, gzip))
}

/// The data files under `path` (itself when it is a file), sorted by path. `pattern`,
/// a glob where `*` matches any run of characters, keeps only files whose path relative
/// to `path` matches (e.g. `data/train-*`).
pub fn data_files(path: &Path, pattern: Option<&str>) -> Result<Vec<PathBuf>, DataError> {
    if path.is_file() {
        return match file_type(path) {
            Some(_) => Ok(vec![path.to_path_buf()]),
            None => Err(DataError::BadFile {
                path: path.to_path_buf(),
                message:
                    "unknown file type; expected .jsonl, .json, .csv or .parquet (optionally .gz)"
                        .to_string(),
            }),
        };
    }
    let mut files = Vec::new();
    collect_files(path, path, pattern, &mut files)?;
    files.sort();
    if files.is_empty() {
        let filter = pattern
            .map(|p| format!(" matching `{p}`"))
            .unwrap_or_default();
        return Err(DataError::NoFiles {
            path: path.to_path_buf(),
            filter,
        });
    }
    Ok(files)
}

fn collect_files(
    root: &Path,
    dir: &Path,
    pattern: Option<&str>,
    out: &mut Vec<PathBuf>,
) -> Result<(), DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect_files(root, &path, pattern, out)?;
        } else if file_type(&path).is_some() {
            let relative = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            if pattern.is_none_or(|p| glob_match(p, &relative)) {
                out.push(path);
            }
        }
    }
    Ok(())
}

/// `*` matches any run of characters (slashes included); everything else literally.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Calls `visit` with every record of every data file under `path`, in order. A
/// `visit` error stops the read and is returned.
pub fn read_records(
    path: &Path,
    pattern: Option<&str>,
    visit: &mut Visitor<'_>,
) -> Result<(), DataError> {
    for file in data_files(path, pattern)? {
        if read_file(&file, visit)?.is_break() {
            break;
        }
    }
    Ok(())
}

/// Calls `visit` with every record of one file; says whether `visit` stopped the read.
pub fn read_file(path: &Path, visit: &mut Visitor<'_>) -> Result<ControlFlow<()>, DataError> {
    let Some((file_type, gzip)) = file_type(path) else {
        return Err(DataError::BadFile {
            path: path.to_path_buf(),
            message: "unknown file type".to_string(),
        });
    };
    if file_type == FileType::Parquet {
        return read_parquet(path, visit);
    }
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let reader = BufReader::with_capacity(1 << 16, reader);
    match file_type {
        FileType::JsonLines => read_json_lines(path, reader, visit),
        FileType::Json => read_json_document(path, reader, visit),
        FileType::Csv => read_csv(path, reader, visit),
        FileType::Parquet => Ok(ControlFlow::Continue(())),
    }
}

fn location(path: &Path, position: Position) -> RowLocation {
    RowLocation {
        file: path.to_path_buf(),
        position,
    }
}

fn malformed(path: &Path, position: Position, message: impl Into<String>) -> DataError {
    DataError::MalformedRecord {
        location: location(path, position),
        message: message.into(),
    }
}

fn read_json_lines(
    path: &Path,
    reader: impl BufRead,
    visit: &mut Visitor<'_>,
) -> Result<ControlFlow<()>, DataError> {
    for (index, line) in reader.lines().enumerate() {
        let position = Position::Line(index + 1);
        let line = match line {
            Ok(line) => line,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                if visit(Err(malformed(path, position, "not valid UTF-8")))?.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
                continue;
            }
            Err(e) => return Err(DataError::io(path, e)),
        };
        let text = line.trim_start_matches('\u{feff}').trim();
        if text.is_empty() {
            continue;
        }
        let record = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(fields)) => Ok(RawRecord {
                location: location(path, position),
                fields,
            }),
            Ok(other) => Err(malformed(
                path,
                position,
                format!("expected a JSON object, found {}", kind_of(&other)),
            )),
            Err(e) => Err(malformed(path, position, format!("invalid JSON: {e}"))),
        };
        if visit(record)?.is_break() {
            return Ok(ControlFlow::Break(()));
        }
    }
    Ok(ControlFlow::Continue(()))
}

fn read_json_document(
    path: &Path,
    reader: impl Read,
    visit: &mut Visitor<'_>,
) -> Result<ControlFlow<()>, DataError> {
    let document: Value = serde_json::from_reader(reader).map_err(|e| DataError::BadFile {
        path: path.to_path_buf(),
        message: format!("invalid JSON: {e}"),
    })?;
    let items = match document {
        Value::Array(items) => items,
        Value::Object(mut object) => match object.remove("data") {
            Some(Value::Array(items)) => items,
            _ => {
                return Err(DataError::BadFile {
                    path: path.to_path_buf(),
                    message: "expected a JSON array of records, or an object with a `data` array"
                        .to_string(),
                })
            }
        },
        other => {
            return Err(DataError::BadFile {
                path: path.to_path_buf(),
                message: format!(
                    "expected a JSON array of records, found {}",
                    kind_of(&other)
                ),
            })
        }
    };
    for (index, item) in items.into_iter().enumerate() {
        let position = Position::Index(index);
        let record = match item {
            Value::Object(fields) => Ok(RawRecord {
                location: location(path, position),
                fields,
            }),
            other => Err(malformed(
                path,
                position,
                format!("expected a JSON object, found {}", kind_of(&other)),
            )),
        };
        if visit(record)?.is_break() {
            return Ok(ControlFlow::Break(()));
        }
    }
    Ok(ControlFlow::Continue(()))
}

fn read_csv(
    path: &Path,
    reader: impl Read,
    visit: &mut Visitor<'_>,
) -> Result<ControlFlow<()>, DataError> {
    let mut csv_reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(reader);
    let headers = csv_reader
        .headers()
        .map_err(|e| DataError::BadFile {
            path: path.to_path_buf(),
            message: format!("unreadable CSV header: {e}"),
        })?
        .clone();
    for result in csv_reader.records() {
        let record = match result {
            Ok(record) => {
                let line = record.position().map_or(0, |p| p.line() as usize);
                let fields = headers
                    .iter()
                    .zip(record.iter())
                    .map(|(name, value)| (name.to_string(), Value::String(value.to_string())))
                    .collect();
                Ok(RawRecord {
                    location: location(path, Position::Line(line)),
                    fields,
                })
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line() as usize);
                if let csv::ErrorKind::Io(io) = e.kind() {
                    return Err(DataError::io(
                        path,
                        std::io::Error::new(io.kind(), io.to_string()),
                    ));
                }
                Err(malformed(path, Position::Line(line), csv_message(&e)))
            }
        };
        if visit(record)?.is_break() {
            return Ok(ControlFlow::Break(()));
        }
    }
    Ok(ControlFlow::Continue(()))
}

fn csv_message(error: &csv::Error) -> String {
    match error.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => {
            format!("expected {expected_len} fields (as in the header), found {len}")
        }
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_string(),
        _ => error.to_string(),
    }
}

fn read_parquet(path: &Path, visit: &mut Visitor<'_>) -> Result<ControlFlow<()>, DataError> {
    let bad = |e: parquet::errors::ParquetError| DataError::BadFile {
        path: path.to_path_buf(),
        message: format!("unreadable parquet: {e}"),
    };
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    for (index, row) in reader.get_row_iter(None).map_err(bad)?.enumerate() {
        let record = match row {
            Ok(row) => {
                let fields = row
                    .get_column_iter()
                    .map(|(name, field)| (name.clone(), field_to_json(field)))
                    .collect();
                Ok(RawRecord {
                    location: location(path, Position::Index(index)),
                    fields,
                })
            }
            Err(e) => Err(malformed(path, Position::Index(index), e.to_string())),
        };
        if visit(record)?.is_break() {
            return Ok(ControlFlow::Break(()));
        }
    }
    Ok(ControlFlow::Continue(()))
}

/// A parquet value as JSON: strings, numbers, lists and groups map one to one; bytes
/// become a lossy UTF-8 string; dates and times their integer encodings.
fn field_to_json(field: &Field) -> Value {
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(v) => Value::from(*v),
        Field::Short(v) => Value::from(*v),
        Field::Int(v) | Field::Date(v) | Field::TimeMillis(v) => Value::from(*v),
        Field::Long(v)
        | Field::TimeMicros(v)
        | Field::TimestampMillis(v)
        | Field::TimestampMicros(v) => Value::from(*v),
        Field::UByte(v) => Value::from(*v),
        Field::UShort(v) => Value::from(*v),
        Field::UInt(v) => Value::from(*v),
        Field::ULong(v) => Value::from(*v),
        Field::Float16(v) => Value::from(f64::from(f32::from(*v))),
        Field::Float(v) => Value::from(f64::from(*v)),
        Field::Double(v) => Value::from(*v),
        Field::Decimal(d) => Value::String(format!("{d:?}")),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(bytes) => Value::String(String::from_utf8_lossy(bytes.data()).into_owned()),
        Field::Group(row) => Value::Object(
            row.get_column_iter()
                .map(|(name, field)| (name.clone(), field_to_json(field)))
                .collect(),
        ),
        Field::ListInternal(list) => {
            Value::Array(list.elements().iter().map(field_to_json).collect())
        }
        Field::MapInternal(map) => Value::Array(
            map.entries()
                .iter()
                .map(|(key, value)| Value::Array(vec![field_to_json(key), field_to_json(value)]))
                .collect(),
        ),
    }
}

/// "a string", "an array", … for error messages.
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
