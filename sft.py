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
    python sft.py                                      # CPU, seconds: a tiny random model, a toy task, 4 steps
    python sft.py --model smollm2                      # CPU: SmolLM2-135M on the synthetic math task, ~2 min
    python sft.py --model smollm2 --objective dpo      # DPO on synthetic preference pairs
    torchrun --nproc_per_node 8 sft.py --model qwen3-0.6b --tp 2 --pp 2   # 8 GPUs: dp = 8 / (2 * 2) = 2
    torchrun --nproc_per_node 2 sft.py --model tiny --data toy --tp 2   # CPU, gloo
    python sft.py --bench 1,tp2,pp2,dp2 --model qwen3-0.6b --data data/gsm8k_sft --lr 3e-4 --out runs/layouts
                                                       # 2 GPUs: each layout once -> table + loss_layouts.png
    python sft.py --bench auto --model tiny --data toy --steps 2   # CPU: the same 4 layouts on gloo, seconds
    python sft.py --model smollm2 --steps 8 --profile 3   # host vs GPU time, launches, syncs per step; trace.json
    python sft.py --fixed_shape                        # every micro-batch padded to one shape: the same losses
    python sft.py --model smollm2 --data data/gsm8k_sft --no-cuda_graphs   # 1 GPU, eager (default: graph replays)
    pytest -q test_all.py -k sft
