//! Errors in a pipeline file, each pinned to a place: file, line and column (or the
//! `--set` argument it came from), what was found, what was expected, and a hint such
//! as the nearest valid name. All problems of a file are collected and reported
//! together, before anything runs.

use crate::yaml::Loc;
use std::fmt;

#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    /// The pipeline file, or the `--set` argument the value came from.
    pub origin: String,
    pub loc: Loc,
    pub message: String,
    pub expected: Option<String>,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn new(origin: &str, loc: Loc, message: impl Into<String>) -> Self {
        Diagnostic {
            origin: origin.to_string(),
            loc,
            message: message.into(),
            expected: None,
            hint: None,
        }
    }

    pub fn expected(mut self, expected: impl Into<String>) -> Self {
        self.expected = Some(expected.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Adds "did you mean `x`?" when a candidate is close enough to `wrong`.
    pub fn suggest<'a>(self, wrong: &str, candidates: impl IntoIterator<Item = &'a str>) -> Self {
        match nearest(wrong, candidates) {
            Some(best) => self.hint(format!("did you mean `{best}`?")),
            None => self,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.loc.is_known() {
            write!(
                f,
                "{}:{}:{}: {}",
                self.origin, self.loc.line, self.loc.col, self.message
            )?;
        } else {
            write!(f, "{}: {}", self.origin, self.message)?;
        }
        if let Some(expected) = &self.expected {
            write!(f, "\n  expected: {expected}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Every problem found in one pipeline (never empty).
#[derive(Clone, Debug, thiserror::Error)]
pub struct PipelineError {
    pub diagnostics: Vec<Diagnostic>,
}

impl PipelineError {
    pub fn one(diagnostic: Diagnostic) -> Self {
        PipelineError {
            diagnostics: vec![diagnostic],
        }
    }
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// The candidate closest to `wrong` by edit distance, if close enough to be a typo.
pub fn nearest<'a>(wrong: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (wrong.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(wrong, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c)
}

/// `a`, `b` or `c`, for "expected one of" lines.
pub fn one_of<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.into_iter().map(|n| format!("`{n}`")).collect();
    match names.len() {
        0 => "nothing".to_string(),
        1 => names[0].clone(),
        n => format!("one of {}", names[..n].join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_finds_a_one_letter_typo() {
        assert_eq!(
            nearest("learning_rat", ["learning_rate", "lora", "epochs"]),
            Some("learning_rate")
        );
    }

    #[test]
    fn nearest_refuses_unrelated_names() {
        assert_eq!(nearest("zzz", ["learning_rate", "lora"]), None);
    }
}
