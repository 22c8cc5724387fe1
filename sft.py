"""sft.py -- supervised fine-tuning (and DPO) of a decoder on the (dp, pp, tp) nanotron mesh.

The first training stage of the pipeline, and its executable spec: prepare_data.py's `.nano` rows in,
a sharded resumable checkpoint out. Stands in for TRL's SFTTrainer / DPOTrainer and verl's SFT script.
Keeps: the loss on response tokens only, averaged per token over the WHOLE step (every micro-batch, every
data-parallel rank: the update does not depend on how the batch is split), sequence packing to a token
budget, tensor / pipeline / data parallelism with ZeRO, warmup + cosine LR, eval loss on the test split,
periodic checkpoints and resume, MFU. Drops: multi-turn masking rules, padding-based batches, LoRA.

How it works: you set the intent (tokens per step, the micro-batch token budget, steps); the file derives
the rest and prints it. Each dp rank draws rows with nanosets.ShardedSampler and first-fit packs them
into M = tokens_per_step / (dp * micro_batch_tokens) micro-batches; every pp and tp rank of one dp rank
reads the same rows, so they build identical micro-batches without talking. One tiny all-reduce over dp
counts the step's loss tokens; nanotron.pipeline_step runs the micro-batches with loss scale 1 / that
count (any pp, pp = 1 included), then clip, AdamW. `--objective dpo` (Rafailov et al. 2023) trains on
(chosen, rejected) pairs against a frozen copy of the starting model (pp = 1 only for now).

Commands:
    python sft.py                                      # CPU: SmolLM2-135M on the synthetic task, ~2 min
    python sft.py --model tiny --data toy              # CPU: a random toy model on a toy task, seconds
    python sft.py --objective dpo                      # DPO on synthetic preference pairs
    torchrun --nproc_per_node 8 sft.py --tp 2 --pp 2   # 8 GPUs: dp = 8 / (2 * 2) = 2 inferred
    torchrun --nproc_per_node 2 sft.py --model tiny --data toy --tp 2   # CPU, gloo
    python sft.py --bench 1,tp2,pp2,dp2 --model qwen3-0.6b --data data/gsm8k_sft --lr 3e-4 --out runs/layouts
                                                       # 2 GPUs: each layout once -> table + loss_layouts.png
    python sft.py --bench auto --model tiny --data toy --steps 2   # CPU: the same 4 layouts on gloo, seconds
    pytest -q test_all.py -k sft
Outputs: <out>/step_N/ (checkpoints), <out>/metrics.jsonl, <out>/loss.png, <out>/summary.json, one line in
results.jsonl.

Contents: config | data (toy task, preference pairs, packing) | losses and steps | eval |
          FLOPs and MFU | logging | driver | layout benchmark | CLI
"""
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import nanosets
import nanotron as nt

IGNORE = nt.IGNORE_INDEX

# ---- config ------------------------------------------------------------------------------------------


@dataclass
class Config:
    model: str = "smollm2"  # HF folder or hub id; smollm2 = the offline SmolLM2-135M-Instruct; tiny, qwen3-0.6b = random init of that shape
    data: str = ""  # folder with train.nano + test.nano; "" = data/synthetic_sft (dpo: synthetic_dpo), built if missing; toy = no tokenizer
    out: str = "ckpt/sft"  # checkpoints step_N/, metrics.jsonl and loss.png go here
    results: str = "results.jsonl"  # the artifact root's log: one JSON line per pipeline stage
    objective: str = "sft"  # sft (next-token loss on the response) | dpo (preference pairs vs a frozen reference)
    tp: int = 1  # tensor-parallel ranks (within a node: two all-reduces per layer)
    pp: int = 1  # pipeline stages; dp = world / (tp * pp) is inferred
    zero_stage: int = 1  # 1 shards the fp32 Adam state over dp for free; 2/3 shard grads/params too
    schedule: str = "1f1b"  # pipeline schedule: 1f1b (memory of pp micro-batches) | afab (the naive reference)
    tokens_per_step: int = 0  # global packed tokens per optimizer step; 0 = 16384 on CUDA, 2048 on CPU
    micro_batch_tokens: int = 0  # packing budget of one micro-batch (the memory knob); 0 = 2048 CUDA, 1024 CPU
    steps: int = 0  # optimizer steps; 0 = `epochs` passes over train on CUDA, 4 on CPU (a demo)
    epochs: float = 1.0  # passes over the train split when steps is derived (CUDA)
    lr: float = 2e-5  # peak LR; SFT of a pretrained model wants a small one (DPO: ~5e-7 at scale)
    min_lr_ratio: float = 0.1  # cosine decays to lr * this, not to 0 (the last steps still learn)
    warmup_steps: int = 20  # linear warmup from ~0; clamped to 10% of the run so short runs still train
    weight_decay: float = 0.0  # a few epochs of fine-tuning need little regularisation
    betas: tuple = (0.9, 0.95)  # AdamW betas; 0.95 reacts faster than 0.999 to the loss landscape shifting
    grad_clip: float = 1.0  # clip the global grad norm (Pascanu et al. 2013); 0 = measure only
    eval_every: int = 100  # steps between evals on the test split (also before the first and after the last)
    eval_tokens: int = 0  # test tokens per eval; 0 = 65536 on CUDA, 1024 on CPU
    save_every: int = 500  # steps between checkpoints (the last step is always saved; 0 = only the last; -1 = none)
    resume: str = "auto"  # auto = latest <out>/step_N if any | never | a checkpoint folder
    seed: int = 0  # data order (and the random init of the presets, --model tiny / qwen3-0.6b)
    dtype: str = "auto"  # bfloat16 | float32; auto = bfloat16 on CUDA, float32 on CPU
    activation_checkpointing: bool = False  # recompute layers in backward: less memory, ~1/3 more compute
    sequence_parallel: bool = False  # shard norms/activations over tp between the parallel layers
    use_kernels: bool = True  # kernels.py's Triton kernels where importable (CUDA), torch otherwise
    dpo_beta: float = 0.1  # DPO's KL strength: larger = stay closer to the reference
    log_every: int = 1  # steps between console lines (metrics.jsonl gets every step)
    wandb: bool = False  # also log to Weights & Biases (when the package is installed)
    bench: str = ""  # layouts, e.g. 1,tp2,pp2,dp2, or auto (1,dpG,tpG,ppG on G GPUs): a torchrun job each -> table, PNG


