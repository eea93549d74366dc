"""`python -m experiments.bench`: our sampler against Hugging Face `generate`, and one GRPO update, on one model.

In one process, on the same model, prompts, batch, lengths and sampling settings (temperature 1, full
vocabulary), it times:

  sampler     ours (grpo.sampler.sample: prefix sharing, preallocated KV slots, CUDA graphs on CUDA), and on
              CUDA ours with graphs off; Hugging Face `generate` with its default (dynamic) cache and with
              cache_implementation="static" (which compiles the forward on CUDA: its first call is reported
              apart). Tokens per second = rows x new tokens / seconds (median of the timed runs); every row
              generates exactly max_new_tokens (EOS ignored by ours, suppressed by HF's min_new_tokens), so
              every mode does the same work. The ratio is ours / the faster HF mode.
  log-probs   the sampler's log-probs against the training forward (grpo.policy.completion_logprobs) on the
              same tokens (max abs difference), next to a calibration: the same comparison for Hugging Face's
              own cached decode (its forward and DynamicCache, one token per call as `generate` runs it,
              teacher-forced on the same tokens). Two correct decoders differ from the full forward only by
              rounding, so ours passes when its difference is <= max(dtype tolerance, 1.5 x HF's own).
  decode step on CUDA: one captured decode step alone (ms per step, CUDA events over replays) and one layer's
              attention at that shape under each SDPA backend (which one SDPA picks; ms per call).
  update      one GRPO update (forward, backward, clip, AdamW step) on a synthetic rollout, with our memory
              measures on (log-probs in chunks at completion positions only, gradient checkpointing,
              micro-batches by a token budget) and off (one pass, full fp32 logits of every position):
              tokens/s and peak memory (CUDA: max_memory_allocated; CPU: growth of the resident set).

Presets (docs/performance.md): `cpu` (the default SmolLM2-135M-Instruct, fp32, G = 8 completions of one
512-token prompt, 256 new tokens), `gpu-small` (random weights of SmolLM2-135M's shape, bf16, 256 rows) and
`gpu-7b` (random weights of Qwen2.5-7B-Instruct's shape, bf16, 64 rows, 512-token prompts, 256 new tokens;
update 8 x 1024 tokens). `--quick` shrinks any preset to a tiny random model for a test. Every figure goes to
a JSON file (default runs/bench/<preset>.json), rewritten after each stage so a crash keeps what was measured.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import resource
import signal
import statistics
import threading
import time
from pathlib import Path

import torch

from grpo.config import GRPOConfig
from grpo.models import build_random_model, load_model, pick_device
from grpo.functional import grpo_loss
from grpo.logprobs import build_inputs, completion_logprobs, completion_logprobs_fast
from grpo.fast import sample
from grpo.batching import plan_micro_batches

SMOLLM2_135M = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, vocab_size=49152)
QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False, vocab_size=152064)
TINY = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, vocab_size=256)

PRESETS = {
    "cpu": dict(model="default", shape=None, dtype="float32", device="cpu", prompts=1, group_size=8,
                prompt_tokens=512, new_tokens=256, reps=3,
                train_prompts=1, train_group=8, train_prompt_tokens=512, train_completion_tokens=256,
                micro_batch_tokens=3072, train_weights="float32", naive_checkpointing=False,
                target_ratio=2.0, target_train_gib=None),
    "gpu-small": dict(model="random", shape=SMOLLM2_135M, dtype="bfloat16", device="cuda", prompts=32, group_size=8,
                      prompt_tokens=512, new_tokens=256, reps=3,
                      train_prompts=4, train_group=8, train_prompt_tokens=512, train_completion_tokens=512,
                      micro_batch_tokens=8192, train_weights="float32+autocast", naive_checkpointing=False,
                      target_ratio=3.0, target_train_gib=12.0),
    "gpu-7b": dict(model="random", shape=QWEN25_7B, dtype="bfloat16", device="cuda", prompts=8, group_size=8,
                   prompt_tokens=512, new_tokens=256, reps=2,
                   train_prompts=1, train_group=8, train_prompt_tokens=512, train_completion_tokens=512,
                   micro_batch_tokens=4096, train_weights="bfloat16", naive_checkpointing=True,
                   target_ratio=3.0, target_train_gib=None),
}
# HF generate on an H200 (torch 2.11, transformers 5.17), random weights, 512-token prompts, 256 new tokens:
# the figures of issue 6, for comparison with a run on another machine.
ANCHORS = {
    "gpu-small": {"hf_dynamic_tokens_per_s": 12519, "hf_static_tokens_per_s": 19520, "hf_static_first_call_s": 44,
                  "naive_update_peak_gib": 47.5},
    "gpu-7b": {"hf_dynamic_tokens_per_s": 2833, "hf_static_tokens_per_s": 1535, "hf_static_first_call_s": 153,
               "decode_floor_tokens_per_s": 14900, "naive_update_peak_gib": 63.6},
}
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.05}


class StageTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise StageTimeout in the main thread after `seconds` (no limit where SIGALRM is unavailable)."""
    usable = seconds > 0 and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise StageTimeout(f"over the {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every few milliseconds (CPU)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the lifetime peak is all there is
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _watch(self):
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        gc.collect()
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {"host": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=gib(props.total_memory), cuda=torch.version.cuda,
                    gpu_count=torch.cuda.device_count())
    try:
        with open("/proc/meminfo") as f:
            info["ram_gib"] = gib(int(f.readline().split()[1]) * 1024)
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------------------------------------------
# The model and the prompts
# ----------------------------------------------------------------------------------------------------------------
def build_model(settings: dict, device: torch.device):
    if settings["model"] == "random":
        shape = dict(settings["shape"])
        vocab = shape.pop("vocab_size")
        return build_random_model(shape, vocab_size=vocab, seed=settings["seed"], dtype=settings["dtype"],
                                  device=str(device), special_ids={"pad_token_id": 0, "eos_token_id": 1,
                                                                   "bos_token_id": 1})
    return load_model(settings["model"], dtype=settings["dtype"], device=str(device))


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Token ids drawn uniformly from the vocabulary past its first 32 ids (where special tokens live)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, vocab, (n, length), generator=g).tolist()


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------
def timed(fn, reps: int, device: torch.device) -> tuple[list[float], object]:
    seconds, result = [], None
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds, result


