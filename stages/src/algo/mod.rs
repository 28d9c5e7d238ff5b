//! Losses and estimators as small documented pure functions.
