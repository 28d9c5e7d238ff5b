//! Batching: ids through the template, eos on completions, right padding with the pad id,
//! loss masks on completion tokens only, preference batches sharing the prompt, epoch
//! order (plain and length-grouped), packing, and the candle conversion.

use candle_core::{DType, Device};
use rlhf_stages::data::batch::{
    collate_examples, collate_pairs, collate_prompts, collate_texts, epoch_batches, pack_sequences,
    Encoder,
};
use rlhf_stages::data::row::{Message, Row};
use rlhf_stages::data::synthetic::{generate, SyntheticSpec};
use rlhf_stages::data::template::PromptTemplate;
use rlhf_stages::data::tokenizer::{train_bpe, BpeSettings, SpecialTokens};
use std::sync::OnceLock;
use tokenizers::Tokenizer;

const SPECIAL: SpecialTokens = SpecialTokens {
    pad: 0,
    eos: 2,
    bos: Some(1),
};

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let spec: SyntheticSpec = serde_json::from_value(
            serde_json::json!({ "count": 2000, "plain_text_fraction": 0.3 }),
        )
        .unwrap();
        let texts: Vec<String> = generate(&spec, 1)
            .unwrap()
            .into_iter()
            .map(|r| r.text.unwrap())
            .collect();
        let mut texts = texts;
        texts.push("User: Assistant: Name a colour. Red".into());
        train_bpe(texts.iter().map(String::as_str), &BpeSettings::default()).unwrap()
    })
}

fn ids(text: &str) -> Vec<u32> {
    tokenizer().encode(text, false).unwrap().get_ids().to_vec()
}

fn row(prompt: &str, completion: &str) -> Row {
    Row {
        prompt: Some(prompt.into()),
        completion: Some(completion.into()),
        ..Row::default()
    }
}

#[test]
fn prompt_and_completion_are_tokenised_apart_and_eos_ends_the_completion() {
    let renderer = PromptTemplate::plain("{prompt}")
        .unwrap()
        .renderer()
        .unwrap();
    let encoder = Encoder::new(tokenizer(), &renderer, SPECIAL);
    let example = encoder
        .encode_example(&row("Q: 12+7=\nA:", " 19"))
        .unwrap()
        .unwrap();
    assert_eq!(example.prompt, ids("Q: 12+7=\nA:"));
    let mut completion = ids(" 19");
    completion.push(2);
    assert_eq!(example.completion, completion);
    assert_eq!(
        encoder.encode_prompt(&row("Q: 12+7=\nA:", " 19")).unwrap(),
        example.prompt
    );
}

#[test]
fn the_default_template_wraps_the_prompt_and_bos_is_added_only_when_asked() {
    let renderer = PromptTemplate::default().renderer().unwrap();
    let example = Encoder::new(tokenizer(), &renderer, SPECIAL)
        .encode_example(&row("Name a colour.", "Red"))
        .unwrap()
        .unwrap();
    assert_eq!(example.prompt, ids("User: Name a colour.\n\nAssistant: "));
    let with_bos = Encoder::new(tokenizer(), &renderer, SPECIAL).with_bos(true);
    let example = with_bos
        .encode_example(&row("Name a colour.", "Red"))
        .unwrap()
        .unwrap();
    assert_eq!(example.prompt[0], 1);
    assert_eq!(
        &example.prompt[1..],
        ids("User: Name a colour.\n\nAssistant: ")
    );
}

