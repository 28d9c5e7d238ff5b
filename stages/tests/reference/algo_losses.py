"""Reference numbers for stages/src/algo (GAE, KL, PPO, GRPO, DPO, reward, LM, schedules).

Produced with PyTorch (float64) re-implementing, line for line, the formulas of TRL
(huggingface/trl: trl/core.py masked_mean/masked_var/masked_whiten; trl/trainer/ppo_trainer.py
and the older PPOTrainer.compute_rewards/compute_advantages/loss; grpo_trainer.py
_generate_and_score_completions/_compute_loss; dpo_trainer.py dpo_loss; reward_trainer.py
compute_loss; rloo_trainer.py baseline). TRL itself is not installed in /work/pyenv, so the
formulas are transcribed here; the schedules come from transformers itself.

Run from the repository root:
    /work/pyenv/bin/python stages/tests/reference/algo_losses.py
It writes stages/tests/reference/algo_losses.json (inputs and expected outputs).
"""
import json
import math
import os

import torch
import torch.nn.functional as F
import transformers

torch.manual_seed(20261122)
torch.set_default_dtype(torch.float64)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "algo_losses.json")


def L(t):
    return t.detach().tolist()


# ---- trl/core.py ----
def masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    mean = masked_mean(values, mask)
    centered = values - mean
    variance = masked_mean(centered ** 2, mask)
    if unbiased:
        n = mask.sum()
        variance = variance * (n / (n - 1))
    return variance


def masked_whiten(values, mask, shift_mean=True):
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


# right-padded masks: 1 on response tokens
mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.float64)
out = {"mask": L(mask)}

values = torch.randn(3, 6)
out["masked"] = {
    "values": L(values),
    "sum": masked_mean(values, mask).item() * mask.sum().item(),
    "mean": masked_mean(values, mask).item(),
    "mean_per_row": L(masked_mean(values, mask, axis=1)),
    "var_unbiased": masked_var(values, mask, True).item(),
    "var_biased": masked_var(values, mask, False).item(),
    "whiten": L(masked_whiten(values, mask, True)),
    "whiten_keep_mean": L(masked_whiten(values, mask, False)),
}


# ---- GAE: TRL PPOTrainer.compute_advantages (values, rewards masked; loop; returns) ----
def trl_gae(rewards, values, mask, gamma, lam):
    values = values * mask
    rewards = rewards * mask
    lastgaelam = 0
    advantages_reversed = []
    gen_len = rewards.shape[-1]
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)
    returns = advantages + values
    return advantages, returns


rewards = torch.randn(3, 6)
critic = torch.randn(3, 6)
gae_cases = []
for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)]:
    adv, ret = trl_gae(rewards, critic, mask, gamma, lam)
    gae_cases.append({"gamma": gamma, "lambda": lam, "advantages": L(adv), "returns": L(ret)})
out["gae"] = {"rewards": L(rewards), "values": L(critic), "cases": gae_cases}

# ---- KL estimators (TRL ppo_trainer: logr = ref - logp; k1 = -logr; k3 = exp(logr) - 1 - logr) ----
logp = -torch.rand(3, 6) * 3
ref = logp + 0.5 * torch.randn(3, 6)
logr = ref - logp
out["kl"] = {
    "logprobs": L(logp), "reference_logprobs": L(ref),
    "k1": L(-logr), "k3": L((logr.exp() - 1) - logr), "mse": L(0.5 * (logp - ref) ** 2),
}

# ---- PPO policy loss (TRL ppo_trainer.py, masked means) ----
old = logp.clone()
new = (logp + 0.3 * torch.randn(3, 6)).requires_grad_()
adv = torch.randn(3, 6)
eps = 0.2
ratio = torch.exp(new - old)
pg_losses = -adv * ratio
pg_losses2 = -adv * torch.clamp(ratio, 1.0 - eps, 1.0 + eps)
pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses).double(), mask)
approxkl = 0.5 * masked_mean((new - old) ** 2, mask)
(grad_new,) = torch.autograd.grad(pg_loss, new)
out["ppo_policy"] = {
    "logprobs": L(new), "old_logprobs": L(old), "advantages": L(adv), "clip_epsilon": eps,
    "loss": pg_loss.item(), "clip_fraction": clipfrac.item(), "approx_kl": approxkl.item(),
    "grad_logprobs": L(grad_new),
}

