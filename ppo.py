"""ppo.py -- reinforcement learning with verifiable math rewards: PPO, GRPO and their relatives.

The RL stage of the pipeline (prepare -> SFT -> eval -> RL -> eval). Stands in for verl / OpenRLHF's PPO
trainers. Keeps: the policy-gradient family an RL-for-reasoning user reaches for (PPO with a critic and
GAE, GRPO, Dr. GRPO, RLOO, REINFORCE++, ReMax, and RAFT as the rejection-sampling baseline), KL to a frozen
reference (in the reward or in the loss, k1 / k2 / k3 estimators), clip-higher and dual clip, value clipping,
an entropy bonus, the three loss aggregations, dynamic sampling, the overlong penalty, GSPO's sequence
ratio, and truncated importance sampling against the engine/trainer log-prob gap.

How a step runs (the trainer and its engine share each device, "colocated"; under torchrun every rank is a
data-parallel replica with its own engine and its share of the prompts):
  1. ROLLOUT: P prompts x n samples on nanovllm (the behaviour policy), with each token's log-prob.
  2. REWARD: eval.Grader grades the last \boxed{} against the gold answer in a process pool (timeouts
     count as wrong); optional overlong penalty and format reward (--format_reward: + f for a boxed final
     answer, right or wrong); dynamic sampling drops groups that all scored the same and
     refills the batch from new prompts (DAPO; at most --refill_rounds more rounds, then zero-weighted fillers).
     With --reward_model, an HF sequence classifier held by the trainer role scores each prompt + response
     too: reward = rule + reward_model_coef * rm_score (--no-rule_reward: the RM alone, for data without
     answers). Held-out evals stay the rule's accuracy.
  3. SCORE: the trainer (nanotron) recomputes the log-probs of the sampled tokens (pi_old; with one update
     per batch, the update's own forward: Trainer.reuse_logp), the frozen reference's (for KL) and the
     critic's values (PPO); the estimator turns scores into advantages.
  4. UPDATE: epochs x mini-batches of PPO-clipped policy-gradient steps on packed micro-batches.
  5. SYNC: the new weights go to the engine in memory (update_weights), timed.
One-step off-policy (--mode one_step_off, the seed's recipe after verl): the rollout of step k+1 is made
with the weights of step k-1 while step k trains (staleness exactly 1, asserted), and truncated importance
sampling corrects for it. With --backend local (roles in this process) a thread generates step k+1 on the
engine's own CUDA stream while the trainer trains step k on the same GPU (colocated off-policy; with
--engine_process the engine lives in a child process on that GPU instead, so the two roles do not share a GIL, and
the weights go through a buffer shared by CUDA IPC); with --backend
nanoray or ray the trainer and the engine(s) are actors in their own processes (each on a GPU of its own when
there are enough), and the weights go trainer -> engines by a bucketed broadcast on a process group of their
own (NCCL / gloo). Every backend and layout (dp, tp, pp under torchrun) computes the same numbers (tested).

LoRA (--lora_rank r): the actor's base weights are frozen and low-rank adapters train instead (optimizer
state for r * (in + out) numbers per matrix, not in * out: a bigger actor fits one GPU); the KL reference is
the actor with its adapters off (no second model). The engine always gets the MERGED weights W + alpha/r B A,
and so do checkpoints' model files (plus lora_step_N.pt: the adapters and their AdamW state, to resume): `python
merge.py ckpt/ppo-<model>/step_N` is an HF folder of the trained model, as for a full fine-tuning run.

Commands:
    python ppo.py                                     # CPU: tiny random model learns a toy reward, seconds
    python ppo.py --model smollm2 --data synthetic    # SmolLM2-135M-Instruct on the synthetic math task
    python ppo.py --algo ppo --value_warmup_steps 5   # PPO with a critic (GAE), value warm-up first
    torchrun --nproc_per_node 2 ppo.py                # data parallel: the same run as one process, on 2 ranks
    torchrun --nproc_per_node 2 ppo.py --tp 2         # tensor-parallel trainer (each rank keeps a full engine)
    torchrun --nproc_per_node 8 ppo.py --tp 2 --pp 2  # + pipeline stages (1F1B; the RL loss on the last stage)
    torchrun --nproc_per_node 2 ppo.py --mode one_step_off --engine_process   # colocated off-policy, engine per process
    python ppo.py --backend nanoray --mode one_step_off   # roles as actors: rollout overlaps training (--backend ray)
    python ppo.py --backend nanoray --tp 2 --pp 2 --engines 4   # split: a trainer group of 4 actors + 4 engines
    torchrun --nproc_per_node 8 ppo.py --tp 2 --pp 2 --rollout_gpus 4   # the same split from a torchrun launch
    python ppo.py --bench                             # GPU: samples/s vs TRL's GRPOTrainer, time per role
    python ppo.py --bench --layouts sync,split,proc --model M   # one-step off vs sync, a torchrun job each: table, PNG
    python ppo.py --model ckpt/sft/hf --lora_rank 32      # LoRA on the actor (tp 1); merge.py exports it merged
    python ppo.py --reward_model RM_FOLDER --reward_model_coef 0.5   # + a learned reward (--no-rule_reward: RM only)
    pytest -q test_all.py -k ppo

First read: the algorithm core (advantages -> KL -> losses: pure functions on padded [B, T] tensors, each
tested against hand-computed values), then rl_step and main. Legend: B sampled responses, T response tokens
(padded; mask [B, T] marks real ones), P prompts, n samples per prompt (B = P * n, grouped contiguously:
rows [i*n, (i+1)*n) answer prompt i), N packed tokens of a micro-batch.

Contents: advantages . KL . losses . batch shaping . config . prompts and rewards (+ the reward model) .
          LoRA . trainer . the step . roles (in-process, or actors on nanoray / Ray) . driver . benchmark . CLI
"""

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import pickle
import random
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

# ---- advantages ----------------------------------------------------------------------------------------
# Every estimator answers "how much better than expected was this token's continuation?". They differ in
# the baseline ("expected"): a learned value per token (GAE), the other samples of the same prompt
# (GRPO, Dr. GRPO, RLOO), the batch (REINFORCE++) or a greedy rollout of the prompt (ReMax). Outcome
# rewards (one score per response, e.g. 1 if the boxed answer is right) give every token of a response the
# same advantage, except under GAE and REINFORCE++, which also see per-token rewards (the KL penalty).

EPS = 1e-6


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1) if dim is None else (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, reduce=None) -> torch.Tensor:
    """(x - mean) / std over the real tokens of the batch (unbiased var, as PPO implementations do).
    reduce: sums a list of floats over the data-parallel ranks, so every rank whitens with the whole
    batch's statistics (None: this batch is the whole batch)."""
    m = mask.to(x.dtype)
    s1, s2, n = float((x * m).sum()), float((x * x * m).sum()), float(m.sum())
    if reduce is not None:
        s1, s2, n = reduce([s1, s2, n])
    n = max(n, 2.0)
    mean = s1 / n
    var = max(s2 - n * mean * mean, 0.0) / (n - 1)
    out = (x - mean) / math.sqrt(var + EPS)
    return out * m


def group_advantages(scores: torch.Tensor, n: int, mode: str, baseline: torch.Tensor | None = None) -> torch.Tensor:
    """scores [B] (one per response, B = P * n, grouped) -> advantages [B] for the group estimators.
    grpo    (Shao et al. 2024, eq. 3 outcome supervision): (r - mean_group) / (std_group + eps)
    dr_grpo (Liu et al. 2025): r - mean_group (no std: it up-weights too-easy / too-hard prompts)
    rloo    (Ahmadian et al. 2024): r_i - mean_{j != i} r_j = n / (n - 1) * (r_i - mean_group)
    remax   (Li et al. 2023): r - r_greedy, the score of the prompt's greedy response (`baseline` [P])"""
    g = scores.view(-1, n).double()                                     # [P, n]
    mean = g.mean(1, keepdim=True)
    if mode == "grpo":
        adv = (g - mean) / (g.std(1, keepdim=True, unbiased=True).nan_to_num(0.0) + EPS)
    elif mode == "dr_grpo":
        adv = g - mean
    elif mode == "rloo":
        if n < 2:
            raise ValueError("rloo needs n >= 2 samples per prompt (leave-one-out)")
        adv = (g - mean) * n / (n - 1)
    elif mode == "remax":
        if baseline is None:
            raise ValueError("remax needs the greedy responses' scores as the baseline")
        adv = g - baseline.double().view(-1, 1)
    else:
        raise ValueError(f"group_advantages: unknown mode {mode!r}")
    return adv.view(-1).to(scores.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16). rewards, values, mask [B, T]:
    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns R_t = A_t + V_t.
    V after the last real token is 0: the outcome score on the last token is the whole return, also for a
    response cut at max_new_tokens (graded as it stands: there is nothing after it to bootstrap from).
    Returns (advantages, returns) [B, T]."""
    B, T = rewards.shape
    m = mask.to(values.dtype)
    adv = torch.zeros_like(values)
    last = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):                                        # T is a few hundred: a loop is fine
        v_next = values[:, t + 1] * m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * v_next - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """R_t = sum_{k >= t} gamma^(k - t) r_k over the real tokens [B, T] (REINFORCE++'s return; Hu 2025)."""
    out = torch.zeros_like(rewards)
    run = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        run = (rewards[:, t] + gamma * run) * mask[:, t]
        out[:, t] = run
    return out


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """[B, T] per-token rewards: the outcome score on each response's LAST real token, minus kl_coef * KL_t on
    every token when the KL penalty goes into the reward (InstructGPT's r - beta KL)."""
    r = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    last = mask.long().sum(1).clamp(min=1) - 1                          # index of the last real token
    r[torch.arange(len(scores), device=mask.device), last] = scores.float()
    if kl is not None and kl_coef:
        r = r - kl_coef * kl * mask
    return r


# ---- KL to the reference ---------------------------------------------------------------------------------
# With log-ratio x = log pi(a) - log pi_ref(a) for a token sampled from pi (Schulman 2020, "Approximating KL
# divergence"): k1 = x (unbiased, high variance, can be negative), k2 = x^2 / 2 (biased, low variance),
# k3 = exp(-x) - 1 + x (unbiased and always >= 0). As VALUES (a penalty in the reward, or a logged number) all
# three estimate KL(pi || ref). As a LOSS their gradients differ, because the tokens were sampled from pi and the
# gradient flows only through log pi(a): per token it is (d k / d x) grad log pi(a), whose mean over a ~ pi is
#   k1: 1 * grad log pi            -> sum_a pi grad log pi = grad sum_a pi = 0: no gradient at all (refused)
#   k2: x * grad log pi            -> grad KL(pi || ref), the true gradient
#   k3: (1 - exp(-x)) grad log pi  -> sum_a (pi - ref) grad log pi = grad KL(ref || pi), the REVERSE KL's
# k3 in the loss is GRPO's choice (both KLs vanish at pi = ref and pull pi back towards it); k2 is the exact one.
# k3 grows like exp(-x) where pi gives a token far less than ref did (x = -20: 5e8): clamped at 10 (as verl does),
# so one such token cannot swamp a step's clipped gradient.

def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    x = logp - ref_logp
    if kind == "k1":
        return x
    if kind == "k2":
        return 0.5 * x * x
    if kind == "k3":
        return (torch.expm1(-x) + x).clamp(max=10.0)                   # exp(-x) - 1 + x, exact near x = 0
    raise ValueError(f"kl_estimate: kind must be k1, k2 or k3, got {kind!r}")


# ---- losses ------------------------------------------------------------------------------------------------
# A step's batch is split into micro-batches (and data-parallel ranks); the update must not depend on how.
# So each micro-batch returns a SUM, normalised by a constant of the whole step: `aggregate` divides by the
# step's total real tokens (token-mean), total responses (seq-mean-*), or responses x max length (Dr. GRPO).
# Adding the micro-batches' losses then gives exactly the loss of the whole batch, and its gradient.

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate(x: torch.Tensor, mask: torch.Tensor, mode: str, n_tokens: float, n_seqs: float,
              max_len: float = 1.0) -> torch.Tensor:
    """x, mask [b, T] (this micro-batch) -> its share of the step's loss.
    token-mean: sum / all tokens of the step (long answers weigh more: DAPO, verl's default);
    seq-mean-token-sum: sum / responses (each response's token sum, averaged: Dr. GRPO's unbiased form
    with max_len=1); seq-mean-token-mean: per-response token mean, averaged over responses (GRPO's paper);
    seq-mean-token-sum-norm: sum / (responses * max_len), Dr. GRPO's constant normaliser."""
    m = mask.to(x.dtype)
    if mode == "token-mean":
        return (x * m).sum() / n_tokens
    if mode == "seq-mean-token-sum":
        return (x * m).sum() / n_seqs
    if mode == "seq-mean-token-mean":
        return ((x * m).sum(1) / m.sum(1).clamp(min=1)).sum() / n_seqs
    if mode == "seq-mean-token-sum-norm":
        return (x * m).sum() / (n_seqs * max_len)
    raise ValueError(f"aggregate: mode must be one of {AGGREGATIONS}, got {mode!r}")


def tis_weights(trainer_old_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL"): the engine sampled from pi_engine, not from the trainer's pi_old (other kernels, bf16),
    so each token's gradient is reweighted by min(pi_old / pi_engine, cap). Detached: a weight, not a path."""
    return torch.exp(trainer_old_logp - engine_logp).clamp(max=cap).detach()


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float = 0.0, gspo: bool = False,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Per-token PPO clipped surrogate (Schulman et al. 2017, eq. 7), [B, T], to be aggregated.
    ratio = pi / pi_old; loss = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high)).
    clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025): room for rare tokens' probability to grow.
    dual_clip = c > 1 (Ye et al. 2020): for A < 0 the loss is also capped at -A c, so a token whose ratio
    exploded cannot dominate. gspo (Zheng et al. 2025): one ratio per response, the geometric mean of its
    token ratios, s = exp(mean_t log ratio), carried through each token as s.detach() * pi_t / pi_t.detach().
    weights: per-token factors (truncated importance sampling). Returns (loss [B, T], stats: 0-dim tensors).
    NOTE: with one epoch and one mini-batch (the defaults) pi_old IS the policy being updated (the same forward:
    ratio = 1 exactly), so the clips, the dual clip and gspo change nothing; they bite from the second update on
    the same rollout (--epochs, --mini_batches). Off-policy samples (one-step-off mode) are corrected by the
    truncated importance weights instead. GSPO's ratio is a geometric mean: it uses far smaller clips (~3e-4)."""
    log_ratio = (logp - old_logp) * mask
    if gspo:
        seq = (log_ratio.sum(1) / mask.sum(1).clamp(min=1)).detach()   # log s_i, [B]
        log_ratio = seq[:, None] + logp - logp.detach()                  # value s_i, gradient d log pi_t
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1).float()
    if dual_clip > 0:
        capped = torch.minimum(loss, -adv * dual_clip)
        loss = torch.where(adv < 0, capped, loss)
    if weights is not None:
        loss = loss * weights
    with torch.no_grad():                       # 0-dim tensors: reading them here would stall the GPU per micro-batch
        m = mask.float()
        stats = {"clip_frac": masked_mean(clipped, m),
                 "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, m),   # k2 of the update
                 "ratio_max": torch.where(m.any(), (ratio * m).max(), 1.0) if m.numel() else ratio.new_ones(())}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float = 0.2) -> torch.Tensor:
    """Per-token clipped value loss [B, T] (PPO2's): 0.5 max((V - R)^2, (V_old + clip(V - V_old) - R)^2)."""
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (v_clip - returns) ** 2)


# ---- batch shaping -----------------------------------------------------------------------------------------

def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the score: 0 up to max_len - buffer
    tokens, then falling linearly to -1 at max_len (a response cut at max_len gets -1)."""
    start = max_len - buffer
    pen = (start - lengths.float()) / max(buffer, 1)
    return torch.where(lengths <= start, torch.zeros_like(pen), pen.clamp(min=-1.0))


def shaped_scores(cfg, samples: list[dict], scores) -> torch.Tensor:
    """The scores a step trains on [B]: the reward, plus DAPO's overlong penalty when --overlong_buffer is set."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    if not cfg.overlong_buffer:
        return scores
    return scores + overlong_penalty(torch.tensor([len(s["response"]) for s in samples]), cfg.max_new_tokens,
                                     cfg.overlong_buffer)


def informative_groups(scores: torch.Tensor, n: int) -> torch.Tensor:
    """[P] bool: groups whose n scores are not all equal. DAPO's dynamic sampling drops the others (every
    group-relative advantage is 0 there: they cost compute and teach nothing) and refills the batch."""
    g = scores.view(-1, n)
    return (g != g[:, :1]).any(1)


def fill_informative(rounds, need: int, n: int, shape=None) -> tuple[list, list, list, int]:
    """DAPO's refill: `rounds` yields (samples, scores, answered) of whole groups of n (the step's rollout, then
    each further one generates and grades more prompts, lazily). Informative groups are kept in order until
    `need` are in hand or the rounds run out; a short batch is topped up with uninformative groups, which the
    step gives no weight. shape(samples, scores) -> the scores the step will train on (the overlong penalty), so
    both judge a group alike. Returns (samples, scores, answered) of exactly `need` groups, and the groups seen."""
    good, rest, seen = [], [], 0
    for samples, scores, answered in rounds:
        judged = torch.tensor(scores, dtype=torch.float64) if shape is None else shape(samples, scores).double()
        for g, ok in enumerate(informative_groups(judged, n).tolist()):
            (good if ok else rest).append([x[g * n:(g + 1) * n] for x in (samples, scores, answered)])
        seen += len(scores) // n
        if len(good) >= need:
            break
    groups = (good + rest)[:need]
    return *([x for g in groups for x in g[i]] for i in range(3)), seen


# ---- config ------------------------------------------------------------------------------------------------

ALGOS = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "remax", "raft", "ppo")


