"""Reference numbers for stages/src/algo/optim.rs: clip_grad_norm_ and AdamW, from PyTorch.

torch.nn.utils.clip_grad_norm_ and torch.optim.AdamW themselves (float64), fed fixed
gradients. Run from the repository root:
    /work/pyenv/bin/python stages/tests/reference/algo_optim.py
It writes stages/tests/reference/algo_optim.json.
"""
import json
import os

import torch

torch.manual_seed(7)
torch.set_default_dtype(torch.float64)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "algo_optim.json")
L = lambda t: t.detach().tolist()

shapes = {"layer.weight": (3, 4), "layer.bias": (4,)}
initial = {name: torch.randn(*shape) for name, shape in shapes.items()}
out = {"initial": {k: L(v) for k, v in initial.items()}}

# ---- clip_grad_norm_: one case that clips, one that does not ----
grads = {name: 2.0 * torch.randn(*shape) for name, shape in shapes.items()}
clip_cases = []
for max_norm in [1.0, 100.0]:
    params = [torch.nn.Parameter(initial[n].clone()) for n in shapes]
    for p, n in zip(params, shapes):
        p.grad = grads[n].clone()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    clip_cases.append({"max_norm": max_norm, "total_norm": norm.item(),
                       "clipped": {n: L(p.grad) for p, n in zip(params, shapes)}})
out["clip"] = {"grads": {k: L(v) for k, v in grads.items()}, "cases": clip_cases}

# ---- AdamW: 4 steps of fixed gradients; the bias gets no gradient at step 3 ----
config = {"learning_rate": 0.05, "beta1": 0.9, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.1}
steps = [{n: torch.randn(*shape) for n, shape in shapes.items()} for _ in range(4)]
params = {n: torch.nn.Parameter(initial[n].clone()) for n in shapes}
opt = torch.optim.AdamW(list(params.values()), lr=config["learning_rate"], betas=(config["beta1"], config["beta2"]),
                        eps=config["eps"], weight_decay=config["weight_decay"])
after = []
for i, g in enumerate(steps):
    opt.zero_grad(set_to_none=True)
    for n, p in params.items():
        if not (i == 2 and n == "layer.bias"):
            p.grad = g[n].clone()
    opt.step()
    after.append({n: L(p) for n, p in params.items()})
out["adamw"] = {"config": config, "grads": [{k: L(v) for k, v in g.items()} for g in steps],
                "skip": {"step": 2, "name": "layer.bias"}, "params_after_step": after,
                "final_exp_avg": {n: L(opt.state[p]["exp_avg"]) for n, p in params.items()},
                "final_exp_avg_sq": {n: L(opt.state[p]["exp_avg_sq"]) for n, p in params.items()}}
out["versions"] = {"torch": torch.__version__}
with open(OUT, "w") as fh:
    json.dump(out, fh, indent=1)
print("wrote", OUT)
