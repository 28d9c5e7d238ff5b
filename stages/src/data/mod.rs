//! Datasets: sources and formats, the row model, prompt/chat templates, tokenizers and
//! batching.
//!
//! - [`row`]: the one row model (`data.jsonl` inside Dataset artifacts).
//! - [`read`]: jsonl/json/csv/parquet readers; [`format`]: formats → rows;
//!   [`load`]: a source path → rows, with `on_error`.
//! - [`select`]: seeded, stable shuffles, splits, samples and length filters.
//! - [`synthetic`]: the built-in arithmetic generator for offline recipes and tests.
//! - [`template`]: prompt templates (plain or the tokenizer's Jinja chat template).
//! - [`tokenizer`]: special token ids, loading, and training byte-level BPE.
//! - [`batch`]: tokenising rows, padding, loss masks, length grouping, packing.

pub mod batch;
pub mod error;
pub mod format;
pub mod load;
pub mod read;
pub mod row;
pub mod select;
pub mod synthetic;
pub mod template;
pub mod tokenizer;

pub use batch::{Batch, EncodedExample, EncodedPair, Encoder};
pub use error::DataError;
pub use format::{FieldMap, Format};
pub use load::{load_rows, LoadOptions, Loaded, OnError};
pub use row::{read_rows, write_rows, Message, Row, RowShape};
pub use template::{PromptTemplate, Renderer};
pub use tokenizer::SpecialTokens;
