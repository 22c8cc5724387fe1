"""
eval.py -- accuracy of a model on math problems: generate with nanovllm, grade with math-verify.

Stands in for lm-eval / lighteval's math tasks (MATH-500, GSM8K). Keeps what makes a math score
trustworthy: the exact prompt the model was trained with (prepare_data.py's eval recipe: chat template +
the shared instruction), a grader that compares answers as mathematics (1/2 = 0.5 = \\frac{1}{2}) and
never hangs, and a report that counts what went wrong (no answer, truncated, unparsable, timed out)
instead of hiding it. Drops: few-shot prompts, the task zoo, log-likelihood (multiple-choice) tasks.

How it works:
  1. DATA: problems from prepare_data's adapters (GSM8K, MATH-500, any jsonl with --question_field /
     --answer_field) or its synthetic task's test split, as {problem, answer, level, subject} rows.
  2. PROMPTS: prepare_data.encode_chunk with recipe "eval": the same token ids SFT and RL train on.
  3. GENERATE: nanovllm's LLM.generate on those ids (greedy by default; --n samples at --temperature),
     or transformers' generate on the same ids (--engine hf), so the two engines can be compared.
  4. GRADE: Grader, a pool of worker processes running math-verify on (last \\boxed{} of the response,
     gold); an answer that takes longer than --timeout_s is killed with its worker and counted.
  5. REPORT: accuracy (overall, per level, per subject, +- standard error), pass@k, maj@k, format and
     truncation rates, response length; samples.jsonl, summary.json, accuracy.png, a results.jsonl line.
  --report: the pipeline's report card (run.sh's last step): the evals of the base, SFT and RL models read back
     from results.jsonl into one table + PNG, beside the wall time of every stage (and, with --ood, the same
     models on a second, out-of-distribution set: run.sh's GPU recipe adds GSM8K's test split when it has it).

Commands:
  python eval.py                    # CPU demo: SmolLM2-135M-Instruct, 16 synthetic test problems (~1 min)
  python eval.py --model ckpt/sft/step_120/hf --data ../shared/data/math500/test.jsonl
  python eval.py --model M --data gsm8k --n 8 --temperature 0.6      # pass@1..8 and maj@1..8
  python eval.py --model M --data my.jsonl --question_field q --answer_field a
  python eval.py --model M --data ../shared/data/gsm8k/test.jsonl --engine hf   # transformers' generate
  python eval.py --report runs/report --evals base=runs/eval/base sft=runs/eval/sft --times sft=130 \
                 --ood base=runs/eval/base_gsm8k sft=runs/eval/sft_gsm8k
  From Python (ppo.py's rewards): `with Grader(workers=4) as g: grades = g.grade([(response, gold)])`.

First read: Grader (the pool and why it exists) -> metrics (pass@k, maj@k) -> evaluate (the driver).
Contents: config | grading | metrics | data | generation | report | report card | driver | CLI
"""

import dataclasses
import importlib.util
import json
import math
import multiprocessing as mp
import os
import re
import signal
import time
from collections import Counter, deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

import prepare_data as pd

# ---------------------------------------------------------------- config ----


@dataclass
class Config:
    model: str = ""  # an HF folder (merge.py's output or any HF model) or hub id; "" or smollm2 = SmolLM2-135M-Instruct
    data: str = "synthetic"  # synthetic | gsm8k | math500 (from the Hub) | a .jsonl/.json/.parquet file
    synthetic_test: int = pd.Config.synthetic_test  # --data synthetic: the held-out split's size (= prepare_data's)
    source: str = "auto"  # adapter of a data file: auto (from its columns) | gsm8k | math500 | math | numina | deepmath
    question_field: str = ""  # any file: the column with the problem (with --answer_field; replaces --source)
    answer_field: str = ""  # any file: the column with the final answer
    level_field: str = "level"  # with --question_field: optional column for the per-level table
    subject_field: str = "subject"  # with --question_field: optional column for the per-subject table
    limit: int = -1  # the first N problems; -1 = all on a GPU, 16 on CPU (a demo); 0 = all
    tokenizer: str = ""  # "" = the model folder's own (its chat template makes the prompt)
    template_kwargs: str = ""  # JSON for apply_chat_template, e.g. '{"enable_thinking": false}' for Qwen3
    engine: str = "nanovllm"  # nanovllm | hf (transformers' generate on the same prompt ids)
    n: int = 1  # samples per problem; pass@k and maj@k need n > 1 with --temperature > 0
    temperature: float = 0.0  # 0 = greedy, the standard for a reported accuracy
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    max_tokens: int = -1  # new tokens per answer; -1 = 2048 on a GPU, 256 on CPU (truncation is reported)
    seed: int = 0  # seeds sampling (nanovllm derives one stream per request from it)
    dtype: str = "auto"  # auto (bf16 on a GPU, fp32 on CPU) | bfloat16 | float16 | float32
    tp: int = 1  # nanovllm tensor_parallel_size (GPUs per engine)
    gpu_memory_utilization: float = 0.9  # nanovllm: share of GPU memory for weights + KV cache
    enforce_eager: bool = False  # nanovllm: no CUDA graphs (slower decode; for debugging)
    hf_batch_size: int = 64  # --engine hf: prompts per generate() call (sorted by length: less padding)
    grade_mode: str = "boxed"  # boxed: the last \boxed{} is the answer (as the RL reward) | any: anywhere in the text
    workers: int = -1  # grading processes; -1 = min(8, CPU cores)
    timeout_s: float = 5.0  # wall clock per graded answer; slower ones are killed and counted as timeouts
    out: str = ""  # folder for samples.jsonl, summary.json, accuracy.png; "" = runs/eval/<model>_<data>
    results: str = "results.jsonl"  # the artifact root's log: one JSON line per pipeline stage
    report: str = ""  # a folder: instead of evaluating, write the pipeline's report card there (report.md, .png)
    evals: list = dataclasses.field(default_factory=list)  # --report: NAME=FOLDER per model, FOLDER = its eval's --out
    times: list = dataclasses.field(default_factory=list)  # --report: NAME=SECONDS, each pipeline stage's wall time
    # --report: NAME=FOLDER, the same models on a second, out-of-distribution set (SFT on one task can narrow a model)
    ood: list = dataclasses.field(default_factory=list)


