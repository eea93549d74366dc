"""RecOne in one command: cold-start traces -> SFT -> GRPO from the SFT checkpoint.

    python -m experiments.recone --config experiments/configs/recone.yaml [key=value ...]

Stage folders under `run.output_dir` (default runs/<run.name>): `coldstart.jsonl` (reused and resumed if
present), `sft/` (its best checkpoint by validation loss starts the next stage), `grpo/`; `stages.json`
links them. The GRPO stage is exactly RecZero's loop, only starting from the SFT weights. With
`run.resume=latest` a finished SFT stage is kept and GRPO continues from its latest checkpoint.
"""
from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

from experiments.coldstart import ReconeConfig, sft_pairs, write_traces
from experiments.config import config_from_cli
from experiments.export import write_merged
from experiments.task import RecTask
from grpo import distributed
from grpo.lora import ADAPTERS_FILE
from grpo.models import load_tokenizer
from grpo.runlog import run_finished, write_json
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
    dist = distributed.setup()
    if dist.enabled and cfg.coldstart.teacher == "rules":  # cheap and model-free: rank 0 writes, the others wait
        traces, stats = (write_traces(cfg) if dist.is_main else (Path(cfg.coldstart.out), {"written_by": "rank 0"}))
        dist.barrier()
    elif dist.enabled:  # a model or a network writes them: one writer, not one per rank, and before torchrun
        traces, stats = Path(cfg.coldstart.out), {"reused": True}
        if not traces.exists():
            raise SystemExit(f"under torchrun, write the cold-start traces first, in one process: python -m "
                             f"experiments.coldstart --config ... coldstart.out={traces}; then run this again")
    else:
        traces, stats = write_traces(cfg)
    stages["coldstart"] = {"traces": str(traces), "stats": stats}

    # ---- 2. SFT on the kept traces (a tenth held out for validation loss and early stopping) --------------
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    task = RecTask(cfg.task, tokenizer)
    pairs = sft_pairs(traces, task)
    budget = cfg.sampling.max_new_tokens
    fits = [p for p in pairs if len(tokenizer(p[1], add_special_tokens=False)["input_ids"]) < budget]
    if len(fits) < len(pairs):  # a model taught answers GRPO cuts off never reaches a rating there
        print(f"{len(pairs) - len(fits)} of {len(pairs)} cold-start traces are longer than sampling.max_new_tokens="
              f"{cfg.sampling.max_new_tokens} tokens (with their EOS) and are left out of SFT")
    stages["sft_pairs_too_long"] = len(pairs) - len(fits)
    pairs = fits
    if len(pairs) < 2:
        raise RuntimeError(f"only {len(pairs)} cold-start traces were kept and fit ({traces}); raise "
                           "coldstart.n_examples, coldstart.samples_per_example, coldstart.tolerance or "
                           "sampling.max_new_tokens, or use an external teacher")
    random.Random(cfg.run.seed).shuffle(pairs)
    n_val = max(1, len(pairs) // 10)
    sft_run = copy.deepcopy(cfg.run)
    sft_run.output_dir = str(root / "sft")
    sft_run.eval_every = 0  # SFT validates at the end of each epoch (run.eval_every counts GRPO steps here)
    val_items = task.items("val")[: cfg.run.eval_examples] if cfg.run.eval_examples > 0 else None
    sft_dir = root / "sft"
    if cfg.run.resume and run_finished(sft_dir):  # a resumed RecOne keeps its finished SFT stage
        print(f"run.resume: the SFT stage in {sft_dir} has finished; continuing with GRPO")
    else:  # a new SFT stage, or an unfinished one continued from its latest step checkpoint
        sft_run.resume = "latest" if cfg.run.resume else ""
        sft_dir = train_sft(cfg.model, cfg.sft, sft_run, pairs[n_val:], pairs[:n_val], sampling=cfg.sampling,
                            task=task, val_items=val_items, full_config=cfg)
        if not run_finished(sft_dir):  # stopped on request: GRPO must not start from unfinished weights
            print("RecOne stopped during SFT; continue with the same command and run.resume=latest")
            return root
    best = sft_dir / "checkpoints" / "best"
    stages["sft"] = {"run": str(sft_dir), "checkpoint": str(best if best.exists() else ""), "pairs": len(pairs)}

    # ---- 3. GRPO from the SFT weights ---------------------------------------------------------------------
    grpo_model = copy.deepcopy(cfg.model)
    if (best / ADAPTERS_FILE).exists():  # LoRA: new adapters over the SFT adapters merged into the base
        start = root / "sft" / "merged"
        if distributed.setup().is_main and not start.exists():
            write_merged(cfg.model, cfg.run.seed, best, start)
        distributed.setup().barrier()
        grpo_model.name_or_path, grpo_model.random_init = str(start), {}
    elif best.exists():
        grpo_model.name_or_path, grpo_model.random_init = str(best), {}
    grpo_run = copy.deepcopy(cfg.run)
    grpo_run.output_dir = str(root / "grpo")
    grpo_config = copy.deepcopy(cfg)
    grpo_config.model = grpo_model  # the GRPO stage's config.yaml names the weights it started from
    grpo_dir = train(grpo_model, cfg.sampling, cfg.grpo, grpo_run, task, full_config=grpo_config)
    stages["grpo"] = {"run": str(grpo_dir), "starts_from": grpo_model.name_or_path}
    if distributed.setup().is_main:
        write_json(root / "stages.json", stages)
        print(json.dumps(stages, indent=2))
    return root


def main(argv=None) -> int:
    cfg = config_from_cli(ReconeConfig, argv, __doc__, default_config="experiments/configs/recone.yaml")
    if cfg is None:
        return 2
    try:
        run_recone(cfg)
    finally:
        distributed.teardown()  # under torchrun: leave the process group
    return 0

if __name__ == "__main__":
    sys.exit(main())
