//! Human labelling end to end, in headless Chromium driven over WebDriver: `rlhf run` stops
//! at the human-judged stage (exit 3), a labeller labels by clicks and by keys (undo, skip,
//! a comment), the server is killed mid-way and restarted, labelling finishes, a second
//! labeller adds a label (agreement), and the rerun writes the pairs from the labels.
//! Also: model output holding markup is shown as text and never runs.

mod common;
mod label_support;

use common::Project;
use label_support::{browser_available, http, wait_until, Browser, LabelProcess};
use serde_json::{json, Value};
use std::collections::BTreeMap;

const ENTER: &str = "\u{E007}";

fn pipeline(tokenizer: &std::path::Path) -> String {
    format!(
        r#"name: label
seed: 3
stages:
  prompts: {{ kind: dataset, source: data/prompts.jsonl }}
  base:
    kind: load_pretrained
    init: {{ hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
            intermediate_size: 64, max_position_embeddings: 64, tokenizer: "{}" }}
  prefs:
    kind: collect_preferences
    policy: base
    prompts: prompts
    template: "{{prompt}}"
    judge: {{ kind: human, labels: labels/prefs.jsonl }}
    completions_per_prompt: 3
    pairing: all_pairs
    max_new_tokens: 6
"#,
        tokenizer.display()
    )
}

fn project() -> Option<Project> {
    let tokenizer = rlhf_stages::testing::shared_path("bench/trl/tokenizer")?;
    let data = rlhf_stages::testing::shared_path("bench/trl/data/grpo.jsonl")?;
    if !browser_available() {
        return None;
    }
    let project = Project::new();
    let text = std::fs::read_to_string(data).unwrap();
    let rows: Vec<&str> = text.lines().take(2).collect();
    project.write("data/prompts.jsonl", &(rows.join("\n") + "\n"));
    project.write("p.yaml", &pipeline(&tokenizer));
    Some(project)
}

/// The items file by id: (first, second).
fn items(project: &Project) -> BTreeMap<String, (String, String)> {
    project
        .read("labels/prefs.items.jsonl")
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let text = |k: &str| v[k].as_str().unwrap().to_string();
            (text("id"), (text("first"), text("second")))
        })
        .collect()
}

fn log_lines(project: &Project) -> usize {
    project.read("labels/prefs.jsonl").lines().count()
}

/// The labeller's choice (1..=5, as displayed) → preference of the item's first over its
/// second, given what the page showed as A.
fn canonical(choice: u8, shown_a: &str, first: &str) -> i8 {
    let of_a = [2, 1, 0, -1, -2][usize::from(choice - 1)];
    if shown_a == first {
        of_a
    } else {
        -of_a
    }
}

/// What the test expects the stage to find: item → [(labeller, preference)].
#[derive(Default)]
struct Expected(BTreeMap<String, Vec<(String, i8)>>);

struct Session<'a> {
    browser: &'a Browser,
    project: &'a Project,
    items: BTreeMap<String, (String, String)>,
    labeller: &'a str,
}

impl Session<'_> {
    fn current(&self) -> String {
        self.browser.eval("return document.getElementById('card').hidden ? '' : document.getElementById('card').dataset.item;").as_str().unwrap_or("").to_string()
    }

    /// Waits until the log has `lines` lines and the page shows something other than `old`.
    fn settle(&self, lines: usize, old: &str) {
        wait_until("the label to be saved", || log_lines(self.project) == lines);
        wait_until("the page to move on", || self.current() != old);
    }

    /// Labels the item on screen with `choice` by `how` ("click" or "keys") and records it.
    fn label(&self, expected: &mut Expected, choice: u8, how: &str) {
        let item = self.current();
        assert!(!item.is_empty(), "no item on screen");
        let shown_a = self.browser.text("#response-a");
        let before = log_lines(self.project);
        match how {
            "click" => {
                self.browser.click(&format!("#choice-{choice}"));
                self.browser.click("#submit");
            }
            _ => self.browser.press(&[&choice.to_string(), ENTER]),
        }
        let first = &self.items[&item].0;
        expected.0.entry(item.clone()).or_default().push((
            self.labeller.to_string(),
            canonical(choice, &shown_a, first),
        ));
        wait_until("the label to be saved", || {
            log_lines(self.project) == before + 1
        });
        wait_until("the page to move on", || self.current() != item);
    }
}

