"""Several processes, one training run: data-parallel GRPO over FSDP2-sharded weights.

Under `torchrun --nproc_per_node N` (one node) or `torchrun --nnodes M --nproc_per_node N --rdzv-endpoint
HOST:PORT ...` (several), every process runs the same loop (grpo.train) on its own share of each step:

    prompts       rank r takes prompts r*B/W .. (r+1)*B/W - 1 of the step's B (W = world size). A group of G
                  completions never spans ranks, so rewards and group-normalised advantages stay local.
    sampling      each rank samples from its own full copy of the weights (the *decode copy*, bf16 on CUDA),
                  refreshed from the shards before each generation, parameter by parameter. Ranks then
                  generate for as long as they need without talking to each other.
    the loss      every rank divides by the counts of the WHOLE step (tokens, sequences), all-reduced, and the
                  gradients are summed (not averaged) across ranks: the update is the one a single process
                  would make on the whole batch.
    the weights   fp32 master weights, their gradients and AdamW state are split across ranks with FSDP2
                  (`fully_shard`): each decoder layer is one unit, the rest (embeddings, final norm, LM head)
                  the root. While a unit runs, its full parameters are all-gathered (in bf16 on CUDA).

One process without torchrun never enters this module's collective code: `Dist()` is world size 1 and every
helper below is then the identity.
"""
from __future__ import annotations

import os
import types
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    """Who this process is. World size 1 (the default) means: no process group, no communication."""
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # where collectives run: cuda for NCCL, cpu for gloo

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: float | torch.Tensor) -> float:
        """The sum of a number over all ranks."""
        if not self.enabled:
            return float(value)
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return float(t)

    def all_max(self, value: int) -> int:
        if not self.enabled:
            return int(value)
        t = torch.tensor(int(value), dtype=torch.int64, device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return int(t)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (same shape on each), concatenated along dim 0 in rank order, on t's device."""
        if not self.enabled:
            return t
        local = t.detach().to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, local)
        return torch.cat(parts).to(t.device)  # (W * n, ...)

    def gather_objects(self, items: list) -> list[list]:
        """Every rank's list of picklable objects, as a list indexed by rank."""
        if not self.enabled:
            return [items]
        out: list = [None] * self.world_size
        torch_dist.all_gather_object(out, items)
        return out

    def unshare(self, mine: list, n_total: int) -> list:
        """Undo `items[rank::world_size]`: every rank's part merged back into the original order."""
        if not self.enabled:
            return mine
        parts = self.gather_objects(mine)
        return [parts[i % self.world_size][i // self.world_size] for i in range(n_total)]

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


def setup() -> Dist:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT); without torchrun, a world of one. NCCL on CUDA (one GPU per local rank), gloo else."""
    if not torch_dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return Dist()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # `cuda` now means this rank's GPU
        torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    # (a test, or an outer program, may have joined the group itself)
    nccl = torch_dist.get_backend() == "nccl"
    return Dist(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(),
                device=f"cuda:{torch.cuda.current_device()}" if nccl else "cpu")


def teardown() -> None:
    """Leave the process group (the end of a torchrun entry point); nothing without one."""
    if torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def rank_share(n_total: int, dist: Dist, setting: str) -> slice:
    """This rank's consecutive share of `n_total` things; an error naming `setting` if they do not divide."""
    if n_total % dist.world_size:
        raise ValueError(f"{setting}={n_total} does not divide among {dist.world_size} processes: "
                         f"make it a multiple of {dist.world_size}")
    share = n_total // dist.world_size
    return slice(dist.rank * share, (dist.rank + 1) * share)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of one rank at one step: a pure function of (seed, step, rank), so a run is
    reproducible for a given world size, and resuming needs no generator state."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def equalize_micro_batches(batches: list[slice], count: int) -> list[slice]:
    """Split the largest micro-batches in two until there are `count` of them.

    Under FSDP every forward and backward is a collective, so every rank must run the same number of
    micro-batches. Token-budget planning can give ranks different counts; splitting a batch never exceeds
    its budget, and is always possible since a rank holds at least `count` rows (the max over ranks)."""
    batches = list(batches)
    while len(batches) < count:
        i = max(range(len(batches)), key=lambda j: batches[j].stop - batches[j].start)
        s = batches[i]
        if s.stop - s.start < 2:
            raise ValueError(f"cannot split {len(batches)} micro-batches into {count}")
        mid = (s.start + s.stop) // 2
        batches[i:i + 1] = [slice(s.start, mid), slice(mid, s.stop)]
    return batches


# ----------------------------------------------------------------------------------------------------
# Sharding, and the full weights back from the shards
# ----------------------------------------------------------------------------------------------------
def shard_model(model: torch.nn.Module, dist: Dist, compute_dtype: torch.dtype | None = None,
                cpu_offload: bool = False) -> torch.nn.Module:
    """FSDP2 over all ranks: each decoder layer one unit, then the root. Parameters stay fp32 (the master
    weights); with `compute_dtype` (bf16 on CUDA) they are all-gathered and computed in that dtype, while
    gradients are reduced in fp32. Gradients are summed across ranks: the loss is already divided by the
    whole step's counts. One mesh over every rank of every node."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(torch.device(dist.device).type, (dist.world_size,))
    options = {"mesh": mesh}
    if compute_dtype is not None and compute_dtype != torch.float32:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    units = [*model.get_decoder().layers, model]
    for unit in units:
        fully_shard(unit, **options)
        unit.set_gradient_divide_factor(1.0)  # sum, don't average: see the docstring
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    # Completions are scored by grpo.logprobs, not model.forward: `call` runs a scorer as a registered forward
    # method, which gathers the root's parameters (embeddings, norm, LM head) as forward would.
    model.fsdp_call = types.MethodType(_apply, model)
    register_fsdp_forward_method(model, "fsdp_call")
    return model


def _apply(model, fn, *args, **kwargs):
    return fn(model, *args, **kwargs)


def call(fn, model, *args, **kwargs):
    """fn(model, *args, **kwargs); for a model sharded by `shard_model`, inside FSDP's forward hooks, so the
    parameters that live outside the decoder layers are gathered for it (and their gradients reduced)."""
    if not hasattr(model, "fsdp_call"):
        return fn(model, *args, **kwargs)
    out = model.fsdp_call(fn, *args, **kwargs)
    if not torch.is_grad_enabled():  # FSDP keeps the root gathered for a backward; none will come
        model.reshard()
    return out


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A parameter as one whole tensor. A shard is cast to `dtype` BEFORE the all-gather: bf16 moves half the
    bytes of fp32, and the full fp32 tensor is never built."""
    from torch.distributed.tensor import DTensor

    t = t.detach()
    if dtype is not None:
        t = t.to(dtype)
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def full_parameters(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) for every parameter of the plain Hugging Face model: shards gathered, LoRA adapters
    merged into their base weights (names as before `add_lora`). Every rank must iterate it to the end
    (each parameter is an all-gather). Tied parameters come once, under their first name."""
    from grpo.lora import LoRALinear, merge_weight

    seen = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or (isinstance(module, LoRALinear) and name in ("lora_A", "lora_B")):
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{name}" if module_name else name
            if isinstance(module, LoRALinear) and name == "weight" and module.adapters_enabled:
                weight = merge_weight(full_tensor(param), full_tensor(module.lora_A), full_tensor(module.lora_B),
                                      module.scaling)  # (out, in)
                yield full_name, weight if dtype is None else weight.to(dtype)
            else:
                yield full_name, full_tensor(param, dtype)