# ---- PPO value loss (TRL: vf_loss = 0.5 * masked_mean(max(...))) ----
old_values = torch.randn(3, 6)
vpred = (old_values + 0.4 * torch.randn(3, 6)).requires_grad_()
returns = old_values + torch.randn(3, 6)
c = 0.2
vclipped = torch.clamp(vpred, old_values - c, old_values + c)
vf1 = torch.square(vpred - returns)
vf2 = torch.square(vclipped - returns)
vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
vf_clipfrac = masked_mean(torch.gt(vf2, vf1).double(), mask)
(grad_v,) = torch.autograd.grad(vf_loss, vpred)
out["ppo_value"] = {
    "values": L(vpred), "old_values": L(old_values), "returns": L(returns), "clip_range_value": c,
    "loss": vf_loss.item(), "clip_fraction": vf_clipfrac.item(), "grad_values": L(grad_v),
}

# ---- reward shaping (older TRL PPOTrainer.compute_rewards) ----
scores = torch.tensor([1.5, -0.7, 0.3])
kl_tok = (logp - ref) * mask
kl_coef = 0.05
shaped = []
for score, kl_row, m in zip(scores, kl_tok, mask):
    reward = -kl_coef * kl_row
    reward[m.nonzero()[-1]] += score
    shaped.append(reward)
out["rewards"] = {"scores": L(scores), "kl": L(kl_tok), "kl_coef": kl_coef,
                  "rewards": L(torch.stack(shaped)), "non_score_rewards": L(-kl_coef * kl_tok)}

# ---- score clipping, missing-EOS penalty, explained variance ----
raw_scores = torch.tensor([2.5, -0.4, -3.0, 0.9])
has_eos = [True, False, True, False]
clipped = torch.clamp(raw_scores, -1.0, 1.0)                       # TRL score_clip / seeds reward_score_clip
penalised = raw_scores.clone()
penalised[~torch.tensor(has_eos)] -= 1.5                            # TRL missing_eos_penalty
ev_values, ev_returns = torch.randn(3, 6), torch.randn(3, 6)
sel = mask.bool()
y_pred, y_true = ev_values[sel].numpy(), ev_returns[sel].numpy()    # CleanRL: 1 - var(y - y_hat) / var(y)
explained = 1 - (y_true - y_pred).var() / y_true.var()
out["score_helpers"] = {"scores": L(raw_scores), "has_eos": has_eos, "clip_limit": 1.0, "clipped": L(clipped),
                        "missing_eos_penalty": 1.5, "penalised": L(penalised),
                        "values": L(ev_values), "returns": L(ev_returns), "explained_variance": float(explained)}

# ---- a whole PPO step as TRL chains it: rewards -> GAE -> whitened advantages -> losses ----
pipe_scores = torch.tensor([1.0, -0.5, 0.25])
pipe_logp = -torch.rand(3, 6) * 2
pipe_ref = pipe_logp + 0.2 * torch.randn(3, 6)
pipe_values = torch.randn(3, 6)
kl_k1 = (pipe_logp - pipe_ref) * mask
rows = []
for score, kl_row, m in zip(pipe_scores, kl_k1, mask):
    reward = -0.05 * kl_row
    reward[m.nonzero()[-1]] += score
    rows.append(reward)
pipe_rewards = torch.stack(rows)
pipe_adv, pipe_ret = trl_gae(pipe_rewards, pipe_values, mask, 1.0, 0.95)
pipe_adv = masked_whiten(pipe_adv, mask)
pipe_new = (pipe_logp + 0.1 * torch.randn(3, 6)).requires_grad_()
r_ = torch.exp(pipe_new - pipe_logp)
pipe_pg = masked_mean(torch.max(-pipe_adv * r_, -pipe_adv * torch.clamp(r_, 0.8, 1.2)), mask)
(pipe_grad,) = torch.autograd.grad(pipe_pg, pipe_new)
out["ppo_pipeline"] = {"scores": L(pipe_scores), "logprobs": L(pipe_logp), "reference_logprobs": L(pipe_ref),
                       "values": L(pipe_values), "kl_coef": 0.05, "gamma": 1.0, "lambda": 0.95, "clip_epsilon": 0.2,
                       "new_logprobs": L(pipe_new), "whitened_advantages": L(pipe_adv), "returns": L(pipe_ret),
                       "policy_loss": pipe_pg.item(), "grad_new_logprobs": L(pipe_grad)}