def mode_result(seconds: list[float], tokens: int, device: torch.device, **extra) -> dict:
    median = statistics.median(seconds)
    out = {"status": "ok", "seconds": [round(s, 4) for s in seconds], "tokens": tokens,
           "tokens_per_s": round(tokens / median, 1), **extra}
    if device.type == "cuda":
        out["peak_gib"] = gib(torch.cuda.max_memory_allocated(device))
    return out


def ours_sample_fn(model, prompts, s: dict, device, cuda_graphs: bool | None, seed: int,
                   decode_options: dict | None = None):
    T, G = s["new_tokens"], s["group_size"]
    sync_every = 1 if device.type == "cpu" else 8

    def run(new_tokens=T):
        gen = torch.Generator(device=device).manual_seed(seed)
        return sample(model, prompts, group_size=G, max_new_tokens=new_tokens, eos_ids=[], pad_id=0,
                      temperature=1.0, generator=gen, sync_every=sync_every, cuda_graphs=cuda_graphs,
                      decode_options=decode_options)

    return run, len(prompts) * G * T


def bench_ours(model, prompts, s: dict, device, cuda_graphs: bool | None, seed: int,
               decode_options: dict | None = None):
    T, G = s["new_tokens"], s["group_size"]
    run, _ = ours_sample_fn(model, prompts, s, device, cuda_graphs, seed, decode_options)
    # warm-up: kernels, lazy inits and, on CUDA, at full length so the allocator's blocks exist (steady state)
    run() if device.type == "cuda" else run(min(T, 8))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, rollout = timed(run, s["reps"], device)
    assert rollout.completion_ids.shape == (len(prompts) * G, T)
    return mode_result(seconds, len(prompts) * G * T, device), rollout


def hf_generate_fn(model, prompts, s: dict, device, static: bool):
    G, T = s["group_size"], s["new_tokens"]
    input_ids = torch.tensor(prompts, device=device).repeat_interleave(G, dim=0)  # (N, P): G copies of each
    attention_mask = torch.ones_like(input_ids)
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    if getattr(model.generation_config, "eos_token_id", None) is not None:
        kwargs["min_new_tokens"] = T  # every row runs to the end, as ours does with eos_ids=[]
    if static:
        kwargs["cache_implementation"] = "static"

    def run(new_tokens=T):
        if "min_new_tokens" in kwargs:
            kwargs["min_new_tokens"] = new_tokens
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, **kwargs)
        assert out.shape[1] - input_ids.shape[1] == new_tokens, "HF generate stopped early"
        return out

    return run, input_ids.shape[0] * T


def bench_hf(model, prompts, s: dict, device, static: bool, limit_s: float) -> dict:
    run, tokens = hf_generate_fn(model, prompts, s, device, static)
    start = time.perf_counter()
    try:
        with time_limit(limit_s):
            extra = {}
            if static:  # the first call compiles on CUDA (and sizes the cache): timed apart, at full length
                sync(device)
                t0 = time.perf_counter()
                run()
                sync(device)
                extra["first_call_s"] = round(time.perf_counter() - t0, 2)
            else:
                # warm-up; on CUDA at full length: the first full call grows the allocator's blocks (not steady)
                run() if device.type == "cuda" else run(min(s["new_tokens"], 8))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds, _ = timed(run, s["reps"], device)
    except StageTimeout as err:
        _reset_compiler()
        return {"status": "skipped", "reason": f"time limit: {err} (set --hf-timeout)",
                "elapsed_s": round(time.perf_counter() - start, 1)}
    except Exception as err:  # unsupported here (e.g. no compiler for torch.compile): say so, carry on
        _reset_compiler()
        return {"status": "failed", "reason": f"{type(err).__name__}: {str(err)[:300]}"}
    return mode_result(seconds, tokens, device, **extra)


