//! The executor: walks a checked pipeline in topological order, computes each stage's
//! key from the content of its inputs, reuses the cached outputs when the key has a
//! healthy record, and otherwise runs the stage in scratch space and commits its
//! outputs atomically. Writes the lock file at the end.

use crate::check::{CheckedStage, Pipeline, Source};
use crate::context::{ArtifactLookup, InputArtifact, StageContext};
use crate::hub::HubResolver;
use crate::key::stage_key;
use crate::lockfile::{self, LockFile, LockedExternal, LockedStage, LOCK_FORMAT};
use crate::metrics::MetricsSink;
use crate::progress::{Progress, ProgressStyleKind};
use crate::registry::Registry;
use crate::stage::StageError;
use rlhf_cache::{ArtifactHealth, Cache, Record, RECORD_FORMAT};
use serde::Serialize;
use serde_json::Value as Json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;

/// Exit codes of `rlhf`, shared by every command.
pub mod exit {
    pub const OK: i32 = 0;
    /// A stage failed, or `--verify` found a stage that does not reproduce.
    pub const STAGE_FAILED: i32 = 1;
    /// The pipeline or the command line is invalid; nothing ran.
    pub const INVALID: i32 = 2;
    /// A stage waits for a person (e.g. human labels); rerun once they are given.
    pub const WAITING: i32 = 3;
}

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub force: BTreeSet<String>,
    pub until: Option<String>,
    pub keep_going: bool,
    pub locked: bool,
    pub verify: bool,
    pub threads: usize,
    pub progress: Option<ProgressStyleKind>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ran,
    Cached,
    Verified,
    Mismatch,
    Failed,
    Skipped,
    Waiting,
}

#[derive(Clone, Debug, Serialize)]
pub struct OutputInfo {
    pub digest: String,
    pub path: PathBuf,
}

/// What happened to one stage; printed as one JSON object per stage by `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    pub stage: String,
    pub kind: String,
    pub status: Outcome,
    pub key: Option<String>,
    pub seconds: f64,
    pub outputs: BTreeMap<String, OutputInfo>,
    pub metrics: Json,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// Where the stage's logs are kept (failed stages keep theirs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_dir: Option<PathBuf>,
}

#[derive(Debug, Default)]
pub struct RunReport {
    pub stages: Vec<StageReport>,
    /// Warnings that did not stop the run (e.g. a corrupt record treated as a miss).
    pub warnings: Vec<String>,
}

impl RunReport {
    pub fn exit_code(&self) -> i32 {
        let has = |o: Outcome| self.stages.iter().any(|s| s.status == o);
        if has(Outcome::Failed) || has(Outcome::Mismatch) {
            exit::STAGE_FAILED
        } else if has(Outcome::Waiting) {
            exit::WAITING
        } else {
            exit::OK
        }
    }
}

/// Problems found before any stage runs (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{message}")]
    Invalid {
        message: String,
        hint: Option<String>,
    },
    #[error(transparent)]
    Cache(#[from] rlhf_cache::CacheError),
    #[error(transparent)]
    Lock(#[from] lockfile::LockError),
}

impl RunError {
    fn invalid(message: impl Into<String>, hint: impl Into<String>) -> Self {
        RunError::Invalid {
            message: message.into(),
            hint: Some(hint.into()),
        }
    }
}

/// The engine with its registry, cache and (optional) hub access.
pub struct Engine<'a> {
    pub registry: &'a Registry,
    pub cache: Cache,
    pub hub: Option<&'a dyn HubResolver>,
}

/// An external input resolved to local content.
#[derive(Clone, Debug)]
pub(crate) struct ResolvedExternal {
    pub path: PathBuf,
    pub digest: String,
    pub revision: Option<String>,
}

struct CacheLookup(Cache);

impl ArtifactLookup for CacheLookup {
    fn artifact_path(&self, digest: &str) -> Option<PathBuf> {
        (self.0.check_artifact(digest) == ArtifactHealth::Ok).then(|| self.0.artifact_path(digest))
    }
}

impl<'a> Engine<'a> {
    pub fn new(registry: &'a Registry, cache: Cache, hub: Option<&'a dyn HubResolver>) -> Self {
        Engine {
            registry,
            cache,
            hub,
        }
    }

