"""
merge.py -- turn a nanotron checkpoint of any layout into one Hugging Face model folder.

Training writes sharded, resumable checkpoints (nanotron.save_checkpoint: one safetensors file per
(pipeline stage, TP rank), optimizer shards per rank, a manifest). Evaluation, inference and the hub
want one HF folder that `transformers.AutoModelForCausalLM.from_pretrained` loads. This is the bridge,
standing in for Megatron's checkpoint converter scripts. It keeps: any (tp, pp, dp, ZeRO) layout, one
process, no torch.distributed, no GPU; dtype choice; HF-style sharding of big models (5 GB files +
model.safetensors.index.json); tokenizer files copied from the model the run started from. It drops:
the optimizer state (a merged folder is for inference; resume from the checkpoint itself).

How it works: nanotron.CheckpointReader verifies each file (size + sha256) and glues every HF tensor
back from its TP pieces (the manifest says how each piece was cut); the tensors are cast and written
to a temp folder with config.json (+ generation_config.json), then the folder is renamed into place.

Commands:
  python merge.py ckpt/sft-smollm2/step_120          # -> ckpt/sft-smollm2/step_120/hf (bfloat16)
  python merge.py ckpt/sft-smollm2 --dtype float32 --out out/sft-hf   # a root: its latest step_N
  python merge.py                                    # CPU self-test: tiny model, save, merge, check vs transformers
  From Python: `from merge import merge; merge("ckpt/sft-smollm2/step_120", dtype="float32")`.
"""

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import nanotron as nt

@dataclass
class Config:
    ckpt: str = ""  # a checkpoint folder (step_N), or a root holding step_N folders (its latest); "" = self-test
    out: str = ""  # the HF folder to write; "" = <ckpt>/hf
    dtype: str = "bfloat16"  # bfloat16 | float16 | float32: the dtype of the written weights
    max_shard_gb: float = 5.0  # weights above this go into several files + an index (HF's default size)
    tokenizer: str = ""  # folder to copy tokenizer files from; "" = the run config's "tokenizer" or "model"


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# What makes a folder a usable tokenizer (whichever of them the source model has)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


def _shards(names, sizes, max_bytes) -> list[list[str]]:
    """Cut the tensor list into consecutive groups of at most max_bytes (a bigger tensor gets its own)."""
    groups, cur, n = [], [], 0
    for name in names:
        if cur and n + sizes[name] > max_bytes:
            groups.append(cur)
            cur, n = [], 0
        cur.append(name)
        n += sizes[name]
    return groups + [cur]


def _tokenizer_source(ck, override: str) -> Path | None:
    """The folder to copy tokenizer files from: --tokenizer, else the run config's tokenizer / model.
    Local folders are used as they are; "smollm2" is the offline default model; a hub id is resolved
    through nanotron (HF cache or download). None, with a warning, when there is nothing usable."""
    run = ck.manifest.get("config") or {}
    src = override or run.get("tokenizer") or run.get("model")
    if not override and src in nt.PRESETS:   # a random-init shape: the tokenizer is the one its data used
        data_manifest = Path(run.get("data") or "") / "manifest.json"
        src = json.loads(data_manifest.read_text()).get("tokenizer") if data_manifest.is_file() else None
    if not src:
        why = (f"the run trained the random-init preset {run.get('model')!r} and its data folder names no tokenizer"
               if run.get("model") in nt.PRESETS else f"the run config in {ck.folder}/manifest.json has no "
               "'tokenizer' or 'model' key")
        print(f"merge: WARNING: no tokenizer copied: {why} (pass --tokenizer FOLDER)")
        return None
    try:
        import prepare_data                  # the offline default model's glue (GGUF -> HF folder)
        return prepare_data.default_model_path() if src == "smollm2" else nt.resolve_model_path(src)
    except (FileNotFoundError, ImportError) as e:
        print(f"merge: WARNING: no tokenizer copied: {e}")
        return None


