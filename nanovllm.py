"""nanovllm: a paged-attention inference engine, the rollout worker of ppo.py and the generator of eval.py.

Stands in for vLLM (and nano-vllm). Keeps vLLM's offline API (`LLM`, `SamplingParams`, `generate`,
`chat`, RequestOutput / CompletionOutput), a paged KV cache with a reference-counting block manager and
prefix caching, a continuous-batching scheduler (prefill and decode in one step, chunked prefill, FCFS,
preemption by recompute), CUDA graphs for decode, sampling on the GPU (temperature, top-k, top-p, min-p,
per-request seeds, log-probs), tensor parallelism, and what RL needs: `update_weights` from live tensors,
`sleep` / `wake_up`. Drops: the OpenAI server, beam search, LoRA, quantization, speculative decoding,
multi-modal inputs, pipeline parallelism, attention backends other than paged attention.

How it works. `LLM.generate` turns prompts into Requests; each step the Scheduler picks, under a token
budget, one token for every running sequence (decode) and chunks of prompts for new ones (prefill), and
the BlockManager gives each sequence the KV-cache blocks (pages of `block_size` tokens) it needs, reusing
blocks whose chained hash says they already hold the same prefix. The ModelRunner packs the step into
flat tensors (input_ids[N], positions[N], slot_mapping[N], block_table[B, blocks], context_lens[B]), runs
the model (its own Qwen3 / Qwen2 / Llama implementation: each layer writes its new K/V into the cache,
then attends over the pages), computes fp32 logits for the last token of each sequence and samples on
the GPU. A pure-decode step replays a CUDA graph captured for its (padded) batch size.

Commands:
    python nanovllm.py                                   # self-test on CPU: tiny random models, seconds
    python nanovllm.py --model PATH --prompt "2+2="      # one generation (PATH: an HF folder)
    python nanovllm.py --bench                           # GPU: the nano-vllm workload vs HF, one table
    pytest -q test_all.py -k nanovllm

First read (~600 lines: the engine at tp = 1, eager, one step at a time), in this order:
    1. the sequences and block manager sections (up to BlockManager.check()): plain Python, no tensors. How a
       sequence's tokens map to pages of the KV cache; how pages are shared (n > 1 forks, the prefix cache).
    2. the scheduler section: what one step runs: decodes + prefill chunks under a token budget, and
       preemption by recompute when pages run out.
    3. LLM._build_step, then LLM._finish and _fork: a scheduled step packed into flat tensors; its sampled
       tokens applied, samples forked, stops checked.
    4. Attention.forward and the torch fallbacks it calls, store_kv_ref and paged_attention_ref: each layer
       writes the new tokens' K/V into their pages, then attends over them.
    5. sample(): temperature, masks, one uniform per row, log-probs; then selftest().
Independent chapters after that, each opened by its own comment: CUDA graphs (ModelRunner.capture),
one-step-ahead decoding (LLM.step, _speculate), memory sizing (ModelRunner.setup), tensor parallelism
(TPGroup, Linear, Embedding, load_weights' shards, the executors), RL hooks (update_weights, sleep /
wake_up), loading, benchmark.

Numerics (ppo.py compares these log-probs with the trainer's): weights and activations in the model
dtype (bf16 on GPU, fp32 on CPU); the LM head accumulates in fp32 and its logits are fp32 (never rounded
to bf16); temperature divides those logits; top-k / top-p / min-p then mask tokens of the tempered
distribution. `logprobs_mode="processed_logprobs"` (the default) returns log-softmax of the logits after
temperature and masking: the exact distribution the token was drawn from (with top-k/top-p off it is
log_softmax(logits / T), what a trainer computes at the same temperature); "raw_logprobs" returns
log_softmax(logits) (T = 1, no masking). Greedy rows (temperature 0) report the raw view.

Legend: N packed tokens of a step, B sequences of a step, H query heads, Hkv kv heads, D head dim,
Hd hidden size, V vocab, P block size (tokens per KV page), L layers, tp tensor-parallel ranks.

Contents: config and outputs . model config . torch fallbacks . model . sequences . block manager .
          scheduler . sampler . model runner (+ RL hooks, CUDA graphs) . loading . executors (tensor
          parallelism) . LLM . benchmark . CLI and self-test
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections import OrderedDict, abc, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- config and outputs ----------------------------------------------------------------------------
# What a user hands in (one SamplingParams per request) and gets back (a RequestOutput holding n
# CompletionOutputs), with vLLM's names and defaults so that code written against vLLM runs unchanged.
# Kept: what RL and evaluation use (n samples, temperature, top-k / top-p / min-p, per-request seeds, stop
# tokens and strings, log-probs). Dropped: beam search, repetition / presence / frequency penalties, logit
# processors, guided decoding and prompt log-probs: most cost another pass over the [B, V] logits every
# step, and the RL loop needs none of them.


@dataclass
class SamplingParams:
    """How to sample one request, as vLLM's SamplingParams (same names, same defaults)."""
    n: int = 1                          # independent samples of the prompt (they share its KV blocks)
    temperature: float = 1.0            # 0 = greedy (exact argmax)
    top_p: float = 1.0                  # keep the smallest set of tokens whose probability sums to >= top_p
    top_k: int = -1                     # keep the k most likely tokens; -1 (or 0) = all
    min_p: float = 0.0                  # drop tokens with p < min_p * p(most likely token)
    max_tokens: int | None = 16         # new tokens at most (None = up to max_model_len)
    stop: str | list[str] | None = None  # stop when the text contains one of these (not included in text)
    stop_token_ids: list[int] | None = None  # stop on these tokens (the token is kept in token_ids)
    ignore_eos: bool = False            # keep going past the EOS token (benchmarks)
    seed: int | None = None             # per-request seed: the same seed gives the same sample, in any batch
    logprobs: int | None = None         # None: no log-probs; 0: the sampled token's; k: also the top k
    include_stop_str_in_output: bool = False  # keep the matched stop string at the end of text
    skip_special_tokens: bool = True    # in the detokenized text
    detokenize: bool = True             # False: text stays "" (a caller that decodes token_ids itself, as RL does)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if isinstance(self.stop_token_ids, int):
            raise ValueError(f"SamplingParams: stop_token_ids must be a list of ints; got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)                     # noqa: E731
        types = [(is_int(self.n) and is_int(self.top_k), "n and top_k must be ints"),
                 (self.max_tokens is None or is_int(self.max_tokens), "max_tokens must be an int or None"),
                 (self.logprobs is None or is_int(self.logprobs), "logprobs must be an int or None"),
                 (self.seed is None or is_int(self.seed), "seed must be an int or None"),
                 (all(is_int(t) for t in self.stop_token_ids), "stop_token_ids must be ints")]
        for ok, msg in types:     # (a float n or logprobs passed here used to fail mid-step, taking the batch along)
            if not ok:
                raise ValueError(f"SamplingParams: {msg}; got {self}")
        checks = [(self.n >= 1, "n must be >= 1"), (self.temperature >= 0, "temperature must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"), (self.top_k >= -1, "top_k must be -1 or >= 1"),
                  (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                  (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be >= 1 or None"),
                  (self.logprobs is None or self.logprobs >= 0, "logprobs must be None or >= 0"),
                  (all(s for s in self.stop), "stop strings must be non-empty"),
                  (self.detokenize or not self.stop, "stop strings need detokenize=True (they match the text)")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {msg}; got {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Logprob:
    """vLLM's per-token log-prob record: the value, its rank in the distribution (1 = most likely)."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class TokenLogprobs(abc.Sequence):
    """vLLM's per-token view of a sample's log-probs, [{token_id: Logprob}, ...], made on access from the flat
    list. Why lazy: RL reads the flat token_logprobs; building 1,000 samples x 70 tokens of dicts and Logprob
    objects at the end of every rollout cost ~0.2 s of host time, on the critical path of an RL step."""

    def __init__(self, ids: list[int], lps: list[float]):
        self.ids, self.lps = ids, lps

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return {self.ids[i]: Logprob(self.lps[i])}

    def __eq__(self, other):
        return list(self) == list(other)

    def __repr__(self):
        return repr(list(self))


@dataclass
class CompletionOutput:
    """One sample of a request. token_logprobs[i] is log p(token_ids[i]) (fp32, the view chosen by
    LLM(logprobs_mode=...)); logprobs is vLLM's form: per token {token_id: Logprob}, incl. the top k."""
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict] | None
    finish_reason: str | None          # "stop" (EOS, stop token or string) | "length" | "abort"
    stop_reason: int | str | None = None   # the stop token id or stop string that ended it (None for EOS)
    token_logprobs: list[float] | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """One request: its prompt and its n samples (vLLM's RequestOutput)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0         # prompt tokens served by the prefix cache


# ---- model config ----------------------------------------------------------------------------------
# The same field names as nanotron.ModelConfig (one vocabulary), parsed from an HF config.json. The
# engine refuses what it does not implement rather than computing a different model.

_ARCHS = ("qwen3", "qwen2", "llama")


@dataclass
class ModelConfig:
    """The architecture the engine builds: the dimensions of the legend (V, Hd, I, L, H, Hkv, D), RoPE and
    norm constants, the tie of the LM head to the embedding, the EOS ids and the checkpoint's dtype."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    model_type: str
    eos_token_id: list[int]
    torch_dtype: str = "bfloat16"

    @property
    def qk_norm(self) -> bool:        # Qwen3: RMSNorm over each head's q and k before RoPE
        return self.model_type == "qwen3"

    @property
    def qkv_bias(self) -> bool:       # Qwen2: bias on the q, k, v projections
        return self.model_type == "qwen2"

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in _ARCHS:
            raise ValueError(f"{where}: model_type {mt!r} is not supported; nanovllm runs {list(_ARCHS)}")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in (None, "default"):
            raise ValueError(f"{where}: rope scaling {rope!r} is not implemented (plain RoPE only)")
        for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
            if d.get(flag):
                raise ValueError(f"{where}: {flag}=true is not supported by nanovllm")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (SwiGLU/silu only)")
        H = d["num_attention_heads"]
        # HF's defaults for absent fields: kv heads = H (plain multi-head attention), head_dim = Hd / H; the
        # EOS id may be an int, a list or missing (generation_config.json can add more, see LLM.__init__)
        eos = d.get("eos_token_id")
        return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"], num_heads=H,
                   num_kv_heads=d.get("num_key_value_heads") or H, head_dim=d.get("head_dim") or d["hidden_size"] // H,
                   rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                   rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                   max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), model_type=mt,
                   eos_token_id=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
                   torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"))


# ---- torch fallbacks ---------------------------------------------------------------------------------
# kernels.py (Triton) runs the hot ops when it is importable: RMSNorm (+ residual), RoPE with Qwen3's
# q/k norm fused with the KV-cache store, SwiGLU, paged attention and the few-row matmuls of small decode
# batches, each with a torch twin of its own. These few lines are what runs when nanovllm.py is copied
# without kernels.py: the same math, written plainly.

def _kernels():
    """kernels.py if importable (it falls back to its own torch twins on CPU tensors), else None."""
    try:
        import kernels
        return kernels
    except ImportError:
        return None


def capture_graphs(enforce_eager: bool, device: torch.device, use_kernels: bool) -> bool:
    """CUDA graphs for decode only on CUDA, unless enforce_eager, and only with kernels.py: the torch fallbacks
    sync with the host (.tolist(), boolean indexing), which a graph capture cannot contain."""
    return not enforce_eager and device.type == "cuda" and use_kernels and _kernels() is not None


_MM_OUT_DTYPE: list = []     # the answer of _mm_out_dtype_ok, computed on first use (a one-slot cache)


def _mm_out_dtype_ok() -> bool:
    """Does this torch have torch.mm(a, b, out_dtype=float32) for bf16 on CUDA (tried once)?"""
    if not _MM_OUT_DTYPE:
        try:
            a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
            _MM_OUT_DTYPE.append(torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32)
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE.append(False)
    return _MM_OUT_DTYPE[0]


def rms_norm_ref(x, w, eps, residual=None):
    """RMSNorm in fp32, rounded once (HF's formula); with a residual: (norm(x + residual), x + residual)."""
    # y = w * x / sqrt(mean(x^2) + eps) (Zhang & Sennrich 2019). The sum x + residual is rounded to the model
    # dtype first, as HF does: the residual stream that the next layer receives is that rounded sum.
    h = x if residual is None else x + residual
    hf = h.float()
    y = (w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)).to(x.dtype)
    return y if residual is None else (y, h)


def rope_table(max_pos: int, D: int, theta: float, device=None) -> torch.Tensor:
    """[max_pos, D] fp32: cos in the first D/2 columns, sin in the last D/2 (HF's inv_freq formula)."""
    # RoPE (Su et al. 2021): pair i of a head turns by angle pos * theta^(-2i/D). Built once for every
    # position up to max_position_embeddings, so a step only gathers rows: no trig on the hot path.
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))  # [D/2]
    f = torch.arange(max_pos, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]   # [max_pos, D/2]
    return torch.cat([f.cos(), f.sin()], dim=-1)


def rope_ref(x, positions, table):
    """Rotate pairs (i, i + D/2) of x [N, heads, D] by angle position * inv_freq_i (rotate_half layout)."""
    D = x.shape[-1]
    c, s = table[positions, : D // 2][:, None, :], table[positions, D // 2:][:, None, :]   # [N, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)                                # [N, heads, D/2] each
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping):
    """k/v [N, Hkv, D] -> flat cache slots (block * P + offset); slot -1 is a padding token: skipped."""
    # the cache [num_blocks, P, Hkv, D] seen as [num_blocks * P, Hkv, D]: slot s is row s. Boolean indexing
    # syncs with the device (its output size is data-dependent): fine here, the fast path is kernels.py.
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep])
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep])