# Defaults that depend on the device: (CUDA, CPU). The CPU column makes `python sft.py` a < 2 minute demo.
# CUDA micro_batch_tokens = prepare_data's max_total_tokens (2048): no row is skipped, and the user command
# (8 GPUs, tp 2, pp 2 -> dp 2) gets M = 16384 / (2 * 2048) = 4 micro-batches: a 1/5 pipeline bubble.
AUTO = {"tokens_per_step": (16384, 2048), "micro_batch_tokens": (2048, 1024), "eval_tokens": (65536, 1024),
        "dtype": ("bfloat16", "float32")}
CPU_DEMO_STEPS = 4
# The first steps of a run compile and autotune the Triton kernels and grow the allocator (on 2 H200s: 4-8 s,
# then 0.3-0.6 s): the summary's tokens/s and MFU average the steps after them (every step is in metrics.jsonl).
UNTIMED_STEPS = 3


def resolve(cfg: Config, cuda: bool) -> Config:
    """Validate choices and fill the device-dependent defaults, so the printed config is what ran."""
    if cfg.objective not in ("sft", "dpo"):
        raise ValueError(f"sft.py: --objective {cfg.objective!r}: expected sft or dpo")
    if cfg.objective == "dpo" and cfg.pp > 1:
        raise NotImplementedError("sft.py: --objective dpo supports pp = 1 only for now (use tp and dp); the "
                                  "policy and reference log-probs would need a forward-only pipeline per pair")
    if cfg.schedule not in nt.SCHEDULES:
        raise ValueError(f"sft.py: --schedule {cfg.schedule!r}: expected one of {sorted(nt.SCHEDULES)}")
    auto = {k: v[0 if cuda else 1] for k, v in AUTO.items() if getattr(cfg, k) in (0, "auto")}
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"sft.py: --dtype {cfg.dtype!r}: expected auto, bfloat16 or float32")
    data = cfg.data or f"data/synthetic_{cfg.objective}"
    return dataclasses.replace(cfg, data=data, betas=tuple(cfg.betas), **auto)


# ---- data --------------------------------------------------------------------------------------------
# SFT rows (prepare_data.py's sft recipe): input_ids list<int32> (prompt + response), loss_mask list<uint8>
# (1 = a response token to learn), num_tokens int32. Preference rows (DPO) hold two such sequences that
# share the prompt: chosen_ids/chosen_mask and rejected_ids/rejected_mask, num_tokens = both lengths.
DPO_SCHEMA = {"chosen_ids": "list<int32>", "chosen_mask": "list<uint8>", "rejected_ids": "list<int32>",
              "rejected_mask": "list<uint8>", "num_tokens": "int32"}
SFT_SCHEMA = {"input_ids": "list<int32>", "loss_mask": "list<uint8>", "num_tokens": "int32"}


