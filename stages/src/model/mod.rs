//! Causal language models: Llama-family architectures, LoRA, heads and generation.