def paged_attention_ref(q, k_cache, v_cache, block_table, cu_seqlens_q, context_lens, scale):
    """Causal attention of each sequence's new queries over its cached tokens (the new ones included: they
    are the LAST q_len of context_len), gathered page by page through the block table. q [N, H, D].

    The same loop serves prefill (q_len new tokens of a sequence) and decode (q_len = 1). It copies each
    sequence's pages into a contiguous [n, H, D] tensor, the very copy the paged kernels in kernels.py avoid
    by reading K/V through the block table inside the attention loop. The .tolist() calls sync the host with
    the device: FOOTGUN, this reference cannot run inside a CUDA graph capture."""
    P, out = k_cache.shape[1], []
    G = q.shape[1] // k_cache.shape[2]                                 # query heads per kv head (GQA)
    for b, (s, e, n) in enumerate(zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(), context_lens.tolist())):
        pages = block_table[b, : -(-n // P)].long()                    # ceil(n / P) pages hold its n tokens
        # [pages, P, Hkv, D] -> [pages * P, Hkv, D] -> the first n slots; query head h reads kv head h // G
        k = k_cache[pages].flatten(0, 1)[:n].repeat_interleave(G, dim=1)     # [n, H, D]
        v = v_cache[pages].flatten(0, 1)[:n].repeat_interleave(G, dim=1)
        sc = torch.einsum("qhd,khd->hqk", q[s:e].float(), k.float()) * scale  # [H, q_len, n]
        i = torch.arange(e - s, device=q.device)[:, None] + (n - (e - s))      # query i sits at position n-q_len+i
        sc = sc.masked_fill(torch.arange(n, device=q.device)[None, :] > i, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", sc.softmax(-1), v.float()).to(q.dtype))
    return torch.cat(out)


# ---- model ---------------------------------------------------------------------------------------------
# The inference twin of nanotron's Transformer (real systems define the model twice, too: Megatron for
# training, vLLM for serving). Same HF tensor names; weights are sharded over tp ranks Megatron-style:
# q/k/v and gate/up are column-parallel (each rank owns heads / intermediate rows), o_proj and down are
# row-parallel (each rank owns input columns, the outputs are summed by an all-reduce), the embedding
# and LM head are vocab-parallel (each rank owns V/tp rows). With tp = 1 every collective is a no-op.
#
# What serving changes in the model: no backward, no dropout, no activation checkpointing; the input of a
# step is the packed new tokens of MANY sequences at different positions (input_ids[N], positions[N]); every
# layer first writes the new tokens' K and V into the paged cache (at slot_mapping) and then attends over the
# cache, so a sequence's past is never recomputed; and only the rows that are sampled (the last token of each
# sequence) go through the LM head, whose [., V] matmul is the largest of a small model.

class TPGroup:
    """The tensor-parallel ranks of one engine: rank, size, and the collectives the model needs.
    group None means torch.distributed's default group: in a tp worker, the engine's own group."""

    def __init__(self, rank: int = 0, size: int = 1, group=None):
        self.rank, self.size, self.group = rank, size, group

    def all_reduce(self, x):
        """Sum x over the tp ranks, in place (the row-parallel outputs, the vocab-parallel embedding)."""
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x):
        """[.., V/tp] on every rank -> [.., V] (rank-major concat)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


class Linear(nn.Module):
    """y = x W^T (+ b). W is this rank's shard: [out/tp, in] (column-parallel) or [out, in/tp] (row-parallel,
    then the partial outputs are summed over tp). With kernels.py, a GPU x of at most SKINNY_MAX_M rows (a decode
    step of a few sequences) runs its skinny_linear GEMV: cuBLAS's GEMM tiles read W far below the HBM bandwidth."""

    def __init__(self, n_in, n_out, tp: TPGroup, parallel: str, bias=False, dtype=None, device=None, kern=None):
        super().__init__()
        self.tp, self.parallel, self.kern = tp, parallel, kern
        shape = (n_out // tp.size, n_in) if parallel == "column" else (n_out, n_in // tp.size)
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(shape[0], dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def forward(self, x):
        if self.kern is not None and x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= self.kern.SKINNY_MAX_M:
            y = self.kern.skinny_linear(x, self.weight, self.bias)     # decode of a few sequences: a GEMV
        else:
            y = F.linear(x, self.weight, self.bias)
        return self.tp.all_reduce(y) if self.parallel == "row" else y


class Embedding(nn.Module):
    """Vocab-parallel embedding: rank r owns rows [r * V_r, (r+1) * V_r) (V padded to a multiple of tp);
    tokens outside give zeros here and the all-reduce fills them in from their owner."""

    def __init__(self, V, Hd, tp: TPGroup, dtype=None, device=None):
        super().__init__()
        self.tp, self.V_r = tp, -(-V // tp.size)
        self.start = tp.rank * self.V_r
        self.weight = nn.Parameter(torch.zeros(self.V_r, Hd, dtype=dtype, device=device), requires_grad=False)

    def forward(self, ids):
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        # tokens of other ranks: look up a clamped (valid) row and zero it; the sum over ranks then holds
        # exactly one non-zero term per token, its owner's row
        local = ids - self.start
        mine = (local >= 0) & (local < self.V_r)
        x = F.embedding(local.clamp(0, self.V_r - 1), self.weight) * mine[:, None]
        return self.tp.all_reduce(x)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; forward(x, residual) fuses the residual add (see DecoderLayer)."""

    def __init__(self, dim, eps, kern, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.eps, self.kern = eps, kern

    def forward(self, x, residual=None):
        if self.kern is not None:
            return self.kern.rms_norm(x, self.weight, self.eps, residual=residual)
        return rms_norm_ref(x, self.weight, self.eps, residual)


@dataclass
class AttnMeta:
    """Where this step's tokens live in the paged cache, for every layer (built once per step).
    decode: every sequence has exactly one new token (q is [B, H, D]; the CUDA-graph path).
    slot_mapping [N]: flat cache slot (block * P + offset) of each new token, -1 for padding.
    block_table [B, max_blocks] int32, context_lens [B] int32 (cached tokens incl. the new ones),
    cu_seqlens_q [B+1] int32 and max_seqlen_q: the packed new tokens of each sequence (prefill path)."""
    decode: bool
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int = 1


class Attention(nn.Module):
    """GQA attention over the paged KV cache. Each rank owns H/tp query heads and Hkv/tp kv heads."""

    def __init__(self, c: ModelConfig, tp: TPGroup, kern, dtype=None, device=None):
        super().__init__()
        if c.num_kv_heads % tp.size:
            raise ValueError(f"tensor_parallel_size={tp.size} must divide num_kv_heads={c.num_kv_heads}")
        self.h, self.hkv, self.D = c.num_heads // tp.size, c.num_kv_heads // tp.size, c.head_dim
        self.scale, self.eps, self.kern = c.head_dim ** -0.5, c.rms_norm_eps, kern
        D = c.head_dim
        self.qkv = Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * D, tp, "column", c.qkv_bias,
                          dtype, device, kern)
        self.o_proj = Linear(c.num_heads * D, c.hidden_size, tp, "row", dtype=dtype, device=device, kern=kern)
        self.q_norm = RMSNorm(D, c.rms_norm_eps, kern, dtype, device) if c.qk_norm else None
        self.k_norm = RMSNorm(D, c.rms_norm_eps, kern, dtype, device) if c.qk_norm else None
        self.k_cache = self.v_cache = None          # [num_blocks, P, Hkv/tp, D] each, set by the runner

    def forward(self, x, positions, meta: AttnMeta, rope):
        """x [N, Hd] -> [N, Hd]. Writes the K/V of the N new tokens into this layer's cache pages, then each
        new token attends over its sequence's cached tokens (itself included, hence write-then-read)."""
        N, D = x.shape[0], self.D
        # one fused matmul [N, Hd] -> [N, (h + 2 hkv) D] (this rank's heads), split into q, k, v
        q, k, v = self.qkv(x).split([self.h * D, self.hkv * D, self.hkv * D], dim=-1)
        q, k, v = q.view(N, self.h, D), k.view(N, self.hkv, D), v.view(N, self.hkv, D)
        qw = self.q_norm.weight if self.q_norm is not None else None
        kw = self.k_norm.weight if self.k_norm is not None else None
        kern = self.kern
        if kern is not None:
            # ONE launch (decode is launch-bound): q/k norm + RoPE, the rotated k and v (read in place from the
            # qkv output) written straight into the cache at slot_mapping; q [N, H, D] comes back rotated
            q = kern.rope_qk_norm_store(q, k, v, positions, rope, qw, kw, self.eps, self.k_cache, self.v_cache,
                                        meta.slot_mapping)
            if meta.decode:                  # [B, H, D]: one query per sequence, split-K over the context
                o = kern.paged_attention_decode(q, self.k_cache, self.v_cache, meta.block_table,
                                                meta.context_lens, self.scale)
            else:                            # packed new tokens, causal over cached prefix + themselves
                o = kern.paged_attention_prefill(q, self.k_cache, self.v_cache, meta.block_table,
                                                 meta.cu_seqlens_q, meta.context_lens, self.scale,
                                                 max_seqlen_q=meta.max_seqlen_q)
        else:
            if qw is not None:
                q, k = rms_norm_ref(q, qw, self.eps), rms_norm_ref(k, kw, self.eps)
            q, k = rope_ref(q, positions, rope), rope_ref(k, positions, rope)
            store_kv_ref(k, v, self.k_cache, self.v_cache, meta.slot_mapping)    # cache the ROTATED k
            cu = meta.cu_seqlens_q
            if meta.decode:                  # one new token per sequence: cu_seqlens_q = 0, 1, .., B
                cu = torch.arange(N + 1, dtype=torch.int32, device=x.device)
            o = paged_attention_ref(q, self.k_cache, self.v_cache, meta.block_table, cu, meta.context_lens,
                                    self.scale)
        return self.o_proj(o.reshape(N, self.h * D))                  # [N, h, D] -> [N, h D] -> [N, Hd]


class MLP(nn.Module):
    """SwiGLU: down(silu(x W_gate) * x W_up); gate and up fused in one column-parallel matmul."""

    def __init__(self, c: ModelConfig, tp: TPGroup, kern, dtype=None, device=None):
        super().__init__()
        self.gate_up = Linear(c.hidden_size, 2 * c.intermediate_size, tp, "column", dtype=dtype, device=device,
                              kern=kern)
        self.down = Linear(c.intermediate_size, c.hidden_size, tp, "row", dtype=dtype, device=device, kern=kern)
        self.kern = kern

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)                   # [N, I/tp] each
        y = self.kern.swiglu(gate, up) if self.kern is not None else (F.silu(gate.float()) * up.float()).to(x.dtype)
        return self.down(y)


class DecoderLayer(nn.Module):
    """Pre-norm block with the residual add deferred into the next norm (one fused pass per norm)."""

    def __init__(self, c, tp, kern, dtype=None, device=None):
        super().__init__()
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, kern, dtype, device)
        self.attn = Attention(c, tp, kern, dtype, device)
        self.post_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, kern, dtype, device)
        self.mlp = MLP(c, tp, kern, dtype, device)

    def forward(self, x, residual, positions, meta, rope):
        # HF computes h = h + attn(norm(h)); h = h + mlp(norm(h)). Here a layer returns its mlp output x and
        # the residual stream WITHOUT that output added; the next norm adds them (norm(x, residual) returns
        # (norm(x + residual), x + residual)): one fused read of x per norm instead of an add and a norm.
        y, residual = (self.input_norm(x), x) if residual is None else self.input_norm(x, residual)
        y, residual = self.post_attn_norm(self.attn(y, positions, meta, rope), residual)
        return self.mlp(y), residual


class Model(nn.Module):
    """The decoder: forward(input_ids[N], positions[N], meta) -> final-norm hidden [N, Hd];
    logits(hidden[B, Hd]) -> fp32 [B, V] (gathered over tp)."""

    def __init__(self, c: ModelConfig, tp: TPGroup, use_kernels=True, dtype=torch.float32, device=None):
        super().__init__()
        kern = _kernels() if use_kernels else None
        self.cfg, self.tp, self.kern = c, tp, kern
        self.embed = Embedding(c.vocab_size, c.hidden_size, tp, dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(c, tp, kern, dtype, device) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, kern, dtype, device)
        self.lm_head = None if c.tie_word_embeddings else Embedding(c.vocab_size, c.hidden_size, tp, dtype, device)
        self.register_buffer("rope", rope_table(c.max_position_embeddings, c.head_dim, c.rope_theta, device),
                             persistent=False)

    def forward(self, input_ids, positions, meta: AttnMeta):
        x, res = self.embed(input_ids), None                         # [N, Hd]
        for layer in self.layers:
            x, res = layer(x, res, positions, meta, self.rope)
        return self.norm(x, res)[0]                                   # the final norm adds the last mlp output

    def logits(self, hidden):
        """fp32 logits [B, V]: the matmul accumulates in fp32 and is NOT rounded to bf16 on the way out
        (a bf16 logit of 20 is off by up to 0.06: far too coarse for RL's log-prob ratios)."""
        W = (self.lm_head if self.lm_head is not None else self.embed).weight    # [V_r, Hd]
        if hidden.is_cuda and hidden.dtype != torch.float32 and _mm_out_dtype_ok():
            z = torch.mm(hidden, W.t(), out_dtype=torch.float32)      # bf16 in, fp32 accumulate and out
        else:                                                          # (upcasting W costs 2x its bytes)
            z = hidden.float() @ W.float().t()
        return self.tp.gather_last_dim(z)[:, : self.cfg.vocab_size]   # drop the vocab padding rows

    # -- weights: HF names -> (parameter, how it is sharded) --

    def weight_slots(self) -> dict:
        """{hf_name: (param, kind, row_offset, rows)}. kind: 'col' rows [offset, offset + rows) of a fused
        column-parallel weight get this rank's 1/tp of the HF tensor's rows; 'row' this rank's 1/tp of the
        columns; 'vocab' this rank's vocab rows (zero padding); 'rep' the whole tensor."""
        c, tp = self.cfg, self.tp.size
        D, I = c.head_dim, c.intermediate_size
        s = {"model.embed_tokens.weight": (self.embed.weight, "vocab", 0, 0),
             "model.norm.weight": (self.norm.weight, "rep", 0, 0)}
        if self.lm_head is not None:
            s["lm_head.weight"] = (self.lm_head.weight, "vocab", 0, 0)
        for i, L in enumerate(self.layers):
            p, a = f"model.layers.{i}.", L.attn
            off = 0
            for name, rows in (("q", c.num_heads * D), ("k", c.num_kv_heads * D), ("v", c.num_kv_heads * D)):
                s[f"{p}self_attn.{name}_proj.weight"] = (a.qkv.weight, "col", off, rows // tp)
                if c.qkv_bias:
                    s[f"{p}self_attn.{name}_proj.bias"] = (a.qkv.bias, "col", off, rows // tp)
                off += rows // tp
            s[f"{p}self_attn.o_proj.weight"] = (a.o_proj.weight, "row", 0, 0)
            if c.qk_norm:
                s[f"{p}self_attn.q_norm.weight"] = (a.q_norm.weight, "rep", 0, 0)
                s[f"{p}self_attn.k_norm.weight"] = (a.k_norm.weight, "rep", 0, 0)
            s[f"{p}mlp.gate_proj.weight"] = (L.mlp.gate_up.weight, "col", 0, I // tp)
            s[f"{p}mlp.up_proj.weight"] = (L.mlp.gate_up.weight, "col", I // tp, I // tp)
            s[f"{p}mlp.down_proj.weight"] = (L.mlp.down.weight, "row", 0, 0)
            s[f"{p}input_layernorm.weight"] = (L.input_norm.weight, "rep", 0, 0)
            s[f"{p}post_attention_layernorm.weight"] = (L.post_attn_norm.weight, "rep", 0, 0)
        return s

    @torch.inference_mode()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], where: str = "the weights") -> tuple[set, list]:
        """Copy (hf_name, full tensor) pairs into this rank's shards, in place (so CUDA graphs, which baked in the
        parameters' addresses, stay valid). Returns (names loaded, unknown names): the caller checks them."""
        slots, r, tp, seen, unknown = self.weight_slots(), self.tp.rank, self.tp.size, set(), []
        # every rank reads the FULL HF tensor and keeps its slice: simple, and the same code serves a
        # checkpoint, dummy weights and a trainer's live tensors (update_weights); copy_ casts the dtype
        for name, full in tensors:
            if name not in slots:               # tied checkpoints may store lm_head: skip it
                tied = name == "lm_head.weight" and self.cfg.tie_word_embeddings
                if not (tied or name.endswith("rotary_emb.inv_freq")):
                    unknown.append(name)        # reported all together by the caller, not just the first one
                continue
            param, kind, off, rows = slots[name]
            if kind == "col":                   # rank r's rows of q/k/v or gate/up, into its slice of the fused weight
                part = full.narrow(0, r * rows, rows)
                dst = param.narrow(0, off, rows)
            elif kind == "row":
                n = full.shape[-1] // tp
                part, dst = full.narrow(-1, r * n, n), param
            elif kind == "vocab":               # the last rank may get fewer than V_r rows: its padding rows stay 0
                V_r = param.shape[0]
                part = full[r * V_r: (r + 1) * V_r]
                dst = param[: part.shape[0]]
            else:
                part, dst = full, param
            if part.shape != dst.shape:
                raise ValueError(f"{where}: tensor {name!r} has shape {tuple(full.shape)}, which does not fit "
                                 f"this config (shard {tuple(dst.shape)} at tp={tp})")
            dst.copy_(part)
            seen.add(name)
        return seen, unknown


def check_weight_names(where: str, model_type: str, missing: list, unknown: list):
    """HF's "missing keys / unexpected keys" as one ValueError: a weight never sent keeps its old (dummy) values
    and an unknown name (a typo, another layout) is a no-op; either way the engine would run on, silently wrong."""
    if missing or unknown:
        raise ValueError(f"{where}: {len(missing)} missing {missing[:5]}, {len(unknown)} unknown {unknown[:5]} "
                         f"(the first five of each; names of a {model_type} model with this config.json, HF style)")


# ---- sequences -----------------------------------------------------------------------------------------
# A Request holds a prompt and its SamplingParams; each of its n samples is a Sequence (prompt + output
# tokens and the KV blocks that hold them). A request with n > 1 starts as ONE sequence: its prompt is
# prefilled once, then it forks into n sequences that share the prompt's full blocks (reference counts,
# no copy) and each get a copy of the last, partly filled block, which they will write into.
#
# The one invariant to keep in mind for the rest of the file: tokens [0, num_computed) of a sequence have
# their K/V in the cache, token i in slot block_table[i // P] * P + i % P, and every step moves num_computed
# towards num_tokens. A decoding sequence has num_computed = num_tokens - 1: its newest token was sampled
# from the last step's logits and its K/V are written by the next step, which samples the token after it.
# (vLLM's scheduler keeps the same two counters per request: num_tokens and num_computed_tokens.)

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class Request:
    """One prompt and its SamplingParams; seqs are its n samples once forked. LLM.add_request also sets
    seed64 (its random stream), row (its sampling params as one float row) and filtered (any mask on)."""

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                 arrival: int, seed: int):
        self.request_id, self.prompt, self.prompt_ids, self.params = request_id, prompt, prompt_ids, params
        self.arrival, self.seed = arrival, seed
        self.seqs: list[Sequence] = []                # all n samples once forked (sample order)
        self.num_cached_tokens = None                 # prompt tokens the prefix cache served at its FIRST admission


class Sequence:
    """One sample of a request: its tokens, how many have K/V in the cache, and the blocks that hold them.
    Invariants: len(block_table) >= ceil(num_computed / P) (blocks for the tokens being computed are added by
    the scheduler before the step); block_hashes[i] names the prefix up to the end of block i for the first
    len(block_hashes) full blocks; between steps, a WAITING sequence holds no blocks."""

    def __init__(self, seq_id: int, request: Request, sample: int, token_ids: list[int]):
        self.seq_id, self.request, self.sample = seq_id, request, sample
        self.token_ids = token_ids                     # prompt + output
        self.num_prompt = len(request.prompt_ids)
        self.num_computed = 0                          # leading tokens whose K/V are in the cache
        self.block_table: list[int] = []               # KV blocks, in token order
        self.block_hashes: list[int] = []              # chained hashes of the full blocks computed so far
        self.status = WAITING
        self.pending_forks = 0                         # samples still to fork off after the prompt prefill
        self.fork_blocks: list[int] = []               # blocks reserved for those forks' last-block copies
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict] = []
        self.bt_row, self.bt_synced = None, 0         # block_table mirrored in an int32 tensor (see _table_row)
        self.finish_reason = self.stop_reason = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def seats(self) -> int:
        """Scheduler slots this sequence will occupy (itself + the samples it will fork into)."""
        return 1 + self.pending_forks

    def __repr__(self):
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id}, sample={self.sample}, "
                f"tokens={self.num_tokens}, computed={self.num_computed}, blocks={self.block_table}, {self.status})")


