//! `rlhf cache verify`: rehash every artifact against its digest, remove the damaged
//! ones and the records that point at them, so the next run recomputes them.

use crate::artifact::{compare_with_manifest, ArtifactHealth};
use crate::digest::Digest;
use crate::error::CacheError;
use crate::store::Cache;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What [`Cache::verify`] found and removed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerifyReport {
    /// Artifacts rehashed.
    pub checked: usize,
    /// Damaged or missing artifacts (removed), with the reason naming the file.
    pub damaged: Vec<(Digest, String)>,
    /// Keys of records removed because an output was damaged or missing.
    pub removed_records: Vec<String>,
    /// Unreadable record files (removed).
    pub corrupt_records: Vec<PathBuf>,
}

impl Cache {
    /// Full rehash of every artifact. Damaged ones (and object dirs whose commit never
    /// finished) are quarantined and deleted; records whose outputs are damaged or missing
    /// are removed, as are corrupt records. Takes the exclusive cache lock:
    /// [`CacheError::Busy`] while a run holds the cache; the caller must not hold a
    /// [`crate::CacheLock`] itself.
    pub fn verify(&self) -> Result<VerifyReport, CacheError> {
        let _exclusive = self.exclusive_or_busy()?;
        let mut report = VerifyReport::default();
        let mut damaged: BTreeMap<Digest, String> = BTreeMap::new();
        for digest in self.object_digests()? {
            report.checked += 1;
            if let Some(reason) = self.rehash_artifact(&digest) {
                self.remove_artifact(&digest)?;
                damaged.insert(digest, reason);
            }
        }
        for key in self.record_keys()? {
            let record = match self.read_record(&key) {
                Ok(Some(record)) => record,
                Ok(None) => continue,
                Err(CacheError::CorruptRecord { path, .. }) => {
                    self.remove_record(&key)?;
                    report.corrupt_records.push(path);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut broken = false;
            for digest in record.outputs.values() {
                if damaged.contains_key(digest) {
                    broken = true;
                } else if self.check_artifact(digest) != ArtifactHealth::Ok {
                    damaged.insert(
                        digest.clone(),
                        format!("missing (output of record `{key}`)"),
                    );
                    broken = true;
                }
            }
            if broken {
                self.remove_record(&key)?;
                report.removed_records.push(key);
            }
        }
        report.damaged = damaged.into_iter().collect();
        Ok(report)
    }

    /// `None` when the artifact rehashes to its digest, otherwise why not.
    fn rehash_artifact(&self, digest: &str) -> Option<String> {
        let directory = self.artifact_path(digest);
        match self.read_manifest(digest) {
            Ok(None) => Some(format!(
                "{}: no manifest (interrupted commit)",
                directory.display()
            )),
            Err(e) => Some(e.to_string()),
            Ok(Some(manifest)) => match compare_with_manifest(&directory, &manifest, true) {
                Ok(reason) => reason,
                Err(e) => Some(e.to_string()),
            },
        }
    }
}
