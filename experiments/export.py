"""Export a run's checkpoint as a plain Hugging Face model, LoRA adapters merged into the base weights.

    python -m experiments.export --run runs/reczero --out exported/reczero [--step 24]

A LoRA checkpoint holds only the adapters (adapters.safetensors + adapter_config.json): the base model is
rebuilt from the run's config.yaml, the adapters are loaded and W + (alpha / r) B A is saved as an ordinary
fp32 checkpoint that `AutoModelForCausalLM.from_pretrained` loads with no LoRA code at all. A checkpoint that
already is a full model is copied (without its optimizer state).

A `random_init` base is rebuilt with the run's seed (run.seed), exactly as grpo/policy.py's load_policy built
it: the adapters only make sense on top of that very base, and another seed is another base.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from grpo.config import ModelConfig, build_config, read_config_values
from grpo.lora import ADAPTER_CONFIG_FILE, ADAPTERS_FILE, add_lora, load_adapters, merged_state_dict
from grpo.models import build_random_model, load_model, load_tokenizer

MODEL_FILES = ("model.safetensors", "model.safetensors.index.json")  # a full model, whole or sharded


class ExportError(Exception):
    pass


def find_checkpoint(run: Path, step: int | None) -> Path:
    """checkpoints/step_<step>, or the highest step holding adapters or a model."""
    steps = {}
    for path in (run / "checkpoints").glob("step_*"):
        match = re.fullmatch(r"step_(\d+)", path.name)
        if match and any((path / f).exists() for f in (ADAPTERS_FILE, *MODEL_FILES)):
            steps[int(match.group(1))] = path
    if not steps:
        raise ExportError(f"no checkpoints in {run / 'checkpoints'}")
    if step is None:
        return steps[max(steps)]
    if step not in steps:
        raise ExportError(f"no checkpoint for step {step} in {run}; available steps: {sorted(steps)}")
    return steps[step]


def build_merged_model(cfg: ModelConfig, seed: int, ckpt: Path, tokenizer):
    """The base model as the run built it, with the checkpoint's adapters on it (fp32, CPU)."""
    if cfg.random_init:
        specials = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                    "bos_token_id": tokenizer.bos_token_id}  # as load_policy passes them
        model = build_random_model(cfg.random_init, vocab_size=len(tokenizer), seed=seed, dtype="float32",
                                   device="cpu", special_ids=specials)
    else:
        model = load_model(cfg.name_or_path, dtype="float32", device="cpu")
    lora = json.loads((ckpt / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    add_lora(model, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"])
    load_adapters(model, ckpt)
    return model


def write_merged(cfg: ModelConfig, seed: int, ckpt: Path, folder: Path) -> None:
    """The checkpoint's adapters merged into the base: a plain Hugging Face model (+ tokenizer) in `folder`."""
    has_tokenizer = (ckpt / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(str(ckpt) if has_tokenizer else cfg.tokenizer or cfg.name_or_path)
    model = build_merged_model(cfg, seed, ckpt, tokenizer)
    model.save_pretrained(folder, state_dict=merged_state_dict(model), safe_serialization=True)
    tokenizer.save_pretrained(folder)


def export(run: Path, step: int | None, out: Path) -> Path:
    if not (run / "config.yaml").exists():
        raise ExportError(f"{run} is not a run folder: no config.yaml")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; choose another --out")
    ckpt = find_checkpoint(run, step)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # a previous export that died half-way
    if not (ckpt / ADAPTERS_FILE).exists():
        print(f"{ckpt} is already a full model (no adapters): copying it")
        shutil.copytree(ckpt, tmp, ignore=shutil.ignore_patterns("trainer_state.pt"))
    else:
        values = read_config_values(run / "config.yaml")
        cfg = build_config(ModelConfig, values.get("model") or {})
        seed = int((values.get("run") or {}).get("seed", 0))
        print(f"merging the adapters of {ckpt} into the base model")
        write_merged(cfg, seed, ckpt, tmp)
    if out.exists():
        out.rmdir()  # empty (checked above): make room for the rename
    tmp.rename(out)  # atomic: a half-written export is never mistaken for a finished one
    print(f"exported {ckpt} -> {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="the run folder (holds config.yaml and checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="which checkpoint (default: the latest)")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    args = parser.parse_args(argv)
    try:
        export(Path(args.run), args.step, Path(args.out))
    except (ExportError, FileNotFoundError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
