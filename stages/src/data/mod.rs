//! Datasets: sources, formats, the row model, prompt templates, tokenizers and batching.