def _pad4(xs: list) -> list:
    """xs padded with zeros to a multiple of 4 int32 words, so the next segment starts 16-byte aligned."""
    return xs + [0] * (-len(xs) % 4)


def _table_row(seq: Sequence, W: int) -> torch.Tensor:
    """seq.block_table as an int32 [W] tensor, kept in step with the list by writing only the new entries
    (blocks are only ever appended, or all dropped by free_seq, which resets bt_synced). Entries past
    len(block_table) may be stale: harmless, attention reads only the ceil(context_len / P) first pages.
    Why: converting every block list to a tensor each decode step is Python work per element."""
    if seq.bt_row is None:
        seq.bt_row = torch.zeros(W, dtype=torch.int32)
    bt = seq.block_table
    for i in range(seq.bt_synced, len(bt)):
        seq.bt_row[i] = bt[i]
    seq.bt_synced = len(bt)
    return seq.bt_row


# ---- block manager ---------------------------------------------------------------------------------------
# The KV cache is num_blocks pages of P token slots per layer. A block is free (ref 0) or held by ref > 0
# sequences. Prefix caching (Kwon et al. 2023, vLLM's automatic prefix caching): a FULL block whose K/V
# are computed gets a chained hash h_i = hash(h_{i-1}, its P tokens), which names the whole prefix up to
# it; a new sequence whose first blocks hash the same reuses them instead of recomputing. A freed block
# keeps its hash and contents until it is handed out again, so `free` is an LRU queue of blocks that may
# still be hit (least recently freed first out).
#
#   state              ref  in free  in cached   how it leaves the state
#   free, empty          0   yes       no        take() -> held
#   free, cached         0   yes       yes       take() (evicts the hash) -> held; a prefix hit -> held
#   held                >0   no        maybe     last release -> free (keeps its hash, if any)
#
# Why pages: reserving max_model_len slots per sequence up front wastes most of the cache (outputs end
# early, and their final length is unknown), so the batch, and with it the throughput, stays small. Pages of
# P tokens are taken on demand and waste less than one page per sequence; and a page can be SHARED, which a
# contiguous buffer cannot: the n samples of a prompt read one copy of its K/V, and so do later requests
# with the same prefix (a system prompt, a few-shot header, the same RL prompt again). Sharing needs a
# reference count: a block returns to the free list only when its last holder lets go.
#
# Why a CHAINED hash: the K/V of a block depend on every token before it (the deeper layers mix the whole
# prefix), so a block is named by its whole prefix, not by its own P tokens. Chaining makes that name cost
# O(P) per block (hash(previous name, own tokens)) instead of O(prefix length). Only FULL blocks are hashed:
# a partial block is still being written. vLLM names blocks the same way and keeps freed-but-cached blocks in
# an eviction queue; nano-vllm also stores each block's token ids to rule out a false hit. This file does both,
# with Python's hash of a (previous hash, token tuple) key. Dropped: extra hash inputs (LoRA ids, images),
# cache salts, and offloading evicted blocks to CPU memory.

class Block:
    """One page of the KV cache (the same page index in every layer). ref: how many sequences hold it;
    hash / key: the prefix name it is cached under (key = (previous block's hash, its P tokens)), or None."""
    __slots__ = ("id", "ref", "hash", "key")

    def __init__(self, i: int):
        self.id, self.ref, self.hash, self.key = i, 0, None, None