def paired_ratio(model, prompts, s: dict, device, hf_static: bool, rounds: int) -> dict:
    """Our sampler and one HF mode timed back to back, `rounds` times: a ratio per round, and their median.
    On a shared machine whose speed drifts over minutes, modes timed one after another can land in different
    phases; a pair run seconds apart sees the same one."""
    ours_run, ours_tokens = ours_sample_fn(model, prompts, s, device, None, s["seed"])
    hf_run, hf_tokens = hf_generate_fn(model, prompts, s, device, hf_static)
    ours_s, hf_s, ratios = [], [], []
    for _ in range(rounds):
        a = timed(ours_run, 1, device)[0][0]
        b = timed(hf_run, 1, device)[0][0]
        ours_s.append(round(a, 4))
        hf_s.append(round(b, 4))
        ratios.append(round((ours_tokens / a) / (hf_tokens / b), 3))
    return {"baseline": "hf_static" if hf_static else "hf_dynamic", "rounds": rounds, "ours_seconds": ours_s,
            "hf_seconds": hf_s, "ratios": ratios, "median_ratio": round(statistics.median(ratios), 2)}


def _reset_compiler():
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def hf_cached_logprobs(model, prompt_ids, prompt_mask, completion_ids) -> torch.Tensor:
    """log p(completion token t) from Hugging Face's own decode path: its forward with a DynamicCache, one token
    per call (what `generate` runs), teacher-forced on the given tokens; temperature 1. (N, T) float32."""
    from grpo.fast.decode import HFDecoder

    N, T = completion_ids.shape
    decoder = HFDecoder(model, "dynamic", prompt_ids.shape[1], T)
    logits = decoder.prefill(prompt_ids, prompt_mask, 1, T)  # (N, V)
    position = prompt_mask.sum(-1)  # (N,) the position of completion token 0
    out = torch.zeros((N, T), dtype=torch.float32, device=completion_ids.device)  # (N, T)
    for t in range(T):
        token = completion_ids[:, t]  # (N,)
        out[:, t] = torch.log_softmax(logits.float(), -1).gather(-1, token[:, None]).squeeze(-1)
        if t + 1 < T:
            logits = decoder.step(token, position + t, t)  # (N, V)
    decoder.close()
    return out


@torch.no_grad()
def logprob_check(model, rollout, rows: int = 16, calibrate: bool = True) -> dict:
    """The sampler's log-probs against the training forward on the same tokens (docs/grpo.md trap 1), calibrated
    by Hugging Face's own cached decode against the same training forward on the same rows.

    A decode step and a full forward run different kernels (other matmul shapes, another attention kernel),
    so in bf16 they differ by rounding that grows with depth and with the size of the activations: a fixed
    tolerance cannot tell that from a bug on a 28-layer random model. HF's cached decode is a reference that
    has only rounding differences; ours passes when it is within max(tolerance, 1.5 x HF's difference)."""
    sel = slice(0, min(rows, rollout.completion_ids.shape[0]))
    prompt_ids, prompt_mask = rollout.prompt_ids[sel], rollout.prompt_mask[sel]
    completion_ids, completion_mask = rollout.completion_ids[sel], rollout.completion_mask[sel]
    train = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)  # (n, T)
    mask = completion_mask.bool()
    ours = rollout.logp[sel]

    def stats(a, b):
        d = (a[mask] - b[mask]).abs()
        return float(d.max()), float(d.mean())

    diff, mean = stats(ours, train)
    dtype = next(model.parameters()).dtype
    tolerance = TOLERANCE.get(dtype, 0.1)
    out = {"rows": sel.stop, "tokens": int(mask.sum()), "dtype": str(dtype).replace("torch.", ""),
           "max_abs_diff": diff, "mean_abs_diff": mean, "tolerance": tolerance}
    threshold = tolerance
    if calibrate:
        start = time.perf_counter()
        hf = hf_cached_logprobs(model, prompt_ids, prompt_mask, completion_ids)  # (n, T)
        hf_diff, hf_mean = stats(hf, train)
        ours_hf, ours_hf_mean = stats(ours, hf)
        threshold = max(tolerance, 1.5 * hf_diff)
        out.update(hf_cached_max_abs_diff=hf_diff, hf_cached_mean_abs_diff=hf_mean,
                   ours_vs_hf_cached_max_abs_diff=ours_hf, ours_vs_hf_cached_mean_abs_diff=ours_hf_mean,
                   calibration_s=round(time.perf_counter() - start, 1))
    rule = ("ours vs training <= max(tolerance, 1.5 x HF cached vs training)" if calibrate
            else "ours vs training <= tolerance (no calibration run)")
    out.update(threshold=threshold, rule=rule, within_tolerance=diff <= threshold)
    return out


def logprob_lines(lc: dict) -> list[str]:
    lines = [f"  log-probs vs the training forward ({lc['rows']} rows, {lc['dtype']}): ours max abs diff "
             f"{lc['max_abs_diff']:.3g} (mean {lc['mean_abs_diff']:.2g})"]
    if "hf_cached_max_abs_diff" in lc:
        lines.append(f"    HF cached decode (DynamicCache) vs the training forward: max "
                     f"{lc['hf_cached_max_abs_diff']:.3g} "
                     f"(mean {lc['hf_cached_mean_abs_diff']:.2g}); ours vs HF cached: max "
                     f"{lc['ours_vs_hf_cached_max_abs_diff']:.3g} (mean {lc['ours_vs_hf_cached_mean_abs_diff']:.2g})")
    lines.append(f"    rule: {lc['rule']} = {lc['threshold']:.3g} (tolerance {lc['tolerance']:g}): "
                 f"{'ok' if lc['within_tolerance'] else 'EXCEEDED'}")
    return lines