CPU_LIMIT, CPU_MAX_TOKENS, GPU_MAX_TOKENS = 16, 256, 2048

# --------------------------------------------------------------- grading ----
# Why a process pool: math-verify turns answers into sympy expressions and compares them, and sympy can
# take forever (compare 9^{9^{9}} with 2 and it tries to evaluate a 370-million-digit number).
# math-verify's own timeout is signal.alarm, which works only in a main thread and cannot interrupt
# C code, so inside a trainer's thread or a Ray-like worker it is off or useless. A separate process can
# always be killed: each worker grades one answer at a time, the parent watches the wall clock, and a
# worker past its deadline is killed and replaced while the others go on. Nothing is dropped: every
# answer comes back as a Grade whose status says what happened.


@dataclass(frozen=True)  # frozen: grade() hands the same Grade to every copy of an answer
class Grade:
    correct: bool  # the answer equals the gold answer; always False unless status is "ok"
    status: str  # ok | no_answer (no final \boxed{}) | parse_error (answer or gold unparsable) | timeout | error
    pred: str | None = None  # the extracted answer text (the last \boxed{} content in boxed mode)
    key: str | None = None  # the parsed answer in canonical form (sympy's str): the vote in maj@k
    detail: str = ""  # why, for the statuses other than ok


def _verify(mode: str, answer: str, gold: str) -> tuple:
    """(status, correct, key, pred, detail) for one answer; runs inside a worker. The gold answer is parsed exactly
    like the model's (wrapped in \\boxed{}), so a gold "\\frac{1}{2}" and an answer "0.5" both become 1/2."""
    from math_verify import parse, verify
    # Timeouts off (None): the parent's wall clock is the one timeout; math-verify's alarms would race it.
    gold, answer = _digit_groups(gold), _digit_groups(answer)
    g = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    p = parse(f"\\boxed{{{answer}}}" if mode == "boxed" else answer, parsing_timeout=None)
    # what the model answered: the box content as written, or the text math-verify picked ([expr, text])
    pred = answer if mode == "boxed" or not p or not isinstance(p[-1], str) else p[-1]
    # A list of only strings means math-verify found text it could not turn into mathematics.
    if all(isinstance(x, str) for x in g):
        return "parse_error", False, None, pred, f"gold {gold[:80]!r} did not parse"
    if all(isinstance(x, str) for x in p):
        return "parse_error", False, None, pred, f"answer {answer[:80]!r} did not parse"
    return "ok", bool(verify(g, p, timeout_seconds=None)), _vote_key(p[0]), pred, ""


# "10\,080", "10,\!080", "10~080", "10 080": a digit group separator (LaTeX thin spaces etc.) before exactly three
# digits. math-verify reads "10\,080" as 10 * 080 (= 90). Commas are left alone: "(1, 234)" is a pair.
_DIGIT_SEP = re.compile(r"(?<=\d)(?:,?\\[,;:! ]|~|\s)(?=\d{3}(?!\d))")


def _digit_groups(s: str) -> str:
    return _DIGIT_SEP.sub("", s)


def _vote_key(x) -> str:
    """The maj@k vote of a parsed answer: numbers in one exact form (2.5, \\frac{5}{2} and 250\\% all 5/2), else
    sympy's text. Without it equal wrong answers written differently split their votes, while every correct one
    votes together: maj@k leaned towards 'correct'. (Inside the worker: the parent's timeout covers it.)"""
    import sympy
    try:
        if isinstance(x, sympy.Expr) and x.is_number:
            return str(sympy.nsimplify(sympy.simplify(x), rational=True))
    except Exception:               # noqa: BLE001 (sympy raises many kinds; the text is the fallback vote)
        pass
    return str(x)