class BlockManager:
    """Host-side bookkeeping of the KV pages (it never touches a tensor): who holds which block, which are
    free (an LRU queue), and which hold a cached prefix. Its invariants are written out in check()."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache has {num_blocks} blocks: raise gpu_memory_utilization or "
                             "num_gpu_blocks_override, or lower max_num_batched_tokens")
        self.P, self.prefix_caching = block_size, prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # an OrderedDict as an ordered set: O(1) pop of the oldest, O(1) removal of any block (a prefix hit)
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}               # prefix hash -> block id

    def num_free(self) -> int:
        return len(self.free)

    def take(self) -> int:
        """A block for new tokens: the least recently freed one; its old prefix hash is forgotten.
        FOOTGUN: raises KeyError when nothing is free; callers check num_free() / blocks_needed() first."""
        bid, _ = self.free.popitem(last=False)
        b = self.blocks[bid]
        if b.hash is not None and self.cached.get(b.hash) == bid:     # evict: its contents are about to change
            del self.cached[b.hash]
        b.ref, b.hash, b.key = 1, None, None
        return bid

    def acquire(self, bid: int):
        """One more holder of a block (a prefix hit, or a forked sample sharing its parent's block)."""
        b = self.blocks[bid]
        if b.ref == 0:
            del self.free[bid]
        b.ref += 1

    def release(self, bid: int):
        """One holder fewer; at ref 0 the block joins the free queue's tail, hash and contents intact."""
        b = self.blocks[bid]
        b.ref -= 1
        if b.ref == 0:
            self.free[bid] = None                      # most recently freed: evicted last

    def free_seq(self, seq: Sequence):
        """Release all of a sequence's blocks (finish, preemption, abort) and reset its block state."""
        for bid in reversed(seq.block_table):          # tail first: the prefix stays cached longest
            self.release(bid)
        for bid in seq.fork_blocks:
            self.release(bid)
        seq.block_table, seq.fork_blocks, seq.block_hashes, seq.bt_synced = [], [], [], 0

    def blocks_needed(self, seq: Sequence, num_new: int) -> int:
        """New blocks for num_new more computed tokens: ceil((computed + new) / P) minus the blocks held."""
        return max(0, -(-(seq.num_computed + num_new) // self.P) - len(seq.block_table))

    def grow(self, seq: Sequence, num_new: int):
        for _ in range(self.blocks_needed(seq, num_new)):
            seq.block_table.append(self.take())

    @staticmethod
    def _key(prev: int | None, tokens) -> tuple:
        return (prev, tuple(tokens))

    def match_prefix(self, seq: Sequence) -> int:
        """Reuse cached blocks for the longest cached prefix of a sequence with nothing computed yet.
        At least one token is left to compute (its logits give the next token). Returns tokens reused."""
        if not self.prefix_caching or seq.num_computed or seq.block_table:
            return 0
        P, prev, hits = self.P, None, []
        # only full blocks that end before the last token: a prompt of exactly k * P tokens hits k - 1 blocks
        # at most, since the step must still compute one token to get the logits that sample the next one
        for i in range((seq.num_tokens - 1) // P):
            key = self._key(prev, seq.token_ids[i * P:(i + 1) * P])
            h = hash(key)
            bid = self.cached.get(h)
            # (for this block's own hash; two different prefixes whose chained hashes collided at an EARLIER
            # block would still pass: the odds of a 64-bit collision)
            if bid is None or self.blocks[bid].key != key:     # the key check makes a hash collision harmless
                break
            hits.append((bid, h))
            prev = h
        for bid, h in hits:                                    # held by others (ref > 0) or free-but-cached
            self.acquire(bid)
            seq.block_table.append(bid)
            seq.block_hashes.append(h)
        seq.num_computed = len(hits) * P
        return seq.num_computed

    def commit(self, seq: Sequence):
        """After a step computed K/V: hash the blocks that are now full, so later prompts can hit them."""
        if not self.prefix_caching:
            return
        P = self.P
        # blocks [len(block_hashes), num_computed // P) became full in this step; output tokens count too,
        # so a preempted sequence's recompute and a multi-turn follow-up can hit its generated text
        for i in range(len(seq.block_hashes), seq.num_computed // P):
            prev = seq.block_hashes[-1] if seq.block_hashes else None
            key = self._key(prev, seq.token_ids[i * P:(i + 1) * P])
            h = hash(key)
            seq.block_hashes.append(h)
            b = self.blocks[seq.block_table[i]]
            # (a duplicate, computed by two sequences in the same steps, stays unnamed: only its holder uses it)
            if b.hash is None and h not in self.cached:   # the first block with this content is the cached one
                b.hash, b.key = h, key
                self.cached[h] = b.id

    def reset_prefix_cache(self):
        """Forget every hash (the weights changed, or the cache memory was released). Running sequences keep
        their block_hashes (a name depends on tokens only), so the blocks they fill later are still cached."""
        for b in self.blocks:
            b.hash = b.key = None
        self.cached.clear()

    def check(self, seqs: Iterable[Sequence]):
        """Invariants (the tests call this after every step): each block's ref equals the number of live
        holders, free holds exactly the ref-0 blocks, and every cached hash points at a block carrying it."""
        holders = [0] * len(self.blocks)
        for s in seqs:
            for bid in s.block_table + s.fork_blocks:
                holders[bid] += 1
            if len(set(s.block_table)) != len(s.block_table):
                raise AssertionError(f"{s} holds a block twice")
        for b in self.blocks:
            if b.ref != holders[b.id]:
                raise AssertionError(f"block {b.id}: ref {b.ref} but {holders[b.id]} holders")
            if (b.ref == 0) != (b.id in self.free):
                raise AssertionError(f"block {b.id}: ref {b.ref} but {'in' if b.id in self.free else 'not in'} free")
        for h, bid in self.cached.items():
            if self.blocks[bid].hash != h:
                raise AssertionError(f"cached hash {h} points at block {bid} with hash {self.blocks[bid].hash}")


# ---- scheduler -------------------------------------------------------------------------------------------
# One step = a token budget (max_num_batched_tokens) shared by every sequence that runs in it. Running
# sequences go first, in the order they were admitted (FCFS; forked samples sit right after their parent, a
# recomputed sequence rejoins at the end): a decoding one takes 1 token, one still in its prompt takes
# the next chunk (chunked prefill: a long prompt never stalls the decodes of everyone else). Then waiting
# sequences are admitted, oldest first, while budget, seats (max_num_seqs) and free blocks last. When a
# running sequence needs a block and none is free, the NEWEST running sequence is preempted: its blocks are
# freed and it goes back to the front of the queue with all its tokens, to be recomputed later (vLLM's
# preemption by recompute; the prefix cache often makes that cheap). No new sequence is admitted in a step
# that preempted, so a preempted sequence is never overtaken by a newer one.
#
# Why a token budget: a step's time and activation memory grow with its token count, not its sequence count,
# so one number bounds both (ModelRunner.setup profiles memory at exactly that many tokens) and, by capping
# how much prefill rides along, keeps the time between two tokens of a running sequence steady. Why chunks:
# without them a 30k-token prompt is one huge step during which every decode waits. nano-vllm runs a step of
# prefills OR a step of decodes and never splits a prompt; vLLM's current scheduler, like this one, mixes both
# under one budget. Why preempt by recompute: the alternative, swapping the victim's pages to CPU memory and
# back, needs a pinned CPU pool and PCIe time; recomputing is a prefill, compute-bound and fast, and the prefix
# cache usually still holds most of the victim's blocks when it returns. Seats (max_num_seqs) count the
# samples a request WILL fork into, so a fork never overflows the batch. Dropped: priorities, swapping, and
# waiting on remote KV transfers.

class Scheduler:
    """Decides each step which sequences run and how many of their tokens; owns the waiting queue and the
    running list, and allocates (through the BlockManager) the blocks those tokens need. Pure host code."""

    def __init__(self, bm: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm, self.max_num_seqs, self.budget = bm, max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _need(self, seq: Sequence, n: int) -> int:
        """Blocks to allocate for n more tokens (+ one per fork if this chunk completes a forking prompt)."""
        # each fork needs its own copy of the prompt's partial last block (none when the prompt fills whole
        # blocks); reserving them now, with the chunk that ends the prompt, means _fork can never run out
        done = seq.num_computed + n == seq.num_tokens
        forks = seq.pending_forks if done and seq.num_prompt % self.bm.P else 0
        return self.bm.blocks_needed(seq, n) + forks - len(seq.fork_blocks)

    def _allocate(self, seq: Sequence, n: int):
        self.bm.grow(seq, n)
        if seq.num_computed + n == seq.num_tokens and seq.num_prompt % self.bm.P:
            while len(seq.fork_blocks) < seq.pending_forks:
                seq.fork_blocks.append(self.bm.take())

    def preempt(self, seq: Sequence):
        """Drop a running sequence's K/V (blocks freed, num_computed 0) and queue it FIRST, with all its tokens:
        when re-admitted it is prefilled again (prompt + outputs so far) and continues where it stopped."""
        self.bm.free_seq(seq)
        seq.num_computed, seq.status = 0, WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, new tokens this step)], running ones first. Mutates block tables and queues."""
        budget, out, preempted, i = self.budget, [], False, 0
        # 1. running sequences, oldest first: 1 token (decode) or the next prompt chunk
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            # while ... else: preempt from the END of running until seq's blocks fit (the else branch runs
            # then), or until seq itself was the victim (break). Victims sit at index >= i, so nothing already
            # in `out` is ever preempted.
            while self._need(seq, n) > self.bm.num_free():
                victim = self.running.pop()              # the newest; may be seq itself
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    if not self.running and not out:     # alone and still too big: it can never run
                        raise RuntimeError(f"the KV cache ({len(self.bm.blocks)} blocks of {self.bm.P} tokens) "
                                           f"cannot hold {seq}: raise gpu_memory_utilization / "
                                           "num_gpu_blocks_override or lower max_model_len or n")
                    break
            else:
                self._allocate(seq, n)
                out.append((seq, n))
                budget -= n
                i += 1
        # 2. waiting sequences, oldest first (preempted ones are at the front), while budget, seats and blocks
        # last; the first that does not fit stops admission (strict FCFS: no smaller request jumps the queue)
        seats = sum(s.seats for s in self.running)
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            if seats + seq.seats > self.max_num_seqs:
                break
            cached = self.bm.match_prefix(seq)          # (a waiting sequence holds no blocks: num_computed 0)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if self._need(seq, n) > self.bm.num_free():
                if not self.running and not out:
                    raise RuntimeError(f"the KV cache ({len(self.bm.blocks)} blocks of {self.bm.P} tokens) cannot "
                                       f"hold one sequence of {seq.num_tokens} tokens: raise the cache size or "
                                       "lower max_model_len")
                self.bm.free_seq(seq)                    # give back the prefix hits; retry next step
                seq.num_computed = 0
                break
            self.waiting.popleft()
            # vLLM's num_cached_tokens: prompt tokens served by the cache at the FIRST admission only; a recompute
            # after preemption (even mid-prompt) hits the blocks it computed itself: its own work, not cache hits
            if seq.request.num_cached_tokens is None:
                seq.request.num_cached_tokens = cached
            self._allocate(seq, n)
            seq.status = RUNNING
            self.running.append(seq)
            seats += seq.seats
            out.append((seq, n))
            budget -= n
        return out

    def finish(self, seq: Sequence, reason: str, stop_reason=None):
        """Mark a sequence done and free its blocks now (the caller drops it from running)."""
        seq.status, seq.finish_reason, seq.stop_reason = FINISHED, reason, stop_reason
        self.bm.free_seq(seq)

    def abort(self, seqs: Iterable[Sequence]):
        """Finish these sequences with reason "abort", wherever they are (waiting or running)."""
        for seq in seqs:
            if seq.status == FINISHED:
                continue
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.finish(seq, "abort")
        self.running = [s for s in self.running if s.status != FINISHED]


# ---- sampler ---------------------------------------------------------------------------------------------
# All on the GPU, batched, with no host sync: the logits of each sampled row are tempered, masked by
# top-k / min-p / top-p, turned into a CDF, and a token is drawn by inverse transform with ONE uniform
# number per row. That number is a hash of (request seed, sample index, output position), keys packed on
# the host and hashed on the device: so a request with a seed gets the same tokens whatever else shares its
# batch, and a run with the same LLM seed and the same requests is reproducible. Temperature 0 is an exact
# argmax of the raw logits.
#
# The target distribution, in the order the masks apply (sampling_probs_ref is the float64 oracle):
#   p = softmax(logits / T); drop ranks >= top_k; drop p_i < min_p * max(p); renormalise; keep the
#   smallest prefix (by decreasing p) whose mass reaches top_p; renormalise.
#
# Why a hashed counter, not torch.Generator: a generator is one stream of state, so per-request seeds would
# need a Python loop over per-row generators every step, and a shared one ties a request's tokens to its
# batch-mates. A counter-based draw (Salmon et al. 2011) is a pure function of its key, so any row of any
# step in any batch gets its own number, computed on the device from three int64 columns. nano-vllm divides
# the probabilities by exponential noise and takes the argmax (also exact): V random numbers per row; here one.
# Log-probs (RL's importance ratios need the behaviour policy's exact log p): "processed" = log_softmax of the
# tempered, masked logits zt, the distribution the token was drawn from; "raw" = log_softmax(logits), T = 1.

M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's output function (Steele, Lea, Flood 2014): a bijective scramble of 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def uniform(seed: int, sample: int, position: int) -> float:
    """A reproducible U[0, 1) draw (53 bits) for one (request seed, sample index, output position)."""
    return (_mix64(_mix64(_mix64(seed & M64) ^ sample) ^ position) >> 11) / float(1 << 53)


def _s64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits (torch has no uint64 math)."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _mix64_t(x: torch.Tensor) -> torch.Tensor:
    """_mix64 on an int64 tensor: multiplication and addition wrap mod 2^64 exactly as uint64 does; >> is
    arithmetic in torch, so each shift masks off the copied sign bits to act as a logical shift."""
    srl = lambda v, k: (v >> k) & ((1 << (64 - k)) - 1)                  # noqa: E731
    x = x + _s64(0x9E3779B97F4A7C15)
    x = (x ^ srl(x, 30)) * _s64(0xBF58476D1CE4E5B9)
    x = (x ^ srl(x, 27)) * _s64(0x94D049BB133111EB)
    return x ^ srl(x, 31)


def uniform_t(seed: torch.Tensor, sample: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """uniform() for whole int64 columns at once, on the device: float64 [R], bit-equal to the scalar one."""
    x = _mix64_t(_mix64_t(_mix64_t(seed) ^ sample) ^ position)
    return (x >> 11 & ((1 << 53) - 1)).double() / float(1 << 53)


def sampling_probs_ref(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The exact distribution one row is sampled from, in float64, written plainly (the test oracle).
    logits [V] -> probabilities [V]."""
    x = logits.double()
    if p.greedy:
        return F.one_hot(x.argmax(), x.numel()).double()
    probs = (x / p.temperature).softmax(-1)
    # work in rank order (most likely first), then scatter the kept mass back to token order at the end
    order = probs.argsort(descending=True, stable=True)
    ps = probs[order]
    keep = torch.ones_like(ps, dtype=torch.bool)
    if p.top_k > 0:
        keep[p.top_k:] = False
    keep &= ps >= p.min_p * ps[0]
    ps = torch.where(keep, ps, 0.0)
    ps = ps / ps.sum()
    before = ps.cumsum(0) - ps                                         # mass of the more likely tokens
    keep &= before < p.top_p
    keep[0] = True
    ps = torch.where(keep, ps, 0.0)
    out = torch.zeros_like(ps)
    out[order] = ps / ps.sum()
    return out


@dataclass
class SamplingBatch:
    """Per sampled row (one per sample; forked samples of a prompt repeat its logits row). Tensors [R]."""
    rows: torch.Tensor            # int64: which logits row
    temperature: torch.Tensor     # fp32 (0 = greedy)
    top_k: torch.Tensor           # fp32, V when off
    top_p: torch.Tensor
    min_p: torch.Tensor
    u: torch.Tensor               # fp64 uniform draws
    all_greedy: bool
    any_filter: bool              # some row has top_k / top_p / min_p on (host flag: no sync to find out)
    logprobs: int | None          # None: none wanted; k >= 0: the sampled token's (+ the top k)
    processed: bool               # logprobs of the tempered, masked distribution (else raw log_softmax)


def _mask_logits(z: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """Tempered logits z [R, V] -> the same with masked tokens at -inf (top-k, min-p, then top-p)."""
    # the full sort of [R, V] is this file's most expensive sampling op: it runs only when some row has a mask
    # (SamplingBatch.any_filter), never in the plain-temperature CUDA-graph path
    sz, idx = z.sort(dim=-1, descending=True)                          # [R, V], idx[r, j] = token of rank j
    ps = sz.softmax(-1)
    rank = torch.arange(z.shape[-1], device=z.device)
    drop = (rank[None, :] >= sb.top_k[:, None]) | (ps < sb.min_p[:, None] * ps[:, :1])   # top-k, min-p
    ps = ps.masked_fill(drop, 0.0)
    ps = ps / ps.sum(-1, keepdim=True)
    # top-p: drop a token when the tokens ranked above it already hold top_p of the (renormalised) mass
    drop |= (ps.cumsum(-1) - ps) >= sb.top_p[:, None]
    drop[:, 0] = False                                                 # the most likely token always stays
    return torch.empty_like(z).scatter_(-1, idx, sz.masked_fill(drop, float("-inf")))


def sample(logits: torch.Tensor, sb: SamplingBatch):
    """logits [B, V] fp32 -> (tokens [R] int64, logprobs [R] fp32 | None, (top values, top ids) | None).
    R >= B: a prompt that forks into n samples has its logits row read n times (sb.rows). No host sync: every
    branch is decided by host-side flags, so this also runs inside a CUDA graph."""
    z = logits.index_select(0, sb.rows) if sb.rows.numel() != logits.shape[0] else logits   # [R, V]
    greedy_tok = z.argmax(-1)
    if sb.all_greedy and sb.logprobs is None:
        return greedy_tok, None, None
    greedy = sb.temperature == 0                                       # [R] bool, on the device
    zt = z / torch.where(greedy, 1.0, sb.temperature)[:, None]        # tempered logits [R, V] (greedy rows: T 1)
    if sb.any_filter:
        zt = _mask_logits(zt, sb)
    probs = zt.softmax(-1)
    cdf = probs.cumsum(-1)                                             # fp32; searchsorted skips p = 0 tokens
    # inverse transform: the first token whose cdf exceeds u * total (scaling by the total absorbs the fp32
    # cumsum's drift from 1). right=True: a p = 0 token repeats the previous cdf value, so it is never first.
    # u * total is rounded to fp32: for u within ~2^-25 of 1 it could round UP to cdf[-1], searchsorted would
    # return V and the clamp pick token V - 1 even when it is masked (p = 0). So the target stays BELOW the total
    # (the largest fp32 under it): the first cdf above it is then always a token with p > 0.
    last = cdf[:, -1:]                                                 # [R, 1]
    target = torch.minimum((sb.u * last[:, 0].double()).float()[:, None], torch.nextafter(last, torch.zeros_like(last)))
    tok = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=z.shape[-1] - 1)
    tok = torch.where(greedy, greedy_tok, tok)
    if sb.logprobs is None:
        return tok, None, None
    # log p(token) = logit - logsumexp(logits): one reduction per view, no [R, V] log-softmax written out.
    # Greedy rows report the raw view (T = 1, no masks).
    raw = lambda: z.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(z, -1)          # noqa: E731
    if not sb.processed or sb.all_greedy:
        tok_lp = raw()
    else:
        tok_lp = torch.where(greedy, raw(), zt.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(zt, -1))
    top = None
    if sb.logprobs > 0:                                                # top-k: the full log-softmax, rarely asked
        lp = torch.log_softmax(zt if sb.processed else z, -1)
        top = torch.where(greedy[:, None], torch.log_softmax(z, -1), lp).topk(sb.logprobs, dim=-1) if sb.processed \
            else lp.topk(sb.logprobs, dim=-1)
    return tok, tok_lp, top


# ---- model runner --------------------------------------------------------------------------------------
# Owns the model, the KV cache and the CUDA graphs of one tp rank. A step arrives as a StepInput: plain CPU
# tensors built by the LLM (so the same object can be sent to tp worker processes), all integers packed in
# ONE int32 tensor so a step costs one host-to-device copy.
#
# The runner knows nothing of requests or scheduling: flat tensors in, sampled tokens out. Why one packed
# copy: each torch.tensor(list, device="cuda") is its own transfer from pageable memory, which, FOOTGUN, first
# waits for all work queued on the stream; nano-vllm pins each input and copies them one by one; here every
# segment (ids, positions, slots, lengths, block table, sampling keys and params) rides in one pinned buffer,
# one copy, which the device splits into views.


@dataclass
class StepInput:
    """One step, packed in ONE int32 tensor `ints` (one host-to-device copy). The model part (n_model words):
    [input_ids N | positions N | slot_mapping N | context_lens B | cu_seqlens_q B+1 | block_table B*W |
    hidden_rows S] for an eager step, or for a CUDA-graph decode step (graph_bs > 0) the image of the graph's
    static buffer (see ModelRunner.capture). Then, 8-byte aligned, the sampling part of R rows: keys int64
    [3, R] (seed, sample, position), params fp32 [4, R] (temperature, top_k, top_p, min_p), logits row [R].
    hidden_rows: the token row of each sequence whose last token is sampled this step."""
    ints: torch.Tensor
    N: int
    B: int
    W: int
    S: int
    max_seqlen_q: int
    decode: bool
    graph_bs: int
    n_model: int
    sb: dict                       # R and the host-side flags of the SamplingBatch
    copies: list                   # [(src_block, dst_block)]: fork copies to make before the forward

    def views(self, ints):
        """The eager step's segments as views of ints (no copies): ids, positions, slot_mapping [N];
        context_lens [B]; cu_seqlens_q [B+1]; block_table [B, W]; hidden_rows [S]."""
        N, B, W, S = self.N, self.B, self.W, self.S
        sizes = [N, N, N, B, B + 1, B * W, S]
        parts = ints[: self.n_model].split([-(-n // 4) * 4 for n in sizes])     # segments start 16-byte aligned
        ids, pos, slots, ctx, cu, bt, rows = (p[:n] for p, n in zip(parts, sizes))
        return ids, pos, slots, ctx, cu, bt.view(B, W), rows

    def sampling(self, ints) -> SamplingBatch:
        """Views of the sampling part (laid out for Rp >= R rows: a graph step pads to max_num_seqs)."""
        R, Rp = self.sb["R"], self.sb["Rp"]
        w = ints[self.n_model + self.n_model % 2:]                         # 6Rp + 4Rp + Rp int32 words
        # reinterpret the bits (view(dtype), no conversion): 2 int32 words per int64 key, 1 per fp32 param
        keys = w[: 6 * Rp].view(torch.int64).view(3, Rp)[:, :R]
        f = w[6 * Rp: 10 * Rp].view(torch.float32).view(4, Rp)[:, :R]
        return SamplingBatch(w[10 * Rp: 10 * Rp + R].long(), f[0], f[1], f[2], f[3],
                             uniform_t(keys[0], keys[1], keys[2]), self.sb["all_greedy"], self.sb["any_filter"],
                             self.sb["logprobs"], self.sb["processed"])


class ModelRunner:
    """One tp rank's GPU side: the model shard, the KV cache [L, 2, num_blocks, P, Hkv/tp, D], the CUDA
    graphs; runs a StepInput (launch / fetch / execute), copies fork blocks, and hosts the RL hooks."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, device: torch.device, dtype: torch.dtype, block_size: int,
                 max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int, use_kernels: bool = True,
                 processed_logprobs: bool = True):
        self.cfg, self.tp, self.device, self.dtype, self.P = cfg, tp, device, dtype, block_size
        self.processed = processed_logprobs
        self.W = -(-max_model_len // block_size)                        # block-table width
        self.max_model_len = max_model_len        # (W * P rounds it up to a whole block: past the RoPE table)
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.model = Model(cfg, tp, use_kernels, dtype, device).eval()
        self.kv = None
        self.num_blocks = 0
        self.graphs: dict[int, tuple] = {}      # batch size -> (CUDAGraph, its static outputs (logits, tok, lp))
        self.graph_ints = None                  # the graphs' one static int32 input buffer (see capture)
        self.offloaded, self.slept = None, None   # sleep's CPU copies; (level, had graphs) while asleep

    # -- KV cache --

    def bytes_per_block(self) -> int:
        """K and V of P tokens in every layer, this rank's kv heads: 2 * L * P * (Hkv/tp) * D * dtype bytes.
        (Qwen3-0.6B in bf16, P 16: 2 * 28 * 16 * 8 * 128 * 2 = 1.8 MB, 112 KB per token.)"""
        c = self.cfg
        return 2 * c.num_layers * self.P * (c.num_kv_heads // self.tp.size) * c.head_dim * self.dtype.itemsize

    def allocate_kv(self, num_blocks: int):
        """The cache: [L, 2 (k, v), num_blocks, P, Hkv/tp, D]; each layer gets views of its two slices."""
        c = self.cfg
        self.kv = torch.zeros(c.num_layers, 2, num_blocks, self.P, c.num_kv_heads // self.tp.size, c.head_dim,
                              dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.attn.k_cache, layer.attn.v_cache = self.kv[i, 0], self.kv[i, 1]
        self.num_blocks = num_blocks

    def free_kv(self):
        """Drop every reference to the cache tensor (the layers' views too), so its memory can be released."""
        for layer in self.model.layers:
            layer.attn.k_cache = layer.attn.v_cache = None
        self.kv = None

    @torch.inference_mode()
    def setup(self, load: str, seed: int, gpu_memory_utilization: float, num_blocks: int | None,
              capture_graphs: bool) -> tuple[int, list[int], set]:
        """Load weights (an HF folder, or 'dummy'), size and allocate the KV cache, capture the CUDA graphs.
        Returns (num_blocks, graph batch sizes, HF weight names). tp ranks agree on the smallest cache that fits."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            free0, total = torch.cuda.mem_get_info(self.device)
            base = torch.cuda.memory_allocated(self.device)
        src = dummy_weights(self.model, seed) if load == "dummy" else safetensors_weights(Path(load))
        seen, unknown = self.model.load_weights(src, where=load)
        check_weight_names(load, self.cfg.model_type, sorted(set(self.model.weight_slots()) - seen), unknown)
        # How many KV blocks fit: vLLM's recipe. Run the worst step once (profile_peak_bytes: a full token
        # budget of prefill) and measure the peak; what remains of the engine's share of the GPU, minus a
        # reserve for what the profile cannot see (CUDA graphs' memory pool, allocator fragmentation, NCCL's
        # buffers), becomes the cache. The cache is the engine's throughput: more
        # blocks = more sequences in flight = bigger decode batches.
        if num_blocks is None:
            if cuda:   # this engine may use util * total, never more than was free when it started
                peak = self.profile_peak_bytes() - base
                budget = min(free0, gpu_memory_utilization * total) - peak - max(1 << 30, total // 50)
                num_blocks = int(budget // self.bytes_per_block())
            else:      # CPU: enough for max_num_seqs sequences of max_model_len, at most 2 GiB
                need = self.max_num_seqs * self.W
                num_blocks = int(min(need, max(self.W, (2 << 30) // self.bytes_per_block())))
            if self.tp.size > 1:                  # every rank's block ids must name the same pages: take the min
                t = torch.tensor([num_blocks], device=self.device)
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
                num_blocks = int(t.item())
        if num_blocks * self.P < self.W * self.P:
            raise ValueError(f"the KV cache fits {max(num_blocks, 0) * self.P} tokens, less than one sequence of "
                             f"max_model_len={self.max_model_len}: lower max_model_len or raise gpu_memory_utilization")
        self.allocate_kv(num_blocks)
        # Triton compiles and autotunes on first use; doing it here keeps those seconds out of the first
        # generate (and out of benchmarks)
        if cuda:                                  # each autotuning bucket of the prefill kernel, once
            for n in (500, 1000, 2000, 4000, 8000):
                if n <= min(self.max_num_batched_tokens, self.max_model_len):
                    self._dummy_prefill(n)
        if capture_graphs and cuda:
            self.capture()
        return num_blocks, sorted(self.graphs), set(self.model.weight_slots())

    def _dummy_prefill(self, n: int):
        """A forward of n prompt tokens (as sequences of at most max_model_len) that writes no K/V (slots -1):
        to profile memory and to make Triton compile and autotune the prefill kernels before anyone times them."""
        dev, L = self.device, min(n, self.max_model_len)
        i32 = dict(dtype=torch.int32, device=dev)
        # n tokens as full-length sequences (+ a remainder); every block table row is page 0 and no slot is
        # written: the attention reads whatever page 0 holds, which is all a profile needs
        lens = [L] * (n // L) + ([n % L] if n % L else [])
        cu = torch.tensor([0] + list(itertools.accumulate(lens)), **i32)
        pos = torch.cat([torch.arange(k, **i32) for k in lens])
        meta = AttnMeta(False, torch.full((n,), -1, **i32), torch.zeros(len(lens), self.W, **i32),
                        torch.tensor(lens, **i32), cu, L)
        h = self.model(torch.zeros(n, **i32), pos, meta)
        return self.model.logits(h[-min(n, self.max_num_seqs):])

    @torch.inference_mode()
    def profile_peak_bytes(self) -> int:
        """Peak memory of the worst step: max_num_batched_tokens of prefill (+ the logits of max_num_seqs
        rows), measured with a throwaway cache of one sequence."""
        torch.cuda.reset_peak_memory_stats(self.device)
        self.allocate_kv(self.W)
        self._dummy_prefill(self.max_num_batched_tokens)
        torch.cuda.synchronize(self.device)
        self.free_kv()
        return torch.cuda.max_memory_allocated(self.device)

    def copy_blocks(self, copies):
        """Fork copies: block dst <- block src in every layer, k and v (one indexed copy).
        kv[:, :, ids] is [L, 2, copies, P, Hkv/tp, D]. The two index tensors are built from Python lists, small
        synchronous uploads: fine, this runs once per forking request (and never in a graph or ahead step)."""
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        self.kv[:, :, dst] = self.kv[:, :, src]

    # -- one step --

    @torch.inference_mode()
    def launch(self, st: StepInput, prev_tokens=None):
        """Queue one step on the device and return without waiting: tp rank 0 gets (tokens, logprobs, top-k)
        as device tensors, their host copies started (pinned, non-blocking) and an event that marks them done.
        prev_tokens: the device tokens sampled by the step still in flight; they become this step's input ids
        (one-step-ahead decoding: the host never had them)."""
        if st.copies:                           # before the forward: the forks write their next K/V into the copies
            self.copy_blocks(st.copies)
        # FOOTGUN: a copy from pageable host memory waits for the whole stream first; pinned memory does not
        host = st.ints.pin_memory() if self.device.type == "cuda" else st.ints
        ints = host.to(self.device, non_blocking=True)
        if st.graph_bs:
            # a graph reads its inputs from fixed addresses: refresh the static buffer (device to device), patch in
            # the in-flight step's tokens when one-step-ahead, replay; logits stay [graph_bs, V], B rows are real
            self.graph_ints.copy_(ints)                                  # the static buffer's image
            if prev_tokens is not None:
                self.graph_ints[: st.B].copy_(prev_tokens)
            graph, (logits, g_tok, g_lp) = self.graphs[st.graph_bs]
            graph.replay()
            logits = logits[: st.B]
        else:
            ids, pos, slots, ctx, cu, bt, rows = st.views(ints)
            if prev_tokens is not None:
                ids.copy_(prev_tokens)
            meta = AttnMeta(st.decode, slots, bt, ctx, cu, st.max_seqlen_q)
            hidden = self.model(ids, pos, meta)                          # [N, Hd]
            # the LM head only on the S rows that sample (a sequence's newest token, prompt all in): [S, Hd] -> [S, V]
            logits = self.model.logits(hidden.index_select(0, rows.long()) if st.S != st.N else hidden)
        if self.tp.rank != 0:                   # the logits are gathered on every rank; rank 0 alone samples
            return None
        # the graphs were captured with plain temperature sampling + the token's log-prob: reuse their tokens unless
        # a row has a mask or top-k log-probs are wanted, then sample again from the graph's logits, eagerly
        if st.graph_bs and not st.sb["any_filter"] and not st.sb["logprobs"]:   # sampled inside the graph
            tok, lp, top = g_tok[: st.B], None if st.sb["logprobs"] is None else g_lp[: st.B], None
        else:
            tok, lp, top = sample(logits, st.sampling(self.graph_ints if st.graph_bs else ints))
        outs = [tok, lp] + ([None, None] if top is None else [top.values, top.indices])
        if self.device.type != "cuda":
            return tok, outs, None
        # queue the device-to-host copies right behind this step (before any later step can overwrite the graph's
        # static outputs), into pinned buffers so they do not block the host; the event says when they landed
        host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in outs]
        done = torch.cuda.Event()
        done.record()
        return tok, host, done

    @staticmethod
    def fetch(handle):
        """Wait for a launched step's host copies (only for them: later steps may already be queued) ->
        (tokens, logprobs or None, (top values, top ids) or None) as lists."""
        _, (tok, lp, tv, ti), done = handle
        if done is not None:
            done.synchronize()                  # the host waits here, for this step's copies only
        return tok.tolist(), None if lp is None else lp.tolist(), None if tv is None else (tv.tolist(), ti.tolist())

    @torch.inference_mode()
    def execute(self, st: StepInput):
        """One step, synchronously: tp rank 0 returns (tokens, logprobs or None, top-k or None) as lists."""
        h = self.launch(st)
        return None if h is None else self.fetch(h)

    # -- RL hooks --
    # What a trainer colocated with the engine needs: new weights without a restart (copied IN PLACE, so the
    # CUDA graphs, which recorded the parameters' addresses, stay valid), and the GPU memory back while it
    # trains. sleep frees the KV cache (usually the largest allocation) and the weights (level 1 parks them
    # in CPU memory, level 2 drops them: the next update_weights refills them anyway), and the graphs; it
    # keeps the process, its CUDA context, the compiled Triton kernels, the RoPE table and the host-side
    # block manager (empty, its prefix hashes forgotten: the pages' contents are gone).

    def load_weights(self, batch: list) -> tuple[set, list]:
        """update_weights' entry on this rank: (hf_name, full tensor) pairs, a subset is fine; (loaded, unknown)
        go back to the driver, which checks the names over all batches (raising here would kill the worker)."""
        return self.model.load_weights(batch, "update_weights")

    def sleep(self, level: int):
        """Level 1: weights to CPU memory, KV cache freed; level 2: both freed (reload with update_weights).
        CUDA graphs baked in the old addresses, so they are dropped here and captured again by wake_up.
        Asleep already: nothing to do (a second pass would offload the empty placeholders over the weights)."""
        if self.slept is not None:
            return
        self.slept = (level, bool(self.graphs))
        self.graphs.clear()
        self.graph_ints = None
        self.free_kv()
        self.offloaded = {}
        for name, p in self.model.named_parameters():
            # swap the storage under the Parameter (the module tree stays as it is; a tied LM head is the
            # embedding itself). The copy to pageable CPU memory is synchronous.
            self.offloaded[name] = p.data.to("cpu") if level == 1 else (p.shape, p.dtype)
            p.data = torch.empty(0, dtype=p.dtype, device=self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def wake_up(self):
        """Undo sleep: weights back (level 1) or fresh uninitialised storage (level 2: load weights next), a
        zeroed cache of the same num_blocks, and the graphs captured again if there were any. Only after sleep
        (self.slept is set there); awake: nothing to do."""
        if self.slept is None:
            return
        (level, graphs), self.slept = self.slept, None
        for name, p in self.model.named_parameters():
            v = self.offloaded[name]
            p.data = v.to(self.device) if level == 1 else torch.empty(v[0], dtype=v[1], device=self.device)
        self.offloaded = None
        self.allocate_kv(self.num_blocks)
        if graphs:
            self.capture()

    # -- CUDA graphs --
    # A decode step of a small model is hundreds of tiny kernels: launching them from Python costs more
    # than running them. A CUDA graph records the whole forward (embedding -> logits) once per batch size
    # and replays it with one launch. Everything it touches must live at fixed addresses: one static int32
    # buffer holds [input_ids | positions | slot_mapping | context_lens] (max_bs each) and the block table
    # (max_bs x W); a step copies its packed ints into it, padded (slot -1: no KV write; context 0: zero
    # attention output), and replays the smallest graph >= its batch size.
    #
    # Why only decode: a graph fixes every shape, and a decode step's shapes are set by one number, its batch
    # size B, so a handful of graphs covers every decode step; a prefill step varies in token count, sequence
    # count and chunk lengths, and is big enough that its launches are a small share of its time anyway. Which
    # sizes: 1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (as nano-vllm does): a step pads at most
    # 15 rows, and each extra graph costs capture time and a little memory, kept small by one shared memory
    # pool (captured largest first, so the first graph sizes the pool). Unlike nano-vllm, the LM head and the
    # plain-temperature sampler are inside the graph too: at small batch sizes they are many launches as well.

    def graph_sizes(self) -> list[int]:
        m = self.max_num_seqs
        return sorted({s for s in [1, 2, 4, 8] + list(range(16, m + 1, 16)) + [m] if s <= m})

    @torch.inference_mode()
    def capture(self):
        """Record one graph per size of graph_sizes() over one static buffer graph_ints (mb = max_num_seqs):
        [ids mb | positions mb | slots mb | context_lens mb | block_table mb*W | (pad to even) | keys int64
        [3, mb] | params fp32 [4, mb] | rows mb (unread: graph row i samples logits row i)], the layout that
        _build_step writes for a graph step. The graph of size bs reads the first bs entries of each segment;
        its outputs (logits [bs, V], tokens [bs], log-probs [bs]) are static tensors too, overwritten by every
        replay. The graph samples ONE token per row: a forking prompt (n rows from one logits row) is therefore
        never a decode step (_build_step), even when its last chunk is one token."""
        mb, W, dev = self.max_num_seqs, self.W, self.device
        n_model = 4 * mb + mb * W
        off = n_model + n_model % 2
        self.graph_ints = torch.zeros(off + 11 * mb, dtype=torch.int32, device=dev)
        ids, pos, slots, ctx, bt = self.graph_ints[:n_model].split([mb, mb, mb, mb, mb * W])
        keys = self.graph_ints[off: off + 6 * mb].view(torch.int64).view(3, mb)
        f = self.graph_ints[off + 6 * mb: off + 10 * mb].view(torch.float32).view(4, mb)
        slots.fill_(-1)
        bt = bt.view(mb, W)
        rows = torch.arange(mb, device=dev)
        pool = None
        for bs in reversed(self.graph_sizes()):                          # largest first: the pool fits all
            meta = AttnMeta(True, slots[:bs], bt[:bs], ctx[:bs])

            def fwd(bs=bs, meta=meta):
                """decode forward + sampling (the common case: temperature, no top-k/p masks, token log-prob)"""
                logits = self.model.logits(self.model(ids[:bs], pos[:bs], meta))
                sb = SamplingBatch(rows[:bs], f[0, :bs], f[1, :bs], f[2, :bs], f[3, :bs],
                                   uniform_t(keys[0, :bs], keys[1, :bs], keys[2, :bs]), False, False, 0, self.processed)
                tok, lp, _ = sample(logits, sb)
                return logits, tok, lp
            # a graph records kernel launches, so everything lazy (Triton's compile and autotune, cuBLAS
            # workspaces, the allocator's first blocks) must happen in an untimed eager run first
            fwd()                                                        # warm-up (Triton compiles here)
            torch.cuda.synchronize(dev)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool):
                out = fwd()
            pool = pool or g.pool()
            self.graphs[bs] = (g, out)
        torch.cuda.synchronize(dev)


# ---- loading ---------------------------------------------------------------------------------------------
# Weights reach the model as a stream of (HF name, full tensor) pairs, whatever their source: a safetensors
# folder (read one tensor at a time, so host memory stays at one tensor), random tensors of the right shapes
# (load_format="dummy": benchmarks and tests need no checkpoint), or a trainer's live tensors
# (update_weights). Model.load_weights is the one place that cuts them into this rank's shards. Dropped:
# .bin (pickle) checkpoints and quantised formats.

def resolve_model(model) -> Path:
    """A local HF folder, or a hub id ("org/name") downloaded with huggingface_hub when online."""
    p = Path(str(model)).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model {str(model)!r}: the folder has no config.json (not an HF model folder)")
        return p
    if str(model).count("/") != 1 or p.exists():
        raise FileNotFoundError(f"model {str(model)!r}: no such folder, and not a hub id like 'org/name'")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                                   "*.jinja"]))
    except Exception as e:   # offline, unknown repo, no auth: one clear message
        raise FileNotFoundError(f"model {str(model)!r}: not a local folder, and the hub download failed "
                                f"({type(e).__name__}). Offline? Pass an HF folder (e.g. merge.py's output)") from e


def safetensors_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from model.safetensors or the shards its index lists; one tensor in memory at a time."""
    from safetensors import safe_open
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else sorted(p.name for p in folder.glob("*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (use load_format='dummy' for random ones)")
    for f in files:
        with safe_open(str(folder / f), framework="pt") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name)


def dummy_weights(model: Model, seed: int = 0, std: float = 0.02) -> Iterator[tuple[str, torch.Tensor]]:
    """Random full HF tensors (norms 1, biases 0, matrices N(0, std)), the same on every tp rank."""
    # the FULL (unsharded) HF shapes, so dummy weights go through the same slicing as a checkpoint
    c, D, I, Hd = model.cfg, model.cfg.head_dim, model.cfg.intermediate_size, model.cfg.hidden_size
    shapes = {"model.embed_tokens.weight": (c.vocab_size, Hd), "lm_head.weight": (c.vocab_size, Hd)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        for n, rows in (("q", c.num_heads * D), ("k", c.num_kv_heads * D), ("v", c.num_kv_heads * D)):
            shapes[f"{p}self_attn.{n}_proj.weight"] = (rows, Hd)
            shapes[f"{p}self_attn.{n}_proj.bias"] = (rows,)
        shapes[f"{p}self_attn.o_proj.weight"] = (Hd, c.num_heads * D)
        shapes.update({f"{p}mlp.gate_proj.weight": (I, Hd), f"{p}mlp.up_proj.weight": (I, Hd),
                       f"{p}mlp.down_proj.weight": (Hd, I)})
    dev = model.norm.weight.device
    g = torch.Generator(dev).manual_seed(seed)             # one seeded stream: every rank draws the same tensors
    for name in model.weight_slots():
        if "norm" in name:
            yield name, torch.ones(model.cfg.head_dim if "_norm." in name and "self_attn" in name else Hd, device=dev)
        elif name.endswith("bias"):
            yield name, torch.zeros(shapes[name], device=dev)
        else:
            yield name, torch.randn(shapes[name], generator=g, device=dev) * std


# ---- executors: where the model runs ----------------------------------------------------------------------
# tp = 1: in this process. tp > 1: tp worker processes (one per GPU, or CPU processes with gloo), each a
# ModelRunner holding 1/tp of every layer; they form their own torch.distributed group, so the engine also
# works inside a program that already has one (ppo.py under torchrun). Every step the driver sends the same
# StepInput to all of them (a pipe each); they run the forward in lockstep (the all-reduces line them up)
# and rank 0 sends back the sampled tokens.
#
# Why processes: one process per GPU is what NCCL and the CUDA caching allocator expect, and Python threads
# would share one GIL for the per-step host work. The scheduler and block manager stay in the driver alone:
# a worker receives finished StepInputs, so tp ranks never have to agree on a schedule. nano-vllm broadcasts
# each step through shared memory and events, vLLM through a message queue; a pipe per worker is slower but
# plain. Dropped with tp > 1: one-step-ahead decoding (every tp step is synchronous: send, wait for rank 0).

class UniExecutor:
    """tp = 1: the runner in this process; launch / fetch are the asynchronous pair one-step-ahead uses."""

    def __init__(self, runner_args: dict):
        self.runner = ModelRunner(**runner_args)

    def call(self, method: str, *args):
        """Run a runner method by name (setup, sleep, load_weights, ..): the interface both executors share."""
        return getattr(self.runner, method)(*args)

    def execute(self, st: StepInput):
        return self.runner.execute(st)

    @torch.inference_mode()
    def launch(self, st: StepInput, prev_tokens=None):
        return self.runner.launch(st, prev_tokens)

    def fetch(self, handle):
        return self.runner.fetch(handle)

    def shutdown(self):
        pass


def _worker_main(rank: int, size: int, port: int, runner_args: dict, conn, cuda: bool):
    """A tp worker: join the engine's group, build this rank's runner, then serve calls until 'exit'."""
    if cuda:                  # FOOTGUN: rank r takes visible GPU r; pick the GPUs with CUDA_VISIBLE_DEVICES
        torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    import datetime
    torch.distributed.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=size, timeout=datetime.timedelta(seconds=600))
    try:
        runner = ModelRunner(**{**runner_args, "tp": TPGroup(rank, size), "device": dev})
        conn.send(("ok", None))
        while True:
            method, args = conn.recv()
            if method == "exit":
                break
            try:
                out = runner.execute(*args) if method == "execute" else getattr(runner, method)(*args)
                # a step's answer comes from rank 0 alone (the others return None); other calls answer on every rank
                if method != "execute" or rank == 0:
                    conn.send(("ok", out))
            except Exception as e:          # report, then stop: the group is out of step now
                import traceback
                conn.send(("error", f"tp rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
                raise
    finally:
        torch.distributed.destroy_process_group()


class MultiprocExecutor:
    """tp > 1: `size` worker processes, each a ModelRunner of one rank, driven through one pipe each."""

    def __init__(self, runner_args: dict, size: int, cuda: bool, timeout_s: float = 600.0):
        import multiprocessing as mp
        import socket
        ctx = mp.get_context("spawn")                 # never fork a process that may hold CUDA state
        with socket.socket() as s:                    # a free port for the workers' rendezvous (tcp:// init)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.conns, self.procs, self.timeout_s = [], [], timeout_s
        args = {k: v for k, v in runner_args.items() if k not in ("tp", "device")}
        for r in range(size):
            a, b = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(r, size, port, args, b, cuda), daemon=True)
            p.start()
            self.conns.append(a)
            self.procs.append(p)
        try:
            for r in range(size):                     # each answers "ok" once its runner is built
                self._recv(r)
        except BaseException:                         # no worker outlives a failed start (they hold a GPU each)
            self.shutdown()
            raise

    def _died(self, r: int) -> RuntimeError:
        """Worker r's error message if it sent one before exiting (a killed worker's pipe only reads EOF)."""
        c, p = self.conns[r], self.procs[r]
        try:
            msg = c.recv()[1] if c.poll() else None
        except (EOFError, OSError):
            msg = None
        p.join(1)
        return RuntimeError(f"nanovllm: tp worker {r} died: {msg or f'exit code {p.exitcode}'}")

    def _send(self, msg):
        for r, c in enumerate(self.conns):
            try:
                c.send(msg)
            except (BrokenPipeError, OSError):        # a dead worker's pipe
                raise self._died(r) from None

    def _recv(self, rank: int):
        """Wait for one worker's reply. A worker that fails sends its error and exits; any worker that dies
        meanwhile (the others then wait in a collective) or a timeout raises here: never a hang."""
        conn, deadline = self.conns[rank], time.monotonic() + self.timeout_s
        while not conn.poll(0.05):
            for r, p in enumerate(self.procs):
                if not p.is_alive():
                    raise self._died(r)
            if time.monotonic() > deadline:
                raise TimeoutError(f"nanovllm: tp worker {rank} did not answer within {self.timeout_s:.0f} s")
        try:
            status, out = conn.recv()
        except EOFError:                              # it died with nothing sent: its pipe polls readable (EOF)
            raise self._died(rank) from None
        if status == "error":
            raise RuntimeError(out)
        return out

    def call(self, method: str, *args):
        """Run a runner method on every rank (they must all take part: collectives); rank 0's result."""
        self._send((method, args))
        return [self._recv(r) for r in range(len(self.conns))][0]

    def execute(self, st: StepInput):
        self._send(("execute", (st,)))
        return self._recv(0)

    def shutdown(self):
        for c, p in zip(self.conns, self.procs):
            if p.is_alive():
                try:
                    c.send(("exit", ()))
                except (BrokenPipeError, OSError):
                    pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.procs = []


# ---- LLM: the engine's front door --------------------------------------------------------------------------
# The driver: it owns the tokenizer, the requests, the Scheduler and the BlockManager (all host state) and
# one executor (the GPU side). One step, the loop everything else serves:
#   schedule()             which sequences run, how many tokens each; blocks allocated  (Scheduler)
#   _build_step()          the step packed into one int32 tensor + the sampling plan     (host)
#   executor.launch()      forward + sample queued on the device, results copied back    (ModelRunner)
#   _speculate()           the NEXT decode step queued before this one's tokens are read  (one step ahead)
#   _finish()              wait for the tokens; computed counts, prefix hashes, forks, stops, outputs
# vLLM splits this across an engine core, a scheduler, an executor and an output processor, possibly in other
# processes; nano-vllm has an LLMEngine.step of the same shape without the one-step-ahead part. Kept here: the
# offline LLM class and the step-level API (add_request / step / abort_request) ppo.py drives; dropped: the
# async HTTP server, streaming outputs, incremental detokenisation (text is decoded once, at the end).

class LLM:
    """vLLM's offline API. `generate` / `chat` run requests to completion; `add_request` / `step` /
    `abort_request` drive the engine one step at a time (what ppo.py and the tests use)."""

    def __init__(self, model, tokenizer=None, *, tensor_parallel_size: int = 1, dtype: str = "auto",
                 seed: int = 0, gpu_memory_utilization: float = 0.9, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, max_model_len: int | None = None, enforce_eager: bool = False,
                 enable_prefix_caching: bool = True, block_size: int = 16, num_gpu_blocks_override: int | None = None,
                 load_format: str = "auto", weights: Iterable | None = None,
                 logprobs_mode: str = "processed_logprobs", skip_tokenizer_init: bool = False,
                 device: str | None = None, use_kernels: bool = True, async_scheduling: bool = True):
        t0 = time.perf_counter()
        folder = resolve_model(model)
        self.cfg = c = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()), f"{folder}/config.json")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tp = tensor_parallel_size
        checks = [(tp >= 1 and c.num_kv_heads % tp == 0 and c.num_heads % tp == 0,
                   f"tensor_parallel_size={tp} must divide num_attention_heads={c.num_heads} and "
                   f"num_key_value_heads={c.num_kv_heads}"),
                  (dev.type != "cuda" or tp <= torch.cuda.device_count(),
                   f"tensor_parallel_size={tp} needs {tp} GPUs, {torch.cuda.device_count() if dev.type == 'cuda' else 0} visible"),
                  (block_size >= 1 and block_size & (block_size - 1) == 0, f"block_size={block_size} must be a power of 2"),
                  (0 < gpu_memory_utilization <= 1, f"gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]"),
                  (dtype in ("auto", "bfloat16", "float16", "float32"), f"dtype={dtype!r}: auto|bfloat16|float16|float32"),
                  (logprobs_mode in ("processed_logprobs", "raw_logprobs"),
                   f"logprobs_mode={logprobs_mode!r}: processed_logprobs | raw_logprobs"),
                  (load_format in ("auto", "dummy"), f"load_format={load_format!r}: auto | dummy"),
                  (max_num_seqs >= 1 and max_num_batched_tokens >= 1, "max_num_seqs and max_num_batched_tokens must be >= 1"),
                  (max_model_len is None or 1 <= max_model_len <= c.max_position_embeddings,
                   f"max_model_len={max_model_len} must be in [1, max_position_embeddings={c.max_position_embeddings}]")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"LLM: {msg}")
        if dtype == "auto":   # the checkpoint's half precision on a GPU; fp32 on CPU (fast and exact there)
            dtype = ("float16" if c.torch_dtype == "float16" else "bfloat16") if dev.type == "cuda" else "float32"
        self.dtype, self.device, self.seed = getattr(torch, dtype), dev, seed
        self.max_model_len = max_model_len or c.max_position_embeddings
        self.processed = logprobs_mode == "processed_logprobs"
        self.tokenizer = None if skip_tokenizer_init else load_tokenizer(tokenizer or folder, required=tokenizer is not None)
        # the end-of-sequence ids: config.json, generation_config.json (chat models often add <|im_end|> etc.
        # there) and the tokenizer's; any of them stops a sample unless ignore_eos
        self.eos_ids = set(c.eos_token_id) | set(_generation_eos(folder))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        args = dict(cfg=c, tp=TPGroup(), device=dev, dtype=self.dtype, block_size=block_size,
                    max_model_len=self.max_model_len, max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=max_num_batched_tokens, use_kernels=use_kernels,
                    processed_logprobs=logprobs_mode == "processed_logprobs")
        self.executor = (UniExecutor(args) if tp == 1 else MultiprocExecutor(args, tp, dev.type == "cuda"))
        # weights=[(name, tensor), ..] (a trainer's live model): start from dummy weights, then copy those in
        load = "dummy" if load_format == "dummy" or weights is not None else str(folder)
        try:
            num_blocks, self.graph_sizes, self.weight_names = self.executor.call(
                "setup", load, seed, gpu_memory_utilization, num_gpu_blocks_override,
                capture_graphs(enforce_eager, dev, use_kernels))
            self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
            if weights is not None:      # ALL weights this time: a missing one would keep its dummy values
                self._load_weights(weights, "LLM(weights=...)", require_all=True)
        except BaseException:
            self.executor.shutdown()
            raise
        self.block_size, self.W = block_size, -(-self.max_model_len // block_size)
        self.max_num_seqs, self.async_scheduling = max_num_seqs, async_scheduling
        self.scheduler = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens)
        self._inflight, self._aborted = None, []   # the step queued ahead (see step); aborted outputs to return
        self.requests: dict[str, Request] = {}
        self._asleep, self._missing = 0, set()    # sleep()'s level; after sleep(2), the weights not loaded since
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self._copies: list = []                    # fork block copies (src, dst) for the next step to make first
        self.stats = dict(steps=0, prefill_tokens=0, decode_tokens=0, graph_steps=0, load_s=0.0)
        self.stats["load_s"] = time.perf_counter() - t0
        self.log(f"nanovllm: {c.model_type} {c.num_layers} layers from {folder} on {dev} ({dtype}, tp={tp}), "
                 f"KV cache {num_blocks} blocks x {block_size} tokens = {num_blocks * block_size:,} tokens, "
                 f"CUDA graphs for {len(self.graph_sizes)} batch sizes, {self.stats['load_s']:.1f} s")

    verbose = True

    def log(self, msg: str):
        if self.verbose:
            print(msg, file=sys.stderr)

    def get_tokenizer(self):
        return self.tokenizer

    # -- requests in --

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt given as text, token ids or a vLLM-style dict."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("LLM: text prompts need a tokenizer (this engine has none): pass token ids")
            return prompt, self.tokenizer(prompt).input_ids
        try:                          # numpy / torch integers are token ids too
            return None, [t.__index__() for t in prompt]
        except (AttributeError, TypeError):
            raise ValueError(f"LLM: a prompt must be a string, a sequence of integer token ids or a dict; got "
                             f"{type(prompt).__name__} {str(prompt)[:60]}") from None

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue one prompt (text, token ids, or {"prompt_token_ids": ...}); returns its request id."""
        if self._asleep or self._missing:     # (generating from freed or never-loaded weights: NaN, no error)
            raise RuntimeError("LLM: the engine is asleep: call wake_up() first" if self._asleep else
                               f"LLM: sleep(2) dropped the weights and {len(self._missing)} are not loaded again "
                               f"(e.g. {min(self._missing)}): update_weights must send them before generating")
        params = params or SamplingParams()
        text, ids = self._prompt_ids(prompt)
        arrival = next(self._ids)
        rid = str(arrival) if request_id is None else str(request_id)
        while request_id is None and rid in self.requests:     # a caller's own id "3" must not block arrival 3
            rid += "'"
        if rid in self.requests:
            raise ValueError(f"LLM: request id {rid!r} is already in use")
        if not ids:
            raise ValueError(f"LLM: request {rid}: the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"LLM: request {rid}: the prompt has {len(ids)} tokens, max_model_len is "
                             f"{self.max_model_len} (room for at least one new token is needed)")
        if params.n > self.max_num_seqs:
            raise ValueError(f"LLM: request {rid}: n={params.n} > max_num_seqs={self.max_num_seqs}")
        if params.stop and self.tokenizer is None:      # (else they would be ignored: the text is never made)
            raise ValueError(f"LLM: request {rid}: stop={params.stop} needs a tokenizer (this engine has none); "
                             "use stop_token_ids")
        if (params.logprobs or 0) > self.cfg.vocab_size:
            raise ValueError(f"LLM: request {rid}: logprobs={params.logprobs} > the vocabulary ({self.cfg.vocab_size})")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"LLM: request {rid}: token id {bad[0]} outside the vocabulary [0, {self.cfg.vocab_size})")
        # no seed given: derive one from (LLM seed, arrival number), so a rerun of the same requests in the same
        # order gives the same samples, while two requests never share a stream
        seed = params.seed if params.seed is not None else _mix64((self.seed << 32) ^ arrival)
        req = Request(rid, text, ids, params, arrival, seed)
        # what _sampling copies into every step's rows, computed once: the seed as int64 bits, the float params
        # (top_k off = V: "keep all V ranks"), and whether any mask is on (the host flag that skips the sort)
        req.seed64 = _s64(seed & M64)
        req.row = (params.temperature, params.top_k if params.top_k > 0 else self.cfg.vocab_size, params.top_p,
                   params.min_p)
        req.filtered = params.top_k > 0 or params.top_p < 1 or params.min_p > 0
        seq = Sequence(next(self._seq_ids), req, 0, list(ids))   # ONE sequence; it forks after its prompt
        seq.pending_forks = params.n - 1
        req.seqs.append(seq)
        self.requests[rid] = req
        self.scheduler.add(seq)
        return rid

    def abort_request(self, request_id: str):
        """Stop a request now: its samples end with finish_reason "abort" and the next step returns it."""
        req = self.requests.pop(str(request_id), None)
        if req is not None:
            for s in req.seqs:
                s.pending_forks = 0
            self.scheduler.abort(req.seqs)
            self._aborted.append(self._output(req))

    def has_unfinished_requests(self) -> bool:
        """Work left: queued or running sequences, a step in flight, or aborted outputs not yet returned."""
        return self.scheduler.has_work() or self._inflight is not None or bool(self._aborted)

    # -- one step --

    def _build_step(self, scheduled, ahead: int = 0) -> tuple[StepInput, list]:
        """Pack the scheduled (sequence, new tokens) pairs into one StepInput; plan which rows sample.
        Hot path: at 256 sequences this runs every few milliseconds, so it builds flat Python lists and
        stacks the per-sequence block-table rows (cached as tensors, see _table_row) in one call."""
        P, W = self.block_size, self.W
        # a pure-decode step: every sequence computes exactly its last token and samples ONE row. (A prompt whose
        # last chunk is one token, after chunking, passes too, unless it forks: its n samples draw n rows from
        # one logits row, which the decode graph's in-graph sampler, one row per sequence, cannot do.)
        decode = all(n == 1 and s.num_computed == s.num_tokens - 1 and not s.pending_forks for s, n in scheduled)
        seqs = [s for s, _ in scheduled]
        B = len(seqs)
        if decode:                                               # one token each: no per-token loops
            ids = [s.token_ids[-1] for s in seqs] if not ahead else [0] * B   # ahead: filled on the device
            pos = [s.num_tokens - 1 + ahead for s in seqs]
            # slot = (page holding position p) * P + offset in it: where this token's K/V are written
            slots = [s.block_table[p // P] * P + p % P for s, p in zip(seqs, pos)]
            ctx = [p + 1 for p in pos]                          # tokens to attend over, the new one included
            cu, rows, plan = list(range(B + 1)), list(range(B)), seqs
        else:
            ids, pos, slots, ctx, cu, rows, plan = [], [], [], [], [0], [], []
            for seq, n in scheduled:                            # tokens [a, a + n) of each sequence, packed
                a, bt = seq.num_computed, seq.block_table
                ids.extend(seq.token_ids[a:a + n])
                pos.extend(range(a, a + n))
                slots.extend(bt[p // P] * P + p % P for p in range(a, a + n))
                ctx.append(a + n)
                cu.append(cu[-1] + n)
                if a + n == seq.num_tokens:                     # its last token is in: sample the next one
                    rows.append(cu[-1] - 1)
                    plan.append(seq)
                # (a chunk that ends mid-prompt samples nothing: its last logits predict a known token)
        tables = torch.stack([_table_row(s, W) for s in seqs])  # [B, W]
        # the smallest captured size >= B, or 0 = eager (prefill, no graphs, or fork copies to make first)
        graph_bs = next((g for g in self.graph_sizes if g >= B), 0) if decode and not self._copies else 0
        if graph_bs:                                             # the graph's static layout, padded to max_bs
            # padding rows: token 0 at position 0, slot -1 (no K/V write), context 0 (attends to nothing)
            pad = self.max_num_seqs - B
            head = torch.tensor(ids + [0] * pad + pos + [0] * pad + slots + [-1] * pad + ctx + [0] * pad,
                                dtype=torch.int32)
            parts = [head, tables.view(-1), torch.zeros(pad * W, dtype=torch.int32)]
        else:   # every segment padded to 4 words: Triton compiles a variant per pointer alignment (16 bytes)
            parts = [torch.tensor(_pad4(ids) + _pad4(pos) + _pad4(slots) + _pad4(ctx) + _pad4(cu), dtype=torch.int32),
                     tables.view(-1), torch.zeros(-B * W % 4, dtype=torch.int32), torch.tensor(_pad4(rows), dtype=torch.int32)]
        n_model = sum(t.numel() for t in parts)
        sb = self._sampling(plan, ahead, self.max_num_seqs if graph_bs else None)
        parts += [torch.zeros(n_model % 2, dtype=torch.int32), sb.pop("words")]   # int64 keys need 8-byte alignment
        st = StepInput(torch.cat(parts), len(ids), B, W, len(rows), max(n for _, n in scheduled), decode, graph_bs,
                       n_model, sb, self._copies)
        self._copies = []                                        # handed to this step, made before its forward
        return st, plan

    def _sampling(self, plan: list, ahead: int = 0, pad_to: int | None = None) -> dict:
        """Per sampled row: its random-stream key (request seed, sample index, output position), its sampling
        params and the logits row it reads, as int32 words (int64 and fp32 bits) that travel in the step's one
        host-to-device copy. Forking prompts read their row n times (one per sample)."""
        # one row per seat: a forking prompt samples its n first tokens now, one per future sample k, from the same
        # logits row i; the key (seed, sample, output position) gives each its own draw. Hot path (every decode
        # step, one row per sequence): comprehensions over the sequences, no per-row appends.
        seats = [(i, q, k) for i, q in enumerate(plan) for k in range(q.seats)] if any(q.pending_forks for q in plan) \
            else [(i, q, 0) for i, q in enumerate(plan)]
        reqs = [q.request for _, q, _ in seats]
        keys = [[r.seed64 for r in reqs], [q.sample + k for _, q, k in seats],
                [len(q.token_ids) - q.num_prompt + ahead for _, q, _ in seats]]       # (output position)
        fl = [list(col) for col in zip(*(r.row for r in reqs))] or [[], [], [], []]   # 4 float columns
        rix = [i for i, _, _ in seats]
        uniq = {id(q.request): q.request for q in plan}.values()                     # the batch-wide flags
        greedy, filt = all(r.params.greedy for r in uniq), any(r.filtered for r in uniq)
        asked = [r.params.logprobs for r in uniq if r.params.logprobs is not None]
        lp = max(asked) if asked else None    # one batch-wide setting: the largest top-k asked for (None: nobody)
        R = len(rix)
        Rp = pad_to or R
        if Rp > R:                            # graph padding rows: greedy, no masks, never read back
            for col, v in zip(keys + fl, (0, 0, 0, 0.0, float(self.cfg.vocab_size), 1.0, 0.0)):
                col.extend([v] * (Rp - R))
            rix.extend(range(R, Rp))
        words = torch.cat([torch.tensor(keys, dtype=torch.int64).view(-1).view(torch.int32),
                           torch.tensor(fl, dtype=torch.float32).view(-1).view(torch.int32),
                           torch.tensor(rix, dtype=torch.int32)])
        return dict(words=words, R=R, Rp=Rp, all_greedy=greedy, any_filter=filt, logprobs=lp, processed=self.processed)

    def step(self) -> list[RequestOutput]:
        """Schedule, run and sample one step; returns the requests that finished in it.
        One step ahead (async_scheduling, tp = 1): while a pure-decode step runs on the device, the next one is
        built and queued behind it, its input ids taken ON THE DEVICE from the running step's samples; the host
        then processes the running step's tokens while the device computes the next. The host's Python work
        (scheduling, packing, stop checks) hides behind device time instead of adding to it. A sequence that
        stopped meanwhile has its one extra token discarded; blocks are only freed after the step that wrote
        them was queued, and the stream runs steps in order, so a reused block is never overwritten late."""
        t0 = time.perf_counter()
        # cur: the step whose tokens this call applies: the one queued ahead by the previous call, or else a
        # freshly scheduled one (the scheduler only ever runs when nothing is in flight)
        cur, self._inflight = self._inflight, None
        if cur is None:
            scheduled = self.scheduler.schedule()
            if not scheduled:
                done, self._aborted = self._aborted, []
                return done
            cur = self._launch(scheduled)
        t1 = time.perf_counter()
        if self.async_scheduling:
            self._inflight = self._speculate(cur)
        t2 = time.perf_counter()
        done = self._finish(cur) + self._aborted
        self._aborted = []
        for k, v in zip(("launch_s", "ahead_s", "finish_s"), (t1 - t0, t2 - t1, time.perf_counter() - t2)):
            self.stats[k] = self.stats.get(k, 0.0) + v
        return done

    def _launch(self, scheduled, ahead: int = 0, prev=None) -> tuple:
        """Build and start one step -> (scheduled, plan, StepInput, handle). handle: launch's device handle
        at tp = 1, the finished (tokens, logprobs, top) lists with tp workers (their steps are synchronous)."""
        st, plan = self._build_step(scheduled, ahead)
        self.stats["steps"] += 1
        self.stats["graph_steps"] += bool(st.graph_bs)
        self.stats["decode_tokens" if st.decode else "prefill_tokens"] += st.N
        if isinstance(self.executor, UniExecutor):
            return scheduled, plan, st, self.executor.launch(st, prev)
        return scheduled, plan, st, self.executor.execute(st)        # tp workers: one synchronous step

    def _speculate(self, cur):
        """Queue the decode step after `cur` before its tokens are known (see step), when that next step is
        sure to be exactly 'every running sequence, one more token': cur was a pure decode of all of them,
        nobody waits to be admitted, and the blocks for the next position are free (else: the normal path)."""
        scheduled, _, st, handle = cur
        seqs = [q for q, _ in scheduled]
        if (not st.decode or self.scheduler.waiting or self._copies or not isinstance(self.executor, UniExecutor)
                or len(seqs) != len(self.scheduler.running) or any(q.status != RUNNING or q.seats > 1 for q in seqs)):
            return None
        # num_computed does not count cur's token yet: 2 = the token cur writes + the one this step writes
        if sum(self.bm.blocks_needed(q, 2) for q in seqs) > self.bm.num_free():
            return None
        for q in seqs:
            self.bm.grow(q, 2)
        return self._launch([(q, 1) for q in seqs], ahead=1, prev=handle[0])

    def _finish(self, cur) -> list[RequestOutput]:
        """Wait for a launched step's samples and apply them: computed counts, prefix-cache hashes, forks,
        new tokens, stops. Sequences finished in the meantime (stopped one step earlier, or aborted) skip."""
        scheduled, plan, st, handle = cur
        toks, lps, top = self.executor.fetch(handle) if isinstance(self.executor, UniExecutor) else handle
        # toks / lps / top are flat over the plan's rows: seats rows per planned sequence, in plan order; k walks them
        for seq, n in scheduled:
            if seq.status != FINISHED:
                seq.num_computed += n
                self.bm.commit(seq)
        done, k, new, ended = [], 0, {}, {}
        for seq in plan:
            if seq.status == FINISHED:
                k += seq.seats
                continue
            group = [seq] + self._fork(seq) if seq.pending_forks else [seq]
            if len(group) > 1:
                new[seq.seq_id] = group[1:]
            for q in group:
                self._append(q, toks[k], None if lps is None else lps[k], None if top is None else (top[0][k], top[1][k]))
                k += 1
                if q.status == FINISHED:
                    ended[q.request.request_id] = q.request
        # rebuild running: new children after their parent, finished sequences out (their blocks are already free)
        if new or ended:
            running = []
            for q in self.scheduler.running:                  # children go right after their parent (FCFS)
                running.append(q)
                running.extend(new.get(q.seq_id, ()))
            self.scheduler.running = [q for q in running if q.status != FINISHED]
        # only a request with a sample that ended in THIS step can have just finished (earlier ones were popped then)
        for rid, req in ended.items():
            if rid in self.requests and not any(q.pending_forks or q.status != FINISHED for q in req.seqs):
                done.append(self._output(self.requests.pop(rid)))
        return done

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """After its prompt prefill, a request with n samples splits into n sequences. The full blocks are
        shared (ref += 1 each); the last, partial block (if any) is copied into a reserved block per child
        before the next forward, because every sample writes its own next tokens into it."""
        if not parent.pending_forks:
            return []
        P, kids = self.block_size, []
        full = parent.num_prompt // P
        for j in range(1, parent.pending_forks + 1):
            kid = Sequence(next(self._seq_ids), parent.request, j, list(parent.token_ids))
            kid.num_computed, kid.status = parent.num_computed, RUNNING
            kid.block_hashes = list(parent.block_hashes)      # the shared full blocks keep their prefix names
            for bid in parent.block_table[:full]:
                self.bm.acquire(bid)
                kid.block_table.append(bid)
            if parent.num_prompt % P:                          # the partial last block: a private copy each
                dst = parent.fork_blocks.pop()                  # reserved by the scheduler with the last chunk
                kid.block_table.append(dst)
                self._copies.append((parent.block_table[full], dst))
            kids.append(kid)
        parent.request.seqs.extend(kids)
        parent.pending_forks = 0
        return kids

    def _append(self, seq: Sequence, tok: int, lp, top):
        """Add one sampled token (+ its log-probs) to a sequence and check the stop conditions, in this order:
        a stop token, EOS, a stop string in the decoded tail, the length limits (max_tokens, max_model_len): a
        stop string completed by the last allowed token still ends the sample as "stop", cut there (as vLLM)."""
        seq.token_ids.append(tok)
        p = seq.request.params
        if lp is not None:                    # (present when ANY request of the step wants log-probs)
            seq.logprobs.append(lp)
            if p.logprobs:
                d = {i: Logprob(v, r + 1) for r, (v, i) in enumerate(zip(top[0][: p.logprobs], top[1][: p.logprobs]))}
                d.setdefault(tok, Logprob(lp))
                seq.top_logprobs.append(d)
        if tok in p.stop_token_ids:
            self.scheduler.finish(seq, "stop", tok)
        elif tok in self.eos_ids and not p.ignore_eos:
            self.scheduler.finish(seq, "stop")
        elif (hit := self._stop_string(seq, p)) is not None:
            self.scheduler.finish(seq, "stop", hit)
        elif (p.max_tokens is not None and seq.num_output >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def _stop_string(self, seq: Sequence, p: SamplingParams) -> str | None:
        """The first of p.stop found in the decoded tail of the output (None: none, or no tokenizer)."""
        if not p.stop or self.tokenizer is None:
            return None
        # a stop string spans at most that many tokens: every token decodes to >= 1 byte (byte-level BPE splits a
        # rare character into single-byte tokens: counting characters would miss a Chinese stop string)
        width = max(len(s.encode("utf-8")) for s in p.stop) + 2
        tail = self.tokenizer.decode(seq.token_ids[max(seq.num_prompt, seq.num_tokens - width):],
                                     skip_special_tokens=p.skip_special_tokens)
        return next((s for s in p.stop if s in tail), None)

    def _output(self, req: Request) -> RequestOutput:
        """The finished request as vLLM's RequestOutput: detokenised text (cut at a stop string), token ids, and
        log-probs in both forms (token_logprobs: a flat list; logprobs: vLLM's per-token dicts)."""
        outs = []
        for s in sorted(req.seqs, key=lambda s: s.sample):
            ids, p = s.token_ids[s.num_prompt:], req.params
            text = ""
            if self.tokenizer is not None and p.detokenize:
                # as vLLM: the token that stopped the sample (a stop token id, or EOS) is in token_ids, not in text
                cut_last = s.finish_reason == "stop" and not isinstance(s.stop_reason, str) and ids and \
                    not p.include_stop_str_in_output
                text = self.tokenizer.decode(ids[:-1] if cut_last else ids, skip_special_tokens=p.skip_special_tokens)
                if isinstance(s.stop_reason, str):
                    cut = text.find(s.stop_reason)
                    if cut >= 0:
                        text = text[: cut + (len(s.stop_reason) if p.include_stop_str_in_output else 0)]
            lp = s.logprobs if p.logprobs is not None else None
            outs.append(CompletionOutput(s.sample, text, ids, None if lp is None else float(sum(lp)),
                                         (s.top_logprobs or TokenLogprobs(ids, lp)) if lp is not None else None,
                                         s.finish_reason, s.stop_reason, lp))
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, True, req.num_cached_tokens or 0)

    # -- batch API --

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run prompts to completion; outputs in the order of the prompts. prompts: a string, a list of
        token ids, a dict, or a list of those. sampling_params: one for all, or one per prompt."""
        one = lambda x: isinstance(x, int) or (hasattr(x, "__index__") and getattr(x, "ndim", 0) == 0)  # noqa: E731
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if prompts and one(prompts[0]):               # ONE prompt of token ids (a list, tuple, numpy array)
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"LLM.generate: {len(prompts)} prompts but {len(params)} sampling params")
        order = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                order.append(self.add_request(p, sp))
        except ValueError as e:   # none of the batch stays queued (a half-queued batch would block update_weights)
            for rid in order:
                self.abort_request(rid)
            self._aborted = [o for o in self._aborted if o.request_id not in order]
            raise ValueError(f"LLM.generate: prompt {i} of {len(prompts)}: {e}") from None
        return self._run(order, use_tqdm)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation ([{"role": .., "content": ..}, ..]) or a list of them, through
        the tokenizer's chat template."""
        if self.tokenizer is None:
            raise ValueError("LLM.chat needs a tokenizer with a chat template")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in convs:
            ids = self.tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=add_generation_prompt,
                                                     **(chat_template_kwargs or {}))
            prompts.append({"prompt_token_ids": list(ids["input_ids"] if hasattr(ids, "keys") else ids)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Step until every request is done (also any queued before this call); outputs in `order`."""
        bar = _progress(len(order)) if use_tqdm and self.verbose else None
        done, t0 = {}, time.perf_counter()
        try:
            while self.has_unfinished_requests():
                for out in self.step():
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        except BaseException:                             # leave the engine empty and usable
            self.scheduler.abort(s for r in list(self.requests.values()) for s in r.seqs)
            self.requests.clear()
            self._inflight, self._aborted = None, []
            raise
        finally:
            if bar is not None:
                bar.close()
        self.stats["generate_s"] = time.perf_counter() - t0
        return [done[r] for r in order]

    # -- RL hooks --

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load new weights in place from (hf_name, full tensor) pairs (no disk), then forget the prefix
        cache (its K/V came from the old weights). Returns the seconds it took. The rule on names: a SUBSET
        is accepted (RL sends every weight, but a caller may send only those that changed; a tensor not sent
        keeps its value); an UNKNOWN name always raises ValueError (after the known ones were copied)."""
        # Only between generations: a running sample would go on from K/V of the old weights with tokens of the
        # new ones, one sample of two policies, silently. (ppo.py waits for its rollout thread before it syncs.)
        if self.has_unfinished_requests():
            raise RuntimeError(f"LLM.update_weights: {len(self.requests)} request(s) in flight: generate() must finish "
                               "them, or abort_request them and step() until has_unfinished_requests() is False")
        if self._asleep:
            raise RuntimeError("LLM.update_weights: the engine is asleep (its weights are freed): wake_up() first")
        t0 = time.perf_counter()
        self._missing -= self._load_weights(weights, "update_weights", require_all=False)
        return time.perf_counter() - t0

    def _load_weights(self, weights, where: str, require_all: bool):
        """Stream (hf_name, tensor) pairs into every rank's model, then check the names HERE, over the whole
        stream (tp: over every batch): a trainer's pairs come from a generator, never held all at once."""
        if isinstance(self.executor, UniExecutor):
            # tensors may live on any device (a colocated trainer's GPU: a device-to-device copy)
            seen, unknown = self.executor.runner.model.load_weights(weights, where)
        else:
            # tp workers live in other processes: send CPU copies through the pipes, ~256 MiB per message
            seen, unknown, batch, size = set(), [], [], 0
            for name, t in itertools.chain(weights, [(None, None)]):    # (None, None): send the last batch
                if name is not None:
                    batch.append((name, t.detach().cpu()))
                    size += t.numel() * t.element_size()
                if batch and (size > 256 << 20 or name is None):
                    s, u = self.executor.call("load_weights", batch)
                    seen, unknown, batch, size = seen | s, unknown + u, [], 0
        self.reset_prefix_cache()           # even when the names fail below: some weights have changed
        check_weight_names(where, self.cfg.model_type, sorted(self.weight_names - seen) if require_all else [],
                           unknown)
        return seen

    def reset_prefix_cache(self):
        """Make every cached block unhittable (vLLM's name): needed whenever the weights change."""
        self.bm.reset_prefix_cache()

    def sleep(self, level: int = 1) -> float:
        """Free the KV cache and the weights (level 1 keeps them in CPU memory, level 2 drops them: refill with
        update_weights after wake_up) so a trainer can use the GPU. Nothing may be running. Returns seconds."""
        if self.has_unfinished_requests():
            raise RuntimeError("LLM.sleep: requests are still running; finish or abort them first")
        t0 = time.perf_counter()
        self.executor.call("sleep", level)
        self.bm.reset_prefix_cache()
        self._asleep = level
        if level == 2:
            self._missing = set(self.weight_names)
        return time.perf_counter() - t0

    def wake_up(self) -> float:
        """Reallocate what sleep freed (after level 2, load weights with update_weights before generating).
        Returns the seconds it took."""
        t0 = time.perf_counter()
        self.executor.call("wake_up")
        self._asleep = 0
        return time.perf_counter() - t0

    def shutdown(self):
        self.executor.shutdown()

    def __del__(self):
        ex = getattr(self, "executor", None)
        if ex is not None:
            ex.shutdown()


def _generation_eos(folder: Path) -> list[int]:
    f = folder / "generation_config.json"
    if not f.is_file():
        return []
    eos = json.loads(f.read_text()).get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def load_tokenizer(name, required: bool = False):
    """The HF tokenizer of a folder / hub id, or None when the folder has none (token-id prompts only)."""
    p = Path(str(name))
    if p.is_dir() and not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                          "tokenizer.model")):
        if required:
            raise ValueError(f"LLM: the tokenizer folder {p} has no tokenizer files")
        return None                       # (transformers would build an EMPTY tokenizer from config.json)
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(name))
    except (OSError, ValueError, ImportError) as e:
        if required:
            raise ValueError(f"LLM: cannot load the tokenizer {str(name)!r}: {str(e).splitlines()[0]}") from e
        return None


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="nanovllm", unit="req", dynamic_ncols=True, file=sys.stderr)


# ---- benchmark --------------------------------------------------------------------------------------------
# `python nanovllm.py --bench` (one GPU). The workload of nano-vllm's bench.py: 256 requests with prompt and
# output lengths uniform in 100..1024, ignore_eos, random weights of the Qwen3-0.6B shape (and of the
# SmolLM2-135M shape, where the host decides). The bound: decode is bandwidth-bound, so no engine beats
# reading, every decode step, all weights once (the embedding: only B rows) plus every active sequence's
# K/V; summed over the steps of the ideal schedule (all requests in flight from the start) at the copy
# bandwidth measured in the same run. Prefill is left out of the bound (it only makes the bound harder).

SHAPES = {   # config.json fields of the benchmarked shapes (random weights)
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         rope_theta=1e5, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5),
}


def _timed(fn) -> tuple[float, object]:
    """(seconds, result) of fn() with the GPU drained before and after: the one timer of this file."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), the best of 5: the roofline of this run."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    return max(nbytes / _timed(lambda: b.copy_(a))[0] for _ in range(5))


def decode_bound(c: ModelConfig, prompt_lens, out_lens, bw: float, dtype_bytes: int = 2) -> float:
    """Output tokens/s of an engine that only ever waits for HBM (see the banner)."""
    D, I, Hd, L = c.head_dim, c.intermediate_size, c.hidden_size, c.num_layers
    layer = Hd * (c.num_heads + 2 * c.num_kv_heads) * D + c.num_heads * D * Hd + 3 * Hd * I
    weights = (L * layer + c.vocab_size * Hd) * dtype_bytes          # the head reads all of [V, Hd]
    kv_tok = 2 * L * c.num_kv_heads * D * dtype_bytes
    seconds = 0.0
    for t in range(1, max(out_lens) + 1):
        ctx = sum(p + t for p, o in zip(prompt_lens, out_lens) if o >= t)
        seconds += (weights + ctx * kv_tok) / bw
    return sum(out_lens) / seconds


def _bench_folder(shape: str) -> Path:
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix=f"nanovllm-{shape}-"))
    (folder / "config.json").write_text(json.dumps({**SHAPES[shape], "torch_dtype": "bfloat16", "hidden_act": "silu"}))
    return folder


def _bench_engine(folder, prompts, outs, **kw) -> float:
    """Output tokens/s of nanovllm on prompts (token lists) with per-request output lengths."""
    llm = LLM(folder, load_format="dummy", max_model_len=2048, **kw)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)        # warm-up (Triton compiles)
    sps = [SamplingParams(temperature=0.6, max_tokens=o, ignore_eos=True) for o in outs]
    secs, _ = _timed(lambda: llm.generate(prompts, sps, use_tqdm=False))
    llm.log(f"  {len(prompts)} requests: {llm.stats['steps']} steps, {llm.stats['graph_steps']} as CUDA graphs")
    llm.shutdown()
    del llm
    torch.cuda.empty_cache()
    return sum(outs) / secs


def _bench_hf(folder, prompts, new: int, batch_api: bool) -> float:
    """Output tokens/s of transformers on the same prompts: generate_batch (continuous batching, paged
    attention) or one padded generate call."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    cfg = AutoConfig.from_pretrained(folder)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16,
                                         attn_implementation="paged|sdpa" if batch_api else "sdpa").cuda().eval()
    gc = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    if batch_api:
        run = lambda: m.generate_batch(inputs=prompts, generation_config=gc)          # noqa: E731
    else:
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
        run = lambda: m.generate(ids, attention_mask=mask, generation_config=gc)      # noqa: E731
    with torch.no_grad():                 # (generate_batch writes its own buffers in place: not inference_mode)
        secs, out = _timed(run)
    if batch_api and len(out) != len(prompts):
        raise RuntimeError(f"generate_batch returned {len(out)} of {len(prompts)} requests")
    del m
    torch.cuda.empty_cache()
    return len(prompts) * new / secs


def bench(argv=None) -> list[dict]:
    """Print and return the benchmark table (see the banner): nanovllm on both shapes, batch 1, and HF's
    generate_batch / generate on 64 requests, each next to its HBM bound."""
    if not torch.cuda.is_available():
        raise ValueError("--bench needs a CUDA GPU (the CPU path is for tests; see `python nanovllm.py`)")
    LLM.verbose = False
    rng = torch.Generator().manual_seed(0)
    lens = lambda n: torch.randint(100, 1025, (n,), generator=rng).tolist()   # noqa: E731
    bw, rows = copy_bandwidth(), []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e9:,.0f} GB/s")
    for shape in ("qwen3-0.6b", "smollm2-135m"):
        folder = _bench_folder(shape)
        c = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        p_len, o_len = lens(256), lens(256)
        prompts = [torch.randint(0, 10000, (n,), generator=rng).tolist() for n in p_len]
        tps = _bench_engine(folder, prompts, o_len)
        rows.append(dict(what=f"{shape}: 256 req, in/out U[100,1024]", system="nanovllm", tok_s=tps,
                         bound=decode_bound(c, p_len, o_len, bw)))
        if shape == "qwen3-0.6b":
            tps = _bench_engine(folder, prompts[:1], [512], max_num_seqs=1)
            rows.append(dict(what=f"{shape}: batch 1, {p_len[0]} in, 512 out", system="nanovllm", tok_s=tps,
                             bound=decode_bound(c, p_len[:1], [512], bw)))
            peer = prompts[:64]
            rows.append(dict(what=f"{shape}: 64 req U[100,1024] in, 256 out", system="nanovllm",
                             tok_s=_bench_engine(folder, peer, [256] * 64), bound=decode_bound(c, p_len[:64], [256] * 64, bw)))
            for api in (True, False):
                try:
                    tps = _bench_hf(folder, peer, 256, api)
                except Exception as e:        # a peer's failure is reported, never fatal to our own numbers
                    print(f"# HF {'generate_batch' if api else 'generate'} failed: {type(e).__name__}: {e}")
                    tps = float("nan")
                rows.append(dict(what=rows[-1]["what"], system="HF " + ("generate_batch" if api else "generate"),
                                 tok_s=tps, bound=rows[-1]["bound"]))
    print(f"| workload | system | output tok/s | HBM bound tok/s | of bound |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | {r['system']} | {r['tok_s']:,.0f} | {r['bound']:,.0f} | {r['tok_s'] / r['bound']:.1%} |")
    return rows


# ---- CLI and self-test -------------------------------------------------------------------------------------
# The self-test is the executable summary of the engine's contract: however a step is cut (prefix hits,
# chunks of 6 tokens, preemptions in an 11-block cache, n = 3 forks, torch fallbacks instead of kernels.py),
# greedy decoding must give the same tokens as the plainest configuration, and that one must equal
# transformers' generate. test_all.py checks the rest (sampling oracles, log-probs, tp, RL hooks).

def selftest() -> None:
    """Seconds on CPU: a tiny random Qwen3; every engine path (prefix cache, chunked prefill, preemption, n > 1
    forks, torch fallbacks) gives the same greedy tokens, and transformers' generate agrees when installed."""
    import tempfile
    LLM.verbose = False
    cfg = dict(SHAPES["qwen3-0.6b"], vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (5, 19, 33, 12)]
    sp = SamplingParams(temperature=0, max_tokens=10)
    with tempfile.TemporaryDirectory() as d:
        try:
            from transformers import Qwen3Config, Qwen3ForCausalLM
            torch.manual_seed(0)
            hf = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in cfg.items() if k != "model_type"},
                                              initializer_range=0.2)).eval()
            hf.save_pretrained(d)
            load = "auto"
        except ImportError:
            hf, load = None, "dummy"
            (Path(d) / "config.json").write_text(json.dumps(cfg))
        runs = {}
        for name, kw in {"plain": dict(enable_prefix_caching=False), "prefix cache": {},
                         "chunked prefill": dict(max_num_batched_tokens=6),
                         "preemption": dict(num_gpu_blocks_override=11, block_size=4, max_model_len=44),
                         "torch fallbacks": dict(use_kernels=False)}.items():
            llm = LLM(d, load_format=load, device="cpu", **{"num_gpu_blocks_override": 64, "block_size": 8, **kw})
            runs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts + prompts[:2], sp, use_tqdm=False)]
            llm.bm.check([])
        forks = llm.generate(prompts[1], SamplingParams(n=3, temperature=0, max_tokens=10), use_tqdm=False)
        plain = runs.pop("plain")
        runs["n=3 forks"] = [c.token_ids for c in forks[0].outputs] * 2
        for name, toks in runs.items():
            ok = toks == (plain if name != "n=3 forks" else [plain[1]] * 6)
            print(f"{'OK' if ok else 'FAIL':8}{name}: greedy tokens equal the plain engine's")
            assert ok, name
        if hf is None:
            print("SKIPPED transformers is not installed: no comparison with HF generate")
            return
        for p, toks in zip(prompts, plain):
            ids = torch.tensor([p])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            assert toks == ref, (p, toks, ref)
        print(f"OK      the plain engine equals transformers' greedy generate on {len(prompts)} prompts")


