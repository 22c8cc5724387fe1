"""bench_train.py: the training-throughput benchmark of nanotron (to move into nanotron.py as its `--bench`
section once that file has room): one training step of the
Qwen3-0.6B shape on one GPU, ours vs HF transformers (plain, and with Liger-Kernel's patches), in one run.

Workload (the issue's): random init, bf16 params, AdamW, 16 sequences of T=2048 tokens per optimizer step
(32768 tokens). Ours: nanotron.Transformer(use_kernels=True) on Mesh(), the 16 sequences PACKED
(cu_seqlens) into micro-batches of `mb_tokens`, fused linear cross-entropy, clip, build_optimizer(zero_stage=0)
AdamW (fp32 master weights + fp32 grads). Peers: HF Qwen3ForCausalLM from the same config, SDPA attention,
a dense [B, 2048] batch, torch.optim.AdamW(fused=True) on the bf16 params; "hf_liger" applies
apply_liger_kernel_to_qwen3 (RMSNorm, RoPE, SwiGLU, fused linear CE) before building the model.
Each system runs in its own process (a clean allocator: peak memory is its own), warms up untimed, then
times `steps` steps between two CUDA events (one synchronize at the end, none inside the loop).

MFU, PaLM convention (Chowdhery et al. 2022, app. B): FLOPs/token = 6 N + 12 L H D T, N = all parameters
(tied embedding once); Qwen3-0.6B at T=2048: 6 * 596,049,920 + 12 * 28 * 16 * 128 * 2048 = 4.985 GFLOP.
MFU = tokens/s * FLOPs/token / 989e12 (H100 SXM dense bf16). Activation-checkpoint recompute is NOT counted.

Commands:
    python bench_train.py                        # GPU: ours, hf_liger, hf in subprocesses -> one table
    python bench_train.py --systems ours,hf_liger,hf,ours,hf_liger --configs 16384:0
                                                 # two samples of ours and of the peer
    python bench_train.py --one ours --configs 16384:0,32768:1 --profile
    python bench_train.py --one hf_liger --mb 16 # one system, prints `RESULT {json}` lines
    python bench_train.py --tiny                 # CPU smoke test of every code path (tiny model)
Config string of ours: mb_tokens:checkpointing(0|1). Recommended at this size: 16384:0 (2 micro-batches of
8 packed sequences, no checkpointing: 33.5 GB; 1 x 32768 needs 55 GB, checkpointing costs ~15% speed).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time

import torch

import nanotron as nt

PEAK_TFLOPS = 989.0      # H100 SXM dense bf16 (the convention)
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
                 num_kv_heads=8, head_dim=128, rope_theta=1e6, tie_word_embeddings=True, qk_norm=True,
                 max_position_embeddings=40960, model_type="qwen3")


def palm_flops_per_token(cfg: nt.ModelConfig, n_params: int, T: int) -> float:
    """6 N + 12 L H D T (PaLM, app. B): the weight matmuls fwd+bwd, plus attention scores as if non-causal."""
    return 6 * n_params + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * T


class Timer:
    """Elapsed time of a region: two CUDA events on the GPU (no sync until read), perf_counter on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            torch.cuda.synchronize()                 # the one sync: after the whole timed region
            self.s = self.a.elapsed_time(self.b) / 1e3
        else:
            self.s = time.perf_counter() - self.t0


def _gb(x):
    return round(x / 1e9, 2)


def _peak(dev):
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0


def _reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


# ---- profile: where the GPU time of one step goes ---------------------------------------------------

_CATEGORIES = (   # first match wins; lower-case substrings of kernel names
    ("attention (flash / sdpa / cudnn)", ("_attn_", "flash", "fmha", "cudnn", "sdpa", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "wgmma", "splitk")),
    ("loss (CE row stats / dlogits)", ("_loss_", "cross_entropy", "liger_cross", "_ce_")),
    ("rmsnorm", ("rms_norm", "rmsnorm", "_rms_")),
    ("rope / qk-norm", ("rope",)),
    ("swiglu", ("swiglu",)),
    ("optimizer (adam, multi_tensor, foreach)", ("adam", "multi_tensor", "foreach")),
    ("cat / copy / fill", ("cat", "copy", "fill", "memcpy", "memset")),
    ("reductions", ("reduce",)),
    ("other elementwise", ("elementwise", "vectorized", "unrolled")),
)


