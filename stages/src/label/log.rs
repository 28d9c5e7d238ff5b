//! The label log: every label and every undo is one JSON line, appended and fsynced before
//! the page hears "saved", so a crash or Ctrl-C loses nothing and a restart replays the
//! file to continue where it stopped. Undo appends an `undo` event; nothing is rewritten.
//! Also: agreement between labellers on the items several of them labelled.

use super::LabelError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Which completion of the item the page showed as "A".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    First,
    Second,
}

/// The five-way choice as the page numbers it (1 = A significantly better … 5 = B
/// significantly better), as a preference of A over B in -2..=2.
pub fn preference_of_a(choice: u8) -> Option<i8> {
    match choice {
        1 => Some(2),
        2 => Some(1),
        3 => Some(0),
        4 => Some(-1),
        5 => Some(-2),
        _ => None,
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelEvent {
    pub item: String,
    pub labeller: String,
    /// As clicked on the page (1..=5, A/B as displayed).
    pub choice: u8,
    /// The side order shown to this labeller.
    pub a_is: Side,
    /// Preference of the item's `first` over its `second` (-2..=2): `choice` mapped through
    /// `a_is`, so readers need not redo it.
    pub preference: i8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    pub unix_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UndoEvent {
    pub item: String,
    pub labeller: String,
    pub unix_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Label(LabelEvent),
    Undo(UndoEvent),
}

/// The log replayed: per labeller, the labels still standing, oldest first.
#[derive(Clone, Debug, Default)]
pub struct LabelState {
    stacks: BTreeMap<String, Vec<LabelEvent>>,
    /// Lines that did not parse (a line torn by a crash mid-write), skipped.
    pub unreadable_lines: usize,
}

impl LabelState {
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Label(label) => self
                .stacks
                .entry(label.labeller.clone())
                .or_default()
                .push(label),
            Event::Undo(undo) => {
                // Only the labeller's own last label can be undone; a stale undo is ignored.
                if let Some(stack) = self.stacks.get_mut(&undo.labeller) {
                    if stack.last().is_some_and(|l| l.item == undo.item) {
                        stack.pop();
                    }
                }
            }
        }
    }

    pub fn from_text(text: &str) -> Self {
        let mut state = LabelState::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Event>(line) {
                Ok(event) => state.apply(event),
                Err(_) => state.unreadable_lines += 1,
            }
        }
        state
    }

    /// Reads a labels file; a missing file is an empty log.
    pub fn read(path: &Path) -> Result<Self, LabelError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Self::from_text(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(LabelError::io(path, e)),
        }
    }

    /// item → labeller → the standing label (a labeller's later label of an item wins).
    pub fn standing(&self) -> BTreeMap<&str, BTreeMap<&str, &LabelEvent>> {
        let mut out: BTreeMap<&str, BTreeMap<&str, &LabelEvent>> = BTreeMap::new();
        for (labeller, stack) in &self.stacks {
            for label in stack {
                out.entry(label.item.as_str())
                    .or_default()
                    .insert(labeller.as_str(), label);
            }
        }
        out
    }

    pub fn labelled_by(&self, labeller: &str) -> BTreeSet<&str> {
        self.stacks
            .get(labeller)
            .map(|s| s.iter().map(|l| l.item.as_str()).collect())
            .unwrap_or_default()
    }

    /// The labeller's most recent standing label (what undo takes back).
    pub fn last_of(&self, labeller: &str) -> Option<&LabelEvent> {
        self.stacks.get(labeller).and_then(|s| s.last())
    }

    pub fn labellers(&self) -> Vec<&str> {
        self.stacks
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

/// Agreement between labellers over the items at least two of them labelled.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Agreement {
    /// Items with two or more labellers.
    pub shared_items: usize,
    /// Labeller pairs compared (summed over shared items).
    pub comparisons: usize,
    /// Fraction of comparisons with the same direction (A better / same / B better).
    pub direction: Option<f64>,
    /// Fraction of comparisons with the same one of the five choices.
    pub exact: Option<f64>,
}

pub fn agreement(state: &LabelState) -> Agreement {
    agreement_on(state, |_| true)
}

/// [`agreement`] over the items `keep` accepts (e.g. the items of the current run, not
/// those of an earlier policy still in the log).
pub fn agreement_on(state: &LabelState, keep: impl Fn(&str) -> bool) -> Agreement {
    let (mut shared_items, mut comparisons, mut same_direction, mut same_choice) = (0, 0, 0, 0);
    for (_, labels) in state.standing().iter().filter(|(item, _)| keep(item)) {
        let prefs: Vec<i8> = labels.values().map(|l| l.preference).collect();
        if prefs.len() < 2 {
            continue;
        }
        shared_items += 1;
        for i in 0..prefs.len() {
            for j in i + 1..prefs.len() {
                comparisons += 1;
                same_direction += usize::from(prefs[i].signum() == prefs[j].signum());
                same_choice += usize::from(prefs[i] == prefs[j]);
            }
        }
    }
    let fraction = |n: usize| (comparisons > 0).then(|| n as f64 / comparisons as f64);
    Agreement {
        shared_items,
        comparisons,
        direction: fraction(same_direction),
        exact: fraction(same_choice),
    }
}

