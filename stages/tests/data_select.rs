//! Seeded selection: splits and shuffles are stable (same seed → same rows, in the same
//! order, run after run and whatever order the source lists them in), different seeds
//! differ, fractions and counts add up, and bad split specs are refused.

use rlhf_stages::data::row::Row;
use rlhf_stages::data::select::{
    filter_by_length, select, shuffled_order, split_counts, LengthFilter, SelectPlan, SplitSize,
    SplitSpec,
};
use rlhf_stages::data::DataError;

fn rows(n: usize) -> Vec<Row> {
    (0..n)
        .map(|i| Row {
            prompt: Some(format!("prompt {i}")),
            completion: Some(format!(" completion {i}")),
            ..Row::default()
        })
        .collect()
}

fn fractions(train: f64, eval: f64) -> SplitSpec {
    [
        ("train".to_string(), SplitSize::Fraction(train)),
        ("eval".to_string(), SplitSize::Fraction(eval)),
    ]
    .into()
}

fn prompts(rows: &[Row]) -> Vec<String> {
    rows.iter().map(|r| r.prompt.clone().unwrap()).collect()
}

fn plan(split: Option<SplitSpec>, shuffle: bool) -> SelectPlan {
    SelectPlan {
        sample: None,
        split,
        shuffle,
    }
}

#[test]
fn same_seed_gives_the_same_split_rows_in_the_same_order() {
    let plan = plan(Some(fractions(0.9, 0.1)), true);
    let first = select(rows(200), &plan, 42).unwrap();
    let second = select(rows(200), &plan, 42).unwrap();
    assert_eq!(first, second);
    assert_eq!(
        first
            .iter()
            .map(|(name, rows)| (name.as_str(), rows.len()))
            .collect::<Vec<_>>(),
        [("eval", 20), ("train", 180)]
    );
}

#[test]
fn split_depends_on_row_content_not_on_source_order() {
    let plan = plan(Some(fractions(0.9, 0.1)), true);
    let mut reversed = rows(200);
    reversed.reverse();
    assert_eq!(
        select(rows(200), &plan, 7).unwrap(),
        select(reversed, &plan, 7).unwrap()
    );
}

#[test]
fn different_seeds_give_different_orders_and_splits() {
    let plan = plan(Some(fractions(0.9, 0.1)), true);
    let a = select(rows(200), &plan, 1).unwrap();
    let b = select(rows(200), &plan, 2).unwrap();
    assert_ne!(prompts(&a[0].1), prompts(&b[0].1));
    assert_ne!(shuffled_order(&rows(50), 1), shuffled_order(&rows(50), 2));
}

#[test]
fn the_seeded_order_is_pinned_across_builds() {
    // blake3(seed ‖ row line) ranks; a change here reshuffles every user's splits.
    // Reference from Python: sorted(range(10), key=lambda i: (blake3(struct.pack('<Q', 42)
    //   + json.dumps(row_i, separators=(',', ':')).encode()).digest(), i))
    let order = shuffled_order(&rows(10), 42);
    assert_eq!(order, GOLDEN_ORDER_SEED_42);
}

const GOLDEN_ORDER_SEED_42: [usize; 10] = [1, 3, 7, 6, 5, 2, 9, 8, 4, 0];

#[test]
fn splits_partition_the_rows() {
    let split = select(rows(175), &plan(Some(fractions(0.95, 0.05)), true), 3).unwrap();
    let mut all: Vec<String> = split.iter().flat_map(|(_, rows)| prompts(rows)).collect();
    all.sort();
    let mut expected = prompts(&rows(175));
    expected.sort();
    assert_eq!(all, expected);
}

#[test]
fn fractions_round_down_and_hand_leftovers_to_the_largest_remainders() {
    // 175 × 0.05 = 8.75 and 175 × 0.95 = 166.25: eval gets the one left over.
    assert_eq!(
        split_counts(&fractions(0.95, 0.05), 175).unwrap(),
        [("eval".to_string(), 9), ("train".to_string(), 166)]
    );
    // Fractions below 1 in total leave the rest out.
    assert_eq!(
        split_counts(&fractions(0.5, 0.1), 100).unwrap(),
        [("eval".to_string(), 10), ("train".to_string(), 50)]
    );
}

