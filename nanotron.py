"""nanotron: the training model of nanorlhf and the (dp, pp, tp) machinery that trains it on 1..N GPUs.

Stands in for Megatron-LM / picotron / nanotron. Keeps: the Qwen3 / Qwen2 / Llama (SmolLM2) decoder family loaded from
HF safetensors, packed varlen batches (no padding), activation checkpointing, one explicit rank-grid object, Megatron
tensor parallelism (column / row / vocab-parallel layers, the vocab-parallel loss) with optional sequence parallelism,
pipeline parallelism (AFAB, 1F1B), data parallelism with ZeRO 0-3, fp32 master weights and AdamW. Drops: MoE, rope
scaling, sliding windows, context parallelism, fp8, kv-head replication when tp > num_kv_heads.

How it works: `Mesh.build(tp, pp)` lays the torchrun ranks out as a grid (tp fastest, then dp, then pp) with one
process group per row/column. `Transformer(cfg, mesh)` builds only this rank's slice of every weight (column-parallel
layers keep out_features/tp rows, row-parallel ones in_features/tp columns, the vocab layers V/tp rows); `load_hf`
cuts each HF tensor for it. The forward takes `input_ids[N], positions[N], cu_seqlens[B+1]`; two all-reduces per layer
(an all-gather + reduce-scatter pair under sequence parallelism) make every layout compute one process's numbers; the
loss combines softmax statistics, never gathering [N, V] logits. Kernels: kernels.py (Triton) or a torch path.

Read first, lines 1-631: the model at tp=1, config -> pure functions -> model -> HF folders, then selftest() at
the bottom. At tp=1 its parallel layers are plain nn.Linear / nn.Embedding and every collective a no-op. The
chapters after it read independently (after the mesh); each opens with a comment that teaches its idea first:
    mesh .................. dist_env, init_distributed, collectives, Mesh (the rank grid), check_layout
    tensor parallelism .... f/g operators, sequence parallelism, Column/RowParallelLinear,
                            VocabParallelEmbedding, vocab_parallel_cross_entropy / _logprobs
    pipeline parallelism .. stage_layers, build_stage, p2p of varlen activations, AFAB / 1F1B pipeline_step
    data parallelism ...... DataParallel: Bucket (a state machine), naive / bucketed (overlapped) grad sync, ZeRO 0-3
    optimizer ............. fp32 master weights + main_grad, clip_grad_norm_, AdamW, lr_at, build_optimizer
    checkpoints ........... save/load_checkpoint (any layout), latest_checkpoint, checkpoint_model_config,
                            CheckpointReader
    benchmark ............. flops_per_token / peak_tflops (the repo's one MFU definition), `--bench`
    self-test and CLI ..... selftest(), main()

Commands:
    python nanotron.py                     # CPU self-test: tiny model forward/backward, pipeline schedules, seconds
    python nanotron.py --help              # the flags
    python nanotron.py --bench             # one GPU: our training step vs HF + Liger-Kernel, one table
    python nanotron.py --bench --tiny      # CPU smoke test of the same harness (tiny preset, ours vs plain HF)
    pytest -q test_all.py -k "tp or pp or dp or hf"   # HF equality, the layouts on gloo (minutes)
    torchrun --nproc_per_node 8 sft.py --tp 2 --pp 2   # (sft.py drives this file; dp inferred = 2)

Legend: N packed tokens, B sequences, H query heads, Hkv kv heads, D head dim, Hd hidden size,
I intermediate size, V vocab (V_r: one TP rank's vocab rows), W world size, L layers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import zlib
from collections import deque
from functools import partial
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100   # label of a position that has no loss (prompt tokens, last token of a sequence)


def _require(ok, msg: str, exc: type = ValueError):
    """Raise exc(msg) unless ok. msg is built even when ok, so hot paths (per token, per hook) keep a plain `if`."""
    if not ok:
        raise exc(msg)


# ---- config ----------------------------------------------------------------------------------------
# The HF architectures we implement, and the flags that tell them apart. SmolLM2 is model_type "llama".
_ARCHS = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclasses.dataclass
class ModelConfig:
    """Everything that fixes a decoder's shapes and math. Field names are ours; from_hf / to_hf speak HF's."""
    vocab_size: int = 151936            # V: rows of the embedding and the LM head
    hidden_size: int = 1024             # Hd: width of the residual stream
    intermediate_size: int = 3072       # I: width of the SwiGLU MLP
    num_layers: int = 28                # L decoder layers
    num_heads: int = 16                 # H query heads
    num_kv_heads: int = 8               # Hkv key/value heads (GQA: H % Hkv == 0)
    head_dim: int = 128                 # D; Qwen3 decouples it from Hd / H
    rope_theta: float = 1e6             # RoPE base (Qwen: 1e6, Llama-2: 1e4, SmolLM2: 1e5)
    rms_norm_eps: float = 1e-6          # epsilon inside every RMSNorm
    max_position_embeddings: int = 40960  # size of the RoPE table: positions must stay below it
    tie_word_embeddings: bool = False   # LM head shares the embedding matrix (small models)
    qk_norm: bool = False               # Qwen3: per-head RMSNorm on q and k before RoPE
    qkv_bias: bool = False              # Qwen2: bias on the q, k, v projections
    model_type: str = "qwen3"           # HF model_type: qwen3 | qwen2 | llama
    bos_token_id: int | None = None     # kept only to round-trip config.json
    eos_token_id: int | list | None = None

    def __post_init__(self):
        _require(self.model_type in _ARCHS, f"ModelConfig: model_type {self.model_type!r} is not supported; "
                 f"nanotron implements {sorted(_ARCHS)} (SmolLM2 is 'llama')")
        _require(self.num_heads % self.num_kv_heads == 0, f"ModelConfig: num_heads={self.num_heads} must be a "
                 f"multiple of num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        _require(self.head_dim % 2 == 0, f"ModelConfig: head_dim={self.head_dim} must be even (RoPE rotates pairs)")

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """An HF config.json dict -> ModelConfig. Refuses what we do not implement instead of silently
        computing a different model (rope scaling, sliding windows, biases we lack, other activations)."""
        mt, act = d.get("model_type"), d.get("hidden_act", "silu")
        _require(mt in _ARCHS, f"config.json: model_type {mt!r} is not supported; nanotron implements "
                 f"{sorted(_ARCHS)} (Qwen3, Qwen2, Llama/SmolLM2)")
        _require(act == "silu", f"config.json: hidden_act {act!r} is not supported (only silu/SwiGLU)")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}     # transformers >= 5: rope_parameters
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _require(rope_type in (None, "default"),
                 f"config.json: rope scaling type {rope_type!r} is not implemented (plain RoPE only)")
        if on := [f for f in ("attention_bias", "mlp_bias", "use_sliding_window") if d.get(f)]:
            raise ValueError(f"config.json: {on[0]}=true is not supported by nanotron")
        _require(all(t == "full_attention" for t in d.get("layer_types") or []),
                 "config.json: layer_types other than 'full_attention' are not supported")
        H = d["num_attention_heads"]
        return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                   num_layers=d["num_hidden_layers"], num_heads=H, num_kv_heads=d.get("num_key_value_heads") or H,
                   head_dim=d.get("head_dim") or d["hidden_size"] // H,
                   rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                   rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                   max_position_embeddings=d.get("max_position_embeddings", 2048),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                   qk_norm=mt == "qwen3", qkv_bias=mt == "qwen2", model_type=mt,
                   bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"))

    def to_hf(self, dtype: str = "bfloat16") -> dict:
        """The config.json dict that transformers' AutoModelForCausalLM loads as this architecture."""
        _require(self.qk_norm == (self.model_type == "qwen3") and self.qkv_bias == (self.model_type == "qwen2"),
                 f"ModelConfig.to_hf: qk_norm={self.qk_norm}, qkv_bias={self.qkv_bias} has no HF "
                 f"architecture with model_type {self.model_type!r} (qk_norm is qwen3's, qkv_bias qwen2's)")
        d = {"architectures": [_ARCHS[self.model_type]], "model_type": self.model_type,
             "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
             "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
             "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
             "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
             "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
             "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
             "tie_word_embeddings": self.tie_word_embeddings, "torch_dtype": dtype, "dtype": dtype,
             "attention_dropout": 0.0, "use_cache": True, "bos_token_id": self.bos_token_id,
             "eos_token_id": self.eos_token_id}
        if self.model_type != "qwen2":     # Qwen2's q/k/v bias is hard-wired, the others have a flag
            d["attention_bias"] = False
        d["mlp_bias" if self.model_type == "llama" else "use_sliding_window"] = False
        return d


# Shapes by name, for random-init runs (tests, benchmarks, `sft.py --model qwen3-0.6b`); real weights: load_hf_state.
PRESETS = {
    "tiny": dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, rope_theta=10000.0, max_position_embeddings=256, qk_norm=True),
    # Qwen/Qwen3-0.6B's config.json: the ModelConfig defaults, tied, with q/k norm; 596,049,920 parameters
    "qwen3-0.6b": dict(tie_word_embeddings=True, qk_norm=True, model_type="qwen3"),
    # HuggingFaceTB/SmolLM2-135M(-Instruct)'s config.json: a Llama (no q/k norm), 134,515,008 parameters
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, rope_theta=1e5, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, qk_norm=False, model_type="llama"),
}


def preset_config(name: str, **kw) -> ModelConfig:
    """PRESETS[name] with fields overridden by kw."""
    _require(name in PRESETS, f"preset_config: unknown preset {name!r}; known: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **kw})


def tiny_config(**kw) -> ModelConfig:
    """A Qwen3-shaped toy (for tests and the self-test)."""
    return preset_config("tiny", **kw)


# ---- pure functions (the torch reference path) ------------------------------------------------------
# kernels.py has a Triton version of each; these are what runs without it, and what a reader reads first.

_KERNELS = _UNSET = object()
_KERNEL_API = ("rms_norm", "rope_qk_norm", "swiglu", "flash_attn_varlen", "fused_linear_cross_entropy",
               "fused_linear_logprobs")


def _kernels():
    """kernels.py when importable (imported lazily, once), else None: a copied nanotron.py still runs."""
    global _KERNELS
    if _KERNELS is _UNSET:
        try:
            import kernels as k
        except ImportError:
            k = None
        # FOOTGUN: Hugging Face's PyPI package is also called `kernels`; use only a module with our API
        _KERNELS = k if k is not None and all(hasattr(k, f) for f in _KERNEL_API) else None
    return _KERNELS


def rms_norm_ref(x, weight, eps):
    """RMSNorm (Zhang & Sennrich 2019, eq. 4): y = x / sqrt(mean(x^2) + eps) * w, statistics in fp32,
    rounded back to x's dtype BEFORE the weight multiply (exactly HF's Qwen3RMSNorm / LlamaRMSNorm)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_table(max_positions: int, D: int, theta: float, device=None) -> torch.Tensor:
    """The RoPE table [max_pos, D] in fp32: cos(pos * f_i) in the first D/2 columns, sin in the last D/2,
    f_i = theta^(-2i/D) (RoFormer, Su et al. 2021, eq. 15). Same layout as kernels.rope_cos_sin."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))  # [D/2]
    ang = torch.arange(max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)                                    # [max_pos, D]


def apply_rope_ref(x, positions, table):
    """Rotate x [N, heads, D] by its positions with HF's rotate_half layout: dim i pairs with i + D/2
    (the paper pairs 2i with 2i+1; same math on permuted dims). In fp32, one rounding at the end:
        out[:D/2] = x1 cos - x2 sin,   out[D/2:] = x2 cos + x1 sin."""
    cos, sin = table[positions].float().chunk(2, dim=-1)                 # [N, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]                          # [N, 1, D/2]: broadcast over heads
    x1, x2 = x.float().chunk(2, dim=-1)                                  # [N, heads, D/2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attention_varlen_ref(q, k, v, cu_seqlens):
    """Causal attention of packed sequences: q [N, H, D], k/v [N, Hkv, D] -> [N, H, D]. One SDPA call per sequence, so
    a token never sees another sequence (the block-diagonal causal mask, never built). GQA: query head h reads kv head
    h // (H / Hkv). .tolist() syncs the GPU: kernels.flash_attn_varlen is the fast path."""
    bounds, outs = cu_seqlens.tolist(), []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))          # [heads, L, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        outs.append(o.transpose(0, 1))                                    # [L, H, D]
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def next_token_labels(input_ids, cu_seqlens, loss_mask=None):
    """labels[i] = input_ids[i + 1] inside each packed sequence; IGNORE_INDEX at each sequence's last token (the next
    packed token belongs to another sequence) and where loss_mask [N] is False (SFT prompts). Returns int64 [N]."""
    labels = torch.full_like(input_ids, IGNORE_INDEX, dtype=torch.long)
    labels[:-1] = input_ids[1:]
    labels[cu_seqlens[1:].long() - 1] = IGNORE_INDEX                      # the last token of every sequence
    if loss_mask is not None:
        labels[~loss_mask.bool()] = IGNORE_INDEX
    return labels


def label_rows(labels, device=None):
    """The positions [n] of the labelled tokens of labels [N], for Transformer.loss(rows=...), or None when skipping
    rows would not pay (all or no rows labelled) or would cost a GPU sync (labels on the GPU): pass the host copy."""
    if labels.device.type != "cpu":
        return None
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)                     # [n], on the host: no sync
    return rows.to(device, non_blocking=True) if 0 < len(rows) < len(labels) else None


def cu_seqlens_from_lengths(lengths, device=None):
    """[3, 5, 2] -> cu_seqlens int32 [0, 3, 8, 10] and positions [0,1,2, 0,1,2,3,4, 0,1] (int64)."""
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    starts = torch.repeat_interleave(cu[:-1].long(), lengths.long())
    return cu, torch.arange(int(cu[-1]), device=device) - starts


# ---- model -----------------------------------------------------------------------------------------
# A pre-norm decoder (Llama / Qwen): embedding -> L x [RMSNorm -> attention -> add, RMSNorm -> SwiGLU MLP -> add] ->
# RMSNorm -> LM head, written once for every layout: its linear layers are the TP chapter's ColumnParallelLinear /
# RowParallelLinear / VocabParallelEmbedding, which at tp=1 are exactly nn.Linear / nn.Embedding (no-op collectives): a
# first read can take them as such. Only this rank's slice of each weight exists; hf_slots() maps HF names onto them.

class RMSNorm(nn.Module):
    """RMSNorm with a [dim] weight. grad_group: set when each TP rank sees only PART of the inputs sharing this weight
    (SP token shards, or its own heads for Qwen3's q/k norm): the f operator then sums the partial grads over TP."""
    def __init__(self, dim, eps, use_kernels=False, grad_group=None, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps, self.grad_group, self.kern = eps, grad_group, _kernels() if use_kernels else None

    def w(self):
        return copy_to_tp(self.weight, self.grad_group)

    def forward(self, x, residual=None):
        """norm(x); with a residual: h = x + residual, returns (norm(h), h), the add fused into the norm's
        pass over the rows (kernels.py), so the pre-norm block never writes h in a separate kernel."""
        if self.kern is not None:
            return self.kern.rms_norm(x, self.w(), self.eps, residual=residual)
        if residual is None:
            return rms_norm_ref(x, self.w(), self.eps)
        h = x + residual
        return rms_norm_ref(h, self.w(), self.eps), h


class Attention(nn.Module):
    """GQA self-attention, heads split over TP: rank r owns query heads [r*H/tp, ..) and kv heads [r*Hkv/tp, ..), so
    attention itself needs no communication; q/k/v is one column-parallel matmul, o_proj one row-parallel. Qwen3:
    RMSNorm over each head's q and k before RoPE."""
    def __init__(self, cfg: ModelConfig, mesh: Mesh, sp: bool, use_kernels: bool, dtype=None, device=None):
        super().__init__()
        D = cfg.head_dim
        self.h, self.hkv, self.D, self.eps = cfg.num_heads // mesh.tp, cfg.num_kv_heads // mesh.tp, D, cfg.rms_norm_eps
        kw = dict(mesh=mesh, sequence_parallel=sp, dtype=dtype, device=device)
        self.qkv = ColumnParallelLinear(cfg.hidden_size, [cfg.num_heads * D, cfg.num_kv_heads * D,
                                                          cfg.num_kv_heads * D], bias=cfg.qkv_bias, **kw)
        self.o_proj = RowParallelLinear(cfg.num_heads * D, cfg.hidden_size, **kw)
        # q/k norm: each rank normalises only its own heads, so the shared [D] weights get partial grads
        norm = partial(RMSNorm, D, cfg.rms_norm_eps, use_kernels, mesh.tp_group, dtype, device)
        self.q_norm, self.k_norm = (norm(), norm()) if cfg.qk_norm else (None, None)
        self.kern = _kernels() if use_kernels else None

    def forward(self, x, positions, cu_seqlens, max_seqlen, rope):
        qkv = self.qkv(x)                                                # [N, (h + 2 hkv) * D], all N tokens
        N, D = qkv.shape[0], self.D
        q, k, v = qkv.split([self.h * D, self.hkv * D, self.hkv * D], dim=-1)
        q, k, v = q.view(N, self.h, D), k.view(N, self.hkv, D), v.view(N, self.hkv, D)
        qw, kw = (n.w() if n is not None else None for n in (self.q_norm, self.k_norm))
        if self.kern is not None:
            q, k = self.kern.rope_qk_norm(q, k, positions, rope, qw, kw, self.eps)
            o = self.kern.flash_attn_varlen(q, k, v.contiguous(), cu_seqlens, max_seqlen, causal=True)
        else:
            if qw is not None:
                q, k = rms_norm_ref(q, qw, self.eps), rms_norm_ref(k, kw, self.eps)
            q, k = apply_rope_ref(q, positions, rope), apply_rope_ref(k, positions, rope)
            o = attention_varlen_ref(q, k, v, cu_seqlens)                # [N, h, D]
        return self.o_proj(o.reshape(N, self.h * D))                    # [N, Hd] (or [N/tp, Hd] under SP)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020, eq. 6): down(silu(x W_gate) * x W_up); gate/up fused column-parallel, down
    row-parallel: the intermediate [N, I/tp] never leaves the rank."""
    def __init__(self, cfg: ModelConfig, mesh: Mesh, sp: bool, use_kernels: bool, dtype=None, device=None):
        super().__init__()
        I = cfg.intermediate_size
        kw = dict(mesh=mesh, sequence_parallel=sp, dtype=dtype, device=device)
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, [I, I], **kw)
        self.down = RowParallelLinear(I, cfg.hidden_size, **kw)
        self.kern = _kernels() if use_kernels else None

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)                      # [N, I/tp] each
        return self.down(self.kern.swiglu(gate, up) if self.kern is not None else F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h)), each add deferred into the next norm (vLLM's
    layout): forward(x, .., residual) takes the last sublayer's output x NOT yet added, returns (mlp out, residual)."""
    def __init__(self, cfg, mesh, sp, use_kernels, dtype=None, device=None):
        super().__init__()
        g = mesh.tp_group if sp else None       # under SP the norms see 1/tp of the tokens: partial grads
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, use_kernels, g, dtype, device)
        self.attn = Attention(cfg, mesh, sp, use_kernels, dtype, device)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, use_kernels, g, dtype, device)
        self.mlp = MLP(cfg, mesh, sp, use_kernels, dtype, device)

    def forward(self, x, positions, cu_seqlens, max_seqlen, rope, residual=None):
        # the first layer's x is the stream itself; later layers fuse residual = x + residual into the norm
        y, residual = (self.input_norm(x), x) if residual is None else self.input_norm(x, residual)
        a = self.attn(y, positions, cu_seqlens, max_seqlen, rope)
        y, residual = self.post_attn_norm(a, residual)                  # h = a + residual
        return self.mlp(y), residual