# ---- entropy (TRL: logsumexp(logits) - sum(softmax * logits)) ----
logits = torch.randn(2, 3, 7, requires_grad=True)
ent = torch.logsumexp(logits, dim=-1) - torch.sum(F.softmax(logits, dim=-1) * logits, dim=-1)
(grad_ent,) = torch.autograd.grad(ent.sum(), logits)
out["entropy"] = {"logits": L(logits), "entropy": L(ent), "grad_logits_of_sum": L(grad_ent)}

# ---- GRPO advantages (grpo_trainer.py) and RLOO (rloo_trainer.py) ----
G = 4
group_rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 2.0, -1.0, 0.25, 3.0, 3.0, 3.0, 3.0])
mean_g = group_rewards.view(-1, G).mean(dim=1).repeat_interleave(G)
std_g = group_rewards.view(-1, G).std(dim=1).repeat_interleave(G)
loo = group_rewards.view(-1, G)
baseline = ((loo.sum(1, keepdim=True) - loo) / (G - 1)).reshape(-1)
out["group"] = {
    "rewards": L(group_rewards), "group_size": G,
    "scaled": L((group_rewards - mean_g) / (std_g + 1e-4)),
    "unscaled": L(group_rewards - mean_g),
    "rloo": L(group_rewards - baseline),
}

# ---- GRPO loss (grpo_trainer.py _compute_loss; bnpo = token, grpo = sequence) ----
b_adv = torch.tensor([0.8, -1.1, 0.4])
g_new = (logp + 0.25 * torch.randn(3, 6)).requires_grad_()
g_old = logp.clone()
g_ref = ref.clone()
beta = 0.04
grpo_cases = []
for agg in ["token", "sequence"]:
    per_token_kl = torch.exp(g_ref - g_new) - (g_ref - g_new) - 1
    coef_1 = torch.exp(g_new - g_old)
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    l1 = coef_1 * b_adv.unsqueeze(1)
    l2 = coef_2 * b_adv.unsqueeze(1)
    per_token_loss = -torch.min(l1, l2) + beta * per_token_kl
    if agg == "token":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    else:
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    mean_kl = masked_mean(per_token_kl, mask)
    is_low = (coef_1 < 1 - eps) & (b_adv.unsqueeze(1) < 0)
    is_high = (coef_1 > 1 + eps) & (b_adv.unsqueeze(1) > 0)
    clip_ratio = masked_mean((is_low | is_high).double(), mask)
    (grad_g,) = torch.autograd.grad(loss, g_new)
    grpo_cases.append({"aggregation": agg, "loss": loss.item(), "mean_kl": mean_kl.item(),
                       "clip_ratio": clip_ratio.item(), "grad_logprobs": L(grad_g)})
# beta = 0 and old = new.detach(): ratio 1, loss = -mean(A) over tokens, gradient still flows
p = g_new
coef = torch.exp(p - p.detach())
loss0 = ((-torch.min(coef * b_adv.unsqueeze(1), torch.clamp(coef, 1 - eps, 1 + eps) * b_adv.unsqueeze(1))) * mask).sum() / mask.sum()
(grad0,) = torch.autograd.grad(loss0, p)
out["grpo"] = {"logprobs": L(g_new), "old_logprobs": L(g_old), "reference_logprobs": L(g_ref),
               "advantages": L(b_adv), "clip_epsilon": eps, "beta": beta, "cases": grpo_cases,
               "on_policy_no_kl": {"loss": loss0.item(), "grad_logprobs": L(grad0)}}