def merge(ckpt, out=None, dtype: str = "bfloat16", max_shard_gb: float = 5.0, tokenizer: str = "") -> Path:
    """Write the HF folder of checkpoint `ckpt` (any layout) to `out` (default <ckpt>/hf); returns it."""
    if dtype not in DTYPES:
        raise ValueError(f"merge: --dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    t0, ckpt = time.time(), Path(ckpt)
    if not (ckpt / "manifest.json").is_file():          # a root folder: take its newest finished save
        if nt.latest_checkpoint(ckpt) is None:
            raise FileNotFoundError(f"merge: {ckpt} is neither a checkpoint (no manifest.json) nor a folder of "
                                    "finished step_N checkpoints")
        ckpt = nt.latest_checkpoint(ckpt)
    out = Path(out) if out else ckpt / "hf"
    if ckpt.resolve().is_relative_to(out.resolve()):    # out is replaced whole: the checkpoint would go with it
        raise ValueError(f"merge: --out {out} holds the checkpoint {ckpt} (it is replaced whole, so the checkpoint "
                         "would be deleted); pass a new folder, e.g. the default <ckpt>/hf")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    from prepare_data import replace_dir
    try:                                                # a failure leaves no half-written folder behind
        step, lay, names, groups, n_bytes, src, copied = _write(ckpt, tmp, dtype, max_shard_gb, tokenizer)
        if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():   # not an earlier merge
            raise ValueError(f"merge: --out {out} is a folder with other files (no config.json); it would be "
                             "replaced whole: pass a new or empty folder")
        replace_dir(tmp, out)                           # an old `out` is deleted once the new one is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merge: {ckpt} (step {step}, saved as tp={lay['tp']} pp={lay['pp']} dp={lay['dp']}) -> {out}: "
          f"{len(names)} tensors, {n_bytes / 2 ** 20:.1f} MiB {dtype} in {len(groups)} file(s), tokenizer: "
          f"{f'{len(copied)} files from {src}' if copied else 'none'}, {time.time() - t0:.1f}s")
    return out


def _write(ckpt: Path, tmp: Path, dtype: str, max_shard_gb: float, tokenizer: str) -> tuple:
    """The HF folder's files, written into tmp; returns what the summary line prints."""
    with nt.CheckpointReader(ckpt) as ck:
        cfg, names = ck.config, ck.model_names()
        # plan the shards from the manifest alone (full shapes x output dtype), before reading anything
        item = torch.empty((), dtype=DTYPES[dtype]).element_size()
        sizes = {n: item * torch.Size(ck.model_index[n][0][1]["full_shape"]).numel() for n in names}
        groups = _shards(names, sizes, max_shard_gb * 1e9)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        from safetensors.torch import save_file
        weight_map = {}
        for i, group in enumerate(groups):
            fname = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            # one shard in memory at a time; .contiguous() copies nothing when the dtype already matches
            save_file({n: ck.tensor(n).to(DTYPES[dtype]).contiguous() for n in group}, str(tmp / fname),
                      metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, fname))
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(dtype), indent=2))
        src = _tokenizer_source(ck, tokenizer)
        copied = [f for f in TOKENIZER_FILES + ("generation_config.json",) if src and (src / f).is_file()]
        for f in copied:
            shutil.copy2(src / f, tmp / f)
        if "generation_config.json" not in copied and cfg.eos_token_id is not None:
            # what generate() needs to stop; the source model's own file (sampling defaults) wins when present
            gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        return ck.manifest["step"], ck.manifest["layout"], names, groups, sum(sizes.values()), src, copied


# ---- demo (python merge.py with no checkpoint) ----

def demo() -> float:
    """One process, CPU, seconds: a tiny random Qwen3 -> save_checkpoint -> merge -> transformers loads it
    and gives the same logits."""
    import tempfile
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory(prefix="merge-demo-") as root:      # removed afterwards, even on failure
        model = nt.Transformer(nt.tiny_config(), use_kernels=False).init_random(0)
        opt = nt.build_optimizer(model)
        ckpt = nt.save_checkpoint(Path(root) / "step_0", model, opt, model.mesh, step=0)
        out = merge(ckpt, dtype="float32")
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ids = torch.arange(11) % model.cfg.vocab_size
        cu, pos = nt.cu_seqlens_from_lengths([11])
        with torch.no_grad():
            err = (model.logits(model(ids, pos, cu)) - hf(ids[None]).logits[0]).abs().max().item()
    if not err < 1e-5:
        raise AssertionError(f"merge demo: transformers' logits differ from nanotron's by {err:.1e}")
    print(f"merge demo ok: transformers' logits equal nanotron's (max |diff| {err:.1e})")
    return err


# ---- CLI ----

def parse_args(argv=None) -> Config:
    from prepare_data import config_from_argv  # the sibling that owns the dataclass -> argparse helper
    return config_from_argv(Config, argv, __doc__.strip().split("\n")[0], positional=("ckpt",))


def main(argv=None):
    cfg = parse_args(argv)
    if not cfg.ckpt:
        return demo()
    return merge(cfg.ckpt, cfg.out or None, cfg.dtype, cfg.max_shard_gb, cfg.tokenizer)


if __name__ == "__main__":
    from prepare_data import run_cli
    run_cli(main, prog="merge.py")