def _grade_worker(conn, mode: str):
    """A worker process: import math-verify once, then answer (i, answer, gold) jobs until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent, which kills us
    import logging
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning: ours is the kill
    import math_verify  # noqa: F401  (sympy and antlr load here, once per worker: ~1 s; a failure is EOF)
    conn.send(("ready",))
    while True:
        try:
            i, answer, gold = conn.recv()
        except EOFError:  # the parent closed our pipe: we are done
            return
        try:
            conn.send((i, *_verify(mode, answer, gold)))
        except Exception as e:  # a bug deep in sympy: count it and keep serving (str(e) itself can hang)
            conn.send((i, "error", False, None, answer, f"math-verify raised {type(e).__name__}"))


class _Worker:
    def __init__(self, ctx, mode: str, start_timeout_s: float):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_grade_worker, args=(child, mode), daemon=True, name="eval-grader")
        self.proc.start()
        child.close()  # the parent keeps only its end, so a dead worker shows up as EOF
        self.ready, self.job = False, None  # job = (index, answer, gold) while grading
        self.deadline = time.monotonic() + start_timeout_s

    def kill(self):
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class Grader:
    """Grade (response, gold) pairs with math-verify in `workers` processes, at most `timeout_s` seconds of
    wall clock per answer. `mode="boxed"`: the answer is the response's last \\boxed{} (the RL format reward is
    status != "no_answer"); "any": math-verify looks for the answer anywhere in the text.
    Workers start on the first grade() (spawned, so safe under threads and CUDA) and live until close()."""

    def __init__(self, workers: int = 4, timeout_s: float = 5.0, mode: str = "boxed", start_timeout_s: float = 120):
        if mode not in ("boxed", "any"):
            raise ValueError(f"eval.py: --grade_mode {mode!r}: expected boxed or any")
        if workers < 1 or timeout_s <= 0:
            raise ValueError(f"eval.py: --workers {workers} must be >= 1 and --timeout_s {timeout_s} > 0")
        if importlib.util.find_spec("math_verify") is None:  # fail here, not after an hour of generation
            raise FileNotFoundError("eval.py: grading needs math-verify: pip install 'math-verify[antlr4_13_2]'")
        self.n_workers, self.timeout_s, self.mode, self.start_timeout_s = workers, timeout_s, mode, start_timeout_s
        self.ctx, self.pool = mp.get_context("spawn"), []
        self.sent = 0  # answers the last grade() sent to the workers (distinct (answer, gold) pairs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for w in self.pool:  # closing the pipe ends a worker's loop; kill() makes sure
            w.kill()
        self.pool = []

    def start(self):
        """Spawn the workers now: they import math-verify (~1 s) in the background while the caller works."""
        while len(self.pool) < self.n_workers:
            self.pool.append(_Worker(self.ctx, self.mode, self.start_timeout_s))

    def _replace(self, w: _Worker):
        w.kill()
        self.pool[self.pool.index(w)] = _Worker(self.ctx, self.mode, self.start_timeout_s)

    def grade(self, pairs) -> list[Grade]:
        """pairs: iterable of (response text, gold answer) -> one Grade per pair, in order."""
        pairs = list(pairs)
        grades, todo = [None] * len(pairs), deque()
        # Each distinct (answer, gold) pair is graded once: RL samples n responses per prompt, and a confident
        # model boxes the same answer in most of them (GRPO on the SFT model: ~1024 answers, a few hundred
        # distinct). first[(answer, gold)] = the index that is sent; same[i] = the earlier index i copies.
        first, same = {}, {}
        for i, (response, gold) in enumerate(pairs):
            answer = pd.last_boxed(response) if self.mode == "boxed" else response
            if answer is None or not answer.strip():  # no box, an empty one, or unbalanced braces
                grades[i] = Grade(False, "no_answer", detail="no final \\boxed{} answer" if self.mode == "boxed"
                                  else "empty response")
            elif (answer, str(gold)) in first:
                same[i] = first[answer, str(gold)]
            else:
                first[answer, str(gold)] = i
                todo.append((i, answer, str(gold)))
        self.sent = len(todo)   # answers sent to the workers in this call (the rest copied a grade)
        if todo:
            self.start()
        self._retried = set()   # answers whose worker died under them: graded once more, on a fresh worker
        try:
            while todo or any(w.job for w in self.pool):
                self._step(todo, grades)
        except BaseException:  # a failed start or Ctrl-C: no worker may carry a job of this call into the next
            self.close()
            raise
        for i, j in same.items():  # a timeout or error is copied too: the same text would fail the same way
            grades[i] = grades[j]
        return grades

    def _step(self, todo: deque, grades: list):
        """One round of the pool: give idle workers a job, wait for a message or the nearest deadline, then
        kill whatever is past its deadline."""
        for w in self.pool:
            if w.ready and w.job is None and todo:
                w.job, w.deadline = todo.popleft(), time.monotonic() + self.timeout_s
                try:
                    w.conn.send(w.job)  # (index, answer, gold)
                except OSError:  # it just died: the EOF below counts the answer and replaces it
                    pass
        waiting = {w.conn: w for w in self.pool if w.job or not w.ready}
        nearest = min(w.deadline for w in waiting.values())
        for conn in wait(list(waiting), timeout=max(0.0, nearest - time.monotonic())):  # sleeps, no polling
            w = waiting[conn]
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the worker died: out of memory, a crash in C code
                if not w.ready:  # e.g. math-verify fails to import: its traceback is above
                    raise ChildProcessError("eval.py: a grading worker died while starting") from None
                if w.job[0] in self._retried:   # twice: the answer itself kills workers (a crash in C code)
                    grades[w.job[0]] = Grade(False, "error", w.job[1], detail="the grading worker died (twice)")
                else:                           # once: an OOM kill, a kill -9 -- grade it again
                    self._retried.add(w.job[0])
                    todo.appendleft(w.job)
                self._replace(w)
                continue
            if msg[0] == "ready":
                w.ready = True
            else:
                i, status, correct, key, pred, detail = msg
                grades[i], w.job = Grade(correct, status, pred, key, detail), None
        now = time.monotonic()
        for w in list(self.pool):  # past its deadline: kill it, count the answer, start a fresh worker
            if (w.job or not w.ready) and now >= w.deadline:
                if not w.ready:
                    raise TimeoutError(f"eval.py: a grading worker did not start in {self.start_timeout_s:.0f} s")
                grades[w.job[0]] = Grade(False, "timeout", w.job[1], detail=f"killed after {self.timeout_s:g} s")
                self._replace(w)


# --------------------------------------------------------------- metrics ----


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples is correct, from n samples of which c are correct: the unbiased
    estimator of Chen et al. 2021 (eq. 1), 1 - C(n-c, k) / C(n, k). Drawing k without replacement, all k
    are wrong with probability C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): the product form never
    forms the huge binomials."""
    if n - c < k:
        return 1.0  # fewer than k wrong samples: every draw of k contains a correct one
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def maj_at_k(grades: list, k: int) -> bool:
    """Majority vote over the first k samples: is the most frequent answer correct? Every correct answer
    equals the gold, so correct answers form one class however they are written (0.5 and \\frac{1}{2});
    wrong answers vote by their parsed form. Samples without a parsed answer do not vote; a tie goes to
    the answer seen first."""
    votes, first = Counter(), {}
    for j, g in enumerate(grades[:k]):
        if g.status == "ok":
            key = "<correct>" if g.correct else g.key
            votes[key] += 1
            first.setdefault(key, j)
    return bool(votes) and max(votes, key=lambda v: (votes[v], -first[v])) == "<correct>"


