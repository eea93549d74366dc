"""Typed configuration: dataclasses loaded from YAML, overridden by `key=value` on the command line.

One source of truth for every setting: no module globals, no environment variables read deep in library
code. A config is a tree of dataclasses; YAML gives nested mappings, the command line gives dotted keys
(`grpo.lr=1e-5`, `sampling.temperature=0.7`).
Unknown keys and values of the wrong type are errors that name the valid keys, so a typo never silently
falls back to a default. The resolved config is saved next to every run (`save_config`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


# ----------------------------------------------------------------------------------------------------
# The engine's settings. Task-specific settings (data, templates, rewards) live with the task.
# ----------------------------------------------------------------------------------------------------
def check(section: str, **conditions: tuple[bool, str]) -> None:
    """Raise one ConfigError listing every setting of `section` whose condition fails: {key: (ok, rule)}."""
    bad = [f"{section}.{key} {rule}" for key, (ok, rule) in conditions.items() if not ok]
    if bad:
        raise ConfigError("invalid setting(s): " + "; ".join(bad))


@dataclass
class LoRAConfig:
    rank: int = 0
    """LoRA rank r; 0 = no adapters (every weight trains). With r > 0 the base weights are frozen (bf16 on
    CUDA) and only the low-rank adapters A (r x in) and B (out x r) train, in fp32 with fp32 AdamW state."""
    alpha: float = 16.0
    """The adapter's output is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training (never while sampling)."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    """Which linear layers of each decoder layer get adapters (module names as in the Hugging Face model)."""

    def __post_init__(self):
        check("model.lora", rank=(self.rank >= 0, f"must be >= 0 (0 = off), got {self.rank}"),
              alpha=(self.alpha > 0, f"must be > 0, got {self.alpha}"),
              dropout=(0 <= self.dropout < 1, f"must be in [0, 1), got {self.dropout}"),
              targets=(bool(self.targets) or self.rank == 0, "must name at least one linear layer"))


@dataclass
class ModelConfig:
    name_or_path: str = "default"
    """A local Hugging Face folder, a hub id, or `default` (the converted SmolLM2-135M-Instruct)."""
    tokenizer: str = ""
    """Where the tokenizer comes from; empty = same as name_or_path."""
    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16: the compute dtype."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:1 ..."""
    random_init: dict[str, Any] = field(default_factory=dict)
    """If non-empty: build a randomly initialised model from these transformers config values instead of
    loading weights (e.g. {model_type: qwen2, hidden_size: 64, ...}); the vocab comes from the tokenizer."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% slower). Never used while sampling."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Low-rank adapters (grpo/lora.py): `model.lora.rank=16` turns them on."""
    cpu_offload: bool = False
    """Under torchrun (FSDP2): keep the sharded fp32 weights, gradients and AdamW state in CPU memory and
    run the optimizer step there (FSDP2's CPUOffloadPolicy). Saves GPU memory, costs step time."""


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same one (docs/grpo.md trap 1)."""
    top_p: float = 1.0
    """Nucleus sampling. Below 1 the importance ratio is biased (trap 1): keep 1 for training."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 = the full vocabulary."""
    max_new_tokens: int = 256
    """Completion length limit; a completion that reaches it is 'truncated'."""
    stop_strings: list[str] = field(default_factory=list)
    """Stop a completion once its text ends with one of these (e.g. '</rate>'), besides EOS."""
    decoder: str = "fast"
    """Which sampler loop: `reference` = grpo/sampler.py, the plain loop (Hugging Face forward and cache, one
    token per row per step); `fast` = grpo/fast/, the same tokens and log-probs for less time (each prompt
    prefilled once for its group, a preallocated cache, finished rows dropped, CUDA graphs)."""
    decode_weights: str = "auto"
    """What the sampler multiplies by when the model trains in fp32 under bf16 autocast (CUDA): `copy` = a
    bf16 copy of the weights, refreshed from the master weights before every generation (2 bytes a
    parameter; it makes CUDA graphs and the decoder's CUDA savings possible, which autocast rules out);
    `master` = the fp32 master weights under autocast (decoded eagerly); `auto` = `copy` on CUDA where it
    takes under half the free GPU memory, else `master`. Without autocast: the model itself, always."""

    def __post_init__(self):
        check("sampling", temperature=(self.temperature > 0, f"must be > 0 (greedy decoding is for evaluation), "
                                                             f"got {self.temperature}"),
              top_p=(0 < self.top_p <= 1, f"must be in (0, 1], got {self.top_p}"),
              top_k=(self.top_k >= 0, f"must be >= 0 (0 = off), got {self.top_k}"),
              max_new_tokens=(self.max_new_tokens >= 1, f"must be >= 1, got {self.max_new_tokens}"),
              decoder=(self.decoder in ("reference", "fast"), f"must be reference or fast, got {self.decoder!r}"),
              decode_weights=(self.decode_weights in ("auto", "copy", "master"),
                              f"must be auto, copy or master, got {self.decode_weights!r}"))