#[test]
fn labels_given_in_the_browser_survive_a_killed_server_and_become_the_stage_pairs() {
    let Some(project) = project() else { return };
    let waiting = project.run(&[]);
    waiting.assert_code(3);
    assert!(
        waiting.stderr.contains("waiting for") && waiting.stderr.contains("rlhf label"),
        "{}",
        waiting.stderr
    );
    let waiting_key = waiting.keys()["prefs"].clone();
    let items = items(&project);
    let total = items.len();
    assert!(total >= 4, "expected several pairs to label, got {total}");

    let label_command = || {
        let mut c = project.command(&[
            "label",
            "p.yaml",
            "--stage",
            "prefs",
            "--port",
            "0",
            "--labeller",
            "ann",
        ]);
        c.env("RUST_BACKTRACE", "0");
        c
    };
    let browser = Browser::start();
    let server = LabelProcess::start(label_command());
    browser.goto(&server.url);
    let ann = Session {
        browser: &browser,
        project: &project,
        items: items.clone(),
        labeller: "ann",
    };
    wait_until("the first item", || !ann.current().is_empty());
    assert_eq!(browser.text("#progress"), format!("1 of {total}"));
    let mut expected = Expected::default();

    ann.label(&mut expected, 1, "click"); // A significantly better, by clicks
    let second = ann.current();
    ann.label(&mut expected, 4, "keys"); // B slightly better, by keys
                                         // Undo by key: an undo record is appended and the same item comes back.
    browser.press(&["u"]);
    expected.0.get_mut(&second).unwrap().pop();
    ann.settle(3, "");
    wait_until("the undone item to come back", || ann.current() == second);
    ann.label(&mut expected, 5, "keys");
    // Skip: nothing is written, another item comes.
    let skipped = ann.current();
    browser.click("#skip");
    wait_until("the page to skip", || ann.current() != skipped);
    assert_eq!(log_lines(&project), 4);
    ann.label(&mut expected, 3, "click"); // about the same: a tie
                                          // A comment, submitted with Enter from the comment box.
    browser.click("#choice-2");
    let item = ann.current();
    let shown_a = browser.text("#response-a");
    browser.type_into("#comment", &format!("terse{ENTER}"));
    expected
        .0
        .entry(item.clone())
        .or_default()
        .push(("ann".into(), canonical(2, &shown_a, &items[&item].0)));
    ann.settle(6, &item);

    // A crash: every label given so far is on disk.
    server.kill();
    assert_eq!(log_lines(&project), 6);
    let server = LabelProcess::start(label_command());
    browser.goto(&server.url);
    wait_until("the page after the restart", || !ann.current().is_empty());
    assert_eq!(
        browser.text("#progress"),
        format!("5 of {total} · 4 complete"),
        "the restart continues where it stopped"
    );
    while !ann.current().is_empty() {
        ann.label(&mut expected, 1, "keys");
    }
    assert_eq!(
        browser.eval("return document.getElementById('done').hidden;"),
        json!(false)
    );

    // A second labeller agrees in direction with ann's first label, with another strength.
    browser.goto(&format!("http://127.0.0.1:{}/?labeller=bob", server.port));
    let bob = Session {
        browser: &browser,
        project: &project,
        items: items.clone(),
        labeller: "bob",
    };
    wait_until("bob's first item", || !bob.current().is_empty());
    let item = bob.current();
    let ann_preference = expected.0[&item][0].1;
    let wanted = ann_preference.signum(); // canonical ±1 (or 0)
    let shown_a = browser.text("#response-a");
    let of_a = if shown_a == items[&item].0 {
        wanted
    } else {
        -wanted
    };
    let choice = [2i8, 1, 0, -1, -2].iter().position(|&p| p == of_a).unwrap() as u8 + 1;
    bob.label(&mut expected, choice, "click");
    let (code, _, body) = http("GET", server.port, "/api/agreement", None);
    assert_eq!(code, 200);
    let agreement: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(agreement["agreement"]["comparisons"], json!(1));
    assert_eq!(agreement["agreement"]["direction"], json!(1.0));
    assert_eq!(agreement["complete"], json!(total));
    server.kill();

    // The rerun reads the labels: the stage's key changed and it writes the pairs.
    let done = project.run(&[]);
    done.assert_code(0);
    assert_ne!(
        done.keys()["prefs"],
        waiting_key,
        "the labels file is part of the key"
    );
    let dir = done.output_dir("prefs");
    let pairs: Vec<Value> = std::fs::read_to_string(dir.join("pairs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut want = Vec::new();
    for (id, labels) in &expected.0 {
        let mean = labels.iter().map(|(_, p)| f64::from(*p)).sum::<f64>() / labels.len() as f64;
        if mean == 0.0 {
            continue;
        }
        let (first, second) = &items[id];
        let (chosen, rejected) = if mean > 0.0 {
            (first, second)
        } else {
            (second, first)
        };
        let strength = if mean.abs() >= 1.5 {
            "significantly"
        } else {
            "slightly"
        };
        let mut names: Vec<&str> = labels.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        want.push((
            id.clone(),
            chosen.clone(),
            rejected.clone(),
            strength.to_string(),
            mean.abs(),
            names.join(","),
        ));
    }
    let mut got: Vec<_> = pairs
        .iter()
        .map(|p| {
            let names: Vec<&str> = p["labellers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap())
                .collect();
            assert_eq!(p["judge"], json!("human"));
            (
                p["item"].as_str().unwrap().to_string(),
                p["chosen"].as_str().unwrap().to_string(),
                p["rejected"].as_str().unwrap().to_string(),
                p["strength"].as_str().unwrap().to_string(),
                p["margin"].as_f64().unwrap(),
                names.join(","),
            )
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, want);
    assert!(
        pairs.iter().any(|p| p["comments"] == json!(["terse"])),
        "the comment travels with its pair"
    );
    let metrics: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["pairs"], json!(want.len()));
    assert_eq!(metrics["ties_dropped"], json!(total - want.len()));
    assert_eq!(metrics["agreement"], json!(1.0));
    assert_eq!(metrics["labellers"], json!(2));
    // Nothing changed: the rerun is cached.
    assert_eq!(project.run(&[]).statuses()["prefs"], "cached");
}

#[test]
fn markup_in_model_output_is_shown_as_text_and_never_runs() {
    let Some(project) = project() else { return };
    let script = "<script>window.__xss = 1</script>";
    let image = "<img src=x onerror=\"window.__xss = 2\">";
    let prompt = "<b>bold?</b> & <i>more</i>";
    let item =
        json!({ "id": "0123456789abcdef", "prompt": prompt, "first": script, "second": image });
    project.write("labels/prefs.items.jsonl", &format!("{item}\n"));
    let browser = Browser::start();
    let server = LabelProcess::start(project.command(&[
        "label",
        "p.yaml",
        "--stage",
        "prefs",
        "--port",
        "0",
        "--labeller",
        "eve",
    ]));
    let (_, head, _) = http("GET", server.port, "/", None);
    assert!(
        head.contains("Content-Security-Policy: default-src 'none'; script-src 'self'"),
        "{head}"
    );
    browser.goto(&server.url);
    wait_until("the item", || browser.text("#prompt") == prompt);
    let shown = [browser.text("#response-a"), browser.text("#response-b")];
    assert!(
        shown.contains(&script.to_string()) && shown.contains(&image.to_string()),
        "{shown:?}"
    );
    let dom = browser.eval(
        "return [document.querySelectorAll('img').length, document.querySelectorAll('script').length, \
         document.querySelectorAll('#prompt *, #response-a *, #response-b *').length, typeof window.__xss];",
    );
    assert_eq!(
        dom,
        json!([0, 1, 0, "undefined"]),
        "no img element, only the page's own script, no markup, nothing ran"
    );
}