def profile_step(step_fn, label: str, top: int = 25) -> dict:
    """Run step_fn once under torch.profiler; print the top kernels and a per-category sum (GPU ms)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_fn()
        torch.cuda.synchronize()
    by_name = {}
    for e in prof.profiler.function_events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t, n = by_name.get(e.name, (0.0, 0))
            by_name[e.name] = (t + e.time_range.elapsed_us() / 1e3, n + 1)
    total = sum(t for t, _ in by_name.values())
    cats = {}
    for name, (t, _) in by_name.items():
        low = name.lower()
        cat = next((c for c, keys in _CATEGORIES if any(k in low for k in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + t
    print(f"\n-- profile {label}: {total:.1f} ms of kernel time in one step --")
    for cat, t in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {t:8.1f} ms {100 * t / total:5.1f}%  {cat}")
    print(f"  top {top} kernels:")
    for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {t:8.2f} ms {100 * t / total:5.1f}% x{n:<4d} {name[:110]}")
    return {"kernel_ms": round(total, 1), "categories_ms": {c: round(t, 2) for c, t in cats.items()}}


# ---- evidence for proposed nanotron patches (delete when they land) --------------------------------


# ---- ours -------------------------------------------------------------------------------------------

def _packed_micro_batches(ids, T, mb_tokens, dev):
    """ids [S, T] -> micro-batches of mb_tokens packed tokens (mb_tokens / T whole sequences each)."""
    per = mb_tokens // T
    out = []
    for s in range(0, ids.shape[0], per):
        cu, pos = nt.cu_seqlens_from_lengths([T] * per, device=dev)
        flat = ids[s:s + per].reshape(-1)                                 # [per * T]
        out.append(dict(input_ids=flat, positions=pos, cu_seqlens=cu, max_seqlen=T,
                        labels=nt.next_token_labels(flat, cu)))
    return out


def run_ours(args, dev) -> list[dict]:
    cfg = nt.tiny_config(tie_word_embeddings=True) if args.tiny else nt.ModelConfig(**QWEN3_06B)
    S, T = args.seqs, args.seq_len
    t0 = time.time()
    model = nt.Transformer(cfg, nt.Mesh(device=dev), use_kernels=True, dtype=torch.bfloat16,
                           device=dev).init_random(seed=0)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = nt.build_optimizer(model, zero_stage=0, lr=3e-4, weight_decay=0.1)
    print(f"ours: built {n_params:,} params + optimizer in {time.time() - t0:.1f}s, kernels={model.use_kernels}, "
          f"state {json.dumps({k: _gb(v) for k, v in opt.state_bytes().items()})} GB")
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (S, T), device=dev, generator=g)
    n_labels = S * (T - 1)                       # the last token of each sequence has no label
    flops = palm_flops_per_token(cfg, n_params, T)
    results = []
    for spec in args.configs.split(","):
        mb_tokens, ckpt = spec.split(":")[:2]
        mb_tokens, ckpt = int(mb_tokens), bool(int(ckpt))
        if mb_tokens % T or (S * T) % mb_tokens:
            raise ValueError(f"--configs {spec}: mb_tokens must be a multiple of T={T} dividing S*T={S * T}")
        mbs = _packed_micro_batches(ids, T, mb_tokens, dev)
        model.activation_checkpointing = ckpt

        def step(i, mbs=mbs):
            opt.zero_grad()
            for k, mb in enumerate(mbs):
                with opt.no_sync() if k < len(mbs) - 1 else contextlib.nullcontext():
                    total, _ = model.loss(model(mb["input_ids"], mb["positions"], mb["cu_seqlens"],
                                                mb["max_seqlen"]), mb["labels"])
                    (total * (1.0 / n_labels)).backward()  # the step's mean: micro-batches sum to it
            lr = nt.lr_at(i, 100, 1000, 3e-4)
            opt.clip_grad_norm_(1.0)
            opt.step(lr=lr)
            return total.detach() * (len(mbs) / n_labels)     # last micro-batch's loss per token

        row = dict(system="ours", config=f"packed {len(mbs)}x{mb_tokens} tok, ckpt={'on' if ckpt else 'off'}, "
                                         "", tokens_per_step=S * T)
        _reset_peak(dev)
        try:
            results.append(_time_steps(step, row, args, dev, flops))
        except torch.OutOfMemoryError as e:
            row.update(error=f"OOM: {str(e).splitlines()[0][:120]}")
        if "error" in row:      # cleaned up OUTSIDE the except: its traceback pins the activations
            print("RESULT " + json.dumps(row), flush=True)
            results.append(row)
        if args.profile and spec == args.configs.split(",")[0] and dev.type == "cuda" and "error" not in row:
            row["profile"] = profile_step(lambda: step(0), f"ours {row['config']}")
        del mbs
        opt.zero_grad()
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _time_steps(step, row, args, dev, flops):
    for i in range(args.warmup):                                         # autotune, compile, allocator
        step(i)
    with Timer(dev.type == "cuda") as tm:
        for i in range(args.steps):
            loss = step(args.warmup + i)
    tok_s = args.steps * row["tokens_per_step"] / tm.s
    row.update(tokens_per_s=round(tok_s), step_ms=round(1e3 * tm.s / args.steps, 1),
               mfu=round(tok_s * flops / (PEAK_TFLOPS * 1e12), 4), peak_gb=_gb(_peak(dev)),
               last_loss=round(float(loss), 4))
    print("RESULT " + json.dumps(row), flush=True)
    return row


# ---- HF peers ---------------------------------------------------------------------------------------

def run_hf(args, dev, liger: bool) -> list[dict]:
    from transformers import Qwen3Config
    if liger:   # patch the module classes BEFORE the model is built (RMSNorm, RoPE, SwiGLU, fused LCE)
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3
        apply_liger_kernel_to_qwen3()
    from transformers.models.qwen3 import modeling_qwen3
    c = nt.tiny_config(tie_word_embeddings=True) if args.tiny else nt.ModelConfig(**QWEN3_06B)
    hcfg = Qwen3Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                       num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                       max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, use_cache=False)
    hcfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = modeling_qwen3.Qwen3ForCausalLM(hcfg).to(torch.bfloat16)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev.type == "cuda")
    S, T = args.seqs, args.seq_len
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, c.vocab_size, (S, T), device=dev, generator=g)
    flops = palm_flops_per_token(c, n_params, T)
    name = "hf_liger" if liger else "hf"
    print(f"{name}: {n_params:,} params, attn={model.config._attn_implementation}", flush=True)
    mb = args.mb
    while True:
        def step(i, mb=mb):
            for s in range(0, S, mb):
                x = ids[s:s + mb]                                        # [mb, T] dense, no padding
                loss = model(input_ids=x, labels=x).loss                 # HF shifts labels inside
                (loss * (mb / S)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for grp in opt.param_groups:
                grp["lr"] = nt.lr_at(i, 100, 1000, 3e-4)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        row = dict(system=name, config=f"dense {S // mb}x[{mb}, {T}], sdpa, AdamW fused", tokens_per_step=S * T)
        _reset_peak(dev)
        oom = False
        try:
            row = _time_steps(step, row, args, dev, flops)
            break
        except torch.OutOfMemoryError:
            oom = True
        if oom:                 # cleaned up OUTSIDE the except: its traceback pins the activations
            opt.zero_grad(set_to_none=True)
            del step
            gc.collect()
            torch.cuda.empty_cache()
            print(f"{name}: B={mb} x T={T} ran out of memory; retrying with B={mb // 2} and "
                  f"{2 * S // mb} accumulation micro-batches (same tokens per step)", flush=True)
            if mb == 1:
                raise
            mb //= 2
    if args.profile and dev.type == "cuda":
        row["profile"] = profile_step(lambda: step(0), f"{name} {row['config']}")
    return [row]


# ---- driver -----------------------------------------------------------------------------------------

def _table(rows):
    peers = [r for r in rows if r["system"].startswith("hf") and "tokens_per_s" in r]
    best = max(peers, key=lambda r: r["tokens_per_s"]) if peers else None
    print(f"\nQwen3-0.6B shape, {rows[0]['tokens_per_step']} tokens/step; MFU: PaLM 6N + 12LHDT at T=2048 "
          f"over {PEAK_TFLOPS:.0f} TFLOP/s; peak = torch.cuda.max_memory_allocated (GB = 1e9 B); "
          f"ratios vs the best peer ({best['system'] if best else '-'})")
    print(f"| {'system':10s} | {'config':52s} | {'tokens/s':>9s} | {'step ms':>7s} | {'MFU':>6s} | "
          f"{'peak GB':>7s} | {'speed x':>7s} | {'mem x':>6s} |")
    print("|" + "|".join("-" * w for w in (12, 54, 11, 9, 8, 9, 9, 8)) + "|")
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"| {r['system']:10s} | {r.get('config', ''):52s} | {r.get('error', 'failed')[:60]}")
            continue
        sp = f"{r['tokens_per_s'] / best['tokens_per_s']:.3f}" if best else "-"
        mem = f"{best['peak_gb'] / r['peak_gb']:.2f}" if best and r["peak_gb"] else "-"
        print(f"| {r['system']:10s} | {r['config']:52s} | {r['tokens_per_s']:9,d} | {r['step_ms']:7.1f} | "
              f"{100 * r['mfu']:5.1f}% | {r['peak_gb']:7.2f} | {sp:>7s} | {mem:>6s} |")


def drive(args):
    rows, seen = [], {}
    # plain HF at B=16 needs the eager [16*2048, V] fp32 logits and more (68 GB already at B=8): 8 x 2
    extra_of = {"ours": ["--configs", args.configs],
                "hf_liger": ["--mb", str(args.mb)], "hf": ["--mb", str(args.hf_mb)]}
    for system in args.systems.split(","):
        extra = extra_of[system]
        seen[system] = seen.get(system, 0) + 1                           # a repeated system: a second sample
        tag = system if seen[system] == 1 else f"{system}#{seen[system]}"
        cmd = [sys.executable, os.path.abspath(__file__), "--one", system, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--seqs", str(args.seqs), "--seq-len", str(args.seq_len)] + extra
        cmd += ["--profile"] if args.profile else []
        cmd += ["--tiny"] if args.tiny else []
        print("$ " + " ".join(cmd[1:]), flush=True)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
            for line in p.stdout:                                        # streamed: a killed run keeps its log
                line = line.rstrip("\n")
                print("  " + line, flush=True)
                if line.startswith("RESULT "):
                    r = json.loads(line[7:])
                    if r["system"] != "opt_evidence":
                        rows.append(dict(r, system=tag))
        if p.returncode:
            rows.append(dict(system=tag, config="", error=f"exit code {p.returncode}", tokens_per_step=0))
        if args.out:
            with open(os.path.join(args.out, "bench.json"), "w") as f:
                json.dump(rows, f, indent=1)
    _table(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", choices=["ours", "hf", "hf_liger"], help="run one system (a driver's subprocess)")
    ap.add_argument("--configs", default="16384:0,8192:0,32768:1,32768:0",
                    help="ours: comma list of mb_tokens:ckpt(0|1)")
    ap.add_argument("--systems", default="ours,hf_liger,hf",
                    help="driver: systems to run, in order (one repeated = another sample of it)")
    ap.add_argument("--mb", type=int, default=16, help="HF: sequences per micro-batch (halved on OOM)")
    ap.add_argument("--hf-mb", type=int, default=8, help="driver: --mb of plain hf")
    ap.add_argument("--seqs", type=int, default=16, help="sequences per optimizer step")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="profile one step (ours: its first config)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 4 x 64 tokens")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench.json")
    args = ap.parse_args()
    if args.tiny:
        args.seqs, args.seq_len, args.steps, args.warmup, args.mb = 4, 64, 2, 1, 4
        if args.configs == ap.get_default("configs"):
            args.configs = "128:0,64:1"
    if args.one is None:
        return drive(args)
    dev = torch.device("cuda", 0) if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        print(f"{args.one}: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}", flush=True)
    if args.one == "ours":
        run_ours(args, dev)
    else:
        run_hf(args, dev, liger=args.one == "hf_liger")


if __name__ == "__main__":
    main()
