//! The `rlhf` command line: parses arguments, wires the stage registry, the cache and
//! the hub into the engine, and prints results. Everything else lives in the crates.

mod commands;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "rlhf",
    version,
    about = "Run RLHF recipes written as YAML pipelines: a cached, content-addressed DAG of stages"
)]
struct Cli {
    /// Cache folder (default: .rlhf in the working directory).
    #[arg(long, global = true, env = "RLHF_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Options shared by the commands that read a pipeline.
#[derive(clap::Args, Clone)]
struct PipelineArgs {
    /// The pipeline file.
    file: PathBuf,
    /// Override a parameter: STAGE.KEY=VALUE (nested: ppo.kl.coef=0.1).
    #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the stages that are not cached yet.
    Run {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Rerun this stage even if cached (repeatable).
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Run only this stage and what it depends on.
        #[arg(long, value_name = "STAGE")]
        until: Option<String>,
        /// After a failure, go on with stages that do not depend on it.
        #[arg(long)]
        keep_going: bool,
        /// Refuse to run if an external input differs from the lock file.
        #[arg(long)]
        locked: bool,
        /// Recompute cached stages and check they reproduce the recorded digests.
        #[arg(long)]
        verify: bool,
        /// Compute threads per stage (default: all cores). Not part of any key.
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        /// One JSON object per stage on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Per stage: cached, or stale with the reason, or blocked.
    Status {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[arg(long)]
        json: bool,
    },
    /// Print the stage graph.
    Dag {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[arg(long, value_enum, default_value = "text")]
        format: DagFormat,
    },
    /// Check a pipeline file without running anything.
    Validate {
        #[command(flatten)]
        pipeline: PipelineArgs,
    },
    /// Print the JSON Schema of pipeline files.
    Schema,
    /// Output paths and metrics of a cached stage.
    Show {
        #[command(flatten)]
        pipeline: PipelineArgs,
        stage: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a static HTML report: every cached stage's curves and the evaluation tables.
    Report {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Output folder (default: <pipeline dir>/<name>-report).
        #[arg(short = 'o', long = "output", value_name = "DIR")]
        output: Option<PathBuf>,
    },
    /// Complete a prompt with the model of a cached stage, through its template.
    Generate {
        #[command(flatten)]
        pipeline: PipelineArgs,
        stage: String,
        #[command(flatten)]
        options: commands::generate::GenerateOptions,
    },
    /// Serve the page where people label the pairs of a `human`-judged stage (127.0.0.1).
    Label {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// The `collect_preferences` stage whose judge is `human`.
        #[arg(long, value_name = "STAGE")]
        stage: String,
        /// Port on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value_t = 8765)]
        port: u16,
        /// Put this labeller's name in the printed URL.
        #[arg(long, value_name = "NAME")]
        labeller: Option<String>,
    },
    /// Inspect and maintain the cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// List cached stage records and artifacts.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Delete what no registered lock file references. Dry run unless --apply.
    Gc {
        /// Actually delete (without it, only report what would go).
        #[arg(long)]
        apply: bool,
        #[arg(long)]
        json: bool,
    },
    /// Rehash every artifact; remove damaged ones so the next run recomputes them.
    Verify {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

fn main() -> ExitCode {
    // candle 0.11's own worker pool spins on barriers; on 2 busy cores it ate half the
    // time of training (measured: forward+backward 3.7x faster with it off). gemm keeps
    // using rayon's threads, so nothing is lost.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    restore_default_sigpipe();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RLHF_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let cache_dir = cli.cache_dir.unwrap_or_else(|| PathBuf::from(".rlhf"));
    let code = match cli.command {
        Command::Run {
            pipeline,
            force,
            until,
            keep_going,
            locked,
            verify,
            threads,
            json,
        } => {
            let options = rlhf_engine::run::RunOptions {
                force: force.into_iter().collect(),
                until,
                keep_going,
                locked,
                verify,
                threads: threads.unwrap_or_else(default_threads),
                progress: None,
            };
            commands::run::run(&pipeline.file, &pipeline.set, &cache_dir, &options, json)
        }
        Command::Status { pipeline, json } => {
            commands::status::status(&pipeline.file, &pipeline.set, &cache_dir, json)
        }
        Command::Dag { pipeline, format } => {
            commands::inspect::dag(&pipeline.file, &pipeline.set, format_name(format))
        }
        Command::Validate { pipeline } => {
            commands::inspect::validate(&pipeline.file, &pipeline.set)
        }
        Command::Schema => commands::inspect::schema(),
        Command::Show {
            pipeline,
            stage,
            json,
        } => commands::status::show(&pipeline.file, &pipeline.set, &cache_dir, &stage, json),
        Command::Report { pipeline, output } => {
            commands::report::report(&pipeline.file, &pipeline.set, &cache_dir, output.as_deref())
        }
        Command::Generate {
            pipeline,
            stage,
            options,
        } => commands::generate::generate(
            &pipeline.file,
            &pipeline.set,
            &cache_dir,
            &stage,
            &options,
        ),
        Command::Label {
            pipeline,
            stage,
            port,
            labeller,
        } => commands::label::label(
            &pipeline.file,
            &pipeline.set,
            &commands::label::LabelOptions {
                stage,
                port,
                labeller,
            },
        ),
        Command::Cache { command } => match command {
            CacheCommand::Ls { json } => commands::cache::ls(&cache_dir, json),
            CacheCommand::Gc { apply, json } => commands::cache::gc(&cache_dir, apply, json),
            CacheCommand::Verify { json } => commands::cache::verify(&cache_dir, json),
        },
    };
    ExitCode::from(code as u8)
}

fn format_name(format: DagFormat) -> &'static str {
    match format {
        DagFormat::Text => "text",
        DagFormat::Dot => "dot",
        DagFormat::Mermaid => "mermaid",
    }
}

fn default_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// Rust ignores SIGPIPE, so `rlhf schema | head` would panic on the closed pipe; like
/// other command-line tools, end quietly instead.
fn restore_default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread starts; it only resets the
    // disposition of one signal to the system default.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
