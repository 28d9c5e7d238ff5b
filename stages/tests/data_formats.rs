//! Readers and formats: each format on a committed sample (fixtures/data), malformed
//! rows named by file and line (or row index) or skipped and counted, and the real
//! shared datasets (self-instruct in Dolly's schema, Anthropic HH-RLHF harmless-base).

use rlhf_stages::data::format::{split_hh_dialogues, Format};
use rlhf_stages::data::load::{load_rows, LoadOptions, OnError};
use rlhf_stages::data::row::{Message, Row};
use rlhf_stages::testing::shared_path;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name)
}

fn options(format: Format) -> LoadOptions {
    LoadOptions {
        format,
        ..LoadOptions::default()
    }
}

fn skipping(format: Format) -> LoadOptions {
    LoadOptions {
        format,
        on_error: OnError::Skip,
        ..LoadOptions::default()
    }
}

#[test]
fn dolly_folds_non_blank_context_into_the_prompt_after_a_blank_line() {
    let loaded = load_rows(&fixture("dolly.jsonl"), &options(Format::Dolly)).unwrap();
    let rows = loaded.rows;
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows[0].prompt.as_deref(),
        Some("Name three primary colours.")
    );
    assert_eq!(rows[0].completion.as_deref(), Some("Red, yellow and blue."));
    assert_eq!(rows[0].category.as_deref(), Some("open_qa"));
    assert_eq!(
        rows[1].prompt.as_deref(),
        Some("Summarise the passage in one sentence.\n\nThe Rhine flows from the Swiss Alps to the North Sea.\nIt passes through six countries.")
    );
    // Whitespace-only context is no context.
    assert_eq!(rows[2].prompt.as_deref(), Some("Is a tomato a fruit?"));
}

#[test]
fn malformed_dolly_row_is_an_error_naming_file_and_line() {
    let error = load_rows(&fixture("dolly_malformed.jsonl"), &options(Format::Dolly)).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("dolly_malformed.jsonl:2"), "{message}");
    assert!(message.contains("invalid JSON"), "{message}");
}

#[test]
fn on_error_skip_skips_and_counts_every_kind_of_bad_row() {
    let loaded = load_rows(&fixture("dolly_malformed.jsonl"), &skipping(Format::Dolly)).unwrap();
    // Line 2 broken JSON, 3 missing `response`, 6 not an object, 7 a numeric response;
    // line 4 is blank and not a record at all.
    assert_eq!(loaded.skipped, 4);
    let prompts: Vec<_> = loaded
        .rows
        .iter()
        .map(|r| r.prompt.clone().unwrap())
        .collect();
    assert_eq!(prompts, ["Say hi.", "Count to two."]);
    let reasons = loaded.skip_examples.join("\n");
    for expected in [
        ":2: malformed record",
        ":3: missing field `response`",
        ":6: malformed record",
        ":7: field `response` must be a string",
    ] {
        assert!(reasons.contains(expected), "{expected} not in\n{reasons}");
    }
}

#[test]
fn csv_reads_quoted_fields_and_keeps_answers() {
    let rows = load_rows(
        &fixture("prompt_completion.csv"),
        &options(Format::PromptCompletion),
    )
    .unwrap()
    .rows;
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].prompt.as_deref(), Some("Q: 1+2=\nA:"));
    assert_eq!(rows[0].completion.as_deref(), Some(" 3"));
    assert_eq!(rows[0].answer.as_deref(), Some("3"));
    assert_eq!(rows[1].prompt.as_deref(), Some("Say \"hi\", politely."));
    assert_eq!(rows[2].completion.as_deref(), Some(" plain completion"));
}

#[test]
fn csv_row_with_extra_field_names_its_line() {
    let error = load_rows(
        &fixture("prompt_completion_malformed.csv"),
        &options(Format::PromptCompletion),
    )
    .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("prompt_completion_malformed.csv:3"),
        "{message}"
    );
    assert!(message.contains("expected 2 fields"), "{message}");
    let loaded = load_rows(
        &fixture("prompt_completion_malformed.csv"),
        &skipping(Format::PromptCompletion),
    )
    .unwrap();
    assert_eq!((loaded.rows.len(), loaded.skipped), (2, 1));
}