#[test]
fn sft_batch_is_right_padded_and_the_loss_covers_completion_tokens_only() {
    let renderer = PromptTemplate::plain("{prompt}")
        .unwrap()
        .renderer()
        .unwrap();
    let encoder = Encoder::new(tokenizer(), &renderer, SPECIAL);
    let short = encoder
        .encode_example(&row("Q: 1+1=\nA:", " 2"))
        .unwrap()
        .unwrap();
    let long = encoder
        .encode_example(&row("Q: 99-100=\nA:", " -1"))
        .unwrap()
        .unwrap();
    let batch = collate_examples(&[&short, &long], SPECIAL.pad);
    let (p0, c0) = (short.prompt.len(), short.completion.len());
    let (p1, c1) = (long.prompt.len(), long.completion.len());
    assert_eq!(batch.batch_size, 2);
    assert_eq!(batch.seq_len, (p0 + c0).max(p1 + c1));
    assert!(
        p0 + c0 < batch.seq_len,
        "the first row needs padding for this test"
    );
    assert_eq!(batch.lengths, [p0 + c0, p1 + c1]);
    assert_eq!(batch.prompt_lengths, [p0, p1]);
    for (i, (p, c)) in [(p0, c0), (p1, c1)].into_iter().enumerate() {
        let row_ids = &batch.input_ids[i * batch.seq_len..(i + 1) * batch.seq_len];
        let attention = &batch.attention_mask[i * batch.seq_len..(i + 1) * batch.seq_len];
        let loss = &batch.loss_mask[i * batch.seq_len..(i + 1) * batch.seq_len];
        for t in 0..batch.seq_len {
            assert_eq!(attention[t], u8::from(t < p + c), "row {i} position {t}");
            assert_eq!(
                loss[t],
                u8::from(t >= p && t < p + c),
                "row {i} position {t}"
            );
            if t >= p + c {
                assert_eq!(row_ids[t], SPECIAL.pad);
            }
        }
        assert_eq!(
            row_ids[p + c - 1],
            SPECIAL.eos,
            "the last real token is eos"
        );
    }
    assert_eq!(batch.real_tokens(), p0 + c0 + p1 + c1);
}

#[test]
fn max_length_cuts_completions_and_drops_prompts_that_fill_it() {
    let renderer = PromptTemplate::plain("{prompt}")
        .unwrap()
        .renderer()
        .unwrap();
    let prompt_len = ids("Q: 12+7=\nA:").len();
    let encoder = Encoder::new(tokenizer(), &renderer, SPECIAL).with_max_length(prompt_len + 2);
    let example = encoder
        .encode_example(&row("Q: 12+7=\nA:", " 19"))
        .unwrap()
        .unwrap();
    assert_eq!(example.completion, ids(" 19")[..2]);
    let tight = Encoder::new(tokenizer(), &renderer, SPECIAL).with_max_length(prompt_len);
    assert_eq!(
        tight.encode_example(&row("Q: 12+7=\nA:", " 19")).unwrap(),
        None
    );
}

#[test]
fn preference_batch_puts_chosen_rows_first_and_masks_the_replies() {
    let renderer = PromptTemplate::plain("{prompt}")
        .unwrap()
        .renderer()
        .unwrap();
    let encoder = Encoder::new(tokenizer(), &renderer, SPECIAL);
    let pair_row = Row {
        prompt: Some("Q: 5+5=\nA:".into()),
        chosen: Some(" 10".into()),
        rejected: Some(" 100".into()),
        ..Row::default()
    };
    let pair = encoder.encode_pair(&pair_row).unwrap().unwrap();
    let other = encoder
        .encode_pair(&Row {
            prompt: Some("Q: 1+2=\nA:".into()),
            chosen: Some(" 3".into()),
            rejected: Some(" 4".into()),
            ..Row::default()
        })
        .unwrap()
        .unwrap();
    let batch = collate_pairs(&[&pair, &other], SPECIAL.pad);
    assert_eq!(batch.batch_size, 4);
    let row_of =
        |i: usize| &batch.input_ids[i * batch.seq_len..i * batch.seq_len + batch.lengths[i]];
    let with = |prompt: &[u32], reply: &[u32]| [prompt, reply].concat();
    assert_eq!(row_of(0), with(&pair.prompt, &pair.chosen));
    assert_eq!(row_of(1), with(&other.prompt, &other.chosen));
    assert_eq!(row_of(2), with(&pair.prompt, &pair.rejected));
    assert_eq!(row_of(3), with(&other.prompt, &other.rejected));
    assert_eq!(
        batch.prompt_lengths,
        [
            pair.prompt.len(),
            other.prompt.len(),
            pair.prompt.len(),
            other.prompt.len()
        ]
    );
    let masked: usize = batch.loss_mask.iter().map(|&m| usize::from(m)).sum();
    assert_eq!(
        masked,
        pair.chosen.len() + other.chosen.len() + pair.rejected.len() + other.rejected.len()
    );
}

