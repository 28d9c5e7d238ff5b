//! Prompt templates: the plain default, custom strings, and real chat templates rendered
//! exactly as transformers renders them (reference made by
//! fixtures/data/chat_templates/make_chat_reference.py).

use rlhf_stages::data::row::{Message, Row};
use rlhf_stages::data::template::{PromptTemplate, DEFAULT_TEMPLATE};
use serde::Deserialize;
use std::path::PathBuf;

fn chat_templates_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/chat_templates")
}

#[derive(Deserialize)]
struct ReferenceCase {
    template: String,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    rendered: String,
}

#[test]
fn chat_templates_render_byte_for_byte_like_transformers() {
    let text = std::fs::read_to_string(chat_templates_dir().join("chat_reference.json")).unwrap();
    let cases: Vec<ReferenceCase> = serde_json::from_str(&text).unwrap();
    assert_eq!(cases.len(), 20);
    for case in &cases {
        let config = chat_templates_dir()
            .join(&case.template)
            .join("tokenizer_config.json");
        let template = PromptTemplate::from_tokenizer_config(&config).unwrap();
        let rendered = template
            .renderer()
            .unwrap()
            .render_chat(&case.messages, case.add_generation_prompt)
            .unwrap();
        assert_eq!(
            rendered, case.rendered,
            "template {} on {:?} (generation prompt {})",
            case.template, case.messages, case.add_generation_prompt
        );
    }
}

#[test]
fn default_template_is_the_dolly_recipe_layout() {
    let renderer = PromptTemplate::default().renderer().unwrap();
    assert_eq!(
        renderer.render_prompt("Name a colour.").unwrap(),
        "User: Name a colour.\n\nAssistant: "
    );
    assert_eq!(DEFAULT_TEMPLATE, "User: {prompt}\n\nAssistant: ");
}

#[test]
fn custom_template_replaces_the_prompt_placeholder_once() {
    let template = PromptTemplate::plain("### Question\n{prompt}\n### Answer\n").unwrap();
    let renderer = template.renderer().unwrap();
    // A literal `{prompt}` inside the prompt itself is not expanded again.
    assert_eq!(
        renderer.render_prompt("say {prompt}").unwrap(),
        "### Question\nsay {prompt}\n### Answer\n"
    );
}

#[test]
fn plain_template_without_placeholder_is_refused() {
    let error = PromptTemplate::plain("User: \n\nAssistant: ")
        .unwrap_err()
        .to_string();
    assert!(error.contains("{prompt}"), "{error}");
    assert!(PromptTemplate::plain("{prompt} and {prompt}").is_err());
}

#[test]
fn template_travels_as_template_json() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(PromptTemplate::load(dir.path()).unwrap(), None);
    let config = chat_templates_dir().join("qwen2.5/tokenizer_config.json");
    let template = PromptTemplate::from_tokenizer_config(&config).unwrap();
    template.save(dir.path()).unwrap();
    assert_eq!(
        PromptTemplate::load(dir.path()).unwrap(),
        Some(template.clone())
    );
    let plain = PromptTemplate::plain("{prompt}").unwrap();
    plain.save(dir.path()).unwrap();
    assert_eq!(PromptTemplate::load(dir.path()).unwrap(), Some(plain));
}

#[test]
fn chat_row_completion_is_what_the_reply_adds_after_the_generation_prompt() {
    let config = chat_templates_dir().join("qwen2.5/tokenizer_config.json");
    let renderer = PromptTemplate::from_tokenizer_config(&config)
        .unwrap()
        .renderer()
        .unwrap();
    let row = Row {
        prompt: Some("Q: 12+7=\nA:".into()),
        completion: Some(" 19".into()),
        ..Row::default()
    };
    let rendered = renderer.render_row(&row).unwrap();
    assert!(rendered
        .prompt
        .ends_with("<|im_start|>user\nQ: 12+7=\nA:<|im_end|>\n<|im_start|>assistant\n"));
    assert_eq!(rendered.completion.as_deref(), Some(" 19<|im_end|>\n"));
    // The same row as messages renders identically.
    let chat = Row {
        messages: Some(vec![
            Message::new("user", "Q: 12+7=\nA:"),
            Message::new("assistant", " 19"),
        ]),
        ..Row::default()
    };
    assert_eq!(renderer.render_row(&chat).unwrap(), rendered);
    assert!(!renderer.template().appends_eos());
}

#[test]
fn plain_template_renders_chat_rows_with_one_user_turn_only() {
    let renderer = PromptTemplate::default().renderer().unwrap();
    let single = Row {
        messages: Some(vec![
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello"),
        ]),
        ..Row::default()
    };
    let rendered = renderer.render_row(&single).unwrap();
    assert_eq!(rendered.prompt, "User: Hi\n\nAssistant: ");
    assert_eq!(rendered.completion.as_deref(), Some("Hello"));
    let multi = Row {
        messages: Some(vec![
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello"),
            Message::new("user", "Again"),
            Message::new("assistant", "Yes"),
        ]),
        ..Row::default()
    };
    assert!(renderer.render_row(&multi).is_err());
}

#[test]
fn raise_exception_in_a_template_is_a_template_error_with_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenizer_config.json");
    std::fs::write(
        &config,
        r#"{"chat_template": "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}{% endif %}ok", "eos_token": "</s>"}"#,
    )
    .unwrap();
    let renderer = PromptTemplate::from_tokenizer_config(&config)
        .unwrap()
        .renderer()
        .unwrap();
    assert_eq!(
        renderer
            .render_chat(&[Message::new("user", "x")], true)
            .unwrap(),
        "ok"
    );
    let error = renderer
        .render_chat(&[Message::new("assistant", "x")], true)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("Conversations must start with a user turn"),
        "{error}"
    );
}

#[test]
fn tokenizer_config_without_chat_template_says_how_to_use_a_plain_one() {
    let Some(config) =
        rlhf_stages::testing::shared_path("bench/trl/tokenizer/tokenizer_config.json")
    else {
        return;
    };
    let error = PromptTemplate::from_tokenizer_config(&config)
        .unwrap_err()
        .to_string();
    assert!(error.contains("no `chat_template`"), "{error}");
}

#[test]
fn a_yaml_template_spec_names_default_chat_or_a_custom_string() {
    let qwen = chat_templates_dir().join("qwen2.5");
    assert_eq!(
        PromptTemplate::from_spec("default", &qwen).unwrap(),
        PromptTemplate::default()
    );
    assert!(matches!(
        PromptTemplate::from_spec("chat", &qwen).unwrap(),
        PromptTemplate::Chat { .. }
    ));
    assert_eq!(
        PromptTemplate::from_spec("{prompt}", &qwen).unwrap(),
        PromptTemplate::plain("{prompt}").unwrap()
    );
    assert!(
        PromptTemplate::from_spec("chat", &chat_templates_dir()).is_err(),
        "no tokenizer_config.json there"
    );
    assert!(PromptTemplate::from_spec("no placeholder", &qwen).is_err());
}