@dataclass
class Config:
    model: str = "tiny"  # actor init: an HF folder (merge.py's SFT output) | smollm2 | tiny (random, tests)
    data: str = ""  # prompts: a prepare_data rl folder | synthetic (built if missing) | toy; "" = toy for tiny
    out: str = ""  # checkpoints step_N/, metrics.jsonl, curves PNG; "" = ckpt/ppo-<model>
    results: str = "results.jsonl"  # the artifact root's log: one JSON line per pipeline stage
    algo: str = "grpo"  # advantage estimator: grpo | dr_grpo | rloo | reinforce_pp | remax | raft | ppo (critic + GAE)
    mode: str = "sync"  # sync (generate, then train) | one_step_off (rollout k+1 from the weights of step k-1)
    steps: int = 0  # RL steps; 0 = 30 (toy), 100 (GPU)
    prompts_per_step: int = 0  # P prompts per step; 0 = 8 (CPU) / 64 (GPU)
    samples_per_prompt: int = 0  # n samples of each prompt; 0 = 8 (1 for ppo, whose baseline is the critic)
    max_new_tokens: int = 0  # response budget; 0 = 8 (toy) / 96 (CPU) / 512 (GPU)
    temperature: float = 1.0  # sampling temperature (the trainer's log-probs use the same one)
    top_p: float = 1.0  # nucleus sampling (log-probs are then of the masked distribution: keep 1.0 for RL)
    lr: float = 0.0  # actor peak LR; 0 = 3e-3 (tiny) / 1e-6 (pretrained), x10 with LoRA (its best LR is ~10x higher)
    critic_lr: float = 0.0  # critic LR (ppo); 0 = 10 x the full fine-tuning lr
    warmup_steps: int = 0  # linear LR warmup steps
    min_lr_ratio: float = 1.0  # actor LR after the warm-up: cosine decay towards lr * this at the end (1 = constant)
    epochs: int = 1  # passes over each batch (PPO reuse: > 1 makes the clip matter)
    mini_batches: int = 1  # optimizer steps per epoch (the batch split in this many parts)
    micro_batch_tokens: int = 0  # packed tokens per forward (the memory knob); 0 = 4096 (CPU) / from memory (GPU)
    clip_low: float = 0.2  # PPO clip below 1 (no effect at 1 epoch x 1 mini-batch: the ratio is 1; see policy_loss)
    clip_high: float = 0.28  # PPO clip above 1; > clip_low is DAPO's clip-higher
    dual_clip: float = 3.0  # dual-clip constant c for negative advantages (0 = off)
    value_clip: float = 0.2  # PPO value clipping around the old values
    kl_coef: float = 0.0  # KL(pi || pi_ref) strength; 0 = no reference model at all
    kl_in: str = "loss"  # loss (GRPO: beta * KL term in the loss) | reward (InstructGPT: r_t -= beta * KL_t)
    kl_estimator: str = "k3"  # k1 | k2 | k3 (Schulman's estimators; in the loss: see kl_estimate's comment)
    entropy_coef: float = 0.0  # entropy bonus in the loss
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm
    gamma: float = 1.0  # discount (GAE, REINFORCE++)
    lam: float = 1.0  # GAE lambda; < 1 shrinks a last-token reward by lam^T on its way back (0.95^70 = 0.03)
    whiten: str = "auto"  # whiten advantages over the batch: auto (ppo, reinforce_pp) | yes | no
    dynamic_sampling: bool = False  # drop groups whose samples all scored the same, refill with new prompts (DAPO)
    refill_rounds: int = 4  # dynamic sampling: extra generation rounds at most to refill the batch (0 = drop only)
    overlong_buffer: int = 0  # soft overlong penalty over the last this-many tokens of max_new_tokens (0 = off)
    gspo: bool = False  # one importance ratio per response (GSPO) instead of per token
    tis_cap: float = -1.0  # truncated importance sampling cap on pi_old / pi_engine; -1 = 2 off-policy, 0 = off
    value_warmup_steps: int = 0  # ppo: fit the critic on the first rollouts' returns before any policy step
    grad_clip: float = 1.0  # clip the global grad norm
    eval_every: int = 0  # steps between held-out greedy evals (0 = before and after only)
    eval_problems: int = 0  # held-out prompts per eval; 0 = 64 (CPU) / 1000 (GPU)
    save_every: int = 0  # steps between checkpoints (the last step is always saved; -1 = none)
    keep_last: int = 2  # complete checkpoints kept in --out
    resume: str = "auto"  # auto (latest in --out) | never | a checkpoint folder
    seed: int = 0  # prompt order, sampling, the tiny model's init
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
    engine_memory: float = 0.3  # share of GPU memory the colocated engine takes (weights + KV cache)
    engine_sleep: bool = False  # colocated: the engine frees its weights and KV cache while the trainer steps
    engine_process: bool = False  # local backend: each rank's engine in a child process on its device (own GIL)
    grade_workers: int = 0  # math-verify grading processes; 0 = 2..8 (the cores over 2 x this machine's ranks)
    grade_timeout_s: float = 5.0  # per answer; slower ones count as wrong
    backend: str = "local"  # local (roles in this process; torchrun: data parallel) | nanoray | ray (roles as actors)
    tp: int = 1  # tensor-parallel ranks of the trainer (under torchrun; dp = world / (tp * pp)); each rank keeps an engine
    pp: int = 1  # pipeline stages of the trainer (under torchrun; 1F1B)
    engines: int = 1  # rollout engines (--backend nanoray|ray: actors, one GPU each when there are enough)
    trainer_ranks: int = 0  # --backend nanoray|ray: trainer actors, an SPMD group of tp x pp x dp; 0 = tp x pp
    rollout_gpus: int = 0  # torchrun: split the ranks' GPUs: R engines + (world - R) trainer ranks, driven by rank 0
    weight_sync: str = "broadcast"  # actors: broadcast (a process group, NCCL / gloo, buckets) | store (object store)
    log_every: int = 1  # steps between console lines (metrics.jsonl gets every step)
    wandb: str = ""  # a Weights & Biases project to log every step to as well ("" = off)
    bench: bool = False  # the benchmark instead of a run: GRPO samples/s vs TRL at its setting (GPU; see below)
    layouts: str = ""  # with --bench: e.g. sync,split,proc: the same run as a torchrun job per layout -> steps/hour, PNG
    # speed runs of random weights, which never stop on their own: a JSON list of response lengths (a real model's);
    # each prompt's samples run to one drawn from it, EOS ignored (vLLM's benchmarks replay a dataset's lengths so)
    response_lengths: str = ""
    # a learned reward beside the rule: reward = rule + reward_model_coef * rm_score (rm_score is logged apart). The
    # RM reads the text (decoded, then its own tokenizer) when its folder has a tokenizer, else the actor's token ids
    reward_model: str = ""  # HF sequence-classification folder (num_labels 1), on the trainer's devices; "" = none
    reward_model_coef: float = 1.0  # c in reward = rule + c * rm_score
    rule_reward: bool = True  # the rule (math-verify / toy) in the reward; --no-rule_reward: data without answers
    format_reward: float = 0.0  # + this for every response with a final \boxed{} answer, right or wrong (0 = off)
    # LoRA on the actor (the critic, when ppo, stays full): W frozen, W + alpha/r B A trains
    lora_rank: int = 0  # r of the adapters; 0 = full fine-tuning. Needs --tp 1
    lora_alpha: float = 0.0  # the adapters' scale is alpha / r; 0 = 2 x lora_rank (scale 2)
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every projection (QLoRA's finding)


def resolve(cfg: Config, cuda: bool) -> Config:
    """Check every choice and fill the device-dependent defaults, before anything is built."""
    checks = [(cfg.algo in ALGOS, f"--algo {cfg.algo!r}: expected one of {', '.join(ALGOS)}"),
              (cfg.mode in ("sync", "one_step_off"), f"--mode {cfg.mode!r}: expected sync or one_step_off"),
              (cfg.kl_in in ("loss", "reward"), f"--kl_in {cfg.kl_in!r}: expected loss or reward"),
              (cfg.grade_workers >= 0, f"--grade_workers {cfg.grade_workers}: expected >= 0 (0 = from the cores)"),
              (cfg.kl_estimator in ("k1", "k2", "k3"), f"--kl_estimator {cfg.kl_estimator!r}: k1, k2 or k3"),
              (not (cfg.kl_estimator == "k1" and cfg.kl_in == "loss" and cfg.kl_coef > 0),
               "--kl_estimator k1 with --kl_in loss has no gradient in expectation (E[grad log pi] = 0): use k2 "
               "or k3 in the loss, or --kl_in reward"),
              (cfg.loss_agg in AGGREGATIONS, f"--loss_agg {cfg.loss_agg!r}: one of {', '.join(AGGREGATIONS)}"),
              (cfg.whiten in ("auto", "yes", "no"), f"--whiten {cfg.whiten!r}: auto, yes or no"),
              (cfg.backend in ("local", "nanoray", "ray"), f"--backend {cfg.backend!r}: local, nanoray or ray"),
              (cfg.bench or not cfg.layouts, "--layouts is a benchmark's: python ppo.py --bench --layouts ..."),
              (cfg.epochs >= 1 and cfg.mini_batches >= 1, "--epochs and --mini_batches must be >= 1"),
              (cfg.backend != "local" or cfg.trainer_ranks == 0, "--trainer_ranks needs --backend nanoray or ray"),
              (cfg.trainer_ranks % (cfg.tp * cfg.pp) == 0,
               f"--trainer_ranks {cfg.trainer_ranks} must be a multiple of --tp {cfg.tp} x --pp {cfg.pp}"),
              (cfg.engines == 1 or cfg.backend != "local", "--engines > 1 needs --backend nanoray or ray"),
              (cfg.engines >= 1, "--engines must be >= 1"), (0 <= cfg.min_lr_ratio <= 1, "--min_lr_ratio: 0..1"),
              (cfg.weight_sync in ("broadcast", "store"), f"--weight_sync {cfg.weight_sync!r}: broadcast or store"),
              (cfg.rule_reward or cfg.reward_model, "--no-rule_reward needs --reward_model (else there is no reward)"),
              (not (cfg.engine_sleep and cfg.backend != "local" and cfg.mode != "sync"), "--engine_sleep with "
               "actors needs --mode sync (asleep, an engine cannot generate the next rollout meanwhile)"),
              (cfg.format_reward >= 0 and (cfg.rule_reward or not cfg.format_reward),
               f"--format_reward {cfg.format_reward}: must be >= 0, and needs the rule (it finds the final answer)"),
              (cfg.lora_rank >= 0 and (cfg.lora_rank == 0 or cfg.tp == cfg.pp == 1),
               f"--lora_rank {cfg.lora_rank}: must be >= 0, and LoRA needs --tp 1 --pp 1 (adapters are not split)"),
              (not (bad := {t.strip() for t in cfg.lora_targets.split(",")} - set(LORA_TARGETS)),
               f"--lora_targets: unknown {sorted(bad)}; a comma list of {','.join(LORA_TARGETS)}"),
              (cfg.temperature > 0, "--temperature must be > 0 (RL samples; greedy has no exploration)"),
              (not cfg.engine_process or (cfg.backend == "local" and not cfg.rollout_gpus), "--engine_process is the "
               "colocated layout of the local backend (actors: --backend nanoray/ray, --rollout_gpus: own processes)")]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"ppo.py: {msg}")
    toy = (cfg.data or ("toy" if cfg.model == "tiny" else "synthetic")) == "toy"
    pick = lambda v, toy_v, cpu_v, gpu_v: v or (toy_v if toy else gpu_v if cuda else cpu_v)  # noqa: E731
    n = cfg.samples_per_prompt or (1 if cfg.algo == "ppo" else 8)
    full_lr = cfg.lr or (3e-3 if cfg.model == "tiny" else 1e-6)
    # LoRA's best LR is about 10x full fine-tuning's (Schulman et al. 2025, "LoRA Without Regret")
    lr = full_lr * 10 if cfg.lora_rank and not cfg.lr else full_lr
    if cfg.algo in ("grpo", "dr_grpo", "rloo") and n < 2:
        raise ValueError(f"ppo.py: --algo {cfg.algo} compares a prompt's samples: --samples_per_prompt must be >= 2")
    return dataclasses.replace(
        cfg, data=cfg.data or ("toy" if toy else "synthetic"), out=cfg.out or "ckpt/ppo-" + "-".join(Path(cfg.model).parts[-3:]),   # .../step_N/hf: not just "hf"
        steps=pick(cfg.steps, 30, 30, 100), prompts_per_step=pick(cfg.prompts_per_step, 8, 8, 64),
        samples_per_prompt=n,
        max_new_tokens=pick(cfg.max_new_tokens, 8, 96, 512),
        lr=lr, critic_lr=cfg.critic_lr or 10 * full_lr,
        micro_batch_tokens=pick(cfg.micro_batch_tokens, 4096, 4096, 0),        # GPU: the trainer derives it
        eval_problems=pick(cfg.eval_problems, 32, 64, 1000),
        tis_cap=(2.0 if cfg.mode == "one_step_off" else 0.0) if cfg.tis_cap < 0 else cfg.tis_cap,
        dtype=cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if cuda else "float32"),
        reward_model=str(Path(cfg.reward_model).resolve()) if cfg.reward_model else "",   # actors have another cwd
        response_lengths=str(Path(cfg.response_lengths).resolve()) if _lengths(cfg.response_lengths) else "",
        lora_alpha=cfg.lora_alpha or 2.0 * cfg.lora_rank, lora_targets=cfg.lora_targets.replace(" ", ""),
        grade_workers=cfg.grade_workers or default_grade_workers())


@functools.lru_cache(maxsize=4)
def _lengths(path: str) -> tuple:
    """--response_lengths FILE -> its lengths (a JSON list of positive ints; read once); "" -> ()."""
    try:
        xs = json.loads(Path(path).read_text()) if path else []
    except (OSError, ValueError) as e:
        xs = f"{type(e).__name__}: {e}"
    if not isinstance(xs, list) or (path and not xs) or not all(type(x) is int and x > 0 for x in xs):
        raise ValueError(f"ppo.py: --response_lengths {path}: expected a JSON list of positive ints ({str(xs)[:80]})")
    return tuple(xs)


