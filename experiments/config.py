"""The experiment's configuration: the engine's sections plus the task's."""
from __future__ import annotations

from dataclasses import dataclass, field

from experiments.task import TaskConfig
from grpo.config import GRPOConfig, ModelConfig, RunConfig, SamplingConfig, load_config


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)


def load_experiment(path=None, overrides=None) -> ExperimentConfig:
    return load_config(ExperimentConfig, path, overrides)


def config_from_cli(cls, argv, description: str, default_config: str | None = None):
    """`--config FILE key=value ...` -> a config of type `cls`, or None after printing the error (exit 2)."""
    import argparse
    import sys

    from grpo.config import ConfigError

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help="a YAML file in experiments/configs/")
    parser.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. grpo.steps=8")
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return None
