//! The built-in `synthetic` source: seeded arithmetic problems for offline recipes and
//! tests, in the layout of the TRL reference data (../shared/bench/trl/gen_data.py).
//!
//! Every row is one distinct problem and carries every shape at once:
//!
//! ```json
//! {"prompt": "Q: 12+7=\nA:", "completion": " 19", "chosen": " 19", "rejected": " 20",
//!  "text": "Q: 12+7=\nA: 19", "answer": "19", "category": "addition"}
//! ```
//!
//! `rejected` is the answer off by one of `wrong_offsets` (±1, 2, 3 or 10 by default, as
//! in gen_data.py). `text` is the Q/A line, or with probability `plain_text_fraction` a
//! sentence such as "12 plus 7 is 19." or "twelve plus seven equals nineteen."
//! (gen_data.py's templates). Problems are drawn without replacement, so splitting
//! the dataset (`split: {train: 19800, eval: 200}`) gives held-out problems that never
//! appear in the training split in any form.

use super::error::DataError;
use super::row::Row;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Operation {
    #[serde(rename = "+")]
    Add,
    #[serde(rename = "-")]
    Subtract,
    #[serde(rename = "*")]
    Multiply,
}

impl Operation {
    pub fn symbol(self) -> char {
        match self {
            Operation::Add => '+',
            Operation::Subtract => '-',
            Operation::Multiply => '*',
        }
    }

    pub fn apply(self, a: i64, b: i64) -> i64 {
        match self {
            Operation::Add => a + b,
            Operation::Subtract => a - b,
            Operation::Multiply => a * b,
        }
    }

    fn category(self) -> &'static str {
        match self {
            Operation::Add => "addition",
            Operation::Subtract => "subtraction",
            Operation::Multiply => "multiplication",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SyntheticTask {
    #[default]
    Arithmetic,
}

/// `source: {synthetic: {...}}` in a dataset stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSpec {
    #[serde(default)]
    pub task: SyntheticTask,
    /// Distinct problems to generate (at most operations × (max − min + 1)²).
    pub count: usize,
    #[serde(default = "default_operations")]
    pub operations: Vec<Operation>,
    /// Smallest operand.
    #[serde(default)]
    pub min: i64,
    /// Largest operand.
    #[serde(default = "default_max")]
    pub max: i64,
    /// Share of rows whose `text` is a plain-language sentence instead of the Q/A line.
    #[serde(default = "default_plain_text_fraction")]
    pub plain_text_fraction: f64,
    /// Offsets from the correct answer that `rejected` is drawn from (non-zero).
    #[serde(default = "default_wrong_offsets")]
    pub wrong_offsets: Vec<i64>,
}

fn default_operations() -> Vec<Operation> {
    vec![Operation::Add, Operation::Subtract]
}
fn default_max() -> i64 {
    99
}
fn default_plain_text_fraction() -> f64 {
    0.1
}
fn default_wrong_offsets() -> Vec<i64> {
    vec![-10, -3, -2, -1, 1, 2, 3, 10]
}

/// Above this many possible problems, draw by rejection instead of enumerating them.
const ENUMERATE_LIMIT: u64 = 4_000_000;

impl SyntheticSpec {
    /// How many distinct problems exist.
    pub fn universe(&self) -> u64 {
        let range = (self.max - self.min + 1).max(0) as u64;
        self.operations.len() as u64 * range * range
    }