def default_grade_workers() -> int:
    """--grade_workers 0: 2..8 processes, the cores over 2 x this machine's ranks. Grading sits on a synchronous
    step's path (~0.3 s of a 2.5 s GRPO step with 2 workers on the H200 host), so a GPU host's cores should share it."""
    return min(8, max(2, (os.cpu_count() or 2) // (2 * int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))


# ---- prompts and rewards -----------------------------------------------------------------------------------
# Prompts are token ids (prepare_data's rl recipe: the chat template + the shared instruction, the exact
# prompt SFT trained on) with a gold answer. The toy task lets a tiny random model learn in seconds on a
# CPU: prompts of random tokens, reward = the share of response tokens below TOY_GOOD (about 1 in 5 of the
# vocabulary at random init, so every group has variance and the policy gradient has a signal).

TOY_GOOD = 20


def toy_prompts(n: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(TOY_GOOD, vocab, (4,), generator=g).tolist(), "answer": ""} for _ in range(n)]


def load_prompts(cfg: Config, vocab: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) as [{prompt_ids, answer}]."""
    if cfg.data == "toy":
        return toy_prompts(512, vocab, cfg.seed), toy_prompts(cfg.eval_problems, vocab, cfg.seed + 1)
    import nanosets
    import prepare_data
    folder = Path(cfg.data)
    if cfg.data == "synthetic":
        folder = Path(prepare_data.build(prepare_data.Config(recipe="rl"))["path"])
    splits = {}
    for split in ("train", "test"):
        path = folder / f"{split}.nano"
        if not path.is_file():
            raise FileNotFoundError(f"ppo.py: --data {cfg.data}: {path} is missing (build it with "
                                    "`python prepare_data.py --recipe rl ...`)")
        ds = nanosets.load_dataset(str(path))
        need = {"prompt_ids", "answer"} if cfg.rule_reward else {"prompt_ids"}    # a reward model needs no gold
        if not need <= set(ds.column_names):
            raise ValueError(f"ppo.py: {path} has columns {ds.column_names}; RL needs {' and '.join(sorted(need))} "
                             "(prepare_data.py --recipe rl)")
        splits[split] = [{"prompt_ids": [int(t) for t in r["prompt_ids"]], "answer": r.get("answer", "")} for r in ds]
        if any(max(r["prompt_ids"]) >= vocab for r in splits[split]):
            raise ValueError(f"ppo.py: {path} holds token ids >= the model's vocabulary {vocab}: another tokenizer")
    return splits["train"], splits["test"][: cfg.eval_problems]


class Rewarder:
    """Scores responses: the rule -- math (the last \\boxed{} graded by eval.Grader against the gold) or toy --
    and, given `rm` (a function: samples -> the reward model's scores, asked of the trainer role),
    reward = rule (unless --no-rule_reward) + reward_model_coef * rm + format_reward * (a final answer given)."""

    def __init__(self, cfg: Config, tokenizer, rm=None):
        self.toy, self.tok, self.grader = cfg.data == "toy", tokenizer, None
        self.rm, self.rule, self.coef, self.lock = rm, cfg.rule_reward, cfg.reward_model_coef, threading.Lock()
        self.fmt, self.closed = cfg.format_reward, False
        if not self.toy:
            import eval as ev
            if tokenizer is None:
                raise ValueError(f"ppo.py: --model {cfg.model} has no tokenizer: math rewards need the text")
            self.grader = ev.Grader(cfg.grade_workers or default_grade_workers(), cfg.grade_timeout_s)
            self.grader.start()                                  # workers import math-verify meanwhile

    def __call__(self, samples: list[dict], rm: bool = True) -> tuple[list[float], list[bool]]:
        """(scores, a-final-answer-was-given) per sample; rm=False: the rule alone (held-out accuracy). With the
        reward model or a format reward, each sample keeps its parts (rule_score, rm_score) for the metrics."""
        if not rm or (self.rm is None and not self.fmt):
            return self.grade(samples)
        n = len(samples)
        rule, answered = self.grade(samples) if self.rule else ([0.0] * n, [False] * n)
        rms = self.rm(samples) if self.rm is not None else [0.0] * n
        for x, r, s in zip(samples, rule, rms):
            x["rule_score"], x["rm_score"] = r, s
        return [r + self.coef * s + self.fmt * a for r, s, a in zip(rule, rms, answered)], answered

    def grade(self, samples: list[dict]) -> tuple[list[float], list[bool]]:
        """The rule: (scores, a-final-answer-was-given) per sample."""
        if self.closed:
            raise RuntimeError("ppo.py: the rewarder was closed (the run is over): nothing grades any more")
        if self.toy:
            s = [sum(t < TOY_GOOD for t in x["response"]) / max(1, len(x["response"])) for x in samples]
            return s, [True] * len(samples)
        texts = [self.tok.decode(x["response"], skip_special_tokens=True) for x in samples]
        with self.lock:                                    # one caller at a time (see _loop's thread)
            grades = self.grader.grade(zip(texts, [x["answer"] for x in samples]))
        return [float(g.correct) for g in grades], [g.status != "no_answer" for g in grades]

    def close(self):
        self.closed = True            # a late grade() (a thread's rollout finishing after the run) would restart them
        if self.grader is not None:
            with self.lock:                               # not while _loop's thread grades
                self.grader.close()


class RewardModel:
    """A learned reward: an HF sequence classifier with one label (AutoModelForSequenceClassification), held by
    the trainer role on the trainer's device in its dtype; rm(samples) -> one float per prompt + response.
    What it reads: when its folder has a tokenizer, the TEXT (prompt + response decoded by the actor's
    tokenizer, chat markup included, then encoded by the RM's own without adding special tokens: the markup
    is already in the text); when it has none, the actor's token ids as they are (it must share the actor's
    vocabulary: checked). Forward-only, batched by the token budget (padded tokens), shortest first."""

    def __init__(self, path: str, dtype, device, budget: int, actor_folder: str | None):
        from transformers import AutoConfig, AutoModelForSequenceClassification
        from nanovllm import load_tokenizer
        self.where, want = f"ppo.py: --reward_model {path}", "an HF sequence-classification folder (num_labels=1)"
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{self.where}: no config.json there; expected {want}")
        hf = AutoConfig.from_pretrained(path)
        archs = hf.architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in archs) or hf.num_labels != 1:
            raise ValueError(f"{self.where}: expected {want}; its config.json says architectures {archs}, "
                             f"num_labels {hf.num_labels}")
        if hf.pad_token_id is None:
            raise ValueError(f"{self.where}: config.json has no pad_token_id (batches are padded with it)")
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device).eval()
        self.pad, self.vocab, self.budget, self.device = hf.pad_token_id, hf.vocab_size, budget, device
        self.tok = load_tokenizer(path)
        self.actor_tok = load_tokenizer(actor_folder) if self.tok is not None and actor_folder else None
        if self.tok is not None and self.actor_tok is None:
            raise ValueError(f"{self.where} reads text (it has a tokenizer), but the actor has no tokenizer to "
                             "decode the responses with")

    def _ids(self, samples: list[dict]) -> list[list[int]]:
        seqs = [s["prompt_ids"] + s["response"] for s in samples]
        if self.tok is not None:
            texts = self.actor_tok.batch_decode(seqs)                    # special tokens (chat markup) kept
            return self.tok(texts, add_special_tokens=False)["input_ids"]
        if (top := max(max(q) for q in seqs)) >= self.vocab:
            raise ValueError(f"{self.where}: token id {top} >= its vocabulary of {self.vocab}: without a tokenizer "
                             "of its own it reads the actor's ids, so it must share the actor's tokenizer")
        return seqs

    @torch.no_grad()
    def __call__(self, samples: list[dict]) -> list[float]:
        seqs, out = self._ids(samples), [0.0] * len(samples)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))     # similar lengths share a batch
        k = 0
        while k < len(order):
            b = 1                              # grow while (b + 1) rows x the longest one fit the token budget
            while k + b < len(order) and (b + 1) * len(seqs[order[k + b]]) <= self.budget:
                b += 1
            rows, T = order[k:k + b], len(seqs[order[k + b - 1]])
            ids = torch.full((b, T), self.pad, dtype=torch.long)          # [b, T], padded on the right
            mask = torch.zeros(b, T, dtype=torch.long)
            for j, i in enumerate(rows):
                ids[j, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[j, : len(seqs[i])] = 1
            # HF's classifier pools each row at its last token that is not pad_token_id: right padding makes
            # that the last real token, as when the row is scored alone
            scores = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for i, v in zip(rows, scores[:, 0].float().tolist()):          # [b, 1] -> b floats (syncs the GPU)
                out[i] = v
            k += b
        return out


# ---- LoRA --------------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021, eq. 3): freeze a weight W [out, in] and learn a low-rank change of it,
#     y = x W^T + (alpha / r) (x A^T) B^T,      A [r, in] random,  B [out, r] zeros (the run starts AT the base),
# so the trained state is r * (in + out) numbers per matrix instead of in * out, and with it AdamW's fp32
# master, m and v: what lets a bigger actor train on one GPU. How it attaches without touching nanotron: the
# model applies every projection through a module (qkv, o_proj, gate_up, down: F.linear of its .weight) and
# Transformer.hf_slots() says which output rows of which module hold an HF tensor (q, k, v are row blocks of
# the fused qkv; gate, up of gate_up). A forward hook on each module adds the adapters' term to those rows of
# its output. Everything that leaves the trainer is MERGED, W + (alpha / r) B A in the model dtype: the
# engine's weights on every sync (the rollout policy is the trained one), and the checkpoints' model files
# (merge.py then exports the trained model); lora_step_N.pt beside step_N holds A, B and their AdamW state. With the
# adapters off the actor IS the base model: the KL reference needs no second copy. Not done: tp > 1 (a
# row-parallel layer's A would be split over ranks, its x A^T summed by an all-reduce).

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRA:
    """Adapters on the `targets` projections of a nanotron Transformer (tp = 1), attached as forward hooks.
    A[key], B[key]: fp32 parameters, key = the HF module name (model.layers.3.self_attn.q_proj)."""

    def __init__(self, model, rank: int, alpha: float, targets: list[str], seed: int):
        self.scale, self.on, self.A, self.B = alpha / rank, True, {}, {}
        model.requires_grad_(False)                       # the base is frozen: no grads, no optimizer state
        owner = {id(m.weight): m for m in model.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)}
        parts = {}                                        # module -> [(first output row, rows, key)]
        for name, slot in model.hf_slots().items():
            key = name.removesuffix(".weight")
            if not name.endswith(".weight") or key.rsplit(".", 1)[-1] not in targets:
                continue
            out, inp = slot.full_shape
            dev = slot.param.device
            # A ~ U(-1/sqrt(in), 1/sqrt(in)): nn.Linear's (and PEFT's) kaiming_uniform(a=sqrt(5)); seeded by
            # name, so every layout starts from the same adapters
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            self.A[key] = nn.Parameter(((torch.rand(rank, inp, generator=g) * 2 - 1) / math.sqrt(inp)).to(dev))
            self.B[key] = nn.Parameter(torch.zeros(out, rank, device=dev))
            first = slot.offset if slot.kind == "col" else 0
            parts.setdefault(owner[id(slot.param)], []).append((first, out, key))
        for module, ps in parts.items():
            module.register_forward_hook(lambda m, args, y, ps=sorted(ps): self._add(ps, args[0], y))

    def _add(self, parts, x, y):
        """y [N, out] of a frozen projection of x [N, in] -> y + (alpha / r) x A^T B^T on each part's rows."""
        if not self.on:
            return y
        pieces, at = [], 0
        for first, rows, key in parts:
            A, B = self.A[key].to(x.dtype), self.B[key].to(x.dtype)     # fp32 masters, the model's dtype to compute
            delta = self.scale * ((x @ A.t()) @ B.t())                    # [N, in] -> [N, r] -> [N, rows]
            pieces += [y[..., at:first], y[..., first:first + rows] + delta]
            at = first + rows
        pieces = [p for p in pieces + [y[..., at:]] if p.shape[-1]]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)

    def params(self) -> list[nn.Parameter]:
        return [p for key in self.A for p in (self.A[key], self.B[key])]

    @contextlib.contextmanager
    def disabled(self):
        """Inside: the base model (the KL reference)."""
        self.on = False
        try:
            yield
        finally:
            self.on = True

    def delta(self, key: str) -> torch.Tensor:
        """(alpha / r) B A [out, in] fp32: what merging adds to the base weight."""
        return self.scale * (self.B[key].detach() @ self.A[key].detach())

    def merged(self, named):
        """(hf_name, tensor) pairs of the base -> the same with W + (alpha / r) B A for the targeted ones."""
        for name, t in named:
            key = name.removesuffix(".weight")
            yield name, ((t.float() + self.delta(key)).to(t.dtype) if key in self.A else t)

    @contextlib.contextmanager
    def merged_into(self, model):
        """Inside: the model's own parameters hold the merged weights (for save_checkpoint / save_hf to write);
        after: exactly the base again (copied back from CPU memory, not subtracted: no round-off)."""
        slots, saved = model.hf_slots(), {}
        with torch.no_grad():
            for name, w in self.merged((k + ".weight", slots[k + ".weight"].local()) for k in self.A):
                saved[name] = slots[name].local().to("cpu", copy=True)
                slots[name].local().copy_(w)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, w0 in saved.items():
                    slots[name].local().copy_(w0)

    def state_dict(self) -> dict:
        return {"A": {k: v.detach().cpu() for k, v in self.A.items()},
                "B": {k: v.detach().cpu() for k, v in self.B.items()}}

    @torch.no_grad()
    def load_state_dict(self, sd: dict):
        for k in self.A:
            self.A[k].copy_(sd["A"][k])
            self.B[k].copy_(sd["B"][k])


class LoRAAdamW:
    """torch's AdamW on the adapters, answering the calls Trainer makes of nanotron's optimizer. Data parallel:
    each rank's adapter grads come from its own samples, and (every loss being divided by the whole step's
    counts) their SUM over dp is the full batch's gradient: one all-reduce of all of them, as one flat buffer,
    before the norm (nanotron does the same for the base weights; here the critic's value head is the model)."""

    def __init__(self, lora: LoRA, nt, mesh, lr: float):
        self.params, self.nt, self.mesh, self.synced = lora.params(), nt, mesh, False
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)  # nanotron's

    def no_sync(self):
        return contextlib.nullcontext()                  # micro-batches accumulate locally; _sync sums once

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=False)
        self.synced = False

    def _sync(self):
        if self.synced or self.mesh.dp == 1:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in self.params])   # [all adapter elements]
        self.nt.all_reduce_(flat, self.mesh.group("dp"))
        for p, g in zip(self.params, flat.split([p.numel() for p in self.params])):
            p.grad.copy_(g.view_as(p))
        self.synced = True

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        self._sync()
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    @property
    def dp(self):                 # nanotron's optimizer answers opt.dp.grad_norm(): so does this one
        return self

    def grad_norm(self) -> torch.Tensor:
        self._sync()
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params]))

    def step(self, lr: float | None = None):
        self._sync()
        for g in self.opt.param_groups:
            g["lr"] = lr if lr is not None else g["lr"]
        self.opt.step()

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, sd: dict):
        self.opt.load_state_dict(sd)


class LoRABase:
    """The actor with its adapters off: the frozen base model, used as the KL reference (no second copy)."""

    def __init__(self, actor, lora: LoRA):
        self.actor, self.lora = actor, lora

    def __call__(self, *args):
        with self.lora.disabled():
            return self.actor(*args)

    def logprobs(self, *args):
        return self.actor.logprobs(*args)                # the LM head has no adapter


def lora_file(folder: Path) -> Path:
    """lora_step_N.pt beside the checkpoint step_N: written BEFORE step_N (whose manifest.json, written last, makes
    it complete), so a complete step_N always has its adapters (as critic_step_N)."""
    return Path(folder).with_name(f"lora_{Path(folder).name}.pt")


def lora_save(trainer, folder: Path) -> None:
    """A checkpoint's adapters: A, B, their AdamW state, the LoRA hyper-parameters (the model files: merged)."""
    tmp = folder.with_name(f".{folder.name}-lora.pt.tmp")
    torch.save({"lora": trainer.lora.state_dict(), "opt": trainer.opt.state_dict(),
                "hparams": _lora_hparams(trainer.cfg)}, tmp)
    tmp.replace(lora_file(folder))


def lora_resume(trainer, nt, src: Path) -> dict:
    """Resume a LoRA run: the base as built from --model, A, B and their AdamW state from lora_file(src); the
    checkpoint's merged weights must then equal base + (alpha / r) B A (else --model is another base).
    Returns the manifest. (The RNG is not restored: ppo.py draws from seeded generators only.)"""
    f, want = Path(src) / "lora.pt", _lora_hparams(trainer.cfg)     # (inside step_N: checkpoints of before)
    f = f if f.is_file() else lora_file(src)
    if not f.is_file():
        raise FileNotFoundError(f"ppo.py: {f} is missing: {src} is not a LoRA run's checkpoint (resume it without "
                                "--lora_rank, or start a new --out)")
    state = torch.load(f, map_location="cpu")
    if state["hparams"] != want:
        raise ValueError(f"ppo.py: {src} was trained with LoRA {state['hparams']}, this run asks for {want}")
    trainer.lora.load_state_dict(state["lora"])
    trainer.opt.load_state_dict(state["opt"])
    with nt.CheckpointReader(src) as ck:
        if diffs := nt.config_mismatches(ck.config, trainer.actor.cfg):
            raise ValueError(f"ppo.py: {src} was saved from another model: {'; '.join(diffs)}")
        name = next(iter(trainer.lora.A)) + ".weight"
        saved, (_, mine) = ck.tensor(name), next(trainer.lora.merged([(name, trainer.actor.hf_slots()[name].local())]))
        if not torch.allclose(saved.float(), mine.float().cpu(), rtol=1e-2, atol=1e-3):
            raise ValueError(f"ppo.py: {src} holds {name} = base + LoRA for another base model than --model "
                             f"{trainer.cfg.model}: resume with the --model that run trained")
        return ck.manifest


def _lora_hparams(cfg: Config) -> dict:
    return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets}


# ---- trainer -----------------------------------------------------------------------------------------------
# The actor (and, for PPO, the critic: the same network with a fresh scalar value head; and the frozen
# reference for KL) are nanotron Transformers. A batch of responses is packed, with their prompts, into
# micro-batches of at most micro_batch_tokens; only the rows that predict a response token go through the
# LM head (`rows`), and their per-token results are scattered back to the padded [B, T] layout that the
# algorithm core works in. Each micro-batch's loss is already divided by the whole step's counts
# (aggregate), so accumulating the micro-batches' gradients gives exactly the full batch's gradient.

def _ints(it, n: int) -> torch.Tensor:
    """n Python ints -> int64 [n] (through numpy's fromiter: ~30 ns an int, torch.tensor(list) ~200)."""
    return torch.from_numpy(np.fromiter(it, dtype=np.int64, count=n))


def pack(samples: list[dict], idx: list[int], budget: int, device) -> list[dict]:
    """Samples idx -> micro-batches: input_ids [N], positions [N], cu_seqlens [b+1], rows (the packed row that
    predicts each response token, [n_resp]), targets [n_resp], where (b_index, t) [n_resp] into [B, T].
    Greedy in order: a sample joins the current micro-batch while the total stays <= budget. Per-token index
    math is done with tensor ops (a Python loop over ~80k tokens per step cost ~45 ms of the trainer's host
    time); the test suite keeps the per-token loop as the reference this must equal."""
    groups, cur, used = [], [], 0
    for i in idx:
        n = len(samples[i]["prompt_ids"]) + len(samples[i]["response"])
        if cur and used + n > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    groups += [cur] if cur else []
    mbs = []
    for g in groups:
        P = torch.tensor([len(samples[i]["prompt_ids"]) for i in g])                    # [b] prompt lengths
        R = torch.tensor([len(samples[i]["response"]) for i in g])                      # [b] response lengths
        L = P + R
        cu = torch.zeros(len(g) + 1, dtype=torch.int64)
        cu[1:] = L.cumsum(0)                                                            # [b+1] sequence starts
        ids = _ints(itertools.chain.from_iterable((samples[i]["prompt_ids"], samples[i]["response"])[k]
                                                  for i in g for k in (0, 1)), int(L.sum()))          # [N]
        first = lambda lens, starts: torch.arange(int(lens.sum())) - torch.repeat_interleave(starts, lens)  # noqa: E731
        pos = first(L, cu[:-1])                                                         # [N] 0.. within each sequence
        t = first(R, R.cumsum(0) - R)                                                   # [n_resp] 0.. within a response
        rows = torch.repeat_interleave(cu[:-1] + P - 1, R) + t                         # row p predicts token p + 1
        tgt = _ints(itertools.chain.from_iterable(samples[i]["response"] for i in g), int(R.sum()))   # [n_resp]
        on = lambda x: x.to(device)                                                     # noqa: E731
        mbs.append({"input_ids": on(ids), "positions": on(pos), "cu_seqlens": on(cu.to(torch.int32)),
                    "max_seqlen": int(L.max()), "rows": on(rows), "targets": on(tgt),
                    "where": (on(torch.repeat_interleave(torch.tensor(g), R)), on(t)), "samples": list(g),
                    "samples_t": on(torch.tensor(g, dtype=torch.int64))})           # [b], to index device tensors
    return mbs


def _to_device(batch: dict, keys: tuple, device) -> dict:
    """The update's [B, T] tensors on the device ONCE, before its first micro-batch: indexing the host copies per
    micro-batch and copying each (pageable memory: a copy the host waits on) stalled the GPU several times a
    micro-batch. Missing or None entries are skipped."""
    return {k: batch[k].to(device) for k in keys if torch.is_tensor(batch.get(k))}


REUSE_LOGP = True      # tests turn it off to check that the shortcut below changes nothing
OVERLAP_HERE = True    # one-step-off with in-process engines: generate in a thread (tests compare it with off)
# ...on a CUDA stream that outranks the trainer's (-1 beats the default 0: the block scheduler starts the engine's
# waiting kernels first; decode latency is the rollout's speed). Measured: +3% on one H200 (BENCHMARKS.md).
ENGINE_STREAM_PRIORITY = -1