@contextlib.contextmanager
def probe_errors(out: dict):
    """A probe's failure goes into its `error` field, never the reason a bench fails; its memory is freed."""
    try:
        yield
    except Exception as err:  # noqa: BLE001
        out["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def first_step(model, prompts, s: dict, device, cuda_graphs: bool | None, **options):
    """Our decoder on the preset's prompts, prefilled, after its first step (the one that captures the graph):
    (decoder, token (N,), position (N,)), tokens and positions to feed it again; (decoder, None, None) where
    the engine is not a SlotDecoder (nothing run)."""
    from grpo.fast.decode import SlotDecoder, make_decoder
    from grpo.sampler import left_pad

    G, T = s["group_size"], s["new_tokens"]
    ids, mask = left_pad(prompts, 0, device)
    decoder = make_decoder(model, "static", ids.shape[1], T, cuda_graphs, **options)
    if not isinstance(decoder, SlotDecoder):
        return decoder, None, None
    logits = decoder.prefill(ids, mask, G, T)  # (N, V)
    token, position = logits.argmax(-1), mask.sum(-1).repeat_interleave(G)  # (N,), (N,)
    decoder.step(token, position, 0)
    sync(device)
    return decoder, token, position


def decode_probe(model, prompts, s: dict, device, replays: int = 32) -> dict:
    """CUDA: time the decode step alone and one layer's attention at the sampler's shape, to show where a step's
    time goes (the sampler's ms per step minus this step's is what the sampling loop costs outside the graph)."""
    out: dict = {}
    with probe_errors(out):
        decoder, token, position = first_step(model, prompts, s, device, None)
        out.update(decoder=type(decoder).__name__, graphs=decoder.uses_graphs,
                   stacked_weights=getattr(decoder, "stack", False),
                   fused_ops=getattr(decoder, "_fused", None) is not None)
        if token is None:
            return out
        steps = min(replays, s["new_tokens"] - 1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for t in range(1, steps + 1):
            decoder.step(token, position + t, t)
        end.record()
        sync(device)
        out["step_ms"] = round(start.elapsed_time(end) / steps, 3)
        # full slot cache: (N, h, L, d), (N, 1, 1, L); grid cache: (B, h, S, d), (B, 1, G * r, S)
        keys, values, attn_mask = decoder.keys[0], decoder.values[0], decoder.mask
        n, h, L, d = keys.shape
        heads_per_kv = model.config.num_attention_heads // model.config.num_key_value_heads
        r = attn_mask.shape[2] if decoder.grid else heads_per_kv  # query positions per cache row and head
        kv_bytes = 2 * keys.numel() * keys.element_size() * len(decoder.keys)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if not getattr(model.config, "tie_word_embeddings", False):  # a step reads n rows of the input embedding
            embed = model.get_input_embeddings().weight
            weight_bytes -= embed.numel() * embed.element_size()
        out.update(rows=token.shape[0], cache_batch=n, cache_slots=L, layers=len(decoder.keys),
                   grid_cache=decoder.grid,
                   gib_read_per_step={"weights": gib(weight_bytes), "kv_cache": gib(kv_bytes)})
        out["attention"] = attention_probe(n, h, r, L, d, keys, values, attn_mask, len(decoder.keys))
        decoder.close()
    return out


def step_profile(model, prompts, s: dict, device, steps: int = 4) -> dict:
    """CUDA: the GPU time of eager decode steps (the CUDA defaults, fused ops included) by kernel, from
    torch.profiler: totals per kind (matmul, attention, other) and the kernels that take the most, per step.
    Eager launches show each kernel's own time, which a graph replay runs with fewer gaps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    out: dict = {}
    with probe_errors(out):
        decoder, token, position = first_step(model, prompts, s, device, False, fused_ops=True)  # as in graphs
        if token is None:
            out["decoder"] = type(decoder).__name__
            return out
        out.update(grid_cache=decoder.grid, stacked_weights=decoder.stack, fused_ops=decoder._fused is not None)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for t in range(1, steps + 1):
                decoder.step(token, position + t, t)
            sync(device)
        kernels: dict[str, list] = {}
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                entry = kernels.setdefault(event.name, [0, 0.0])
                entry[0] += 1
                entry[1] += event.time_range.elapsed_us()
        kinds = {"attention": 0.0, "matmul": 0.0, "other": 0.0}
        for name, (_, us) in kernels.items():
            low = name.lower()
            kind = "attention" if any(k in low for k in ("sdpa", "fmha", "flash", "attention", "attn")) else \
                "matmul" if any(k in low for k in ("gemm", "gemv", "cutlass", "xmma", "cublas", "nvjet")) else "other"
            kinds[kind] += us
        top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]
        out.update(steps=steps, ms_per_step={k: round(v / steps / 1000, 3) for k, v in kinds.items()},
                   kernels_per_step=round(sum(c for c, _ in kernels.values()) / steps, 1),
                   top=[{"name": name[:90], "calls_per_step": round(c / steps, 1),
                         "ms_per_step": round(us / steps / 1000, 3)} for name, (c, us) in top])
        decoder.close()
    return out


def attention_probe(n, h, r, L, d, keys, values, attn_mask, layers: int, calls: int = 20) -> dict:
    """One layer's decode attention (queries (n, h, r, d) over the (n, h, L, d) cache with the additive mask;
    with the grid cache n is the prompts and r their rows' G x r query heads per key/value head) under each SDPA
    backend, and a plain matmul-softmax-matmul: ms per call, and per step (x layers)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn((n, h, r, d), device=keys.device, dtype=keys.dtype)
    scale = d ** -0.5
    out = {"shape": {"cache_batch": n, "kv_heads": h, "queries_per_kv_head": r, "slots": L, "head_dim": d}}
    try:
        names = {int(b.value): name for name, b in SDPBackend.__members__.items()}
        out["sdpa_picks"] = names.get(int(torch._fused_sdp_choice(q, keys, values, attn_mask, 0.0, False)), "?")
    except Exception as err:  # noqa: BLE001
        out["sdpa_picks"] = f"unknown ({type(err).__name__})"

    def plain():
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scale + attn_mask  # (n, h, r, L)
        return torch.matmul(torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype), values)

    candidates = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                  "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH, "plain_matmul_softmax": "plain"}
    for name, backend in candidates.items():
        try:
            if backend == "plain":
                fn = plain
            else:
                def fn(backend=backend):
                    ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
                    with ctx:
                        return F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, scale=scale)
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / calls
            out[name] = {"ms_per_call": round(ms, 4), "ms_per_step": round(ms * layers, 3)}
        except Exception as err:  # noqa: BLE001 - that backend cannot run this shape here
            out[name] = {"error": f"{type(err).__name__}: {str(err)[:120]}"}
    return out