    pub fn check(&self) -> Result<(), DataError> {
        let unique: HashSet<&Operation> = self.operations.iter().collect();
        if self.operations.is_empty() || unique.len() != self.operations.len() {
            return Err(DataError::param(
                "source.synthetic.operations",
                "list each of +, -, * at most once, at least one",
            ));
        }
        if self.min > self.max || self.max.abs() > 1_000_000 || self.min.abs() > 1_000_000 {
            return Err(DataError::param(
                "source.synthetic.max",
                "need min ≤ max, both within ±1,000,000",
            ));
        }
        if self.count as u64 > self.universe() {
            return Err(DataError::param(
                "source.synthetic.count",
                format!(
                    "{} distinct problems asked, only {} exist for these operations and range",
                    self.count,
                    self.universe()
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.plain_text_fraction) {
            return Err(DataError::param(
                "source.synthetic.plain_text_fraction",
                "must be in [0, 1]",
            ));
        }
        if self.wrong_offsets.is_empty() || self.wrong_offsets.contains(&0) {
            return Err(DataError::param(
                "source.synthetic.wrong_offsets",
                "give at least one non-zero offset",
            ));
        }
        Ok(())
    }

    /// The problem with this index in 0..universe: (operation, a, b).
    fn problem(&self, index: u64) -> (Operation, i64, i64) {
        let range = (self.max - self.min + 1) as u64;
        let operation = self.operations[(index / (range * range)) as usize];
        let a = self.min + ((index / range) % range) as i64;
        let b = self.min + (index % range) as i64;
        (operation, a, b)
    }
}

/// A uniform integer in 0..n (n > 0); the modulo bias is below 2^-40 for n < 2^24.
fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    rng.next_u64() % n
}

/// A uniform float in [0, 1).
fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// `count` distinct problem indices, in draw order.
fn draw_problems(spec: &SyntheticSpec, rng: &mut ChaCha8Rng) -> Vec<u64> {
    let universe = spec.universe();
    if universe <= ENUMERATE_LIMIT {
        // Partial Fisher–Yates: the first `count` slots end up a uniform random sample.
        let mut indices: Vec<u64> = (0..universe).collect();
        for i in 0..spec.count {
            let j = i + below(rng, universe - i as u64) as usize;
            indices.swap(i, j);
        }
        indices.truncate(spec.count);
        return indices;
    }
    let mut seen = HashSet::with_capacity(spec.count);
    let mut out = Vec::with_capacity(spec.count);
    while out.len() < spec.count {
        let index = below(rng, universe);
        if seen.insert(index) {
            out.push(index);
        }
    }
    out
}

/// Generates the rows; the same spec and seed always give the same rows.
pub fn generate(spec: &SyntheticSpec, seed: u64) -> Result<Vec<Row>, DataError> {
    spec.check()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let problems = draw_problems(spec, &mut rng);
    let mut rows = Vec::with_capacity(problems.len());
    for index in problems {
        let (operation, a, b) = spec.problem(index);
        let answer = operation.apply(a, b);
        let offset = spec.wrong_offsets[below(&mut rng, spec.wrong_offsets.len() as u64) as usize];
        let prompt = format!("Q: {a}{}{b}=\nA:", operation.symbol());
        let text = if unit(&mut rng) < spec.plain_text_fraction {
            plain_sentence(&mut rng, operation, a, b, answer)
        } else {
            format!("{prompt} {answer}")
        };
        rows.push(Row {
            completion: Some(format!(" {answer}")),
            chosen: Some(format!(" {answer}")),
            rejected: Some(format!(" {}", answer + offset)),
            text: Some(text),
            answer: Some(answer.to_string()),
            category: Some(operation.category().to_string()),
            prompt: Some(prompt),
            ..Row::default()
        });
    }
    Ok(rows)
}

const NAMES: [&str; 12] = [
    "Tom", "Anna", "Sam", "Lena", "Max", "Mia", "Omar", "Julia", "Ben", "Clara", "David", "Eva",
];
const THINGS: [&str; 14] = [
    "apples", "coins", "books", "stones", "marbles", "cards", "shells", "pencils", "oranges",
    "stamps", "cookies", "flowers", "tickets", "buttons",
];

/// One of gen_data.py's plain-language sentences for the problem.
fn plain_sentence(rng: &mut ChaCha8Rng, operation: Operation, a: i64, b: i64, c: i64) -> String {
    let name = NAMES[below(rng, NAMES.len() as u64) as usize];
    let thing = THINGS[below(rng, THINGS.len() as u64) as usize];
    let (wa, wb, wc) = (words(a), words(b), words(c));
    let templates: Vec<String> = match operation {
        Operation::Add => vec![
            format!("{a} plus {b} is {c}."),
            format!("The sum of {a} and {b} is {c}."),
            format!("{wa} plus {wb} equals {wc}."),
            format!("Adding {b} to {a} gives {c}."),
            format!("{name} has {a} {thing} and finds {b} more, so now {name} has {c} {thing}."),
            format!("When we add {wb} to {wa} the result is {wc}."),
            format!("Together, {a} {thing} and {b} {thing} make {c} {thing}."),
        ],
        Operation::Subtract => vec![
            format!("{a} minus {b} is {c}."),
            format!("The difference between {a} and {b} is {c}."),
            format!("{wa} minus {wb} equals {wc}."),
            format!("Subtracting {b} from {a} gives {c}."),
            format!("{name} had {a} {thing} and gave away {b}, so {name} has {c} {thing} left."),
            format!("If we take {wb} away from {wa} we get {wc}."),
            format!("The temperature was {a} degrees and fell by {b} degrees to {c} degrees."),
        ],
        Operation::Multiply => vec![
            format!("{a} times {b} is {c}."),
            format!("The product of {a} and {b} is {c}."),
            format!("{wa} times {wb} equals {wc}."),
            format!("{name} has {a} bags with {b} {thing} each, so {name} has {c} {thing}."),
        ],
    };
    templates[below(rng, templates.len() as u64) as usize].clone()
}

const ONES: [&str; 20] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
];
const TENS: [&str; 10] = [
    "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
];

/// A number in English words, as gen_data.py writes them ("minus twelve",
/// "one hundred and sixty-eight"); thousands and above fall back to digits.
pub fn words(n: i64) -> String {
    if n < 0 {
        return format!("minus {}", words(-n));
    }
    match n {
        0..=19 => ONES[n as usize].to_string(),
        20..=99 => {
            let (tens, ones) = (n / 10, n % 10);
            if ones == 0 {
                TENS[tens as usize].to_string()
            } else {
                format!("{}-{}", TENS[tens as usize], ONES[ones as usize])
            }
        }
        100..=999 => {
            let (hundreds, rest) = (n / 100, n % 100);
            if rest == 0 {
                format!("{} hundred", ONES[hundreds as usize])
            } else {
                format!("{} hundred and {}", ONES[hundreds as usize], words(rest))
            }
        }
        _ => n.to_string(),
    }
}
