"""LoRA: low-rank adapters on frozen linear layers, written from scratch (Hu et al. 2021, arXiv 2106.09685).

A linear layer computes y = x W^T + b with W of shape (out, in). LoRA freezes W and learns a low-rank update
instead: W' = W + (alpha / r) * B A, with A (r x in) and B (out x r), r << min(in, out). So only
r * (in + out) numbers train per layer, not in * out. B starts at zero, so step 0 is exactly the base model.
The forward pass never builds B A: it adds (alpha / r) * B(A(x)) to the frozen layer's output.

Two things follow, and the trainer relies on both:
  * the KL reference model is the same model with the adapters switched off (`adapters_disabled`), no copy;
  * after training, W + (alpha / r) B A is an ordinary weight: `merged_state_dict` gives a plain Hugging Face
    checkpoint (experiments/export.py), and `save_adapters` / `load_adapters` keep just the small A, B.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ADAPTERS_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
_ADAPTER_NAMES = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """An nn.Linear whose frozen `weight` / `bias` are the very Parameters of the layer it replaces (so the
    state-dict names stay `...q_proj.weight`), plus trainable fp32 adapters `lora_A`, `lora_B`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 16.0, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate and fill a second weight
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in): the same Parameter object, not a copy
        self.register_parameter("bias", base.bias)  # (out,) or None
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        # Adapters in fp32 even over a bf16 base: their updates are tiny and would round away in bf16.
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank  # keeps the update's size roughly independent of r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # active only in train()
        self.adapters_enabled = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float) -> LoRALinear:
        return cls(linear, rank, alpha, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        out = F.linear(x, self.weight, self.bias)  # (..., out)
        if not self.adapters_enabled:
            return out
        A, B = self.lora_A, self.lora_B
        if not torch.is_autocast_enabled(x.device.type):
            # Under autocast F.linear casts its inputs itself; outside it, match x (bf16 x @ fp32 A fails).
            A, B = A.to(x.dtype), B.to(x.dtype)
        update = F.linear(F.linear(self.lora_dropout(x), A), B)  # (..., in) -> (..., r) -> (..., out)
        return out + self.scaling * update

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> list[str]:
    """Replace, in place, every nn.Linear whose attribute name is in `targets` by a LoRALinear, then freeze
    every parameter but the adapters. Returns the names of the replaced modules, sorted."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank} (rank 0 means: no adapters, do not call add_lora)")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = sorted(name for name in linears if name.rsplit(".", 1)[-1] in targets)
    if not chosen:
        raise ValueError(f"no linear module is named one of the LoRA targets {list(targets)}; "
                         f"the linear modules are: {', '.join(linears)}")
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear.from_linear(getattr(parent, child), rank, alpha, dropout))
    for name, param in model.named_parameters():
        param.requires_grad_(name.rsplit(".", 1)[-1] in _ADAPTER_NAMES)
    return chosen


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model inside the block (e.g. the KL reference), the adapted one again after it."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    saved = [m.adapters_enabled for m in layers]
    for m in layers:
        m.adapters_enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(layers, saved):
            m.adapters_enabled = enabled


def merge_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B A, computed in fp32 (a bf16 sum would lose the small update), returned in W's dtype."""
    delta = lora_B.float() @ lora_A.float()  # (out, r) @ (r, in) -> (out, in)
    return (weight.float() + scaling * delta).to(weight.dtype)  # (out, in)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain Hugging Face state dict (the keys the model had before add_lora), adapters merged in."""
    state = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            prefix = f"{name}." if name else ""
            state[prefix + "weight"] = merge_weight(m.weight, m.lora_A, m.lora_B, m.scaling)
            del state[prefix + "lora_A"], state[prefix + "lora_B"]
    return state


def adapter_state_dict(model: nn.Module, gather: bool = True) -> dict[str, torch.Tensor]:
    """Only the adapters, named as in model.named_parameters() (e.g. `model.layers.0.self_attn.q_proj.lora_A`).
    In a sharded model (FSDP2) `gather` makes each one whole, which every rank must then do together."""
    from grpo.distributed import full_tensor

    return {name: full_tensor(p) if gather else p.detach() for name, p in model.named_parameters()
            if name.rsplit(".", 1)[-1] in _ADAPTER_NAMES}


def save_adapters(model: nn.Module, folder: str | Path, lora_cfg, write: bool = True) -> None:
    """Write adapters.safetensors (A and B only: megabytes, not the whole model) and adapter_config.json.
    Under torchrun every rank calls it (the adapters are gathered) and only rank 0 passes write=True."""
    from safetensors.torch import save_file

    tensors = adapter_state_dict(model)
    if not write:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.cpu().contiguous() for name, t in tensors.items()}
    save_file(tensors, str(folder / ADAPTERS_FILE))
    modules = sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))
    config = {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "dropout": lora_cfg.dropout,
              "targets": list(lora_cfg.targets), "modules": modules}
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


@torch.no_grad()
def load_adapters(model: nn.Module, folder: str | Path) -> None:
    """Copy saved adapters into a model that already has adapters of the same names and shapes."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(folder) / ADAPTERS_FILE))
    params = {name: p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in _ADAPTER_NAMES}
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapters in {folder} do not fit the model: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)})")
    for name, p in params.items():
        if saved[name].shape != p.shape:
            raise ValueError(f"adapter {name}: saved shape {tuple(saved[name].shape)}, model has {tuple(p.shape)}")
        p.copy_(saved[name])  # copy_ keeps p's device and dtype