#[test]
fn chat_reads_a_json_data_object_of_message_lists() {
    let rows = load_rows(&fixture("chat.json"), &options(Format::Chat))
        .unwrap()
        .rows;
    assert_eq!(rows.len(), 2);
    let (before, reply) = rows[1].split_last_assistant().unwrap();
    assert_eq!(
        before,
        [
            Message::new("system", "Be brief."),
            Message::new("user", "2+2?")
        ]
    );
    assert_eq!(reply, "4");
    assert_eq!(rows[1].category.as_deref(), Some("math"));
}

#[test]
fn malformed_chat_records_name_their_row_index() {
    let error = load_rows(&fixture("chat_malformed.json"), &options(Format::Chat))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("chat_malformed.json (row index 1)"),
        "{error}"
    );
    assert!(error.contains("has no `content`"), "{error}");
    let loaded = load_rows(&fixture("chat_malformed.json"), &skipping(Format::Chat)).unwrap();
    assert_eq!((loaded.rows.len(), loaded.skipped), (2, 3));
}

#[test]
fn parquet_rows_read_with_the_row_api_and_nulls_are_bad_rows() {
    let error = load_rows(
        &fixture("prompt_completion.parquet"),
        &options(Format::PromptCompletion),
    )
    .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("prompt_completion.parquet (row index 2)"),
        "{message}"
    );
    assert!(message.contains("missing field `completion`"), "{message}");
    let loaded = load_rows(
        &fixture("prompt_completion.parquet"),
        &skipping(Format::PromptCompletion),
    )
    .unwrap();
    assert_eq!(loaded.skipped, 1);
    let expected = [
        ("Q: 1+1=\nA:", " 2", Some("2")),
        ("Name a fruit.", " An apple.", None),
        ("Q: 9-3=\nA:", " 6", Some("6")),
    ];
    assert_eq!(loaded.rows.len(), expected.len());
    for (row, (prompt, completion, answer)) in loaded.rows.iter().zip(expected) {
        assert_eq!(row.prompt.as_deref(), Some(prompt));
        assert_eq!(row.completion.as_deref(), Some(completion));
        assert_eq!(row.answer.as_deref(), answer);
    }
}

#[test]
fn parquet_lists_of_structs_become_chat_messages() {
    let rows = load_rows(&fixture("chat.parquet"), &options(Format::Auto))
        .unwrap()
        .rows;
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0].messages.as_deref(),
        Some(
            &[
                Message::new("user", "Hi"),
                Message::new("assistant", "Hello!")
            ][..]
        )
    );
    assert_eq!(rows[1].category.as_deref(), Some("math"));
}

#[test]
fn preference_rows_keep_prompt_and_margin() {
    let rows = load_rows(&fixture("preference.jsonl"), &options(Format::Preference))
        .unwrap()
        .rows;
    let pair = rows[0].preference().unwrap();
    assert_eq!(
        (pair.prompt, pair.chosen, pair.rejected, pair.margin),
        ("Q: 2+2=\nA:", " 4", " 5", Some(1.5))
    );
    assert_eq!(rows[1].preference().unwrap().margin, None);
}

#[test]
fn hh_rlhf_dialogues_split_at_the_last_assistant_turn() {
    let loaded = load_rows(&fixture("hh.jsonl"), &skipping(Format::Preference)).unwrap();
    assert_eq!(loaded.skipped, 2, "{:?}", loaded.skip_examples);
    let first = loaded.rows[0].preference().unwrap();
    assert_eq!(
        first.prompt,
        "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a fact.\n\nAssistant:"
    );
    assert_eq!(
        (first.chosen, first.rejected),
        (" Honey never spoils.", " No.")
    );
    let reasons = loaded.skip_examples.join("\n");
    assert!(
        reasons.contains("hh.jsonl:3: HH-RLHF dialogues `chosen` and `rejected` differ before the last assistant turn"),
        "{reasons}"
    );
    assert!(
        reasons.contains("hh.jsonl:4: the HH-RLHF replies `chosen` and `rejected` are identical"),
        "{reasons}"
    );
}