def probe_lines(probe: dict, ours: dict, s: dict) -> list[str]:
    if "step_ms" not in probe:
        return [f"  decode step probe: {probe.get('error', probe)}"]
    total_ms = 1000 * statistics.median(ours["seconds"]) / s["new_tokens"] if ours.get("seconds") else float("nan")
    lines = [f"  decode step alone ({'graph replay' if probe['graphs'] else 'eager'}, {probe['rows']} rows): "
             f"{probe['step_ms']:.2f} ms; the sampler's whole step (prefill and capture included): "
             f"{total_ms:.2f} ms; "
             f"read per step: {probe['gib_read_per_step']}"]
    att = probe.get("attention", {})
    timings = ", ".join(f"{k} {v['ms_per_step']:.2f}" for k, v in att.items()
                        if isinstance(v, dict) and "ms_per_step" in v)
    lines.append(f"  attention per step (all layers, ms): {timings}; SDPA picks {att.get('sdpa_picks')}")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# One GRPO update
# ----------------------------------------------------------------------------------------------------------------
def naive_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """The memory-naive way (what the measures avoid): full-vocabulary logits of every position, in fp32."""
    input_ids, attention_mask, position_ids = build_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits.float()  # (N, P + T, V) fp32
    P, T = prompt_ids.shape[1], completion_ids.shape[1]
    logp_all = torch.log_softmax(logits[:, P - 1:P + T - 1], dim=-1)  # (N, T, V)
    return logp_all.gather(-1, completion_ids[..., None]).squeeze(-1)  # (N, T)


def synthetic_rollout(s: dict, vocab: int, device: torch.device, seed: int) -> dict:
    B, G, P, T = s["train_prompts"], s["train_group"], s["train_prompt_tokens"], s["train_completion_tokens"]
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(32, vocab, (B, P), generator=g).repeat_interleave(G, dim=0)  # (N, P)
    return {"prompt_ids": prompt_ids.to(device), "prompt_mask": torch.ones_like(prompt_ids).to(device),
            "completion_ids": torch.randint(32, vocab, (B * G, T), generator=g).to(device),
            "completion_mask": torch.ones(B * G, T, device=device),
            "prompt_index": torch.arange(B * G, device=device) // G,
            "advantages": torch.randn(B * G, generator=g).to(device)}