#[test]
fn text_batches_train_on_every_real_token_and_prompt_batches_on_none() {
    let renderer = PromptTemplate::default().renderer().unwrap();
    let encoder = Encoder::new(tokenizer(), &renderer, SPECIAL);
    let text = encoder
        .encode_lm_text(&Row {
            text: Some("12 plus 7 is 19.".into()),
            ..Row::default()
        })
        .unwrap();
    assert_eq!(text, [ids("12 plus 7 is 19."), vec![2]].concat());
    let short = vec![5u32, 6];
    let batch = collate_texts(&[&text, &short], SPECIAL.pad);
    assert_eq!(batch.loss_mask, batch.attention_mask);
    assert_eq!(batch.prompt_lengths, [0, 0]);
    let prompts = collate_prompts(&[&text, &short], SPECIAL.pad);
    assert!(prompts.loss_mask.iter().all(|&m| m == 0));
    assert_eq!(prompts.prompt_lengths, [text.len(), 2]);
    assert_eq!(
        &prompts.input_ids[prompts.seq_len..prompts.seq_len + 3],
        [5, 6, SPECIAL.pad]
    );
}

#[test]
fn chat_template_completions_end_the_turn_themselves() {
    let config = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data/chat_templates/smollm2/tokenizer_config.json");
    let renderer = PromptTemplate::from_tokenizer_config(&config)
        .unwrap()
        .renderer()
        .unwrap();
    let encoder = Encoder::new(tokenizer(), &renderer, SPECIAL);
    let chat = Row {
        messages: Some(vec![
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello"),
        ]),
        ..Row::default()
    };
    let example = encoder.encode_example(&chat).unwrap().unwrap();
    assert_eq!(example.completion, ids("Hello<|im_end|>\n"));
    let prompt = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(example.prompt, ids(prompt));
}

#[test]
fn epoch_order_covers_every_example_once_and_is_seeded_by_epoch() {
    let lengths: Vec<usize> = (0..1000).map(|i| 5 + (i * 37) % 90).collect();
    for group in [false, true] {
        let batches = epoch_batches(&lengths, 16, 42, 0, group);
        let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert!(batches.iter().all(|b| b.len() <= 16));
        assert_eq!(batches, epoch_batches(&lengths, 16, 42, 0, group));
        assert_ne!(batches, epoch_batches(&lengths, 16, 42, 1, group));
        assert_ne!(batches, epoch_batches(&lengths, 16, 43, 0, group));
    }
}

#[test]
fn length_grouping_cuts_padding() {
    let lengths: Vec<usize> = (0..2000).map(|i| 5 + (i * 7919) % 200).collect();
    let padded = |batches: Vec<Vec<usize>>| -> usize {
        batches
            .iter()
            .map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap())
            .sum()
    };
    let plain = padded(epoch_batches(&lengths, 16, 0, 0, false));
    let grouped = padded(epoch_batches(&lengths, 16, 0, 0, true));
    let real: usize = lengths.iter().sum();
    assert!(
        (grouped - real) * 5 < plain - real,
        "grouping should remove most padding: plain {plain}, grouped {grouped}, real {real}"
    );
}