def _write_splits(folder: Path, splits: dict, schema: dict, manifest: dict):
    """{split: rows} -> folder/{split}.nano + manifest.json, via a temp folder renamed at the end."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, rows in splits.items():
        nanosets.Dataset.from_list(rows, schema=schema).save_to_disk(str(tmp / f"{split}.nano"))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder)


def make_toy_data(folder, objective: str = "sft", vocab_size: int = 101, n_train: int = 512, n_test: int = 64,
                  seed: int = 0):
    """A tokenizer-free task for tests and the tiny model: prompt = BOS, 4-12 random tokens, SEP; response =
    the same tokens reversed, EOS. Learnable in a few steps (the response is a function of the prompt).
    DPO pairs: chosen = the right response, rejected = as long, but every content token is BAD (a token
    that never appears in prompts): a preference a random model can pick up within a few steps."""
    g = torch.Generator().manual_seed(seed)
    BOS, EOS, SEP, BAD = 1, 2, 3, 4

    def row():
        k = int(torch.randint(4, 13, (1,), generator=g))
        body = torch.randint(5, vocab_size, (k,), generator=g).tolist()
        prompt, resp = [BOS] + body + [SEP], body[::-1] + [EOS]
        wrong = [BAD] * k + [EOS]
        seq = lambda r: (prompt + r, [0] * len(prompt) + [1] * len(r))
        (c, cm), (r, rm) = seq(resp), seq(wrong)
        if objective == "dpo":
            return {"chosen_ids": c, "chosen_mask": cm, "rejected_ids": r, "rejected_mask": rm,
                    "num_tokens": len(c) + len(r)}
        return {"input_ids": c, "loss_mask": cm, "num_tokens": len(c)}
    splits = {"train": [row() for _ in range(n_train)], "test": [row() for _ in range(n_test)]}
    _write_splits(Path(folder), splits, DPO_SCHEMA if objective == "dpo" else SFT_SCHEMA,
                  {"name": "toy", "recipe": objective, "vocab_size": vocab_size})


def make_preference_data(folder, n_train: int = 2000, n_test: int = 200, seed: int = 0):
    """Synthetic preference pairs from prepare_data's synthetic math task, SmolLM2 chat template: chosen =
    the worked solution, rejected = the SAME solution whose final \\boxed{} answer is wrong (off by 1..9).
    Both are tokenized like the sft recipe (prompt + response, loss mask on the response)."""
    import random
    import prepare_data as pd
    pcfg = pd.Config(recipe="sft")
    tok, rng = pd.load_tokenizer(pcfg.tokenizer), random.Random(seed)
    splits = {}
    for split, items in pd.synthetic_math(n_train, n_test, seed).items():
        wrong = [dict(x, solution=re.sub(r"\\boxed\{([^}]*)\}\.?$", lambda m: "\\boxed{%d}." % (
            int(m.group(1)) + rng.choice([-1, 1]) * rng.randint(1, 9)), x["solution"])) for x in items]
        rows = []
        for c, r in zip(pd.encode_chunk(items, tok, pcfg), pd.encode_chunk(wrong, tok, pcfg)):
            rows.append({"chosen_ids": c["input_ids"], "chosen_mask": c["loss_mask"], "rejected_ids":
                         r["input_ids"], "rejected_mask": r["loss_mask"], "num_tokens": len(c["input_ids"]) +
                         len(r["input_ids"])})
        splits[split] = rows
    _write_splits(Path(folder), splits, DPO_SCHEMA, {"name": Path(folder).name, "recipe": "dpo",
                                                     "tokenizer": "smollm2", "vocab_size": len(tok)})


def ensure_data(cfg: Config, mesh: nt.Mesh) -> Path:
    """The data folder, built first when it is a known default (rank 0 builds, the others wait)."""
    folder = Path("data" if cfg.data == "toy" else cfg.data)
    if cfg.data == "toy":
        folder = folder / f"toy_{cfg.objective}"
    if mesh.rank == 0 and not (folder / "train.nano").is_file():
        if cfg.data == "toy":
            make_toy_data(folder, cfg.objective, seed=cfg.seed)
        elif folder.name == "synthetic_sft":
            import prepare_data as pd
            pd.build(pd.Config(out_dir=str(folder.parent), name=folder.name))
        elif folder.name == "synthetic_dpo":
            make_preference_data(folder, seed=cfg.seed)
        else:
            raise FileNotFoundError(f"sft.py: --data {cfg.data}: no train.nano there; build it with "
                                    "prepare_data.py (sft recipe), or use the synthetic default")
    mesh.barrier()
    return folder


def open_split(folder: Path, split: str, objective: str):
    ds = nanosets.load_dataset(str(folder / f"{split}.nano"))
    need = DPO_SCHEMA if objective == "dpo" else SFT_SCHEMA
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise ValueError(f"sft.py: {folder / (split + '.nano')} lacks columns {missing} for --objective "
                         f"{objective}; expected {sorted(need)} (sft: prepare_data.py --recipe sft)")
    return ds.with_format("torch")


def row_sequences(row: dict, objective: str) -> list:
    """One dataset row -> its [(ids, loss_mask)] sequences: one for SFT, (chosen, rejected) for DPO."""
    if objective == "dpo":
        return [(row["chosen_ids"], row["chosen_mask"]), (row["rejected_ids"], row["rejected_mask"])]
    return [(row["input_ids"], row["loss_mask"])]


def collate(seqs: list, multiple_of: int = 1) -> dict:
    """[(ids, loss_mask)] -> one packed micro-batch for pipeline_step: input_ids [N], positions [N],
    cu_seqlens [B+1], labels [N] (the next token where IT is a response token, else -100), max_seqlen.
    multiple_of: sequence parallelism needs N % tp == 0; a filler sequence with no labels pads N."""
    seqs = list(seqs)
    n = sum(len(s) for s, _ in seqs)
    if n % multiple_of:
        pad = multiple_of - n % multiple_of
        seqs.append((torch.zeros(pad, dtype=torch.int64), torch.zeros(pad, dtype=torch.uint8)))
    ids, masks = [s for s, _ in seqs], [m for _, m in seqs]
    # one pack holding everything in order (the budget is the total): nanosets builds the shifted labels
    mb = nanosets.pack_sequences(ids, sum(len(s) for s in ids), masks)[0]
    return {"input_ids": mb["input_ids"], "positions": mb["positions"], "cu_seqlens": mb["cu_seqlens"],
            "labels": mb["labels"], "max_seqlen": max(len(s) for s in ids), "n_rows": len(ids)}


class Batcher:
    """This dp rank's micro-batches, step after step: rows from a ShardedSampler (same seed on every rank,
    so the pp and tp ranks of one dp rank draw the same rows) first-fit into M packs of <= budget tokens.
    A row that fits no pack ends the step and opens the next one. Rows longer than the budget are SKIPPED
    and counted (never truncated: a cut response teaches the model to stop mid-answer)."""

    def __init__(self, ds, objective: str, M: int, budget: int, dp_rank: int, dp: int, seed: int,
                 multiple_of: int = 1):
        self.ds, self.objective, self.M, self.budget, self.multiple_of = ds, objective, M, budget, multiple_of
        self.lengths = ds["num_tokens"].tolist()
        self.sampler = nanosets.ShardedSampler(len(ds), dp_rank, dp, shuffle=True, seed=seed)
        self.it, self.pending, self.skipped = iter(self.sampler), None, 0

    def next_step(self) -> list:
        packs, room = [[] for _ in range(self.M)], [self.budget] * self.M
        while True:
            i, self.pending = (self.pending, None) if self.pending is not None else (next(self.it), None)
            L = self.lengths[i]
            if L > self.budget:
                self.skipped += 1
                continue
            k = next((k for k in range(self.M) if room[k] >= L), None)
            if k is None:                      # full: this row starts the next step
                self.pending = i
                break
            packs[k].append(i)
            room[k] -= L
        return [collate([s for i in p for s in row_sequences(self.ds[i], self.objective)], self.multiple_of)
                | {"n_pairs": len(p)} for p in packs]

    def epoch(self) -> float:
        return self.sampler.epoch + self.sampler.position / max(1, len(self.sampler))

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "pending": self.pending, "skipped": self.skipped}

    def load_state_dict(self, s: dict):
        self.sampler.load_state_dict(s["sampler"])
        self.it, self.pending, self.skipped = iter(self.sampler), s["pending"], s["skipped"]


def eval_batches(ds, cfg: Config, mesh: nt.Mesh, budget: int) -> list:
    """The test micro-batches of this dp rank: the first rows of the split worth eval_tokens (fixed, so
    every eval sees the same data), rows r, r + dp, .. for dp rank r, packed first-fit to the budget."""
    lengths, rows, total = ds["num_tokens"].tolist(), [], 0
    for i, L in enumerate(lengths):
        if total >= cfg.eval_tokens:
            break
        if L <= budget:
            rows.append(i)
            total += L
    mine = rows[mesh.dp_rank::mesh.dp]
    packs = nanosets.plan_packs([lengths[i] for i in mine], budget) if mine else []
    mult = mesh.tp if cfg.sequence_parallel else 1
    return [collate([s for j in p for s in row_sequences(ds[mine[j]], cfg.objective)], mult) | {"n_pairs": len(p)}
            for p in packs]


# ---- losses and steps --------------------------------------------------------------------------------


def _to(mb: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in mb.items()}


def sequence_logps(model, mb: dict) -> torch.Tensor:
    """Sum of log p(response token) per packed sequence [B] (fp32): the log-likelihood DPO compares."""
    hidden = model(mb["input_ids"], mb["positions"], mb["cu_seqlens"], mb["max_seqlen"])
    labels = mb["labels"]
    lp, _ = model.logprobs(hidden, labels.clamp(min=0), return_entropy=False)       # [N]
    lp = torch.where(labels != IGNORE, lp, 0.0)
    cu = mb["cu_seqlens"].long()
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1, device=lp.device), cu[1:] - cu[:-1])   # [N] -> seq
    return torch.zeros(len(cu) - 1, device=lp.device).index_add_(0, seg, lp)


def dpo_losses(policy_lp, ref_lp, n_pairs: int, beta: float):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) per pair.
    Sequences alternate chosen, rejected (a trailing filler sequence, if any, is ignored). Returns the
    per-pair losses [P] and the implicit reward margins [P] (> 0: the pair is ranked right)."""
    d = (policy_lp - ref_lp)[: 2 * n_pairs]
    margin = beta * (d[0::2] - d[1::2])                                                  # [P]
    return -F.logsigmoid(margin), margin


