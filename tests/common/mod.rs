//! Shared by the end-to-end tests: a throwaway project folder with its own cache, and
//! helpers that drive the real `rlhf` binary and read what a user sees (the JSON lines
//! of `--json`, stderr, exit codes, files).
#![allow(dead_code)] // each test file uses a different subset

use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const RLHF: &str = env!("CARGO_BIN_EXE_rlhf");

/// A temp folder holding a pipeline `p.yaml`, its inputs, and the cache `cache/`.
pub struct Project {
    pub dir: tempfile::TempDir,
}

/// The result of one `rlhf` invocation.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The `--json` lines, one object per stage.
    pub fn stages(&self) -> Vec<Json> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect()
    }

    /// Stage name → `status` (ran, cached, failed, skipped, ...), from `--json`.
    pub fn statuses(&self) -> BTreeMap<String, String> {
        self.stages()
            .iter()
            .map(|s| {
                (
                    s["stage"].as_str().unwrap().to_string(),
                    s["status"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Stage name → key, from `--json`.
    pub fn keys(&self) -> BTreeMap<String, String> {
        self.stages()
            .iter()
            .map(|s| {
                (
                    s["stage"].as_str().unwrap().to_string(),
                    s["key"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Names of the stages with this status, sorted.
    pub fn with_status(&self, status: &str) -> Vec<String> {
        self.statuses()
            .into_iter()
            .filter(|(_, s)| s == status)
            .map(|(n, _)| n)
            .collect()
    }

    /// The (only) output directory of `stage`, from `--json`.
    pub fn output_dir(&self, stage: &str) -> PathBuf {
        let stages = self.stages();
        let s = stages
            .iter()
            .find(|s| s["stage"] == stage)
            .unwrap_or_else(|| panic!("no stage {stage} in {}", self.stdout));
        let outputs = s["outputs"].as_object().unwrap();
        assert_eq!(outputs.len(), 1, "{stage} has several outputs");
        PathBuf::from(outputs.values().next().unwrap()["path"].as_str().unwrap())
    }

    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

pub fn names(list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

impl Project {
    pub fn new() -> Self {
        Project {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn cache(&self) -> PathBuf {
        self.path("cache")
    }

    pub fn write(&self, relative: &str, text: &str) {
        let path = self.path(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, text).unwrap();
    }

    pub fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.path(relative)).unwrap_or_default()
    }

    /// `rlhf ARGS --cache-dir cache`, in the project folder, with a quiet environment.
    pub fn command(&self, args: &[&str]) -> Command {
        self.command_with_cache(args, &self.cache())
    }

    /// Like [`Project::command`] with another cache folder.
    pub fn command_with_cache(&self, args: &[&str], cache: &Path) -> Command {
        let mut command = Command::new(RLHF);
        command
            .args(args)
            .arg("--cache-dir")
            .arg(cache)
            .current_dir(self.dir.path())
            .env_remove("RLHF_LOG")
            .env_remove("RLHF_CACHE_DIR")
            .env("RAYON_NUM_THREADS", "1");
        command
    }

    pub fn rlhf(&self, args: &[&str]) -> Run {
        self.rlhf_with(self.command(args))
    }

    pub fn rlhf_with(&self, mut command: Command) -> Run {
        let output: Output = command.output().expect("run rlhf");
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// `rlhf run p.yaml --json EXTRA...`
    pub fn run(&self, extra: &[&str]) -> Run {
        let mut args = vec!["run", "p.yaml", "--json"];
        args.extend_from_slice(extra);
        self.rlhf(&args)
    }

    /// Every stage name appended to `runs.log` (stages built by [`stage`] log themselves).
    pub fn executions(&self) -> Vec<String> {
        self.read("runs.log").lines().map(str::to_string).collect()
    }

    /// Number of stage records in the cache (0 when there is no cache at all).
    pub fn records(&self) -> usize {
        count_entries(&self.cache().join("v1/records"), ".json")
    }

    /// stderr with the project folder replaced by `[DIR]`, for comparing messages.
    pub fn filter(&self, text: &str) -> String {
        let dir = self.dir.path().display().to_string();
        let canonical = std::fs::canonicalize(self.dir.path())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        text.replace(&canonical, "[DIR]").replace(&dir, "[DIR]")
    }
}

fn count_entries(dir: &Path, suffix: &str) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(suffix))
                .count()
        })
        .unwrap_or(0)
}

/// A `command` stage whose program appends the stage name to `runs.log` (outside the
/// cache, so tests can count executions), then runs `script` with `{out}` etc.
/// `inputs` is YAML flow-map text (e.g. `"{ a: a }"`), `params` likewise.
pub fn stage(name: &str, script: &str, inputs: &str, params: &str) -> String {
    let script = format!("echo {name} >> runs.log; {script}");
    format!(
        "  {name}:\n    kind: command\n    run: [sh, -c, '{}']\n    inputs: {inputs}\n    params: {params}\n    outputs: [f.txt]\n",
        script.replace('\'', "''")
    )
}

/// A pipeline file text from stage blocks built with [`stage`].
pub fn pipeline(stages: &[String]) -> String {
    format!("name: test\nseed: 7\nstages:\n{}", stages.concat())
}

/// The diamond used by most cache tests, reading the external file `raw.txt`:
///
/// ```text
///        ┌─ b ─┐
/// raw ─ a      d        e ← a (a sibling branch)
///        └─ c ─┘
/// ```
pub fn diamond() -> String {
    pipeline(&diamond_stages())
}

/// The stage blocks of [`diamond`], in file order.
pub fn diamond_stages() -> Vec<String> {
    vec![
        stage(
            "a",
            "cat {inputs.raw} > {out}/f.txt; echo n={params.n} >> {out}/f.txt",
            "{ raw: raw.txt }",
            "{ n: 3 }",
        ),
        stage(
            "b",
            "cat {inputs.a}/f.txt > {out}/f.txt; echo b{params.m} >> {out}/f.txt",
            "{ a: a }",
            "{ m: 1 }",
        ),
        stage(
            "c",
            "cat {inputs.a}/f.txt > {out}/f.txt; echo c >> {out}/f.txt",
            "{ a: a }",
            "{}",
        ),
        stage(
            "d",
            "cat {inputs.b}/f.txt {inputs.c}/f.txt > {out}/f.txt",
            "{ b: b, c: c }",
            "{}",
        ),
        stage(
            "e",
            "cat {inputs.a}/f.txt > {out}/f.txt; echo e >> {out}/f.txt",
            "{ a: a }",
            "{}",
        ),
    ]
}

/// A project holding the diamond pipeline as `p.yaml` and `raw.txt`.
pub fn diamond_project() -> Project {
    let project = Project::new();
    project.write("raw.txt", "hello\n");
    project.write("p.yaml", &diamond());
    project
}
