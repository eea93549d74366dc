"""Config loading: YAML + key=value overrides, unknown keys and wrong types are errors."""
import pytest
import yaml

from experiments.config import ExperimentConfig, load_experiment
from grpo.config import ConfigError, describe, load_config, save_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grpo:\n  steps: 7\n  lr: 1e-5\nsampling:\n  stop_strings: ['</rate>']\n")
    cfg = load_experiment(path, ["grpo.lr=3e-6", "run.name=abc", "task.one_shot=turn", "grpo.adam_betas=[0.9, 0.95]"])
    assert cfg.grpo.steps == 7 and cfg.grpo.lr == 3e-6 and isinstance(cfg.grpo.lr, float)
    assert cfg.run.name == "abc" and cfg.task.one_shot == "turn"
    assert cfg.sampling.stop_strings == ["</rate>"] and cfg.grpo.adam_betas == [0.9, 0.95]


def test_yaml_float_written_without_dot_is_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grpo:\n  lr: 1e-6\n  beta: 0\n")  # PyYAML reads 1e-6 as a string, 0 as an int
    cfg = load_experiment(path)
    assert cfg.grpo.lr == 1e-6 and cfg.grpo.beta == 0.0


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_experiment(None, ["grpo.learning_rate=1"])
    assert "grpo.learning_rate" in str(e.value) and "lr" in str(e.value) and "clip_eps_low" in str(e.value)
    with pytest.raises(ConfigError):
        load_experiment(None, ["nosection.x=1"])


@pytest.mark.parametrize("override", ["grpo.steps=ten", "grpo.steps=1.5", "task.one_shot=[1]",
                                      "grpo.lr=[1]", "sampling.stop_strings=5", "grpo.steps"])
def test_wrong_types_are_errors(override):
    with pytest.raises(ConfigError):
        load_experiment(None, [override])


def test_saved_config_round_trips(tmp_path):
    cfg = load_experiment(None, ["grpo.steps=3", "model.random_init={model_type: qwen2, hidden_size: 32}"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(ExperimentConfig, tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["random_init"]["hidden_size"] == 32


def test_every_key_is_documented():
    rows = describe(ExperimentConfig)
    undocumented = [key for key, _, doc in rows if not doc]
    assert not undocumented, undocumented
    assert any(key == "grpo.loss_agg" for key, _, _ in rows)


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted(Path("experiments/configs").glob("*.yaml"))
    assert len(configs) >= 3
    from experiments.coldstart import ReconeConfig

    for path in configs:
        if path.name.startswith("recone"):
            load_config(ReconeConfig, path)
        else:
            load_experiment(path)