#[test]
fn packing_concatenates_sequences_into_fixed_blocks() {
    let sequences = vec![vec![10, 11, 2], vec![12, 2], vec![13, 14, 15, 16, 2]];
    let blocks = pack_sequences(&sequences, 4);
    assert_eq!(
        blocks,
        [vec![10, 11, 2, 12], vec![2, 13, 14, 15], vec![16, 2]]
    );
}

#[test]
fn batches_convert_to_candle_tensors_of_shape_batch_by_length() {
    let batch = collate_texts(&[&[3, 4, 5][..], &[6][..]], SPECIAL.pad);
    let device = Device::Cpu;
    let input_ids = batch.input_ids_tensor(&device).unwrap();
    assert_eq!(
        (input_ids.dims(), input_ids.dtype()),
        (&[2, 3][..], DType::U32)
    );
    assert_eq!(input_ids.to_vec2::<u32>().unwrap(), [[3, 4, 5], [6, 0, 0]]);
    let mask = batch.attention_mask_tensor(&device).unwrap();
    assert_eq!(
        mask.to_vec2::<f32>().unwrap(),
        [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    );
    assert_eq!(batch.loss_mask_tensor(&device).unwrap().dtype(), DType::F32);
}

#[test]
fn batch_encoding_equals_row_by_row_encoding() {
    let renderer = PromptTemplate::default().renderer().unwrap();
    let rows: Vec<Row> = (0..50)
        .map(|i| {
            row(
                &format!("Q: {i}+{i}=\nA:"),
                &format!(" {} and more words here", 2 * i),
            )
        })
        .collect();
    // Room for three completion tokens after the longest prompt.
    let unlimited = Encoder::new(tokenizer(), &renderer, SPECIAL).with_bos(true);
    let longest = rows
        .iter()
        .map(|r| unlimited.encode_prompt(r).unwrap().len())
        .max()
        .unwrap();
    let encoder = Encoder::new(tokenizer(), &renderer, SPECIAL)
        .with_bos(true)
        .with_max_length(longest + 3);
    let one_by_one: Vec<_> = rows
        .iter()
        .map(|r| encoder.encode_example(r).unwrap())
        .collect();
    assert_eq!(encoder.encode_examples(&rows).unwrap(), one_by_one);
    let lengths: Vec<(usize, usize)> = one_by_one
        .iter()
        .flatten()
        .map(|e| (e.prompt.len(), e.completion.len()))
        .collect();
    assert_eq!(lengths.len(), rows.len());
    assert!(
        lengths.iter().all(|(p, c)| p + c <= longest + 3),
        "max_length applied: {lengths:?}"
    );
    assert!(
        lengths.iter().any(|(p, c)| p + c == longest + 3),
        "max_length reached: {lengths:?}"
    );
}

#[test]
fn preference_replies_are_rendered_like_sft_completions() {
    let config = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data/chat_templates/qwen2.5/tokenizer_config.json");
    let renderer = PromptTemplate::from_tokenizer_config(&config)
        .unwrap()
        .renderer()
        .unwrap();
    let encoder = Encoder::new(tokenizer(), &renderer, SPECIAL);
    let multi = Row {
        messages: Some(vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
        ]),
        chosen: Some("Hello.".into()),
        rejected: Some("Go away.".into()),
        ..Row::default()
    };
    let pair = encoder.encode_pair(&multi).unwrap().unwrap();
    let prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(pair.prompt, ids(prompt));
    assert_eq!(pair.chosen, ids("Hello.<|im_end|>\n"));
    assert_eq!(pair.rejected, ids("Go away.<|im_end|>\n"));
    // The SFT encoding of the chosen conversation has the same prompt and completion.
    let mut conversation = multi.messages.clone().unwrap();
    conversation.push(Message::new("assistant", "Hello."));
    let sft = encoder
        .encode_example(&Row {
            messages: Some(conversation),
            ..Row::default()
        })
        .unwrap()
        .unwrap();
    assert_eq!((sft.prompt, sft.completion), (pair.prompt, pair.chosen));
}
