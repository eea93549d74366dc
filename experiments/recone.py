"""RecOne in one command: cold-start traces -> SFT -> GRPO from the SFT checkpoint.

    python -m experiments.recone --config experiments/configs/recone.yaml [key=value ...]

Stage folders under `run.output_dir` (default runs/<run.name>): `coldstart.jsonl` (reused and resumed if
present), `sft/` (its best checkpoint by validation loss starts the next stage), `grpo/`; `stages.json`
links them. The GRPO stage is exactly RecZero's loop, only starting from the SFT weights.
"""
from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

from experiments.coldstart import ReconeConfig, sft_pairs, write_traces
from experiments.config import config_from_cli
from experiments.task import RecTask
from grpo.models import load_tokenizer
from grpo.runlog import write_json
from grpo.sft import train_sft
from grpo.train import train


def run_recone(cfg: ReconeConfig) -> Path:
    root = Path(cfg.run.output_dir or f"runs/{cfg.run.name}")
    root.mkdir(parents=True, exist_ok=True)
    stages: dict = {"root": str(root)}

    # ---- 1. cold-start traces ---------------------------------------------------------------------------
    cfg = copy.deepcopy(cfg)
    if not cfg.coldstart.out or cfg.coldstart.out == "runs/recone/coldstart.jsonl":
        cfg.coldstart.out = str(root / "coldstart.jsonl")
    traces, stats = write_traces(cfg)
    stages["coldstart"] = {"traces": str(traces), "stats": stats}

    # ---- 2. SFT on the kept traces (a tenth held out for validation loss and early stopping) --------------
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    task = RecTask(cfg.task, tokenizer)
    pairs = sft_pairs(traces, task)
    if len(pairs) < 2:
        raise RuntimeError(f"only {len(pairs)} cold-start traces were kept ({traces}); raise coldstart.n_examples, "
                           "coldstart.samples_per_example or coldstart.tolerance, or use an external teacher")
    random.Random(cfg.sft.seed).shuffle(pairs)
    n_val = max(1, len(pairs) // 10)
    sft_run = copy.deepcopy(cfg.run)
    sft_run.output_dir = str(root / "sft")
    val_items = task.items("val")[: cfg.run.eval_examples] if cfg.run.eval_examples > 0 else None
    sft_dir = train_sft(cfg.model, cfg.sft, sft_run, pairs[n_val:], pairs[:n_val], sampling=cfg.sampling,
                        task=task, val_items=val_items, full_config=cfg)
    best = sft_dir / "checkpoints" / "best"
    stages["sft"] = {"run": str(sft_dir), "checkpoint": str(best if best.exists() else ""), "pairs": len(pairs)}

    # ---- 3. GRPO from the SFT weights ---------------------------------------------------------------------
    grpo_model = copy.deepcopy(cfg.model)
    if best.exists():
        grpo_model.name_or_path = str(best)
        grpo_model.random_init = {}
    grpo_run = copy.deepcopy(cfg.run)
    grpo_run.output_dir = str(root / "grpo")
    grpo_dir = train(grpo_model, cfg.sampling, cfg.grpo, grpo_run, task, full_config=cfg)
    stages["grpo"] = {"run": str(grpo_dir), "starts_from": grpo_model.name_or_path}
    write_json(root / "stages.json", stages)
    print(json.dumps(stages, indent=2))
    return root


def main(argv=None) -> int:
    cfg = config_from_cli(ReconeConfig, argv, __doc__, default_config="experiments/configs/recone.yaml")
    if cfg is None:
        return 2
    run_recone(cfg)
    return 0

if __name__ == "__main__":
    sys.exit(main())
