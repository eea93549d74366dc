"""Checkpoints: write, find, prune, resume. One folder per step, `checkpoints/step_N/`, holding

    model.safetensors + config.json + tokenizer   the whole model in Hugging Face format (from_pretrained
                                                  loads it), consolidated from the shards under torchrun
    adapters.safetensors + adapter_config.json    instead of the model, with LoRA: the adapters alone
                                                  (`python -m experiments.export` merges them)
    trainer_state.pt                              step, learning-rate schedule, RNG states; in one process
                                                  also the optimizer state
    optimizer/                                    under torchrun: the sharded AdamW state, written by every
                                                  rank with torch.distributed.checkpoint (DCP), which can
                                                  load it back onto a different number of ranks

A checkpoint is written into `step_N.partial`, its files flushed to disk (fsync), and renamed when complete,
so a folder named `step_N` is always whole; leftovers of a write that was killed are ignored and removed.
Weights that are not finite are never written. Resuming restores weights, optimizer, schedule and RNGs: the continued run equals an uninterrupted one
(sampling seeds are a function of (seed, step, rank): grpo.distributed.step_seed).
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from grpo.distributed import Dist, full_parameters, is_sharded
from grpo.lora import ADAPTERS_FILE, adapter_state_dict, has_lora, save_adapters

TRAINER_STATE = "trainer_state.pt"
OPTIMIZER_DIR = "optimizer"


def step_of(folder: Path) -> int | None:
    """N for a folder named step_N, else None (`step_5.partial`, `best`, stray files)."""
    prefix, _, number = folder.name.partition("_")
    return int(number) if prefix == "step" and number.isdigit() else None


def find_latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint of the highest step in `run_dir/checkpoints`, or None."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob("step_*")
             if step_of(p) is not None and (p / TRAINER_STATE).exists()]
    return max(found, key=step_of) if found else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the `keep` newest step checkpoints (keep <= 0 deletes none), and the leftovers of
    interrupted writes (`*.partial`)."""
    folder = Path(run_dir) / "checkpoints"
    found = sorted((p for p in folder.glob("step_*") if step_of(p) is not None), key=step_of)
    for old in [*(found[:-keep] if keep > 0 else []), *folder.glob("*.partial")]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of `folder`, and the folder itself, to disk before it is renamed into place."""
    for path in [*folder.rglob("*"), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def assert_finite(model: torch.nn.Module, dist: Dist = Dist()) -> None:
    """Refuse to save weights holding NaN or inf (every rank checks its shards; all must agree)."""
    bad = sum(int(not torch.isfinite(p.detach().to_local() if hasattr(p, "to_local") else p.detach()).all())
              for p in model.parameters())
    if dist.all_sum(bad) > 0:
        raise FloatingPointError("the weights hold NaN or inf: no checkpoint written (the learning rate is the "
                                 "usual cause: lower grpo.lr / sft.lr)")


def save_weights(folder: Path, policy, dist: Dist = Dist(), lora_cfg=None) -> None:
    """The model (or its adapters) and the tokenizer into `folder`. Every rank must call it: gathering the
    shards is collective. Only rank 0 writes."""
    model = policy.model
    if has_lora(model):
        save_adapters(model, folder, lora_cfg, write=dist.is_main)
    elif is_sharded(model):
        state = {name: t.cpu() for name, t in full_parameters(model)}  # one all-gather per parameter
        if dist.is_main:
            model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    elif dist.is_main:
        model.save_pretrained(folder, safe_serialization=True)
    if dist.is_main:
        policy.tokenizer.save_pretrained(folder)


def save_checkpoint(path: Path, policy, optimizer=None, scheduler=None, step: int = 0, dist: Dist = Dist(),
                    lora_cfg=None, loop_state: dict | None = None) -> None:
    """Write `path` (a step folder; without an optimizer, weights only: e.g. SFT's `best`). Every rank calls it.
    `loop_state`: what else the loop needs to continue exactly (SFT: its early-stopping record); `resume_run`
    gives it back."""
    assert_finite(policy.model, dist)
    tmp = path.with_name(path.name + ".partial")
    if dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_weights(tmp, policy, dist, lora_cfg)
    if optimizer is not None:
        state = {"step": step, "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "python_rng": random.getstate(), "loop": dict(loop_state or {})}
        if dist.enabled:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            dcp.save({"optimizer": get_optimizer_state_dict(policy.model, optimizer)},
                     checkpoint_id=str(tmp / OPTIMIZER_DIR))
        else:
            state["optimizer"] = optimizer.state_dict()
        if dist.is_main:
            torch.save(state, tmp / TRAINER_STATE)
    dist.barrier()  # every rank's optimizer shard is written
    if dist.is_main:
        _fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)  # a checkpoint folder either is complete or does not exist
    dist.barrier()


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Weights (or LoRA adapters) from a checkpoint folder into `model`, sharded or not."""
    from safetensors.torch import load_file

    adapters = ckpt / ADAPTERS_FILE
    files = [adapters] if adapters.exists() else sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt} holds no *.safetensors weights")
    weights = {}
    for file in files:
        weights.update(load_file(str(file)))
    if has_lora(model) != adapters.exists():
        raise RuntimeError(f"checkpoint {ckpt} {'holds LoRA adapters' if adapters.exists() else 'holds a whole model'}"
                           f" but the run is configured {'with' if has_lora(model) else 'without'} LoRA (model.lora.rank)")
    expected = set(adapter_state_dict(model, gather=False) if has_lora(model) else model.state_dict())
    # tied embeddings are saved once; anything else missing means a different architecture
    missing = sorted(k for k in expected - set(weights) if "lm_head" not in k)
    unexpected = sorted(set(weights) - expected)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if is_sharded(model):  # each rank keeps its shard of the whole tensors
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(weights, strict=False)


