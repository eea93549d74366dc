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