def _global_counts(mbs: list, mesh: nt.Mesh, objective: str) -> list:
    """[loss units, tokens, sum of squared sequence lengths] of the whole step, summed over dp: ONE tiny
    all-reduce. Loss units = label tokens (sft) or pairs (dpo): the loss is their mean over the step."""
    units = sum(mb["n_pairs"] if objective == "dpo" else int((mb["labels"] != IGNORE).sum()) for mb in mbs)
    ntok = sum(len(mb["input_ids"]) for mb in mbs)
    sq = sum(int(((mb["cu_seqlens"][1:] - mb["cu_seqlens"][:-1]).double() ** 2).sum()) for mb in mbs)
    t = torch.tensor([units, ntok, sq], dtype=torch.float64, device=mesh.device)
    return mesh.all_reduce_(t, "dp").tolist()                                           # .tolist() syncs


def dpo_backward(model, ref, mesh, opt, mbs, n_pairs_global: float, beta: float) -> list:
    """Forward + backward of the step's pair micro-batches (pp = 1); the grad sync runs on the last one.
    Returns [sum of pair losses, pairs ranked right] of this dp rank."""
    stats = torch.zeros(2, dtype=torch.float64, device=mesh.device)
    for k, mb in enumerate(mbs):
        mb = _to(mb, mesh.device)
        with torch.no_grad():
            ref_lp = sequence_logps(ref, mb)                                             # frozen: no graph
        with opt.no_sync() if k < len(mbs) - 1 else contextlib.nullcontext():
            losses, margin = dpo_losses(sequence_logps(model, mb), ref_lp, mb["n_pairs"], beta)
            (losses.sum() / n_pairs_global).backward()
        stats += torch.stack([losses.detach().sum().double(), (margin > 0).sum().double()])
    return stats.tolist()


def train_step(model, mesh, opt, mbs: list, cfg: Config, lr: float, ref=None) -> dict:
    """One optimizer step on this dp rank's micro-batches. The loss is the mean over the step's loss units
    (response tokens, or pairs) of ALL micro-batches on ALL dp ranks: each micro-batch's sum is scaled by
    1 / that global count and dp SUMS the gradients, so any split of the same rows gives the same update."""
    units, ntok, sq = _global_counts(mbs, mesh, cfg.objective)
    opt.zero_grad()
    acc = 0.0
    if cfg.objective == "dpo":
        loss_sum, acc = dpo_backward(model, ref, mesh, opt, mbs, max(units, 1.0), cfg.dpo_beta)
    else:
        loss_sum, _ = nt.pipeline_step(model, mesh, mbs, cfg.schedule, loss_scale=1.0 / max(units, 1.0),
                                       optimizer=opt)
    grad_norm = opt.clip_grad_norm_(cfg.grad_clip) if cfg.grad_clip > 0 else opt.dp.grad_norm()
    opt.step(lr=lr)
    # the logged loss: the same global mean the gradient came from (pipeline_step returns this pipeline's sum)
    t = mesh.all_reduce_(torch.tensor([loss_sum, acc], dtype=torch.float64, device=mesh.device), "dp")
    out = {"loss": t[0].item() / max(units, 1.0), "grad_norm": grad_norm.item(), "tokens": int(ntok),
           "loss_units": int(units), "seq_len_eff": sq / max(ntok, 1.0)}
    if cfg.objective == "dpo":
        out["reward_acc"] = t[1].item() / max(units, 1.0)
    return out


