//! `rlhf generate`: talk to a cached model artifact of a pipeline (a Model, an Adapter
//! on its cached base, or a RewardModel's LM) through its prompt template, one prompt
//! from `--prompt` or one per stdin line with `--interactive` (where `\n`, `\t` and `\\`
//! in a line stand for a newline, a tab and a backslash, so multi-line prompts fit on one).

use super::{print_error, print_run_error, Workspace};
use rlhf_engine::run::exit;
use rlhf_engine::status::State;
use rlhf_engine::ArtifactKind;
use rlhf_stages::kinds::evaluate::models::{load_model, LoadedModel};
use rlhf_stages::kinds::evaluate::scoring::complete_prompt;
use rlhf_stages::model::GenerationSettings;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

/// What to complete and how to sample: `rlhf generate`'s options.
#[derive(clap::Args, Debug)]
pub struct GenerateOptions {
    /// The raw prompt (the model's template is applied to it).
    #[arg(
        long,
        required_unless_present = "interactive",
        conflicts_with = "interactive"
    )]
    pub prompt: Option<String>,
    /// Read prompts from stdin, one per line, until EOF.
    #[arg(long)]
    pub interactive: bool,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn generate(
    file: &Path,
    overrides: &[String],
    cache_dir: &Path,
    stage: &str,
    options: &GenerateOptions,
) -> i32 {
    let loaded = match load_stage_model(file, overrides, cache_dir, stage) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let settings = GenerationSettings {
        max_new_tokens: options.max_new_tokens,
        temperature: options.temperature,
        top_k: options.top_k,
        top_p: options.top_p,
        eos_token_ids: loaded.eos_token_ids.clone(),
        stop_strings: Vec::new(),
        seed: options.seed,
        pad_token_id: loaded.special.pad,
    };
    if let Some(prompt) = options.prompt.as_deref().filter(|_| !options.interactive) {
        return answer(&loaded, prompt, &settings);
    }
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!("{stage}: one prompt per line, Ctrl-D to quit");
    }
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let mut line = String::new();
        match stdin.lock().read_line(&mut line) {
            Ok(0) => return exit::OK,
            Ok(_) => {}
            Err(e) => {
                print_error(&format!("cannot read stdin: {e}"), None);
                return exit::STAGE_FAILED;
            }
        }
        let prompt = line.trim_end_matches(['\n', '\r']);
        if prompt.trim().is_empty() {
            continue;
        }
        let code = answer(&loaded, &unescape(prompt), &settings);
        if code != exit::OK {
            return code;
        }
    }
}

fn answer(loaded: &LoadedModel, prompt: &str, settings: &GenerationSettings) -> i32 {
    match complete_prompt(loaded, prompt, settings) {
        Ok(text) => {
            println!("{text}");
            let _ = std::io::stdout().flush();
            exit::OK
        }
        Err(e) => {
            print_error(&format!("generation failed: {e}"), None);
            exit::STAGE_FAILED
        }
    }
}

/// The model output of a cached stage, loaded; errors say to run the stage first.
fn load_stage_model(
    file: &Path,
    overrides: &[String],
    cache_dir: &Path,
    stage: &str,
) -> Result<LoadedModel, i32> {
    let workspace = Workspace::open(file, overrides, cache_dir)?;
    let checked = workspace.stage(stage)?;
    let model_kinds = [
        ArtifactKind::Model,
        ArtifactKind::Adapter,
        ArtifactKind::RewardModel,
    ];
    let Some(output) = checked
        .outputs
        .iter()
        .find(|o| model_kinds.contains(&o.kind))
    else {
        print_error(
            &format!("stage `{stage}` ({}) has no model output to generate with", checked.kind),
            Some("name a stage that writes a model, an adapter or a reward model (load_pretrained, sft, ppo, ...)"),
        );
        return Err(exit::INVALID);
    };
    let cache = &workspace.cache;
    let statuses = workspace
        .engine()
        .status(&workspace.pipeline)
        .map_err(|e| print_run_error(&e))?;
    let status = statuses.into_iter().find(|s| s.stage == stage);
    let record = status
        .as_ref()
        .filter(|s| s.status == State::Cached)
        .and_then(|s| s.key.as_deref())
        .and_then(|k| cache.read_record(k).ok().flatten());
    let Some(digest) = record.as_ref().and_then(|r| r.outputs.get(&output.name)) else {
        let reasons = status.map(|s| s.reasons.join("; ")).unwrap_or_default();
        print_error(
            &format!("stage `{stage}` is not cached ({reasons})"),
            Some(&format!(
                "run it first: `rlhf run {} --until {stage}`",
                file.display()
            )),
        );
        return Err(exit::STAGE_FAILED);
    };
    let lookup =
        |d: &str| -> Option<PathBuf> { Some(cache.artifact_path(d)).filter(|p| p.is_dir()) };
    load_model(&cache.artifact_path(digest), &lookup).map_err(|e| {
        print_error(
            &format!("cannot load the model of stage `{stage}`: {e}"),
            None,
        );
        exit::STAGE_FAILED
    })
}

/// `\n`, `\t` and `\\` in an interactive line become a newline, a tab and a backslash.
fn unescape(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}