    /// Checks `--force`/`--until` names against the pipeline.
    fn check_names(&self, pipeline: &Pipeline, options: &RunOptions) -> Result<(), RunError> {
        let names: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
        for name in options.force.iter().chain(options.until.iter()) {
            if !names.contains(&name.as_str()) {
                let hint = match crate::diagnostic::nearest(name, names.iter().copied()) {
                    Some(n) => format!("did you mean `{n}`?"),
                    None => format!("stages: {}", names.join(", ")),
                };
                return Err(RunError::invalid(
                    format!("no stage named `{name}` in {}", pipeline.file.display()),
                    hint,
                ));
            }
        }
        Ok(())
    }

    /// The stages a run with these options considers.
    pub fn selected(&self, pipeline: &Pipeline, options: &RunOptions) -> BTreeSet<String> {
        match &options.until {
            Some(until) => pipeline.ancestors_and_self(until),
            None => pipeline.stages.iter().map(|s| s.name.clone()).collect(),
        }
    }

    /// Resolves and hashes every external input of the selected stages. A reference
    /// that cannot be resolved is reported against the stages that need it.
    pub(crate) fn resolve_externals(
        &self,
        pipeline: &Pipeline,
        selected: &BTreeSet<String>,
    ) -> BTreeMap<String, Result<ResolvedExternal, (String, Option<String>)>> {
        let mut resolved = BTreeMap::new();
        for stage in pipeline
            .stages
            .iter()
            .filter(|s| selected.contains(&s.name))
        {
            for input in &stage.inputs {
                if resolved.contains_key(&input.reference) {
                    continue;
                }
                let result = match &input.source {
                    Source::Stage { .. } => continue,
                    Source::Path(path) => self
                        .cache
                        .digest_external(path)
                        .map(|digest| ResolvedExternal {
                            path: path.clone(),
                            digest,
                            revision: None,
                        })
                        .map_err(|e| (format!("cannot read `{}`: {e}", input.reference), None)),
                    Source::Hub(reference) => self.resolve_hub(reference),
                };
                resolved.insert(input.reference.clone(), result);
            }
        }
        resolved
    }

    fn resolve_hub(&self, reference: &str) -> Result<ResolvedExternal, (String, Option<String>)> {
        let Some(hub) = self.hub else {
            return Err((
                format!("`{reference}`: this build has no hub access"),
                Some("point the reference at a local folder".into()),
            ));
        };
        let resolved = hub.resolve(reference).map_err(|e| (e.message, e.hint))?;
        let digest = self
            .cache
            .digest_external(&resolved.local_path)
            .map_err(|e| {
                (
                    format!("cannot read the local copy of `{reference}`: {e}"),
                    None,
                )
            })?;
        Ok(ResolvedExternal {
            path: resolved.local_path,
            digest,
            revision: Some(resolved.revision),
        })
    }

    /// Runs the pipeline; see [`RunOptions`].
    pub fn run(&self, pipeline: &Pipeline, options: &RunOptions) -> Result<RunReport, RunError> {
        self.check_names(pipeline, options)?;
        let _shared = self.cache.lock_shared()?;
        let lock_path = lockfile::lock_path(&pipeline.file);
        let old_lock = read_lock(&lock_path)?;
        let selected = self.selected(pipeline, options);
        let externals = self.resolve_externals(pipeline, &selected);
        if options.locked {
            check_locked(&lock_path, old_lock.as_ref(), &externals)?;
        }
        let mut report = RunReport::default();
        let mut produced: BTreeMap<(String, String), String> = BTreeMap::new();
        let mut stopped = false;
        for stage in pipeline
            .stages
            .iter()
            .filter(|s| selected.contains(&s.name))
        {
            let stage_report = if stopped {
                skipped(stage, "not started: an earlier stage failed (use --keep-going to run independent stages)")
            } else {
                self.run_stage(
                    stage,
                    options,
                    &externals,
                    &produced,
                    &report.stages,
                    &mut report.warnings,
                )
            };
            for (name, info) in &stage_report.outputs {
                produced.insert((stage.name.clone(), name.clone()), info.digest.clone());
            }
            if matches!(stage_report.status, Outcome::Failed | Outcome::Waiting)
                && !options.keep_going
            {
                stopped = true;
            }
            report.stages.push(stage_report);
        }
        let lock = updated_lock(pipeline, old_lock, &report, &externals);
        lockfile::write(&lock_path, &lock)?;
        if let Ok(absolute) = std::fs::canonicalize(&lock_path) {
            self.cache.register_root(&absolute)?;
        }
        Ok(report)
    }