# ---- eval --------------------------------------------------------------------------------------------
# pipeline_step always runs a backward, so eval has its own forward-only pipeline: each stage receives
# the previous stage's activation (nanotron's varlen p2p with a shape header), runs its layers under
# no_grad and sends the result on; the last stage sums the loss, then broadcasts it to its pipeline.


@torch.no_grad()
def evaluate(model, mesh: nt.Mesh, mbs: list, cfg: Config, ref=None) -> float:
    """Mean loss per loss unit over the eval micro-batches of every dp rank (a collective)."""
    tot = torch.zeros(2, dtype=torch.float64, device=mesh.device)            # [loss sum, units]
    r, d, t = mesh.pp_rank, mesh.dp_rank, mesh.tp_rank
    prev = mesh.rank_of(d, r - 1, t) if r > 0 else None
    nxt = mesh.rank_of(d, r + 1, t) if r < mesh.pp - 1 else None
    if mesh.pp > 1:      # the stages must agree on the count (and NCCL wants a collective before group p2p)
        mm = nt.all_reduce_(torch.tensor([len(mbs), -len(mbs)], device=mesh.device), mesh.pp_group, "max")
        if mm.tolist() != [len(mbs), -len(mbs)]:
            raise RuntimeError(f"evaluate: pp rank {r} has {len(mbs)} eval micro-batches, other stages differ")
    dtype = next(model.parameters()).dtype
    if mesh.dp > 1:
        # ZeRO-3 all-gathers the parameters over dp in EVERY forward, so every dp rank must run as many
        # forwards, but the test rows dealt r, r + dp, .. can pack into a different number of micro-batches
        # per rank (a rank with fewer would leave the others waiting in an all-gather). Pad with fillers:
        # one sequence of `mult` tokens, no labels, no pairs: loss 0, units 0.
        n = int(nt.all_reduce_(torch.tensor([len(mbs)], device=mesh.device), mesh.dp_group, "max"))
        mult = mesh.tp if cfg.sequence_parallel else 1
        filler = collate([(torch.zeros(mult, dtype=torch.int64), torch.zeros(mult, dtype=torch.uint8))])
        filler["n_pairs"] = 0
        mbs = list(mbs) + [filler] * (n - len(mbs))
    for mb in mbs:
        label_rows = nt.label_rows(mb["labels"], mesh.device)    # found on the host copy: no GPU sync
        mb = _to(mb, mesh.device)
        if cfg.objective == "dpo":
            losses, _ = dpo_losses(sequence_logps(model, mb), sequence_logps(ref, mb), mb["n_pairs"], cfg.dpo_beta)
            tot += torch.stack([losses.sum().double(), torch.tensor(float(mb["n_pairs"]), device=mesh.device)])
            continue
        x = mb["input_ids"] if prev is None else nt.recv_activation(prev, model.cfg.hidden_size, dtype,
                                                                     mesh.device, mesh.pp_group)
        y = model(x, mb["positions"], mb["cu_seqlens"], mb["max_seqlen"])
        if nxt is not None:
            nt.send_activation(y, nxt, mesh.pp_group)
        else:
            s, n = model.loss(y, mb["labels"], rows=label_rows)
            tot += torch.stack([s.double(), n.double()])
    if mesh.pp > 1:
        dist.broadcast(tot, src=mesh.rank_of(d, mesh.pp - 1, t), group=mesh.pp_group)
    mesh.all_reduce_(tot, "dp")
    return (tot[0] / tot[1].clamp(min=1)).item()


# ---- logging -----------------------------------------------------------------------------------------