def _acc(means: list) -> dict:
    """Mean of per-problem accuracies and its standard error. Samples of one problem are not independent,
    so the error comes from the spread between problems: sqrt(var / P)."""
    P, mean = len(means), sum(means) / len(means)
    var = sum((m - mean) ** 2 for m in means) / (P - 1) if P > 1 else 0.0
    return {"n": P, "accuracy": mean, "stderr": math.sqrt(var / P)}


def summarize(problems: list, samples: list) -> dict:
    """problems: [{level, subject}]; samples[p]: the list of per-sample records of problem p (dicts with
    grade, finish_reason, num_tokens). Every rate is over all samples."""
    flat = [s for ss in samples for s in ss]
    n = len(samples[0])
    correct = [sum(s["grade"].correct for s in ss) for ss in samples]  # c of the n samples, per problem
    per_problem = [c / n for c in correct]
    out = {"problems": len(problems), "samples_per_problem": n, **_acc(per_problem)}
    for field in ("level", "subject"):
        groups = {}
        for p, m in zip(problems, per_problem):
            if p.get(field) is not None:
                groups.setdefault(str(p[field]), []).append(m)
        # natural order: "Level 10" after "Level 9", not between 1 and 2
        order = sorted(groups, key=lambda g: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", g)])
        out[f"by_{field}"] = {g: _acc(groups[g]) for g in order}
    for k in sorted({2 ** i for i in range(n.bit_length())} | {n}):  # k = 1, 2, 4, .. <= n, and n itself
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(samples)
        out[f"maj@{k}"] = sum(maj_at_k([s["grade"] for s in ss], k) for ss in samples) / len(samples)
    counts = Counter(s["grade"].status for s in flat)
    out.update({
        "format_rate": sum(s["boxed"] for s in flat) / len(flat),  # a final \boxed{} answer is present
        "truncation_rate": sum(s["finish_reason"] == "length" for s in flat) / len(flat),
        "mean_response_tokens": sum(s["num_tokens"] for s in flat) / len(flat),
        "counts": {k: counts.get(k, 0) for k in ("ok", "no_answer", "parse_error", "timeout", "error")},
        "gold_parse_errors": sum(s["grade"].detail.startswith("gold ") for s in flat)})
    return out


# ----------------------------------------------------------------- data ----


def _adapt(rows, where: str, adapter: str, cfg: Config) -> list:
    """Raw rows -> common rows {problem, answer, level, subject, unique_id} through one of prepare_data's
    adapters, or straight from the named columns (--question_field / --answer_field)."""
    out, fields = [], (cfg.question_field, cfg.answer_field)
    for i in range(len(rows)):
        row = rows[i]
        if cfg.question_field:
            bad = [f"--{flag} {f!r}" for flag, f in zip(("question_field", "answer_field"), fields)
                   if row.get(f) is None or not str(row[f]).strip()]
            if bad:
                raise ValueError(f"eval.py: {where}: row {i + 1}: {' and '.join(bad)} missing or empty; the row "
                                 f"has values in {sorted(k for k, v in row.items() if v is not None)}")
            x = {"problem": str(row[fields[0]]), "answer": str(row[fields[1]]), "level": row.get(cfg.level_field),
                 "subject": row.get(cfg.subject_field), "unique_id": None}
        else:
            try:
                x = pd.ADAPTERS[adapter](row)
            except pd.BadRow as e:
                raise ValueError(f"eval.py: {where}: row {i + 1} ({adapter} adapter): {e}; name the columns "
                                 "with --question_field and --answer_field") from None
            if x is None:  # dropped on purpose (DeepMath's yes/no answers)
                continue
            if not x.get("answer"):
                raise ValueError(f"eval.py: {where}: row {i + 1} ({adapter} adapter): no gold answer found")
        out.append({k: (None if x.get(k) is None else str(x[k])) for k in ("level", "subject")} |
                   {"problem": x["problem"], "answer": str(x["answer"]),
                    "unique_id": x.get("unique_id") or f"{Path(where).stem}/{i}"})
    return out


def load_problems(cfg: Config) -> tuple[list, str]:
    """The problems of --data as common rows, and a short name for the data (for file names and tables)."""
    if cfg.data == "synthetic":  # the held-out split SFT never saw: same generator, seed and size as prepare_data
        # (its test split does not depend on the train size; a bigger one starts with the same problems)
        return pd.synthetic_math(0, cfg.synthetic_test, pd.Config.seed)["test"], "synthetic"
    if cfg.data in ("gsm8k", "math500"):  # the test split of the seed's Hub repo (prepare_data.DEFAULT_HUB)
        repo = pd.DEFAULT_HUB[cfg.data]
        try:
            files = pd.hub_files(*repo)["test"]
        except RuntimeError as e:
            raise ConnectionError(f"eval.py: --data {cfg.data}: cannot get the Hub dataset {repo[0]!r} (offline and "
                                  f"not in the HF cache? {type(e.__cause__).__name__}); pass its test file instead: "
                                  f"--data PATH/{cfg.data}/test.jsonl") from None
        return [r for f in files for r in _adapt(pd.read_rows(f), f, cfg.data, cfg)], cfg.data
    path = Path(cfg.data)
    if not path.is_file():
        raise FileNotFoundError(f"eval.py: --data {cfg.data!r}: no such file; expected synthetic, gsm8k, math500 "
                                "or a .jsonl/.json/.parquet file")
    rows = pd.read_rows(str(path))
    if len(rows) == 0:
        raise ValueError(f"eval.py: --data {cfg.data}: the file has no rows")
    adapter = cfg.source if cfg.source != "auto" else "" if cfg.question_field else pd.detect_adapter(rows[0])
    return _adapt(rows, str(path), adapter, cfg), f"{path.parent.name}-{path.stem}"


# ----------------------------------------------------------- generation ----
# Both engines return, per problem, n samples {text, token_ids, finish_reason}: token_ids are the new
# tokens (a final EOS included), finish_reason "stop" (EOS) or "length" (max_tokens reached).


def generate_nanovllm(folder, prompt_ids: list, cfg: Config, max_model_len: int) -> list:
    from nanovllm import LLM, SamplingParams
    llm = LLM(str(folder), tokenizer=cfg.tokenizer or None, seed=cfg.seed, dtype=cfg.dtype,
              tensor_parallel_size=cfg.tp, max_model_len=max_model_len, enforce_eager=cfg.enforce_eager,
              gpu_memory_utilization=cfg.gpu_memory_utilization,
              max_num_seqs=min(256, len(prompt_ids) * cfg.n))  # on CPU this sizes the KV cache: no waste
    try:
        # no per-request seed: the engine derives one per request from LLM(seed), so problems get
        # independent streams and the run is still reproducible
        sp = SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sp, use_tqdm=True)
    finally:
        llm.shutdown()
    return [[{"text": o.text, "token_ids": list(o.token_ids), "finish_reason": o.finish_reason}
             for o in r.outputs] for r in outs]