Outputs (--out, default ckpt/<objective>-<model>): step_N/ (checkpoints, the newest --keep_last kept),
metrics.jsonl, loss.png, summary.json; one line in results.jsonl. Everything that can be checked runs before
a model is built: flags against the world size and the model's heads, the data (one vectorised pass), the
model against a checkpoint in --out, and --out itself (a new run never mixes with an old run's steps).

Contents: config | data (toy task, preference pairs, packing) | losses and steps | CUDA graphs | eval |
          FLOPs and MFU | logging | checks and checkpoints | profile | driver | layout benchmark | CLI
First read: config -> data (Batcher, collate) -> losses and steps (train_step) -> driver (main and its four
phases). Independent chapters: DPO, CUDA graphs, the forward-only eval pipeline, the checks, the layout benchmark.
"""
import contextlib
import dataclasses
import json
import math
import os
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

import nanosets
import nanotron as nt

IGNORE = nt.IGNORE_INDEX

# ---- config ------------------------------------------------------------------------------------------


@dataclass
class Config:
    model: str = "tiny"  # tiny, qwen3-0.6b = random init of that shape; smollm2 = the offline SmolLM2-135M-Instruct; or an HF folder / hub id
    data: str = ""  # folder with train.nano + test.nano; "" = toy for --model tiny (no tokenizer), else data/synthetic_sft (dpo: synthetic_dpo), built if missing
    out: str = ""  # checkpoints step_N/, metrics.jsonl and loss.png go here; "" = ckpt/<objective>-<model> (--bench: runs/layouts)
    results: str = "results.jsonl"  # the artifact root's log: one JSON line per pipeline stage
    objective: str = "sft"  # sft (next-token loss on the response) | dpo (preference pairs vs a frozen reference)
    tp: int = 1  # tensor-parallel ranks (within a node: two all-reduces per layer)
    pp: int = 1  # pipeline stages; dp = world / (tp * pp) is inferred
    zero_stage: int = 1  # 1 shards the fp32 Adam state over dp for free; 2/3 shard grads/params too
    schedule: str = "1f1b"  # pipeline schedule: 1f1b (memory of pp micro-batches) | afab (the naive reference)
    tokens_per_step: int = 0  # global packed tokens per optimizer step; 0 = 16384 on CUDA, 2048 on CPU
    micro_batch_tokens: int = 0  # packing budget of one micro-batch (the memory knob); 0 = from memory (CUDA), 1024 CPU
    steps: int = 0  # optimizer steps; 0 = `epochs` passes over train on CUDA, 4 on CPU or --data toy (a demo)
    epochs: float = 1.0  # passes over the train split when steps is derived (CUDA)
    lr: float = 0.0  # peak LR; 0 = 2e-5 (pretrained weights want a small one; DPO: ~5e-7 at scale), 3e-3 for tiny
    min_lr_ratio: float = 0.1  # cosine decays to lr * this, not to 0 (the last steps still learn)
    warmup_steps: int = 20  # linear warmup from ~0; clamped to 10% of the run so short runs still train
    weight_decay: float = 0.0  # a few epochs of fine-tuning need little regularisation
    betas: tuple = (0.9, 0.95)  # AdamW betas; 0.95 reacts faster than 0.999 to the loss landscape shifting
    grad_clip: float = 1.0  # clip the global grad norm (Pascanu et al. 2013); 0 = measure only
    eval_every: int = 100  # steps between evals on the test split (also before the first and after the last)
    eval_tokens: int = 0  # test tokens per eval; 0 = 65536 on CUDA, 1024 on CPU
    save_every: int = 500  # steps between checkpoints (the last step is always saved; 0 = only the last; -1 = none)
    keep_last: int = 2  # after each save keep the newest N complete checkpoints in --out (0 = all); SmolLM2's: 2 GB
    resume: str = "auto"  # auto = latest <out>/step_N if any | never | a checkpoint folder
    overwrite: bool = False  # delete --out's step_N folders after the resumed step (never: all) instead of refusing
    seed: int = 0  # data order (and the random init of the presets, --model tiny / qwen3-0.6b)
    dtype: str = "auto"  # bfloat16 | float32; auto = bfloat16 on CUDA, float32 on CPU
    activation_checkpointing: bool = False  # recompute layers in backward: less memory, ~1/3 more compute
    sequence_parallel: bool = False  # shard norms/activations over tp between the parallel layers
    use_kernels: bool = True  # kernels.py's Triton kernels where importable (CUDA), torch otherwise
    dpo_beta: float = 0.1  # DPO's KL strength: larger = stay closer to the reference
    log_every: int = 1  # steps between console lines (metrics.jsonl gets every step)
    wandb: bool = False  # also log to Weights & Biases (when the package is installed)
    fixed_shape: bool = False  # pad every train micro-batch to micro_batch_tokens and a fixed sequence count (collate)
    cuda_graphs: bool | None = None  # replay 1 captured fwd + bwd per micro-batch; None: on for 1 CUDA process, sft
    prefetch: bool = True  # build step k+1's micro-batches in a thread while step k runs (False: in the loop)
    profile: int = 0  # profile this many steps after the warm-up (torch.profiler): host vs GPU time, launches, syncs
    bench: str = ""  # layouts, e.g. 1,tp2,pp2,dp2, or auto (1,dpG,tpG,ppG on G GPUs): a torchrun job each -> table, PNG


# Defaults that depend on the device: (CUDA, CPU). The CPU column makes `python sft.py` a < 2 minute demo.
# CUDA micro_batch_tokens 0: derived from memory once the model's shape is known (auto_micro_batch_tokens).
AUTO = {"tokens_per_step": (16384, 2048), "micro_batch_tokens": (0, 1024), "eval_tokens": (65536, 1024),
        "dtype": ("bfloat16", "float32")}
CPU_DEMO_STEPS = 4
# The first steps of a run compile and autotune the Triton kernels and grow the allocator (on 2 H200s: 4-8 s,
# then 0.3-0.6 s): the summary's tokens/s and MFU average the steps after them (every step is in metrics.jsonl).
UNTIMED_STEPS = 3
# Small models are host-bound: a micro-batch costs ~1,200 kernel launches and their Python whatever its size
# (135M model, H200: 32 micro-batches of 2048 tokens = 39k launches, 0.28 s of GPU work in a 3.3 s step). So
# CUDA packs as many tokens per micro-batch as memory allows: the largest power of two that splits
# tokens_per_step / dp evenly, with estimated activations <= ACT_SHARE of the GPU, >= 2048 (prepare_data's
# max_total_tokens: longer rows are skipped), and pipelined, M >= 4 pp (1F1B's bubble stays below 1/5).
ACT_SHARE = 0.4


def auto_micro_batch_tokens(tokens_per_step: int, dp: int, tp: int, pp: int, mcfg, dtype_bytes: int,
                            gpu_bytes: float) -> tuple[int, float]:
    """(micro_batch_tokens, estimated activation bytes per token). A layer keeps ~12 vectors of the residual
    width per token for backward (norm inputs and outputs, q, k, v, attention output, residuals) and ~4 of the
    MLP width (split by tp); times the stage's layers and the pp micro-batches 1F1B holds on its first stage.
    The model's state comes off the GPU first: ~18 bytes a parameter (weights, fp32 grads, master and Adam)."""
    layer = (12 * mcfg.hidden_size + 4 * mcfg.intermediate_size // tp) * dtype_bytes
    per_token = -(-mcfg.num_layers // pp) * layer * pp
    state = 18 * nt.flops_per_token(mcfg, 0) / 6 / (tp * pp)          # flops_per_token / 6 = the parameters
    room = min(ACT_SHARE * gpu_bytes, 0.9 * gpu_bytes - state)
    share = tokens_per_step // dp
    cap = share // (4 * pp) if pp > 1 else share
    m = min(2048, share)
    while 2 * m <= cap and share % (2 * m) == 0 and 2 * m * per_token <= room:
        m *= 2
    return m, per_token


def resolve(cfg: Config, cuda: bool, world: int = 1) -> Config:
    """Validate the flags (before any process group or model exists), fill the derived defaults: printed as run."""
    if cfg.objective not in ("sft", "dpo"):
        raise ValueError(f"sft.py: --objective {cfg.objective!r}: expected sft or dpo")
    if cfg.objective == "dpo" and cfg.pp > 1:
        raise ValueError("sft.py: --objective dpo supports --pp 1 only for now (use --tp and dp); the policy "
                         "and reference log-probs would need a forward-only pipeline per pair")
    if cfg.schedule not in nt.SCHEDULES:
        raise ValueError(f"sft.py: --schedule {cfg.schedule!r}: expected one of {sorted(nt.SCHEDULES)}")
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"sft.py: --dtype {cfg.dtype!r}: expected auto, bfloat16 or float32")
    for flag, low in (("tp", 1), ("pp", 1), ("keep_last", 0), ("tokens_per_step", 0), ("micro_batch_tokens", 0),
                      ("steps", 0), ("eval_tokens", 0), ("profile", 0)):
        if getattr(cfg, flag) < low:
            raise ValueError(f"sft.py: --{flag} {getattr(cfg, flag)}: expected >= {low}")
    if world % (cfg.tp * cfg.pp):
        raise ValueError(f"sft.py: --tp {cfg.tp} x --pp {cfg.pp} = {cfg.tp * cfg.pp} does not divide the world size "
                         f"{world} (torchrun --nproc_per_node); dp = world / (tp * pp) must be a whole number")
    needs = ((not cuda, "a CUDA GPU"), (cfg.tp * cfg.pp > 1, "--tp 1 --pp 1 (no collectives in the graph)"),
             (cfg.objective != "sft", "--objective sft"),
             (cfg.zero_stage > 1, "--zero_stage 0 or 1 (2/3 free the gradients between micro-batches)"),
             (cfg.activation_checkpointing, "no --activation_checkpointing (not tested under capture)"),
             (not cfg.use_kernels, "--use_kernels (torch's attention reference syncs on cu_seqlens)"))
    for bad, need in needs:
        if cfg.cuda_graphs and bad:
            raise ValueError(f"sft.py: --cuda_graphs needs {need}")
    if cfg.cuda_graphs is None:        # the default: one process (dp > 1 runs eagerly unless asked) that can capture
        cfg = dataclasses.replace(cfg, cuda_graphs=world == 1 and not any(bad for bad, _ in needs)
                                  and nt._kernels() is not None)
    auto = {k: v[0 if cuda else 1] for k, v in AUTO.items() if getattr(cfg, k) in (0, "auto")}
    data = cfg.data or ("toy" if cfg.model == "tiny" else f"data/synthetic_{cfg.objective}")
    name = cfg.model if cfg.model in nt.PRESETS or cfg.model == "smollm2" else Path(cfg.model.rstrip("/")).name
    out = cfg.out or f"ckpt/{cfg.objective}-{name}"
    lr = cfg.lr or (3e-3 if cfg.model == "tiny" else 2e-5)         # a random init learns at a much larger one
    return dataclasses.replace(cfg, data=data, out=out, lr=lr, betas=tuple(cfg.betas),
                               fixed_shape=cfg.fixed_shape or cfg.cuda_graphs, **auto)


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
    ds, need = nanosets.load_dataset(str(folder / f"{split}.nano")), DPO_SCHEMA if objective == "dpo" else SFT_SCHEMA
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise ValueError(f"sft.py: {folder / (split + '.nano')} lacks columns {missing} for --objective "
                         f"{objective}; expected {sorted(need)} (sft: prepare_data.py --recipe sft)")
    return ds.with_format("torch", columns=list(need))    # rows read only what training needs (not the text)


def open_data(cfg: Config, mesh: nt.Mesh) -> tuple:
    """(train, test, vocab size, a line for the derived block, the data's id, the train rows' largest labelled share):
    each split checked in one vectorised pass before any model exists (prepare_data.check_token_split); vocab = the
    manifest's (its tokenizer's), else 1 + the largest id."""
    from prepare_data import check_token_split
    folder, t0 = ensure_data(cfg, mesh), time.perf_counter()
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
    vocab = manifest.get("vocab_size")
    seqs = ({"chosen_ids": "chosen_mask", "rejected_ids": "rejected_mask"} if cfg.objective == "dpo"
            else {"input_ids": "loss_mask"})
    splits, stats = [], []
    for split in ("train", "test"):
        splits.append(open_split(folder, split, cfg.objective))
        stats.append(check_token_split(splits[-1], folder / f"{split}.nano", vocab, seqs))
        if not stats[-1]["rows"]:         # nothing to train on, or an eval loss of 0 / 0 printed as 0.0000
            raise ValueError(f"sft.py: {folder / split}.nano has no rows; expected tokenized {cfg.objective} rows")
    vocab = vocab or 1 + max(st["max_id"] for st in stats)
    line = (f"data check: {stats[0]['rows']} + {stats[1]['rows']} rows, {sum(st['tokens'] for st in stats):,} "
            f"tokens: ids < {vocab}, masks 0/1, num_tokens = row lengths ({time.perf_counter() - t0:.2f} s)")
    return (splits[0], splits[1], vocab, line, {"rows": stats[0]["rows"], "tokens": stats[0]["tokens"]},
            stats[0]["max_mask_share"])


def check_resume_data(cfg: Config, src, data_id: dict):
    """A checkpoint holds a position in its run's data order: resuming it on other data would go on silently with
    rows the sampler never ordered. The identity compared is cheap, the train split's row and token counts (saved
    in the checkpoint's extra; older checkpoints have none): another --data of the same row count is caught."""
    saved = nt.read_manifest(src).get("extra", {}).get("data") if src is not None else None
    if saved is not None and saved != data_id:
        raise ValueError(f"sft.py: {src} was trained on a train split of {saved['rows']} rows / {saved['tokens']:,} "
                         f"tokens; --data {cfg.data} has {data_id['rows']} rows / {data_id['tokens']:,} tokens: a "
                         "resume continues that run's place in its data. Resume with its --data, or start a new run "
                         "from its weights (merge.py it into --model)")


def row_sequences(row: dict, objective: str) -> list:
    """One dataset row -> its [(ids, loss_mask)] sequences: one for SFT, (chosen, rejected) for DPO."""
    if objective == "dpo":
        return [(row["chosen_ids"], row["chosen_mask"]), (row["rejected_ids"], row["rejected_mask"])]
    return [(row["input_ids"], row["loss_mask"])]


class FixedShape(NamedTuple):
    """The shape of every micro-batch under --fixed_shape (fixed_shape() derives it from the train rows)."""
    tokens: int      # N: input_ids, positions, labels are [tokens] (the packing budget)
    seqs: int        # B: cu_seqlens is [seqs + 1]
    max_seqlen: int  # no sequence is longer (the attention kernels size their grids by it)
    head_rows: int = 0   # the LM head's rows under --cuda_graphs: >= any pack's labelled tokens (0: all tokens)


def fixed_shape(lengths: list, budget: int, objective: str, mask_share: float = 1.0) -> FixedShape:
    """The smallest fixed shape every pack of these rows fits. max_seqlen = the longest row that fits the budget
    (the filler is cut into pieces no longer; the budget itself would launch budget / tile query tiles per
    sequence and head, nearly all of which exit at once). seqs = the most slots a pack can need: k rows hold at
    least S_k tokens (the k shortest rows), and the filler of the rest takes ceil((budget - S_k) / max_seqlen)
    pieces, so seqs = max over k of (k, or 2k for DPO pairs) + that. Empty slots cost a program that exits.
    head_rows: a pack's labelled share is at most its rows' largest (mask_share, check_token_split's), so it holds at
    most budget * mask_share labelled tokens: the LM head, the largest matmul, runs on that many rows (a graph cannot
    take each pack's own count), not on all of them (GSM8K: 74% of the rows, where a pack's labelled mean is 46%)."""
    short = sorted(x for x in lengths if x <= budget)
    cap, per, S = short[-1], 2 if objective == "dpo" else 1, 0
    seqs = -(-budget // cap)                                              # k = 0: filler only
    for k, x in enumerate(short, 1):
        if (S := S + x) > budget:
            break
        seqs = max(seqs, per * k + -(-(budget - S) // cap))
    return FixedShape(budget, seqs, cap, min(budget, -(-math.ceil(budget * mask_share) // 8) * 8))


def collate(seqs: list, multiple_of: int = 1, shape: FixedShape | None = None) -> dict:
    """[(ids, loss_mask)] -> one packed micro-batch for pipeline_step: input_ids [N], positions [N],
    cu_seqlens [B+1], labels [N] (the next token where IT is a response token, else -100), max_seqlen, and the
    host counts of the REAL sequences: tokens, sq (sum of squared lengths, for the FLOPs of attention).
    multiple_of: sequence parallelism needs N % tp == 0; a filler sequence with no labels pads N.
    shape (--fixed_shape): pad to exactly shape.tokens with filler sequences (no labels, <= shape.max_seqlen tokens
    each), then cu_seqlens to shape.seqs + 1 offsets by repeating the last one: EMPTY sequences at the end, which
    the attention kernels skip. Every micro-batch then has the same shapes and kernel grids (one CUDA graph can
    replay them all) and the same loss: filler rows have no labels, so they add 0 to the loss and its gradients.
    It also gets head_rows [shape.head_rows or N]: the labelled positions, then unlabelled ones repeated (they add
    0 too), the rows the LM head runs on in a CUDA graph."""
    seqs = list(seqs)
    lens = [len(s) for s, _ in seqs]
    pad = -sum(lens) % multiple_of if shape is None else shape.tokens - sum(lens)
    cap = pad if shape is None else shape.max_seqlen
    if shape is not None and (pad < 0 or max(lens, default=0) > cap or len(lens) - (-pad // cap) > shape.seqs):
        raise ValueError(f"sft.py: collate: {len(lens)} sequences of {sum(lens)} tokens (longest {max(lens)}) and "
                         f"their filler do not fit the fixed shape {shape} (--fixed_shape)")
    while pad > 0:
        k = min(pad, cap)
        seqs.append((torch.zeros(k, dtype=torch.int64), torch.zeros(k, dtype=torch.uint8)))
        pad -= k
    ids, masks = [s for s, _ in seqs], [m for _, m in seqs]
    # one pack holding everything in order (the budget is the total): nanosets builds the shifted labels
    mb = nanosets.pack_sequences(ids, sum(len(s) for s in ids), masks)[0]
    cu = mb["cu_seqlens"] if shape is None else torch.cat([mb["cu_seqlens"], mb["cu_seqlens"][-1:].expand(
        shape.seqs - len(ids))])                                           # [B+1] -> [seqs+1]: empty at the end
    out = {"input_ids": mb["input_ids"], "positions": mb["positions"], "cu_seqlens": cu, "labels": mb["labels"],
           "max_seqlen": cap if shape is not None else max(len(s) for s in ids), "tokens": sum(lens),
           "sq": sum(L * L for L in lens)}
    if shape is not None:
        lab, C = mb["labels"] != IGNORE, shape.head_rows or shape.tokens
        rows, unlabelled = lab.nonzero().squeeze(1), (~lab).nonzero().squeeze(1)
        if len(rows) > C:
            raise ValueError(f"sft.py: collate: {len(rows)} labelled tokens, more than the fixed shape's head_rows "
                             f"{C} ({shape}); fixed_shape's mask_share must bound every row's")
        out["head_rows"] = torch.cat([rows, unlabelled[:1].expand(C - len(rows))])   # [C]
    return out


class Batcher:
    """This dp rank's micro-batches, step after step: rows from a ShardedSampler (same seed on every rank,
    so the pp and tp ranks of one dp rank draw the same rows) first-fit into M packs of <= budget tokens.
    A row that fits no pack ends the step and opens the next one. Rows longer than the budget are SKIPPED
    and counted (never truncated: a cut response teaches the model to stop mid-answer)."""

    def __init__(self, ds, objective: str, M: int, budget: int, dp_rank: int, dp: int, seed: int,
                 multiple_of: int = 1, shape: FixedShape | None = None):
        self.ds, self.objective, self.M, self.budget, self.multiple_of = ds, objective, M, budget, multiple_of
        self.shape, self.lengths = shape, ds["num_tokens"].tolist()
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
        flat = [i for p in packs for i in p]
        cols = self.ds[torch.tensor(flat, dtype=torch.int64)]      # ONE gather: {column: [len(flat) rows]}
        rows = iter([{c: v[j] for c, v in cols.items()} for j in range(len(flat))])
        return [collate([s for _ in p for s in row_sequences(next(rows), self.objective)], self.multiple_of,
                        self.shape) | {"n_pairs": len(p)} for p in packs]

    def epoch(self) -> float:
        return self.sampler.epoch + self.sampler.position / max(1, len(self.sampler))

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "pending": self.pending, "skipped": self.skipped}

    def load_state_dict(self, s: dict):
        self.sampler.load_state_dict(s["sampler"])
        self.it, self.pending, self.skipped = iter(self.sampler), s["pending"], s["skipped"]


class Prefetcher:
    """The Batcher one step ahead, in a background thread (--prefetch, on by default). In the loop, the host
    builds step k+1's packs after step k's last sync, while the GPU idles (135M model, 65,536 GSM8K tokens a
    step: 20-90 ms of a ~260 ms step). Here they are built while step k computes (the main thread then waits
    in a CUDA sync, which releases the GIL) and pinned, so their copies to the GPU do not block the host.
    One thread calls the same Batcher in the same order, so the micro-batches are identical with and without
    it (tested); state_dict(), epoch() and skipped describe the steps HANDED OUT, never the one being built,
    so a checkpoint resumes exactly. An error in the thread is raised by the next next_step()."""

    def __init__(self, batcher: Batcher, pin: bool = False):
        self.batcher, self.pin, self.stop = batcher, pin, threading.Event()
        self.state, self._epoch, self.skipped = batcher.state_dict(), batcher.epoch(), batcher.skipped
        self.q = queue.Queue(maxsize=1)                                     # one step ahead, no more
        self.thread = threading.Thread(target=self._work, name="sft-prefetch", daemon=True)
        self.thread.start()

    def _work(self):
        b = self.batcher
        try:
            while not self.stop.is_set():
                mbs = b.next_step()
                if self.pin:                      # page-locked host memory: .to(cuda, non_blocking) is async
                    mbs = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in mb.items()} for mb in mbs]
                self.q.put((mbs, b.state_dict(), b.epoch(), b.skipped))
        except BaseException as e:                # noqa: BLE001 -- handed to the main thread, raised there
            self.q.put(e)

    def next_step(self) -> list:
        while True:                               # (a plain get() would wait forever on a dead thread)
            try:
                item = self.q.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("sft.py: the prefetch thread stopped without a batch") from None
        if isinstance(item, BaseException):
            raise item
        mbs, self.state, self._epoch, self.skipped = item
        return mbs

    def state_dict(self) -> dict:
        return self.state

    def epoch(self) -> float:
        return self._epoch

    def close(self):
        self.stop.set()
        while self.thread.is_alive():             # empty the slot so a put() waiting on it returns
            with contextlib.suppress(queue.Empty):
                self.q.get(timeout=0.01)


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
    ntok, sq = sum(mb["tokens"] for mb in mbs), sum(mb["sq"] for mb in mbs)     # real sequences: no filler
    if mesh.dp == 1:                      # host numbers (the micro-batches are still on the CPU): no GPU sync
        return [units, ntok, sq]
    t = torch.tensor([units, ntok, sq], dtype=torch.float64, device=mesh.device)
    return mesh.all_reduce_(t, "dp").tolist()                                           # .tolist() syncs


def dpo_backward(model, ref, mesh, opt, mbs, n_pairs_global: float, beta: float) -> torch.Tensor:
    """Forward + backward of the step's pair micro-batches (pp = 1); the grad sync runs on the last one.
    Returns [sum of pair losses, pairs ranked right] of this dp rank (float64 on the device: no sync)."""
    stats = torch.zeros(2, dtype=torch.float64, device=mesh.device)
    for k, mb in enumerate(mbs):
        mb = _to(mb, mesh.device)
        with torch.no_grad():
            ref_lp = sequence_logps(ref, mb)                                             # frozen: no graph
        with opt.no_sync() if k < len(mbs) - 1 else contextlib.nullcontext():
            losses, margin = dpo_losses(sequence_logps(model, mb), ref_lp, mb["n_pairs"], beta)
            (losses.sum() / n_pairs_global).backward()
        stats += torch.stack([losses.detach().sum().double(), (margin > 0).sum().double()])
    return stats


def train_step(model, mesh, opt, mbs: list, cfg: Config, lr: float, ref=None, graphs=None) -> dict:
    """One optimizer step on this dp rank's micro-batches, run to the end: read_step(queue_step(..)). The loss is the
    mean over the step's loss units (response tokens, or pairs) of ALL micro-batches on ALL dp ranks: each
    micro-batch's sum is scaled by 1 / that global count and dp SUMS the gradients, so any split of the same rows
    gives the same update. graphs: a GraphStep (--cuda_graphs) runs the micro-batches instead of pipeline_step."""
    return read_step(queue_step(model, mesh, opt, mbs, cfg, lr, ref, graphs))


# Why the training loop reads a step's numbers one step LATE. A GPU runs what the host queued, in order; the host
# waits only when it reads a GPU value (.item(), .tolist(), float(t)): a host sync. Read the loss at the end of
# step k and the GPU runs dry: it finishes step k, then idles while the host prints, fetches the next batch and
# issues step k+1's first kernels (135M model, one H200: the GPU was busy 75% of each step). So queue_step issues
# a whole step (forward, backward, clip, optimizer) and its numbers' copy to the host, and records a CUDA event
# after them; the loop queues step k+1, THEN reads step k (read_step): it waits for that event, i.e. for step k
# only, while step k+1 is already queued behind it. (A .tolist() of the device tensor at that point would queue
# its copy BEHIND step k+1 and wait for both: the GPU would run dry again, one step later.)
#
#   host:  [queue k][read k-1][queue k+1][read k ...wait...][queue k+2][read k+1 ...
#   GPU:        [ step k ..................... ][ step k+1 ..................... ][ ...
#
# The numbers are the same, only printed one step later; before an eval, a checkpoint or the end the loop reads
# the pending step first, so those see a finished step. At dp > 1 _global_counts still syncs (a tiny all-reduce of
# host counts that queues behind the GPU's work), so the overlap is a one-GPU gain.


def queue_step(model, mesh, opt, mbs: list, cfg: Config, lr: float, ref=None, graphs=None) -> dict:
    """Queue one optimizer step and return without waiting for the GPU (at dp = 1): the host counts, and the step's
    [loss sum, pairs ranked right, grad norm] (float64; on CUDA a pinned host copy still being written, with the
    event that marks its end) for read_step."""
    units, ntok, sq = _global_counts(mbs, mesh, cfg.objective)
    opt.zero_grad()
    if cfg.objective == "dpo":
        stats = dpo_backward(model, ref, mesh, opt, mbs, max(units, 1.0), cfg.dpo_beta)          # [2]
    else:
        if graphs is not None:
            loss_sum = graphs.step(mbs, 1.0 / max(units, 1.0))
        else:
            loss_sum, _ = nt.pipeline_step(model, mesh, mbs, cfg.schedule, loss_scale=1.0 / max(units, 1.0),
                                           optimizer=opt, sync=False)
        stats = torch.stack([loss_sum.double(), torch.zeros_like(loss_sum, dtype=torch.float64)])
    grad_norm = opt.clip_grad_norm_(cfg.grad_clip) if cfg.grad_clip > 0 else opt.dp.grad_norm()
    opt.step(lr=lr)
    # the logged loss: the same global mean the gradient came from (each pipeline's sum, summed over dp)
    if mesh.dp > 1:
        stats = mesh.all_reduce_(stats, "dp")
    stats, done = torch.cat([stats, grad_norm.double().reshape(1)]), None                   # [3]
    if stats.is_cuda:       # the copy out is queued NOW, behind this step; read_step waits for the event after it
        stats = torch.empty(3, dtype=torch.float64, pin_memory=True).copy_(stats, non_blocking=True)
        done = torch.cuda.Event(enable_timing=True)
        done.record()
    return {"stats": stats, "done": done, "units": units, "tokens": ntok, "sq": sq, "dpo": cfg.objective == "dpo"}


def read_step(q: dict) -> dict:
    """queue_step's step -> its numbers (one host sync: waits until the GPU has finished that step)."""
    if q["done"] is not None:
        q["done"].synchronize()
    loss_sum, acc, grad_norm = q["stats"].tolist()
    units = max(q["units"], 1.0)
    out = {"loss": loss_sum / units, "grad_norm": grad_norm, "tokens": int(q["tokens"]),
           "loss_units": int(q["units"]), "seq_len_eff": q["sq"] / max(q["tokens"], 1.0)}
    if q["dpo"]:
        out["reward_acc"] = acc / units
    return out


# ---- CUDA graphs (--cuda_graphs) ---------------------------------------------------------------------
# A small model is host-bound: a micro-batch of the 135M model is ~1,400 kernel launches, and the Python that issues
# them takes longer than the GPU takes to run them. A CUDA graph records the launches of one forward + loss + backward
# ONCE (stream capture: the kernels are recorded, not run) and replays them all with one launch; per micro-batch the
# host then only copies the tokens in. What capture requires, and how this file meets it:
#   STATIC ADDRESSES. A replay reads and writes exactly the memory the capture saw. The inputs are copied into fixed
#     buffers (input_ids, positions, cu_seqlens, labels, and the loss scale as a 0-dim DEVICE tensor: a Python float
#     would be baked into the graph as a constant). The parameters live in the optimizer's flat buckets, updated in
#     place. The gradients accumulate into the buckets' fp32 main_grad through the dp grad hooks, whose add_ the
#     graph recorded; zero_grad zeroes them IN PLACE (ZeRO 2/3 free and re-allocate them between micro-batches:
#     refused, as would be any zero_grad(set_to_none=True)). Activations come from the graph's private memory pool.
#   STATIC SHAPES. Every tensor of a replay has its captured shape and every kernel its captured grid: --fixed_shape
#     pads each micro-batch to the budget, a fixed count of sequences and a fixed max_seqlen (collate). The LM head
#     (Transformer.loss's rows=) runs on a fixed count of rows, FixedShape.head_rows: the labelled ones (a count
#     that varies) padded with unlabelled ones, enough for any pack of the data (fixed_shape).
#   NO HOST SYNCS, NO HOST DECISIONS ON GPU VALUES (.item(), .tolist(), int(t), `if t:`): during capture nothing
#     has run, so there is no value to read. kernels.py's training path has none (max_seqlen is a host int); torch's
#     attention reference reads cu_seqlens (.tolist()), so --cuda_graphs needs the kernels. Host work is NOT
#     recorded: Python state changed during capture (the dp buckets' counters) does not change on replay.
#   NO FIRST-CALL WORK during capture: Triton compiles and autotunes (benchmarks, syncs) a kernel on its first call,
#     cuBLAS makes a handle and workspace per stream, the allocator grows. So the step first runs eagerly, on the
#     side stream that then captures (autograd's grad-accumulation nodes keep the stream they first ran on: after a
#     warm-up on another stream the capture would wait on a stream it does not capture), on a filler-only
#     micro-batch: every label ignored, so the loss and every gradient are exactly 0.
#   NOTHING ELSE QUERIES THE GPU during capture, from any thread: the Prefetcher's pin_memory() polls CUDA events,
#     which invalidates a capture, so the graph is captured in build(), before the Prefetcher starts.
# dp > 1 works: the graph holds no collective, and the optimizer all-reduces the gradients after the step's last
# replay (finish_grad_sync), so communication no longer overlaps the backward. tp/pp > 1 would put collectives and
# p2p inside the graph (and pipeline schedules are host control flow): refused.
# THE DEFAULT: on for one process (sft, the kernels, ZeRO 0/1); dp > 1 and DPO run eagerly unless asked. What it buys
# and costs, one H200, real packed GSM8K: SmolLM2-135M at the default 16,384 tokens per step 149k -> 410k tokens/s
# (the eager step is host-bound); at 65,536-token micro-batches, where the GPU already keeps up with the host, and on
# the 0.6B shape it is 4-5% slower (the padding, and the LM head on head_rows rows instead of each pack's own count):
# --no-cuda_graphs there.

GRAPH_WARMUP = 2   # eager runs before capture: the first compiles, autotunes and grows; the second finds it all done


class GraphStep:
    """--cuda_graphs: forward + loss + backward of one FixedShape micro-batch, captured once as a CUDA graph and
    replayed for every micro-batch (capture=True), or run eagerly on the same static buffers (capture=False: the
    CPU path the tests compare with pipeline_step). step() stands in for pipeline_step at tp = pp = 1 (sft only)."""

    def __init__(self, model, opt, shape: FixedShape, capture: bool):
        if model.mesh.tp * model.mesh.pp > 1 or opt.dp.stage > 1:
            raise ValueError(f"sft.py: GraphStep needs tp = pp = 1 and ZeRO 0/1; got tp {model.mesh.tp}, pp "
                             f"{model.mesh.pp}, zero {opt.dp.stage}")
        self.model, self.opt, self.shape, self.graph = model, opt, shape, None
        dev = next(model.parameters()).device
        filler = collate([], shape=shape)                 # filler only: every label ignored (the warm-up input)
        self.static = {k: filler[k].to(dev) for k in ("input_ids", "positions", "cu_seqlens", "labels", "head_rows")}
        self.scale = torch.zeros((), dtype=torch.float32, device=dev)       # 1 / the step's label tokens
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)    # the step's sum, added by each replay
        if capture:
            self._capture()

    def _fwd_bwd(self):
        s = self.static
        hidden = self.model(s["input_ids"], s["positions"], s["cu_seqlens"], self.shape.max_seqlen)
        total, _ = self.model.loss(hidden, s["labels"], rows=s["head_rows"])   # a fixed count (the comment above)
        (total * self.scale).backward()                           # grads ADD into main_grad (the dp hooks)
        self.loss_sum += total.detach()

    def _capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())             # the static buffers were filled on the default one
        with self.opt.no_sync():                                  # no collective in the warm-up or the graph
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP):
                    self._fwd_bwd()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph, stream=side):   # syncs, then records on `side` until the exit
                    self._fwd_bwd()
            except RuntimeError as e:
                raise RuntimeError(f"sft.py: --cuda_graphs: capturing the step failed ({e}); with --no-cuda_graphs "
                                   "(--fixed_shape keeps the padding) the same step runs eagerly") from e
        self.opt.zero_grad()                                      # (the warm-up's gradients were zeros anyway)

    def step(self, mbs: list, loss_scale: float) -> torch.Tensor:
        """All micro-batches of the step -> the sum of their losses (a 0-dim device tensor: no sync here)."""
        self.scale.fill_(loss_scale)
        self.loss_sum.zero_()
        with self.opt.no_sync():        # the eager path as the graph: grads stay local, the optimizer reduces them
            for k, mb in enumerate(mbs):
                have = (len(mb["input_ids"]), len(mb["cu_seqlens"]) - 1, len(mb.get("head_rows", ())))
                if have != (self.shape.tokens, self.shape.seqs, self.shape.head_rows or self.shape.tokens):
                    raise ValueError(f"sft.py: --cuda_graphs: micro-batch {k} has {have[0]} tokens, {have[1]} "
                                     f"sequence slots and {have[2]} head rows; the graph holds {self.shape}")
                for name, t in self.static.items():     # host -> the captured addresses (pinned: asynchronous)
                    t.copy_(mb[name], non_blocking=True)
                self.graph.replay() if self.graph is not None else self._fwd_bwd()
        return self.loss_sum


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


def read_jsonl(path) -> list[dict]:
    """The JSON objects of a .jsonl file, one per line. A line that does not parse (a write cut short by a
    crash or a power loss) is skipped with a warning naming the file and line: a torn last line of
    metrics.jsonl must not stop a resume."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").split("\n"), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            row = e.msg
        if isinstance(row, dict):
            rows.append(row)
        elif row is not None:
            print(f"sft.py: WARNING: {path}: line {i} is not a JSON object ({row}); skipped (a write cut short?)")
    return rows


class Logger:
    """Rank 0's outputs: one console line per log_every steps, a tqdm bar (on a terminal), every step in
    <out>/metrics.jsonl (kept up to the resumed step on --resume), wandb when asked for and installed."""

    def __init__(self, cfg: Config, enabled: bool, start: int, total: int):
        self.enabled, self.cfg, self.path = enabled, cfg, Path(cfg.out) / "metrics.jsonl"
        self.bar = self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = read_jsonl(self.path) if self.path.is_file() and start > 0 else []
        tmp = self.path.with_name(self.path.name + ".tmp")      # rewritten whole, then renamed: never half
        tmp.write_text("".join(json.dumps(r) + "\n" for r in old if r.get("step", 0) <= start))
        os.replace(tmp, self.path)
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
        rows = read_jsonl(path)
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


# ---- checks and checkpoints --------------------------------------------------------------------------
# What can be checked is checked before a model is built (a 0.6B model takes ~35 s to build on CPU): the
# model's shape against --tp / --pp and against the checkpoint a resume would load, and --out itself.
# A run owns the step_N folders of its --out: merge.py and the next --resume take the NEWEST step, so a new
# run (or a resume from an older step) must never leave another run's later steps next to its own.


def step_folders(root) -> dict:
    """{N: folder} for every step_N folder under root, complete (manifest.json present) or not."""
    root = Path(root)
    found = [(int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else [])
             if (m := re.fullmatch(r"step_(\d+)", p.name)) and p.is_dir()]
    return dict(sorted(found))


def plan_resume(cfg: Config) -> tuple:
    """(checkpoint to resume from or None, its step, the step folders of --out that --overwrite deletes). Refuses,
    naming the flags, a checkpoint of another --objective or --seed and an --out holding steps after this start."""
    src = None if cfg.resume == "never" else nt.latest_checkpoint(cfg.out) if cfg.resume == "auto" else Path(cfg.resume)
    if cfg.resume not in ("auto", "never") and not (src / "manifest.json").is_file():
        raise FileNotFoundError(f"sft.py: --resume {cfg.resume}: no checkpoint there (no manifest.json); "
                                "expected a step_N folder, auto or never")
    man = nt.read_manifest(src) if src is not None else {"step": 0}
    if (saved := man.get("extra", {}).get("objective", cfg.objective)) != cfg.objective:   # its steps, Adam, data
        raise ValueError(f"sft.py: {src} is a checkpoint of --objective {saved}, not {cfg.objective}: a resume "
                         f"continues that run; to start {cfg.objective} from its weights, merge.py it into --model")
    if (seed := man.get("config", {}).get("seed", cfg.seed)) != cfg.seed:   # (the init it seeded: overwritten)
        raise ValueError(f"sft.py: {src} is a checkpoint of --seed {seed}, not {cfg.seed}: the seed orders the data "
                         f"and the checkpoint holds a position in that order; resume with --seed {seed}")
    start = int(man["step"])
    later = [p for n, p in step_folders(cfg.out).items() if n > start]
    if later and not cfg.overwrite:
        how = "a new run (--resume never)" if src is None else f"this run (resuming from step {start})"
        raise ValueError(f"sft.py: --out {cfg.out} already holds {', '.join(p.name for p in later)} of another run; "
                         f"{how} would mix with it (merge.py and the next resume take the newest step). Pass "
                         "another --out, or --overwrite to delete those step folders first")
    return src, start, later


def model_config(cfg: Config, mesh: nt.Mesh, vocab_size: int) -> tuple:
    """(ModelConfig, HF folder or None) of --model, read without building a model: a preset's shape (tiny:
    the data's vocabulary), or a folder's config.json (smollm2: converted once by rank 0, the others wait)."""
    if cfg.model in nt.PRESETS:
        extra = dict(vocab_size=vocab_size, max_position_embeddings=8192) if cfg.model == "tiny" else {}
        return nt.preset_config(cfg.model, **extra), None
    if cfg.model == "smollm2":
        import prepare_data
        if mesh.rank == 0:
            prepare_data.default_model_path()
        mesh.barrier()
        path = prepare_data.default_model_path()
    else:
        path = nt.resolve_model_path(cfg.model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"sft.py: --model {cfg.model}: {path / 'config.json'} is missing (not an HF "
                                "model folder)")
    return nt.ModelConfig.from_hf(json.loads((path / "config.json").read_text())), path


def check_model(cfg: Config, mcfg, vocab_size: int, src):
    """The model's shape against the layout flags, the data's vocabulary and the checkpoint to resume."""
    H, Hkv, L = mcfg.num_heads, mcfg.num_kv_heads, mcfg.num_layers
    if H % cfg.tp or Hkv % cfg.tp:
        ok = [t for t in range(1, Hkv + 1) if H % t == 0 and Hkv % t == 0]
        raise ValueError(f"sft.py: --tp {cfg.tp} must divide the model's {H} query heads and {Hkv} kv heads "
                         f"(--model {cfg.model}): use --tp in {ok}")
    if cfg.pp > L:
        raise ValueError(f"sft.py: --pp {cfg.pp} is more pipeline stages than the model's {L} layers "
                         f"(--model {cfg.model})")
    if vocab_size > mcfg.vocab_size:
        raise ValueError(f"sft.py: --data {cfg.data} has token ids up to {vocab_size - 1}, --model {cfg.model} only "
                         f"{mcfg.vocab_size} embeddings: tokenize with the model's own tokenizer")
    if src is not None:     # the manifest alone: a mismatch costs milliseconds, not a model build
        saved = nt.ModelConfig.from_hf(nt.read_manifest(src)["model_config"])
        diffs = [f"{f.name} (checkpoint {getattr(saved, f.name)!r}, --model {getattr(mcfg, f.name)!r})"
                 for f in dataclasses.fields(mcfg) if f.name not in ("bos_token_id", "eos_token_id")
                 and getattr(saved, f.name) != getattr(mcfg, f.name)]
        if diffs:
            more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise ValueError(f"sft.py: {src} (--resume {cfg.resume}) was trained from another model than --model "
                             f"{cfg.model}: {'; '.join(diffs[:3])}{more}. Pass the --model it was trained from, "
                             "another --out, or --resume never --overwrite to start over")


def prune_checkpoints(root, keep: int) -> list:
    """Delete all but the newest `keep` complete checkpoints (step_N with manifest.json) under root; 0 keeps
    all. Incomplete folders are left alone (they may be a save in progress). Returns the deleted folders."""
    done = [p for p in step_folders(root).values() if (p / "manifest.json").is_file()]
    old = done[:-keep] if keep > 0 else []
    for p in old:
        shutil.rmtree(p)
    return old


# ---- profile (--profile K) -----------------------------------------------------------------------------
# Where a step's time goes when a small model is host-bound: torch.profiler records K steps after the warm-up
# (UNTIMED_STEPS), then rank 0 prints per step: wall time, GPU busy time (kernels, summed), kernel launches
# and host syncs (the CUDA runtime calls that wait for the device), and the top host ops and kernels; the
# Chrome trace goes to --out/trace.json (chrome://tracing or ui.perfetto.dev). On CPU only the host side.
# FOOTGUN: recording costs host time itself; compare GPU busy with the unprofiled steps' time, not wall.

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


class _NoProfile:
    start = step = stop = staticmethod(lambda: None)


def profiler(cfg: Config, rank: int):
    """A torch.profiler that records steps [UNTIMED_STEPS, UNTIMED_STEPS + K) of this run (start(), step()
    after every step, stop()) and reports them when they are done; a stand-in that does nothing when K = 0."""
    if not cfg.profile:
        return _NoProfile()
    from torch.profiler import ProfilerActivity, profile, schedule
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

    def report(prof):
        if rank != 0:
            return
        ev, cpu, mark = prof.key_averages(), torch.autograd.DeviceType.CPU, "ProfilerStep"   # markers: no work
        gpu_us = sum(e.self_device_time_total for e in ev if e.device_type != cpu and not e.key.startswith(mark))
        count = lambda names: sum(e.count for e in ev if e.key in names)   # noqa: E731
        steps = [e for e in ev if e.key.startswith(mark) and e.device_type == cpu]   # the host's step markers:
        K = max(1, sum(e.count for e in steps))                  # cfg.profile of them, fewer if the run ended first
        wall_ms = sum(e.cpu_time_total for e in steps) / 1e3 / K
        print(f"-- profile of {K} steps: wall {wall_ms:.1f} ms/step, GPU busy {gpu_us / 1e3 / K:.1f} ms/step "
              f"({100 * gpu_us / 1e3 / K / max(wall_ms, 1e-9):.0f}%), {count(LAUNCHES) / K:.0f} kernel launches and "
              f"{count(SYNCS) / K:.0f} host syncs per step; cuda graphs {'on' if cfg.cuda_graphs else 'off'} --")
        print(ev.table(sort_by="self_cpu_time_total", row_limit=12))
        if gpu_us:
            print(ev.table(sort_by="self_device_time_total", row_limit=12))
        prof.export_chrome_trace(str(Path(cfg.out) / "trace.json"))
        print(f"-> {Path(cfg.out) / 'trace.json'}")
    return profile(activities=acts, schedule=schedule(wait=UNTIMED_STEPS - 1, warmup=1, active=cfg.profile, repeat=1),
                   on_trace_ready=report)


# ---- driver ------------------------------------------------------------------------------------------
# main = setup (flags, mesh, data, model config: everything that can fail cheaply) -> build (model,
# optimizer, data order, resume) -> train (the loop, evals, saves) -> summarize.


@dataclass
class Job:
    """What main's phases share: the run's config and mesh, its data splits, the model to build (mcfg, from
    the HF folder `path` or random init when None), the checkpoint `src` to resume at step `start`, the
    step folders of --out that --overwrite deletes, the derived quantities (see derive), the start time."""
    cfg: Config
    mesh: nt.Mesh
    train_ds: object
    test_ds: object
    mcfg: nt.ModelConfig
    path: Path | None
    src: Path | None
    start: int
    stale: list
    derived: dict
    t_start: float


def derive(cfg: Config, mesh: nt.Mesh, train_ds, test_ds, mask_share: float = 1.0) -> dict:
    """The few dials -> micro-batches per step M, total steps, warmup, and the row statistics printed. mask_share:
    the train rows' largest labelled share (open_data), which sizes the LM head of a fixed shape."""
    share = mesh.dp * cfg.micro_batch_tokens
    if cfg.tokens_per_step % share:
        raise ValueError(f"sft.py: --tokens_per_step {cfg.tokens_per_step} must be a multiple of dp * "
                         f"--micro_batch_tokens = {mesh.dp} * {cfg.micro_batch_tokens} = {share}; e.g. "
                         f"--tokens_per_step {max(1, round(cfg.tokens_per_step / share)) * share}")
    for split, L in (("train", train_ds["num_tokens"]), ("test", test_ds["num_tokens"])):   # (eval: 0 / 0 -> 0.0)
        if not bool((L <= cfg.micro_batch_tokens).any()):
            raise ValueError(f"sft.py: every {split} row of --data {cfg.data} is longer than --micro_batch_tokens "
                             f"{cfg.micro_batch_tokens} (shortest {int(L.min())}); raise --micro_batch_tokens")
    lengths = train_ds["num_tokens"].double()
    fit = lengths[lengths <= cfg.micro_batch_tokens]        # the rows that train: longer ones are skipped
    n_long, mean_len = len(lengths) - len(fit), float(fit.mean())
    if cfg.fixed_shape and cfg.sequence_parallel and cfg.micro_batch_tokens % mesh.tp:
        raise ValueError(f"sft.py: --fixed_shape --sequence_parallel: --micro_batch_tokens {cfg.micro_batch_tokens} "
                         f"must be a multiple of --tp {mesh.tp} (each tp rank holds 1/tp of the padded tokens)")
    shape = (fixed_shape(lengths.long().tolist(), cfg.micro_batch_tokens, cfg.objective, mask_share)
             if cfg.fixed_shape else None)
    epochs = not cfg.steps and mesh.device.type == "cuda" and cfg.data != "toy"   # toy: the 4-step demo anywhere
    if epochs and (cfg.epochs <= 0 or fit.sum() < cfg.tokens_per_step):     # (a step > the data: rows repeat in it)
        raise ValueError(f"sft.py: --epochs {cfg.epochs} of {int(fit.sum())} train tokens (--data {cfg.data}): expected"
                         f" epochs > 0 and >= one step of them (--tokens_per_step {cfg.tokens_per_step}), or --steps")
    total = cfg.steps or (math.ceil(cfg.epochs * float(fit.sum()) / cfg.tokens_per_step) if epochs else CPU_DEMO_STEPS)
    return {"M": cfg.tokens_per_step // share, "n_rows": len(lengths), "n_long": n_long, "mean_len": mean_len,
            "per_seq": mean_len / 2 if cfg.objective == "dpo" else mean_len,      # attention sees each sequence
            "total": total, "warmup": min(cfg.warmup_steps, total // 10), "shape": shape}


def setup(cfg: Config) -> Job:
    """Flags, mesh, --out, data and model shape, all checked before a model is built."""
    t_start = time.time()
    cfg = resolve(cfg, torch.cuda.is_available(), nt.dist_env()[1])
    mesh = nt.Mesh.build(cfg.tp, cfg.pp)                     # joins torchrun's group; dp = world / (tp * pp)
    src, start, stale = plan_resume(cfg)
    train_ds, test_ds, vocab, check_line, data_id, mask_share = open_data(cfg, mesh)
    check_resume_data(cfg, src, data_id)
    mcfg, path = model_config(cfg, mesh, vocab)
    check_model(cfg, mcfg, vocab, src)
    act = None
    if not cfg.micro_batch_tokens:                             # CUDA: from memory (see auto_micro_batch_tokens)
        micro, act = auto_micro_batch_tokens(cfg.tokens_per_step, mesh.dp, cfg.tp, cfg.pp, mcfg,
                                             getattr(torch, cfg.dtype).itemsize,
                                             torch.cuda.get_device_properties(mesh.device).total_memory)
        if src is not None:                 # a resume packs as the run did (on whatever GPU it ran)
            micro = nt.read_manifest(src)["config"].get("micro_batch_tokens") or micro
        cfg = dataclasses.replace(cfg, micro_batch_tokens=micro)
    if mesh.rank == 0:
        print("sft config:", json.dumps(asdict(cfg)))
    derived = derive(cfg, mesh, train_ds, test_ds, mask_share) | {"check": check_line, "act": act, "data_id": data_id}
    return Job(cfg, mesh, train_ds, test_ds, mcfg, path, src, start, stale, derived, t_start)


def build_model(job: Job, dtype):
    """This rank's stage, with weights: the HF folder's, or a random init of the preset's shape."""
    cfg = job.cfg
    kw = dict(seq_len=int(job.derived["per_seq"]), sequence_parallel=cfg.sequence_parallel,
              use_kernels=cfg.use_kernels, activation_checkpointing=cfg.activation_checkpointing, dtype=dtype)
    stage = nt.build_stage(job.mcfg, job.mesh, **kw)
    return stage.init_random(cfg.seed) if job.path is None else stage.load_hf(job.path)


def print_derived(cfg, mesh, d: dict, mcfg, peak):
    seqs, fpt = cfg.tokens_per_step / d["mean_len"], nt.flops_per_token(mcfg, d["per_seq"])
    lines = [
        f"world {mesh.world} = dp {mesh.dp} x tp {mesh.tp} x pp {mesh.pp}  (dp inferred from the world size)",
        f"micro-batches per step per dp rank M = tokens_per_step / (dp * micro_batch_tokens) = "
        f"{cfg.tokens_per_step} / ({mesh.dp} * {cfg.micro_batch_tokens}) = {d['M']}" + ("" if d["act"] is None else
            f"  (micro_batch_tokens from memory: ~{d['act'] / 1024:.0f} KiB of activations per token x "
            f"{cfg.micro_batch_tokens} = {d['act'] * cfg.micro_batch_tokens / 2**30:.1f} GiB, <= {ACT_SHARE:.0%} of "
            f"the GPU and what the model's state leaves; the closing line prints the real peak)"),
        f"{'pairs' if cfg.objective == 'dpo' else 'sequences'} per step ~ {seqs:.0f} (mean train row "
        f"{d['mean_len']:.0f} tokens; packs are filled first-fit, so a step holds <= tokens_per_step)",
        f"train rows {d['n_rows']}, {d['n_long']} longer than micro_batch_tokens (skipped, never truncated)",
        d["check"],
        f"steps {d['total']} (~{d['total'] * seqs / (d['n_rows'] - d['n_long']):.2f} epochs), warmup {d['warmup']}, "
        f"cosine to {cfg.lr * cfg.min_lr_ratio:.2e}",
        f"FLOPs/token, PaLM convention 6N + 12*L*H*D*T (N = matmul params, T = {d['per_seq']:.0f}): {fpt / 1e9:.3f} G",
        f"peak for MFU: {'n/a (CPU or unknown GPU)' if peak is None else f'{peak:.0f} TFLOP/s per GPU (bf16 dense)'}",
        "fixed shapes: off (each micro-batch as packed)" if d["shape"] is None else
        f"fixed shapes: every micro-batch padded to {d['shape'].tokens} tokens in {d['shape'].seqs} sequence slots, "
        f"max_seqlen {d['shape'].max_seqlen} (filler and empty slots have no labels; tokens/s counts real tokens)",
        "cuda graphs: " + (f"on (forward + loss + backward captured once after {GRAPH_WARMUP} eager runs on filler, "
                           f"one replay per micro-batch; the LM head on {d['shape'].head_rows} rows: the train rows' "
                           "largest labelled share of the budget)" if cfg.cuda_graphs else "off"),
    ]
    if cfg.pp > 1 and d["M"] < cfg.pp:
        lines.append(f"NOTE: M = {d['M']} < pp = {cfg.pp}: the pipeline bubble is over half the step; raise "
                     "tokens_per_step")
    print("derived:\n  " + "\n  ".join(lines))


def build(job: Job) -> tuple:
    """(model, frozen reference or None, optimizer, batcher, eval micro-batches, GraphStep or None), resumed."""
    cfg, mesh, d = job.cfg, job.mesh, job.derived
    if job.stale and mesh.rank == 0:                  # --overwrite: only now that every check has passed
        for p in job.stale:
            shutil.rmtree(p)
        print(f"sft.py: --overwrite: deleted {', '.join(p.name for p in job.stale)} from {cfg.out}")
    mesh.barrier()
    dtype = getattr(torch, cfg.dtype)
    model = build_model(job, dtype)
    if mesh.rank == 0:
        print(f"model: {cfg.model} ({job.path or 'random init'}), {model.cfg.num_layers} layers, this stage "
              f"{model.layer_range}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params on rank 0, "
              f"{cfg.dtype}, kernels={model.use_kernels}")
        print_derived(cfg, mesh, d, model.cfg, nt.peak_tflops(mesh.device))
    ref = None
    if cfg.objective == "dpo":                    # the frozen reference: the same weights, no optimizer
        ref = build_model(job, dtype).requires_grad_(False)
    opt = nt.build_optimizer(model, mesh, cfg.zero_stage, cfg.lr, cfg.betas, cfg.weight_decay)
    mult = mesh.tp if cfg.sequence_parallel else 1
    batcher = Batcher(job.train_ds, cfg.objective, d["M"], cfg.micro_batch_tokens, mesh.dp_rank, mesh.dp,
                      cfg.seed, mult, d["shape"])
    if job.src is not None:
        states = nt.load_checkpoint(job.src, model, opt, mesh)["extra"]["batcher"]
        if len(states) == mesh.dp:
            batcher.load_state_dict(states[mesh.dp_rank])
        else:   # another dp: the rows were dealt differently; restart the data at the next epoch boundary
            batcher.sampler.epoch = max(s["sampler"]["epoch"] for s in states) + 1
            batcher.it = iter(batcher.sampler)
        if mesh.rank == 0:
            print(f"sft.py: resumed from {job.src} at step {job.start}" + ("" if len(states) == mesh.dp else
                  f" (dp {len(states)} -> {mesh.dp}: data restarts at an epoch)"))
    if cfg.cuda_graphs and not model.use_kernels:
        raise ValueError("sft.py: --cuda_graphs needs kernels.py's Triton kernels (pip install triton): torch's "
                         "attention reference reads cu_seqlens on the host, which a CUDA graph cannot replay")
    graphs = GraphStep(model, opt, d["shape"], capture=True) if cfg.cuda_graphs else None   # before the Prefetcher
    return model, ref, opt, batcher, eval_batches(job.test_ds, cfg, mesh, cfg.micro_batch_tokens), graphs


def save(job: Job, model, opt, batcher, step: int, log) -> Path:
    """A checkpoint of every rank (the batchers' positions gathered over dp), then --keep_last pruning."""
    cfg, mesh = job.cfg, job.mesh
    states = [batcher.state_dict()]
    if mesh.dp > 1:
        states = [None] * mesh.dp
        dist.all_gather_object(states, batcher.state_dict(), group=mesh.dp_group)
    folder = nt.save_checkpoint(Path(cfg.out) / f"step_{step}", model, opt, mesh, step,
                                extra={"batcher": states, "objective": cfg.objective,
                                       "data": job.derived["data_id"]}, config=asdict(cfg))
    if mesh.rank == 0:
        size = sum(e["bytes"] for e in nt.read_manifest(folder)["files"].values())
        gone = prune_checkpoints(cfg.out, cfg.keep_last)
        log.log({"step": step, "checkpoint": str(folder), "checkpoint_gb": round(size / 1e9, 3)},
                f"saved {folder} ({size / 2 ** 30:.2f} GiB)" + (f"; --keep_last {cfg.keep_last}: deleted "
                f"{', '.join(p.name for p in gone)}" if gone else ""))
    mesh.barrier()                                  # no rank reads --out while rank 0 prunes it
    return folder


def train(job: Job, model, ref, opt, batcher, eval_mbs, graphs=None) -> dict:
    """The first eval, then the loop over a Prefetcher (or the plain Batcher); returns the summary's numbers."""
    cfg, mesh, start, total = job.cfg, job.mesh, job.start, job.derived["total"]
    log = Logger(cfg, mesh.rank == 0, start, total)
    unit = "pair" if cfg.objective == "dpo" else "token"
    eval_loss = evaluate(model, mesh, eval_mbs, cfg, ref)
    if start >= total and mesh.rank == 0:
        print(f"sft.py: {cfg.out} already holds step {start} >= steps {total}: nothing to train (raise --steps, "
              "or start over with --resume never --overwrite, or another --out)")
    log.log({"step": start, "eval_loss": eval_loss}, f"step {start}/{total} | eval loss {eval_loss:.4f} per {unit}")
    r = {"first": None, "last": None, "eval_loss": eval_loss, "tokens": 0, "seconds": 0.0, "flops": 0.0}
    prof = profiler(cfg, mesh.rank)
    prof.start()
    batches = Prefetcher(batcher, pin=mesh.device.type == "cuda") if cfg.prefetch and start < total else batcher
    try:
        _loop(job, model, ref, opt, batches, eval_mbs, log, prof, r, graphs)
    finally:
        if batches is not batcher:
            batches.close()
    r["skipped"] = batches.skipped
    prof.stop()
    log.close()
    return r


def _loop(job: Job, model, ref, opt, batches, eval_mbs, log, prof, r: dict, graphs=None):
    """The steps: queue step k, then read and log step k - 1 (see queue_step's comment), evals and saves on their
    schedules (after reading the pending step); sums the timed steps into r."""
    cfg, mesh, start, total, warmup = job.cfg, job.mesh, job.start, job.derived["total"], job.derived["warmup"]
    unit = "pair" if cfg.objective == "dpo" else "token"
    pending, since = None, None                   # the step read next; where the next step's time starts
    for step in range(start, total):
        t0 = time.perf_counter()
        if since is None:                         # after a drain (or at the start): the step's time starts now
            since = _gpu_now(mesh.device)
        lr = nt.lr_at(step, warmup, total, cfg.lr, cfg.min_lr_ratio)
        q = queue_step(model, mesh, opt, batches.next_step(), cfg, lr, ref, graphs)
        q |= {"epoch": batches.epoch(), "skipped": batches.skipped, "since": since,   # the data position after it
              "wall": time.perf_counter() - t0}  # (on the CPU the step ran while queued: its time)
        since = q["done"]                         # the next step's time starts where this one ends (GPU clock)
        if pending is not None:
            _report(job, log, r, *pending)
        pending = (step, q, lr)
        done = step + 1 == total
        evals, saves = _every(cfg.eval_every, step + 1) or done, \
            _every(cfg.save_every, step + 1) or (done and cfg.save_every >= 0)
        if evals or saves:                    # they need the step finished: read it now
            _report(job, log, r, *pending)
            pending = since = None
        if evals:
            r["eval_loss"] = evaluate(model, mesh, eval_mbs, cfg, ref)
            log.log({"step": step + 1, "eval_loss": r["eval_loss"]},
                    f"step {step + 1}/{total} | eval loss {r['eval_loss']:.4f} per {unit}")
        if saves:
            save(job, model, opt, batches, step + 1, log)
        prof.step()


def _report(job: Job, log, r: dict, step: int, q: dict, lr: float):
    """Read a queued step (read_step), log it and add it to the summary's sums. A step's time on CUDA is read off
    the GPU's clock, from the end of the step before (or its own start, after a drain) to its own end: the host clock
    cannot tell, with the loop one step ahead, when the GPU finished a step; it includes any time the GPU waited for
    the host, and consecutive steps add up to the GPU's wall time. On the CPU a step runs as it is queued."""
    cfg, mesh, start, total = job.cfg, job.mesh, job.start, job.derived["total"]
    m = read_step(q)
    dt = q["since"].elapsed_time(q["done"]) / 1e3 if q["done"] is not None else q["wall"]
    fpt, peak = nt.flops_per_token(job.mcfg, m["seq_len_eff"]), nt.peak_tflops(mesh.device)
    if step >= start + min(UNTIMED_STEPS, total - start - 1):   # warm-up steps: not in the average
        r["tokens"], r["seconds"], r["flops"] = r["tokens"] + m["tokens"], r["seconds"] + dt, \
            r["flops"] + fpt * m["tokens"]
    tps = m["tokens"] / dt
    mfu = None if peak is None else fpt * tps / (mesh.world * peak * 1e12)
    r["first"], r["last"] = m["loss"] if r["first"] is None else r["first"], m["loss"]
    line = (f"step {step + 1}/{total} | loss {m['loss']:.4f} | lr {lr:.2e} | gnorm {m['grad_norm']:.3f} | "
            f"{tps:,.0f} tok/s | mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | {dt:.2f}s" +
            (f" | acc {m['reward_acc']:.2f}" if "reward_acc" in m else ""))
    log.log({"step": step + 1, **m, "lr": lr, "tokens_per_s": tps, "mfu": mfu, "epoch": q["epoch"],
             "skipped_rows": q["skipped"], "seconds": dt},
            line if _every(cfg.log_every, step + 1) or step == start else None)
    log.advance()


def _gpu_now(device):
    """A timing event queued on the current CUDA stream now (it fires when the GPU gets there); None on the CPU."""
    if device.type != "cuda":
        return None
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def summarize(job: Job, r: dict, skipped: int) -> dict:
    """summary.json, the loss PNG, one results.jsonl line and the closing line; leaves the process group."""
    cfg, mesh, total = job.cfg, job.mesh, job.derived["total"]
    peak = nt.peak_tflops(mesh.device)
    mem = torch.tensor([torch.cuda.max_memory_allocated(mesh.device) if mesh.device.type == "cuda" else 0.0],
                       device=mesh.device)
    if mesh.world > 1:
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)                        # the fullest GPU decides what fits
    summary = {"steps": total, "first_loss": r["first"], "last_loss": r["last"], "eval_loss": r["eval_loss"],
               "tokens_per_s": r["tokens"] / r["seconds"] if r["seconds"] else None,
               "mfu": None if peak is None or not r["seconds"] else
               r["flops"] / r["seconds"] / (mesh.world * peak * 1e12),
               "peak_gb": round(mem.item() / 1e9, 2), "skipped_rows": skipped,
               "seconds": round(time.time() - job.t_start, 1), "world": mesh.world, "dp": mesh.dp, "tp": mesh.tp,
               "pp": mesh.pp, "cuda_graphs": cfg.cuda_graphs, "fixed_shape": cfg.fixed_shape,
               "checkpoint": str(Path(cfg.out) / f"step_{total}") if cfg.save_every >= 0 else None}
    if mesh.rank == 0:
        unit = "pair" if cfg.objective == "dpo" else "token"
        if (Path(cfg.out) / "metrics.jsonl").is_file():
            plot_loss({"": Path(cfg.out) / "metrics.jsonl"}, Path(cfg.out) / "loss.png",
                      f"{cfg.objective} loss per {unit}")
        print(f"sft.py: {cfg.objective} {job.start} -> {total} steps, loss {r['first']} -> {r['last']}, eval "
              f"{r['eval_loss']:.4f}, {summary['tokens_per_s'] or 0:,.0f} tok/s after warm-up"
              f"{' (cuda graphs)' if cfg.cuda_graphs else ''}, peak "
              f"{summary['peak_gb']} GB, {summary['seconds']} s; out {cfg.out}")
        from prepare_data import append_result
        append_result(cfg.results, cfg.objective, asdict(cfg), summary)
        (Path(cfg.out) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    mesh.destroy()
    return summary


def _every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    if cfg.bench:
        if nt.dist_env()[1] > 1:
            raise ValueError("sft.py: --bench starts its own torchrun jobs: run it as `python sft.py --bench ..`")
        return bench_layouts(cfg, argv)
    job = setup(cfg)                                  # every check that needs no model
    model, ref, opt, batcher, eval_mbs, graphs = build(job)
    r = train(job, model, ref, opt, batcher, eval_mbs, graphs)
    return summarize(job, r, r["skipped"])


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


def bench_layouts(cfg: Config, argv=None) -> list:
    import subprocess
    import sys
    G = torch.cuda.device_count() if torch.cuda.is_available() else 2        # CPU: 2 gloo processes
    spec = cfg.bench if cfg.bench != "auto" else ",".join(["1"] + [f"{k}{G}" for k in ("dp", "tp", "pp")] * (G > 1))
    layouts = [x.strip() for x in spec.split(",") if x.strip()]
    specs = {name: parse_layout(name) for name in layouts}
    if cfg.cuda_graphs and any(d["tp"] * d["pp"] > 1 for d in specs.values()):
        raise ValueError(f"sft.py: --bench {spec} --cuda_graphs: every layout needs tp 1 and pp 1 (dp only), got "
                         f"{', '.join(n for n, d in specs.items() if d['tp'] * d['pp'] > 1)}")
    from prepare_data import drop_flags
    base = drop_flags(Config, list(sys.argv[1:] if argv is None else argv),
                      {"bench", "tp", "pp", "out", "resume", "results", "save_every"})
    base += ["--no-cuda_graphs"] if cfg.cuda_graphs is None else []   # the default would differ by layout (1 GPU: on)
    root = Path(cfg.out or "runs/layouts")
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
        steps = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
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
    print(f"\nsft.py --bench ({cfg.model}, {cfg.data}; cuda graphs {'on' if cfg.cuda_graphs else 'off'}; speed-up "
          f"and |dloss| against {against}):"
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
    from prepare_data import run_cli
    run_cli(main, prog="sft.py")
