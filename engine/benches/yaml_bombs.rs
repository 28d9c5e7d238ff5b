//! Benchmark: how fast (and with what error) pipeline parsing refuses YAML bombs: a
//! billion-laughs file, one big anchor aliased a thousand times, 100,000 nested `[`,
//! 65 nested block mappings, and a 10 MB file.
//!
//!     cargo bench -p rlhf-engine --bench yaml_bombs

use std::time::Instant;

fn billion_laughs() -> String {
    let mut text = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        text.push_str(&format!(
            "a{i}: &a{i} [{}]\n",
            vec![format!("*a{}", i - 1); 9].join(", ")
        ));
    }
    text + "stages: {}\n"
}

fn wide_alias() -> String {
    format!(
        "a: &a [{}]\nb: [{}]\nstages: {{}}\n",
        vec!["x"; 5000].join(","),
        vec!["*a"; 999].join(",")
    )
}

fn main() {
    let cases = [
        ("billion laughs", billion_laughs()),
        ("one anchor aliased 999 times", wide_alias()),
        (
            "100,000 nested [",
            format!("stages: {}{}\n", "[".repeat(100_000), "]".repeat(100_000)),
        ),
        (
            "65 nested block mappings",
            format!(
                "stages:\n{}",
                (1..66)
                    .map(|i| format!("{}k{i}:\n", "  ".repeat(i)))
                    .collect::<String>()
            ),
        ),
        (
            "10 MB file",
            format!("stages: {{}}\n# {}\n", "x".repeat(10 << 20)),
        ),
    ];
    for (name, text) in cases {
        let started = Instant::now();
        let result = rlhf_engine::yaml::parse(&text);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(_) => println!("{name:<32} {ms:>8.1} ms  ACCEPTED"),
            Err(e) => println!("{name:<32} {ms:>8.1} ms  {}", e.message),
        }
    }
}
