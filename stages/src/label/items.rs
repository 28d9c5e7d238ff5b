//! The items file: the pairs of completions people compare, one JSON object per line.
//! Written by the stage (only when its content changes, so a rerun that samples the same
//! completions leaves it untouched) and read by `rlhf label`.

use super::LabelError;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// One comparison: two different completions of one prompt, in canonical order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// blake3 of (prompt, first, second), 16 hex digits: labels refer to items by it, so a
    /// label stays attached to its pair across reruns and stops counting once the policy
    /// samples something else.
    pub id: String,
    pub prompt: String,
    pub first: String,
    pub second: String,
}

impl Item {
    pub fn new(prompt: &str, first: &str, second: &str) -> Self {
        let mut hasher = blake3::Hasher::new();
        for part in [prompt, first, second] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        let id = hasher.finalize().to_hex()[..16].to_string();
        Item {
            id,
            prompt: prompt.to_string(),
            first: first.to_string(),
            second: second.to_string(),
        }
    }
}

/// The completions of one prompt turned into items. Identical completions are merged
/// first (there is nothing to compare); `all_pairs` gives every pair, otherwise the
/// completions are paired off two by two in the order given (the caller shuffles).
pub fn items_of_prompt(prompt: &str, completions: &[String], all_pairs: bool) -> Vec<Item> {
    let mut distinct: Vec<&String> = Vec::new();
    for completion in completions {
        if !distinct.contains(&completion) {
            distinct.push(completion);
        }
    }
    let mut items = Vec::new();
    if all_pairs {
        for i in 0..distinct.len() {
            for j in i + 1..distinct.len() {
                items.push(Item::new(prompt, distinct[i], distinct[j]));
            }
        }
    } else {
        for pair in distinct.chunks_exact(2) {
            items.push(Item::new(prompt, pair[0], pair[1]));
        }
    }
    items
}

/// Writes `items` to `path` unless the file already holds exactly these bytes; the new
/// content goes to a temporary file first and is renamed into place.
pub fn write_items(path: &Path, items: &[Item]) -> Result<bool, LabelError> {
    let mut text = String::new();
    for item in items {
        let line = serde_json::to_string(item).map_err(|e| LabelError::BadLine {
            path: path.to_path_buf(),
            line: 0,
            message: e.to_string(),
        })?;
        text.push_str(&line);
        text.push('\n');
    }
    if std::fs::read(path).ok().as_deref() == Some(text.as_bytes()) {
        return Ok(false);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| LabelError::io(dir, e))?;
    }
    let temporary = path.with_extension("jsonl.tmp");
    let mut file = std::fs::File::create(&temporary).map_err(|e| LabelError::io(&temporary, e))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| LabelError::io(&temporary, e))?;
    std::fs::rename(&temporary, path).map_err(|e| LabelError::io(path, e))?;
    Ok(true)
}

pub fn read_items(path: &Path) -> Result<Vec<Item>, LabelError> {
    let text = std::fs::read_to_string(path).map_err(|e| LabelError::io(path, e))?;
    let mut items = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let item: Item = serde_json::from_str(line).map_err(|e| LabelError::BadLine {
            path: path.to_path_buf(),
            line: index + 1,
            message: e.to_string(),
        })?;
        items.push(item);
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_completions_are_merged_before_pairing() {
        let completions: Vec<String> = ["a", "b", "a", "c"].iter().map(|s| s.to_string()).collect();
        let all = items_of_prompt("p", &completions, true);
        assert_eq!(all.len(), 3); // a-b, a-c, b-c
        let paired = items_of_prompt("p", &completions, false);
        assert_eq!(paired.len(), 1); // (a, b); c has no partner
        assert_eq!(
            (paired[0].first.as_str(), paired[0].second.as_str()),
            ("a", "b")
        );
    }

    #[test]
    fn item_id_depends_on_prompt_and_both_completions_and_their_order() {
        let base = Item::new("p", "x", "y").id;
        assert_ne!(base, Item::new("p", "y", "x").id);
        assert_ne!(base, Item::new("q", "x", "y").id);
        assert_ne!(Item::new("ab", "c", "d").id, Item::new("a", "bc", "d").id);
        assert_eq!(base, Item::new("p", "x", "y").id);
    }

    #[test]
    fn unchanged_items_are_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/l.items.jsonl");
        let items = vec![Item::new("p", "a", "b")];
        assert!(write_items(&path, &items).unwrap());
        assert!(!write_items(&path, &items).unwrap());
        assert_eq!(read_items(&path).unwrap(), items);
    }
}