def generate_hf(folder, tok, prompt_ids: list, cfg: Config) -> list:
    """transformers' generate on the same ids: batches of prompts of similar length, left-padded (a causal
    model continues from the last column, so the padding must go in front, hidden by the attention mask)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.bfloat16 if dev == "cuda" else torch.float32}.get(cfg.dtype) or getattr(torch, cfg.dtype)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(dev).eval()
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos or []) | {tok.eos_token_id} - {None}
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    sample = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0) if cfg.temperature > 0 \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)  # None: ignore the model's defaults
    torch.manual_seed(cfg.seed)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out = [None] * len(prompt_ids)
    for b in tqdm(range(0, len(order), cfg.hf_batch_size), desc="hf generate", unit="batch"):
        batch = order[b:b + cfg.hf_batch_size]
        T = max(len(prompt_ids[i]) for i in batch)
        ids = torch.tensor([[pad] * (T - len(prompt_ids[i])) + prompt_ids[i] for i in batch], device=dev)  # [B, T]
        mask = torch.tensor([[0] * (T - len(prompt_ids[i])) + [1] * len(prompt_ids[i]) for i in batch], device=dev)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_tokens, **sample,
                                 num_return_sequences=cfg.n, eos_token_id=sorted(eos), pad_token_id=pad)
        new = gen[:, T:].tolist()  # [B * n, new tokens]: the n samples of a prompt are adjacent rows
        for j, i in enumerate(batch):
            out[i] = []
            for row in new[j * cfg.n:(j + 1) * cfg.n]:
                stop = next((k for k, t in enumerate(row) if t in eos), None)  # after it: padding
                row = row if stop is None else row[:stop + 1]
                out[i].append({"text": tok.decode(row, skip_special_tokens=True), "token_ids": row,
                               "finish_reason": "length" if stop is None else "stop"})
    return out


# --------------------------------------------------------------- report ----


def format_table(s: dict) -> str:
    """The summary as a compact text table (what a person reads first)."""
    pct, c = (lambda x: f"{100 * x:.1f}%"), s["counts"]
    how = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']:g}"
    row = lambda name, a: f"  {name[:27]:<28}{a['n']:>6}{pct(a['accuracy']):>10}{pct(a['stderr']):>8}"
    return "\n".join([
        f"eval.py: {s['model_name']} on {s['data_name']} ({s['problems']} of {s['problems_in_data']} problems, n="
        f"{s['samples_per_problem']}), {s['engine']}, {how}, max_tokens {s['max_tokens']}",
        f"  {'group':<28}{'n':>6}{'accuracy':>10}{'+-se':>8}", row("all", s),
        *[row(f"{f} {g}", a) for f in ("level", "subject") for g, a in s[f"by_{f}"].items()],
        "  " + "  ".join(f"{k} {pct(v)}" for k, v in s.items() if k.startswith(("pass@", "maj@"))),
        f"  format (final \\boxed{{}}) {pct(s['format_rate'])}  truncated {pct(s['truncation_rate'])}  mean "
        f"response {s['mean_response_tokens']:.0f} tokens",
        f"  grades: ok {c['ok']}, no answer {c['no_answer']}, parse error {c['parse_error']} (gold "
        f"{s['gold_parse_errors']}), timeout {c['timeout']}, error {c['error']}",
        f"  load + generate {s['generate_s']:.1f} s ({s['output_tokens_per_s']:.0f} new tokens/s), grade "
        f"{s['grade_s']:.1f} s, total {s['total_s']:.1f} s"])


def plot_accuracy(s: dict, path: Path) -> bool:
    """Accuracy per level (or per subject when there are no levels) as bars with standard-error whiskers."""
    plt = _pyplot(path.name, "summary.json")
    if plt is None:
        return False
    field = "level" if s["by_level"] else "subject" if s["by_subject"] else None
    groups = s[f"by_{field}"] if field else {"all": s}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) + 2), 3.8))
    ax.bar([f"{g}\n(n={a['n']})" for g, a in groups.items()], [100 * a["accuracy"] for a in groups.values()],
           yerr=[100 * a["stderr"] for a in groups.values()], capsize=3, color="tab:blue")
    ax.axhline(100 * s["accuracy"], color="gray", ls="--", lw=1, label=f"all: {100 * s['accuracy']:.1f}%")
    ax.set(ylabel="accuracy (%)", xlabel=field or "", ylim=(0, 100),
           title=f"{s['model_name']}\non {s['data_name']} ({s['engine']}, n={s['samples_per_problem']})")
    ax.legend(loc="upper right")
    return _save_png(plt, fig, path)


def _pyplot(png: str, numbers: str):
    """matplotlib.pyplot drawing to files, or None (no matplotlib: the PNG is skipped, the numbers stay)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"eval.py: no matplotlib, so no {png} (pip install matplotlib); the numbers are in {numbers}")
        return None
    return plt