#[test]
fn hh_split_refuses_text_without_assistant_turns() {
    assert!(split_hh_dialogues("just text", "other text").is_err());
    assert!(
        split_hh_dialogues("\n\nHuman: a\n\nAssistant:", "\n\nHuman: a\n\nAssistant: b").is_err()
    );
}

#[test]
fn text_rows_skip_blank_lines_and_refuse_null_text() {
    let error = load_rows(&fixture("text.jsonl"), &options(Format::Text))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("text.jsonl:4: missing field `text`"),
        "{error}"
    );
    let loaded = load_rows(&fixture("text.jsonl"), &skipping(Format::Text)).unwrap();
    assert_eq!(loaded.rows.len(), 2);
    assert_eq!(loaded.rows[1].text.as_deref(), Some("12 plus 7 is 19."));
}

#[test]
fn fields_remap_source_columns_and_gold_answers_become_strings() {
    let mut options = options(Format::Prompt);
    options.fields.insert("prompt".into(), "question".into());
    options.fields.insert("answer".into(), "solution".into());
    let rows = load_rows(&fixture("answers.jsonl"), &options).unwrap().rows;
    let answers: Vec<_> = rows.iter().map(|r| r.answer.clone().unwrap()).collect();
    assert_eq!(answers, ["42", "true", "Paris"]);
    assert_eq!(rows[0].prompt.as_deref(), Some("What is 6*7?"));
}

#[test]
fn a_column_renamed_to_completion_is_not_also_the_gold_answer() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("qa.jsonl");
    std::fs::write(&file, "{\"question\": \"2+2?\", \"answer\": \"4\"}\n").unwrap();
    let mut options = options(Format::PromptCompletion);
    options.fields.insert("prompt".into(), "question".into());
    options.fields.insert("completion".into(), "answer".into());
    let rows = load_rows(&file, &options).unwrap().rows;
    assert_eq!(rows[0].completion.as_deref(), Some("4"));
    assert_eq!(rows[0].answer, None);
}

#[test]
fn unknown_field_rename_is_refused_with_the_fields_the_format_reads() {
    let mut options = options(Format::Dolly);
    options.fields.insert("prompt".into(), "question".into());
    let error = load_rows(&fixture("dolly.jsonl"), &options)
        .unwrap_err()
        .to_string();
    assert!(error.contains("fields.prompt"), "{error}");
    assert!(error.contains("instruction, context, response"), "{error}");
}

#[test]
fn auto_detects_the_format_from_the_first_record() {
    let cases = [
        ("dolly.jsonl", Format::Dolly),
        ("chat.json", Format::Chat),
        ("preference.jsonl", Format::Preference),
        ("hh.jsonl", Format::Preference),
        ("prompt_completion.csv", Format::PromptCompletion),
        ("text.jsonl", Format::Text),
    ];
    for (file, expected) in cases {
        let loaded = load_rows(&fixture(file), &skipping(Format::Auto)).unwrap();
        assert_eq!(loaded.format, expected, "{file}");
    }
    let error = load_rows(&fixture("answers.jsonl"), &options(Format::Auto))
        .unwrap_err()
        .to_string();
    assert!(error.contains("question, solution"), "{error}");
}

#[test]
fn rows_format_is_strict_about_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.jsonl");
    std::fs::write(
        &file,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \"complete\": \"b\"}\n",
    )
    .unwrap();
    let error = load_rows(&file, &options(Format::Rows))
        .unwrap_err()
        .to_string();
    assert!(error.contains("data.jsonl:2"), "{error}");
    assert!(error.contains("complete"), "{error}");
}