    fn run_stage(
        &self,
        stage: &CheckedStage,
        options: &RunOptions,
        externals: &BTreeMap<String, Result<ResolvedExternal, (String, Option<String>)>>,
        produced: &BTreeMap<(String, String), String>,
        so_far: &[StageReport],
        warnings: &mut Vec<String>,
    ) -> StageReport {
        if let Some(blocker) = stage.upstream().into_iter().find(|u| {
            so_far.iter().any(|r| {
                &r.stage == u
                    && !matches!(
                        r.status,
                        Outcome::Ran | Outcome::Cached | Outcome::Verified | Outcome::Mismatch
                    )
            })
        }) {
            return skipped(
                stage,
                &format!("skipped: upstream stage `{blocker}` did not finish"),
            );
        }
        let inputs = match self.stage_inputs(stage, externals, produced) {
            Ok(inputs) => inputs,
            Err((message, hint)) => return failed(stage, None, message, hint, None, 0.0),
        };
        let digests: BTreeMap<String, String> = inputs
            .iter()
            .map(|(k, v)| (k.clone(), v.digest.clone()))
            .collect();
        let key = stage_key(stage, &digests);
        let key_lock = match self.cache.lock_key(&key) {
            Ok(l) => l,
            Err(e) => return failed(stage, Some(&key), e.to_string(), None, None, 0.0),
        };
        let cached = if options.force.contains(&stage.name) {
            None
        } else {
            self.cached_record(&key, warnings)
        };
        let report = match cached {
            Some(record) if options.verify => {
                self.verify_stage(stage, &key, inputs, &record, options)
            }
            Some(record) => cached_report(stage, &self.cache, &record),
            None => self.execute(stage, &key, inputs, &digests, options),
        };
        drop(key_lock);
        report
    }

    /// A record for `key` whose outputs are all present and undamaged.
    fn cached_record(&self, key: &str, warnings: &mut Vec<String>) -> Option<Record> {
        match self.cache.read_record(key) {
            Ok(Some(record)) => {
                for digest in record.outputs.values() {
                    match self.cache.check_artifact(digest) {
                        ArtifactHealth::Ok => {}
                        ArtifactHealth::Missing => {
                            warnings.push(format!("artifact {digest} recorded for key {} is missing from the cache; recomputing", short(key)));
                            return None;
                        }
                        ArtifactHealth::Damaged(reason) => {
                            warnings.push(format!(
                                "artifact {digest} is damaged ({reason}); recomputing"
                            ));
                            let _ = self.cache.remove_artifact(digest);
                            return None;
                        }
                    }
                }
                Some(record)
            }
            Ok(None) => None,
            Err(e) => {
                warnings.push(format!("{e}"));
                None
            }
        }
    }

    fn stage_inputs(
        &self,
        stage: &CheckedStage,
        externals: &BTreeMap<String, Result<ResolvedExternal, (String, Option<String>)>>,
        produced: &BTreeMap<(String, String), String>,
    ) -> Result<BTreeMap<String, InputArtifact>, (String, Option<String>)> {
        let mut inputs = BTreeMap::new();
        for input in &stage.inputs {
            let artifact = match &input.source {
                Source::Stage {
                    stage: upstream,
                    output,
                } => {
                    let digest = produced.get(&(upstream.clone(), output.clone())).ok_or_else(|| {
                        (format!("input `{}` of stage `{}`: stage `{upstream}` has not produced `{output}`", input.name, stage.name), None)
                    })?;
                    InputArtifact {
                        path: self.cache.artifact_path(digest),
                        kind: input.kind,
                        digest: digest.clone(),
                        reference: input.reference.clone(),
                    }
                }
                Source::Path(_) | Source::Hub(_) => {
                    let resolved =
                        externals
                            .get(&input.reference)
                            .cloned()
                            .unwrap_or_else(|| {
                                Err((format!("`{}` was not resolved", input.reference), None))
                            })?;
                    InputArtifact {
                        path: resolved.path,
                        kind: None,
                        digest: resolved.digest,
                        reference: input.reference.clone(),
                    }
                }
            };
            inputs.insert(input.name.clone(), artifact);
        }
        Ok(inputs)
    }