class Trainer:
    """Actor (+ critic, + reference) on one nanotron mesh."""

    def __init__(self, cfg: Config, nt, mesh, mcfg, path):
        self.cfg, self.nt, self.mesh = cfg, nt, mesh
        # One update per batch (1 epoch, 1 mini-batch): pi_old IS the policy being updated, so its log-probs are
        # the update's own forward, detached (ratio exactly 1, gradient grad log pi), and the separate forward
        # pass for them is skipped (~1/3 of the actor's time). Not with KL in the reward: advantages need it first.
        self.reuse_logp = REUSE_LOGP and cfg.epochs == cfg.mini_batches == 1 and not (
            cfg.kl_coef > 0 and cfg.kl_in == "reward")
        dtype = getattr(torch, cfg.dtype)

        def build(seed):    # pp > 1: this rank's stage (its layers; the embedding first, the head last)
            m = nt.build_stage(mcfg, mesh, dtype=dtype) if mesh.pp > 1 else nt.Transformer(mcfg, mesh, dtype=dtype)
            return m.init_random(seed) if path is None else m.load_hf(path)
        self.actor = build(cfg.seed)
        self.lora = None
        if cfg.lora_rank:            # LoRA: the base frozen, the adapters train; the reference is the base itself
            self.lora = LoRA(self.actor, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","), cfg.seed)
            self.opt = LoRAAdamW(self.lora, nt, mesh, cfg.lr)
        else:
            self.opt = nt.build_optimizer(self.actor, mesh, 1 if mesh.dp > 1 else 0, cfg.lr, weight_decay=0.0)
        self.ref = None if cfg.kl_coef <= 0 else LoRABase(self.actor, self.lora) if self.lora else \
            build(cfg.seed).requires_grad_(False)
        self.critic = self.value_head = None
        if cfg.algo == "ppo":
            self.critic = build(cfg.seed)
            self.critic_opt = nt.build_optimizer(self.critic, mesh, 1 if mesh.dp > 1 else 0, cfg.critic_lr,
                                                 weight_decay=0.0)
            g = torch.Generator().manual_seed(cfg.seed + 7)
            self.value_head = nn.Linear(mcfg.hidden_size, 1).to(mesh.device)   # fresh, fp32, replicated
            with torch.no_grad():
                self.value_head.weight.copy_(torch.randn(1, mcfg.hidden_size, generator=g) * 1e-3)
                self.value_head.bias.zero_()
            self.head_opt = torch.optim.AdamW(self.value_head.parameters(), lr=cfg.critic_lr, weight_decay=0.0)

    def _scatter(self, vals: torch.Tensor, mb: dict, shape) -> torch.Tensor:
        out = torch.zeros(shape, dtype=torch.float32, device=vals.device)
        out[mb["where"][0], mb["where"][1]] = vals.float()
        return out

    def _logp(self, model, h, mb, entropy=False):
        """(log p of the response tokens at the sampling temperature, entropy or None), packed [n_resp], from the
        last stage's hidden states h [N, Hd] (only the rows that predict a response token reach the LM head)."""
        return model.logprobs(h.index_select(0, mb["rows"]), mb["targets"], self.cfg.temperature, entropy)

    def _values(self, h, mb):
        return self.value_head(h.index_select(0, mb["rows"]).float()).squeeze(-1)

    def _from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """pp > 1: only the last stage computed t; broadcast it to the other stages of this pipeline."""
        if self.mesh.pp == 1:
            return t
        m = self.mesh
        t = t.to(m.device)
        torch.distributed.broadcast(t, src=m.rank_of(m.dp_rank, m.pp - 1, m.tp_rank), group=m.pp_group)
        return t.cpu()

    @torch.no_grad()
    def score(self, samples: list[dict], shape, timer: dict | None = None, old: bool | None = None) -> dict:
        """Forward-only passes: the trainer's log-probs (pi_old), the reference's, the critic's values [B, T].
        pp > 1: the micro-batches flow through the stages (nt.pipeline_forward) and the last one scatters.
        timer: seconds per role (actor, reference, critic) are added to it. old: pi_old's log-probs too (default:
        unless reuse_logp, where update_actor fills them in)."""
        mbs = pack(samples, list(range(len(samples))), self.cfg.micro_batch_tokens, self.mesh.device)
        out, timer = {}, {} if timer is None else timer
        actor = self.actor if (not self.reuse_logp if old is None else old) else None
        for key, role, model, fn in (("old_logp", "actor", actor, lambda h, mb: self._logp(self.actor, h, mb)[0]),
                                     ("ref_logp", "reference", self.ref, lambda h, mb: self._logp(self.ref, h, mb)[0]),
                                     ("values", "critic", self.critic, self._values)):
            if model is None:
                out[key] = None
                continue
            t0, t = time.perf_counter(), torch.zeros(shape, device=self.mesh.device)
            if self.mesh.pp > 1:
                vals = self.nt.pipeline_forward(model, self.mesh, mbs, lambda h, k: fn(h, mbs[k]))
            else:
                vals = [fn(model(mb["input_ids"], mb["positions"], mb["cu_seqlens"], mb["max_seqlen"]), mb)
                        for mb in mbs]
            for mb, v in zip(mbs, vals):                   # (empty on the stages before the last)
                t += self._scatter(v, mb, shape)
            out[key] = self._from_last_stage(t.cpu())       # (.cpu() waits for the device, once: honest timing)
            timer[role] = timer.get(role, 0.0) + time.perf_counter() - t0
        return out

    def _micro_steps(self, model, mbs, opt, loss_on):
        """Accumulate the micro-batches' gradients (dp reduces once, on the last) -> summed loss, a 0-dim device
        tensor (read it after the optimizer step is queued: a read per micro-batch would let the GPU run dry each
        time). loss_on(hidden of the last stage, mb) -> this micro-batch's loss, already divided by the step's
        counts. pp > 1: nanotron's 1F1B pipeline runs the same micro-batches through the stages (loss_fn hook)."""
        if self.mesh.pp > 1:
            return self.nt.pipeline_step(model, self.mesh, mbs, optimizer=opt, sync=False,
                                         loss_fn=lambda h, k: loss_on(h, mbs[k]))[0]
        total = torch.zeros((), dtype=torch.float64, device=self.mesh.device)
        for k, mb in enumerate(mbs):
            with opt.no_sync() if k < len(mbs) - 1 else _null():
                loss = loss_on(model(mb["input_ids"], mb["positions"], mb["cu_seqlens"], mb["max_seqlen"]), mb)
                loss.backward()
            total += loss.detach()
        return total

    def update_actor(self, samples, batch: dict, idx: list[int], lr: float, norm: dict) -> dict:
        cfg, dev = self.cfg, self.mesh.device
        stats = {"clip_frac": [], "approx_kl": [], "entropy": [], "kl": []}
        shape = batch["mask"].shape
        reused = torch.zeros(shape, device=dev) if batch["old_logp"] is None else None     # see reuse_logp
        on_dev = _to_device(batch, ("old_logp", "lmask", "keep", "adv", "engine_logp", "ref_logp"), dev)

        def loss_on(h, mb):
            sel = mb["samples_t"]
            logp_p, ent_p = self._logp(self.actor, h, mb, entropy=True)
            logp = self._scatter(logp_p, mb, shape)[sel]   # [n_resp] -> [B, T] -> [b, T]: this mb's rows
            take = lambda k: on_dev[k][sel]                              # noqa: E731
            if reused is not None:
                reused[sel] = logp.detach()                    # pi_old = this very forward (see reuse_logp)
            old = logp.detach() if reused is not None else take("old_logp")
            mask = take("lmask")                    # the response tokens that count (dynamic sampling zeroes some)
            if cfg.algo == "raft":                                       # SFT on the correct samples
                loss = aggregate(-logp, mask * take("keep")[:, None], cfg.loss_agg, norm["tokens"], norm["seqs"],
                                 norm["max_len"])
            else:
                w = tis_weights(old, take("engine_logp"), cfg.tis_cap) if cfg.tis_cap > 0 else None
                pl, st = policy_loss(logp, old, take("adv"), mask, cfg.clip_low, cfg.clip_high,
                                     cfg.dual_clip, cfg.gspo, w)
                stats["clip_frac"].append(st["clip_frac"])
                stats["approx_kl"].append(st["approx_kl"])
                loss = aggregate(pl, mask, cfg.loss_agg, norm["tokens"], norm["seqs"], norm["max_len"])
                if cfg.kl_coef > 0 and cfg.kl_in == "loss":
                    kl = kl_estimate(logp, take("ref_logp"), cfg.kl_estimator)
                    loss = loss + cfg.kl_coef * aggregate(kl, mask, cfg.loss_agg, norm["tokens"], norm["seqs"],
                                                          norm["max_len"])
                    stats["kl"].append(masked_mean(kl.detach(), mask))
            ent = self._scatter(ent_p, mb, shape)[sel]
            stats["entropy"].append(masked_mean(ent.detach(), mask))
            if cfg.entropy_coef > 0:
                loss = loss - cfg.entropy_coef * aggregate(ent, mask, cfg.loss_agg, norm["tokens"], norm["seqs"],
                                                           norm["max_len"])
            return loss
        self.opt.zero_grad()
        loss = self._micro_steps(self.actor, pack(samples, idx, cfg.micro_batch_tokens, dev), self.opt, loss_on)
        gnorm = self.opt.clip_grad_norm_(cfg.grad_clip) if cfg.grad_clip > 0 else self.opt.dp.grad_norm()
        self.opt.step(lr=lr)
        if reused is not None:                                    # pp > 1: the last stage computed them
            batch["old_logp"] = self._from_last_stage(reused.cpu())
        zero = torch.zeros((), device=dev)
        names = sorted(stats)                   # pp > 1: the statistics live on the last stage
        means = torch.stack([torch.stack(stats[k]).float().mean() if stats[k] else zero for k in names]).double()
        means = self._from_last_stage(means.cpu()).tolist()      # the first read of the update: it waits for it
        return {"pg_loss": float(loss), "grad_norm": float(gnorm), **dict(zip(names, means))}

    def update_critic(self, samples, batch: dict, idx: list[int], lr: float, norm: dict) -> float:
        cfg, dev = self.cfg, self.mesh.device

        on_dev = _to_device(batch, ("values", "returns", "lmask"), dev)

        def loss_on(h, mb):
            sel = mb["samples_t"]
            v = self._scatter(self._values(h, mb), mb, batch["mask"].shape)[sel]
            vl = value_loss(v, on_dev["values"][sel], on_dev["returns"][sel], cfg.value_clip)
            return aggregate(vl, on_dev["lmask"][sel], "token-mean", norm["tokens"], norm["seqs"])
        self.critic_opt.zero_grad()
        self.head_opt.zero_grad()
        loss = self._micro_steps(self.critic, pack(samples, idx, cfg.micro_batch_tokens, dev), self.critic_opt,
                                 loss_on)
        for p in self.value_head.parameters():       # the head is outside nanotron's DataParallel: sum it here
            if p.grad is not None:                   # (pp > 1: only the last stage uses the head)
                self.nt.all_reduce_(p.grad, self.mesh.group("dp"))
        if cfg.grad_clip > 0:
            self.critic_opt.clip_grad_norm_(cfg.grad_clip)
            torch.nn.utils.clip_grad_norm_(self.value_head.parameters(), cfg.grad_clip)
        self.critic_opt.step(lr=lr)
        for g in self.head_opt.param_groups:
            g["lr"] = lr
        self.head_opt.step()
        return float(loss)

    def weights(self) -> list:
        """(hf_name, full tensor) of the actor, for the engine: all-gathered over tp (a collective: every rank
        iterates) and, pp > 1, every stage's tensors broadcast to its whole pipeline (each rank's engine holds
        the full model). A tied embedding comes from the first stage (the last stage's copy is the same)."""
        named, m = list(self.actor.state_dict_hf()), self.mesh
        if self.lora is not None:
            named = list(self.lora.merged(named))                        # LoRA: W + (alpha / r) B A
        if m.pp == 1:
            return named
        full = {}
        bcast = lambda t, src: torch.distributed.broadcast(t, src, group=m.pp_group)     # noqa: E731
        for s in range(m.pp):
            got = broadcast_tensors(named if m.pp_rank == s else None, m.rank_of(m.dp_rank, s, m.tp_rank),
                                    bcast, m.device)
            for n, t in got:
                full.setdefault(n, t)
        return list(full.items())

    def merged(self):
        """Inside: the actor's parameters hold the weights the engine gets (LoRA: merged), for writing them."""
        return self.lora.merged_into(self.actor) if self.lora is not None else _null()