# ---- DPO (dpo_trainer.py dpo_loss) ----
# the last pair has policy = reference (h = 0), as every pair does at DPO's first step
pc = torch.tensor([-12.0, -30.5, -8.25, -20.0, -15.0, -7.0], requires_grad=True)
pr = torch.tensor([-14.0, -29.0, -9.0, -26.0, -15.5, -9.0], requires_grad=True)
rc = torch.tensor([-13.0, -30.0, -8.0, -21.0, -14.0, -7.0])
rr = torch.tensor([-13.5, -30.0, -9.5, -25.0, -15.0, -9.0])
dpo_cases = []
for loss_type, beta_d, ls in [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.1), ("ipo", 0.1, 0.0), ("hinge", 0.1, 0.0), ("hinge", 2.0, 0.0)]:
    logits_d = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta_d * logits_d) * (1 - ls) - F.logsigmoid(-beta_d * logits_d) * ls
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta_d * logits_d)
    else:
        losses = (logits_d - 1 / (2 * beta_d)) ** 2
    cr = beta_d * (pc - rc).detach()
    rj = beta_d * (pr - rr).detach()
    loss = losses.mean()
    gc, gr = torch.autograd.grad(loss, [pc, pr])
    dpo_cases.append({"loss_type": loss_type, "beta": beta_d, "label_smoothing": ls, "loss": loss.item(),
                      "chosen_rewards": L(cr), "rejected_rewards": L(rj),
                      "reward_accuracy": (cr > rj).double().mean().item(), "margins": L(cr - rj),
                      "grad_chosen": L(gc), "grad_rejected": L(gr)})
out["dpo"] = {"policy_chosen": L(pc), "policy_rejected": L(pr), "reference_chosen": L(rc),
              "reference_rejected": L(rr), "cases": dpo_cases}

# ---- Bradley-Terry (reward_trainer.py compute_loss) ----
r_c = torch.tensor([2.0, -0.5, 0.1, 35.0, -40.0, 0.3], requires_grad=True)
r_r = torch.tensor([1.0, 0.5, 0.1, -2.0, 1.0, 0.29], requires_grad=True)
margin = torch.tensor([0.5, 0.0, 1.0, 2.0, 0.0, 0.25])
bt = {}
for name, m, center in [("plain", None, None), ("with_margin", margin, None), ("with_margin_center", margin, 0.01)]:
    d = r_c - r_r if m is None else r_c - r_r - m
    loss = -F.logsigmoid(d).mean()
    if center is not None:
        loss = loss + center * torch.mean((r_c + r_r) ** 2)
    gc, gr = torch.autograd.grad(loss, [r_c, r_r])
    bt[name] = {"loss": loss.item(), "grad_chosen": L(gc), "grad_rejected": L(gr),
                "center_rewards_coefficient": center}
out["bradley_terry"] = {"chosen": L(r_c), "rejected": L(r_r), "margin": L(margin),
                        "accuracy": (r_c > r_r).double().mean().item(), **bt}

# ---- LM: token log-probs and masked cross-entropy ----
lm_logits = (3 * torch.randn(2, 4, 11)).requires_grad_()
labels = torch.tensor([[3, 0, 10, 7], [5, 5, 1, 9]])
lm_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
tok = torch.gather(F.log_softmax(lm_logits, -1), 2, labels.unsqueeze(-1)).squeeze(-1)
sel = lm_mask.bool()
ce = F.cross_entropy(lm_logits[sel], labels[sel])
(grad_ce,) = torch.autograd.grad(ce, lm_logits)
out["lm"] = {"logits": L(lm_logits), "labels": L(labels), "mask": L(lm_mask), "token_logprobs": L(tok),
             "cross_entropy": ce.item(), "grad_logits": L(grad_ce),
             "sequence_logprobs": L((tok * lm_mask).sum(1))}

# ---- schedules from transformers itself ----
sched = []
for kind, fn in [("constant", transformers.get_constant_schedule_with_warmup),
                 ("linear", transformers.get_linear_schedule_with_warmup),
                 ("cosine", transformers.get_cosine_schedule_with_warmup)]:
    for warmup, total in [(3, 10), (0, 7), (100, 1875)]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        if kind == "constant":
            s = fn(opt, num_warmup_steps=warmup)
        else:
            s = fn(opt, num_warmup_steps=warmup, num_training_steps=total)
        steps = list(range(0, total + 4)) if total < 100 else [0, 1, 50, 99, 100, 101, 500, 1000, 1874, 1875, 1880]
        lrs = []
        done = 0
        for step in steps:
            while done < step:
                opt.step(); s.step(); done += 1
            lrs.append(opt.param_groups[0]["lr"])
        sched.append({"kind": kind, "base_learning_rate": 1e-3, "warmup_steps": warmup, "total_steps": total,
                      "steps": steps, "learning_rates": lrs})
out["schedules"] = sched
out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}

with open(OUT, "w") as fh:
    json.dump(out, fh, indent=1)
print("wrote", OUT)