class HFSlot(NamedTuple):
    """Where one HF tensor lives in this rank's parameters and how TP cut it. Transformer.hf_slots() drives
    loading, random init, state dicts, the optimizer's layout-free state and checkpoints."""
    param: nn.Parameter     # the nn.Parameter that holds (a piece of) the tensor
    kind: str               # 'rep' replicated | 'col' rows split over TP (a part of a fused column-parallel weight:
                            # q of qkv, up of gate_up) | 'row' columns split | 'vocab' rows split, padded to V_r
    offset: int             # 'col': the first row of this part in param (k starts after q's rows); else 0
    rows: int               # 'col': this part's rows on this rank (its out features / tp); else 0
    full_shape: tuple       # the shape of the full HF tensor

    def local(self, t=None):
        """The slice of t (default: the parameter; or a tensor of its shape, its grad) this HF tensor fills."""
        t = self.param if t is None else t
        return t.narrow(0, self.offset, self.rows) if self.kind == "col" else t


class Transformer(nn.Module):
    """The decoder, or one pipeline stage of it: layers [a, b) plus the embedding and/or the head.
    forward(x, positions, cu_seqlens, max_seqlen) -> hidden; x: input_ids [N] on the embedding's stage, else the
    previous stage's hidden. Returns the final norm's output on the head's stage, else the residual stream; under SP
    this rank's [N/tp, Hd] token shard. Parameters start EMPTY (load_hf, init_random, from_pretrained fill them)."""
    def __init__(self, cfg: ModelConfig, mesh: Mesh | None = None, *, layer_range=None, has_embedding=True,
                 has_head=True, sequence_parallel=False, use_kernels=True, activation_checkpointing=False,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.cfg, self.mesh = cfg, mesh or Mesh()
        check_layout(cfg, self.mesh.tp)
        self.sp, self.use_kernels = sequence_parallel and self.mesh.tp > 1, use_kernels and _kernels() is not None
        self.activation_checkpointing = activation_checkpointing
        device = device if device is not None else self.mesh.device
        a, b = layer_range if layer_range is not None else (0, cfg.num_layers)
        _require(0 <= a <= b <= cfg.num_layers, f"Transformer: layer_range {(a, b)} outside [0, {cfg.num_layers}]")
        self.layer_range, self.has_embedding, self.has_head = (a, b), has_embedding, has_head
        vocab = partial(VocabParallelEmbedding, cfg.vocab_size, cfg.hidden_size, self.mesh, self.sp, dtype, device)
        self.embed = vocab() if has_embedding else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.mesh, self.sp, self.use_kernels, dtype, device)
                                    for _ in range(a, b))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.use_kernels,
                            self.mesh.tp_group if self.sp else None, dtype, device) if has_head else None
        # tied: the head IS the embedding matrix, or on a last stage without it, a copy (PP chapter)
        self.lm_head = vocab() if has_head and not (cfg.tie_word_embeddings and has_embedding) else None
        # RoPE cos|sin table [max_pos, D], fp32 (more exact than HF's bf16 copy), not saved in checkpoints
        self.register_buffer("rope", rope_table(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta,
                                                device), persistent=False)

    # -- forward --
    def forward(self, x, positions, cu_seqlens, max_seqlen=None):
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())   # .max() syncs: pass it when you can
        N = positions.shape[0]
        _require(not self.sp or N % self.mesh.tp == 0, f"Transformer: sequence parallelism needs N % tp == 0; got "
                 f"N={N} packed tokens, tp={self.mesh.tp}: pack to a multiple of tp (e.g. add a filler sequence)")
        if self.has_embedding:
            x = self.embed(x)                                           # [N, Hd] (or [N/tp, Hd] under SP)
        res = None                                                      # x + res is the residual stream
        # checkpointing keeps each layer's inputs, recomputes the rest in backward (TP collectives too, in order)
        ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            run = partial(checkpoint, layer, use_reentrant=False) if ckpt else layer
            x, res = run(x, positions, cu_seqlens, max_seqlen, self.rope, res)
        if self.has_head:
            return self.norm(x, res)[0] if res is not None else self.norm(x)
        return x + res if res is not None else x                        # stages exchange the full stream

    def _head(self):
        """(this rank's REAL vocab rows of the LM head [n_valid, Hd], their first global id)."""
        m = self.lm_head if self.lm_head is not None else self.embed
        return m.weight[: m.n_valid], m.vocab_start

    def _head_input(self, hidden):
        return (gather_from_sp if self.sp else copy_to_tp)(hidden, self.mesh.tp_group)

    def logits(self, hidden):
        """[N, V] logits (model dtype), all-gathered over TP: N x V in memory, for tests; training uses loss."""
        m = self.lm_head if self.lm_head is not None else self.embed
        z = F.linear(self._head_input(hidden), m.weight)                # [N, V_r]; zero padding rows give 0
        # rank-major concatenation [rank 0's V_r | rank 1's | ..]: all padding sits at the end -> cut it
        return gather_last_dim(z, self.mesh.tp_group)[:, : self.cfg.vocab_size]

    def loss(self, hidden, labels, ignore_index=IGNORE_INDEX, rows=None):
        """(sum of token cross-entropies fp32, number of counted tokens int64): a sum, so the caller can divide by the
        whole step's token count (all micro-batches, DP ranks). labels [N]: the next tokens (next_token_labels). rows:
        optional int64 [n] positions of the labelled tokens (label_rows): the head runs on them only. Same sum, less
        work: in SFT about half the tokens are prompt, and the [N, Hd] x [Hd, V] head is the largest matmul."""
        W, start = self._head()
        h, n = self._head_input(hidden), (labels != ignore_index).sum()
        if rows is not None:
            h, labels = h.index_select(0, rows), labels.index_select(0, rows)     # [N, Hd] -> [n, Hd]
        total = vocab_parallel_cross_entropy(h, W, labels, start, self.mesh.tp_group, ignore_index, self.use_kernels)
        return total, n

    def logprobs(self, hidden, tokens, temperature=1.0, return_entropy=True):
        """(log p(tokens) [N], entropy [N] or None) in fp32, for RL: tokens [N] are the sampled next tokens."""
        W, start = self._head()
        return vocab_parallel_logprobs(self._head_input(hidden), W, tokens, start, self.mesh.tp_group,
                                       temperature, return_entropy, self.use_kernels)

    @classmethod
    def from_pretrained(cls, name_or_path, mesh: Mesh | None = None, dtype=torch.float32, **kw) -> "Transformer":
        """Build the model of an HF folder / hub id on this mesh and load this rank's shards of its weights."""
        cfg, state = load_hf_state(name_or_path)
        return cls(cfg, mesh, dtype=dtype, **kw).load_hf(state)

    # -- HF name <-> shard mapping --
    def hf_slots(self) -> dict[str, "HFSlot"]:
        """{hf_name: HFSlot} of this rank's tensors, in one order on every rank (state_dict_hf all-gathers them)."""
        c, tp, S = self.cfg, self.mesh.tp, HFSlot
        D, Hd, I, slots = c.head_dim, c.hidden_size, c.intermediate_size, {}
        if self.has_embedding:
            slots["model.embed_tokens.weight"] = S(self.embed.weight, "vocab", 0, 0, (c.vocab_size, Hd))
        for i, layer in zip(range(*self.layer_range), self.layers):
            p, at, mlp = f"model.layers.{i}.", layer.attn, layer.mlp
            off = 0                                     # q, k, v are consecutive row blocks of the qkv weight
            for name, rows in (("q", c.num_heads * D), ("k", c.num_kv_heads * D), ("v", c.num_kv_heads * D)):
                slots[f"{p}self_attn.{name}_proj.weight"] = S(at.qkv.weight, "col", off, rows // tp, (rows, Hd))
                if c.qkv_bias:
                    slots[f"{p}self_attn.{name}_proj.bias"] = S(at.qkv.bias, "col", off, rows // tp, (rows,))
                off += rows // tp
            slots[f"{p}self_attn.o_proj.weight"] = S(at.o_proj.weight, "row", 0, 0, (Hd, c.num_heads * D))
            if c.qk_norm:
                slots[f"{p}self_attn.q_norm.weight"] = S(at.q_norm.weight, "rep", 0, 0, (D,))
                slots[f"{p}self_attn.k_norm.weight"] = S(at.k_norm.weight, "rep", 0, 0, (D,))
            slots[f"{p}mlp.gate_proj.weight"] = S(mlp.gate_up.weight, "col", 0, I // tp, (I, Hd))
            slots[f"{p}mlp.up_proj.weight"] = S(mlp.gate_up.weight, "col", I // tp, I // tp, (I, Hd))
            slots[f"{p}mlp.down_proj.weight"] = S(mlp.down.weight, "row", 0, 0, (Hd, I))
            slots[f"{p}input_layernorm.weight"] = S(layer.input_norm.weight, "rep", 0, 0, (Hd,))
            slots[f"{p}post_attention_layernorm.weight"] = S(layer.post_attn_norm.weight, "rep", 0, 0, (Hd,))
        if self.has_head:
            slots["model.norm.weight"] = S(self.norm.weight, "rep", 0, 0, (Hd,))
            if self.lm_head is not None:
                name = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
                slots[name] = S(self.lm_head.weight, "vocab", 0, 0, (c.vocab_size, Hd))
        return slots

    def _shard_of(self, full, kind, rows):
        """Cut this TP rank's piece out of a full HF tensor."""
        r, tp = self.mesh.tp_rank, self.mesh.tp
        if kind == "col":                       # rows [r*rows, (r+1)*rows) of this part
            return full.narrow(0, r * rows, rows)
        if kind == "row":                       # columns [r*in/tp, ..)
            n = full.shape[1] // tp
            return full.narrow(1, r * n, n)
        if kind == "vocab":                     # rows [start, start+n_valid), zero padding rows after them
            V_r, start, n_valid = vocab_shard(full.shape[0], tp, r)
            return F.pad(full.narrow(0, start, n_valid), (0, 0, 0, V_r - n_valid))
        return full

    @torch.no_grad()
    def load_hf(self, source):
        """Copy HF weights into this rank's shards. source: an HF folder, or (name, tensor) pairs like
        load_hf_state(folder)[1]. Other stages' layers are skipped; unknown names, bad shapes, missing tensors raise.
        Before build_optimizer only: in bf16 the optimizer's fp32 master is a COPY, which its first step would publish
        back over these weights (after it: load_checkpoint with the optimizer and optimizer_state=False)."""
        _require(not any(hasattr(p, "main_grad") and p.dtype != torch.float32 for p in self.parameters()),
                 "load_hf / init_random: build_optimizer already ran on this model, and its fp32 master weights would "
                 "undo this load at the first step: load before build_optimizer, or use load_checkpoint(folder, model, "
                 "optimizer, optimizer_state=False)", RuntimeError)
        return self._copy_hf(source)

    @torch.no_grad()
    def _copy_hf(self, source):
        """load_hf's copy, without its check (load_checkpoint refreshes the optimizer's master right after)."""
        where = str(source) if isinstance(source, (str, Path)) else "the state dict"
        source = load_hf_state(source)[1] if isinstance(source, (str, Path)) else source
        slots, known, seen = self.hf_slots(), set(hf_tensor_names(self.cfg)), set()
        for name, full in source:
            if (slot := slots.get(name)) is None:
                _require(name in known or name.endswith("rotary_emb.inv_freq"), f"load_hf: unexpected tensor {name!r} "
                         f"in {where}; a {self.cfg.model_type} model with this config has no such weight")
                continue
            _require(tuple(full.shape) == slot.full_shape, f"load_hf: tensor {name!r} in {where} has shape "
                     f"{tuple(full.shape)}, expected {slot.full_shape} from the config")
            slot.local().copy_(self._shard_of(full, slot.kind, slot.rows))
            seen.add(name)
        missing = [n for n in slots if n not in seen]
        _require(not missing, f"load_hf: {len(missing)} tensor(s) missing from {where}: {missing[:5]}"
                 + (" ..." if len(missing) > 5 else ""))
        return self

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.02):
        """Layout-independent random init: each full HF tensor is drawn from a generator seeded by (seed, name), then
        sliced like a checkpoint, so tp=4 starts from tp=1's weights. Norms 1, biases 0, matrices N(0, std)."""
        def full_tensors():
            for name, slot in self.hf_slots().items():
                if name.endswith("norm.weight"):
                    yield name, torch.ones(slot.full_shape)
                elif name.endswith(".bias"):
                    yield name, torch.zeros(slot.full_shape)
                else:
                    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                    yield name, torch.randn(slot.full_shape, generator=g) * std
        return self.load_hf(full_tensors())

    @torch.no_grad()
    def state_dict_hf(self, grads=False) -> Iterator[tuple[str, torch.Tensor]]:
        """(hf_name, full tensor) for this stage, all-gathered over TP: a COLLECTIVE, every TP rank iterates it to the
        end. grads=True: the gradients (None as zeros). Tied: embed_tokens only (as HF's tied checkpoints)."""
        g = self.mesh.tp_group
        for name, slot in self.hf_slots().items():
            t = slot.param.grad if grads else slot.param
            local = slot.local(torch.zeros_like(slot.param) if t is None else t.detach())
            # col/vocab: rows of tp ranks in rank order [tp * rows, ..]; row: columns; rep: as is
            full = local if slot.kind == "rep" else all_gather(local, 1 if slot.kind == "row" else 0, g)
            yield name, full[: slot.full_shape[0]]                      # vocab: drop the padding rows


def hf_tensor_names(cfg: ModelConfig) -> list[str]:
    """Every tensor name an HF checkpoint of this config may have (lm_head.weight also when tied: some tied
    checkpoints store it). Spelled out, not read from a meta-device model (that imports torch's meta ops: ~2 s)."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names += [f"{p}self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [f"{p}self_attn.{x}_proj.bias" for x in "qkv"] if cfg.qkv_bias else []
        names += [f"{p}self_attn.{x}_norm.weight" for x in "qk"] if cfg.qk_norm else []
        names += [f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        names += [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"]
    return names


# ---- HF folders: config.json + safetensors in, and out -----------------------------------------------
def resolve_model_path(name_or_path) -> Path:
    """A local HF folder, or a hub id downloaded with huggingface_hub (config + safetensors + tokenizer)."""
    if (p := Path(name_or_path).expanduser()).is_dir():
        return p
    _require(str(name_or_path).count("/") == 1 and not p.exists(),
             f"model {str(name_or_path)!r}: not a folder and not a hub id like 'org/name'", FileNotFoundError)
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(name_or_path), allow_patterns=[
            "*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as e:   # offline, unknown repo, auth: one clear message (never a bare except)
        raise FileNotFoundError(f"model {str(name_or_path)!r}: no such local folder, and downloading it from "
                                f"the hub failed ({type(e).__name__}: {e}). Offline? Pass a local HF folder "
                                "(sft.py --model smollm2 converts the offline default into one)") from e


def load_hf_state(folder) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """(ModelConfig, iterator of (name, tensor)) of an HF folder: config.json + model.safetensors, or the
    shards listed in model.safetensors.index.json. Lazy: one tensor is read (mmap) at a time."""
    cfg_file, index = (folder := resolve_model_path(folder)) / "config.json", folder / "model.safetensors.index.json"
    _require(cfg_file.is_file(), f"load_hf_state: {cfg_file} is missing (not an HF model folder)", FileNotFoundError)
    try:                                        # json's errors and a missing key name no file: a cut download?
        cfg = ModelConfig.from_hf(json.loads((where := cfg_file).read_text()))
        files = (sorted(set(json.loads((where := index).read_text())["weight_map"].values())) if index.is_file()
                 else sorted(p.name for p in folder.glob("*.safetensors")))
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"load_hf_state: {where}: cut short or lacks a field ({type(e).__name__}: {e})") from None
    _require(files, f"load_hf_state: no *.safetensors in {folder}", FileNotFoundError)

    def tensors():
        from safetensors import SafetensorError, safe_open
        file_of = {}                            # a name in two files (a stale shard): refused, never last-wins
        for f in files:
            try:                                # a cut download: the header promises more bytes than there are
                with safe_open(str(folder / f), framework="pt") as sf:
                    for name in sf.keys():
                        _require(file_of.setdefault(name, f) == f, f"load_hf_state: tensor {name!r} is in both "
                                 f"{file_of[name]} and {f} in {folder}: delete the stale one")
                        yield name, sf.get_tensor(name)
            except SafetensorError as e:
                raise ValueError(f"load_hf_state: {folder / f} is not a readable safetensors file ({e})") from None
    return cfg, tensors()


def save_hf(model: Transformer, folder, dtype: str = "bfloat16"):
    """Write an HF folder (config.json + model.safetensors) of a tp-sharded single-stage model: a collective (EVERY
    rank calls it); one rank writes, to a temp folder renamed at the end; a barrier: no rank returns before it is."""
    from safetensors.torch import save_file
    # a pipeline stage holds only its layers: every stage's writer would put a partial model in the same folder
    _require(model.mesh.pp == 1, f"save_hf: the model is one pipeline stage of pp={model.mesh.pp}; save a "
             f"checkpoint (save_checkpoint) and export it with merge.py, which joins the stages")
    tensors = {n: t.to(getattr(torch, dtype)).contiguous() for n, t in model.state_dict_hf()}   # gathers over tp
    # ONE writer: dp replicas hold the same weights, and two writers' rmtree + rename of one folder race
    if model.mesh.tp_rank == 0 and model.mesh.dp_rank == 0:
        tmp = (folder := Path(folder)).with_name(f"{folder.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model.cfg.to_hf(dtype), indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    model.mesh.barrier()


# ==== The chapters (see the module docstring): each adds one idea and reads on its own after the mesh ====

# ---- mesh ------------------------------------------------------------------------------------------
# Rank layout: rank = (pp_rank * dp + dp_rank) * tp + tp_rank, i.e. tp varies fastest, then dp, then pp.
# Why: tensor parallelism talks most (two all-reduces per layer, on the critical path), so its ranks
# are neighbours on one node (NVLink); data parallelism talks once per step (gradients, overlappable);
# pipeline parallelism sends one activation per micro-batch point-to-point and tolerates the slowest
# links, so it is outermost and stages can sit on different nodes. Megatron's default order is the same.
#   W=8, tp=2, pp=2, dp=2:   pp 0: dp 0 -> ranks {0, 1}, dp 1 -> {2, 3};   pp 1: {4, 5}, {6, 7}
#   tp groups {0,1} {2,3} {4,5} {6,7};  dp groups {0,2} {1,3} {4,6} {5,7};  pp groups {0,4} {1,5} {2,6} {3,7}
#   dp_tp groups (one pipeline stage: ZeRO shards and grad norms) {0,1,2,3} {4,5,6,7}

def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when run as plain python."""
    try:
        rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    except ValueError as e:
        raise ValueError(f"dist_env: RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from None
    _require(0 <= rank < world, f"dist_env: RANK={rank} must lie in [0, WORLD_SIZE={world})")
    return rank, world, local


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> torch.device:
    """Join torchrun's process group (once) and return this rank's device (backend: nccl on CUDA, else gloo). The
    timeout turns a rank that never shows up, or a mismatched collective, into an error instead of a hang. World size
    1 initialises nothing: single-process code makes zero dist calls."""
    rank, world, local = dist_env()
    cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return device


# Collectives on a group that may be None (one rank): then a no-op. New tensors out, except all_reduce_ (in place).

def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_(t, group, op: str = "sum"):
    """In-place all-reduce (op: sum | max | min) over group; returns t."""
    if _size(group) > 1:
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()), group=group)
    return t


_all_gather_base = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_base = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _along(coll, t, dim, group, n_out):
    """Run coll(out, x, group), a collective on dim 0, along dim of t instead: out has n_out rows there."""
    x = t.movedim(dim, 0).contiguous()
    out = x.new_empty((n_out, *x.shape[1:]))
    coll(out, x, group=group)
    return out.movedim(0, dim)


def all_gather(t, dim, group):
    """Concatenate every rank's t along dim (rank order): [.., n, ..] -> [.., W*n, ..]."""
    W = _size(group)
    return t if W == 1 else _along(_all_gather_base, t, dim, group, W * t.shape[dim])


def reduce_scatter(t, dim, group):
    """Sum t over the group and keep this rank's 1/W slice along dim: [.., W*n, ..] -> [.., n, ..]."""
    W = _size(group)
    if W > 1 and t.shape[dim] % W:
        raise ValueError(f"reduce_scatter: dim {dim} of size {t.shape[dim]} is not divisible by {W} ranks")
    return t if W == 1 else _along(_reduce_scatter_base, t, dim, group, t.shape[dim] // W)


class Mesh:
    """The (dp, pp, tp) rank grid and its process groups, passed around as a value (no globals): Mesh.build(tp, pp)
    under torchrun (dp = W / (tp * pp)), or Mesh() for one process (no process group). Groups: tp, dp, pp, dp_tp (one
    pipeline stage: ZeRO shards, grad norm); a one-rank group is None, so its collectives are no-ops."""
    KINDS = ("tp", "dp", "pp", "dp_tp")

    def __init__(self, tp: int = 1, pp: int = 1, dp: int = 1, rank: int = 0, device=None, timeout_s: float = 600.0):
        for name, n in (("tp", tp), ("pp", pp), ("dp", dp)):
            _require(isinstance(n, int) and n >= 1, f"Mesh: {name} must be a positive int, got {n!r}")
        self.tp, self.pp, self.dp, self.world, self.rank = tp, pp, dp, tp * pp * dp, rank
        _require(0 <= rank < self.world, f"Mesh: rank {rank} outside the grid of {self.world} ranks")
        self.device = torch.device(device if device is not None else "cpu")
        self._groups = {}                                      # kind -> ProcessGroup, filled by Mesh.build
        self.timeout = datetime.timedelta(seconds=timeout_s)   # of every process group Mesh.build makes
        # coordinates from rank = (pp_rank * dp + dp_rank) * tp + tp_rank
        self.tp_rank, self.dp_rank, self.pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)

    def rank_of(self, dp_rank: int = 0, pp_rank: int = 0, tp_rank: int = 0) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def all_group_ranks(self, kind: str) -> list[list[int]]:
        """Every group of one kind as rank lists, in a fixed order (pure arithmetic, no dist calls)."""
        r, T, P, D = self.rank_of, range(self.tp), range(self.pp), range(self.dp)
        return {"tp": [[r(d, p, t) for t in T] for p in P for d in D],
                "dp": [[r(d, p, t) for d in D] for p in P for t in T],
                "pp": [[r(d, p, t) for p in P] for d in D for t in T],
                "dp_tp": [[r(d, p, t) for d in D for t in T] for p in P]}[kind]

    def size(self, kind: str) -> int:
        return {"tp": self.tp, "dp": self.dp, "pp": self.pp, "dp_tp": self.dp * self.tp}[kind]

    def group(self, kind: str):
        """This rank's ProcessGroup of that kind, or None when the group has one rank."""
        if self.size(kind) == 1:
            return None
        _require(kind in self._groups, f"Mesh: no process group {kind!r}; build the mesh with Mesh.build(...) "
                 "under torchrun (Mesh(...) alone only does rank arithmetic)", RuntimeError)
        return self._groups[kind]

    tp_group = property(lambda self: self.group("tp"))
    dp_group = property(lambda self: self.group("dp"))
    pp_group = property(lambda self: self.group("pp"))
    is_first_stage = property(lambda self: self.pp_rank == 0)
    is_last_stage = property(lambda self: self.pp_rank == self.pp - 1)

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, dp: int | None = None, backend: str | None = None,
              timeout_s: float = 600.0) -> "Mesh":
        """The mesh of this torchrun job: joins the process group if needed, creates every group; dp=None infers
        W / (tp * pp). timeout_s applies to EVERY group (a subgroup would get torch's 30-minute default): a collective
        that waits longer, on a stuck or dead rank, raises."""
        rank, world, _ = dist_env()
        if dist.is_initialized():                  # someone joined already (tests, notebooks): trust it
            rank, world = dist.get_rank(), dist.get_world_size()
        _require(world % (tp * pp) == 0, f"world size {world} is not divisible by --tp {tp} x --pp {pp} = {tp * pp}: "
                 f"start a multiple of {tp * pp} processes (torchrun --nproc_per_node) or change --tp/--pp")
        dp = world // (tp * pp) if dp is None else dp
        _require(tp * pp * dp == world, f"--tp {tp} x --pp {pp} x dp {dp} = {tp * pp * dp} != world size {world}")
        mesh = cls(tp, pp, dp, rank, init_distributed(backend, timeout_s), timeout_s=timeout_s)
        for kind in cls.KINDS:
            if mesh.size(kind) > 1:                     # same decision on every rank: skipping is safe
                mesh._new_groups(kind, mesh.all_group_ranks(kind))
        return mesh

    def _new_groups(self, kind: str, rank_lists: list[list[int]]):
        """A process group per rank list; this rank's becomes group `kind`. EVERY rank calls it for EVERY list,
        in the same order, even lists it is not in: group creation is a collective over the default group."""
        for ranks in rank_lists:
            g = dist.new_group(ranks, timeout=self.timeout)
            if self.rank in ranks:
                self._groups[kind] = g

    # collectives by group name: no-ops on a group of one rank
    def all_reduce_(self, t, kind="tp", op="sum"):
        return all_reduce_(t, self.group(kind), op)

    def all_gather(self, t, dim=0, kind="tp"):
        return all_gather(t, dim, self.group(kind))

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def destroy(self):
        """Leave the process group at the end of a job, after a barrier (no rank tears down while another
        talks). Left to interpreter exit, a finished gloo job ends with an occasional SIGABRT."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def __repr__(self):
        return (f"Mesh(rank={self.rank}/{self.world}: tp {self.tp_rank}/{self.tp}, dp {self.dp_rank}/{self.dp}, "
                f"pp {self.pp_rank}/{self.pp}, device={self.device})")


def check_layout(cfg: ModelConfig, tp: int = 1, pp: int = 1):
    """Refuse a (tp, pp) this model cannot be cut into, from the config alone, before building anything. TP splits whole
    heads (kv heads too: no replication when tp > Hkv), MLP columns and vocab rows; PP needs a layer per stage."""
    c, cuts = cfg, (("attention heads", cfg.num_heads), ("kv heads", cfg.num_kv_heads),
                    ("MLP columns (intermediate_size)", cfg.intermediate_size))
    for name, n in cuts:
        if n % tp:
            ok = [t for t in range(1, c.num_kv_heads + 1) if all(m % t == 0 for _, m in cuts)]
            raise ValueError(f"--tp {tp} must divide the model's {n} {name} ({c.num_heads} heads, {c.num_kv_heads} "
                             f"kv heads, intermediate_size {c.intermediate_size}); this model takes --tp in {ok}")
    vocab_shard(c.vocab_size, tp, 0)                   # raises when the last TP rank would own no vocab row
    _require(pp <= c.num_layers, f"--pp {pp}: the model has {c.num_layers} layers and every pipeline stage needs "
             f"at least one; use --pp <= {c.num_layers}")


# ---- tensor parallelism ----------------------------------------------------------------------------
# Megatron-LM (Shoeybi et al. 2019, sec. 3): for an MLP Y = GeLU(X A) B, A split by columns and B by rows, each rank
# computes GeLU(X A_r) B_r alone and ONE all-reduce sums the partials. Two conjugate operators in autograd:
#   f: identity forward, all-reduce backward  (before column-parallel: X is replicated, each rank's dL/dX partial)
#   g: all-reduce forward, identity backward  (after a row-parallel layer: sums the partial products)
# Sequence parallelism (Korthikanti et al. 2022, sec. 4.2.2) keeps the activations BETWEEN the parallel regions
# (norms, residual adds) split along the token dim: g becomes a reduce-scatter and f an all-gather (same bytes moved:
# an all-reduce IS a reduce-scatter + an all-gather), and the norm activations take 1/tp of the memory.

class _Comm(torch.autograd.Function):
    """A communication op and its conjugate: forward(x) = fwd(x, group), backward(g) = bwd(g, group)."""
    @staticmethod
    def forward(ctx, x, group, fwd, bwd):
        ctx.group, ctx.bwd = group, bwd
        return fwd(x, group)

    @staticmethod
    def backward(ctx, g):
        return ctx.bwd(g, ctx.group), None, None, None


def _comm(fwd, bwd):
    """op(x, group): _Comm with this fwd/bwd pair, or x itself when the group has one rank (None): no node."""
    return lambda x, group: x if _size(group) == 1 else _Comm.apply(x, group, fwd, bwd)


def _own_last_dim(g, group):
    """This rank's slice of the last dim of g [.., W*n] -> [.., n] (the backward of an all-gather there)."""
    n = g.shape[-1] // _size(group)
    return g.narrow(-1, dist.get_rank(group) * n, n).contiguous()


# f: identity forward, all-reduce backward (of a copy: add's backward may hand one grad to both inputs)
copy_to_tp = _comm(lambda x, grp: x.view_as(x), lambda g, grp: all_reduce_(g.clone(), grp))
# g: all-reduce forward (of a copy: a Function must not modify its input), identity backward
reduce_from_tp = _comm(lambda x, grp: all_reduce_(x.clone(), grp), lambda g, grp: g)
# f and g under SP: all-gather the token dim [N/tp, ..] -> [N, ..] / reduce-scatter [N, ..] -> [N/tp, ..]
gather_from_sp = _comm(lambda x, grp: all_gather(x, 0, grp), lambda g, grp: reduce_scatter(g, 0, grp))
scatter_to_sp = _comm(lambda x, grp: reduce_scatter(x, 0, grp), lambda g, grp: all_gather(g, 0, grp))
# column-parallel outputs -> full (logits): all-gather the last dim, keep this rank's slice backward
gather_last_dim = _comm(lambda x, grp: all_gather(x, -1, grp), _own_last_dim)


class ColumnParallelLinear(nn.Module):
    """y = x A^T with A's rows (out features) split over TP. out_parts: logical outputs fused into one matmul, e.g.
    [H*D, Hkv*D, Hkv*D] for q/k/v or [I, I] for gate/up, EACH split separately: rank r holds [q_r; k_r; v_r], its own
    heads of all three (splitting the concatenation would give rank 0 all of q, none of v). Input: replicated [N, in]
    (f operator), or under SP this rank's [N/tp, in] shard, all-gathered here. Output: [N, sum(out_parts)/tp]."""
    def __init__(self, in_features, out_parts, bias=False, mesh=None, sequence_parallel=False, dtype=None, device=None):
        super().__init__()
        mesh = mesh or Mesh()
        self.out_parts = [out_parts] if isinstance(out_parts, int) else list(out_parts)
        bad = [p for p in self.out_parts if p % mesh.tp]
        _require(not bad, f"ColumnParallelLinear: out features {bad} not divisible by tp={mesh.tp}")
        self.local_parts = [p // mesh.tp for p in self.out_parts]
        self.group, self.sp, n = mesh.tp_group, sequence_parallel, sum(self.local_parts)
        self.weight = nn.Parameter(torch.empty(n, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(n, dtype=dtype, device=device)) if bias else None

    def forward(self, x):
        x = gather_from_sp(x, self.group) if self.sp else copy_to_tp(x, self.group)
        return F.linear(x, self.weight, self.bias)                       # [N, sum(local_parts)]


class RowParallelLinear(nn.Module):
    """y = x A^T with A's columns (in features) split over TP: the input is already split (column-parallel output), each
    rank's partial [N, out] is summed by one all-reduce (SP: reduce-scatter to [N/tp, out]), the bias added ONCE."""
    def __init__(self, in_features, out_features, bias=False, mesh=None, sequence_parallel=False,
                 dtype=None, device=None):
        super().__init__()
        mesh = mesh or Mesh()
        _require(in_features % mesh.tp == 0,
                 f"RowParallelLinear: in features {in_features} not divisible by tp={mesh.tp}")
        self.group, self.sp = mesh.tp_group, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, in_features // mesh.tp, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x):
        y = F.linear(x, self.weight)                                     # [N, out]: a partial sum
        y = scatter_to_sp(y, self.group) if self.sp else reduce_from_tp(y, self.group)
        if self.bias is not None:
            # under SP each rank adds the bias to its own tokens only: its grad is partial -> f sums it
            y = y + (copy_to_tp(self.bias, self.group) if self.sp else self.bias)
        return y


def vocab_shard(vocab_size: int, tp: int, tp_rank: int) -> tuple[int, int, int]:
    """(V_r, vocab_start, n_valid): the vocab rows of rank tp_rank. PADDING RULE: V is padded to a multiple of tp,
    V_pad = ceil(V / tp) * tp, so every rank holds V_r = V_pad / tp rows (equal shapes for all-gathers); the padded
    rows (last ranks) are zeros that no id looks up, excluded from logits and loss: real rows [start, start+n_valid)."""
    V_r = -(-vocab_size // tp)
    _require((tp - 1) * V_r < vocab_size,
             f"vocab_shard: vocab {vocab_size} is too small for tp={tp}: the last rank would own no row")
    start = tp_rank * V_r
    return V_r, start, min(V_r, vocab_size - start)


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocab rows split over TP: each rank looks up the ids in its slice, writes zeros
    for the others, and an all-reduce (a reduce-scatter to [N/tp, Hd] under SP) assembles the rows."""
    def __init__(self, vocab_size, dim, mesh=None, sequence_parallel=False, dtype=None, device=None):
        super().__init__()
        mesh = mesh or Mesh()
        self.vocab_size, self.group, self.sp = vocab_size, mesh.tp_group, sequence_parallel
        self.V_r, self.vocab_start, self.n_valid = vocab_shard(vocab_size, mesh.tp, mesh.tp_rank)
        self.weight = nn.Parameter(torch.empty(self.V_r, dim, dtype=dtype, device=device))

    def forward(self, ids):
        # An id outside [0, V) is a data bug: tp = 1 fails on it (F.embedding), but at tp > 1 every rank masks it as
        # another's and the all-reduce sums a SILENT zero row. Host ids (CPU, gloo): an exact check naming the id. On
        # GPU, reading an answer would SYNC the host every forward: a device-side assert instead, as F.embedding's.
        if ids.device.type == "cpu" and (bad := ((ids < 0) | (ids >= self.vocab_size)).nonzero()).numel():
            raise ValueError(f"input_ids[{int(bad[0])}] = {int(ids[bad[0]])} is outside the vocabulary [0, vocab_size "
                             f"{self.vocab_size}) ({len(bad)} such ids): a tokenizer not made for this model?")
        if ids.is_cuda and self.group is not None:
            torch._assert_async(((ids >= 0) & (ids < self.vocab_size)).all(), f"an id outside [0, {self.vocab_size})")
        if self.group is None:                                           # tp = 1: a plain lookup
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.n_valid)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)      # [N, Hd]
        y = y.masked_fill(outside[:, None], 0.0)                         # zero rows: another rank owns them
        return scatter_to_sp(y, self.group) if self.sp else reduce_from_tp(y, self.group)


def _vp_hooks(group, vocab_start):
    """The kernels.py vocab-parallel hooks (see its VocabParallel): in-place MAX / SUM over the TP group."""
    return None if group is None else {"vocab_start": vocab_start, "all_reduce_sum": lambda t: all_reduce_(t, group),
                                       "all_reduce_max": lambda t: all_reduce_(t, group, "max")}


def _softmax_stats(hidden, weight, ids, vocab_start, group, inv_temp):
    """Vocab-parallel softmax statistics, torch path, differentiable (Shoeybi et al. 2019, sec. 3): rank r has logits
    z[:, V_r slice]; the global lse = M + log sum_r sum_j exp(z_rj - M), M = max over all ranks (all-reduce MAX, no
    gradient: the shift cancels). Each all-reduce SUM is the g operator (identity backward), exact since every rank
    computes the same loss. Returns (lse [N], target logit [N] (0 where ids is outside V), e = exp(z - M), z)."""
    z = (hidden @ weight.t()).float() * inv_temp                          # [N, V_r] fp32
    M = all_reduce_(z.max(-1).values.detach(), group, "max")              # [N] global max
    e = torch.exp(z - M[:, None])                                         # [N, V_r]
    lse = M + torch.log(reduce_from_tp(e.sum(-1), group))                 # [N]
    local = ids.long() - vocab_start
    hit = (local >= 0) & (local < weight.shape[0])
    tgt = torch.where(hit, z.gather(1, local.clamp(0, weight.shape[0] - 1)[:, None])[:, 0], 0.0)
    return lse, reduce_from_tp(tgt, group), e, z


def vocab_parallel_cross_entropy(hidden, weight, labels, vocab_start=0, group=None,
                                 ignore_index=IGNORE_INDEX, use_kernels=True):
    """SUM over tokens of -log softmax(hidden @ weight^T)[label], never gathering the [N, V] logits. hidden [N, Hd]:
    the LM head input, which THE CALLER MUST PASS THROUGH copy_to_tp (or gather_from_sp): each rank's dL/dhidden is
    only its vocab slice's share. weight [V_valid_r, Hd]: this rank's REAL rows (a zero padding row would still add
    e^0 to the softmax), global rows [vocab_start, ..). labels [N]: global ids, ignore_index rows add 0. Returns a
    0-dim fp32 loss, the same on every rank. use_kernels: kernels.fused_linear_cross_entropy."""
    k = _kernels() if use_kernels else None
    if k is not None:
        return k.fused_linear_cross_entropy(hidden, weight, labels, ignore_index, reduction="sum",
                                            vocab_parallel=_vp_hooks(group, vocab_start))
    valid = labels != ignore_index
    lse, tgt, _, _ = _softmax_stats(hidden, weight, torch.where(valid, labels, -1), vocab_start, group, 1.0)
    return torch.where(valid, lse - tgt, 0.0).sum()


def vocab_parallel_logprobs(hidden, weight, tokens, vocab_start=0, group=None, temperature=1.0,
                            return_entropy=True, use_kernels=True):
    """(log p(tokens) [N] fp32, entropy [N] fp32 or None) under softmax(hidden @ weight^T / temperature),
    vocab-parallel like vocab_parallel_cross_entropy (same contract on hidden and weight). Entropy:
    H = -sum_j p_j log p_j = lse - sum_j p_j z_j, with sum_j p_j z_j = sum_r sum_j e_rj z_rj / S."""
    k = _kernels() if use_kernels else None
    if k is not None:
        return k.fused_linear_logprobs(hidden, weight, tokens, temperature, return_entropy,
                                       vocab_parallel=_vp_hooks(group, vocab_start))
    lse, tgt, e, z = _softmax_stats(hidden, weight, tokens, vocab_start, group, 1.0 / temperature)
    if not return_entropy:
        return tgt - lse, None
    S, EZ = reduce_from_tp(e.sum(-1), group), reduce_from_tp((e * z).sum(-1), group)      # [N] each
    return tgt - lse, lse - EZ / S


# ---- pipeline parallelism --------------------------------------------------------------------------
# Pipeline parallelism (GPipe, Huang et al. 2019; PipeDream-Flush / 1F1B, Narayanan et al. 2021) cuts the L decoder
# layers into pp contiguous stages, one per pp rank; a step's batch is cut into M micro-batches that flow through the
# stages so that several stages work at once. Each micro-batch is a packed varlen batch (input_ids[N], positions[N],
# cu_seqlens[B+1], labels[N]) whose N differs from the next one's, so every activation travels with a shape header.
#
# Schedules, time flowing right (pp = 4, M = 6; F3 / B3: forward / backward of micro-batch 3; a real B takes ~2 F):
#   AFAB (all forward, all backward; GPipe with a flush): the naive reference; holds ALL M micro-batches' activations.
#     stage 0: F0 F1 F2 F3 F4 F5 .. .. .. .. .. .. B0 B1 B2 B3 B4 B5
#     stage 1: .. F0 F1 F2 F3 F4 F5 .. .. .. .. B0 B1 B2 B3 B4 B5 ..
#     stage 2: .. .. F0 F1 F2 F3 F4 F5 .. .. B0 B1 B2 B3 B4 B5 .. ..
#     stage 3: .. .. .. F0 F1 F2 F3 F4 F5 B0 B1 B2 B3 B4 B5 .. .. ..
#
#   1F1B (PipeDream-Flush): stage r runs w = pp - r - 1 warm-up forwards, alternates one forward and one backward,
#   then drains w backwards: AFAB's bubble ((pp-1)/(M+pp-1) of the step idle), but w + 1 <= pp micro-batches held.
#     stage 0: F0 F1 F2 F3 .. .. .. B0 F4 B1 F5 B2 .. B3 .. B4 .. B5
#     stage 1: .. F0 F1 F2 .. .. B0 F3 B1 F4 B2 F5 B3 .. B4 .. B5 ..
#     stage 2: .. .. F0 F1 .. B0 F2 B1 F3 B2 F4 B3 F5 B4 .. B5 .. ..
#     stage 3: .. .. .. F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 .. .. ..
# Both run the backwards in micro-batch order 0..M-1: the same accumulation order, so bit-identical gradients.
#
# Tied embeddings (Megatron's approach): the last stage holds its OWN copy of the embedding matrix for the LM head
# (filled from model.embed_tokens.weight). The shared matrix's gradient is the sum of the copies' gradients, so after
# the backward they are all-reduced over an "embedding group" {first, last stage} per (dp, tp) and take the same update.

# -- stage partition --
# Cost model, forward FLOPs per token (multiply-add = 2 FLOPs; a backward costs ~2x its forward, so RATIOS hold):
#   decoder layer = 2*Hd*(H*D + 2*Hkv*D)  q/k/v projections
#                 + 2*H*D*Hd              o projection
#                 + 2*3*Hd*I              SwiGLU gate, up, down
#                 + 2*H*D*S               attention: q.k, p.v, 2*D FLOPs each over S/2 keys (S: typical length)
#   LM head       = 2*Hd*V                (+ the softmax of the loss, O(V), ignored)
#   embedding     = Hd                    a row lookup: ~0 FLOPs but a memory read; charged lightly
# In "layer equivalents" (cost / layer cost), Qwen3-0.6B (Hd 1024, V 151936, S 2048) has a head worth ~8 layers: a
# 4-stage split of its 28 layers gives the last stage 1 layer, not 7 (checkpointing's recompute: ignored).

def stage_costs(cfg: ModelConfig, seq_len: int = 2048) -> tuple[float, float, float]:
    """(embedding, decoder layer, head) forward FLOPs per token, per the cost model above."""
    Hd, D, H, Hkv, I = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    layer = 2 * Hd * (H * D + 2 * Hkv * D) + 2 * H * D * Hd + 2 * 3 * Hd * I + 2 * H * D * seq_len
    return float(Hd), float(layer), float(2 * Hd * cfg.vocab_size)


def stage_layers(cfg: ModelConfig, pp: int, seq_len: int = 2048) -> list[tuple[int, int]]:
    """Split layers [0, L) into pp contiguous stages [(a0, b0), (a1, b1), ..], each >= 1 layer, minimising the most
    expensive stage's cost, where stage 0 also pays for the embedding and stage pp-1 for the final norm + LM head +
    loss (cost model above). Exact: a DP over split points, O(pp * L^2). Ties give the LATER stages more layers: under
    1F1B stage r keeps pp - r micro-batches in flight, so the first stages are short of memory."""
    L = cfg.num_layers
    _require(isinstance(pp, int) and pp >= 1, f"stage_layers: pp must be a positive int, got {pp!r}")
    _require(pp <= L, f"stage_layers: pp={pp} pipeline stages but the model has only {L} layers; every stage "
             f"needs at least one layer (use pp <= {L})")
    emb, layer, head = stage_costs(cfg, seq_len)
    emb, head = emb / layer, head / layer                    # layer equivalents: a decoder layer costs 1

    def cost(s, a, b):                                       # stage s holding layers [a, b)
        return (b - a) + (emb if s == 0 else 0.0) + (head if s == pp - 1 else 0.0)
    # best[s][i]: the smallest possible max-cost of putting layers [0, i) into stages 0..s-1
    best = [[float("inf")] * (L + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for s in range(1, pp + 1):
        for i in range(s, L + 1):
            best[s][i] = min(max(best[s - 1][a], cost(s - 1, a, i)) for a in range(s - 1, i))
    bound = best[pp][L] * (1 + 1e-12)                        # the optimum (float slack for the ties)
    # walk back from the last stage, each taking as many layers as the optimum allows (the tie rule)
    stages, b = [], L
    for s in range(pp, 0, -1):
        a = next(a for a in range(s - 1, b) if cost(s - 1, a, b) <= bound and best[s - 1][a] <= bound)
        stages.append((a, b))
        b = a
    return stages[::-1]


# -- building this rank's stage --
def build_embedding_groups(mesh: Mesh):
    """Create the tied-embedding groups {rank_of(d, 0, t), rank_of(d, pp-1, t)} for every (dp d, tp t); return this
    rank's (None on middle stages, or pp == 1). EVERY rank calls it in one order (a collective); cached on the mesh."""
    if "embedding" in mesh._groups or mesh.pp == 1:
        return mesh._groups.get("embedding")
    _require(dist.is_initialized(), "build_embedding_groups: no process group; build the mesh with Mesh.build(...) "
             "under torchrun (Mesh(pp=...) alone only does rank arithmetic)", RuntimeError)
    mesh._groups["embedding"] = None                         # stays None on the middle stages
    mesh._new_groups("embedding", [[mesh.rank_of(d, 0, t), mesh.rank_of(d, mesh.pp - 1, t)]
                                   for d in range(mesh.dp) for t in range(mesh.tp)])
    return mesh._groups["embedding"]


def build_stage(cfg: ModelConfig, mesh: Mesh, partition: list[tuple[int, int]] | None = None,
                seq_len: int = 2048, **transformer_kwargs) -> Transformer:
    """This rank's pipeline stage: layers stage_layers(cfg, pp)[pp_rank] (or partition[pp_rank]), the embedding on the
    first stage, final norm + head on the last; EMPTY like Transformer (init_random / load_hf fill it). A collective."""
    check_layout(cfg, mesh.tp, mesh.pp)
    partition = partition or stage_layers(cfg, mesh.pp, seq_len)
    _require(len(partition) == mesh.pp, f"build_stage: partition has {len(partition)} stages, the mesh pp={mesh.pp}")
    build_embedding_groups(mesh)
    return Transformer(cfg, mesh, layer_range=partition[mesh.pp_rank], has_embedding=mesh.is_first_stage,
                       has_head=mesh.is_last_stage, **transformer_kwargs)


def sync_tied_embedding_grads(stage: Transformer, dp: "DataParallel | None" = None):
    """Sum the two tied copies' gradients over the embedding group after the step's last backward (pipeline_step does).
    With an optimizer's dp: its owned fp32 shards, after the dp reduction (lone buckets: they line up)."""
    if not stage.cfg.tie_word_embeddings or stage.mesh.pp == 1 or not (stage.has_embedding or stage.has_head):
        return                              # untied, one stage (the head IS the embedding), a middle stage
    w = stage.embed.weight if stage.has_embedding else stage.lm_head.weight     # this stage's copy
    _require("embedding" in stage.mesh._groups, "sync_tied_embedding_grads: no embedding group on this mesh; build "
             "the stage with build_stage(...) (or call build_embedding_groups(mesh) on every rank)", RuntimeError)
    if dp is not None:
        dp.finish_grad_sync()
    elif w.grad is None:                    # a stage that saw no token still joins the collective
        w.grad = torch.zeros_like(w)
    all_reduce_(dp.owned_grad(w) if dp is not None else w.grad, stage.mesh._groups["embedding"])


# -- point-to-point --
# Activations go from pp rank r to r+1, gradients from r+1 back to r, between ranks of the same (dp, tp) coordinate
# (each TP rank sends its own copy, or its own [N/tp, Hd] token shard under SP). N varies per micro-batch, so an
# activation is preceded by an int64 header [8] = [ndim, *shape, 0 ..]; a gradient has the shape of the activation the
# receiver sent. DEADLOCK AVOIDANCE: every exchange is one dist.batch_isend_irecv of all its sends and receives, so two
# neighbours that send to each other at once (1F1B's steady state: r sends activation k+1 while r+1 sends gradient k)
# cannot both block in send. Headers go in their own batch BEFORE the tensors (the receiver must allocate), on both
# sides, so the sequences of batches stay in step. The ops run on the pp group: its first use is pipeline_step's
# micro-batch count check, which all its ranks join (NCCL requires that of a first batched p2p).

_HEADER = 8


def _p2p(ops, group):
    """Run [(dist.isend | dist.irecv, tensor, global peer rank)] as one batch and wait for all of it."""
    for work in dist.batch_isend_irecv([dist.P2POp(op, t, peer, group) for op, t, peer in ops]):
        work.wait()


def send_activation(t, dst, group=None, recv_grad_of=None):
    """Send the activation t [N, Hd] (any shape) to global rank dst: header, then tensor. With recv_grad_of (1F1B's
    steady state) also receive from dst, in the same batch, the gradient of that EARLIER activation; return it."""
    _require(t.dim() < _HEADER, f"send_activation: {t.dim()}-d tensor; at most {_HEADER - 1} dims fit the header")
    header = torch.tensor([t.dim(), *t.shape] + [0] * (_HEADER - 1 - t.dim()), dtype=torch.int64, device=t.device)
    _p2p([(dist.isend, header, dst)], group)
    g = None if recv_grad_of is None else torch.empty_like(recv_grad_of)
    _p2p([(dist.isend, t.contiguous(), dst)] + ([(dist.irecv, g, dst)] if g is not None else []), group)
    return g


def recv_activation(src, hidden, dtype, device=None, group=None, send_grad_back=None):
    """Receive an activation of any shape [.., hidden] from global rank src. With send_grad_back (1F1B's
    steady state) also send that gradient (of an earlier activation) to src in the same batch."""
    h = torch.empty(_HEADER, dtype=torch.int64, device=device)
    _p2p([(dist.irecv, h, src)], group)
    h = h.tolist()                                           # .tolist() syncs the GPU (once per micro-batch)
    shape = tuple(h[1:1 + h[0]])                             # h = [ndim, *shape, 0 ..]
    _require(shape and shape[-1] == hidden, f"recv_activation: rank {src} sent shape {shape}, expected [.., "
             f"{hidden}] (hidden size); are both stages built from the same config?", RuntimeError)
    x = torch.empty(shape, dtype=dtype, device=device)
    g = send_grad_back
    _p2p([(dist.irecv, x, src)] + ([(dist.isend, g.contiguous(), src)] if g is not None else []), group)
    return x


def send_grad(g, dst, group=None):
    """Send dL/d(activation) back to the stage that sent the activation (global rank dst)."""
    _p2p([(dist.isend, g.contiguous(), dst)], group)


def recv_grad(src, like, group=None):
    """Receive dL/d(like) from the next stage (global rank src); `like` is the activation this rank sent there."""
    g = torch.empty_like(like)
    _p2p([(dist.irecv, g, src)], group)
    return g


# -- schedules --
class _Pipe:
    """One pipeline_step's plumbing: this stage's forward/backward of one micro-batch and the p2p to its
    neighbours (None where there is no neighbour: every call below is a no-op at the ends)."""
    def __init__(self, stage, mesh, micro_batches, loss_scale, dp=None, loss_fn=None):
        self.stage, self.mesh, self.mbs, self.loss_scale, self.loss_fn = stage, mesh, micro_batches, loss_scale, loss_fn
        self.dp, self.n_backward = dp, 0    # dp: the optimizer's DataParallel (grad sync on the last backward)
        r, d, t = mesh.pp_rank, mesh.dp_rank, mesh.tp_rank
        self.prev = mesh.rank_of(d, r - 1, t) if r > 0 else None
        self.next = mesh.rank_of(d, r + 1, t) if r < mesh.pp - 1 else None
        p, self.group = next(stage.parameters()), mesh.pp_group
        self.dtype, self.device, self.hidden = p.dtype, p.device, stage.cfg.hidden_size
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.n_tokens = torch.zeros((), dtype=torch.int64, device=self.device)

    def forward(self, k, x):
        """Micro-batch k through this stage. x: the received activation (None on the first stage).
        Returns what backward needs: (x, y) with y the activation to send, or the scaled loss on the last."""
        mb = {n: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for n, v in self.mbs[k].items()}
        s = self.stage
        y = s(mb["input_ids"] if s.has_embedding else x, mb["positions"], mb["cu_seqlens"], mb.get("max_seqlen"))
        if s.has_head and self.loss_fn is not None:     # a custom loss, already scaled to the step (RL)
            y = self.loss_fn(y, k)
            self.loss_sum += y.detach().double()
            self.n_tokens += 1
        elif s.has_head:
            total, n = s.loss(y, mb["labels"], rows=label_rows(self.mbs[k]["labels"], self.device))
            self.loss_sum += total.detach()
            self.n_tokens += n
            y = total * self.loss_scale         # the step's mean: sum over micro-batches of total / n_total
        return x, y

    def backward(self, x, y, g):
        """Backpropagate g = dL/dy (None when y is the loss) through this stage; returns dL/dx (None on the first
        stage). Parameter grads ACCUMULATE over the micro-batches; with an optimizer, only the step's LAST backward
        (micro-batch M-1: both schedules go in order) lets the dp reduction run."""
        self.n_backward += 1                    # the step's last backward (n_backward == M) lets dp reduce
        with (self.dp.no_sync() if self.dp and self.n_backward < len(self.mbs) else contextlib.nullcontext()):
            torch.autograd.backward(y, grad_tensors=g)
        return x.grad if x is not None else None

    # Megatron's p2p vocabulary; a one-way call is the paired one with nothing to pair (dx / y_old None)
    def send_backward_recv_forward(self, dx=None):
        """Send gradient dx back (if any) and, in the same batch, receive the next activation."""
        if self.prev is not None:
            return recv_activation(self.prev, self.hidden, self.dtype, self.device, self.group,
                                   send_grad_back=dx).requires_grad_()

    def send_forward_recv_backward(self, y, y_old=None):
        """Send activation y forward and, in the same batch, receive the gradient of the older y_old."""
        if self.next is not None:
            return send_activation(y.detach(), self.next, self.group, recv_grad_of=y_old)

    recv_forward, send_forward = send_backward_recv_forward, send_forward_recv_backward

    def recv_backward(self, y):
        return recv_grad(self.next, y, self.group) if self.next is not None else None

    def send_backward(self, dx):
        if self.prev is not None:
            send_grad(dx, self.prev, self.group)


def _afab(p: _Pipe, M: int):
    """All forwards, then all backwards (in micro-batch order). Holds M micro-batches of activations."""
    saved = []
    for k in range(M):
        x, y = p.forward(k, p.recv_forward())
        p.send_forward(y)
        saved.append((x, y))
    for k in range(M):
        x, y = saved[k]
        saved[k] = None                                         # free micro-batch k's graph now
        p.send_backward(p.backward(x, y, p.recv_backward(y)))


def _1f1b(p: _Pipe, M: int):
    """PipeDream-Flush (Narayanan et al. 2021, Megatron-LM on GPU clusters, sec. 2.2.1): w warm-up forwards,
    M - w steady (forward k + w, backward k) pairs, w cool-down backwards. Holds at most w + 1 micro-batches."""
    w = min(p.mesh.pp - p.mesh.pp_rank - 1, M)
    inflight = deque()                                          # (x, y) of the forwarded, not yet backwarded
    for k in range(w):                                          # warm-up: fill the pipe downstream of us
        x, y = p.forward(k, p.recv_forward())
        p.send_forward(y)
        inflight.append((x, y))
    x_next = p.recv_forward() if M > w else None
    for k in range(M - w):                                      # steady: one forward, one backward
        x, y = p.forward(k + w, x_next)
        inflight.append((x, y))
        x_old, y_old = inflight.popleft()                       # the oldest micro-batch: k
        g = p.send_forward_recv_backward(y, y_old)              # y goes down, y_old's grad up: ONE batch
        dx = p.backward(x_old, y_old, g)
        if k == M - w - 1:                                      # last steady step: nothing left to receive
            p.send_backward(dx)
        else:
            x_next = p.send_backward_recv_forward(dx)
    while inflight:                                             # cool-down: drain the warm-up micro-batches
        x, y = inflight.popleft()
        p.send_backward(p.backward(x, y, p.recv_backward(y)))


SCHEDULES = {"1f1b": _1f1b, "afab": _afab}


def _same_micro_batch_count(M: int, mesh: Mesh, who: str, dp_group=None):
    """A stage (or ZeRO-2/3 dp rank) with one micro-batch more waits forever on a peer that finished: a hang, not an
    error. A tiny all-reduce MAX of (M, -M), over the pipeline then dp_group, gives every rank the max and the min."""
    mm = all_reduce_(torch.tensor([M, -M], device=mesh.device), mesh.pp_group, "max")
    all_reduce_(mm, dp_group, "max")
    _require(mm.tolist() == [M, -M], f"{who}: {M} micro-batches here, between {-int(mm[1])} and {int(mm[0])} in "
             f"this pipeline{' and its ZeRO-2/3 dp group' if dp_group is not None else ''}", RuntimeError)


def pipeline_step(stage: Transformer, mesh: Mesh, micro_batches: list[dict], schedule: str = "1f1b",
                  loss_scale: float | None = None, check: bool = True, optimizer=None,
                  loss_fn=None, sync: bool = True) -> tuple:
    """Forward + backward of one step's micro-batches through the pipeline; grads ACCUMULATE (zero before, step
    after). Every pipeline rank passes the SAME list of dicts: input_ids [N], positions [N], cu_seqlens [B+1],
    max_seqlen (optional int), labels [N]. Returns this pipeline's unscaled (loss_sum, n_tokens) on every rank.
    loss_scale: backward runs on loss_sum * loss_scale; pass 1 / (labelled tokens of the whole step, all micro-batches
    AND dp ranks) and the gradient does not depend on the split (None: this pipeline's mean).
    check: a tiny all-reduce (over pp; ZeRO-2/3: dp too) turns unequal micro-batch counts into an error, not a hang.
    optimizer: build_optimizer's, so the dp reduction runs once, on the last micro-batch (None: .grad).
    loss_fn(hidden [N, Hd], k) -> scalar: another loss for micro-batch k on the last stage (ppo.py's policy and value
    losses), already scaled to the step; no labels needed, and (loss_sum, M) is returned.
    sync=False: return the two numbers as 0-dim float64 DEVICE tensors instead of reading them (a host sync: the host
    would wait for the whole backward before it could queue the optimizer and the next step; read them later)."""
    _require(schedule in SCHEDULES, f"pipeline_step: schedule {schedule!r}; expected one of {sorted(SCHEDULES)}")
    _require((M := len(micro_batches)) > 0, "pipeline_step: no micro-batches")
    need = {"input_ids", "positions", "cu_seqlens"} | ({"labels"} if loss_fn is None else set())
    for k, mb in enumerate(micro_batches):
        _require(need <= set(mb), f"pipeline_step: micro-batch {k} lacks {sorted(need - set(mb))}", KeyError)
    _require(stage.mesh is mesh, "pipeline_step: the stage was built on another mesh")
    dp = getattr(optimizer, "dp", None)
    zero23 = dp is not None and dp.stage >= 2     # they reduce-scatter EVERY micro-batch: dp ranks must match too
    if check and (mesh.pp > 1 or (zero23 and mesh.dp > 1)):
        _same_micro_batch_count(M, mesh, "pipeline_step", dp.group if zero23 else None)
    if loss_scale is None and loss_fn is None:   # .item() syncs: pass loss_scale in (you know the token count)
        loss_scale = 1.0 / max(1, sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches))
    p = _Pipe(stage, mesh, micro_batches, loss_scale, dp, loss_fn)
    SCHEDULES[schedule](p, M)
    sync_tied_embedding_grads(stage, dp)
    # the last stage knows the loss: broadcast it so every rank logs the same numbers (one small collective)
    out = torch.stack([p.loss_sum, p.n_tokens.double()])
    if mesh.pp > 1:
        dist.broadcast(out, src=mesh.rank_of(mesh.dp_rank, mesh.pp - 1, mesh.tp_rank), group=mesh.pp_group)
    if not sync:
        return out[0], out[1]
    loss_sum, n = out.tolist()                    # one host sync for both (two .item()s would be two)
    return loss_sum, int(n)


@torch.no_grad()
def pipeline_forward(stage: Transformer, mesh: Mesh, micro_batches: list[dict], fn) -> list:
    """Forward only (no graph, no backward): micro-batch k flows through the stages and the last stage returns
    [fn(hidden_k [N, Hd], k) for every k], the others []. Every rank of the pipeline passes the same list, as for
    pipeline_step (RL scores its rollouts this way). Under ZeRO-3 every forward all-gathers over dp: the dp ranks
    must pass as many micro-batches too (pad with fillers, as sft.evaluate does), or the longer ones wait forever."""
    if mesh.pp > 1:                                             # one tiny all-reduce + host sync per call
        _same_micro_batch_count(len(micro_batches), mesh, "pipeline_forward")
    p, out = _Pipe(stage, mesh, micro_batches, loss_scale=None), []     # its p2p only: no loss, no backward
    for k, mb in enumerate(micro_batches):
        x = p.recv_forward()                                    # None on the first stage
        y = stage(mb["input_ids"] if x is None else x, mb["positions"], mb["cu_seqlens"], mb.get("max_seqlen"))
        if p.next is not None:
            p.send_forward(y)
        else:
            out.append(fn(y, k))
    return out


# ---- data parallelism + ZeRO -----------------------------------------------------------------------
# The training loop that this chapter and the optimizer serve (every rank runs the same lines):
#     opt = build_optimizer(model, mesh, zero_stage=1, lr=3e-4, weight_decay=0.1)   # after loading weights
#     for step in range(total):
#         opt.zero_grad()
#         for i, mb in enumerate(micro_batches):                 # this dp rank's share of the step
#             with opt.no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
#                 total_loss, _ = model.loss(model(mb.ids, mb.pos, mb.cu), mb.labels)
#                 (total_loss / global_tokens).backward()        # global_tokens: the whole step, all dp ranks
#         grad_norm = opt.clip_grad_norm_(1.0)
#         opt.step(lr=lr_at(step, warmup, total, peak_lr, min_ratio=0.1))
# Every dp rank holds the same model (its (pp, tp) slice) and runs its share of the step's sequences; gradients are
# SUMMED over dp. SUM, not mean: each micro-batch's loss is already divided by the WHOLE step's token count (all
# micro-batches, all dp ranks), so the sum is the global mean's exact gradient even when ranks hold unequal token
# counts (a mean over ranks would not be).
#
# Ownership (Rajbhandari et al. 2020, "ZeRO", sec. 5). This rank's parameters are packed into flat BUCKETS, each
# padded to a multiple of dp; every bucket is cut into dp equal shards, and dp rank r OWNS shard r of every bucket
# (as in Megatron's distributed optimizer). ZeRO splits each rank's (pp, tp) slice over its dp group only (W=8,
# tp=pp=dp=2: stage 0's tp-0 slice between ranks {0, 2}, its tp-1 slice between {1, 3}; stage 1's {4, 6}, {5, 7}).
#   bucket (P elements, P % dp == 0; reverse parameter order = the order backward produces grads)
#     param_buf  [ lm_head.w          | norm.w | layers.1.mlp.down.w ...          | pad ]  model dtype
#     grad_buf   [ the same layout in fp32: p.main_grad is a view of it                   ]  fp32
#                |<------- dp rank 0: [0, S) -------->|<------- dp rank 1: [S, 2S) -------->|
#
#   stage | params (model dtype)     | fp32 grads                        | fp32 master, Adam m, v | comm per step
#   ------+--------------------------+-----------------------------------+------------------------+----------------
#     0   | full P                   | full P, all-reduced               | full P (every rank)    | all-reduce
#     1   | full P                   | full P, all-reduced               | own shard S = P / dp   | AR + all-gather
#     2   | full P                   | own shard S: grad_buf lives only  | own shard S            | reduce-scatter
#         |                          | in backward, reduce-scattered     |                        | + all-gather
#     3   | own shard S; full P only | as stage 2                        | own shard S            | RS + all-gather
#         | while its layer runs     |                                   |                        | per layer x2
#
# Stage 0 is plain DP: every rank steps every parameter, identically. Buckets: stage 0-2 ~bucket_mb of parameters
# each, the embedding and the LM head alone (so a tied embedding's shards line up on the first and last stage for an
# elementwise all-reduce); stage 3 one "unit" per decoder layer, plus a root unit (embedding, norm, head).
#
# ZeRO-3 life of a layer's parameters, per micro-batch: forward pre-hook: all-gather -> layer forward -> forward hook:
# free, wrap the output in _GatherBeforeBackward -> ... backward reaches the output: all-gather again
# (Bucket.in_backward: a checkpointing recompute must not free it) -> layer backward -> its last grad hook: free,
# reduce-scatter the grads into the owned shard. The root unit stays gathered through forward + backward. No prefetch.
#
# Freeing memory without breaking autograd: a view keeps pointing at its tensor's storage OBJECT, so
# `buf.untyped_storage().resize_(0)` frees the bytes while every view (params, main_grads, the weight views autograd
# saved) stays valid; resizing it back and all-gathering into it makes them all see the data again (as FSDP v1 does).

def _free(t: torch.Tensor):
    t.untyped_storage().resize_(0)


def _alloc(t: torch.Tensor) -> torch.Tensor:
    """Give a freed flat buffer its bytes back (contents undefined). Its views become usable again."""
    if t.untyped_storage().size() == 0:
        t.untyped_storage().resize_(t.numel() * t.element_size())
    return t


def _allocated(t: torch.Tensor) -> bool:
    return t.untyped_storage().size() > 0


def _clip(start, n, lo, hi):
    """[start, start + n) intersected with [lo, hi), shifted to shard coordinates; None when empty."""
    a, b = max(start, lo), min(start + n, hi)
    return (a - lo, b - lo) if a < b else None


def _merge(ranges):
    """Merge touching (a, b) ranges, so the optimizer loops over few slices instead of one per param."""
    out = []
    for a, b in sorted(r for r in ranges if r is not None):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


# A Bucket's gradient is a small state machine, run once per optimizer step (its fields in brackets):
#   CLEAN      no gradient yet this step                                   [ready 0, not pending]
#   FILLING    some params' grads added into grad_buf                      [0 < ready < len(params), pending]
#   HELD       all added, not reduced: more micro-batches may still add    [ready 0, pending]
#   IN FLIGHT  the async collective is launched, not waited for            [work; 0/1: reduced; 2/3: rs_out]
#   REDUCED    summed over dp: 0/1 in grad_buf; 2/3 added into grad_shard, grad_buf freed   [work None]
# event -> transition:
#   grad hook (_on_grad) ...................... CLEAN, HELD, REDUCED (2/3) -> FILLING (2/3: waits for IN FLIGHT)
#     of the bucket's last param .............. -> IN FLIGHT (_launch) if bucketed, unless no_sync at 0/1; else HELD
#   a backward ends (_drain, bucketed 2/3) .... IN FLIGHT -> REDUCED
#   finish_grad_sync (clip, step) ............. any -> REDUCED (0/1: CLEAN too: all ranks, same all-reduces)
#   zero_grad ................................. any -> CLEAN
#   grad hook once REDUCED at stage 0/1 ....... RuntimeError: the step already reduced that bucket

class Bucket:
    """One flat slab of this rank's parameters and its fp32 gradients, cut into dp shards (see the table). [lo, hi):
    the elements this rank's optimizer owns ([0, P) in stage 0, shard dp_rank after). param_shard and grad_shard
    [hi - lo] view the full buffers while those persist (stage 0/1: both; 2: params), else are own tensors."""
    def __init__(self, named, dp, dp_rank, stage):
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        dtypes = {p.dtype for p in self.params}
        _require(len(dtypes) == 1, f"Bucket: parameters {self.names} mix dtypes {dtypes}; build the model in one dtype")
        dev, n = self.params[0].device, sum(p.numel() for p in self.params)
        self.P = -(-n // dp) * dp                                         # padded so dp shards are equal
        S = self.P // dp
        self.lo, self.hi = (0, self.P) if stage == 0 else (dp_rank * S, (dp_rank + 1) * S)
        self.param_buf = torch.zeros(self.P, dtype=self.params[0].dtype, device=dev)
        self.grad_buf = torch.zeros(self.P, dtype=torch.float32, device=dev)
        self.offsets, o = [], 0
        with torch.no_grad():
            for p in self.params:
                k = p.numel()
                self.param_buf[o:o + k].copy_(p.detach().reshape(-1))
                p.data = self.param_buf[o:o + k].view_as(p)            # the param now LIVES in the bucket
                p.main_grad = self.grad_buf[o:o + k].view_as(p)        # Megatron's name: the fp32 grad
                self.offsets.append(o)
                o += k
        self.param_shard = self.param_buf[self.lo:self.hi]            # views, unless the full buffer goes:
        self.grad_shard = self.grad_buf[self.lo:self.hi]
        if stage == 3:
            self.param_shard = self.param_shard.clone()
            _free(self.param_buf)
        if stage >= 2:
            self.grad_shard = torch.zeros(self.hi - self.lo, dtype=torch.float32, device=dev)
            _free(self.grad_buf)                                        # allocated by the first grad hook
        self.gathered = stage != 3          # stage 3: is param_buf allocated and filled right now?
        self.in_backward = False            # stage 3: gathered for backward, keep until its grads are in
        self.ready = 0                      # params whose grad arrived in the current backward
        self.pending = False                # grad_buf holds local grads not yet reduced
        self.reduced = False                # stage 0/1: already all-reduced in this step
        self.work = None                    # the async collective in flight (a torch Work handle)
        self.rs_out = None                  # stage 2/3: its reduce-scatter output [S]


class _GatherBeforeBackward(torch.autograd.Function):
    """ZeRO-3's backward pre-hook: identity on a layer's output, whose backward runs JUST BEFORE the layer's own and
    all-gathers the layer's params (the weight views autograd saved see them again)."""
    @staticmethod
    def forward(ctx, x, dp, bucket):
        ctx.dp, ctx.bucket = dp, bucket
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.dp._gather(ctx.bucket)
        ctx.bucket.in_backward = True       # activation-checkpoint recompute must not free it again
        return g, None, None


class DataParallel:
    """Gradient synchronisation over mesh.dp and the ZeRO ownership of one model (or pipeline stage). A
    post-accumulate-grad hook moves each p.grad into the fp32 p.main_grad, so bf16 grads of many micro-batches sum in
    fp32 (Megatron's gradient_accumulation_fusion). AFTER BACKWARD THE GRADIENTS ARE IN p.main_grad (stage 0/1) OR THE
    BUCKETS' grad_shard (stage 2/3). grad_sync 'naive' reduces each bucket after backward; 'bucketed' launches a
    bucket's collective from the hook completing it, overlapping the backward (Li et al. 2020). Both agree."""
    def __init__(self, model, mesh, zero_stage: int = 0, grad_sync: str = "bucketed", bucket_mb: float = 25.0):
        _require(zero_stage in (0, 1, 2, 3), f"--zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
        _require(grad_sync in ("naive", "bucketed"),
                 f"DataParallel: grad_sync must be 'naive' or 'bucketed', got {grad_sync!r}")
        _require(zero_stage != 3 or mesh.pp == 1, f"--zero_stage 3 is implemented for --pp 1 only (got --pp "
                 f"{mesh.pp}): use --zero_stage <= 2 with pipeline parallelism")
        self.model, self.mesh, self.stage = model, mesh, zero_stage
        self.group, self.overlap = mesh.dp_group, grad_sync == "bucketed"
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = self._units(model, named) if zero_stage == 3 else self._buckets(model, named, bucket_mb)
        self.buckets = [Bucket(g, mesh.dp, mesh.dp_rank, zero_stage) for g in groups]
        self._sync, self._drain_queued = True, False
        for b in self.buckets:
            for p in b.params:
                p.register_post_accumulate_grad_hook(partial(self._on_grad, b))
        if zero_stage == 3:
            self._install_zero3_hooks(model)
        self._norm_ranges = self._norm_ranges_of(model)

    # -- layout --
    @staticmethod
    def _buckets(model, named, bucket_mb):
        """Stage 0-2: reverse parameter order, closed when ~bucket_mb full; embedding / head alone."""
        solo = {id(m.weight) for m in (model.embed, model.lm_head) if m is not None}
        limit, groups, cur, nbytes = bucket_mb * 2 ** 20, [], [], 0
        for n, p in reversed(named):
            if cur and (nbytes >= limit or id(p) in solo or id(cur[-1][1]) in solo):   # full, or a solo one
                groups, cur, nbytes = groups + [cur], [], 0
            cur.append((n, p))
            nbytes += p.numel() * p.element_size()
        return groups + ([cur] if cur else [])

    @staticmethod
    def _units(model, named):
        """Stage 3: one unit per decoder layer (reverse order) + the root unit (everything else), last."""
        name_of = {id(p): n for n, p in named}
        in_layer = {id(p) for layer in model.layers for p in layer.parameters()}
        units = [[(name_of[id(p)], p) for p in layer.parameters()] for layer in reversed(model.layers)]
        root = [(n, p) for n, p in named if id(p) not in in_layer]
        return units + ([root] if root else [])

    def _install_zero3_hooks(self, model):
        for layer, b in zip(reversed(model.layers), self.buckets):      # _units: the layers' units come first
            layer.register_forward_pre_hook(lambda m, args, b=b: self._gather(b))
            layer.register_forward_hook(lambda m, args, out, b=b: self._after_forward(b, out))
        # The root unit (embedding, final norm, LM head) stays gathered from the start of forward until its grads
        # are in: the loss uses the head weight OUTSIDE any module call, so no module hook could gather it in time.
        for b in self.buckets[len(model.layers):]:
            model.register_forward_pre_hook(lambda m, args, b=b: self._gather(b))

    def _after_forward(self, b, out):
        # out = (y, residual): wrapping y suffices, as residual's node (post_attn_norm's, made both) waits for y's grad
        if torch.is_grad_enabled() and out[0].requires_grad:
            out = (_GatherBeforeBackward.apply(out[0], self, b), *out[1:])
        if not b.in_backward:
            self._release(b)
        return out

    def _gather(self, b):
        """Stage 3: all-gather a unit's params into its flat buffer (a no-op when already there)."""
        if b.gathered:
            return
        _alloc(b.param_buf)
        # .data: write without bumping the autograd version counter the saved weight views share
        if self.group is None:
            b.param_buf.data.copy_(b.param_shard)
        else:
            _all_gather_base(b.param_buf.data, b.param_shard, group=self.group)
        b.gathered = True

    def _release(self, b):
        if self.stage == 3 and b.gathered:
            _free(b.param_buf)
            b.gathered, b.in_backward = False, False

    @contextlib.contextmanager
    def gathered_params(self):
        """Stage 3: every parameter full for the duration (checkpoints, state_dict_hf, weight sync to the inference
        engine, evaluation); a no-op for stage 0-2. A collective over dp. FOOTGUN: views of the params (state_dict_hf
        at tp=1 yields views) point at FREED memory after the block: clone what you keep."""
        for b in self.buckets:
            self._gather(b)
        try:
            yield
        finally:
            for b in self.buckets:
                self._release(b)

    # -- gradients --
    def _on_grad(self, b, p):
        """Post-accumulate-grad hook: p.grad (model dtype) -> p.main_grad (fp32), then maybe launch b."""
        if self.stage <= 1 and b.reduced:
            raise RuntimeError(f"DataParallel: a gradient of {b.names[0]!r} arrived after its bucket was already "
                               "all-reduced this step. With gradient accumulation wrap every micro-batch's "
                               "backward except the last in `with opt.no_sync():`, and call zero_grad() each step")
        if b.work is not None:              # stage 2/3: the previous micro-batch's reduce-scatter reads grad_buf
            self._wait(b)
        if not _allocated(b.grad_buf):
            _alloc(b.grad_buf).zero_()
        if self.overlap and self.stage >= 2 and not self._drain_queued:
            # the end of this backward waits for its reduce-scatters and frees the full fp32 grads: left to
            # the NEXT micro-batch's hooks they would live through its forward, the peak of the step
            torch.autograd.Variable._execution_engine.queue_callback(self._drain)
            self._drain_queued = True
        p.main_grad.add_(p.grad)            # fp32 += model-dtype grad (upcast inside add)
        p.grad = None
        b.pending = True
        b.ready += 1
        if b.ready == len(b.params):        # the last grad of this bucket in this backward
            b.ready = 0
            if self.stage == 3:
                self._release(b)            # its backward is over: the full params can go
            # stage 2/3 reduce-scatter EVERY micro-batch (keeping the full fp32 grads across micro-batches
            # would undo their memory saving; DeepSpeed does the same), stage 0/1 only outside no_sync()
            if self.overlap and (self._sync or self.stage >= 2):
                self._launch(b)

    def _launch(self, b):
        """Start b's collective asynchronously: all-reduce (stage 0/1) or reduce-scatter (stage 2/3), SUM."""
        b.pending = False
        if self.stage <= 1:
            b.reduced = True
            if self.group is not None:
                b.work = dist.all_reduce(b.grad_buf, group=self.group, async_op=True)
        elif self.group is None:
            b.rs_out = b.grad_buf                                       # dp = 1: the shard is everything
        else:
            b.rs_out = torch.empty(b.hi - b.lo, dtype=torch.float32, device=b.grad_buf.device)
            b.work = _reduce_scatter_base(b.rs_out, b.grad_buf, group=self.group, async_op=True)

    def _drain(self):
        """Stage 2/3, run by autograd when a backward ends: wait for the launched reduce-scatters (which
        frees each full grad buffer). Buckets with grads still pending wait for finish_grad_sync."""
        self._drain_queued = False
        for b in self.buckets:
            if not b.pending:
                self._wait(b)

    def _wait(self, b):
        if b.work is not None:
            b.work.wait()
            b.work = None
        if b.rs_out is not None:            # stage 2/3: accumulate into the owned shard, drop the full buffer
            b.grad_shard.add_(b.rs_out)
            b.rs_out = None
            _free(b.grad_buf)

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate locally without communicating (stage 0/1; stage 2/3 still
        reduce-scatter every micro-batch, see _on_grad). Wrap every micro-batch but the last."""
        prev, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = prev

    def finish_grad_sync(self):
        """Launch what the hooks did not (naive mode; buckets with unused params), wait for all; idempotent. Every
        rank issues the same collectives in the same order (backward, then bucket), as gloo and NCCL require."""
        for b in self.buckets:
            if (self.stage <= 1 and not b.reduced) or (self.stage >= 2 and b.pending):
                self._launch(b)
        for b in self.buckets:
            self._wait(b)
            self._release(b)                # stage 3: nothing stays gathered past the step

    def owned_grad(self, param) -> torch.Tensor:
        """The fp32 gradient this rank owns (stage 0: all of it, then its dp shard) of a parameter alone in
        its bucket (embedding, LM head): what sync_tied_embedding_grads sums over the two stages."""
        b = next((b for b in self.buckets if any(p is param for p in b.params)), None)
        _require(b is not None and len(b.params) == 1, "DataParallel.owned_grad: only a parameter alone in its "
                 "bucket (embedding, LM head; stage 0-2) has an owned gradient that lines up across pipeline stages")
        return b.grad_shard

    def zero_grad(self):
        for b in self.buckets:
            self._wait(b)
            if self.stage <= 1:
                b.grad_buf.zero_()
            else:
                b.grad_shard.zero_()
                _free(b.grad_buf)                   # (a no-op when already freed)
            b.ready, b.pending, b.reduced = 0, False, False
            for p in b.params:
                p.grad = None

    # -- the global gradient norm --
    def _norm_ranges_of(self, model):
        """Per bucket, the shard ranges whose grads count in the global norm. Every element of the full model must
        count exactly once over all (dp, tp, pp) ranks:
          dp: stage 0 grads are replicated over dp -> count the full buffer, reduce over tp, pp only; stage >= 1 count
              the owned shard and reduce over dp too;
          tp: 'rep' tensors (norm weights) are identical on every tp rank -> only tp rank 0 counts them;
          pp: the last stage's tied LM head copy (no embedding there) duplicates stage 0's -> not counted."""
        skip = {id(slot.param) for slot in model.hf_slots().values() if slot.kind == "rep" and self.mesh.tp_rank > 0}
        if model.cfg.tie_word_embeddings and model.lm_head is not None and not model.has_embedding:
            skip.add(id(model.lm_head.weight))                          # the last stage's tied copy
        return [_merge(_clip(o, p.numel(), b.lo, b.hi) for p, o in zip(b.params, b.offsets) if id(p) not in skip)
                for b in self.buckets]

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of all gradients (fp32 0-dim tensor, the same on every rank). A collective."""
        self.finish_grad_sync()
        dev = self.buckets[0].grad_shard.device if self.buckets else self.mesh.device
        pieces = [b.grad_shard[a:e] for b, ranges in zip(self.buckets, self._norm_ranges) for a, e in ranges]
        # one multi-tensor launch, no [P] fp32 temporary (square().sum() wrote and re-read one per range)
        sq = (torch.stack(torch._foreach_norm(pieces)).square().sum() if pieces
              else torch.zeros((), dtype=torch.float32, device=dev))
        self.mesh.all_reduce_(sq, "dp_tp" if self.stage >= 1 else "tp")
        self.mesh.all_reduce_(sq, "pp")
        return sq.sqrt()


def clip_grad_norm_(dp: DataParallel, max_norm: float) -> torch.Tensor:
    """Scale the owned gradient shards (what the optimizer reads) by min(1, max_norm / (norm + 1e-6)), norm the global
    L2 norm over all (dp, tp, pp) ranks: torch's clip_grad_norm_ rule (Pascanu et al. 2013, sec. 3.2) as in one
    process. Returns the norm before clipping; no .item(), no host sync."""
    norm = dp.grad_norm()
    torch._foreach_mul_([b.grad_shard for b in dp.buckets], (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


# ---- optimizer ---------------------------------------------------------------------------------------
# Mixed precision (Micikevicius et al. 2018, sec. 3.1): the model computes in bf16 (params, grads), but a bf16
# weight cannot absorb an update smaller than 2^-8 of itself, so the optimizer keeps an fp32 MASTER copy of the
# weights it owns and does all its math in fp32; after the step the master is rounded into the bf16 params. Grads
# are accumulated and reduced in fp32 (main_grad, above). In an fp32 model the master IS the param shard (an alias).

def default_no_decay(name: str) -> bool:
    """Parameters without weight decay: biases and norm weights (their module's name contains 'norm').
    Decaying a norm gain towards 0 shrinks the layer's output scale, which is not a regulariser."""
    leaf_module = name.rsplit(".", 2)[-2] if name.count(".") else ""
    return name.endswith(".bias") or "norm" in leaf_module


def lr_at(step: int, warmup: int, total: int, peak: float, min_ratio: float = 0.1) -> float:
    """Linear warmup then cosine decay (Loshchilov & Hutter 2017, SGDR eq. 5, one cycle, no restart):
        step < warmup:  lr = peak * (step + 1) / warmup               (reaches peak at step warmup - 1)
        after:          lr = lo + (peak - lo) * (1 + cos(pi * t)) / 2,  t = (step - warmup) / (total - warmup)
        lo = peak * min_ratio;  t is clamped to [0, 1], so lr = lo from step `total` on."""
    if step < warmup:
        return peak * (step + 1) / warmup
    lo, t = peak * min_ratio, min(1.0, (step - warmup) / max(1, total - warmup))
    return lo + (peak - lo) * 0.5 * (1.0 + math.cos(math.pi * t))


_OPT_KEYS = ("master", "exp_avg", "exp_avg_sq")   # AdamW's per-element state: fp32 weights, Adam's m and v


class AdamW:
    """AdamW (Loshchilov & Hutter 2019, Alg. 2: DECOUPLED weight decay) on this rank's fp32 shards; torch's formulas:
        p <- p * (1 - lr * wd)                      (decay the weight itself, not the gradient)
        m <- b1 m + (1 - b1) g;    v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)      (t = step count)
    Every tensor is flat [hi - lo]: one fused op per bucket instead of one per parameter; the padding elements have
    g = p = 0 and stay 0. Weight decay applies on merged ranges (no_decay(name) excluded)."""
    def __init__(self, dp: DataParallel, lr: float = 3e-4, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, no_decay=default_no_decay):
        self.dp, self.lr, self.betas, self.eps, self.weight_decay, self.t = dp, lr, tuple(betas), eps, weight_decay, 0
        self.master = [b.param_shard if b.param_shard.dtype == torch.float32 else b.param_shard.detach().float()
                       for b in dp.buckets]
        self.exp_avg, self.exp_avg_sq = ([torch.zeros_like(p) for p in self.master] for _ in "mv")  # Adam's m, v
        self.decay = [_merge(_clip(o, p.numel(), b.lo, b.hi) for n, p, o in zip(b.names, b.params, b.offsets)
                             if not no_decay(n)) for b in dp.buckets]
        self._pieces = self._piece_table()
        self._fused = self._fused_lists() if self.master and self.master[0].is_cuda else None

    def _fused_lists(self):
        """For torch._fused_adamw_: per weight-decay class (decay, no decay), [params, grads, exp_avgs,
        exp_avg_sqs] as slices of the flat fp32 buffers, and one step-count tensor per slice."""
        lists = ([[], [], [], []], [[], [], [], []])
        for b, p, m, v, decay in zip(self.dp.buckets, self.master, self.exp_avg, self.exp_avg_sq, self.decay):
            cuts = sorted({0, p.numel()} | {x for r in decay for x in r})
            for a, e in zip(cuts[:-1], cuts[1:]):
                dst = lists[0] if any(lo <= a and e <= hi for lo, hi in decay) else lists[1]
                for lst, t in zip(dst, (p, b.grad_shard, m, v)):
                    lst.append(t[a:e])
        return [(l, [torch.zeros((), device=l[0][0].device) for _ in l[0]]) for l in lists]

    def no_sync(self):
        return self.dp.no_sync()

    def zero_grad(self):
        self.dp.zero_grad()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(self.dp, max_norm)

    @torch.no_grad()
    def step(self, lr: float | None = None):
        """Finish the gradient sync, update the owned shards, then publish the new params (stage 1/2:
        all-gather every bucket over dp; stage 3: the next forward gathers them; stage 0: nothing)."""
        if lr is not None:
            self.lr = lr
        self.dp.finish_grad_sync()
        self.t += 1
        b1, b2 = self.betas
        if self._fused is not None:
            # the same update in 1 launch per decay class: 28 B/element (read p, g, m, v; write p, m, v), not ~100
            for (lists, steps), wd in zip(self._fused, (self.weight_decay, 0.0)):
                if lists[0]:
                    torch._foreach_add_(steps, 1.0)                      # == self.t (load_state_dict syncs)
                    torch._fused_adamw_(*lists, [], steps, lr=self.lr, beta1=b1, beta2=b2, weight_decay=wd,
                                        eps=self.eps, amsgrad=False, maximize=False)
        else:                                   # the reference: the formulas of the class docstring
            bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
            for b, p, m, v, decay in zip(self.dp.buckets, self.master, self.exp_avg, self.exp_avg_sq, self.decay):
                g = b.grad_shard
                for a, e in decay:
                    p[a:e].mul_(1 - self.lr * self.weight_decay)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
                p.addcdiv_(m, denom, value=-self.lr / bc1)
        self._publish()

    @torch.no_grad()
    def _publish(self):
        """master -> model-dtype param shard (rounding, unless aliased) -> the full params of every dp rank."""
        for b, p in zip(self.dp.buckets, self.master):
            if p is not b.param_shard:
                b.param_shard.copy_(p)
            if self.dp.stage in (1, 2) and self.dp.group is not None:
                # a copy as input: gloo does not promise in-place all-gather (input inside the output)
                _all_gather_base(b.param_buf, b.param_shard.clone(), group=self.dp.group)

    def state_bytes(self) -> dict:
        """Bytes this rank keeps between steps, by kind (the ZeRO memory claim: divide by dp)."""
        bs = self.dp.buckets
        return {"master": sum(t.numel() * 4 for t in self.master),
                "adam": sum(t.numel() * 4 for t in self.exp_avg + self.exp_avg_sq),
                "grads": sum(b.grad_shard.numel() * 4 if self.dp.stage >= 2 else b.P * 4 for b in bs),
                "params": sum((b.param_shard.numel() if self.dp.stage == 3 else b.P) * b.param_buf.element_size()
                              for b in bs)}

    # -- state dict: layout-independent --
    # A checkpoint must reload into ANY (dp, tp, pp, zero) layout, so state is saved per HF tensor name: for each
    # HF tensor this rank holds a piece of, its full shape, how TP cut it (kind, tp rank, local shape) and the flat
    # element range [a, b) of the TP-local tensor that this rank's shard covers. A col-kind HF tensor (q in the fused
    # qkv) is a run of whole rows of the local param: one contiguous range of the bucket, its owned part too.

    def _piece_table(self):
        """[(hf_name, bucket index, shard range (s, e), info dict)] for every owned piece."""
        mesh, slots_of = self.dp.mesh, {}
        for name, slot in self.dp.model.hf_slots().items():
            slots_of.setdefault(id(slot.param), []).append((name, slot))
        table = []
        for i, b in enumerate(self.dp.buckets):
            for p, o in zip(b.params, b.offsets):
                row = p.numel() // p.shape[0]                           # elements per dim-0 row
                for name, slot in slots_of.get(id(p), []):
                    local_shape = (slot.rows, *p.shape[1:]) if slot.kind == "col" else tuple(p.shape)
                    start = o + slot.offset * row                       # offset is 0 unless 'col'
                    r = _clip(start, math.prod(local_shape), b.lo, b.hi)
                    if r is None:
                        continue
                    info = {"full_shape": slot.full_shape, "kind": slot.kind, "tp_rank": mesh.tp_rank, "tp": mesh.tp,
                            "local_shape": local_shape, "range": (r[0] + b.lo - start, r[1] + b.lo - start)}
                    table.append((name, i, r, info))
        return table

    def state_dict(self) -> dict:
        """{'step', 'hparams', 'tensors': {hf_name: info + {'master', 'exp_avg', 'exp_avg_sq'}}}, this
        rank's pieces only (no communication). Save every rank's dict; load_state_dict takes them all."""
        tensors = {name: dict(info, **{k: getattr(self, k)[i][s:e].clone() for k in _OPT_KEYS})
                   for name, i, (s, e), info in self._pieces}
        return {"step": self.t, "hparams": {"betas": self.betas, "eps": self.eps,
                                            "weight_decay": self.weight_decay}, "tensors": tensors}

    @torch.no_grad()
    def load_state_dict(self, state_dicts):
        """Load state_dict()'s state from ANY layout (every rank's dicts, or one). Each HF tensor is reassembled from
        its pieces and cut for this rank; params are rewritten from the master (stage 1/2: a collective all-gather)."""
        sds = [state_dicts] if isinstance(state_dicts, dict) else list(state_dicts)
        _require(sds, "AdamW.load_state_dict: no state dicts given")
        self.t = sds[0]["step"]
        for _, steps in self._fused or []:      # the fused kernel keeps its own step counts
            for st in steps:
                st.fill_(self.t)
        for name, i, (s, e), info in self._pieces:
            # one full tensor at a time: all at once would hold 3 x fp32 x the stage's parameters in host memory
            a, z = info["range"]
            for k, full in _assemble(name, [sd["tensors"][name] for sd in sds if name in sd["tensors"]]).items():
                local = self.dp.model._shard_of(full, info["kind"], info["local_shape"][0])
                getattr(self, k)[i][s:e].copy_(local.reshape(-1)[a:z])
        self._publish()

    @torch.no_grad()
    def reload_model_params(self):
        """Megatron's name: master <- the params, after weights were written into them (load_checkpoint with
        optimizer_state=False); else step() updates the OLD master and publishes it over them. ZeRO-3: call it
        inside dp.gathered_params(), where the written params live."""
        for b, p in zip(self.dp.buckets, self.master):
            if self.dp.stage == 3:
                b.param_shard.copy_(b.param_buf[b.lo:b.hi])
            if p is not b.param_shard:                          # bf16 params: the master is an fp32 copy
                p.copy_(b.param_shard)


def _assemble(name, pieces):
    """Full HF-shaped tensors {master, exp_avg, exp_avg_sq} from the pieces of all ranks (any layout)."""
    _require(pieces, f"AdamW.load_state_dict: no saved state for tensor {name!r}", KeyError)
    full_shape, kind = tuple(pieces[0]["full_shape"]), pieces[0]["kind"]
    flat, covered, shape_of = {}, {}, {}            # per tp rank: [3, n] (the _OPT_KEYS stacked), [n] bool
    for pc in pieces:
        r, (a, z) = pc["tp_rank"], pc["range"]
        if r not in flat:
            n = math.prod(pc["local_shape"])
            flat[r], covered[r], shape_of[r] = torch.zeros(3, n), torch.zeros(n, dtype=torch.bool), pc["local_shape"]
        flat[r][:, a:z] = torch.stack([pc[k].float() for k in _OPT_KEYS])
        covered[r][a:z] = True
    _require((kind == "rep" or sorted(flat) == list(range(pieces[0]["tp"]))) and all(c.all() for c in covered.values()),
             f"AdamW.load_state_dict: the saved pieces of {name!r} do not cover the whole tensor; "
             "pass the state dicts of EVERY rank of the saving job")
    locs = [flat[r].view(3, *shape_of[r]) for r in sorted(flat)]
    # TP pieces in rank order glue like the checkpoint's model pieces (see the checkpoints chapter); a
    # vocab tensor's padding rows are the last rank's last rows (vocab_shard): cut them off
    full = locs[0] if kind == "rep" else torch.cat(locs, 2 if kind == "row" else 1)[:, : full_shape[0]]
    _require(tuple(full.shape[1:]) == full_shape,
             f"AdamW.load_state_dict: {name!r} glues to {tuple(full.shape[1:])}, not {full_shape}")
    return dict(zip(_OPT_KEYS, full))


def build_optimizer(model, mesh=None, zero_stage: int = 0, lr: float = 3e-4, betas=(0.9, 0.95),
                    weight_decay: float = 0.1, eps: float = 1e-8, grad_sync: str = "bucketed",
                    bucket_mb: float = 25.0, no_decay=default_no_decay) -> AdamW:
    """DataParallel (grad hooks, buckets, ZeRO ownership) + AdamW over it. Call it AFTER the weights are
    loaded: the buckets copy the params in and (stage 3) keep only this rank's shard."""
    dp = DataParallel(model, mesh or model.mesh, zero_stage, grad_sync, bucket_mb)
    return AdamW(dp, lr, betas, eps, weight_decay, no_decay)


# ---- checkpoints -----------------------------------------------------------------------------------
# A checkpoint is one folder that a job of ANY layout can resume from, and merge.py can turn into an HF folder
# without torch.distributed. Each rank writes only what it holds, so saving moves no tensor between ranks (ZeRO-3
# excepted: its params are all-gathered over dp for the duration):
#   ckpt/sft/step_120/
#     manifest.json                        WRITTEN LAST: format version, step, layout (tp, pp, dp, zero,
#                                          partition), the model's config.json, the run config, `extra`,
#                                          optimizer step + hparams, per file its size, sha256, tensor index
#     model-pp{p}-tp{t}.safetensors        stage p's weights as held by TP rank t (written by dp rank 0):
#                                          HF names, TP-LOCAL pieces (q_proj: rank t's H/tp heads' rows)
#     optim-pp{p}-tp{t}-dp{d}.safetensors  that rank's AdamW shards: master/NAME, exp_avg/NAME,
#                                          exp_avg_sq/NAME (ZeRO 0: dp rank 0 only, the others are copies)
#     rng-rank{r}.pt                       global rank r's torch CPU (+ CUDA) and python `random` states
# How a piece was cut (its "kind", from Transformer.hf_slots) and how a reader glues it back:
#   col    rows split (q/k/v, gate/up, q/k/v bias)   full = cat(pieces of tp ranks 0..tp-1, dim 0)
#   row    columns split (o_proj, down_proj)         full = cat(pieces, dim 1)
#   vocab  rows split; padding rows NOT stored       full = cat(pieces, dim 0)
#   rep    replicated (norm weights)                 full = tp rank 0's piece (the only one stored)
# Optimizer pieces are finer: flat ZeRO ranges of the TP-local tensors (AdamW.state_dict). Loading in ANOTHER layout
# rebuilds each full HF tensor this rank needs from its pieces' files, then cuts it (all ranks see one filesystem).
#
# Crash safety: all ranks write into <folder>.tmp-save; after a barrier rank 0 checks that every expected file arrived,
# writes manifest.json (the commit record) and renames the folder into place, so latest_checkpoint() never picks a save
# that died halfway. Checksums catch what a rename cannot (a file damaged later: full disk, bad copy, truncation):
# load_checkpoint refuses it and names the newest complete checkpoint before it.

CKPT_FORMAT, CKPT_VERSION = "nanotron-checkpoint", 1
_CFG_IGNORED = ("bos_token_id", "eos_token_id")   # config fields that do not change the weights or the math


def _sha256(path, chunk: int = 1 << 24) -> str:
    """sha256 of a file, read in 16 MiB blocks (a full read: the cost of trusting a file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _file_entry(path: Path, index: dict | None = None) -> dict:
    """The manifest entry of a written file: {name: {bytes, sha256, tensors}}."""
    return {path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path), "tensors": index or {}}}


def _write_safetensors(path: Path, tensors: dict, index: dict, **meta) -> dict:
    """One safetensors file that describes itself: the per-tensor index (how each piece was cut) and any
    extra metadata go into its header as JSON, so the file alone says what it holds. Returns its entry."""
    from safetensors.torch import save_file
    header = {"format": "pt", "nanotron_index": json.dumps(index), **{k: json.dumps(v) for k, v in meta.items()}}
    save_file(tensors, str(path), metadata=header)
    return _file_entry(path, index)


def _model_shards(model: Transformer) -> tuple[dict, dict]:
    """({hf_name: this rank's TP-local piece}, {hf_name: how it was cut}) of this rank's stage."""
    mesh, tensors, index = model.mesh, {}, {}
    for name, slot in model.hf_slots().items():
        if slot.kind == "rep" and mesh.tp_rank > 0:
            continue                                         # identical on every TP rank: rank 0 stores it
        t = slot.local(slot.param.detach())
        if slot.kind == "vocab":                             # padding rows depend on tp: never stored
            t = t[: vocab_shard(slot.full_shape[0], mesh.tp, mesh.tp_rank)[2]]
        tensors[name] = t.clone()       # a copy: safetensors refuses shared memory (q, k, v view one qkv weight)
        index[name] = {"kind": slot.kind, "tp": mesh.tp, "tp_rank": mesh.tp_rank,
                       "full_shape": list(slot.full_shape), "shape": list(t.shape)}
    return tensors, index


def _optim_shards(optimizer) -> tuple[dict, dict, dict]:
    """AdamW.state_dict() as safetensors tensors {"master/NAME": .., ..}, its piece index, and its scalars."""
    sd = optimizer.state_dict()                              # its tensors are copies already
    pieces = sd["tensors"].items()
    tensors = {f"{k}/{name}": piece[k] for name, piece in pieces for k in _OPT_KEYS}
    index = {name: {k: v for k, v in piece.items() if k not in _OPT_KEYS} for name, piece in pieces}
    return tensors, index, {"step": sd["step"], "zero_stage": optimizer.dp.stage, "hparams": sd["hparams"]}


def _rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _require_allocated(model, what: str):
    """ZeRO-3 frees the full params between steps: reading or writing them then would touch freed memory."""
    _require(all(_allocated(p) for p in model.parameters()), f"{what}: the model's parameters are freed (ZeRO-3 "
             "shards them between steps); pass the optimizer so they can be gathered", RuntimeError)


def save_checkpoint(folder, model: Transformer, optimizer, mesh, step: int, extra: dict | None = None,
                    config: dict | None = None) -> Path:
    """Write a resumable checkpoint of this job into `folder` (layout: the section comment). EVERY rank calls it
    (barriers inside; ZeRO-3 gathers). optimizer: build_optimizer's AdamW, or None for weights only. extra: JSON state
    to resume with (sampler position ...), config: the run config (dict or dataclass), both stored in manifest.json."""
    folder, mesh, dp = Path(folder), mesh or model.mesh, getattr(optimizer, "dp", None)
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    for what, obj in (("extra", extra), ("config", config)):
        try:                                    # fail before any rank writes a byte
            json.dumps(obj)
        except (TypeError, ValueError) as e:
            raise TypeError(f"save_checkpoint: `{what}` goes into manifest.json and must be JSON-serialisable: "
                            f"{e}") from None
    t0, tmp = time.time(), folder.with_name(f"{folder.name}.tmp-save")
    if mesh.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # the leftovers of a save that crashed
        tmp.mkdir(parents=True)
    mesh.barrier()
    p, t, d, r = mesh.pp_rank, mesh.tp_rank, mesh.dp_rank, mesh.rank
    files, opt_meta = {}, None
    # ZeRO-3: every param full for the duration (a collective over dp); stage 0-2: a no-op
    with dp.gathered_params() if dp is not None else contextlib.nullcontext():
        _require_allocated(model, "save_checkpoint")
        if d == 0:                              # the dp replicas hold the same weights: one writes
            files.update(_write_safetensors(tmp / f"model-pp{p}-tp{t}.safetensors", *_model_shards(model)))
    if optimizer is not None:
        tensors, index, opt_meta = _optim_shards(optimizer)
        if dp.stage >= 1 or d == 0:             # ZeRO 0: every dp rank owns everything, one copy is enough
            files.update(_write_safetensors(tmp / f"optim-pp{p}-tp{t}-dp{d}.safetensors", tensors, index, **opt_meta))
    torch.save(_rng_state(), tmp / f"rng-rank{r}.pt")
    files.update(_file_entry(tmp / f"rng-rank{r}.pt"))
    part = {"rank": r, "layer_range": list(model.layer_range), "files": files, "optimizer": opt_meta}
    (tmp / f"part-rank{r}.json").write_text(json.dumps(part))
    mesh.barrier()                              # every rank's files are on disk
    if r == 0:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        n_bytes = _commit(tmp, folder, mesh, model.cfg.to_hf(dtype), step, extra, config, dp)
        print(f"save_checkpoint: step {step} -> {folder} (tp={mesh.tp} pp={mesh.pp} dp={mesh.dp}, "
              f"{n_bytes / 2 ** 20:.1f} MiB, {time.time() - t0:.1f}s)")
    mesh.barrier()                              # nobody returns before the folder exists
    return folder


def _commit(tmp: Path, folder: Path, mesh, model_config: dict, step, extra, config, dp) -> int:
    """Rank 0 after all wrote: check no file is missing, write manifest.json LAST, rename into place. Returns bytes."""
    parts = []
    for r in range(mesh.world):
        f = tmp / f"part-rank{r}.json"
        _require(f.is_file(), f"save_checkpoint: rank {r} did not finish writing into {tmp}", RuntimeError)
        parts.append(json.loads(f.read_text()))
        f.unlink()
    files = {name: e for part in parts for name, e in sorted(part["files"].items())}
    want = {f"model-pp{p}-tp{t}.safetensors" for p in range(mesh.pp) for t in range(mesh.tp)}
    want |= {f"rng-rank{r}.pt" for r in range(mesh.world)}
    if dp is not None:
        want |= {f"optim-pp{p}-tp{t}-dp{d}.safetensors" for p in range(mesh.pp) for t in range(mesh.tp)
                 for d in range(mesh.dp if dp.stage >= 1 else 1)}
    _require(want <= files.keys(), f"save_checkpoint: files missing from {tmp}: {sorted(want - files.keys())}",
             RuntimeError)
    manifest = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "step": step,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "layout": {"tp": mesh.tp, "pp": mesh.pp, "dp": mesh.dp, "world": mesh.world,
                           "zero_stage": dp.stage if dp is not None else None,
                           "partition": sorted({tuple(part["layer_range"]) for part in parts})},
                "model_config": model_config, "config": config, "extra": extra,
                "optimizer": parts[0]["optimizer"], "files": files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    old = folder.with_name(f"{folder.name}.old-save")
    if folder.exists():                         # re-saving a step: the old copy is deleted only once the new
        shutil.rmtree(old, ignore_errors=True)  # one is in place (a rename cannot replace a full folder)
        os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        if old.exists() and not folder.exists():
            os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return sum(e["bytes"] for e in files.values())


class CheckpointDamaged(ValueError):
    """A checkpoint whose manifest or files are not what its save wrote (cut, flipped, missing, edited)."""


def read_manifest(folder) -> dict:
    """manifest.json of a checkpoint folder, checked for the keys a reader needs."""
    folder, path = Path(folder), Path(folder) / "manifest.json"
    _require(folder.is_dir(), f"checkpoint {folder}: no such folder", FileNotFoundError)
    _require(path.is_file(), f"checkpoint {folder}: no manifest.json. Not a checkpoint, or a save that did not "
             "finish (the manifest is written last)", FileNotFoundError)
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointDamaged(f"checkpoint {folder} is damaged: manifest.json: not valid JSON ({e})") from None
    _require(isinstance(m, dict) and m.get("format") == CKPT_FORMAT,
             f"checkpoint {path}: format is not {CKPT_FORMAT!r}")
    _require(m.get("version") == CKPT_VERSION,
             f"checkpoint {path}: format version {m.get('version')!r}, this nanotron reads {CKPT_VERSION}")
    missing = [k for k in ("step", "layout", "model_config", "files", "optimizer") if k not in m]
    _require(not missing, f"checkpoint {folder} is damaged: manifest.json lacks the keys {missing}", CheckpointDamaged)
    return m


class CheckpointReader(contextlib.ExitStack):
    """The read side of a checkpoint of any layout, in ONE process (no torch.distributed): manifest, ModelConfig, full
    HF tensors glued from their TP pieces, optimizer pieces, RNG states (for load_checkpoint and merge.py). Each file
    is verified (size, sha256) when first opened. An ExitStack: the files stay open until it exits."""
    def __init__(self, folder):
        super().__init__()
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.config = ModelConfig.from_hf(self.manifest["model_config"])
        self._open = {}
        self.callback(self._open.clear)         # runs last on exit, after the files it holds are closed
        # hf_name -> [(file, piece info)], files in sorted order (so a tied embedding's stage-0 copy comes first)
        self.model_index, self.optim_index = {}, {}
        for fname, entry in sorted(self.manifest["files"].items()):
            if fname.startswith(("model-", "optim-")):
                index = self.model_index if fname.startswith("model-") else self.optim_index
                for name, info in entry["tensors"].items():
                    index.setdefault(name, []).append((fname, info))

    def _check(self, ok, what: str):
        _require(ok, f"checkpoint {self.folder} is damaged: {what}", CheckpointDamaged)

    def verify(self, fname: str) -> Path:
        """The path of a file of this checkpoint, after checking it is there, complete and unaltered."""
        entry, path = self.manifest["files"].get(fname), self.folder / fname
        self._check(entry is not None, f"{fname} is not listed in manifest.json")
        self._check(path.is_file(), f"{fname} is missing (manifest.json lists it)")
        self._check((size := path.stat().st_size) == entry["bytes"], f"{fname} has {size} bytes, manifest.json says "
                    f"{entry['bytes']} (truncated or overwritten)")
        self._check(_sha256(path) == entry["sha256"], f"{fname} fails its sha256 checksum (changed after the save)")
        return path

    def _file(self, fname: str):
        if fname not in self._open:
            from safetensors import safe_open
            self._open[fname] = self.enter_context(safe_open(str(self.verify(fname)), framework="pt"))
        return self._open[fname]

    def model_names(self) -> list[str]:
        """The HF tensor names of the whole model (tied: no lm_head.weight); raises if a model file lacks one."""
        tied = self.config.tie_word_embeddings
        names = [n for n in hf_tensor_names(self.config) if not (tied and n == "lm_head.weight")]
        missing = [n for n in names if n not in self.model_index]
        self._check(not missing, f"{len(missing)} tensor(s) of the model are in no model file: {missing[:5]}")
        return names

    def tensor(self, name: str, expect_shape=None) -> torch.Tensor:
        """The full HF tensor `name` (dtype as saved), glued from the TP pieces of the saving layout."""
        pieces = self.model_index.get(name)
        self._check(pieces, f"tensor {name!r} is in no model file")
        # a tied embedding sits on two stages: equal copies, keep the first (reversed: the first one wins)
        by_tp = {info["tp_rank"]: (fname, info) for fname, info in reversed(pieces)}
        info = pieces[0][1]
        kind, shape = info["kind"], tuple(info["full_shape"])
        ranks = [0] if kind == "rep" else list(range(info["tp"]))
        lost = [r for r in ranks if r not in by_tp]
        self._check(not lost, f"tensor {name!r} lacks the pieces of tp ranks {lost}")
        parts = []
        for fname, info in (by_tp[r] for r in ranks):
            parts.append(self._file(fname).get_tensor(name))
            self._check(list(parts[-1].shape) == info["shape"], f"{fname}: tensor {name!r} has shape "
                        f"{list(parts[-1].shape)}, its index says {info['shape']}")
        full = parts[0] if kind == "rep" else torch.cat(parts, 1 if kind == "row" else 0)
        self._check(tuple(full.shape) == shape, f"tensor {name!r} glues to shape {tuple(full.shape)}, its index says "
                    f"{shape}")
        if expect_shape is not None and tuple(expect_shape) != shape:
            raise ValueError(f"checkpoint {self.folder}: tensor {name!r} has shape {shape}, the model expects "
                             f"{tuple(expect_shape)}")
        return full

    def optimizer_state_dicts(self, names) -> list[dict]:
        """AdamW.load_state_dict's input for the HF tensors `names`: one dict per optim file that holds a
        piece of them (each piece complete with its master / exp_avg / exp_avg_sq)."""
        opt = self.manifest["optimizer"]
        _require(opt is not None, f"checkpoint {self.folder} holds weights only (no optimizer state): a run cannot "
                 f"resume from it; start a new one from its weights: python merge.py {self.folder}, then --model "
                 f"{self.folder}/hf")
        lost = [n for n in names if n not in self.optim_index]
        self._check(not lost, f"no optimizer state for {len(lost)} tensor(s): {lost[:5]}")
        sds = {}
        for name in names:
            for fname, info in self.optim_index[name]:
                f = self._file(fname)
                piece = dict(info, **{k: f.get_tensor(f"{k}/{name}") for k in _OPT_KEYS})
                sds.setdefault(fname, {"step": opt["step"], "tensors": {}})["tensors"][name] = piece
        return [{"step": opt["step"], "tensors": {}}, *sds.values()]   # never empty: it carries the step

    def rng_state(self, rank: int) -> dict:
        return torch.load(self.verify(f"rng-rank{rank}.pt"), weights_only=True)


def config_mismatches(saved: ModelConfig, cfg: ModelConfig) -> list[str]:
    """The fields in which a checkpoint's model config and this model's differ, as 'name (checkpoint x,
    model y)' (empty: the weights fit). Token ids that change neither the weights nor the math are ignored."""
    return [f"{f.name} (checkpoint {getattr(saved, f.name)!r}, model {getattr(cfg, f.name)!r})"
            for f in dataclasses.fields(ModelConfig)
            if f.name not in _CFG_IGNORED and getattr(saved, f.name) != getattr(cfg, f.name)]


def checkpoint_model_config(path) -> dict | None:
    """The HF config.json dict of a checkpoint's model, from its manifest alone: path is a checkpoint folder or a run
    folder (its latest step_N); None when it holds none. Check it before spending a minute building a model:
    config_mismatches(ModelConfig.from_hf(it), the model's)."""
    path = Path(path)
    folder = path if (path / "manifest.json").is_file() else latest_checkpoint(path)
    return None if folder is None else read_manifest(folder)["model_config"]


def _steps(root: Path) -> list[tuple[int, Path]]:
    """(N, folder) of every step_N folder under root that has a manifest.json (a committed save), by N."""
    return sorted((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else ())
                  if (m := re.fullmatch(r"step_(\d+)", p.name)) and (p / "manifest.json").is_file())


def is_complete(folder) -> bool:
    """Cheap: the manifest reads and every file it lists is there with its size (sha256: when loaded)."""
    try:
        files = read_manifest(folder)["files"]
        return all((Path(folder) / f).is_file() and (Path(folder) / f).stat().st_size == e["bytes"]
                   for f, e in files.items())
    except (ValueError, OSError, KeyError, TypeError):
        return False


def _resume_hint(folder: Path) -> str:
    """What to do when `folder` is damaged: name the newest complete checkpoint saved before it."""
    m = re.fullmatch(r"step_(\d+)", folder.name)
    older = [p for n, p in _steps(folder.parent) if p != folder and (m is None or n < int(m.group(1)))]
    good = next((p for p in reversed(older) if is_complete(p)), None)
    if good is None:
        return f"there is no complete checkpoint before it in {folder.parent}: start over with --resume never"
    return f"the newest complete checkpoint is {good}: resume from it with --resume {good}"


def load_checkpoint(folder, model: Transformer, optimizer=None, mesh=None, load_rng: bool = True,
                    optimizer_state: bool = True) -> dict:
    """Load a checkpoint saved in ANY layout (tp / pp / dp / ZeRO may all differ) into this rank's model and optimizer;
    returns the manifest. Every rank calls it (ZeRO-3 gathers; stage 1/2's optimizer load all-gathers). optimizer=None
    loads the weights only, before build_optimizer; after it pass the optimizer and optimizer_state=False (its fp32
    master takes the loaded weights: Megatron's --no-load-optim). RNG states are restored only in the saving job's tp,
    pp, dp (rank r of another layout is another rank). A damaged one's error names the last good one."""
    folder, mesh, dp = Path(folder), mesh or model.mesh, getattr(optimizer, "dp", None)
    # an optimizer's params have a main_grad; in bf16 its master is a COPY that the first step would publish back
    _require(optimizer is not None or not any(hasattr(p, "main_grad") and p.dtype != torch.float32
                                              for p in model.parameters()),
             "load_checkpoint: build_optimizer already ran on this model, and its fp32 master weights would undo this "
             "load at the first step: pass the optimizer (optimizer_state=False for the weights only)", RuntimeError)
    try:
        with CheckpointReader(folder) as ck:
            if diffs := config_mismatches(ck.config, model.cfg):
                raise ValueError(f"checkpoint {folder} was saved from a different model config: {'; '.join(diffs)}. "
                                 "Resume it with the --model it was trained with, or start a new run in another --out")
            if optimizer is not None and optimizer_state and ck.manifest["optimizer"] is None:
                ck.optimizer_state_dicts([])                   # raises the "no optimizer state" error
            # ZeRO-3: writes into the gathered params are dropped on exit; the loaded master becomes the params below
            with dp.gathered_params() if dp is not None else contextlib.nullcontext():
                _require_allocated(model, "load_checkpoint")
                model._copy_hf((name, ck.tensor(name, slot.full_shape)) for name, slot in model.hf_slots().items())
                if optimizer is not None and not optimizer_state:
                    optimizer.reload_model_params()
            if optimizer is not None and optimizer_state:      # rewrites the params from the loaded master
                names = list(dict.fromkeys(name for name, *_ in optimizer._pieces))
                optimizer.load_state_dict(ck.optimizer_state_dicts(names))
            saved = ck.manifest["layout"]
            same = all(saved[k] == getattr(mesh, k) for k in ("tp", "pp", "dp"))
            if load_rng and same:
                _set_rng_state(ck.rng_state(mesh.rank))
    except (CheckpointDamaged, FileNotFoundError) as e:
        raise type(e)(f"{e}; {_resume_hint(folder)}") from None
    note = ("restored" if same else "NOT restored (another layout: rank r is not the same rank)") \
        if load_rng else "not requested"
    if mesh.rank == 0:
        print(f"load_checkpoint: step {ck.manifest['step']} from {folder} (saved as tp={saved['tp']} "
              f"pp={saved['pp']} dp={saved['dp']} zero={saved['zero_stage']}; now tp={mesh.tp} pp={mesh.pp} "
              f"dp={mesh.dp}), optimizer {'loaded' if dp is not None and optimizer_state else 'skipped'}, RNG {note}")
    return ck.manifest


def latest_checkpoint(root) -> Path | None:
    """The step_N folder under root with the highest N that has a manifest.json (a finished save), or None.
    A damaged one qualifies: loading refuses it and names the newest complete one (the user decides)."""
    found = _steps(Path(root))
    return found[-1][1] if found else None


# ---- benchmark: the MFU definition, `--bench` -------------------------------------------------------
# MFU (model FLOPs utilisation) = achieved useful FLOP/s / the hardware's peak, the repo's one definition (sft.py,
# --bench): training FLOPs per token in the PaLM convention (Chowdhery et al. 2022, app. B), 6N + 12*L*H*D*T:
#   6N          every matmul parameter costs 2 FLOPs per token forward and 4 backward. N = the MATMUL parameters:
#               q/k/v/o, gate/up/down of every layer and the LM head (V*Hd, also when tied); lookups, norms: none.
#   12*L*H*D*T  attention's q.k^T and p.v (2 FLOPs per multiply-add, x3 for forward + backward) against T keys
#               (PaLM counts all T, not the causal T/2). Packed: T = sum(L_i^2) / sum(L_i), token-weighted.
# Recompute under activation checkpointing and a frozen reference model's forward are NOT counted: MFU counts useful
# training FLOPs. Qwen3-0.6B at T=2048: 4.985 GFLOP per token.

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}   # dense bf16 per GPU (vendor sheets, SXM)


def flops_per_token(cfg: ModelConfig, seq_len: float) -> float:
    """Training FLOPs per token, 6N + 12*L*H*D*T with N = the matmul parameters (the comment above)."""
    c = cfg
    layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim         # q, k, v
             + c.num_heads * c.head_dim * c.hidden_size                             # o
             + 3 * c.hidden_size * c.intermediate_size)                             # gate, up, down
    N = c.num_layers * layer + c.vocab_size * c.hidden_size                          # + the LM head
    return 6.0 * N + 12.0 * c.num_layers * c.num_heads * c.head_dim * seq_len


def peak_tflops(device) -> float | None:
    """Peak dense bf16 TFLOP/s of one GPU of this kind, or None (CPU, or a GPU not in PEAK_TFLOPS: MFU n/a)."""
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "CPU"
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# `python nanotron.py --bench`: one training step of a model shape (--shape) on one GPU, ours against what users
# would otherwise pick, HF transformers with Liger-Kernel's patches (and plain HF), at the same tokens per step.
# Ours: Transformer(use_kernels=True), S sequences PACKED into mb_tokens micro-batches, fused linear cross-entropy,
# build_optimizer(zero_stage=0) AdamW (fp32 master weights and grads), clip. HF: the same config (to_hf), SDPA,
# dense [mb, T] micro-batches, torch.optim.AdamW(fused=True) on the bf16 params. Each system runs in its own
# subprocess (its own peak memory) through one timer (_time_steps) into one table. Measurements: BENCHMARKS.md.

def _bench_ours(cfg, ids, mb_tokens: int, ckpt: bool, dev):
    """Our training step on ids [S, T]: packed micro-batches of mb_tokens tokens (mb_tokens / T sequences)."""
    S, T = ids.shape
    model = Transformer(cfg, Mesh(device=dev), use_kernels=True, dtype=torch.bfloat16, device=dev).init_random(0)
    model.activation_checkpointing = ckpt
    opt = build_optimizer(model, zero_stage=0, lr=3e-4, weight_decay=0.1)
    per = mb_tokens // T                            # sequences per micro-batch
    cu, pos = cu_seqlens_from_lengths([T] * per, device=dev)
    mbs = [(x, next_token_labels(x, cu)) for x in ids.reshape(-1).split(per * T)]       # x: [per * T] tokens
    n_labels = S * (T - 1)                          # the last token of each sequence has no label

    def step(i):
        opt.zero_grad()
        for k, (x, labels) in enumerate(mbs):       # the dp grad sync (a no-op here) waits for the last one
            with opt.no_sync() if k < len(mbs) - 1 else contextlib.nullcontext():
                total, _ = model.loss(model(x, pos, cu, T), labels)
                (total / n_labels).backward()       # micro-batch sums add up to the step's mean
        opt.clip_grad_norm_(1.0)
        opt.step(lr=lr_at(i, 100, 1000, 3e-4))
        return total.detach() * len(mbs) / n_labels
    return model, step, f"packed {len(mbs)}x{mb_tokens} tok, ckpt={'on' if ckpt else 'off'}"


def _bench_hf(cfg, ids, mb: int, liger: bool, dev):
    """HF's Qwen3ForCausalLM (LlamaForCausalLM for a Llama shape) step on ids [S, T] in dense micro-batches."""
    import transformers
    arch = "Llama" if cfg.model_type == "llama" else "Qwen3"
    if liger:   # patches the module classes, so it must run BEFORE the model is built
        import liger_kernel.transformers as lk
        getattr(lk, f"apply_liger_kernel_to_{arch.lower()}")()
    hcfg = getattr(transformers, f"{arch}Config").from_dict({**cfg.to_hf(), "use_cache": False})
    hcfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = getattr(transformers, f"{arch}ForCausalLM")(hcfg).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=dev.type == "cuda")
    S = ids.shape[0]

    def step(i):
        for s in range(0, S, mb):
            loss = model(input_ids=ids[s:s + mb], labels=ids[s:s + mb]).loss     # HF shifts the labels
            (loss * (mb / S)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(i, 100, 1000, 3e-4)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return model, step, f"dense {S // mb}x[{mb}, {ids.shape[1]}], sdpa, AdamW{' fused' if dev.type == 'cuda' else ''}"


def _time_steps(step, warmup: int, steps: int, dev) -> tuple[float, float]:
    """The one timer: (seconds per step, last loss). `warmup` untimed steps (compile, autotune, allocator),
    then `steps` steps between two CUDA events, ONE host sync after them (on CPU: perf_counter)."""
    for i in range(warmup):
        step(i)
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(warmup + i)
    if dev.type != "cuda":
        return (time.perf_counter() - t0) / steps, float(loss)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / steps, float(loss)


def _print_table(rows: list[dict], title: str):
    """The one table: every row, with speed and memory ratios to the fastest HF peer."""
    peers = [r for r in rows if r["system"].startswith("hf") and "tokens_per_s" in r]
    best = max(peers, key=lambda r: r["tokens_per_s"]) if peers else None
    print(f"\n{title}; ratios vs {best['system'] + ' #' + str(best['sample']) if best else 'no peer'}")
    print("| system | config | tokens/s | step ms | MFU | peak GB | speed x | memory x |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"| {r['system']} #{r['sample']} | {r['config']} | FAILED: {r.get('error')} | | | | | |")
            continue
        sp = f"{r['tokens_per_s'] / best['tokens_per_s']:.3f}" if best else "-"
        mem = f"{best['peak_gb'] / r['peak_gb']:.2f}" if best and r["peak_gb"] else "-"
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"| {r['system']} #{r['sample']} | {r['config']} | {r['tokens_per_s']:,} | {r['step_ms']} | "
              f"{mfu} | {r['peak_gb']} | {sp} | {mem} |")


def bench_one(args) -> None:
    """One system (args.one), each of its configs in this process: one `RESULT {json}` line per config."""
    dev = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    cfg = preset_config("tiny", tie_word_embeddings=True) if args.tiny else preset_config(args.shape)
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.seqs, args.seq_len), device=dev, generator=g)  # [S, T]
    peak, fpt = peak_tflops(dev), flops_per_token(cfg, args.seq_len)
    specs = args.configs.split(",") if args.one == "ours" else [str(args.mb if args.one == "hf_liger" else args.hf_mb)]
    for spec in specs:
        if args.one == "ours":
            mb_tokens, ckpt = (int(v) for v in spec.split(":"))
            if mb_tokens % args.seq_len or args.seqs * args.seq_len % mb_tokens:
                raise ValueError(f"--configs {spec}: mb_tokens must be a multiple of --seq-len {args.seq_len} that "
                                 f"divides --seqs x --seq-len = {args.seqs * args.seq_len}")
            model, step, desc = _bench_ours(cfg, ids, mb_tokens, bool(ckpt), dev)
        else:
            model, step, desc = _bench_hf(cfg, ids, int(spec), args.one == "hf_liger", dev)
        row = dict(system=args.one, config=desc, tokens_per_step=ids.numel())
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            seconds, loss = _time_steps(step, args.warmup, args.steps, dev)
            tok_s = ids.numel() / seconds
            row.update(tokens_per_s=round(tok_s), step_ms=round(1e3 * seconds, 1), last_loss=round(loss, 4),
                       mfu=None if peak is None else round(tok_s * fpt / (peak * 1e12), 4),
                       peak_gb=round(torch.cuda.max_memory_allocated(dev) / 1e9, 2) if dev.type == "cuda" else 0.0)
        except torch.OutOfMemoryError as e:
            row["error"] = "OOM: " + str(e).splitlines()[0][:100]
        print("RESULT " + json.dumps(row), flush=True)
        if args.profile and dev.type == "cuda" and "error" not in row:       # where one step's GPU time goes
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step(0)
                torch.cuda.synchronize()
            print(f"-- profile of {args.one} {desc} --\n"
                  + prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
        del model, step
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def bench(argv: list[str]) -> int:
    """`--bench`: each system in a subprocess (`--one`), then one table. Returns the exit code: 1 when a run
    failed (crashed, OOM: its row says so), else 0. Without a GPU only the tiny smoke test runs."""
    args = _parser().parse_args(argv)
    if args.tiny:                                   # Liger-Kernel needs CUDA: the tiny peer is plain HF
        args.seqs, args.seq_len, args.steps, args.warmup, args.mb, args.hf_mb = 4, 64, 2, 1, 4, 2
    args.configs = args.configs or ("128:0,64:1" if args.tiny else "16384:0,8192:0,32768:1")
    args.systems = args.systems or ("ours,hf" if args.tiny else "ours,hf_liger,hf")
    if args.one:
        bench_one(args)
        return 0
    _require(args.tiny or torch.cuda.is_available(), "--bench times a model shape (--shape) on a CUDA GPU and this "
             "machine has none; --bench --tiny is the CPU smoke test of the same harness")
    rows, seen = [], {}
    for system in args.systems.split(","):
        seen[system] = seen.get(system, 0) + 1
        # the same flags (a worker ignores the driver's --systems and --out) + the worker's own --one
        cmd = [sys.executable, os.path.abspath(__file__), "--bench", *argv, "--one", system]
        print("$ " + " ".join(cmd[1:]), flush=True)
        got = len(rows)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
            for line in p.stdout:                   # streamed: a run that dies keeps its log
                print("  " + line.rstrip("\n"), flush=True)
                if line.startswith("RESULT "):
                    rows.append(dict(json.loads(line[7:]), sample=seen[system]))
        if p.returncode or len(rows) == got:
            rows.append(dict(system=system, config="", error=f"exit code {p.returncode}", sample=seen[system]))
    shape = "tiny preset (CPU)" if args.tiny else f"{args.shape} shape"
    _print_table(rows, f"{shape}, {args.seqs} x {args.seq_len} tokens per step; MFU: 6N + 12LHDT (PaLM) over "
                       f"the GPU's peak; peak = max_memory_allocated (GB = 1e9 B)")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_train.json").write_text(json.dumps(rows, indent=1))
    failed = [f"{r['system']} #{r['sample']} ({r['error']})" for r in rows if "error" in r]
    if failed:
        print(f"nanotron.py: error: {len(failed)} bench run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


# ---- self-test -------------------------------------------------------------------------------------
def selftest_pp():
    """CPU, pp = 1: AFAB = 1F1B = one plain forward/backward; the partition charges the head to the last stage."""
    cfg, g = tiny_config(num_layers=4), torch.Generator().manual_seed(0)
    mbs, lengths_all = [], []
    for lengths in ([5, 3], [7], [2, 4, 6]):
        cu, pos = cu_seqlens_from_lengths(lengths)
        ids = torch.randint(0, cfg.vocab_size, (int(cu[-1]),), generator=g)
        mbs.append(dict(input_ids=ids, positions=pos, cu_seqlens=cu, max_seqlen=max(lengths),
                        labels=next_token_labels(ids, cu)))
        lengths_all += lengths
    grads = {}
    for schedule in ("afab", "1f1b", "plain"):
        model = build_stage(cfg, Mesh(), use_kernels=False).init_random(1)
        if schedule == "plain":
            cu, pos = cu_seqlens_from_lengths(lengths_all)
            ids = torch.cat([mb["input_ids"] for mb in mbs])
            total, n = model.loss(model(ids, pos, cu), next_token_labels(ids, cu))
            (total / n).backward()
            loss = total.item()
        else:
            loss, n = pipeline_step(model, model.mesh, mbs, schedule)
        grads[schedule] = (loss, [q.grad.clone() for q in model.parameters()])
    for schedule in ("afab", "1f1b"):
        assert abs(grads[schedule][0] - grads["plain"][0]) < 1e-4 * abs(grads["plain"][0])
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[schedule][1], grads["plain"][1]))
    parts = stage_layers(preset_config("qwen3-0.6b"), 4)
    assert parts[-1][1] - parts[-1][0] < parts[0][1] - parts[0][0]
    print(f"pipeline selftest OK: AFAB = 1F1B = plain over {len(mbs)} micro-batches, loss/token "
          f"{grads['plain'][0] / n:.4f}; Qwen3-0.6B-shaped pp=4 partition {parts}")


def selftest():
    """CPU, the torch path: forward/backward of a tiny Qwen3 on 3 packed sequences, equal to running each
    sequence alone (no cross-sequence leakage); activation checkpointing must not change the loss."""
    torch.manual_seed(0)
    t0, cfg = time.time(), tiny_config()
    model = Transformer(cfg, use_kernels=False).init_random(seed=0)
    lengths = [5, 9, 3]
    cu, pos = cu_seqlens_from_lengths(lengths)
    ids = torch.randint(0, cfg.vocab_size, (int(cu[-1]),))
    labels, hidden = next_token_labels(ids, cu), model(ids, pos, cu, max(lengths))
    total, n = model.loss(hidden, labels)
    (total / n).backward()
    g = model.layers[0].attn.qkv.weight.grad.norm().item()
    packed = model.logits(hidden)
    with torch.no_grad():
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            c1, p1 = cu_seqlens_from_lengths([e - s])
            alone = model.logits(model(ids[s:e], p1, c1))
            assert torch.allclose(alone, packed[s:e], atol=1e-5), "packed != per-sequence logits"
    model.activation_checkpointing = True
    total2, _ = model.loss(model(ids, pos, cu, max(lengths)), labels)
    assert torch.allclose(total, total2), "activation checkpointing changed the loss"
    print(f"nanotron selftest OK: {cfg.model_type} L={cfg.num_layers} Hd={cfg.hidden_size} V={cfg.vocab_size}, "
          f"N={int(cu[-1])} tokens in {len(lengths)} sequences, loss/token {(total / n).item():.4f} "
          f"(ln V = {math.log(cfg.vocab_size):.4f}), |grad qkv[0]| {g:.3e}, {time.time() - t0:.2f}s")


def selftest_kernels():
    """The fast path against the readable one: the same model with kernels.py's Triton kernels and with the
    torch path, on a GPU (kernels.py runs Triton on CUDA tensors only). SKIPPED where it cannot run."""
    if _kernels() is None or not torch.cuda.is_available():
        print(f"kernels path vs torch path: SKIPPED ({'no CUDA GPU' if _kernels() else 'no kernels.py'}; the "
              "torch path above is what runs here)")
        return
    dev, cfg = torch.device("cuda"), tiny_config()
    cu, pos = cu_seqlens_from_lengths([5, 9, 3], device=dev)
    ids = torch.randint(0, cfg.vocab_size, (17,), device=dev, generator=torch.Generator(dev).manual_seed(0))
    out = []
    for use_kernels in (True, False):
        model = Transformer(cfg, Mesh(device=dev), use_kernels=use_kernels).init_random(seed=0)
        total, n = model.loss(model(ids, pos, cu, 9), next_token_labels(ids, cu))
        (total / n).backward()
        out += [total.item(), [p.grad for p in model.parameters()]]
    fast, gf, ref, gr = out
    err = max(((a - b).norm() / b.norm().clamp(min=1e-12)).item() for a, b in zip(gf, gr))
    assert abs(fast - ref) <= 1e-3 * abs(ref) and err < 1e-2, (fast, ref, err)    # tf32 inside Triton dots
    print(f"kernels path vs torch path OK on {torch.cuda.get_device_name(dev)}: loss {fast:.5f} vs {ref:.5f}, "
          f"max relative grad error {err:.1e}")


def _parser():
    import argparse
    ap = argparse.ArgumentParser(prog="nanotron.py", description="nanotron: runs its CPU self-test by default; "
                                 "--bench times a training step (one GPU) against HF transformers + Liger-Kernel.")
    add = ap.add_argument
    add("--debug", action="store_true", help="show the full traceback of every error")
    add("--bench", action="store_true", help="the benchmark instead of the self-test")
    add("--tiny", action="store_true", help="bench: CPU smoke test, the tiny preset, 4 x 64 tokens")
    add("--shape", default="qwen3-0.6b", choices=sorted(set(PRESETS) - {"tiny"}), help="bench: the model's shape")
    add("--systems", help="bench: in order, a repeat is another sample (ours,hf_liger,hf; --tiny: ours,hf)")
    add("--configs", help="bench, ours: mb_tokens:checkpointing(0|1),.. (16384:0,8192:0,32768:1; --tiny: 128:0,64:1)")
    add("--mb", type=int, default=16, help="bench, hf_liger: sequences per micro-batch")
    add("--hf-mb", type=int, default=8, help="bench, plain hf: sequences per micro-batch")
    add("--seqs", type=int, default=16, help="bench: sequences per optimizer step")
    add("--seq-len", type=int, default=2048, help="bench: tokens per sequence")
    add("--steps", type=int, default=10, help="bench: timed steps")
    add("--warmup", type=int, default=3, help="bench: untimed steps before them")
    add("--profile", action="store_true", help="bench: print the top kernels of one step per system")
    add("--out", default="", help="bench: also write the rows to OUT/bench_train.json")
    add("--one", choices=["ours", "hf", "hf_liger"], help=argparse.SUPPRESS)   # one system: the driver's worker
    return ap


def main(argv: list[str]) -> int:
    """The CLI: the self-test (seconds, CPU), or --bench. Returns the exit code."""
    if _parser().parse_args(argv).bench:
        return bench(argv)
    selftest()
    selftest_pp()
    selftest_kernels()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, OSError, TimeoutError) as e:   # expected errors: one line; --debug: the traceback
        if "--debug" in sys.argv:
            raise
        print(f"nanotron.py: error: {e}", file=sys.stderr)
        sys.exit(2)