def one_update(model, optimizer, r: dict, measures: bool, s: dict, autocast_dtype, device) -> float:
    """Forward + backward over the micro-batches, gradient clipping, one AdamW step. Returns seconds."""
    N = r["prompt_ids"].shape[0]
    cfg = GRPOConfig(micro_batch_tokens=s["micro_batch_tokens"] if measures else 0, micro_batch_size=N)
    batches = plan_micro_batches(r["prompt_mask"], r["completion_mask"], cfg.micro_batch_size, cfg.micro_batch_tokens)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())

    def logprobs_of(rows):
        with autocast:
            if measures:
                return completion_logprobs_fast(model, r["prompt_ids"][rows], r["prompt_mask"][rows],
                                                r["completion_ids"][rows], r["completion_mask"][rows],
                                                chunk_tokens=cfg.logprob_chunk_tokens,
                                                prompt_index=r["prompt_index"][rows])
            return naive_logprobs(model, r["prompt_ids"][rows], r["prompt_mask"][rows],
                                  r["completion_ids"][rows], r["completion_mask"][rows])

    sync(device)
    start = time.perf_counter()
    mask = r["completion_mask"]  # (N, T)
    for rows in batches:  # the GRPO update of grpo/train.py, phase 6, with mu = 1 and no KL
        logp = logprobs_of(rows)  # (n, T)
        loss, _ = grpo_loss(logp, logp.detach(), None, r["advantages"][rows], mask[rows],
                            total_tokens=float(mask.sum()), max_completion_len=mask.shape[1])
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def _checkpointing(model, on: bool) -> None:
    """grpo.train's switch (gradient_checkpointing_enable), without transformers' rename warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable() if on else model.gradient_checkpointing_disable()


def bench_update(model, r: dict, measures: bool, s: dict, autocast_dtype, device) -> dict:
    checkpointing = measures or s["naive_checkpointing"]
    tokens = r["prompt_ids"].numel() + r["completion_ids"].numel()
    model.train()
    if checkpointing:
        _checkpointing(model, True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    out = {"log_probs": "chunked, completion positions only" if measures else "full fp32 logits, every position",
           "gradient_checkpointing": checkpointing,
           "micro_batch_tokens": s["micro_batch_tokens"] if measures else 0, "tokens": tokens}
    try:
        if device.type == "cuda":
            one_update(model, optimizer, r, measures, s, autocast_dtype, device)  # warm-up; AdamW state allocated
            torch.cuda.reset_peak_memory_stats(device)
            seconds = one_update(model, optimizer, r, measures, s, autocast_dtype, device)
            out["peak_gib"] = gib(torch.cuda.max_memory_allocated(device))
        else:
            with PeakRSS() as rss:
                seconds = one_update(model, optimizer, r, measures, s, autocast_dtype, device)
            out["rss_start_gib"], out["rss_peak_gib"] = gib(rss.start), gib(rss.peak)
            out["peak_growth_gib"] = gib(rss.peak - rss.start)
        out.update(status="ok", seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1))
    except torch.cuda.OutOfMemoryError as err:
        out.update(status="out of memory", reason=str(err)[:200])
    finally:
        del optimizer
        model.zero_grad(set_to_none=True)
        if checkpointing:
            _checkpointing(model, False)
        model.eval()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------
def resolve_settings(args) -> dict:
    s = dict(PRESETS[args.preset])
    s["seed"] = args.seed
    if args.quick:  # a tiny random model and tiny sizes, for tests: seconds on a CPU
        s.update(model="random", shape=TINY, dtype="float32", device="cpu", prompts=2, group_size=2,
                 prompt_tokens=16, new_tokens=8, reps=1, train_prompts=2, train_group=2, train_prompt_tokens=16,
                 train_completion_tokens=8, micro_batch_tokens=48, train_weights="float32",
                 target_train_gib=None)
    for key in ("prompts", "group_size", "prompt_tokens", "new_tokens", "reps", "device", "dtype"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if args.model is not None:
        s["model"], s["shape"] = args.model, None
    return s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", default=None, help="JSON path (default runs/bench/<preset>[-quick].json)")
    parser.add_argument("--quick", action="store_true", help="tiny random model and sizes (tests)")
    parser.add_argument("--model", default=None, help="a model folder, hub id or `default` instead of the preset's")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--prompts", type=int, default=None, help="distinct prompts (B)")
    parser.add_argument("--group-size", type=int, default=None, help="completions per prompt (G); rows = B x G")
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None, help="timed runs per sampler mode (median reported)")
    parser.add_argument("--hf-static", choices=["on", "off"], default="on",
                        help="time HF generate with cache_implementation='static' (compiles on CUDA: slow first call)")
    parser.add_argument("--hf-timeout", type=float, default=300.0,
                        help="seconds allowed to each HF mode (first call included); over it the mode is skipped")
    parser.add_argument("--hf-dynamic", choices=["on", "off"], default="on",
                        help="time HF generate with its default (dynamic) cache")
    parser.add_argument("--no-graphs", choices=["on", "off"], default="on",
                        help="on CUDA, also time our sampler with CUDA graphs off")
    parser.add_argument("--cpu-savings", choices=["on", "off"], default="on",
                        help="on the CPU, also time our sampler without its split cache and packed weights")
    parser.add_argument("--gpu-savings", choices=["on", "off"], default="on",
                        help="on CUDA, also time our sampler without its grid cache, stacked weights and fused ops")
    parser.add_argument("--variants", choices=["on", "off"], default="off",
                        help="on CUDA, also time our sampler with the grid cache, stacked weights and fused ops "
                             "each turned off in turn")
    parser.add_argument("--profile-step", choices=["on", "off"], default="off",
                        help="on CUDA, break an eager decode step's GPU time down by kernel (torch.profiler)")
    parser.add_argument("--paired-rounds", type=int, default=None,
                        help="after the modes, time ours and the faster HF mode back to back this many times and "
                             "report the median of the per-round ratios (default: 3 on the CPU, 0 on CUDA)")
    parser.add_argument("--calibrate", choices=["on", "off"], default="on",
                        help="log-prob check: also run HF's own cached decode against the training forward")
    parser.add_argument("--recorded-hf-static", type=float, default=None, metavar="TOKENS_PER_S",
                        help="an HF static figure measured earlier on this preset and machine kind: a baseline "
                             "candidate for the ratio when HF static is not run now (labelled as recorded)")
    parser.add_argument("--skip-hf", action="store_true", help="time only our sampler")
    parser.add_argument("--skip-train", action="store_true", help="skip the GRPO update")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    s = resolve_settings(args)
    device = pick_device(s["device"]) if s["device"] != "cuda" or torch.cuda.is_available() else None
    if device is None:
        print(f"preset {args.preset} needs CUDA, and none is available")
        return 2
    out_path = Path(args.out or f"runs/bench/{args.preset}{'-quick' if args.quick else ''}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in s.items() if k != "shape"}
    report = {"preset": args.preset, "quick": args.quick, "settings": settings, "model_shape": s["shape"],
              "machine": machine_info(device), "anchors_h200": ANCHORS.get(args.preset), "sampler": {},
              "notes": ["every row generates exactly new_tokens tokens (EOS ignored / suppressed) so each mode "
                        "does the same work; tokens_per_s = rows x new_tokens / median seconds",
                        "sampling: temperature 1.0, top_k 0, top_p 1.0 in every mode"]}

    def save():
        out_path.write_text(json.dumps(report, indent=2) + "\n")

    def say(text):
        print(text, flush=True)

    t0 = time.perf_counter()
    model = build_model(s, device)
    vocab = model.config.vocab_size
    report["model"] = {"name": s["model"], "type": model.config.model_type, "dtype": str(next(model.parameters()).dtype),
                       "parameters": sum(p.numel() for p in model.parameters()),
                       "load_s": round(time.perf_counter() - t0, 1)}
    prompts = random_prompts(s["prompts"], s["prompt_tokens"], vocab, s["seed"])
    rows = s["prompts"] * s["group_size"]
    say(f"bench {args.preset}{' (quick)' if args.quick else ''}: {s['model']} {report['model']['dtype']} on {device}, "
        f"{s['prompts']} prompts x {s['group_size']} = {rows} rows, {s['prompt_tokens']} prompt + "
        f"{s['new_tokens']} new tokens")
    save()

    # ---- sampling: ours first, then HF dynamic; HF static last of the sampler modes ----------------------
    report["sampler"]["ours"], rollout = bench_ours(model, prompts, s, device, None, s["seed"])
    say(f"  ours{' (CUDA graphs)' if device.type == 'cuda' else ''}: "
        f"{report['sampler']['ours']['tokens_per_s']:,.0f} tokens/s")
    save()
    if device.type == "cuda" and args.no_graphs == "on":
        report["sampler"]["ours_no_graphs"], _ = bench_ours(model, prompts, s, device, False, s["seed"])
        say(f"  ours (no graphs): {report['sampler']['ours_no_graphs']['tokens_per_s']:,.0f} tokens/s")
        save()
    def other_mode(name: str, options: dict, label: str) -> None:  # ours with some decode savings off
        report["sampler"][name], _ = bench_ours(model, prompts, s, device, None, s["seed"], options)
        say(f"  ours ({label}): {report['sampler'][name]['tokens_per_s']:,.0f} tokens/s")
        save()

    if device.type == "cuda" and args.gpu_savings == "on":
        other_mode("ours_full_cache_unstacked", {"grid_cache": False, "stacked_weights": False, "fused_ops": False},
                   "CUDA graphs, full slot cache, unstacked weights, eager elementwise ops")
    if device.type == "cuda" and args.variants == "on":  # what each CUDA saving adds, graphs on
        for grid, stacked, fused in ((1, 1, 1), (0, 1, 1), (0, 1, 0), (0, 0, 1)):
            options = {"grid_cache": bool(grid), "stacked_weights": bool(stacked), "fused_ops": bool(fused)}
            other_mode(f"ours_grid{grid}_stacked{stacked}_fused{fused}", options, str(options))
    if device.type == "cpu" and args.cpu_savings == "on":
        other_mode("ours_full_cache_unpacked", {"split_cache": False, "packed_weights": False, "grid_cache": False},
                   "full slot cache, unpacked weights")
    report["logprob_check"] = logprob_check(model, rollout, calibrate=args.calibrate == "on")
    for line in logprob_lines(report["logprob_check"]):
        say(line)
    del rollout
    save()
    if device.type == "cuda":
        report["decode_probe"] = decode_probe(model, prompts, s, device)
        for line in probe_lines(report["decode_probe"], report["sampler"]["ours"], s):
            say(line)
        save()
    if device.type == "cuda" and args.profile_step == "on":
        report["step_profile"] = step_profile(model, prompts, s, device)
        say(f"  eager decode step by kernel kind: {report['step_profile']}")
        save()
    if not args.skip_hf and args.hf_dynamic == "on":
        report["sampler"]["hf_dynamic"] = bench_hf(model, prompts, s, device, False, args.hf_timeout)
        _say_mode(say, "HF generate (dynamic cache)", report["sampler"]["hf_dynamic"])
        save()

    # ---- one GRPO update, measures on and off ---------------------------------------------------------------
    if not args.skip_train:
        report["train"] = train_stage(model, s, device, say)
        save()

    # ---- HF static last: its compile may take minutes and is the stage most likely to hit the limit --------
    if not args.skip_hf:
        if args.hf_static == "on":
            report["sampler"]["hf_static"] = bench_hf(model, prompts, s, device, True, args.hf_timeout)
        else:
            report["sampler"]["hf_static"] = {"status": "skipped", "reason": "--hf-static off"}
        _say_mode(say, "HF generate (static cache)", report["sampler"]["hf_static"])
    rounds = args.paired_rounds if args.paired_rounds is not None else (3 if device.type == "cpu" else 0)
    measured = {k: v["tokens_per_s"] for k, v in report["sampler"].items()
                if k in ("hf_dynamic", "hf_static") and v.get("status") == "ok"}
    if rounds > 0 and measured:
        best = max(measured, key=measured.get)
        report["paired"] = paired_ratio(model, prompts, s, device, best == "hf_static", rounds)
        p = report["paired"]
        say(f"  paired, {rounds} rounds of ours then {best}: ratios {p['ratios']} (median {p['median_ratio']}x)")
        save()
    if args.recorded_hf_static is not None and report["sampler"].get("hf_static", {}).get("status") != "ok":
        report["sampler"]["hf_static_recorded"] = {
            "status": "recorded", "tokens_per_s": args.recorded_hf_static,
            "reason": "not run now; the figure passed with --recorded-hf-static (an earlier run: check its machine)"}
    report["summary"] = summarise(report, s)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    save()
    for line in report["summary"]["lines"]:
        say(line)
    say(f"wrote {out_path}")
    return 0


def _say_mode(say, name: str, result: dict) -> None:
    if result.get("status") == "ok":
        first = f" (first call {result['first_call_s']} s)" if "first_call_s" in result else ""
        say(f"  {name}: {result['tokens_per_s']:,.0f} tokens/s{first}")
    else:
        say(f"  {name}: {result.get('status')}: {result.get('reason')}")


def train_stage(model, s: dict, device, say) -> dict:
    """One update with the measures on, then off, on the weights the preset trains with."""
    autocast_dtype = None
    if s["train_weights"] == "float32+autocast":  # grpo.train's CUDA setting: fp32 master weights and AdamW state
        train_model = copy.deepcopy(model).float()
        autocast_dtype = torch.bfloat16
    elif s["train_weights"] == "float32":
        train_model = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
    else:  # the preset's own dtype (bf16 for the 7B shape: fp32 weights + AdamW would need ~122 GB)
        train_model = model
    r = synthetic_rollout(s, model.config.vocab_size, device, s["seed"] + 1)
    N = r["prompt_ids"].shape[0]
    out = {"rows": N, "prompt_tokens": s["train_prompt_tokens"], "completion_tokens": s["train_completion_tokens"],
           "weights": s["train_weights"], "optimizer": "torch AdamW, state in the weights' dtype",
           "loss": "GRPO clipped surrogate, token_mean, mu = 1, beta = 0; gradient clipping at 1.0"}
    for name, measures in (("measures_on", True), ("measures_off", False)):
        out[name] = bench_update(train_model, r, measures, s, autocast_dtype, device)
        res = out[name]
        mem = res.get("peak_gib", res.get("peak_growth_gib"))
        what = "peak" if "peak_gib" in res else "RSS growth"
        if res["status"] == "ok":
            say(f"  GRPO update {N} x {s['train_prompt_tokens'] + s['train_completion_tokens']} tokens, "
                f"{name.replace('_', ' ')}: {res['tokens_per_s']:,.0f} tokens/s, {what} {mem} GiB")
        else:
            say(f"  GRPO update, {name.replace('_', ' ')}: {res['status']}")
    if train_model is not model:
        del train_model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def summarise(report: dict, s: dict) -> dict:
    sampler = report["sampler"]
    ours = sampler.get("ours", {}).get("tokens_per_s")
    hf = {k: v["tokens_per_s"] for k, v in sampler.items()
          if k.startswith("hf_") and v.get("status") in ("ok", "recorded")}
    summary = {"lines": []}
    if ours and hf:
        best = max(hf, key=hf.get)
        ratio = ours / hf[best]
        summary.update(ratio=round(ratio, 2), baseline=best, baseline_tokens_per_s=hf[best],
                       target_ratio=s["target_ratio"], ratio_meets_target=ratio >= s["target_ratio"])
        summary["lines"].append(f"ratio: ours {ours:,.0f} / {best} {hf[best]:,.0f} tokens/s = {ratio:.2f}x "
                                f"(target >= {s['target_ratio']:g}x: {'met' if ratio >= s['target_ratio'] else 'NOT met'})")
    paired = report.get("paired")
    if paired:
        ok = paired["median_ratio"] >= s["target_ratio"]
        summary.update(paired_ratio=paired["median_ratio"], paired_meets_target=ok)
        summary["lines"].append(f"paired ratio (ours vs {paired['baseline']}, back to back, median of "
                                f"{paired['rounds']}): {paired['median_ratio']:.2f}x (target >= {s['target_ratio']:g}x: "
                                f"{'met' if ok else 'NOT met'})")
    on = report.get("train", {}).get("measures_on", {})
    if s.get("target_train_gib") and "peak_gib" in on:
        ok = on["peak_gib"] <= s["target_train_gib"]
        summary.update(train_peak_gib=on["peak_gib"], train_target_gib=s["target_train_gib"], train_meets_target=ok)
        summary["lines"].append(f"update peak {on['peak_gib']} GiB (target <= {s['target_train_gib']:g} GiB: "
                                f"{'met' if ok else 'NOT met'})")
    lc = report.get("logprob_check")
    if lc:
        summary["logprob_within_tolerance"] = lc["within_tolerance"]
        summary["lines"].extend(logprob_lines(lc))
    if not math.isfinite(summary.get("ratio", 0.0)):
        summary["ratio"] = None
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