#[test]
fn folders_are_read_recursively_in_sorted_order_ignoring_other_files() {
    let rows = load_rows(&fixture("folder"), &options(Format::PromptCompletion))
        .unwrap()
        .rows;
    let prompts: Vec<_> = rows.iter().map(|r| r.prompt.clone().unwrap()).collect();
    assert_eq!(prompts, ["first", "second", "third", "fourth"]);
    let mut only_b = options(Format::PromptCompletion);
    only_b.files = Some("b/*.json".into());
    let rows = load_rows(&fixture("folder"), &only_b).unwrap().rows;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].prompt.as_deref(), Some("fourth"));
}

#[test]
fn limit_stops_reading_after_that_many_rows() {
    let mut options = options(Format::PromptCompletion);
    options.limit = Some(3);
    let rows = load_rows(&fixture("folder"), &options).unwrap().rows;
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2].prompt.as_deref(), Some("third"));
}

#[test]
fn real_self_instruct_dolly_file_maps_every_record() {
    let Some(path) = shared_path("data/self-instruct-seed-tasks/dolly_format.jsonl") else {
        return;
    };
    let rows = load_rows(&path, &options(Format::Dolly)).unwrap().rows;
    assert_eq!(rows.len(), 175);
    // Check the folding against the raw records, read independently.
    let raw = std::fs::read_to_string(&path).unwrap();
    for (line, row) in raw.lines().zip(&rows) {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        let (instruction, context) = (
            record["instruction"].as_str().unwrap(),
            record["context"].as_str().unwrap(),
        );
        let expected = if context.trim().is_empty() {
            instruction.to_string()
        } else {
            format!("{instruction}\n\n{context}")
        };
        assert_eq!(row.prompt.as_deref(), Some(expected.as_str()));
        assert_eq!(row.completion.as_deref(), record["response"].as_str());
    }
    let classification = rows
        .iter()
        .filter(|r| r.category.as_deref() == Some("classification"))
        .count();
    assert_eq!(classification, 26);
}

#[test]
fn real_hh_rlhf_gzip_file_splits_into_the_published_pairs() {
    let (Some(raw), Some(pairs)) = (
        shared_path("data/hh-rlhf-harmless-base-test/test.jsonl.gz"),
        shared_path("data/hh-rlhf-harmless-base-test/pairs.jsonl"),
    ) else {
        return;
    };
    let from_dialogues = load_rows(&raw, &skipping(Format::Preference)).unwrap();
    assert_eq!(from_dialogues.rows.len() + from_dialogues.skipped, 2312);
    assert_eq!(from_dialogues.skipped, 8);
    let published: Vec<Row> = load_rows(&pairs, &options(Format::Preference))
        .unwrap()
        .rows;
    assert_eq!(published.len(), 2304);
    assert_eq!(from_dialogues.rows, published);
    // Without `skip`, the first bad dialogue stops the read at its line.
    let error = load_rows(&raw, &options(Format::Preference))
        .unwrap_err()
        .to_string();
    assert!(error.contains("test.jsonl.gz:"), "{error}");
}

#[test]
fn conversational_preference_rows_share_all_but_the_last_turn() {
    let loaded = load_rows(&fixture("preference_chat.jsonl"), &skipping(Format::Auto)).unwrap();
    assert_eq!(loaded.format, Format::Preference);
    assert_eq!(loaded.skipped, 1);
    assert!(loaded.skip_examples[0].contains(
        "preference_chat.jsonl:3: `chosen` and `rejected` differ before their last turn"
    ));
    let single = &loaded.rows[0];
    assert_eq!(
        (
            single.prompt.as_deref(),
            single.chosen.as_deref(),
            single.rejected.as_deref()
        ),
        (Some("What is 2+2?"), Some("4"), Some("5"))
    );
    assert_eq!(single.messages, None);
    let multi = &loaded.rows[1];
    assert_eq!(multi.prompt, None);
    assert_eq!(
        multi.messages.as_deref(),
        Some(
            &[
                Message::new("system", "Be brief."),
                Message::new("user", "Hi")
            ][..]
        )
    );
    assert!(multi.has_shape(rlhf_stages::data::RowShape::Preference));
}