/// The labels file opened for appending by one server, locked against a second one.
pub struct LabelLog {
    path: PathBuf,
    file: std::fs::File,
    pub state: LabelState,
}

impl LabelLog {
    pub fn open(path: &Path) -> Result<Self, LabelError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| LabelError::io(dir, e))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| LabelError::io(path, e))?;
        file.try_lock().map_err(|_| LabelError::Busy {
            path: path.to_path_buf(),
        })?;
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| LabelError::io(path, e))?;
        if !text.is_empty() && !text.ends_with('\n') {
            // A line torn by a crash: end it, so the next event starts on a line of its own.
            file.write_all(b"\n")
                .and_then(|()| file.sync_data())
                .map_err(|e| LabelError::io(path, e))?;
        }
        file.seek(SeekFrom::End(0))
            .map_err(|e| LabelError::io(path, e))?;
        let state = LabelState::from_text(&text);
        Ok(LabelLog {
            path: path.to_path_buf(),
            file,
            state,
        })
    }

    /// Appends one event and fsyncs it, then applies it to the state.
    pub fn append(&mut self, event: Event) -> Result<(), LabelError> {
        let mut line = serde_json::to_string(&event).map_err(|e| LabelError::BadLine {
            path: self.path.clone(),
            line: 0,
            message: e.to_string(),
        })?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| LabelError::io(&self.path, e))?;
        self.state.apply(event);
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(item: &str, labeller: &str, preference: i8) -> Event {
        Event::Label(LabelEvent {
            item: item.into(),
            labeller: labeller.into(),
            choice: 3,
            a_is: Side::First,
            preference,
            comment: None,
            unix_ms: 0,
        })
    }

    fn undo(item: &str, labeller: &str) -> Event {
        Event::Undo(UndoEvent {
            item: item.into(),
            labeller: labeller.into(),
            unix_ms: 0,
        })
    }

    #[test]
    fn undo_takes_back_only_the_labellers_own_last_label() {
        let mut state = LabelState::default();
        for e in [
            label("i1", "ann", 2),
            label("i2", "ann", 1),
            label("i1", "bob", -1),
            undo("i2", "ann"),
            undo("i1", "ann"),
        ] {
            state.apply(e);
        }
        // ann's undo of i2 worked; the next undo names i1 but … i1 is now ann's last, so it goes too.
        assert!(state.labelled_by("ann").is_empty());
        assert_eq!(state.labelled_by("bob").len(), 1);
        let mut stale = LabelState::default();
        for e in [
            label("i1", "ann", 2),
            label("i2", "ann", 1),
            undo("i1", "ann"),
        ] {
            stale.apply(e);
        }
        assert_eq!(
            stale.labelled_by("ann").len(),
            2,
            "an undo that does not name the last label is ignored"
        );
    }

    #[test]
    fn agreement_compares_direction_and_exact_choice_per_labeller_pair() {
        let mut state = LabelState::default();
        for e in [
            label("i1", "ann", 2),
            label("i1", "bob", 1), // same direction, other strength
            label("i2", "ann", 1),
            label("i2", "bob", -1), // opposite
            label("i3", "ann", 0),  // only one labeller: not shared
        ] {
            state.apply(e);
        }
        let a = agreement(&state);
        assert_eq!((a.shared_items, a.comparisons), (2, 2));
        assert_eq!(a.direction, Some(0.5));
        assert_eq!(a.exact, Some(0.0));
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_the_next_event_starts_a_new_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.jsonl");
        let good = serde_json::to_string(&label("i1", "ann", 2)).unwrap();
        std::fs::write(&path, format!("{good}\n{{\"event\":\"lab")).unwrap();
        let mut log = LabelLog::open(&path).unwrap();
        assert_eq!(log.state.unreadable_lines, 1);
        log.append(label("i2", "ann", -2)).unwrap();
        drop(log);
        let state = LabelState::read(&path).unwrap();
        assert_eq!(state.labelled_by("ann").len(), 2);
        assert_eq!(state.unreadable_lines, 1);
    }

    #[test]
    fn a_second_server_on_the_same_labels_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.jsonl");
        let _first = LabelLog::open(&path).unwrap();
        assert!(matches!(
            LabelLog::open(&path),
            Err(LabelError::Busy { .. })
        ));
    }
}