def main(argv=None):
    """No flags: the self-test; --model: one generation (a chat turn unless --raw); --bench: the benchmark."""
    ap = argparse.ArgumentParser(prog="nanovllm.py", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (or hub id when online) to generate with")
    ap.add_argument("--prompt", default="What is 12 * 7?", help="the user message (sent through the chat template)")
    ap.add_argument("--max_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--n", type=int, default=1, help="samples of the prompt")
    ap.add_argument("--raw", action="store_true", help="send the prompt as plain text, not as a chat turn")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel workers")
    ap.add_argument("--bench", action="store_true", help="GPU benchmark: the nano-vllm workload vs HF, one table")
    ap.add_argument("--debug", action="store_true", help="full tracebacks for every error")
    args = ap.parse_args(argv)
    if args.bench:
        return bench()
    if not args.model:
        return selftest()
    llm = LLM(args.model, tensor_parallel_size=args.tp)
    sp = SamplingParams(n=args.n, temperature=args.temperature, max_tokens=args.max_tokens)
    outs = (llm.generate(args.prompt, sp) if args.raw else llm.chat([{"role": "user", "content": args.prompt}], sp))
    for c in outs[0].outputs:
        print(f"--- sample {c.index} ({len(c.token_ids)} tokens, {c.finish_reason})\n{c.text}")
    llm.shutdown()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, TimeoutError) as e:    # expected: bad flags, files, inputs -> one line
        if "--debug" in sys.argv:
            raise
        print(f"nanovllm.py: error: {e}", file=sys.stderr)
        sys.exit(2)
