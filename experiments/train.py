"""Train a recommender with GRPO: `python -m experiments.train --config experiments/configs/reczero.yaml [key=value ...]`.

Overrides use dotted keys: `grpo.steps=10 sampling.temperature=0.7 task.reward=authors_code run.name=try1`.
`--help-config` lists every key with its default and meaning. On several GPUs, the same command under torchrun:
`torchrun --nproc_per_node 8 -m experiments.train --config ...` (see README, "Scaling up").
"""
from __future__ import annotations

import argparse
import os
import sys

from experiments.config import ExperimentConfig, load_experiment
from experiments.task import RecTask
from grpo import distributed
from grpo.config import ConfigError, describe
from grpo.models import load_tokenizer
from grpo.train import train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML file in experiments/configs/")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. grpo.steps=10")
    args = parser.parse_args(argv)
    if args.help_config:
        for key, default, doc in describe(ExperimentConfig):
            print(f"{key:32s} {default:24s} {doc}")
        return 0
    try:
        cfg = load_experiment(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        run_dir = run_experiment(cfg)
    except (FileNotFoundError, FileExistsError) as e:  # a missing input, a folder holding a run: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()  # under torchrun: leave the process group
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, once
        print(f"run folder: {run_dir}")
    return 0


def run_experiment(cfg: ExperimentConfig):
    """Train RecZero-style GRPO with a resolved config; returns the run folder (what `main` runs)."""
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    task = RecTask(cfg.task, tokenizer)
    return train(cfg.model, cfg.sampling, cfg.grpo, cfg.run, task, full_config=cfg)


if __name__ == "__main__":
    sys.exit(main())