    /// Runs the stage's kind with fresh output dirs; `scratch` persists across kills.
    fn invoke(
        &self,
        stage: &CheckedStage,
        key: &str,
        inputs: BTreeMap<String, InputArtifact>,
        scratch: PathBuf,
        options: &RunOptions,
    ) -> Result<(Vec<(String, rlhf_cache::StagingDir)>, Json), (String, Option<String>, bool)> {
        let kind = self
            .registry
            .get(&stage.kind)
            .ok_or_else(|| (format!("unknown stage kind `{}`", stage.kind), None, false))?;
        let log_dir = self
            .cache
            .log_dir(key)
            .map_err(|e| (e.to_string(), None, false))?;
        let mut staging = Vec::new();
        for output in &stage.outputs {
            let dir = self
                .cache
                .staging_dir()
                .map_err(|e| (e.to_string(), None, false))?;
            staging.push((output.name.clone(), dir));
        }
        let timings = log_dir.join("timings.jsonl");
        let _ = std::fs::remove_file(&timings);
        let metrics = MetricsSink::new(
            staging.first().map(|(_, d)| d.path().to_path_buf()),
            Some(timings),
        );
        let style = options.progress.unwrap_or_else(ProgressStyleKind::detect);
        let mut ctx = StageContext::new(&stage.name, &stage.kind, stage.seed, scratch, log_dir)
            .with_metrics(metrics)
            .with_progress(Progress::new(&stage.name, style))
            .with_threads(options.threads)
            .with_lookup(Box::new(CacheLookup(self.cache.clone())));
        for (name, input) in inputs {
            ctx = ctx.with_input(&name, input);
        }
        for (name, dir) in &staging {
            ctx = ctx.with_output(name, dir.path().to_path_buf());
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            kind.run(&stage.params, &mut ctx)
        }));
        let result = match result {
            Ok(r) => r,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(StageError::failed(format!(
                    "stage `{}` panicked: {what}",
                    stage.name
                )))
            }
        };
        match result {
            Ok(()) => {
                ctx.metrics
                    .finish()
                    .map_err(|e| (e.to_string(), None, false))?;
                let summary = Json::Object(ctx.metrics.summary().clone());
                Ok((staging, summary))
            }
            Err(StageError::Waiting { message }) => Err((message, None, true)),
            Err(e) => {
                let hint = e.hint().map(str::to_string);
                let _ = std::fs::write(ctx.log_dir.join("error.txt"), format!("{e}\n"));
                Err((e.to_string(), hint, false))
            }
        }
    }

    fn execute(
        &self,
        stage: &CheckedStage,
        key: &str,
        inputs: BTreeMap<String, InputArtifact>,
        digests: &BTreeMap<String, String>,
        options: &RunOptions,
    ) -> StageReport {
        let started = Instant::now();
        let scratch = match self.cache.scratch_dir(key) {
            Ok(s) => s,
            Err(e) => return failed(stage, Some(key), e.to_string(), None, None, 0.0),
        };
        let log_dir = self.cache.log_dir(key).ok();
        let (staging, metrics) = match self.invoke(stage, key, inputs, scratch, options) {
            Ok(done) => done,
            Err((message, hint, waiting)) => {
                let mut r = failed(
                    stage,
                    Some(key),
                    message,
                    hint,
                    log_dir,
                    started.elapsed().as_secs_f64(),
                );
                if waiting {
                    r.status = Outcome::Waiting;
                }
                return r;
            }
        };
        let mut outputs = BTreeMap::new();
        for (name, dir) in staging {
            match self.cache.commit_artifact(dir) {
                Ok(digest) => {
                    outputs.insert(
                        name,
                        OutputInfo {
                            path: self.cache.artifact_path(&digest),
                            digest,
                        },
                    );
                }
                Err(e) => {
                    return failed(
                        stage,
                        Some(key),
                        format!("cannot store output `{name}`: {e}"),
                        None,
                        log_dir,
                        0.0,
                    )
                }
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let record = Record {
            format: RECORD_FORMAT,
            key: key.to_string(),
            stage: stage.name.clone(),
            kind: stage.kind.clone(),
            params: stage.params.clone(),
            inputs: digests.clone(),
            outputs: outputs
                .iter()
                .map(|(k, v)| (k.clone(), v.digest.clone()))
                .collect(),
            metrics: metrics.clone(),
            seconds,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        if let Err(e) = self.cache.write_record(&record) {
            return failed(
                stage,
                Some(key),
                format!("cannot write the cache record: {e}"),
                None,
                log_dir,
                seconds,
            );
        }
        let _ = self.cache.clear_scratch(key);
        StageReport {
            stage: stage.name.clone(),
            kind: stage.kind.clone(),
            status: Outcome::Ran,
            key: Some(key.to_string()),
            seconds,
            outputs,
            metrics,
            message: None,
            hint: None,
            log_dir: None,
        }
    }

    /// Recomputes a cached stage in throwaway space and compares output digests.
    fn verify_stage(
        &self,
        stage: &CheckedStage,
        key: &str,
        inputs: BTreeMap<String, InputArtifact>,
        record: &Record,
        options: &RunOptions,
    ) -> StageReport {
        let started = Instant::now();
        let scratch = match self.cache.staging_dir() {
            Ok(s) => s,
            Err(e) => return failed(stage, Some(key), e.to_string(), None, None, 0.0),
        };
        let mut report = cached_report(stage, &self.cache, record);
        report.seconds = 0.0;
        match self.invoke(stage, key, inputs, scratch.path().to_path_buf(), options) {
            Err((message, hint, _)) => {
                return failed(
                    stage,
                    Some(key),
                    message,
                    hint,
                    None,
                    started.elapsed().as_secs_f64(),
                )
            }
            Ok((staging, _)) => {
                let mut mismatches = Vec::new();
                for (name, dir) in &staging {
                    let recorded = record.outputs.get(name).cloned().unwrap_or_default();
                    match rlhf_cache::digest_dir(dir.path()) {
                        Ok(got) if got == recorded => {}
                        Ok(got) => mismatches.push(format!(
                            "output `{name}`: recorded {recorded}, recomputed {got}"
                        )),
                        Err(e) => mismatches.push(format!("output `{name}`: {e}")),
                    }
                }
                report.seconds = started.elapsed().as_secs_f64();
                if mismatches.is_empty() {
                    report.status = Outcome::Verified;
                } else {
                    report.status = Outcome::Mismatch;
                    report.message = Some(format!(
                        "stage `{}` does not reproduce: {}",
                        stage.name,
                        mismatches.join("; ")
                    ));
                    report.hint = Some("the stage is not deterministic for these inputs, or the cached artifact came from another build".into());
                }
            }
        }
        report
    }
}

fn cached_report(stage: &CheckedStage, cache: &Cache, record: &Record) -> StageReport {
    StageReport {
        stage: stage.name.clone(),
        kind: stage.kind.clone(),
        status: Outcome::Cached,
        key: Some(record.key.clone()),
        seconds: 0.0,
        outputs: record
            .outputs
            .iter()
            .map(|(k, d)| {
                (
                    k.clone(),
                    OutputInfo {
                        digest: d.clone(),
                        path: cache.artifact_path(d),
                    },
                )
            })
            .collect(),
        metrics: record.metrics.clone(),
        message: None,
        hint: None,
        log_dir: None,
    }
}

fn skipped(stage: &CheckedStage, reason: &str) -> StageReport {
    StageReport {
        stage: stage.name.clone(),
        kind: stage.kind.clone(),
        status: Outcome::Skipped,
        key: None,
        seconds: 0.0,
        outputs: BTreeMap::new(),
        metrics: Json::Null,
        message: Some(reason.to_string()),
        hint: None,
        log_dir: None,
    }
}

fn failed(
    stage: &CheckedStage,
    key: Option<&str>,
    message: String,
    hint: Option<String>,
    log_dir: Option<PathBuf>,
    seconds: f64,
) -> StageReport {
    StageReport {
        stage: stage.name.clone(),
        kind: stage.kind.clone(),
        status: Outcome::Failed,
        key: key.map(str::to_string),
        seconds,
        outputs: BTreeMap::new(),
        metrics: Json::Null,
        message: Some(message),
        hint,
        log_dir,
    }
}

fn check_locked(
    lock_path: &std::path::Path,
    lock: Option<&LockFile>,
    externals: &BTreeMap<String, Result<ResolvedExternal, (String, Option<String>)>>,
) -> Result<(), RunError> {
    let Some(lock) = lock else {
        return Err(RunError::invalid(
            format!("--locked: there is no lock file {}", lock_path.display()),
            "run once without --locked to create it",
        ));
    };
    let mut differences = Vec::new();
    for (reference, resolved) in externals {
        let Ok(resolved) = resolved else { continue };
        match lock.externals.get(reference) {
            None => differences.push(format!("`{reference}` is not in the lock file")),
            Some(locked) if locked.digest != resolved.digest => differences.push(format!(
                "`{reference}` changed: locked {}, now {}",
                short(&locked.digest),
                short(&resolved.digest)
            )),
            Some(locked) if locked.revision.is_some() && locked.revision != resolved.revision => {
                differences.push(format!(
                    "`{reference}` resolved to revision {} but the lock says {}",
                    resolved.revision.clone().unwrap_or_default(),
                    locked.revision.clone().unwrap_or_default()
                ))
            }
            Some(_) => {}
        }
    }
    if differences.is_empty() {
        return Ok(());
    }
    Err(RunError::invalid(
        format!("--locked: external inputs differ from {}:\n  {}", lock_path.display(), differences.join("\n  ")),
        "restore the locked inputs, or run without --locked to accept the new ones and update the lock",
    ))
}

/// The lock file beside the pipeline; a broken one (say, merge conflict markers) makes
/// the invocation invalid (exit 2), with the way out.
pub(crate) fn read_lock(path: &std::path::Path) -> Result<Option<LockFile>, RunError> {
    lockfile::read(path).map_err(|e| match e {
        lockfile::LockError::Invalid { .. } => RunError::invalid(
            e.to_string(),
            "fix the file (e.g. resolve a merge conflict), or delete it: the next `rlhf run` writes a new one",
        ),
        other => RunError::Lock(other),
    })
}

pub(crate) fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}

/// The old lock with this run's results folded in; stages no longer in the pipeline
/// are dropped, stages this run did not reach keep their previous entries.
fn updated_lock(
    pipeline: &Pipeline,
    old: Option<LockFile>,
    report: &RunReport,
    externals: &BTreeMap<String, Result<ResolvedExternal, (String, Option<String>)>>,
) -> LockFile {
    let mut lock = old.unwrap_or_default();
    lock.lock_format = LOCK_FORMAT;
    lock.pipeline = pipeline.name.clone();
    let names: BTreeSet<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
    lock.stages.retain(|name, _| names.contains(name.as_str()));
    for r in &report.stages {
        if !matches!(r.status, Outcome::Ran | Outcome::Cached | Outcome::Verified) {
            continue;
        }
        let Some(stage) = pipeline.stage(&r.stage) else {
            continue;
        };
        let inputs = stage
            .inputs
            .iter()
            .filter_map(|i| input_digest(i, externals, report).map(|d| (i.name.clone(), d)))
            .collect();
        lock.stages.insert(
            r.stage.clone(),
            LockedStage {
                kind: r.kind.clone(),
                key: r.key.clone().unwrap_or_default(),
                inputs,
                outputs: r
                    .outputs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.digest.clone()))
                    .collect(),
            },
        );
    }
    for (reference, resolved) in externals {
        if let Ok(resolved) = resolved {
            lock.externals.insert(
                reference.clone(),
                LockedExternal {
                    digest: resolved.digest.clone(),
                    revision: resolved.revision.clone(),
                },
            );
        }
    }
    let used: BTreeSet<&str> = pipeline
        .stages
        .iter()
        .flat_map(|s| s.inputs.iter())
        .filter(|i| !matches!(i.source, Source::Stage { .. }))
        .map(|i| i.reference.as_str())
        .collect();
    lock.externals
        .retain(|reference, _| used.contains(reference.as_str()));
    lock
}

fn input_digest(
    input: &crate::check::ResolvedInput,
    externals: &BTreeMap<String, Result<ResolvedExternal, (String, Option<String>)>>,
    report: &RunReport,
) -> Option<String> {
    match &input.source {
        Source::Stage { stage, output } => report
            .stages
            .iter()
            .find(|r| &r.stage == stage)
            .and_then(|r| r.outputs.get(output))
            .map(|o| o.digest.clone()),
        _ => externals
            .get(&input.reference)
            .and_then(|r| r.as_ref().ok())
            .map(|r| r.digest.clone()),
    }
}