@dataclass
class GRPOConfig:
    steps: int = 100
    """Optimizer steps (each: B prompts x G completions, then mu passes over them)."""
    batch_prompts: int = 8
    """B: prompts per step."""
    group_size: int = 8
    """G: completions per prompt; advantages are normalised within each group."""
    mu: int = 1
    """Policy updates per rollout batch. 1 = on-policy (old log-probs are the detached current ones)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward; gradients accumulate over micro-batches with one global denominator."""
    micro_batch_tokens: int = 0
    """If > 0, size micro-batches by tokens instead: consecutive sequences while rows x (longest prompt +
    longest completion among them) stays within this budget (micro_batch_size is then unused). 0 = off."""
    lr: float = 1e-6
    """AdamW learning rate after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many steps, then constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    beta: float = 0.0
    """KL coefficient (k3 estimator) to a frozen reference. 0 = no reference model is loaded at all."""
    clip_eps_low: float = 0.2
    """PPO clip: ratio lower bound 1 - clip_eps_low."""
    clip_eps_high: float = 0.2
    """PPO clip: ratio upper bound 1 + clip_eps_high (DAPO's clip-higher uses 0.28)."""
    loss_agg: str = "token_mean"
    """token_mean (over the whole step; DAPO), seq_mean_token_mean (DeepSeekMath), dr_grpo (constant)."""
    scale_rewards_by_std: bool = True
    """Divide advantages by the group std (DeepSeekMath, the paper); False = Dr. GRPO."""
    mask_truncated: bool = False
    """Give truncated completions no loss (DAPO's overlong masking): a cut answer is no evidence."""
    kl_clamp: float = 10.0
    """Clamp log-ratios to +-this before exp in the KL estimator."""
    logprobs: str = "fast"
    """How the update scores completions (grpo/logprobs.py): `reference` = one forward over every row's
    prompt and completion; `fast` = the same numbers, with padding columns trimmed and each prompt run once
    per micro-batch, its keys/values (and their gradient) shared by its completions: B*P + N*T tokens of work
    instead of N*(P + T); the prompts' common prefix (system message, worked example) runs once too."""
    logprob_chunk_tokens: int = 1024
    """Tokens per chunk when computing log-probs from hidden states (bounds the logits' memory)."""
    max_nonfinite_steps: int = 3
    """A step whose loss or gradient norm is not finite is skipped (nothing applied); this many in a row stop
    the run (the usual cause: a learning rate far too high)."""

    def __post_init__(self):
        from grpo.functional import LOSS_AGGREGATIONS

        check("grpo", steps=(self.steps >= 1, f"must be >= 1, got {self.steps}"),
              batch_prompts=(self.batch_prompts >= 1, f"must be >= 1, got {self.batch_prompts}"),
              group_size=(self.group_size >= 2, f"must be >= 2 (advantages compare completions of one prompt), "
                                                f"got {self.group_size}"),
              mu=(self.mu >= 1, f"must be >= 1, got {self.mu}"),
              micro_batch_size=(self.micro_batch_size >= 1, f"must be >= 1, got {self.micro_batch_size}"),
              micro_batch_tokens=(self.micro_batch_tokens >= 0, f"must be >= 0 (0 = off), got {self.micro_batch_tokens}"),
              lr=(self.lr >= 0, f"must be >= 0, got {self.lr}"),
              warmup_steps=(self.warmup_steps >= 0, f"must be >= 0, got {self.warmup_steps}"),
              weight_decay=(self.weight_decay >= 0, f"must be >= 0, got {self.weight_decay}"),
              adam_betas=(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
                          f"must be two numbers in [0, 1), got {self.adam_betas}"),
              max_grad_norm=(self.max_grad_norm >= 0, f"must be >= 0 (0 = no clipping), got {self.max_grad_norm}"),
              beta=(self.beta >= 0, f"must be >= 0, got {self.beta}"),
              clip_eps_low=(0 <= self.clip_eps_low < 1, f"must be in [0, 1), got {self.clip_eps_low}"),
              clip_eps_high=(self.clip_eps_high >= 0, f"must be >= 0, got {self.clip_eps_high}"),
              loss_agg=(self.loss_agg in LOSS_AGGREGATIONS, f"must be one of {', '.join(LOSS_AGGREGATIONS)}, "
                                                            f"got {self.loss_agg!r}"),
              kl_clamp=(self.kl_clamp > 0, f"must be > 0, got {self.kl_clamp}"),
              logprobs=(self.logprobs in ("reference", "fast"), f"must be reference or fast, got {self.logprobs!r}"),
              logprob_chunk_tokens=(self.logprob_chunk_tokens >= 1, f"must be >= 1, got {self.logprob_chunk_tokens}"),
              max_nonfinite_steps=(self.max_nonfinite_steps >= 1, f"must be >= 1, got {self.max_nonfinite_steps}"))


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; the default output folder is runs/<name>."""
    output_dir: str = ""
    """Where the run's files go; empty = runs/<name>."""
    seed: int = 0
    """Seeds data order, sampling and initialisation."""
    eval_every: int = 0
    """Evaluate on the validation prompts every this many steps (0 = only at the end; in SFT, at the end of
    each epoch)."""
    eval_examples: int = 32
    """How many validation prompts each evaluation decodes greedily."""
    eval_batch_size: int = 16
    """Prompts per greedy decoding batch during evaluation."""
    eval_at_start: bool = True
    """Evaluate once before the first update (the untrained baseline of the curve)."""
    save_every: int = 0
    """Save a resumable checkpoint every this many steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (older ones are deleted); 0 = keep all."""
    samples_every: int = 1
    """Write sample completions to samples.jsonl every this many steps."""
    samples_per_step: int = 4
    """How many completions each sample dump holds."""
    resume: str = ""
    """A checkpoint folder to resume from, or `latest` (the newest in this run's folder)."""
    tensorboard: bool = False
    """Also write TensorBoard event files (needs the tensorboard package)."""
    plot: bool = True
    """Redraw curves.png as training goes (matplotlib)."""
    overwrite: bool = False
    """Start over in a folder that already holds a run (its files are deleted). Without it, and without
    `resume`, such a folder is refused: a finished run is never trained over by accident."""

    def __post_init__(self):
        check("run", eval_every=(self.eval_every >= 0, f"must be >= 0, got {self.eval_every}"),
              eval_examples=(self.eval_examples >= 0, f"must be >= 0, got {self.eval_examples}"),
              eval_batch_size=(self.eval_batch_size >= 1, f"must be >= 1, got {self.eval_batch_size}"),
              save_every=(self.save_every >= 0, f"must be >= 0, got {self.save_every}"),
              keep_checkpoints=(self.keep_checkpoints >= 0, f"must be >= 0, got {self.keep_checkpoints}"),
              samples_every=(self.samples_every >= 0, f"must be >= 0, got {self.samples_every}"),
              samples_per_step=(self.samples_per_step >= 0, f"must be >= 0, got {self.samples_per_step}"),
              resume=(self.resume in ("", "latest") or Path(self.resume).is_dir(),
                      f"must be `latest` or an existing checkpoint folder, got {self.resume!r}"),
              overwrite=(not (self.overwrite and self.resume), "and run.resume cannot both be set"))


# ----------------------------------------------------------------------------------------------------
# Loading, overriding, checking, saving
# ----------------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    pass


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert: int -> float, '1e-5' -> float) a value against a type annotation."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
        for option in typing.get_args(tp):
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not a {tp}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls, values: dict, where: str = ""):
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"valid keys{' in ' + where if where else ''}: {', '.join(types_)}")
    kwargs = {k: _coerce(v, types_[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""  # YAML typing: 1e-5 -> float, true -> bool, [a] -> list
    return key.strip().split("."), value


def read_config_values(path: str | Path | None) -> dict:
    """The raw nested mapping of a YAML config file ({} for None), before any checking."""
    if path is None:
        return {}
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return values


def apply_overrides(values: dict, overrides: list[str] | None) -> dict:
    """Apply `key=value` overrides (dotted keys for nested sections) to a raw mapping, in place; returns it."""
    for text in overrides or []:
        keys, value = _parse_override(text)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    return values


def build_config(cls, values: dict):
    """Check a raw nested mapping against `cls` (unknown keys and wrong types are errors) and build it."""
    return _build(cls, values)


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Build `cls` from a YAML file (optional) and `key=value` overrides (dotted for nested sections)."""
    return _build(cls, apply_overrides(read_config_values(path), overrides))


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(config), f, sort_keys=False)


def describe(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, docstring) for every setting, for `--help-config`."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    try:  # field docstrings are the string literal right after each annotated assignment
        body = ast.parse(inspect.getsource(cls)).body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = str(b.value.value)
    except (OSError, TypeError):
        pass
    rows = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((prefix + f.name, repr(default), docs.get(f.name, "")))
    return rows