def _save_png(plt, fig, path: Path) -> bool:
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")  # then a rename: a viewer never reads half a PNG
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _write(path: Path, text: str):
    """Write to a temp name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(out: Path, records: list, summary: dict, cfg: Config):
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    _write(out / "summary.json", json.dumps({"config": dataclasses.asdict(cfg), **summary}, indent=2) + "\n")
    plot_accuracy(summary, out / "accuracy.png")
    pd.append_result(cfg.results, "eval", dataclasses.asdict(cfg), summary)


# ---------------------------------------------------------- report card ----
# The pipeline's last page (run.sh): the base model, after SFT and after RL, side by side. Each eval already
# appended its summary to results.jsonl; the card reads them back (the latest line per --out folder), puts
# run.sh's wall time of every stage next to them, and says when the numbers are a CPU demo or not comparable.

COMPARED = ("data_name", "problems", "samples_per_problem", "max_tokens", "temperature", "engine")


def _pairs(items: list, flag: str) -> dict:
    if not all("=" in x for x in items):
        raise ValueError(f"eval.py: --{flag} {' '.join(items)}: expected NAME=VALUE items")
    return dict(x.split("=", 1) for x in items)


def report_card(cfg: Config) -> dict:
    """The card as a dict (models, stage times, flags) from results.jsonl; errors name the missing eval."""
    evals, times = _pairs(cfg.evals, "evals"), _pairs(cfg.times, "times")
    if not evals:
        raise ValueError("eval.py: --report needs --evals NAME=FOLDER ... (the --out of each model's eval)")
    try:
        times = {k: float(v) for k, v in times.items()}
    except ValueError:
        raise ValueError(f"eval.py: --times {' '.join(cfg.times)}: SECONDS must be numbers") from None
    if not Path(cfg.results).is_file():
        raise FileNotFoundError(f"eval.py: --results {cfg.results}: no such file (the evals append to it)")
    latest = {}  # eval --out folder -> its last summary (a re-run replaces an earlier one)
    for i, line in enumerate(Path(cfg.results).read_text(encoding="utf-8").splitlines()):
        try:
            r = json.loads(line) if line.strip() else {}
        except ValueError:  # a line cut short by a crash: skip it, as sft.py does with its metrics
            print(f"eval.py: WARNING: {cfg.results}: line {i + 1} is not JSON; skipped")
            continue
        if r.get("stage") == "eval" and r.get("config", {}).get("out"):
            latest[os.path.normpath(r["config"]["out"])] = r["metrics"]
    def lookup(flag: str, pairs: dict) -> dict:
        for name, folder in pairs.items():
            if os.path.normpath(folder) not in latest:
                raise ValueError(f"eval.py: --{flag} {name}={folder}: no eval with --out {folder} in {cfg.results}")
        return {name: latest[os.path.normpath(folder)] for name, folder in pairs.items()}

    models, ood = lookup("evals", evals), lookup("ood", _pairs(cfg.ood, "ood"))
    if set(ood) - set(models):
        raise ValueError(f"eval.py: --ood {' '.join(cfg.ood)}: names {sorted(set(ood) - set(models))} are not in "
                         f"--evals (the out-of-distribution rows are the same models)")
    differ = lambda ms: [k for k in COMPARED if len({json.dumps(m.get(k)) for m in ms.values()}) > 1]  # noqa: E731
    return {"models": models, "ood": ood, "times": times, "total_s": sum(times.values()), "differ": differ(models),
            "ood_differ": differ(ood), "cpu_demo": any(m.get("device") == "cpu" for m in models.values())}


def format_card(card: dict) -> str:
    """The card as markdown: what a person reads at the end of `bash run.sh`."""
    pct, first = (lambda x: f"{100 * x:.1f}%"), next(iter(card["models"].values()))
    mins = lambda s: f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"  # noqa: E731
    lines = ["# nanorlhf report card", ""]
    if card["cpu_demo"]:
        lines += ["**CPU DEMO, not a quality result**: every stage ran on tiny budgets (a few problems, short answers, "
                  "a few SFT and RL steps) to show the pipeline works end to end. Run `bash run.sh` on a GPU for the "
                  "real recipe.", ""]
    if card["differ"]:
        lines += [f"**WARNING: not comparable**: the evals differ in {', '.join(card['differ'])}.", ""]
    lines += [f"Held-out: {first['data_name']}, {first['problems']} of {first['problems_in_data']} problems x "
              f"{first['samples_per_problem']} sample(s), temperature {first['temperature']:g}, max_tokens "
              f"{first['max_tokens']}, {first['engine']} on {first['device']}.", "",
              "| model | accuracy | +- se | boxed (format) | truncated | mean tokens | folder |",
              "|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {n} | {pct(m['accuracy'])} | {pct(m['stderr'])} | {pct(m['format_rate'])} | "
              f"{pct(m['truncation_rate'])} | {m['mean_response_tokens']:.0f} | `{m['model']}` |"
              for n, m in card["models"].items()]
    if card.get("ood"):
        o = next(iter(card["ood"].values()))
        lines += ["", f"Out of distribution (the same models): {o['data_name']}, {o['problems']} of "
                  f"{o['problems_in_data']} problems, max_tokens {o['max_tokens']}."]
        if card["ood_differ"]:
            lines += [f"**WARNING: not comparable**: these evals differ in {', '.join(card['ood_differ'])}."]
        lines += ["", "| model | accuracy | +- se | boxed (format) | truncated |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {n} | {pct(m['accuracy'])} | {pct(m['stderr'])} | {pct(m['format_rate'])} | "
                  f"{pct(m['truncation_rate'])} |" for n, m in card["ood"].items()]
    if card["times"]:
        lines += ["", "| stage | wall time |", "|---|---:|", *[f"| {k} | {mins(v)} |" for k, v in
                                                              card["times"].items()],
                  f"| **total** | **{mins(card['total_s'])}** |"]
    return "\n".join(lines) + "\n"


def plot_card(card: dict, path: Path) -> bool:
    """Left: accuracy (with standard-error whiskers) and boxed rate per model; right: wall time per stage."""
    plt = _pyplot(path.name, "report.md")
    if plt is None:
        return False
    names, ms, times = list(card["models"]), list(card["models"].values()), card["times"]
    fig, axes = plt.subplots(1, 2 if times else 1, figsize=(11 if times else 5.5, 4), squeeze=False)
    a, x = axes[0][0], range(len(names))
    ood = card.get("ood") or {}
    series = [("accuracy", ms, "accuracy"), ("format_rate", ms, "boxed (format)")]
    if ood:   # a third bar per model: its accuracy on the out-of-distribution set (0 where it was not evaluated)
        o = [ood.get(n, {"accuracy": 0.0, "stderr": 0.0}) for n in names]
        series.append(("accuracy", o, f"{next(iter(ood.values()))['data_name']} (out of distribution)"))
    w = 0.8 / len(series)
    for j, (key, rows, label) in enumerate(series):
        bars = a.bar([i + (j - (len(series) - 1) / 2) * w for i in x], [100 * m[key] for m in rows], w, label=label,
                     alpha=(1, 0.6, 0.8)[j], hatch="//" if j == 2 else None,
                     yerr=[100 * m["stderr"] for m in rows] if key == "accuracy" else None, capsize=3)
        a.bar_label(bars, fmt="%.0f%%", fontsize=8)
    a.set(xticks=list(x), xticklabels=names, ylim=(0, 130), ylabel="% of held-out problems",
          title=f"{ms[0]['data_name']}, {ms[0]['problems']} problems" + (" (CPU DEMO)" if card["cpu_demo"] else ""))
    a.legend(loc="upper left", ncol=2, fontsize=8)   # above the 100% bars (ylim 130), not over their labels
    if times:
        b = axes[0][1]
        b.barh(list(times)[::-1], [v / 60 for v in times.values()][::-1], color="tab:gray")
        b.set(xlabel="minutes", title=f"wall time per stage (total {card['total_s'] / 60:.1f} min)")
    return _save_png(plt, fig, path)


def report(cfg: Config) -> dict:
    """--report FOLDER: the card -> FOLDER/report.md (+ report.png), printed, and one line in results.jsonl."""
    card, out = report_card(cfg), Path(cfg.report)
    out.mkdir(parents=True, exist_ok=True)
    text = format_card(card)
    _write(out / "report.md", text)
    png = plot_card(card, out / "report.png")
    pd.append_result(cfg.results, "report", {"evals": cfg.evals, "ood": cfg.ood, "times": cfg.times}, card)
    print(text + f"-> {out / 'report.md'}" + (f", {out / 'report.png'}" if png else "") + f", {cfg.results}")
    return card


# --------------------------------------------------------------- driver ----


def resolve(cfg: Config) -> tuple:
    """Check every flag before anything slow runs and fill the automatic defaults: (cfg, on_gpu)."""
    import torch
    checks = [(cfg.engine in ("nanovllm", "hf"), f"--engine {cfg.engine!r}: expected nanovllm or hf"),
              (cfg.source in pd.SOURCES and cfg.source != "synthetic",
               f"--source {cfg.source!r}: expected one of {[s for s in pd.SOURCES if s != 'synthetic']}"),
              (bool(cfg.question_field) == bool(cfg.answer_field), "--question_field and --answer_field go together"),
              (cfg.n >= 1 and cfg.temperature >= 0 and 0 < cfg.top_p <= 1,
               f"--n {cfg.n} must be >= 1, --temperature {cfg.temperature} >= 0, --top_p {cfg.top_p} in (0, 1]"),
              (cfg.n == 1 or cfg.temperature > 0, f"--n {cfg.n} with --temperature 0 gives {cfg.n} identical greedy "
               "answers; pass --temperature > 0 (e.g. 0.6)"),
              (cfg.limit >= -1 and cfg.hf_batch_size >= 1, "--limit must be >= -1 and --hf_batch_size >= 1"),
              (cfg.dtype in ("auto", "bfloat16", "float16", "float32"),
               f"--dtype {cfg.dtype!r}: expected auto, bfloat16, float16 or float32")]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"eval.py: {msg}")
    try:
        json.loads(cfg.template_kwargs or "{}")
    except ValueError as e:
        raise ValueError(f"eval.py: --template_kwargs {cfg.template_kwargs!r} is not JSON ({e})") from None
    gpu = torch.cuda.is_available()
    out = dataclasses.replace(
        cfg, limit=(0 if gpu else CPU_LIMIT) if cfg.limit == -1 else cfg.limit,
        max_tokens=(GPU_MAX_TOKENS if gpu else CPU_MAX_TOKENS) if cfg.max_tokens == -1 else cfg.max_tokens,
        workers=min(8, os.cpu_count() or 1) if cfg.workers == -1 else cfg.workers)
    if not gpu and (cfg.limit == -1 or cfg.max_tokens == -1):
        print(f"eval.py: a CPU demo: {out.limit or 'all'} problems, {out.max_tokens} new tokens each (on a GPU the "
              f"defaults are every problem and {GPU_MAX_TOKENS} tokens; set --limit 0 --max_tokens N)")
    return out, gpu


def model_folder(cfg: Config) -> Path:
    """--model as a local HF folder: itself, the offline default, or a hub id downloaded by nanovllm."""
    from nanovllm import resolve_model  # its errors name the folder or the hub id
    return pd.default_model_path() if cfg.model in ("", "smollm2") else resolve_model(cfg.model)


def evaluate(cfg: Config) -> dict:
    """The whole run: data -> prompts -> generation -> grading -> report. Returns the summary."""
    import torch
    t0 = time.time()
    cfg, gpu = resolve(cfg)
    grader = Grader(cfg.workers, cfg.timeout_s, cfg.grade_mode)  # checks math-verify before the slow part
    problems, data_name = load_problems(cfg)
    n_data, problems = len(problems), problems[:cfg.limit] if cfg.limit else problems
    if not problems:
        raise ValueError(f"eval.py: --data {cfg.data}: no problems to evaluate (the adapter dropped every row)")
    folder = model_folder(cfg)
    tok = pd.load_tokenizer(cfg.tokenizer or str(folder))  # its errors name the folder (--tokenizer to override)
    # prepare_data's eval recipe, the very function that writes the RL and eval .nano files: the chat template
    # with add_generation_prompt=True, the shared instruction after the problem, one batched tokenization
    rows = pd.encode_chunk(problems, tok, pd.Config(recipe="eval", template_kwargs=cfg.template_kwargs))
    max_pos = json.loads((folder / "config.json").read_text()).get("max_position_embeddings", 1 << 30)
    longest = max(range(len(rows)), key=lambda i: rows[i]["num_tokens"])
    if rows[longest]["num_tokens"] >= max_pos:  # no room for one new token: say so rather than drop it
        raise ValueError(f"eval.py: problem {problems[longest]['unique_id']}: its prompt has "
                         f"{rows[longest]['num_tokens']} tokens, the model takes {max_pos}; drop it from --data")
    ids = [r["prompt_ids"] for r in rows]
    with grader:
        grader.start()  # workers load math-verify while the model generates
        t1, threads = time.time(), torch.get_num_threads()
        if not gpu and "OMP_NUM_THREADS" not in os.environ:
            # CPU decoding is a chain of small matmuls; with 2+ OpenMP threads on a busy machine each one
            # waits for a descheduled peer (7x slower measured on 2 shared cores), so one thread by default
            torch.set_num_threads(1)
        try:
            gen = (generate_hf(folder, tok, ids, cfg) if cfg.engine == "hf" else
                   generate_nanovllm(folder, ids, cfg, min(max_pos, rows[longest]["num_tokens"] + cfg.max_tokens)))
        finally:
            torch.set_num_threads(threads)  # a process-wide setting: give it back (tests run in one process)
        t2 = time.time()
        grades = iter(grader.grade([(s["text"], p["answer"]) for p, ss in zip(problems, gen) for s in ss]))
    t3 = time.time()
    samples, records = [], []  # samples[p][j]: what summarize() needs; records: one samples.jsonl line each
    for p, r, ss in zip(problems, rows, gen):
        samples.append([])
        for j, s in enumerate(ss):
            g, n_new = next(grades), len(s["token_ids"])
            samples[-1].append({"grade": g, "boxed": bool((pd.last_boxed(s["text"]) or "").strip()),   # as graded
                                "finish_reason": s["finish_reason"], "num_tokens": n_new})
            records.append({"id": p["unique_id"], "sample": j, "level": p["level"], "subject": p["subject"],
                            "problem": p["problem"], "prompt": r["prompt"], "response": s["text"], "pred": g.pred,
                            "gold": p["answer"], "correct": g.correct, "status": g.status, "detail": g.detail,
                            "finish_reason": s["finish_reason"], "num_tokens": n_new})
    summary = summarize(problems, samples)
    name = "-".join(folder.parts[-3:] if folder.name == "hf" else folder.parts[-1:])  # ckpt/sft/step_9/hf
    summary.update(model=str(folder), model_name=name, data_name=data_name, problems_in_data=n_data,
                   engine=cfg.engine, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                   device="cuda" if gpu else "cpu", generate_s=t2 - t1, grade_s=t3 - t2, total_s=time.time() - t0,
                   output_tokens_per_s=sum(x["num_tokens"] for x in records) / max(t2 - t1, 1e-9))
    out = Path(cfg.out or f"runs/eval/{name}_{data_name}")
    cfg = dataclasses.replace(cfg, out=str(out))       # results.jsonl names the folder: --report finds it by it
    write_report(out, records, summary, cfg)
    print(format_table(summary) + f"\n  -> {out}/ (samples.jsonl, summary.json, accuracy.png), {cfg.results}")
    return summary


# ------------------------------------------------------------------ CLI ----


def main(argv=None) -> dict:
    cfg = pd.config_from_argv(Config, argv, __doc__.strip().split("\n")[0])
    return report(cfg) if cfg.report else evaluate(cfg)


if __name__ == "__main__":
    pd.run_cli(main, prog="eval.py")
