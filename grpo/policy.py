"""The policy: the trainable model with what it takes to sample from it, its optional frozen reference,
and its optimizer.

`load_policy` loads the weights (fp32 master weights for training; bf16 compute comes from autocast on
CUDA) and `prepare_training` adds, in order, gradient checkpointing, the KL reference, LoRA adapters and
FSDP2 sharding. `Policy.decode_model` gives the sampler a plain bf16 copy of the weights where one pays.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from grpo import distributed
from grpo.config import ModelConfig
from grpo.distributed import Dist
from grpo.lora import add_lora
from grpo.models import build_random_model, load_model, load_tokenizer, pick_device, pick_dtype


@dataclass
class Policy:
    """The trainable model with everything needed to sample from it and score its completions."""
    model: torch.nn.Module
    tokenizer: object
    eos_ids: list[int]
    pad_id: int
    autocast_dtype: torch.dtype | None  # bf16 compute over fp32 master weights on CUDA, None on CPU
    decode_copy: torch.nn.Module | None = None  # the sampler's plain copy of the weights (see `decode_model`)
    copy_required: bool = False  # sharded or LoRA models cannot be sampled from directly: always the copy
    reference: torch.nn.Module | None = None  # the frozen KL reference (beta > 0, no LoRA)
    dist: Dist = field(default_factory=Dist)
    stale: bool = True  # the decode copy is older than the weights

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def weights_changed(self) -> None:
        """Call after every update: the next generation refreshes the decode copy first."""
        self.stale = True

    def decode_model(self, decode_weights: str = "auto") -> tuple[torch.nn.Module, bool]:
        """The model the sampler runs and whether to run it under autocast (SamplingConfig.decode_weights).
        With fp32 master weights and bf16 autocast, a copy of the weights in bf16 lets the sampler replay its
        decode step as a CUDA graph (autocast casts every weight at every step, outside any graph). A sharded
        model (torchrun) or one with LoRA adapters is always sampled through its copy: the copy is a plain
        Hugging Face model of the full, merged weights, so every rank samples alone, with the fast decoder.
        The copy is refreshed from the weights, parameter by parameter, whenever they have changed."""
        if not self.copy_required and (self.autocast_dtype is None or decode_weights == "master" or (
                self.decode_copy is None and decode_weights == "auto" and not self._copy_fits())):
            return self.model, True
        if self.decode_copy is None:
            self.decode_copy = plain_copy(self.model, self.autocast_dtype)
        if self.stale:  # every rank gets here together: each parameter is an all-gather when sharded
            with torch.no_grad():
                targets = dict(self.decode_copy.named_parameters())
                for name, value in distributed.full_parameters(self.model, next(iter(targets.values())).dtype):
                    targets[name].copy_(value)
            self.stale = False
        return self.decode_copy, False

    def _copy_fits(self) -> bool:
        """`auto`: a CUDA model whose bf16 copy takes under half the free GPU memory."""
        if self.device.type != "cuda":
            return False
        size = sum(p.numel() for p in self.model.parameters()) * torch.finfo(self.autocast_dtype).bits // 8
        return size < 0.5 * torch.cuda.mem_get_info(self.device)[0]


def plain_copy(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A frozen copy of `model` with its parameters in `dtype` (buffers such as the rotary frequencies as they
    are): deepcopy with every parameter already replaced by its cast version, so no second fp32 copy is made."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype or p.dtype), requires_grad=False)
            for p in model.parameters()}
    return copy.deepcopy(model, memo).eval()


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the generation config's (int or list) and the tokenizer's (trap 4)."""
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def load_policy(cfg: ModelConfig, seed: int = 0, for_training: bool = True, dist: Dist = Dist(),
                with_reference: bool = False) -> Policy:
    """Load (or, with `random_init`, build) the model. For training, weights stay fp32 (master weights:
    updates of ~1e-6 relative size vanish in bf16) and bf16 compute comes from autocast on CUDA; then
    `prepare_training` adds what the configuration asks for (reference, LoRA, sharding)."""
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.name_or_path)
    device = pick_device(cfg.device)
    compute_dtype = pick_dtype(cfg.dtype, device)
    weight_dtype = "float32" if for_training else cfg.dtype
    if cfg.random_init:
        specials = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                    "bos_token_id": tokenizer.bos_token_id}
        model = build_random_model(cfg.random_init, vocab_size=len(tokenizer), seed=seed, dtype=weight_dtype,
                                   device=str(device), special_ids=specials)
    else:
        model = load_model(cfg.name_or_path, dtype=weight_dtype, device=str(device))
    use_autocast = for_training and compute_dtype != torch.float32
    policy = Policy(model=model, tokenizer=tokenizer, eos_ids=eos_token_ids(model, tokenizer),
                    pad_id=tokenizer.pad_token_id, autocast_dtype=compute_dtype if use_autocast else None, dist=dist)
    if for_training:
        prepare_training(policy, cfg, dist, with_reference)
    return policy


def prepare_training(policy: Policy, cfg: ModelConfig, dist: Dist, with_reference: bool) -> None:
    """In this order: gradient checkpointing; the KL reference (a frozen copy; with LoRA none is needed: the
    reference is the model with its adapters off); LoRA adapters over bf16 base weights (CUDA); the decode
    copy, taken before adapters or sharding change the model; FSDP2 sharding of model and reference."""
    model, lora = policy.model, cfg.lora.rank > 0
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if with_reference and not lora:
        policy.reference = copy.deepcopy(model).requires_grad_(False).eval()
    if lora and policy.autocast_dtype is not None:
        model.to(policy.autocast_dtype)  # frozen: nothing to update, so no need for fp32 master weights
    if lora or dist.enabled:
        policy.decode_copy, policy.copy_required = plain_copy(model, policy.autocast_dtype), True
    if lora:
        add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
    if dist.enabled:
        distributed.shard_model(model, dist, policy.autocast_dtype, cfg.cpu_offload)
        if policy.reference is not None:
            distributed.shard_model(policy.reference, dist, policy.autocast_dtype)


def make_optimizer(model, lr: float, weight_decay: float, warmup_steps: int, betas=(0.9, 0.999)):
    """AdamW, and a schedule that warms up linearly over `warmup_steps` then stays constant."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    warmup = max(warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    return optimizer, scheduler