def broadcast_tensors(named: list | None, src: int, bcast, device, bucket_bytes: int = 256 << 20) -> list:
    """[(name, tensor)] from rank src (which passes them; the others pass None) to every rank of a group;
    bcast(tensor, src) broadcasts one tensor in place (torch.distributed.broadcast on a group, or a link's).
    The names, shapes and dtypes go first as pickled bytes; then the tensors in flat BUCKETS of one dtype,
    one broadcast per ~bucket_bytes instead of one per tensor (a 0.6B model has ~310 tensors, and every call
    pays a launch and a handshake). Returns views into the received buckets (on src: copies)."""
    blob = pickle.dumps([(n, tuple(t.shape), t.dtype) for n, t in named]) if named is not None else b""
    size = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    bcast(size, src)
    buf = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device) if named is not None else \
        torch.empty(int(size), dtype=torch.uint8, device=device)
    bcast(buf, src)
    meta, out, i = pickle.loads(buf.cpu().numpy().tobytes()), [], 0
    while i < len(meta):
        j, size, dt = i, 0, meta[i][2]              # the bucket: meta[i:j], same dtype, <= bucket_bytes
        while j < len(meta) and meta[j][2] == dt and (j == i or size + math.prod(meta[j][1]) * dt.itemsize
                                                      <= bucket_bytes):
            size += math.prod(meta[j][1]) * dt.itemsize
            j += 1
        if named is not None:
            flat = torch.cat([t.reshape(-1) for _, t in named[i:j]]).to(device)
        else:
            flat = torch.empty(size // dt.itemsize, dtype=dt, device=device)
        bcast(flat, src)
        off = 0
        for n, shape, _ in meta[i:j]:
            k = math.prod(shape)
            out.append((n, flat[off: off + k].view(shape)))
            off += k
        i = j
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---- the step ----------------------------------------------------------------------------------------------

def _seed(*xs) -> int:
    h = 1469598103934665603
    for x in xs:                                  # FNV-1a over the ints: a stable per-(run, step, prompt) seed
        h = ((h ^ (x & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def rollout(llm, rows: list[dict], cfg: Config, step: int, version: int, greedy: bool = False) -> list[dict]:
    """rows [P] -> samples [P * n] grouped by prompt, each with the engine's log-prob of every token."""
    from nanovllm import SamplingParams
    n, replay = (1, False) if greedy else (cfg.samples_per_prompt, bool(cfg.response_lengths))
    # seeded by the prompt's row: the same samples in any dp layout (the grader decodes the token ids itself)
    sps = [SamplingParams(n=n, temperature=0.0 if greedy else cfg.temperature, top_p=cfg.top_p, logprobs=0,
                          max_tokens=_length(cfg, step, row) if replay else cfg.max_new_tokens, ignore_eos=replay,
                          seed=_seed(cfg.seed, step, row), detokenize=False)
           for row in (r.get("row", i) for i, r in enumerate(rows))]
    outs = llm.generate([{"prompt_token_ids": r["prompt_ids"]} for r in rows], sps, use_tqdm=False)
    return [{"prompt_ids": r["prompt_ids"], "response": c.token_ids, "engine_logp": c.token_logprobs,
             "answer": r["answer"], "group": g, "finish": c.finish_reason, "version": version}
            for g, (r, o) in enumerate(zip(rows, outs)) for c in o.outputs]


def _length(cfg: Config, step: int, row: int) -> int:
    """--response_lengths: a prompt's response length, drawn from the file (seeded like its samples), capped."""
    return min(cfg.max_new_tokens, random.Random(_seed(cfg.seed, step, row)).choice(_lengths(cfg.response_lengths)))


def padded(samples: list[dict], key: str | None = None) -> torch.Tensor:
    """[B, T] of a per-token list (or the response mask when key is None), zero padded."""
    T = max(len(s["response"]) for s in samples)
    out = torch.zeros(len(samples), T)
    for i, s in enumerate(samples):
        v = s[key] if key else [1.0] * len(s["response"])
        out[i, : len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def advantages(cfg: Config, scores: torch.Tensor, batch: dict, baseline=None, reduce=None) -> None:
    """Fill batch["adv"] (and "returns" for ppo) [B, T] from the scores [B] and the trainer's tensors.
    reduce: the data-parallel sum (whitening uses the whole batch's statistics)."""
    mask = batch["mask"]
    kl = None
    if cfg.kl_coef > 0 and cfg.kl_in == "reward":
        kl = kl_estimate(batch["old_logp"], batch["ref_logp"], cfg.kl_estimator) * mask
    if cfg.algo in ("grpo", "dr_grpo", "rloo", "remax"):
        s = scores - cfg.kl_coef * kl.sum(1) if kl is not None else scores     # sequence-level KL penalty
        adv = group_advantages(s, cfg.samples_per_prompt, cfg.algo, baseline)[:, None] * mask
    elif cfg.algo == "raft":
        g = scores.view(-1, cfg.samples_per_prompt)
        batch["keep"] = ((g == g.max(1, keepdim=True).values) & (g > 0)).view(-1).float()
        adv = torch.zeros_like(mask)
    else:
        r = token_rewards(scores, mask, kl, cfg.kl_coef)
        if cfg.algo == "reinforce_pp":
            adv = discounted_returns(r, mask, cfg.gamma)
        else:                                                             # ppo
            adv, batch["returns"] = gae(r, batch["values"], mask, cfg.gamma, cfg.lam)
    if cfg.whiten == "yes" or (cfg.whiten == "auto" and cfg.algo in ("ppo", "reinforce_pp")):
        adv = whiten(adv, batch["lmask"], reduce=reduce)
    batch["adv"] = adv


def train_on(trainer: Trainer, samples: list[dict], batch: dict, cfg: Config, step: int, lr: float, reduce,
             timer: dict) -> dict:
    """epochs x mini-batches of updates on one batch; critic first (ppo), on the same split. Every loss is
    divided by the mini-batch's counts over ALL data-parallel ranks (reduce) and dp sums the gradients:
    the update is the one a single process would make on the whole batch. Seconds per role go to timer."""
    B, stats, rng = len(samples), {}, random.Random(_seed(cfg.seed, step, 99))
    if B < cfg.mini_batches:     # an empty mini-batch would step AdamW on zero gradients (its moments still move)
        raise ValueError(f"--mini_batches {cfg.mini_batches} > the {B} samples of a step on this rank "
                         f"(--prompts_per_step / data-parallel ranks x --samples_per_prompt): lower it")
    for _ in range(cfg.epochs):
        # NOTE: each rank shuffles its own samples, so with mini_batches > 1 WHICH samples share a mini-batch depends
        # on the dp layout (the same distribution, not the same numbers); one mini-batch is layout-free (tested)
        order = list(range(B))
        rng.shuffle(order)
        for part in (order[k::cfg.mini_batches] for k in range(cfg.mini_batches)):
            part = sorted(part)
            m = batch["lmask"][part]
            if cfg.algo == "raft":   # RAFT is SFT on the kept samples: a mean over THEIR tokens, whatever the share
                m = m * batch["keep"][part][:, None]
            tokens, seqs = reduce([float(m.sum()), float((m.sum(1) > 0).sum())])
            norm = {"tokens": max(tokens, 1.0), "seqs": max(seqs, 1.0), "max_len": float(cfg.max_new_tokens)}
            if trainer.critic is not None:
                t0 = time.perf_counter()
                v = trainer.update_critic(samples, batch, part, cfg.critic_lr, norm)
                stats.setdefault("value_loss", []).append(v)
                timer["critic"] = timer.get("critic", 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            for k, v in trainer.update_actor(samples, batch, part, lr, norm).items():
                stats.setdefault(k, []).append(v)
            timer["actor"] = timer.get("actor", 0.0) + time.perf_counter() - t0
    return {k: sum(v) / len(v) for k, v in stats.items()}


def rl_step(trainer: Trainer, samples: list[dict], scores: list[float], answered: list[bool], cfg: Config,
            step: int, lr: float, timer: dict, reduce, baseline: list[float] | None = None) -> dict:
    """Score, advantages, update for this rank's share of one step's rollouts (graded by the driver);
    returns the step's metrics over all ranks (reduce(floats[, "max"]) sums, or maxes, over data parallelism)."""
    raw = torch.tensor([s["rule_score"] for s in samples] if "rule_score" in samples[0] else scores)  # accuracy
    scores = shaped_scores(cfg, samples, scores)
    n = cfg.samples_per_prompt
    keep = torch.ones(len(samples) // n, dtype=torch.bool)
    if cfg.dynamic_sampling and n > 1:   # the dropped groups stay in the batch with no weight (every rank then
        keep = informative_groups(scores, n)                # still runs the same collectives)
    batch = {"mask": padded(samples), "engine_logp": padded(samples, "engine_logp")}
    batch["lmask"] = batch["mask"] * keep.repeat_interleave(n)[:, None]
    kept = reduce([float(keep.sum())])[0]
    B = len(samples)
    m = batch["mask"]
    local = [float(raw.sum()), float(scores.sum()), float(sum(answered)), float(m.sum()),
             float(sum(s["finish"] == "length" for s in samples)), float(B),
             float(informative_groups(scores, n).sum()) if n > 1 else 0.0]     # groups with a signal at all
    if kept == 0:                                       # no group anywhere had a signal: no update at all
        r_raw, r, ans, tok, trunc, n, _ = reduce(local)
        return {"skipped": True, "reward": r / n, "accuracy": r_raw / n, "groups_kept": 0}   # as other rows
    batch.update(trainer.score(samples, m.shape, timer))       # timer: actor, reference, critic forwards
    if cfg.algo == "raft" and cfg.format_reward:     # RAFT keeps the best responses: a boxed wrong one is not
        scores = scores - cfg.format_reward * torch.tensor(answered, dtype=scores.dtype)
    advantages(cfg, scores, batch, None if baseline is None else torch.tensor(baseline), reduce)
    stats = train_on(trainer, samples, batch, cfg, step, lr, reduce, timer)    # + their updates
    if cfg.reward_model:                    # every rank has as many samples: the mean of the means is the mean
        stats["rm_score"] = sum(s["rm_score"] for s in samples) / B
    gap = (batch["engine_logp"] - batch["old_logp"]).abs() * m
    names = sorted(stats)
    tot = reduce(local + [float(gap.sum())] + [stats[k] for k in names])
    r_raw, r, ans, tok, trunc, n_all, informative, gap_sum = tot[:8]
    world = reduce([1.0])[0]
    out = {"reward": r / n_all, "accuracy": r_raw / n_all, "answered": ans / n_all,
           "groups_kept": kept if cfg.dynamic_sampling else None,
           "informative": informative * n / n_all if n > 1 else None,            # the share of groups with a signal
           **{k: v if k.endswith("loss") else v / world for k, v in zip(names, tot[8:])},   # losses: the
           "logp_gap_mean": gap_sum / tok,            # ranks' shares of one global mean add up; the rest: averages
           "logp_gap_max": reduce([float(gap.max())], "max")[0],                # the largest on any rank
           "response_len": tok / n_all, "truncated": trunc / n_all, "tokens": int(tok)}
    return out


# ---- driver ------------------------------------------------------------------------------------------------

def greedy_rows(samples: list[dict], n: int) -> list[dict]:
    """The prompts of a batch, once each (ReMax's greedy baseline; held-out evals)."""
    return [{"prompt_ids": samples[i]["prompt_ids"], "answer": samples[i]["answer"], "row": samples[i].get("row", i)}
            for i in range(0, len(samples), n)]


def warmup_batch(trainer: Trainer, samples: list[dict], scores: list[float], cfg: Config, reduce) -> float:
    """PPO's value warm-up step: with rule-based rewards on a small model, a critic that starts from noise makes
    the first policy steps follow noise, so it is first fitted to the Monte-Carlo returns of the initial
    policy's rollouts (no policy update)."""
    batch = {"mask": padded(samples)}
    batch["lmask"] = batch["mask"]
    batch.update(trainer.score(samples, batch["mask"].shape))
    batch["returns"] = discounted_returns(token_rewards(torch.tensor(scores), batch["mask"]), batch["mask"], cfg.gamma)
    tokens, seqs = reduce([float(batch["mask"].sum()), float(len(samples))])
    return trainer.update_critic(samples, batch, list(range(len(samples))), cfg.critic_lr,
                                 {"tokens": tokens, "seqs": seqs})


def plot_curves(runs: Path | dict, png: Path) -> bool:
    """Reward and held-out accuracy per step of a run's metrics.jsonl, or of several overlaid ({label: path}:
    `python -c "import ppo; from pathlib import Path as P; ppo.plot_curves({'a': P(x), 'b': P(y)}, P(png))"`).
    Skipped when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, path) in enumerate((runs if isinstance(runs, dict) else {"": runs}).items()):
        rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
        for key in ("reward", "eval_accuracy"):
            if pts := [(r["step"], r[key]) for r in rows if r.get(key) is not None]:
                ax.plot(*zip(*pts), marker="." if key == "reward" else "o", ls="-" if key == "reward" else "--",
                        color=f"C{i}", label=f"{label} {key}".strip())
    ax.set_xlabel("RL step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


# ---- roles: in-process, or actors on nanoray / Ray ------------------------------------------------------------
# The driver holds the loop, the data position, the grader and the log; the two roles hold the models. With
# --backend local they are plain objects in the driver's process (under torchrun: one of each per rank, a
# data-parallel replica). With --backend nanoray or ray each is an actor in its own process: with a GPU for
# the trainer and one per engine, split placement (the engines generate step k+1 WHILE the trainer trains
# step k in one-step-off mode); with fewer they share one GPU; on CPU they simply run. The weights go
# trainer -> engines by a bucketed broadcast on the weight link (_Link: a process group of their own), or,
# --weight_sync store, trainer -> driver -> engines as CPU tensors through the object store.

class EngineRole:
    """The rollout engine: nanovllm on the trainer's current weights."""

    def __init__(self, folder: str, cfg: Config, max_model_len: int, max_num_seqs: int, device: str | None):
        from nanovllm import LLM
        self.cfg = cfg
        self.llm = LLM(folder, seed=cfg.seed, gpu_memory_utilization=cfg.engine_memory, max_model_len=max_model_len,
                       max_num_seqs=max_num_seqs, device=device, dtype=cfg.dtype)     # the trainer's dtype
        self.llm.verbose = False

    def generate(self, rows: list[dict], step: int, version: int, greedy: bool = False) -> list[dict]:
        t0 = time.perf_counter()
        out = rollout(self.llm, rows, self.cfg, step, version, greedy)
        for s in out:
            s["engine_s"] = time.perf_counter() - t0         # this engine's own generation time (the tokens are on
        return out                                           # the host: nothing is left queued on the GPU)

    def _done(self, t0: float) -> float:
        if self.llm.device.type == "cuda":          # the copies were only queued: time them to their completion
            torch.cuda.synchronize(self.llm.device)
        return time.perf_counter() - t0

    def load(self, weights) -> float:
        """New weights in place (no disk); seconds."""
        t0 = time.perf_counter()
        self.llm.update_weights(weights)
        return self._done(t0)

    def join_link(self, addr: str, rank: int, world: int, backend: str) -> None:
        self.link = _Link(addr, rank, world, backend)

    def nap(self, wake: bool) -> float:
        return self.llm.wake_up() if wake else self.llm.sleep(2)

    def where(self) -> str:
        return f"pid {os.getpid()} on {self.llm.device}"

    def receive(self) -> float:
        """The trainer's weights through the link (a collective with TrainerRole.send), into the engine."""
        t0 = time.perf_counter()
        self.llm.update_weights(broadcast_tensors(None, 0, self.link.bcast, self.link.device))
        return self._done(t0)

    def shutdown(self):
        self.llm.shutdown()


def trainer_micro_batch_tokens(cfg: Config, nt, mcfg, tp: int, pp: int, dp: int, gpu_bytes: float) -> int:
    """The GPU default of --micro_batch_tokens: sft.py's rule (the largest power of two whose estimated activations
    fit its share of memory; a small model is host-bound, so fewer, bigger micro-batches are faster) applied to the
    memory this trainer has: the GPU less the colocated engine's share (--engine_memory; counted even when the
    engines have GPUs of their own: the safe side) and less the state of the models beside the actor (a critic:
    weights, fp32 grads, master and Adam, ~18 bytes a parameter; a reference: its weights; --engine_process: the
    shared weight buffer, the whole model, and the child's CUDA context, ~0.5 GiB). <= 65,536 tokens."""
    import sft
    params = nt.flops_per_token(mcfg, 0) / 6 / (tp * pp)              # flops_per_token / 6 = the parameters
    width = torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    beside = (18 * params if cfg.algo == "ppo" else 0) + (width * params if cfg.kl_coef > 0 else 0) + \
        ((width * params * tp * pp + 2 ** 29) if cfg.engine_process else 0)
    room = gpu_bytes * (1 - cfg.engine_memory) - beside / 0.9
    return sft.auto_micro_batch_tokens(65536 * dp, dp, tp, pp, mcfg, width, room)[0]


class TrainerRole:
    """The trainer: actor (+ critic, + reference) on a nanotron mesh, resumed from `src` when given.
    In-process (--backend local) it is this process's rank of the torchrun job. As actors it is one rank of an
    SPMD group (group = (rank, world, "host:port"), see _Group): torchrun's environment is set for
    nanotron.Mesh.build, every method runs on every rank, and each rank takes its data-parallel share of the
    step's samples itself (shard), since one driver holds them all."""

    def __init__(self, cfg: Config, path: str | None, src: str | None, group: tuple | None = None):
        import nanotron as nt
        self.cfg, self.nt, self.link, self.shard = cfg, nt, None, group is not None
        if group is not None:
            rank, world, addr = group
            host, port = addr.rsplit(":", 1)
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=host, MASTER_PORT=port)
        self.mesh = m = nt.Mesh.build(cfg.tp, cfg.pp)     # dp = world / (tp * pp) (one process: 1)
        mcfg = nt.preset_config("tiny") if path is None else \
            nt.ModelConfig.from_hf(json.loads((Path(path) / "config.json").read_text()))
        if not cfg.micro_batch_tokens:                     # a GPU's default: sized from its memory
            total = torch.cuda.get_device_properties(m.device).total_memory if m.device.type == "cuda" else 0
            cfg = self.cfg = dataclasses.replace(cfg, micro_batch_tokens=trainer_micro_batch_tokens(
                cfg, nt, mcfg, m.tp, m.pp, m.dp, total) if total else 4096)
        self.rm = None                                     # the reward model first: a bad folder fails fast
        if cfg.reward_model:
            self.rm = RewardModel(cfg.reward_model, getattr(torch, cfg.dtype), m.device, cfg.micro_batch_tokens, path)
        self.trainer = t = Trainer(cfg, nt, self.mesh, mcfg, path)
        self.start, self.extra = 0, {}
        if src is not None:
            if t.critic is not None:
                _load_critic(t, nt, self.mesh, Path(src))
            man = lora_resume(t, nt, src) if cfg.lora_rank else nt.load_checkpoint(src, t.actor, t.opt, self.mesh)
            self.start, self.extra = int(man["step"]), man["extra"]

    def info(self) -> dict:
        """dp / dp_rank are the DRIVER's data layout: under torchrun each rank drives its share; an actor group
        has one driver for the whole step (dp 1) and shards it here."""
        m = self.mesh
        return {"start": self.start, "extra": self.extra, "rank": m.rank, "dp": 1 if self.shard else m.dp,
                "dp_rank": 0 if self.shard else m.dp_rank, "tp": m.tp, "pp": m.pp, "trainer_dp": m.dp,
                "device": str(m.device), "pid": os.getpid(), "vocab": self.trainer.actor.cfg.vocab_size,
                "micro_batch_tokens": self.cfg.micro_batch_tokens}

    def _mine(self, samples: list, scores: list, answered: list | None = None, baseline: list | None = None):
        """An actor group's data-parallel share of the step: the prompts [a, b) of this dp rank with their n
        samples each (contiguous) and the same rows of the per-sample lists; baseline is per prompt (ReMax)."""
        if not self.shard or self.mesh.dp == 1:
            return samples, scores, answered, baseline
        n, dp, r = self.cfg.samples_per_prompt, self.mesh.dp, self.mesh.dp_rank
        P = len(samples) // n
        a, b = r * P // dp, (r + 1) * P // dp
        cut = lambda x, k: None if x is None else x[a * k: b * k]      # noqa: E731
        return cut(samples, n), cut(scores, n), cut(answered, n), cut(baseline, 1)

    def reduce(self, values: list, op: str = "sum") -> list:
        """Sum (or max) floats over the data-parallel ranks (one small all-reduce)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.mesh.device)
        return self.nt.all_reduce_(t, self.mesh.group("dp"), op).tolist()

    def _agree(self, samples: list, scores: list, answered: list, baseline: list | None):
        """torchrun with tp or pp > 1: each rank of a model-parallel group generated and graded the same prompts on
        an engine and a grader of its own. The tokens match (same seeds, same weights); the grades may not (a
        grading timeout under load counts as wrong on one rank only), and ranks that disagree would mix gradients
        of different losses, or hang when one skips a step its peers take. So the group takes the grades of its
        first rank (tp 0, pp 0), and different samples stop every rank of the group with one clear error."""
        m, nt = self.mesh, self.nt
        if self.shard or m.tp * m.pp == 1:          # an actor group: one driver sent every rank the same lists
            return scores, answered, baseline
        toks = [t for s in samples for t in (len(s["response"]), *s["response"])]
        mine = [float(len(samples)), float(zlib.crc32(np.asarray(toks, dtype=np.int64).tobytes()))]
        # tp first (every stage gets its tp rank 0's), then pp (from stage 0): all get the (tp 0, pp 0) rank's.
        # The check is agreed over the WHOLE tp x pp group before anyone raises: a subgroup raising alone would
        # leave the other subgroup waiting in the next broadcast.
        hops = [(g, src) for size, g, src in ((m.tp, m.tp_group, m.rank_of(m.dp_rank, m.pp_rank, 0)),
                                              (m.pp, m.pp_group, m.rank_of(m.dp_rank, 0, m.tp_rank))) if size > 1]

        def from_first(values: list) -> list:
            t = torch.tensor(values, dtype=torch.float64, device=m.device)
            for group, src in hops:
                torch.distributed.broadcast(t, src, group=group)
            return t.tolist()
        head = from_first(mine)                                                # [count, CRC of the tokens]
        bad = torch.tensor([float(head != mine)], dtype=torch.float64, device=m.device)
        for group, _ in hops:
            nt.all_reduce_(bad, group, op="max")                               # max over tp, then over pp
        if bad.item():
            raise RuntimeError("ppo.py: the tp/pp ranks of one data-parallel replica generated different samples "
                               f"(rank {m.rank}: {len(samples)} samples, token CRC {int(mine[1])}; its group's "
                               f"first rank: {int(head[0])}, CRC {int(head[1])}); their engines must sample alike")
        payload = from_first(scores + [float(a) for a in answered] + (baseline or []))
        B = len(samples)
        return payload[:B], [bool(a) for a in payload[B:2 * B]], None if baseline is None else payload[2 * B:]

    def step(self, samples, scores, answered, step: int, lr: float, baseline=None) -> tuple[dict, dict]:
        timer = {}
        samples, scores, answered, baseline = self._mine(samples, scores, answered, baseline)
        scores, answered, baseline = self._agree(samples, scores, answered, baseline)
        m = rl_step(self.trainer, samples, scores, answered, self.cfg, step, lr, timer, self.reduce, baseline)
        if self.cfg.engine_sleep and torch.cuda.is_available():     # hand the engine's memory back: an engine in
            torch.cuda.empty_cache()                                # another process cannot take it from our cache
        return m, timer

    def warmup(self, samples, scores) -> float:
        samples, scores, _, _ = self._mine(samples, scores)
        return warmup_batch(self.trainer, samples, scores, self.cfg, self.reduce)

    def rm_scores(self, samples) -> list[float]:
        """The reward model's score of each sample (this rank's own, under data parallelism)."""
        return self.rm(samples)

    def weights(self, cpu: bool):
        """(hf_name, tensor) of the actor: a generator in-process; CPU copies when they cross processes."""
        w = self.trainer.weights()
        return [(k, v.cpu()) for k, v in w] if cpu else w

    def write_folder(self, folder: str, tokenizer_src: str | None) -> None:
        """An HF folder of the actor's current weights (+ the tokenizer files), for the engine to start from."""
        from safetensors.torch import save_file
        folder = Path(folder)
        tensors = self.trainer.weights()    # a collective over tp and pp (it gathers the shards); rank 0 writes
        if self.mesh.rank != 0:
            return
        folder.mkdir(parents=True, exist_ok=True)
        save_file({n: t.to(getattr(torch, self.cfg.dtype)).contiguous().cpu() for n, t in tensors},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(self.trainer.actor.cfg.to_hf(self.cfg.dtype), indent=2))
        for f in Path(tokenizer_src).iterdir() if tokenizer_src else ():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
                (folder / f.name).write_bytes(f.read_bytes())

    def save(self, out: str, step: int, sampler_states: list, pending: list) -> None:
        _save(self.trainer, self.nt, self.mesh, Path(out), step, self.cfg, sampler_states, pending)

    def link_address(self) -> str:
        """host:port of a free port on this machine, where the weight link's TCP store will listen."""
        import socket
        with socket.socket() as sk:
            sk.bind(("", 0))
            return f"{socket.gethostbyname(socket.gethostname())}:{sk.getsockname()[1]}"

    def join_link(self, addr: str, rank: int, world: int, backend: str) -> None:
        self.link = _Link(addr, rank, world, backend)

    def send(self) -> float:
        """The actor's weights to every engine through the link (a collective with EngineRole.receive). In a
        group every rank gathers (tp / pp collectives) and rank 0, the link's only trainer member, sends."""
        t0 = time.perf_counter()
        named = self.trainer.weights()
        if self.link is not None:
            broadcast_tensors([(n, t.to(self.link.device)) for n, t in named], 0, self.link.bcast, self.link.device)
        return time.perf_counter() - t0

    def barrier(self):
        if self.mesh.world > 1:
            torch.distributed.barrier()

    def close(self):
        self.mesh.destroy()


class _Link:
    """The weight link: a process group of its own between the trainer (rank 0) and the engines (1..E), met at
    addr through a TCP store (torch's default group is left alone: under torchrun it belongs to the mesh).
    NCCL when every member has a GPU of its own (GPU to GPU, no host copy); gloo on CPU tensors otherwise
    (NCCL refuses two ranks on one device, so roles sharing one GPU stage the weights through host memory)."""

    def __init__(self, addr: str, rank: int, world: int, backend: str):
        import datetime
        import torch.distributed as dist
        host, port = addr.rsplit(":", 1)
        timeout = datetime.timedelta(seconds=600)        # a member that died: an error, not a hang
        store = dist.TCPStore(host, int(port), world, rank == 0, timeout=timeout)
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.pg = dist.ProcessGroupNCCL(store, rank, world)
        else:
            self.device, self.pg = torch.device("cpu"), dist.ProcessGroupGloo(store, rank, world, timeout)

    def bcast(self, t: torch.Tensor, src: int) -> None:
        self.pg.broadcast(t, src).wait()


class _Engines:
    """E engine handles driven as one. generate() splits the prompts into E contiguous slices, one per engine
    (each sample's seed depends on its prompt's row, not on the engine, so any E samples the same tokens), and
    returns a future: call it for the samples, in prompt order."""

    def __init__(self, handles: list, get, sleepy: bool = False):
        self.handles, self.get, self.sleepy = handles, get, sleepy
        self.lock = threading.Lock()        # in-process engines run generate() now: one caller at a time

    def nap(self, wake: bool) -> float:
        """--engine_sleep (engines sharing the trainer's GPU): free the engines' KV cache and weights for the
        trainer's step (nanovllm sleep level 2: the sync refills the weights), or restore them; seconds."""
        return max(self.get([h.nap.remote(wake) for h in self.handles])) if self.sleepy else 0.0

    def generate(self, rows: list[dict], step: int, version: int, greedy: bool = False):
        k = -(-len(rows) // len(self.handles))                       # ceil: prompts per engine
        with self.lock:
            futs = [h.generate.remote(rows[i * k:(i + 1) * k], step, version, greedy)
                    for i, h in enumerate(self.handles) if rows[i * k:(i + 1) * k]]

        def result() -> list[dict]:
            samples = [s for f in futs for s in self.get(f)]
            per = 1 if greedy else len(samples) // max(1, len(rows))
            for i, s in enumerate(samples):
                s["group"] = i // per                                 # the prompt's index in this batch
            return samples
        return result


class _Group:
    """The trainer's SPMD actors driven as one handle: group.method.remote(...) calls it on every rank (they meet
    in their collectives) and returns the futures; get() of them gives rank 0's result (_group_get). The weight
    link and the reward model are rank 0's alone."""
    ONLY_RANK0 = ("link_address", "join_link", "rm_scores")

    def __init__(self, actors: list):
        self.actors = actors

    def __getattr__(self, name):
        actors = self.actors[:1] if name in self.ONLY_RANK0 else self.actors
        return type("_M", (), {"remote": staticmethod(lambda *a, **k: _Futures(
            getattr(h, name).remote(*a, **k) for h in actors))})


class _Futures(list):
    """The futures of one group call."""


class _Here:
    """An in-process object called the way an actor is: obj.method.remote(...) runs now; get() is identity."""

    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name):
        fn = getattr(self.obj, name)
        return type("_M", (), {"remote": staticmethod(fn)})


# ------------------------------------------------------------------ the engine in a process of its own ----
# --engine_process (local backend, one engine per rank): the engine runs in a CHILD process on the rank's own
# device instead of in the trainer's process. Why: with the engine in a thread (the default one-step-off layout
# above) both roles are host-bound Python on one GIL, and each runs ~1.5-2.5x slower beside the other (BENCHMARKS,
# issue 15). A process of its own has its own interpreter; the GPU runs both processes' kernels (time-sliced).
#   requests:  parent --(id, method, args)--> child     replies: child --(id, "ok" | "error", value)--> parent
# in order, over one pipe; a reader thread in the parent files each reply under its id. Weights: a flat byte
# buffer allocated once on the device and shared with the child (CUDA IPC under torch.multiprocessing: the child
# maps the same memory; on CPU, or where IPC is refused, host shared memory). A sync copies the trainer's tensors
# into it, then sends only the layout [(name, byte offset, bytes, dtype, shape)]; the child loads views of it into
# the engine (update_weights copies), so no tensor crosses the pipe per step.

def _engine_main(conn, args: tuple, device: str, role_cls=None) -> None:
    """The child: build EngineRole(*args, device) (tests: another role_cls), then serve requests in order until
    "exit" or EOF."""
    import signal
    import traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # Ctrl-C belongs to the parent, which ends us
    torch.set_num_threads(max(1, torch.get_num_threads() // 2))     # on CPU: leave the trainer its cores

    def failed(i, e: BaseException) -> tuple:         # (id, "error", (a user's error?, one line, traceback))
        return i, "error", (isinstance(e, (ValueError, OSError)), f"{type(e).__name__}: {e}", traceback.format_exc())
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        role = (role_cls or EngineRole)(*args, device)
        conn.send((0, "ok", role.where()))
    except BaseException as e:                        # e.g. nanovllm: "the KV cache has 0 blocks: raise ..."
        conn.send(failed(0, e))
        return
    shared = None
    while True:
        try:
            i, name, a = conn.recv()
        except (EOFError, OSError):                   # the parent is gone
            break
        except Exception as e:                        # a request that does not unpickle: fatal for every waiter
            conn.send(failed(None, e))
            break
        if name == "exit":
            break
        try:
            if name == "share":                          # the weight buffer, once (an IPC handle, not a copy):
                from multiprocessing.reduction import ForkingPickler     # unpickled HERE, so a refused CUDA
                shared, out = ForkingPickler.loads(a[0]), None            # IPC open is this request's error
            elif name == "load":                         # views of the buffer -> the engine's weights
                out = role.load([(n, shared[o:o + nb].view(dt).view(shape)) for n, o, nb, dt, shape in a[0]])
            else:
                out = getattr(role, name)(*a)
        except Exception as e:
            conn.send(failed(i, e))
            continue
        conn.send((i, "ok", out))
    role.shutdown()


class _EngineDied(ChildProcessError):
    """The engine's child process is gone (killed, out of memory, a crash in C code)."""


class _Reply:
    """The answer to request i of an engine process: call it (or get() it) to wait for the value (once;
    later calls return the same value)."""

    def __init__(self, proc, i: int, plus: float = 0.0):
        self.proc, self.i, self.value, self.has, self.plus = proc, i, None, False, plus

    def __call__(self):
        if not self.has:                              # plus: a load's seconds in the parent (its copy into the buffer)
            v = self.proc.result(self.i)
            self.value, self.has = v + self.plus if isinstance(v, float) else v, True
        return self.value


class _EngineProcess:
    """The parent's handle of an engine in a child process: h.method.remote(...) sends the request now and
    returns a _Reply (the child works meanwhile: generation overlaps the trainer's step). A reader thread owns
    the receiving end and files every reply under its id the moment it arrives, so the child never blocks on a
    full pipe (a big rollout reply nobody asked for yet, while the parent sends a big request) and any number
    of threads can wait for their own replies."""

    def __init__(self, args: tuple, device: str, role_cls=None):
        import torch.multiprocessing as tmp          # registers the tensor reductions (CUDA IPC, shared memory)
        ctx = tmp.get_context("spawn")               # never fork a process that has CUDA or threads
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_main, args=(child, args, device, role_cls), daemon=True, name="ppo-engine")
        self.proc.start()
        child.close()                                # the child's end lives in the child: its death is EOF here
        self.pid, self.cond, self.done, self.waiting, self.dead = self.proc.pid, threading.Condition(), {}, {0}, None
        self.send_lock, self.ids, self.buf, self.last_load = threading.Lock(), itertools.count(1), None, None
        self.shared_on, self.join_lock = None, threading.Lock()   # where the weight buffer lives: cuda | cpu
        threading.Thread(target=self._read, daemon=True, name="ppo-engine-replies").start()
        self.started = self.result(0)                # the child's where(): waits for the engine to be built

    def _read(self) -> None:
        while True:
            try:
                j, status, value = self.conn.recv()
            except (EOFError, OSError):              # the child exited (asked to, or died): waiters raise
                with self.cond:                      # _died() themselves (this thread never reaps the child)
                    self.dead = self.dead or "exited"
                    self.cond.notify_all()
                return
            with self.cond:
                if j is None:                        # the child could not read a request: it has stopped
                    self.dead = self._error(value)
                else:
                    self.done[j] = (status, value)
                    self.waiting.discard(j)
                self.cond.notify_all()

    def _died(self) -> _EngineDied:
        with self.join_lock:                         # one reaper at a time: two racing waitpid()s can make
            self.proc.join(5)                        # is_alive() answer True for a process already gone
        return _EngineDied(f"the engine process (pid {self.pid}) died, exit code {self.proc.exitcode}; its last "
                           "words, if any, are above")

    def _error(self, value: tuple) -> Exception:
        """An exception of the child, as one: a user's error (ValueError, OSError) keeps one line."""
        user, line, tb = value
        return ValueError(f"ppo.py: the engine process failed: {line}") if user else \
            RuntimeError(f"ppo.py: the engine process (pid {self.pid}) failed:\n{tb}")

    def result(self, i: int):
        with self.cond:
            while i not in self.done and self.dead is None:
                self.cond.wait()
            dead = self.dead if i not in self.done else None
            if dead is None:
                status, value = self.done.pop(i)
        if dead is not None:
            raise self._died() if dead == "exited" else dead
        if status == "error":
            raise self._error(value)
        return value

    def _send(self, name: str, *a, plus: float = 0.0) -> _Reply:
        with self.send_lock:
            i = next(self.ids)
            with self.cond:
                self.waiting.add(i)
            try:
                self.conn.send((i, name, a))
            except OSError:                                    # a broken pipe: the child is gone
                raise self._died() from None
        return _Reply(self, i, plus)

    def __getattr__(self, name):
        if name.startswith("_"):                       # (pickle and copy probe dunders: not requests)
            raise AttributeError(name)
        send = self._load if name == "load" else lambda *a: self._send(name, *a)
        return type("_M", (), {"remote": staticmethod(send)})

    def _load(self, weights) -> _Reply:
        """Copy the trainer's (name, tensor) into the shared buffer, then ask the child to load them. The copies
        are complete before the request goes out (synchronize: the child reads from another process), and the
        previous load has been read out of the buffer before it is overwritten (its reply is awaited)."""
        if self.last_load is not None:
            self.last_load()
        t0, named = time.perf_counter(), list(weights)
        layout, off = [], 0
        for n, t in named:
            nb = t.numel() * t.element_size()
            layout.append((n, off, nb, t.dtype, tuple(t.shape)))
            off += -(-nb // 64) * 64                           # 64-byte aligned: any dtype views the bytes
        dev = named[0][1].device
        if self.buf is None or self.buf.numel() < off:
            self.buf = self._share(dev, off)
        for (n, t), (_, o, nb, dt, shape) in zip(named, layout):
            self.buf[o:o + nb].view(dt).view(shape).copy_(t)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self.last_load = self._send("load", layout, plus=time.perf_counter() - t0)   # sync = our copy + its load
        return self.last_load

    @staticmethod
    def _share_blob(buf: torch.Tensor) -> bytes:
        from multiprocessing.reduction import ForkingPickler  # torch's reductions: a CUDA IPC handle, or a shared fd
        return bytes(ForkingPickler.dumps(buf))

    def _share(self, dev: torch.device, nbytes: int) -> torch.Tensor:
        """The weight buffer, shared with the child once: on the trainer's device (CUDA IPC: the child maps the
        same GPU memory), or where the driver or a sandbox refuses IPC, in host shared memory (then a sync copies
        device -> host -> device: slower, still no pickled tensors). Returns the buffer."""
        for where in (dev, torch.device("cpu")):
            buf = torch.empty(nbytes, dtype=torch.uint8, device=where)
            if where.type == "cpu":
                buf.share_memory_()
            try:
                self._send("share", self._share_blob(buf))()
                self.shared_on = where.type
                return buf
            except (RuntimeError, ValueError) as e:
                print(f"ppo.py: the engine process could not map the weight buffer on {where} "
                      f"({str(e).strip().splitlines()[-1][:160]}); trying host memory", flush=True)
        raise RuntimeError("ppo.py: the engine process could map no weight buffer (see above)")

    def close(self) -> None:
        """Ask the child to exit; one still working on a request (a run that failed mid-rollout) is terminated
        instead of waited for. The reader thread sees EOF and ends."""
        with self.cond:
            busy = bool(self.waiting) and self.dead is None
        if not busy:
            try:
                self._send("exit")
            except ChildProcessError:
                pass
        with self.join_lock:
            if busy:
                self.proc.terminate()
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)


def _local_get(x):
    """get() of the local backend: in-process calls return values already; an engine process's replies wait."""
    if isinstance(x, list):
        return [_local_get(y) for y in x]
    return x() if isinstance(x, _Reply) else x


def _split_launch(cfg: Config, rank: int, world: int) -> Config | None:
    """`torchrun --nproc_per_node W ppo.py --rollout_gpus R` (one machine): the seed's split layout from a
    torchrun launch. Rank 0 becomes the single controller of `--backend nanoray` (or ray): it drops torchrun's
    environment (the actors it starts must not inherit RANK / WORLD_SIZE; the trainer group gets its own),
    starts a cluster over the machine's GPUs and places W - R trainer ranks and R engines as actors, a GPU
    each. The other ranks hold nothing and return at once (None). Across machines, start nanoray on each
    (`python nanoray.py start ...`) and run `python ppo.py --backend nanoray --trainer_ranks T --engines R`."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    for ok, msg in [(world > cfg.rollout_gpus >= 1, f"--rollout_gpus {cfg.rollout_gpus} splits a torchrun launch "
                     f"of more ranks (torchrun --nproc_per_node N ppo.py --rollout_gpus R, N > R >= 1; got {world})"),
                    (local_world == world, "--rollout_gpus runs on one machine (torchrun --nnodes 1); across "
                     "machines start nanoray on each and use --backend nanoray --trainer_ranks T --engines R"),
                    (cfg.trainer_ranks == 0 and cfg.engines == 1, "--rollout_gpus sets --trainer_ranks and "
                     "--engines itself (world - R and R): pass neither"),
                    ((world - cfg.rollout_gpus) % (cfg.tp * cfg.pp) == 0, f"the {world - cfg.rollout_gpus} trainer "
                     f"ranks left by --rollout_gpus {cfg.rollout_gpus} must be a multiple of --tp x --pp")]:
        if not ok:
            raise ValueError(f"ppo.py: {msg}")
    if rank != 0:
        return None
    for k in [k for k in os.environ if k.startswith("TORCHELASTIC_") or k in (
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
            "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")]:
        del os.environ[k]
    return dataclasses.replace(cfg, backend="nanoray" if cfg.backend == "local" else cfg.backend,
                               trainer_ranks=world - cfg.rollout_gpus, engines=cfg.rollout_gpus)


def start_roles(cfg: Config, path, src, device_for_engine):
    """(trainer handle, get, backend module or None) for --backend."""
    if cfg.backend == "local":
        return _Here(TrainerRole(cfg, path, src)), _local_get, None
    if cfg.backend == "ray":
        import ray
        kw = {"runtime_env": {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent)}}}
    else:
        import nanoray as ray
        kw = {}
    import ppo                    # the roles by module name (not __main__), so worker processes import them
    gpus = torch.cuda.device_count()
    ppo._STARTED = not ray.is_initialized()         # a cluster the caller started is joined, and left running
    if ppo._STARTED:
        ray.init(num_cpus=max(2, os.cpu_count() or 2), num_gpus=gpus, **kw)
    T = cfg.trainer_ranks or cfg.tp * cfg.pp
    share = 1 if gpus >= T + cfg.engines else 0.5 / T if gpus else 0   # a GPU per rank and engine: split
    role = ray.remote(num_gpus=share)(ppo.TrainerRole)
    args = (ppo.Config(**asdict(cfg)), str(path) if path else None, str(src) if src else None)
    if T == 1:
        return role.remote(*args), ray.get, ray
    import socket
    with socket.socket() as sk:               # the group's rendezvous (torchrun's MASTER_ADDR:MASTER_PORT)
        sk.bind(("", 0))
        addr = f"{socket.gethostbyname(socket.gethostname())}:{sk.getsockname()[1]}"

    def get(x):                               # a group call: every rank's result, rank 0's returned
        return ray.get(list(x))[0] if isinstance(x, _Futures) else ray.get(x)
    return _Group([role.remote(*args, (r, T, addr)) for r in range(T)]), get, ray


def main(argv=None) -> dict:
    """One RL run: the loop of the single controller (this process), driving the two roles."""
    import prepare_data
    import nanotron as nt
    cfg = parse_args(argv)
    if cfg.bench and cfg.layouts:
        return bench_layouts(cfg, list(sys.argv[1:] if argv is None else argv))
    if cfg.bench:
        return bench([a for a in (sys.argv[1:] if argv is None else argv) if a != "--bench"])
    t_start = time.time()
    cfg = resolve(cfg, torch.cuda.is_available())
    if cfg.rollout_gpus and (cfg := _split_launch(cfg, *nt.dist_env()[:2])) is None:
        return {}                                          # not rank 0: its GPU goes to one of rank 0's actors
    if cfg.backend != "local" and nt.dist_env()[1] > 1:
        raise ValueError(f"ppo.py: --backend {cfg.backend} places the roles itself: run `python ppo.py`, not torchrun")
    out = Path(cfg.out).resolve()   # absolute: actor processes of a cluster started elsewhere have another cwd
    path = None if cfg.model == "tiny" else (
        prepare_data.default_model_path() if cfg.model == "smollm2" else nt.resolve_model_path(cfg.model)).resolve()
    if cfg.model not in ("tiny", "smollm2"):
        cfg = dataclasses.replace(cfg, model=str(path))       # absolute in checkpoints: resume checks it
    src = nt.latest_checkpoint(out) if cfg.resume == "auto" else None if cfg.resume == "never" else \
        Path(cfg.resume).resolve()
    if src is None and out.exists() and any(out.glob("step_*")):
        raise ValueError(f"ppo.py: --out {out} holds another run's checkpoints; pass --resume auto, another --out, "
                         "or delete them")
    if src is not None and (was := json.loads((src / "manifest.json").read_text())["config"].get("model")) and \
            Path(was).resolve() != Path(cfg.model).resolve():       # (tiny / smollm2 resolve alike on both sides)
        raise ValueError(f"ppo.py: {src} continues a run of --model {was}, not {cfg.model}: pass another --out, "
                         "--resume never, or the same --model")
    trainer, get, ray = start_roles(cfg, path, src, None)
    handles = []
    try:
        info = get(trainer.info.remote())
        rank0, dp, start = info["rank"] == 0, info["dp"], info["start"]
        say = print if rank0 else (lambda *a, **k: None)
        if cfg.prompts_per_step % (dp * info["trainer_dp"] if dp == 1 else dp):
            raise ValueError(f"ppo.py: --prompts_per_step {cfg.prompts_per_step} must be a multiple of the "
                             f"{max(dp, info['trainer_dp'])} data-parallel ranks (torchrun --nproc_per_node, or "
                             "--trainer_ranks / (tp x pp))")
        train_rows, test_rows = load_prompts(cfg, info["vocab"])
        for i, r in enumerate(train_rows):
            r["row"] = i                                      # the sampling seed of this prompt, in any layout
        extra = info["extra"]
        if src is not None and len(extra["sampler"]) != dp:
            raise ValueError(f"ppo.py: {src} was saved by {len(extra['sampler'])} data-parallel ranks, this run has "
                             f"{dp}: resume with the same torchrun --nproc_per_node")
        say(f"ppo.py: resumed from {src} at step {start}" if src else "", end="\n" if src else "")
        # -- the engine starts from the trainer's current weights (one folder, written once) --
        folder = str(path) if path is not None and src is None else str(out / "engine_init")
        if folder != str(path):
            get(trainer.write_folder.remote(folder, str(path) if path else None))
            get(trainer.barrier.remote())
        L = max(len(r["prompt_ids"]) for r in train_rows + test_rows) + cfg.max_new_tokens
        E, T, gpus = cfg.engines, cfg.trainer_ranks or cfg.tp * cfg.pp, torch.cuda.device_count()
        seats = -(-cfg.prompts_per_step // dp // E) * cfg.samples_per_prompt    # an engine's share of a step's
        args = (folder, cfg, L, min(1024, seats))     # samples, decoded in ONE wave (decode time ~ flat in batch)
        split = gpus >= T + E                       # a GPU for every trainer rank and every engine
        if ray is None and cfg.engine_process:
            handles = [_EngineProcess(args, info["device"])]
            say(f"roles: trainer pid {os.getpid()} on {info['device']}, engine (a process of its own) {handles[0].started}")
        elif ray is None:
            handles = [_Here(EngineRole(*args, info["device"]))]
        else:
            import ppo
            share = 1 if split else 0.5 / E if gpus else 0       # a GPU each, or half of one shared by all
            role = ray.remote(num_gpus=share)(ppo.EngineRole)
            handles = [role.remote(args[0], ppo.Config(**asdict(cfg)), *args[2:], "cuda" if gpus else "cpu")
                       for _ in range(E)]
        if cfg.engine_sleep and ray is not None and split:
            raise ValueError("ppo.py: --engine_sleep frees an engine's memory for a trainer on the same GPU: these "
                             "engines have GPUs of their own")
        link = ray is not None and cfg.weight_sync == "broadcast"
        if link:      # the weight link: trainer = rank 0, engines 1..E (every member joins at once)
            addr, backend = get(trainer.link_address.remote()), "nccl" if split else "gloo"
            joined = trainer.join_link.remote(addr, 0, 1 + E, backend)         # all asked first, then awaited
            get([h.join_link.remote(addr, i + 1, 1 + E, backend) for i, h in enumerate(handles)])
            get(joined)

        if ray is not None:                 # where each role lives (a kill -9 of one ends the run with one line)
            say(f"roles: trainer pid {info['pid']} on {info['device']}, " +
                ", ".join(f"engine {i} {w}" for i, w in enumerate(get([h.where.remote() for h in handles]))))

        def sync() -> float:
            """The trainer's new weights into every engine, in memory (never through disk). Returns the seconds of
            the transfer itself (the call also waits for a generation still running on an engine)."""
            if link:        # one bucketed broadcast to all engines (an engine's death shows first: get it first)
                sent = trainer.send.remote()
                secs = max(get([h.receive.remote() for h in handles]))
                get(sent)
                return secs
            t0 = time.perf_counter()
            w = get(trainer.weights.remote(ray is not None))    # in-process: the tensors themselves; actors: CPU
            return time.perf_counter() - t0 + max(get([h.load.remote(w) for h in handles]))   # via the object store
        from nanovllm import load_tokenizer
        rewarder = Rewarder(cfg, load_tokenizer(folder),
                            (lambda s: get(trainer.rm_scores.remote(s))) if cfg.reward_model else None)
        try:              # (_loop closes the rewarder too; this covers what raises before its own try)
            return _loop(cfg, trainer, _Engines(handles, get, cfg.engine_sleep), sync, get, rewarder, train_rows,
                         test_rows, info, extra, say, out, t_start)
        except Exception as e:
            if not isinstance(e, _EngineDied) and (ray is None or not isinstance(e, ray.exceptions.RayActorError)):
                raise
            raise ChildProcessError(f"ppo.py: a role's process died ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                    f"run the same command again to resume from the last checkpoint in {out}") from e
        finally:
            rewarder.close()
    finally:
        if ray is None:
            for h in handles:
                h.close() if isinstance(h, _EngineProcess) else h.obj.shutdown()
            trainer.obj.close()
        else:
            import ppo
            for actor in handles + (trainer.actors if isinstance(trainer, _Group) else [trainer]):
                ray.kill(actor)
            if ppo._STARTED:
                ray.shutdown()


def _loop(cfg, trainer, engines, sync, get, rewarder, train_rows, test_rows, info, extra, say, out, t_start) -> dict:
    import nanosets
    import nanotron as nt
    import prepare_data
    rank0, dp, start = info["rank"] == 0, info["dp"], info["start"]
    sampler = nanosets.ShardedSampler(len(train_rows), info["dp_rank"], dp, seed=cfg.seed)
    pending = None
    if start:
        sampler.load_state_dict(extra["sampler"][info["dp_rank"]])
        pending = (extra.get("pending") or [None] * dp)[info["dp_rank"]]
        if pending is not None and len(pending) != cfg.prompts_per_step // dp * cfg.samples_per_prompt:
            say(f"ppo.py: the checkpoint's next rollout has {len(pending)} samples, this run asks for "
                f"{cfg.prompts_per_step // dp} prompts x {cfg.samples_per_prompt} per rank: generating a fresh one")
            pending = None
    take = lambda: [train_rows[i] for i in sampler.take(cfg.prompts_per_step // dp)]   # noqa: E731
    P, n = cfg.prompts_per_step, cfg.samples_per_prompt
    say(f"ppo config: {json.dumps(asdict(cfg))}\n{cfg.algo}, {cfg.mode}, backend {cfg.backend}: {P} prompts x {n} "
        f"samples = {P * n} responses of <= {cfg.max_new_tokens} tokens per step over {dp} data-parallel rank(s), "
        f"{cfg.epochs} epoch(s) x {cfg.mini_batches} mini-batch(es), {len(train_rows)} train prompts, "
        f"{len(test_rows)} held out, {cfg.steps} steps, trainer on {info['device']} in micro-batches of <= "
        f"{info['micro_batch_tokens']} tokens{'' if cfg.micro_batch_tokens else ' (from its memory)'}")
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out / "metrics.jsonl", start, rank0, cfg.wandb, asdict(cfg))

    # one-step-off: a thread grades the rollout of step k + 1 the moment it is generated, so its rewards (math-
    # verify, on CPU) come with it, also overlapped with step k's training (rule rewards: a reward model is the
    # trainer's). Rewarder calls hold a lock: the thread and this loop share its grader processes.
    pool = ThreadPoolExecutor(1) if cfg.mode == "one_step_off" and rewarder.rm is None else None
    # With in-process engines (the local backend: colocated, one per rank) the thread also GENERATES it, on a CUDA
    # stream of its own: the engine decodes step k + 1 while the trainer steps on k, on the same GPU (colocated
    # off-policy). The rollout is the same as without the thread: the engine's weights change only in sync(),
    # which first waits for it, and every sample's seed is its prompt's.
    here = pool is not None and OVERLAP_HERE and isinstance(engines.handles[0], _Here) and not engines.sleepy \
        and not cfg.dynamic_sampling and cfg.algo != "remax"     # (those generate more during the step itself)
    side = torch.cuda.Stream(info["device"], priority=ENGINE_STREAM_PRIORITY) \
        if here and torch.device(info["device"]).type == "cuda" else None

    def on_side(rows: list[dict], step: int, version: int, ready) -> tuple:
        if side is not None:
            torch.cuda.set_device(side.device)              # first: a thread starts on device 0
        with contextlib.nullcontext() if side is None else torch.cuda.stream(side):
            if side is not None:
                side.wait_event(ready)                      # the weights the main stream synced last
            samples = engines.generate(rows, step, version)()
            if side is not None:
                side.synchronize()
        return samples, rewarder(samples)

    def ask(rows: list[dict], step: int, version: int):
        """A future (a function to call) of the rollout of rows; with the thread, of (samples, (scores, answered))."""
        if here:
            ready = None if side is None else torch.cuda.current_stream(side.device).record_event()
            return pool.submit(on_side, rows, step, version, ready).result
        fut = engines.generate(rows, step, version)
        return fut if pool is None else pool.submit(lambda: (lambda s: (s, rewarder(s)))(fut())).result

    def evaluate() -> dict:
        scores, answered = rewarder(engines.generate(test_rows, -1, -1, True)(), rm=False)
        return {"eval_accuracy": sum(scores) / len(scores), "eval_answered": sum(answered) / len(answered)}
    try:
        first_eval = {"eval_accuracy": None}
        if start == 0 and cfg.algo == "ppo" and cfg.value_warmup_steps:
            rows = take()
            for k in range(cfg.value_warmup_steps):
                samples = engines.generate(rows, -2 - k, 0)()
                loss = get(trainer.warmup.remote(samples, rewarder(samples)[0]))
                say(f"value warm-up {k + 1}/{cfg.value_warmup_steps}: value loss {loss:.4f}")
        if rank0:
            first_eval = evaluate()
            log.merge({"step": start, **first_eval}, f"step {start} | held-out greedy accuracy "
                      f"{first_eval['eval_accuracy']:.3f}")
        version = start                  # the engine holds the trainer's weights after `version` optimizer steps
        # pending: the next batch of rollouts -- a list (resumed), or a future of one, being generated meanwhile
        # fresh: a first rollout from the current weights (a new run, one extended past its last step, or a resume
        # of a sync run's checkpoint, whose saved rollout was made from the saved weights)
        fresh = pending is None or pending[0]["version"] == start
        pending = ask(take(), start, version) if pending is None else pending
        ahead = None                     # one-step-off: the rollout of the step after next, once asked (see below)
        for step in range(start, cfg.steps):
            timer, t0 = {}, time.perf_counter()
            t_step = t0
            samples, graded = _got(pending if isinstance(pending, list) else pending())
            if cfg.mode == "one_step_off" and step + 1 < cfg.steps:
                # the next rollout: an actor engine generates it WHILE the trainer trains on `samples` below. Asked
                # at the end of the step before (`ahead`, below), or now on a run's first step
                pending, ahead = (ahead if ahead is not None else ask(take(), step + 1, version)), None
            stale = step - samples[0]["version"]
            # exactly one step behind in one-step-off mode, none in sync; the first step of a resume trains on the
            # saved rollout, whichever mode made it (a one-step-off checkpoint resumed in sync mode: 1 once)
            if stale != (0 if cfg.mode == "sync" or (step == start and fresh) else 1) and not (step == start and
                                                                                              stale in (0, 1)):
                raise RuntimeError(f"ppo.py: step {step} got a rollout of the weights after step "
                                   f"{samples[0]['version']} (staleness {stale}; {cfg.mode} mode allows "
                                   f"{0 if cfg.mode == 'sync' else 1}): a bug, please report it")
            timer["generate"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            scores, answered = graded or rewarder(samples)
            refill, t_gen = 0, timer["generate"]
            if cfg.dynamic_sampling and n > 1 and cfg.refill_rounds:   # more prompts, from the engine's weights now

                def rounds():
                    yield samples, scores, answered
                    for _ in range(cfg.refill_rounds):
                        t1 = time.perf_counter()
                        more = engines.generate(take(), step, version)()
                        timer["generate"] += time.perf_counter() - t1
                        yield more, *rewarder(more)
                samples, scores, answered, seen = fill_informative(rounds(), P // dp, n,
                                                                   lambda smp, sc: shaped_scores(cfg, smp, sc))
                for i, s in enumerate(samples):
                    s["group"] = i // n
                refill = seen - P // dp                             # extra groups generated and graded
            baseline = None
            if cfg.algo == "remax":                        # the score of each prompt's greedy response
                baseline = rewarder(engines.generate(greedy_rows(samples, n), step, -1, True)())[0]
            timer["reward"] = time.perf_counter() - t0 - (timer["generate"] - t_gen)
            lr = nt.lr_at(step, cfg.warmup_steps, cfg.steps, cfg.lr, cfg.min_lr_ratio)
            if engines.sleepy:                   # colocated: the trainer's step gets the engine's memory
                timer["sleep"] = engines.nap(False)
            m, t = get(trainer.step.remote(samples, scores, answered, step, lr, baseline))
            timer.update(t)
            if engines.sleepy:
                timer["wake"] = engines.nap(True)
            t0 = time.perf_counter()
            if here and callable(pending):
                pending()             # the thread's generation ends before sync() changes the engine's weights
            timer["sync"] = sync()    # an actor runs its calls in order: this waits for the generation asked for
            version = step + 1        # above, which counts as generate (generation the step did not hide)
            timer["generate"] += max(0.0, time.perf_counter() - t0 - timer["sync"])
            if cfg.mode == "sync" and step + 1 < cfg.steps:
                t0 = time.perf_counter()
                pending = engines.generate(take(), step + 1, version)()
                timer["generate"] += time.perf_counter() - t0
            row = {"step": step + 1, "lr": lr, **m, "staleness": stale, **{f"time_{k}": v for k, v in timer.items()},
                   "engine_generate_s": max(s.get("engine_s", 0.0) for s in samples)}    # the engines' own time
            if cfg.dynamic_sampling:
                row["refill_groups"] = refill                       # (under torchrun dp: rank 0's share)
            row["step_s"] = time.perf_counter() - t_step
            row["tokens_per_s"] = m.get("tokens", 0) / row["step_s"]          # sampled tokens, all ranks
            if rank0 and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps):
                row.update(evaluate())
            log.write(row, _line(row, cfg) if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps else None)
            if cfg.save_every >= 0 and ((cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps):
                if cfg.mode == "one_step_off" and not isinstance(pending, list):
                    pending = _got(pending())[0]           # the in-flight rollout goes into the checkpoint
                # both modes have taken step + 1's prompts by now (sync generated them above): the sampler's saved
                # position is past them, so their rollout is saved too, else a resume would skip that batch
                keep = pending if step + 1 < cfg.steps else None
                states = _gather(trainer, (sampler.state_dict(), keep), dp)
                get(trainer.save.remote(str(out), step + 1, [a for a, _ in states], [b for _, b in states]))
            if cfg.mode == "one_step_off" and step + 2 < cfg.steps:
                # The rollout after next, asked the moment the engines hold this step's weights (sync above), not at
                # the top of the next step: there the loop first waits for rollout step + 1 to reach this process
                # and be graded, and an engine left idle for that wait (the transfer, math-verify) puts it on every
                # step's critical path (the split layout measured 0.9 s per step around 0.67 s of generation). Same
                # prompts, weights and calls in the same order to the engines, so the same run; asked after the
                # eval and the save, so neither waits for it nor shares the engine with it, and a checkpoint's
                # sampler position and in-flight rollout stay those of step + 1.
                ahead = ask(take(), step + 2, version)
    finally:
        if pool is not None:
            pool.shutdown(wait=here, cancel_futures=True)    # a generation in flight ends before the engine
        rewarder.close()
    if log.wandb is not None:
        log.wandb.finish()
    rows = log.rows
    summary = {"steps": cfg.steps, "first_reward": next((r["reward"] for r in rows if "reward" in r), None),
               "last_reward": rows[-1].get("reward") if rows else None,
               "eval_accuracy_before": next((r["eval_accuracy"] for r in rows if "eval_accuracy" in r),   # step 0's,
                                            first_eval["eval_accuracy"]),                      # also after a resume
               "eval_accuracy_after": rows[-1].get("eval_accuracy") if rows else None,
               "seconds": round(time.time() - t_start, 1), "dp": dp, "backend": cfg.backend}
    if rank0:
        plot_curves(out / "metrics.jsonl", out / "curves.png")
        prepare_data.append_result(cfg.results, "ppo", asdict(cfg), summary)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"ppo.py: {cfg.algo} {start} -> {cfg.steps} steps, reward {summary['first_reward']} -> "
              f"{summary['last_reward']}, held-out {summary['eval_accuracy_before']} -> "
              f"{summary['eval_accuracy_after']}, {summary['seconds']} s; out {out}")
    return summary


def _got(x) -> tuple[list, tuple | None]:
    """(samples, (scores, answered) or None) of what a rollout future gave: graded by the thread, or not."""
    return x if isinstance(x, tuple) else (x, None)


def _gather(trainer, item, dp: int) -> list:
    """item from every data-parallel rank (in-process roles under torchrun), in rank order."""
    if dp == 1:
        return [item]
    out = [None] * dp
    torch.distributed.all_gather_object(out, item, group=trainer.obj.mesh.group("dp"))
    return out


class _Log:
    """metrics.jsonl (rank 0 writes; every rank keeps its rows for the summary), and wandb when asked."""

    def __init__(self, path: Path, start: int, write: bool = True, wandb_project: str = "", config: dict | None = None):
        self.path, self.rows, self.on, self.wandb = path, [], write, None
        if not write:
            return
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError("ppo.py: --wandb needs the wandb package (pip install wandb)") from None
            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(path.parent),
                                    name=path.parent.name, resume="allow")
        if start and path.is_file():     # resume: keep the rows up to the resumed step (the summary's too)
            rows = map(json.loads, filter(str.strip, path.read_text().splitlines()))
            self.rows = [r for r in rows if r["step"] <= start]
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        elif path.is_file():
            path.unlink()

    def merge(self, row: dict, line: str | None):
        """write(), unless a row of that step is there already (a resume's held-out eval of the resumed step):
        then the new keys go into it, and the file is rewritten (one row per step)."""
        old = next((r for r in self.rows if r["step"] == row["step"]), None)
        if old is None:
            return self.write(row, line)
        old.update(row)
        if self.on:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
            print(line, flush=True)

    def write(self, row: dict, line: str | None):
        self.rows.append(row)
        if not self.on:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])
        if line:
            print(line, flush=True)


def _line(r: dict, cfg: Config) -> str:
    t = " ".join(f"{k[5:]} {v:.2f}s" for k, v in r.items() if k.startswith("time_"))
    ev = f" | held-out {r['eval_accuracy']:.3f}" if "eval_accuracy" in r else ""
    if r.get("skipped"):
        return f"step {r['step']}/{cfg.steps} | reward {r['reward']:.3f} | skipped: no group had a signal{ev} | {t}"
    rm = f" | rm {r['rm_score']:.3f}" if "rm_score" in r else ""
    rm += "" if r.get("informative") is None else f" | signal {r['informative']:.2f}"   # groups not all equal
    return (f"step {r['step']}/{cfg.steps} | reward {r['reward']:.3f}{rm} | acc {r['accuracy']:.3f} | "
            f"kl {r.get('kl', 0):.4f} | "
            f"entropy {r.get('entropy', 0):.3f} | clip {r.get('clip_frac', 0):.3f} | gap {r['logp_gap_mean']:.2e} | "
            f"len {r['response_len']:.0f} | trunc {r['truncated']:.2f}{ev} | {r['tokens_per_s']:.0f} tok/s | {t}")


def _save(trainer: Trainer, nt, mesh, out: Path, step: int, cfg: Config, sampler_states: list, pending: list) -> None:
    """Every rank calls it. The critic FIRST, as a nanotron checkpoint of its own beside the actor's
    (critic_step_N/: every tp/pp shard and its AdamW state, + the value head and its optimizer in
    value_head.pt), then the actor (step_N/, mergeable by merge.py) with the data position and the in-flight
    rollout of every data-parallel rank in its manifest. step_N/manifest.json is written last of all, so a
    complete step_N always has its critic (and, LoRA, its adapters)."""
    folder = out / f"step_{step}"
    if trainer.critic is not None:
        critic = out / f"critic_step_{step}"
        nt.save_checkpoint(critic, trainer.critic, trainer.critic_opt, mesh, step)
        if mesh.is_last_stage and mesh.dp_rank == 0 and mesh.tp_rank == 0:    # the head lives on the last stage
            tmp = critic / "value_head.pt.tmp"
            torch.save({"head": trainer.value_head.state_dict(), "head_opt": trainer.head_opt.state_dict()}, tmp)
            tmp.replace(critic / "value_head.pt")
        mesh.barrier()
    extra = {"sampler": sampler_states, "pending": pending}
    if trainer.lora is not None and mesh.rank == 0:
        lora_save(trainer, folder)      # before the actor's files: see lora_file
    with trainer.merged():              # LoRA: the model files hold the merged weights, lora_file the adapters
        nt.save_checkpoint(folder, trainer.actor, None if trainer.lora else trainer.opt, mesh, step, extra=extra,
                           config=asdict(cfg))
    if mesh.rank != 0:
        return
    done = sorted((p for p in out.glob("step_*") if (p / "manifest.json").is_file()),
                  key=lambda p: int(p.name.split("_")[1]))
    for p in done[:-cfg.keep_last] if cfg.keep_last > 0 else []:
        import shutil
        shutil.rmtree(p)
        shutil.rmtree(p.with_name(f"critic_{p.name}"), ignore_errors=True)
        lora_file(p).unlink(missing_ok=True)


def _load_critic(trainer: Trainer, nt, mesh, src: Path) -> None:
    """The critic of checkpoint src (critic_<name> beside it): weights, AdamW state, value head."""
    critic = src.with_name(f"critic_{src.name}")
    if not (critic / "value_head.pt").is_file():
        raise FileNotFoundError(f"ppo.py: {critic} is missing or incomplete: the critic of {src} (was it saved by "
                                "a run with --algo ppo?)")
    nt.load_checkpoint(critic, trainer.critic, trainer.critic_opt, mesh)
    state = torch.load(critic / "value_head.pt", map_location="cpu")
    trainer.value_head.load_state_dict(state["head"])
    trainer.head_opt.load_state_dict(state["head_opt"])


# ---- benchmark ---------------------------------------------------------------------------------------------
# `python ppo.py --bench [ppo flags]`: GRPO steps at the setting TRL's GRPOTrainer was measured at (16 prompts
# x 8 samples of <= 128 tokens, beta 0, the synthetic math task, SmolLM2-135M-Instruct unless --model says
# otherwise), ours and, in the same run, TRL's (HF generate; bench-only, when trl is installed). One table:
# seconds per step and samples/s (the first step, compile and warm-up, is left out); then where our step's
# time goes, and the in-memory weight sync of the 135M model and of the Qwen3-0.6B shape. On CPU only
# --model tiny runs (a check of the harness itself, not a measurement).

def bench(argv: list) -> list[dict]:
    import statistics
    import tempfile
    cuda = torch.cuda.is_available()
    base = ["--algo", "grpo", "--prompts_per_step", "16", "--samples_per_prompt", "8", "--max_new_tokens", "128",
            "--steps", "6", "--lr", "1e-6", "--kl_coef", "0", "--eval_problems", "16", "--save_every", "-1",
            "--model", "smollm2" if cuda else "tiny"]
    cfg = resolve(parse_args(base + argv), cuda)
    if not cuda and cfg.model != "tiny":
        raise ValueError("ppo.py: --bench without a CUDA GPU runs only --model tiny (a check of the harness)")
    tmp = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    B = cfg.prompts_per_step * cfg.samples_per_prompt
    main(base + argv + ["--out", str(tmp / "ours"), "--results", str(tmp / "results.jsonl")])
    rows = [r for r in _ppo_rows_of(tmp / "ours") if "step_s" in r][1:]           # the first step warms up
    step_s = statistics.median(r["step_s"] for r in rows)
    table = [{"system": "ppo.py (nanovllm + nanotron)", "step_s": step_s, "samples_s": B / step_s}]
    try:
        trl_s = _bench_trl(cfg, tmp)
        table.append({"system": "TRL GRPOTrainer (HF generate)", "step_s": trl_s, "samples_s": B / trl_s})
    except Exception as e:     # noqa: BLE001 (a peer that is missing or fails is reported, never fatal to ours)
        print(f"# TRL peer skipped: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    dev = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n# {dev}, torch {torch.__version__}; {cfg.model}, {cfg.prompts_per_step} prompts x "
          f"{cfg.samples_per_prompt} samples <= {cfg.max_new_tokens} tokens, {len(rows)} timed steps")
    print("| system | s / step | samples / s | vs TRL |\n|---|---:|---:|---:|")
    for t in table:
        print(f"| {t['system']} | {t['step_s']:.2f} | {t['samples_s']:.1f} | "
              f"{t['samples_s'] / table[-1]['samples_s']:.2f}x |" if len(table) > 1 else
              f"| {t['system']} | {t['step_s']:.2f} | {t['samples_s']:.1f} | - |")
    parts = sorted({k for r in rows for k in r if k.startswith("time_")})
    print("\nour step, median seconds: " + ", ".join(
        f"{k[5:]} {statistics.median(r.get(k, 0.0) for r in rows):.3f}" for k in parts) +
        f"; rollout {statistics.median(r['tokens'] / max(r['time_generate'], 1e-9) for r in rows):,.0f} tok/s")
    print(f"weight sync in memory, Qwen3-0.6B shape{'' if cuda else ' (2 layers, CPU)'}: "
          f"{_bench_sync('qwen3-0.6b'):.3f} s")
    return table


# `python ppo.py --bench --layouts sync,split,proc [the run's flags]` (issue 15's measurement): the SAME run (model,
# data, seeds, steps) once per layout, each a torchrun job over this machine's GPUs (2 gloo processes on CPU: a check
# of the harness), then one table of steps per hour against the first layout and one PNG of the reward curves, which
# must lie on each other (one step apart: off-policy trains on the rollout of the weights one step older). Step time =
# the driver's `step_s` (held-out evals excluded) without the first step (compilation, graders starting) and the last
# (no next rollout to generate in either mode). No checkpoints (--save_every -1).
LAYOUTS = {"sync": ["--mode", "sync"],                                   # every GPU generates, then trains (dp)
           "thread": ["--mode", "one_step_off"],                         # + the engine generates in a thread
           "proc": ["--mode", "one_step_off", "--engine_process"],       # + in a child process of its own
           "split": ["--mode", "one_step_off", "--rollout_gpus", "1"]}   # one GPU generates, the others train
LAYOUT_TIMEOUT_S = 3 * 3600


def bench_layouts(cfg: Config, argv: list) -> list[dict]:
    import shutil
    import statistics
    import subprocess
    names = [x.strip() for x in cfg.layouts.split(",") if x.strip()]
    G = torch.cuda.device_count() if torch.cuda.is_available() else 2
    for ok, msg in [(names and all(n in LAYOUTS for n in names), f"--layouts {cfg.layouts!r}: expected a comma-"
                     f"separated list of {', '.join(LAYOUTS)}"), ("split" not in names or G >= 2, "--layouts split "
                     "needs 2 GPUs or more (one generates, the others train)"), ("RANK" not in os.environ,
                     "--bench --layouts starts its own torchrun jobs: run it as `python ppo.py --bench --layouts ..`")]:
        if not ok:
            raise ValueError(f"ppo.py: {msg}")
    from prepare_data import drop_flags                 # the run's own flags, less those each layout sets
    base = drop_flags(Config, argv, {"bench", "layouts", "mode", "rollout_gpus", "engine_process", "out", "results",
                                     "resume", "save_every"})
    root = Path(cfg.out or "runs/ppo_layouts").resolve()
    rows, curves = [], {}
    for name in names:
        out = root / name
        shutil.rmtree(out, ignore_errors=True)                    # a fresh run, never a resumed one
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={G}",
               str(Path(__file__).resolve()), *base, *LAYOUTS[name], "--out", str(out), "--resume", "never",
               "--save_every", "-1", "--results", str(root / "results.jsonl")]
        print(f"\n=== layout {name}: {' '.join(cmd[2:])}", flush=True)
        try:
            rc = subprocess.run(cmd, timeout=LAYOUT_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        every = _ppo_rows_of(out) if (out / "metrics.jsonl").is_file() else []
        steps = [r for r in every if "step_s" in r][1:-1]
        if rc != 0 or not steps:
            rows.append({"layout": name, "error": f"exit {rc}" if rc != 0 else "fewer than 3 steps"})
            continue
        s, mean = [r["step_s"] for r in steps], lambda k: statistics.mean(r.get(k, 0.0) for r in steps)  # noqa: E731
        evals = [r["eval_accuracy"] for r in every if r.get("eval_accuracy") is not None]
        rewards = [r["reward"] for r in every if "reward" in r]
        rows.append({"layout": name, "mean_s": statistics.mean(s), "median_s": statistics.median(s), "steps": len(s),
                     "generate_s": mean("time_generate"), "engine_s": mean("engine_generate_s"),
                     "trainer_s": sum(mean(f"time_{k}") for k in ("actor", "critic", "reference")),
                     "sync_ms": (1e3 * statistics.median(r["time_sync"] for r in steps),
                                 1e3 * max(r["time_sync"] for r in steps)),
                     "reward_last": statistics.mean(rewards[-20:]), "first_reward": rewards[0], "evals": evals})
        curves[name] = out / "metrics.jsonl"
    ok = [r for r in rows if "error" not in r]
    lines = [f"| layout | mean s / step | median | steps / hour | vs {ok[0]['layout'] if ok else '-'} (mean / median) "
             "| generate on the path | engine's own | trainer | weight sync ms, median (max) | reward, last 20 "
             "| held-out first -> last |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['error']} | | | | | | | | | |")
            continue
        r["vs_first"] = (ok[0]["mean_s"] / r["mean_s"], ok[0]["median_s"] / r["median_s"])
        held = f"{r['evals'][0]:.3f} -> {r['evals'][-1]:.3f}" if r["evals"] else "-"
        lines.append(f"| {r['layout']} | {r['mean_s']:.3f} | {r['median_s']:.3f} | {3600 / r['mean_s']:,.0f} | "
                     f"{r['vs_first'][0]:.2f}x / {r['vs_first'][1]:.2f}x | {r['generate_s']:.3f} | {r['engine_s']:.3f} "
                     f"| {r['trainer_s']:.3f} | {r['sync_ms'][0]:.0f} ({r['sync_ms'][1]:.0f}) | {r['reward_last']:.3f} "
                     f"| {held} |")
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    table = "\n".join(lines)
    print(f"\nppo.py --bench --layouts ({G} x {dev}, torch {torch.__version__}; {' '.join(base)}; steps 2 to N - 1):"
          f"\n{table}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "bench.md").write_text(table + "\n")
    (root / "bench.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    if curves:
        plot_curves(curves, root / "curves_layouts.png")
    return rows


def _ppo_rows_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _bench_sync(shape: str) -> float:
    """Seconds of one trainer -> engine weight update (colocated, in memory) for a random model of `shape`
    (nanovllm.SHAPES; on CPU a 2-layer cut of it, a check of the harness)."""
    import nanotron as nt
    from nanovllm import LLM, _bench_folder
    cuda = torch.cuda.is_available()
    folder = _bench_folder(shape)
    hf = {**json.loads((folder / "config.json").read_text()), **({} if cuda else {"num_hidden_layers": 2})}
    (folder / "config.json").write_text(json.dumps(hf))
    model = nt.Transformer(nt.ModelConfig.from_hf(hf), nt.Mesh(), dtype=torch.bfloat16 if cuda else torch.float32
                           ).init_random(0)
    llm = LLM(str(folder), load_format="dummy", gpu_memory_utilization=0.2, max_model_len=1024, max_num_seqs=64,
              **({} if cuda else {"device": "cpu", "num_gpu_blocks_override": 128, "block_size": 8}))
    llm.update_weights(model.state_dict_hf())                                   # warm-up
    t0 = time.perf_counter()
    llm.update_weights(model.state_dict_hf())
    torch.cuda.synchronize() if cuda else None
    secs, _ = time.perf_counter() - t0, llm.shutdown()
    return secs


def _bench_trl(cfg: Config, tmp: Path) -> float:
    """Median seconds per GRPOTrainer step at the same setting, on the same prompts, with the same grader."""
    import eval as ev
    import prepare_data
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    if cfg.model == "tiny":
        raise ValueError("the tiny model has no tokenizer for TRL")
    folder = str(prepare_data.default_model_path() if cfg.model == "smollm2" else Path(cfg.model))
    tok = AutoTokenizer.from_pretrained(folder)
    train, _ = load_prompts(cfg, len(tok))
    data = Dataset.from_list([{"prompt": tok.decode(r["prompt_ids"]), "answer": r["answer"]} for r in train[:2048]])
    grader = ev.Grader(cfg.grade_workers or default_grade_workers(), cfg.grade_timeout_s)
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    def reward(completions, answer, **kw):
        return [float(g.correct) for g in grader.grade(zip(completions, answer))]
    args = GRPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=cfg.prompts_per_step *
                      cfg.samples_per_prompt, num_generations=cfg.samples_per_prompt, max_completion_length=
                      cfg.max_new_tokens, beta=0.0, learning_rate=cfg.lr, max_steps=cfg.steps, temperature=cfg.temperature,
                      logging_steps=1, report_to="none", save_strategy="no", bf16=torch.cuda.is_available(),
                      use_cpu=not torch.cuda.is_available(), seed=cfg.seed)
    try:
        GRPOTrainer(model=folder, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                    callbacks=[Clock()]).train()
    finally:
        grader.close()
    import statistics
    return statistics.median(times[1:] or times)


# ---- CLI ---------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> Config:
    from prepare_data import config_from_argv
    return config_from_argv(Config, argv, __doc__.split("\n\n")[0].strip())


if __name__ == "__main__":
    from prepare_data import run_cli
    run_cli(main, prog="ppo.py")