def resume(ckpt: Path, policy, optimizer, scheduler, dist: Dist = Dist()) -> tuple[int, dict]:
    """Restore a checkpoint into a freshly built policy and optimizer; returns the step to continue from and
    the loop state saved with it."""
    load_weights(ckpt, policy.model)
    policy.weights_changed()
    state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)
    if (ckpt / OPTIMIZER_DIR).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        optim_state = {"optimizer": get_optimizer_state_dict(policy.model, optimizer)}
        dcp.load(optim_state, checkpoint_id=str(ckpt / OPTIMIZER_DIR))  # re-sharded to this world size
        set_optimizer_state_dict(policy.model, optimizer, optim_state["optimizer"])
    elif dist.enabled:
        raise RuntimeError(f"{ckpt} was written by one process (its optimizer state is not sharded): resume it "
                           "without torchrun, or start a new run from its weights (model.name_or_path)")
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return int(state["step"]), state.get("loop", {})


def resume_run(setting: str, run_dir: Path, policy, optimizer, scheduler, log) -> tuple[int, dict]:
    """`run.resume` (`latest` or a checkpoint folder; empty = a new run): restore weights, optimizer and
    schedule, drop the metrics `log` (a grpo.runlog.RunLog) holds after the checkpoint, and return the step to
    continue from and the checkpoint's loop state; else (0, {})."""
    if not setting:
        return 0, {}
    ckpt = find_latest_checkpoint(run_dir) if setting == "latest" else Path(setting)
    if ckpt is None:
        log.truncate_after(-1)  # killed before its first checkpoint: its metrics start over with it
        log.print(f"run.resume=latest: no checkpoint in {run_dir / 'checkpoints'}, starting from step 0")
        return 0, {}
    step, loop_state = resume(ckpt, policy, optimizer, scheduler, policy.dist)
    log.truncate_after(step)
    log.print(f"resumed from {ckpt} at step {step}")
    return step, loop_state