#[test]
fn counts_are_taken_exactly_and_may_not_exceed_the_rows() {
    let spec: SplitSpec = [
        ("train".to_string(), SplitSize::Count(150)),
        ("eval".to_string(), SplitSize::Count(20)),
    ]
    .into();
    let split = select(rows(200), &plan(Some(spec.clone()), false), 0).unwrap();
    assert_eq!((split[0].1.len(), split[1].1.len()), (20, 150));
    let error = select(rows(100), &plan(Some(spec), false), 0).unwrap_err();
    assert!(matches!(error, DataError::Param { .. }), "{error}");
    assert!(
        error.to_string().contains("170 rows but only 100"),
        "{error}"
    );
}

#[test]
fn bad_split_specs_are_refused_before_reading() {
    let mixed: SplitSpec = [
        ("train".to_string(), SplitSize::Fraction(0.9)),
        ("eval".to_string(), SplitSize::Count(10)),
    ]
    .into();
    assert!(split_counts(&mixed, 100)
        .unwrap_err()
        .to_string()
        .contains("not a mix"));
    assert!(split_counts(&fractions(0.9, 0.2), 100)
        .unwrap_err()
        .to_string()
        .contains("more than 1"));
    let dotted: SplitSpec = [("my.split".to_string(), SplitSize::Fraction(0.5))].into();
    assert!(split_counts(&dotted, 100).is_err());
    assert!(split_counts(&SplitSpec::new(), 100).is_err());
}

#[test]
fn without_shuffle_each_split_keeps_the_source_order() {
    let split = select(rows(100), &plan(Some(fractions(0.8, 0.2)), false), 9).unwrap();
    for (_, rows) in &split {
        let numbers: Vec<usize> = rows
            .iter()
            .map(|r| {
                r.prompt.as_ref().unwrap()["prompt ".len()..]
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
    }
    // Membership does not depend on `shuffle`.
    let shuffled = select(rows(100), &plan(Some(fractions(0.8, 0.2)), true), 9).unwrap();
    let mut a = prompts(&split[0].1);
    let mut b = prompts(&shuffled[0].1);
    a.sort();
    b.sort();
    assert_eq!(a, b);
}

#[test]
fn no_split_writes_one_output_named_data() {
    let out = select(rows(5), &plan(None, false), 0).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, "data");
    assert_eq!(out[0].1, rows(5));
}

#[test]
fn sample_keeps_n_random_rows_stably() {
    let plan = SelectPlan {
        sample: Some(10),
        split: None,
        shuffle: false,
    };
    let a = select(rows(100), &plan, 5).unwrap();
    assert_eq!(a[0].1.len(), 10);
    assert_eq!(a, select(rows(100), &plan, 5).unwrap());
    assert_ne!(a, select(rows(100), &plan, 6).unwrap());
    assert_ne!(
        prompts(&a[0].1),
        prompts(&rows(10)),
        "a sample is not just the first rows"
    );
}

#[test]
fn length_filter_drops_rows_outside_the_bounds() {
    let rows = vec![
        Row {
            prompt: Some("a b c".into()),
            completion: Some("d".into()),
            ..Row::default()
        },
        Row {
            prompt: Some("a".into()),
            completion: Some("b c d e f".into()),
            ..Row::default()
        },
        Row {
            prompt: Some("a b".into()),
            chosen: Some("x".into()),
            rejected: Some("x y z w".into()),
            ..Row::default()
        },
        Row {
            text: Some("one two three four five six".into()),
            ..Row::default()
        },
    ];
    let words = |text: &str| -> Result<usize, DataError> { Ok(text.split_whitespace().count()) };
    let filter = LengthFilter {
        max_prompt_tokens: Some(2),
        max_completion_tokens: Some(4),
        ..LengthFilter::default()
    };
    let (kept, dropped) = filter_by_length(rows.clone(), &filter, &words).unwrap();
    // Row 0: prompt 3 > 2; row 1: completion 5 > 4; row 2: the longer reply (4) fits;
    // row 3: text counts as the completion (6 > 4).
    assert_eq!(dropped, 3);
    assert_eq!(kept, vec![rows[2].clone()]);
    let total = LengthFilter {
        max_total_tokens: Some(4),
        min_completion_tokens: Some(1),
        ..LengthFilter::default()
    };
    assert_eq!(filter_by_length(rows.clone(), &total, &words).unwrap().1, 3);
}
