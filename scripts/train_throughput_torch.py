"""PyTorch side of stages/benches/train_throughput.rs: the same BENCH.md model (Llama
hidden 256, 4 layers, 8/4 heads, intermediate 688, vocab 512), the same synthetic
batches (row i has 12 + (7 i) % 29 tokens, right-padded), forward + masked
cross-entropy + backward + AdamW step, timed the same way (first step discarded).
TRL adds its own overhead on top, so this is an upper bound on TRL's throughput.

    OMP_WAIT_POLICY=PASSIVE TORCH_THREADS=2 /work/pyenv/bin/python scripts/train_throughput_torch.py

Run it back to back with `RAYON_NUM_THREADS=2 cargo bench -p rlhf-stages --bench
train_throughput` and compare the ratio (the machine is shared and noisy).
"""
import os
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
STEPS = int(os.environ.get("STEPS", "5"))


def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=688, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


def batch(rows):
    lengths = [12 + (i * 7) % 29 for i in range(rows)]
    width = max(lengths)
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.tensor([(i * 31 + t * 17) % 509 + 3 for t in range(n)])
        mask[i, :n] = 1
    return ids, mask


def run(name, m, rows):
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    ids, mask = batch(rows)
    labels = ids.masked_fill(mask == 0, -100)
    fwd = bwd = stp = 0.0
    for i in range(STEPS + 1):
        t0 = time.perf_counter()
        loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i > 0:
            fwd += t1 - t0
            bwd += t2 - t1
            stp += t3 - t2
    total = fwd + bwd + stp
    tokens = int(mask.sum()) * STEPS
    print(f"{name}: {tokens / total:.0f} tokens/s, {rows * STEPS / total:.1f} rows/s, {total / STEPS:.3f} s/step "
          f"(forward {100 * fwd / total:.0f}%, backward {100 * bwd / total:.0f}%, adamw {100 * stp / total:.0f}%), "
          f"batch {rows}x{ids.shape[1]}")


def main():
    print(f"threads: {torch.get_num_threads()}")
    run("pretrain (full, batch 32)", model(), 32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model(), lora)
    run("sft (LoRA r8 all-linear, batch 16)", peft_model, 16)
    run("pairs (LoRA, 2x16 rows)", peft_model, 32)


if __name__ == "__main__":
    main()