class Logger:
    """Rank 0's outputs: one console line per log_every steps, a tqdm bar (on a terminal), every step in
    <out>/metrics.jsonl (kept up to the resumed step on --resume), wandb when asked for and installed."""

    def __init__(self, cfg: Config, enabled: bool, start: int, total: int):
        self.enabled, self.cfg, self.path = enabled, cfg, Path(cfg.out) / "metrics.jsonl"
        self.bar = self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = self.path.read_text().splitlines() if self.path.is_file() and start > 0 else []
        self.path.write_text("".join(l + "\n" for l in old if json.loads(l)["step"] <= start))
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=start, desc=cfg.objective, unit="step", disable=None)
        if cfg.wandb:
            try:
                import wandb
                self.wandb = wandb.init(project="nanorlhf", config=asdict(cfg), name=f"{cfg.objective}-{cfg.out}")
            except ImportError:
                print("sft.py: --wandb given but the wandb package is not installed (pip install wandb); skipping")

    def log(self, row: dict, line: str | None = None):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if line:
            (self.bar.write if self.bar is not None and not self.bar.disable else print)(line)

    def advance(self):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_loss(runs: dict, png: Path, ylabel: str = "loss") -> bool:
    """Train (per step) and eval loss curves of one or more runs -> one PNG. runs: {label: metrics.jsonl}
    ("" for a single run). Needs matplotlib (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sft.py: no matplotlib, so no loss plot (pip install matplotlib); the numbers are in metrics.jsonl")
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, path) in enumerate(runs.items()):
        rows = [json.loads(l) for l in Path(path).read_text().splitlines()]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        color = f"C{i}"
        # later runs dashed and thinner, so curves that overlay exactly stay visible
        for pts, kind, style in ((train, "train", dict(ls="-" if i == 0 else "--", lw=2.0 if i == 0 else 1.2)),
                                 (ev, "eval (test split)", dict(ls="none", marker="o", ms=5 - min(i, 3)))):
            if pts:
                ax.plot(*zip(*pts), color=color, label=f"{label} {kind}".strip(), **style)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


# ---- driver ------------------------------------------------------------------------------------------


def build_model(cfg: Config, mesh: nt.Mesh, vocab_size: int, seq_len: float, dtype):
    """This rank's stage, with weights: a pretrained HF folder (smollm2 = converted once from the GGUF,
    by rank 0 while the others wait) or a random-init preset (nanotron.PRESETS: tiny, qwen3-0.6b)."""
    kw = dict(seq_len=int(seq_len), sequence_parallel=cfg.sequence_parallel, use_kernels=cfg.use_kernels,
              activation_checkpointing=cfg.activation_checkpointing, dtype=dtype)
    if cfg.model in nt.PRESETS:        # a known shape, random weights (tiny: the data's vocabulary)
        mcfg = nt.preset_config(cfg.model, **(dict(vocab_size=vocab_size, max_position_embeddings=8192)
                                              if cfg.model == "tiny" else {}))
        if vocab_size > mcfg.vocab_size:
            raise ValueError(f"sft.py: the data has {vocab_size} token ids, --model {cfg.model} only {mcfg.vocab_size}")
        return nt.build_stage(mcfg, mesh, **kw).init_random(cfg.seed), None
    if cfg.model == "smollm2":
        import prepare_data
        if mesh.rank == 0:
            prepare_data.default_model_path()
        mesh.barrier()
        path = prepare_data.default_model_path()
    else:
        path = nt.resolve_model_path(cfg.model)
    mcfg, _ = nt.load_hf_state(path)
    if vocab_size > mcfg.vocab_size:
        raise ValueError(f"sft.py: the data's tokenizer has {vocab_size} ids, the model {cfg.model} only "
                         f"{mcfg.vocab_size}: tokenize with the model's own tokenizer")
    return nt.build_stage(mcfg, mesh, **kw).load_hf(path), path


def print_derived(cfg, mesh, M, n_rows, n_long, mean_len, per_seq, total, warmup, mcfg, peak):
    seqs = cfg.tokens_per_step / mean_len
    fpt = nt.flops_per_token(mcfg, per_seq)
    lines = [
        f"world {mesh.world} = dp {mesh.dp} x tp {mesh.tp} x pp {mesh.pp}  (dp inferred from the world size)",
        f"micro-batches per step per dp rank M = tokens_per_step / (dp * micro_batch_tokens) = "
        f"{cfg.tokens_per_step} / ({mesh.dp} * {cfg.micro_batch_tokens}) = {M}",
        f"{'pairs' if cfg.objective == 'dpo' else 'sequences'} per step ~ {seqs:.0f} (mean train row "
        f"{mean_len:.0f} tokens; packs are filled first-fit, so a step holds <= tokens_per_step)",
        f"train rows {n_rows}, {n_long} longer than micro_batch_tokens (skipped, never truncated)",
        f"steps {total} (~{total * seqs / max(n_rows, 1):.2f} epochs), warmup {warmup}, "
        f"cosine to {cfg.lr * cfg.min_lr_ratio:.2e}",
        f"FLOPs/token, PaLM convention 6N + 12*L*H*D*T (N = matmul params, T = {per_seq:.0f}): {fpt / 1e9:.3f} G",
        f"peak for MFU: {'n/a (CPU or unknown GPU)' if peak is None else f'{peak:.0f} TFLOP/s per GPU (bf16 dense)'}",
    ]
    if cfg.pp > 1 and M < cfg.pp:
        lines.append(f"NOTE: M = {M} < pp = {cfg.pp}: the pipeline bubble is over half the step; raise tokens_per_step")
    print("derived:\n  " + "\n  ".join(lines))


def _every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    if cfg.bench:
        if nt.dist_env()[1] > 1:
            raise ValueError("sft.py: --bench starts its own torchrun jobs: run it as `python sft.py --bench ..`")
        return bench_layouts(cfg, argv)
    t_start = time.time()
    mesh = nt.Mesh.build(cfg.tp, cfg.pp)                     # joins torchrun's group; dp = world / (tp * pp)
    cfg = resolve(cfg, mesh.device.type == "cuda")
    main_rank = mesh.rank == 0
    dtype = getattr(torch, cfg.dtype)
    if main_rank:
        print("sft config:", json.dumps(asdict(cfg)))
    folder = ensure_data(cfg, mesh)
    train_ds, test_ds = open_split(folder, "train", cfg.objective), open_split(folder, "test", cfg.objective)
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
    vocab = manifest.get("vocab_size") or 1 + max(int(r["input_ids" if cfg.objective == "sft" else "chosen_ids"]
                                                     .max()) for r in train_ds)

    # -- derived quantities --
    share = mesh.dp * cfg.micro_batch_tokens
    if cfg.tokens_per_step % share:
        raise ValueError(f"sft.py: tokens_per_step {cfg.tokens_per_step} must be a multiple of dp * "
                         f"micro_batch_tokens = {mesh.dp} * {cfg.micro_batch_tokens} = {share}; e.g. "
                         f"--tokens_per_step {max(1, round(cfg.tokens_per_step / share)) * share}")
    M = cfg.tokens_per_step // share
    lengths = train_ds["num_tokens"].double()
    n_long = int((lengths > cfg.micro_batch_tokens).sum())
    if n_long == len(lengths):
        raise ValueError(f"sft.py: every train row of {folder} is longer than micro_batch_tokens "
                         f"{cfg.micro_batch_tokens} (shortest {int(lengths.min())}); raise --micro_batch_tokens")
    mean_len = float(lengths[lengths <= cfg.micro_batch_tokens].mean())
    per_seq = mean_len / 2 if cfg.objective == "dpo" else mean_len       # attention sees each sequence
    total = cfg.steps or (math.ceil(cfg.epochs * float(lengths.sum()) / cfg.tokens_per_step)
                          if mesh.device.type == "cuda" else CPU_DEMO_STEPS)
    warmup = min(cfg.warmup_steps, total // 10)
    model, path = build_model(cfg, mesh, vocab, per_seq, dtype)
    peak = nt.peak_tflops(mesh.device)
    if main_rank:
        print(f"model: {cfg.model} ({path or 'random init'}), {model.cfg.num_layers} layers, this stage "
              f"{model.layer_range}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params on rank 0, "
              f"{cfg.dtype}, kernels={model.use_kernels}")
        print_derived(cfg, mesh, M, len(lengths), n_long, mean_len, per_seq, total, warmup, model.cfg, peak)
    ref = None
    if cfg.objective == "dpo":                    # the frozen reference: the same weights, no optimizer
        ref, _ = build_model(cfg, mesh, vocab, per_seq, dtype)
        ref.requires_grad_(False)
    opt = nt.build_optimizer(model, mesh, cfg.zero_stage, cfg.lr, cfg.betas, cfg.weight_decay)
    mult = mesh.tp if cfg.sequence_parallel else 1
    batcher = Batcher(train_ds, cfg.objective, M, cfg.micro_batch_tokens, mesh.dp_rank, mesh.dp, cfg.seed, mult)
    eval_mbs = eval_batches(test_ds, cfg, mesh, cfg.micro_batch_tokens)

    # -- resume --
    start, src = 0, None
    if cfg.resume == "auto":
        src = nt.latest_checkpoint(cfg.out)
    elif cfg.resume != "never":
        src = Path(cfg.resume)
    if src is not None:
        man = nt.load_checkpoint(src, model, opt, mesh)
        start, states = int(man["step"]), man["extra"]["batcher"]
        if len(states) == mesh.dp:
            batcher.load_state_dict(states[mesh.dp_rank])
        else:   # another dp: the rows were dealt differently; restart the data at the next epoch boundary
            batcher.sampler.epoch = max(s["sampler"]["epoch"] for s in states) + 1
            batcher.it = iter(batcher.sampler)
        if main_rank:
            print(f"sft.py: resumed from {src} at step {start}" +
                  ("" if len(states) == mesh.dp else f" (dp {len(states)} -> {mesh.dp}: data restarts at an epoch)"))

    def save(step):
        states = [batcher.state_dict()]
        if mesh.dp > 1:
            states = [None] * mesh.dp
            dist.all_gather_object(states, batcher.state_dict(), group=mesh.dp_group)
        return nt.save_checkpoint(Path(cfg.out) / f"step_{step}", model, opt, mesh, step,
                       extra={"batcher": states, "objective": cfg.objective}, config=asdict(cfg))

    # -- train --
    log = Logger(cfg, main_rank, start, total)
    unit = "pair" if cfg.objective == "dpo" else "token"
    eval_loss = evaluate(model, mesh, eval_mbs, cfg, ref)
    first = last = None
    if start >= total and main_rank:
        print(f"sft.py: {cfg.out} already holds step {start} >= steps {total}: nothing to train (raise --steps, "
              "or start over with --resume never / another --out)")
    log.log({"step": start, "eval_loss": eval_loss}, f"step {start}/{total} | eval loss {eval_loss:.4f} per {unit}")
    tok_total, time_total, flop_total = 0, 0.0, 0.0
    for step in range(start, total):
        t0 = time.perf_counter()
        lr = nt.lr_at(step, warmup, total, cfg.lr, cfg.min_lr_ratio)
        m = train_step(model, mesh, opt, batcher.next_step(), cfg, lr, ref)
        dt = time.perf_counter() - t0
        if step >= start + min(UNTIMED_STEPS, total - start - 1):   # warm-up steps: not in the average
            tok_total, time_total = tok_total + m["tokens"], time_total + dt
            flop_total += nt.flops_per_token(model.cfg, m["seq_len_eff"]) * m["tokens"]
        tps = m["tokens"] / dt
        mfu = None if peak is None else nt.flops_per_token(model.cfg, m["seq_len_eff"]) * tps / (mesh.world * peak * 1e12)
        row = {"step": step + 1, **m, "lr": lr, "tokens_per_s": tps, "mfu": mfu, "epoch": batcher.epoch(),
               "skipped_rows": batcher.skipped, "seconds": dt}
        first, last = first if first is not None else m["loss"], m["loss"]
        line = (f"step {step + 1}/{total} | loss {m['loss']:.4f} | lr {lr:.2e} | gnorm {m['grad_norm']:.3f} | "
                f"{tps:,.0f} tok/s | mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | {dt:.2f}s" +
                (f" | acc {m['reward_acc']:.2f}" if "reward_acc" in m else ""))
        log.log(row, line if _every(cfg.log_every, step + 1) or step == start else None)
        log.advance()
        done = step + 1 == total
        if _every(cfg.eval_every, step + 1) or done:
            eval_loss = evaluate(model, mesh, eval_mbs, cfg, ref)
            log.log({"step": step + 1, "eval_loss": eval_loss}, f"step {step + 1}/{total} | eval loss "
                    f"{eval_loss:.4f} per {unit}")
        if _every(cfg.save_every, step + 1) or (done and cfg.save_every >= 0):
            saved = save(step + 1)
            if main_rank:
                log.log({"step": step + 1, "checkpoint": str(saved)})
    log.close()

    # -- summary --
    tps = tok_total / time_total if time_total else None
    mem = torch.tensor([torch.cuda.max_memory_allocated(mesh.device) if mesh.device.type == "cuda" else 0.0],
                       device=mesh.device)
    if mesh.world > 1:
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)                        # the fullest GPU decides what fits
    summary = {"steps": total, "first_loss": first, "last_loss": last, "eval_loss": eval_loss,
               "tokens_per_s": tps, "mfu": None if peak is None or not time_total else
               flop_total / time_total / (mesh.world * peak * 1e12),
               "peak_gb": round(mem.item() / 1e9, 2), "skipped_rows": batcher.skipped,
               "seconds": round(time.time() - t_start, 1), "world": mesh.world, "dp": mesh.dp, "tp": mesh.tp,
               "pp": mesh.pp, "checkpoint": str(Path(cfg.out) / f"step_{total}") if cfg.save_every >= 0 else None}
    if main_rank:
        if (Path(cfg.out) / "metrics.jsonl").is_file():
            plot_loss({"": Path(cfg.out) / "metrics.jsonl"}, Path(cfg.out) / "loss.png",
                      f"{cfg.objective} loss per {unit}")
        print(f"sft.py: {cfg.objective} {start} -> {total} steps, loss {first} -> {last}, eval {eval_loss:.4f}, "
              f"{summary['tokens_per_s'] or 0:,.0f} tok/s after warm-up, {summary['seconds']} s; out {cfg.out}")
        from prepare_data import append_result
        append_result(cfg.results, cfg.objective, asdict(cfg), summary)
        (Path(cfg.out) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    mesh.destroy()
    return summary


# ---- layout benchmark --------------------------------------------------------------------------------
# `python sft.py --bench 1,tp2,pp2,dp2 <the run's flags>` runs the SAME run (model, data, tokens per step,
# steps, seed) once per layout, each as its own torchrun job on W = tp * pp * dp processes, then prints one
# table (tokens/s, MFU, peak memory of the fullest GPU, losses, speed-up over the first layout) and draws
# every layout's loss curve in one PNG. The curves must overlay: a layout changes how the work is split, not
# what is computed (tp and pp see the same micro-batches; dp deals the same kind of rows to more ranks), and
# `max |dloss|` puts a number on it. No checkpoints are written (--save_every -1).

LAYOUT_PART = re.compile(r"(tp|pp|dp)(\d+)")
BENCH_TIMEOUT_S = 3 * 3600       # one layout's job; NCCL's own timeout (600 s) catches a stuck collective first


def parse_layout(name: str) -> dict:
    """"1" -> one process; "tp2", "pp2dp2", "tp2pp2dp2" -> {tp, pp, dp, world}."""
    d = {"tp": 1, "pp": 1, "dp": 1}
    parts = LAYOUT_PART.findall(name)
    if name != "1":
        if not parts or "".join(a + b for a, b in parts) != name or len({a for a, _ in parts}) < len(parts) \
                or any(int(b) < 1 for _, b in parts):
            raise ValueError(f"sft.py: --bench layout {name!r}: expected 1, or tpN / ppN / dpN joined, e.g. tp2pp2dp2")
        d.update({a: int(b) for a, b in parts})
    return d | {"world": d["tp"] * d["pp"] * d["dp"]}


def _drop_flags(argv: list, names: set) -> list:
    """argv without the flags in names (`--x v` and `--x=v` forms)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a[2:].split("=")[0] if a.startswith("--") else None
        if name in names:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def bench_layouts(cfg: Config, argv=None) -> list:
    import subprocess
    import sys
    G = torch.cuda.device_count() if torch.cuda.is_available() else 2        # CPU: 2 gloo processes
    spec = cfg.bench if cfg.bench != "auto" else ",".join(["1"] + [f"{k}{G}" for k in ("dp", "tp", "pp")] * (G > 1))
    layouts = [x.strip() for x in spec.split(",") if x.strip()]
    specs = {name: parse_layout(name) for name in layouts}
    base = _drop_flags(list(sys.argv[1:] if argv is None else argv),
                       {"bench", "tp", "pp", "out", "resume", "results", "save_every"})
    root = Path(cfg.out)
    rows = []
    for name, d in specs.items():
        out = root / name
        shutil.rmtree(out, ignore_errors=True)                        # a fresh run, never a resumed one
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={d['world']}",
               os.path.abspath(__file__), *base, "--tp", str(d["tp"]), "--pp", str(d["pp"]), "--out", str(out),
               "--resume", "never", "--save_every", "-1", "--results", str(root / "results.jsonl")]
        print(f"\n=== layout {name}: {' '.join(cmd[2:])}", flush=True)
        try:
            rc = subprocess.run(cmd, timeout=BENCH_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0 or not (out / "summary.json").is_file():
            rows.append({"layout": name, **d, "error": f"exit {rc}"})
            continue
        steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        losses = {r["step"]: r["loss"] for r in steps}
        rows.append({"layout": name, **d, **json.loads((out / "summary.json").read_text()), "losses": losses,
                     "step_seconds": {r["step"]: r["seconds"] for r in steps}})     # to re-derive any average
    ok = [r for r in rows if "error" not in r]
    first = ok[0] if ok else None
    lines = ["| layout | GPUs | tokens/s | per GPU | MFU | peak GB | last loss | eval loss | speed-up | max |dloss| |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['world']} | {r['error']} | | | | | | | |")
            continue
        tps = r["tokens_per_s"] or 0.0
        common = sorted(set(r["losses"]) & set(first["losses"]))
        dmax = max((abs(r["losses"][k] - first["losses"][k]) for k in common), default=float("nan"))
        r["speedup"], r["max_dloss"] = tps / (first["tokens_per_s"] or float("nan")), dmax
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['layout']} | {r['world']} | {tps:,.0f} | {tps / r['world']:,.0f} | {mfu} | {r['peak_gb']} "
                     f"| {r['last_loss']:.4f} | {r['eval_loss']:.4f} | {r['speedup']:.2f}x | {dmax:.4f} |")
    table = "\n".join(lines)
    against = first["layout"] if first else "-"
    print(f"\nsft.py --bench ({cfg.model}, {cfg.data}; speed-up and |dloss| against {against}):"
          f"\n{table}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "bench.md").write_text(table + "\n")
    (root / "bench.json").write_text(json.dumps(rows, indent=1) + "\n")
    if ok:
        plot_loss({r["layout"]: root / r["layout"] / "metrics.jsonl" for r in ok}, root / "loss_layouts.png",
                  f"{cfg.objective} loss")
    return rows


# ---- CLI ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> Config:
    from prepare_data import config_from_argv  # the sibling that owns the dataclass -> argparse helper
    return config_from_argv(Config, argv, __doc__.split("\n\n")[0].strip(), positional=())


if __name__ == "__main__":
    main()
