"""One decode step of the sampler, made cheap: a preallocated KV cache, grouped-query attention without
copies, no host synchronisation, and (on CUDA) the whole step replayed as a CUDA graph.

Shapes: n rows in the decode batch (one per unfinished completion, padded to a bucket), L cache slots
(prompt + max_new_tokens, rounded up), h key/value heads, r query heads per key/value head, d head size,
H hidden size, V vocabulary.

Two engines share one interface (`prefill`, `step`, `compact`); the fast sampler's loop (grpo/fast/sampler.py;
the plain loop it speeds up is grpo/sampler.py) does not know which one it drives. Both take their position ids
(`positions_from_mask`) and the name of the forward's cache argument (`cache_keyword`) from grpo/sampler.py.

- `SlotDecoder` keeps every layer's keys and values in (n, h, L, d) tensors allocated once. All rows write
  the token of step t into the same slot P + t (prompts are left-padded to P), so a step needs one slot
  index, one additive mask (n, 1, 1, L) in the cache's dtype (0 = may attend, -inf = may not: what SDPA
  turns a boolean mask into, done once per step instead of once per layer) and nothing that depends on t's
  value on the host. The step runs the model's own weights and rotary table, with the same arithmetic as
  its modules in fewer kernels (a small decode step is bound by kernel count, not by bytes): RMSNorm as
  one fused `F.rms_norm` and a multiply (checked against the module at start-up, else the module runs),
  queries and keys rotated together, by a half-swap (`torch.roll`) and a sign-folded sine (bit-identical to
  `q * cos + rotate_half(q) * sin`). It does the attention itself: the
  r query heads that share a key/value head are laid out as r query positions of that head, so
  `scaled_dot_product_attention` reads each cached key once instead of Hugging Face's `repeat_kv` copy
  (r = 7 for Qwen2.5-7B: that copy alone costs more memory traffic than the weights). Rows can be
  dropped (`compact`) when enough of them have finished. On CUDA the step is captured once per batch
  size as a CUDA graph and replayed: one launch instead of ~15 per layer.
  On CUDA, more savings (each measured on an H200 with `experiments.bench --variants`, figures in
  docs/performance.md: inside a graph a step is bound by its weight reads, its attention and its kernel count,
  a few microseconds per kernel however small):
  * grid cache: one (B, h, S, d) cache per prompt: its P prompt slots (rounded up to SLOT_ALIGN), then its
    G rows' own tokens step-major (slot P + t*G + g), with a (B, 1, G*r, S) mask that shows each query row
    the prompt and its own row's slots. The G*r queries of a prompt's rows attend in one SDPA call that reads
    each prompt key once for all G rows (1/G of what the full slot cache reads for the prompt part). Its
    kernel has fewer, larger blocks, so it is the default only where those fill half the GPU's SMs
    (`_grid_fills_gpu`): on at the SmolLM2-135M shape with 32 prompts, where it is faster, off at the
    Qwen2.5-7B shape with 8 prompts, where it is slower (docs/performance.md).
  * stacked weights: q/k/v and gate/up as one product each (a second copy of those weights while the
    decoder lives, by default only where it fits STACK_FREE_FRACTION of the free memory): fewer, larger
    matmuls (docs/performance.md).
  * fused ops: the rotary embedding, each residual add with the RMSNorm after it, and SiLU * up as one
    torch.compile'd kernel each (`FusedOps`, checked against the eager ops, rounding as eager does), only
    under graphs, where their host-side cost is paid once per capture: fewer kernels a layer
    (docs/performance.md).
  On the CPU, in float32, more savings (a step there is bound by the bytes it reads, weights then cache, and,
  once those are lean, by the number of ops; what each saving took off a SmolLM2-135M step: docs/performance.md):
  * split cache: the prompt's keys/values are stored once per distinct prompt (B, h, P, d), not once per
    row, and each row's own tokens in a (n, h, T, d) suffix; a step reads the shared prompt part once for
    all G rows of its prompt (their queries stacked as G*r query positions) and only the suffix slots
    written so far. The two partial attentions come from PyTorch's CPU flash kernel with their
    log-sum-exps and are merged exactly (`torch.lerp` by sigmoid(lse_prompt - lse_own)). That kernel is a
    private op: `flash_lse_kernel()` looks it up and checks it against plain math the first time a split
    cache is built, never at import; without it, one explicit softmax over both parts. With G = 8 rows of
    a 512-token prompt this reads ~1/8 of the cache that SDPA over (n, h, L, d) slots reads.
  * packed weights: MKL's pre-packed GEMM (`torch.ops.mkl._mkl_linear`, what PyTorch's own compiler uses
    for frozen CPU linears) for the decode batch size, re-packed when the batch is compacted; q/k/v and
    gate/up stacked into one product each, and each RMSNorm's weight folded into the product it feeds.
    Checked against `F.linear` once; without MKL, or for models over `PACK_LIMIT_BYTES`, the modules run.
  * RMSNorm in 3-4 ops instead of ~10 (`vector_norm` and `hypot`), queries scaled inside the rotary tables, and
    the eager step under `torch.inference_mode` (no autograd bookkeeping per op).
  Supported: Llama-style decoders (Llama, Qwen2: RMSNorm, rotary, GQA, gated MLP, no sliding window).
  Either device: the prompts' common leading tokens (system message, worked example) are prefilled once for
  the batch (`shared_prefix`, grpo/fast/prefill.py; most of a CPU evaluation's prefill, docs/performance.md).
- `HFDecoder` calls the model's forward with a Hugging Face cache (`static` or `dynamic`): the fast loop's
  fallback for every other architecture, and the bench's Hugging Face cached decode (the plain sampler,
  `sampling.decoder: reference`, is grpo/sampler.py, not this).

Every step computes exactly the next-token logits of a full forward pass over prompt + completion so far
(tests/test_sampler.py and tests/test_cuda.py check tokens against `generate` and log-probs against the
training forward).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from grpo.fast.prefill import prefill
from grpo.sampler import cache_keyword, positions_from_mask

SLOT_ALIGN = 16  # cache length rounded up to this: aligned rows for the attention kernels' masks
PACK_LIMIT_BYTES = 4 * 2**30  # CPU packed weights are a second copy of the linears: only for models up to this
STACK_FREE_FRACTION = 0.25  # CUDA stacked (q|k|v), (gate|up) weights: by default only if the copy fits this share
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def _aligned(slots: int) -> int:
    """slots rounded up to a multiple of SLOT_ALIGN."""
    return -(-slots // SLOT_ALIGN) * SLOT_ALIGN


def bucket_size(active: int, current: int) -> int:
    """The decode batch for `active` unfinished rows: the smallest power of two >= active, at most `current`.
    Few distinct sizes keep the number of captured graphs (and their capture time) small."""
    size = 1
    while size < active:
        size *= 2
    return min(size, current)


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (B, h, P, d) of one layer of a Hugging Face cache, across its API versions."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def slot_decoder_supported(model) -> bool:
    """Whether `SlotDecoder` can run this model's decode step (else the sampler uses `HFDecoder`)."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return False
    if any(kind != "full_attention" for kind in (getattr(config, "layer_types", None) or [])):
        return False
    body = model.get_decoder()
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(body, name) for name in needed):
        return False
    attn = body.layers[0].self_attn
    return all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")) \
        and not hasattr(attn, "q_norm")


def _fused_norm_matches(norm, hidden_size: int, device, dtype, fn=None) -> bool:
    """Whether `fn` (default `_rms_norm`) gives this RMSNorm module's output (Llama/Qwen2: weight * normalised(x)
    in the input dtype). Checked once on fixed rows; a module that computes anything else keeps running itself."""
    if not hasattr(norm, "variance_epsilon") or not isinstance(getattr(norm, "weight", None), torch.Tensor) \
            or not hasattr(F, "rms_norm"):
        return False
    try:
        with torch.no_grad():
            x = torch.arange(4 * hidden_size, device=device).view(4, hidden_size)  # (4, H): fixed, no RNG used
            x = (x * 0.37).sin().mul(3).to(dtype)
            ref, ours = norm(x), (fn or _rms_norm)(norm, x)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        return ref.dtype == ours.dtype and torch.allclose(ref.float(), ours.float(), rtol=tol, atol=tol)
    except Exception:  # noqa: BLE001 - any surprise: the module runs itself
        return False


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """Llama/Qwen2 RMSNorm in 2 kernels instead of ~8: `F.rms_norm` normalises in fp32 and rounds once to x's
    dtype, as the module's `(x.float() * rsqrt(mean(x^2) + eps)).to(dtype)` does, then the weight multiplies."""
    return norm.weight * F.rms_norm(x, (x.shape[-1],), eps=norm.variance_epsilon)


def _rms_norm_fp32(x: torch.Tensor, scaled_weight: torch.Tensor, root_h_eps: torch.Tensor) -> torch.Tensor:
    """The same in float32 in 4 ops (on a CPU `F.rms_norm` is ~10 small ops, and a decode step there is bound by
    op count once the weights are packed): 1 / sqrt(mean(x^2) + eps) = sqrt(H) / hypot(|x|, sqrt(H eps)).
    scaled_weight = weight * sqrt(H), root_h_eps = sqrt(H * eps) as a 0-d tensor (fixed for a decoder's life)."""
    return _normalised(x, root_h_eps) * scaled_weight


def _normalised(x: torch.Tensor, root_h_eps: torch.Tensor) -> torch.Tensor:
    """x / sqrt(|x|^2 + H eps) over the last dimension, in 3 ops."""
    return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), root_h_eps)


def _scaled_norm_args(norm, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight = norm.weight.detach()
    root_h_eps = torch.tensor((hidden_size * norm.variance_epsilon) ** 0.5, dtype=weight.dtype, device=weight.device)
    return weight * hidden_size ** 0.5, root_h_eps


class HFDecoder:
    """Decode steps through the model's own forward and a Hugging Face cache (the reference path)."""

    can_compact = False
    uses_graphs = False

    def __init__(self, model, cache_impl: str, prompt_len: int, max_new_tokens: int):
        from transformers import DynamicCache, StaticCache

        self.model = model
        self.cache_kw = cache_keyword(model)
        self.P = prompt_len
        self.static = cache_impl == "static"
        if self.static:  # preallocated for prompt + max_new_tokens by transformers
            self.cache = StaticCache(config=model.config, max_cache_len=prompt_len + max_new_tokens)
        else:  # grows by concatenation every step (its cost: docs/performance.md)
            self.cache = DynamicCache(config=model.config)
        self.attn = None

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
                max_new_tokens: int) -> torch.Tensor:
        """Run each distinct prompt once; returns the next-token logits of its G rows (N, V)."""
        out = self.model(input_ids=prompt_ids, attention_mask=prompt_mask,
                         position_ids=positions_from_mask(prompt_mask), use_cache=True, logits_to_keep=1,
                         **{self.cache_kw: self.cache})
        if group_size > 1:  # share each prompt's cache with its G completions instead of prefilling G copies
            for layer in self.cache.layers:
                layer.keys = layer.keys.repeat_interleave(group_size, dim=0)  # (B, h, L, d) -> (N, h, L, d)
                layer.values = layer.values.repeat_interleave(group_size, dim=0)
                if hasattr(layer, "batch_size"):
                    layer.batch_size = layer.keys.shape[0]
        mask = prompt_mask.repeat_interleave(group_size, dim=0)  # (N, P)
        self.attn = torch.ones((mask.shape[0], self.P + max_new_tokens), dtype=mask.dtype, device=mask.device)
        self.attn[:, :self.P] = mask  # (N, P + max_new)
        return out.logits[:, -1, :].repeat_interleave(group_size, dim=0)  # (N, V)

    def step(self, token: torch.Tensor, position: torch.Tensor, t: int) -> torch.Tensor:
        """Feed token t (n,) at positions (n,); returns the logits for token t + 1 (n, V)."""
        # a static cache attends over its whole length (causality hides the unwritten slots): full-width mask
        mask_now = self.attn if self.static else self.attn[:, :self.P + t + 1]
        out = self.model(input_ids=token[:, None], attention_mask=mask_now, position_ids=position[:, None],
                         use_cache=True, **{self.cache_kw: self.cache})  # the cache is updated in place
        return out.logits[:, -1, :]  # (n, V)

    def compact(self, keep: torch.Tensor) -> None:
        raise NotImplementedError("HFDecoder keeps every row")

    def close(self) -> None:
        self.cache = self.attn = None


@functools.cache
def flash_lse_kernel():
    """PyTorch's CPU flash-attention kernel, which returns the log-sum-exp of each query's scores with the output
    (`F.scaled_dot_product_attention` drops it): what merging two partial attentions needs. A private op, so it
    is looked up and checked against plain math the first time a split cache is built (never at import);
    without it the split cache takes one explicit softmax."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return None

    def flash_lse(q, k, v, attn_mask=None, scale=None):
        out = op(q, k, v, 0.0, False, attn_mask=attn_mask, scale=scale)
        return out[0], out[1]

    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 6, 8, generator=g),
                   torch.randn(2, 3, 6, 8, generator=g))
        mask = torch.zeros(2, 1, 1, 6)
        mask[0, ..., :2] = float("-inf")
        out, lse = flash_lse(q, k, v, attn_mask=mask, scale=0.3)
        scores = (q @ k.transpose(-1, -2)) * 0.3 + mask  # (2, 3, 4, 6)
        ok = torch.allclose(out, scores.softmax(-1) @ v, atol=1e-5) and lse.shape == (2, 3, 4) and \
            torch.allclose(lse, scores.logsumexp(-1), atol=1e-5)
    except Exception:  # noqa: BLE001 - missing or changed private op: the explicit path
        return None
    return flash_lse if ok else None



def _gated_mlp(mlp) -> bool:
    """Whether this MLP is Llama/Qwen2's `down(act(gate(x)) * up(x))`, which the decode step can run with its
    own (packed) linears; any other MLP runs as its module."""
    return type(mlp).__name__ in ("LlamaMLP", "Qwen2MLP") and \
        all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _decode_linears(model) -> list[tuple[tuple, object]]:
    """Every linear a decode step multiplies by, in the groups that read the same input (one packed product per
    group), each with the RMSNorm that makes its input (None for none): (q, k, v) after the input norm and (o)
    of each attention, (gate, up) after the post-attention norm and (down) of each gated MLP, the output head
    after the final norm."""
    body = model.get_decoder()
    groups = []
    for layer in body.layers:
        attn = layer.self_attn
        groups += [((attn.q_proj, attn.k_proj, attn.v_proj), layer.input_layernorm), ((attn.o_proj,), None)]
        if _gated_mlp(layer.mlp):
            groups += [((layer.mlp.gate_proj, layer.mlp.up_proj), layer.post_attention_layernorm),
                       ((layer.mlp.down_proj,), None)]
    return groups + [((model.get_output_embeddings(),), body.norm)]


def packing_possible(model) -> bool:
    """MKL pre-packed weights: a float32 model on the CPU, no autocast, PyTorch built with MKL, linears that
    fit PACK_LIMIT_BYTES (the packed copy doubles their memory while the decoder lives)."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    try:
        ops = (torch.ops.mkl._mkl_reorder_linear_weight, torch.ops.mkl._mkl_linear)  # noqa: F841
    except (AttributeError, RuntimeError):
        return False
    if not torch.backends.mkl.is_available():
        return False
    return sum(m.weight.numel() * 4 for group, _ in _decode_linears(model) for m in group) <= PACK_LIMIT_BYTES


def _stacked_bias(group: tuple) -> torch.Tensor | None:
    """The biases of a group of linears side by side (zeros for one without), or None if none has one."""
    if all(m.bias is None for m in group):
        return None
    return torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in group])


class PackedLinears:
    """The decode step's linears as MKL pre-packed GEMMs for one decode batch size, the linears that read the same
    input stacked into one product ((q, k, v): one call instead of three; the output is their concatenation).
    MKL packs a weight for a given number of rows; `_mkl_linear` with any other number quietly multiplies by the
    unpacked weight, so the decoder packs again after a compaction changes the batch size (~0.15 s for
    SmolLM2-135M here). Memory while it lives: the packed copy, plus the stacked weights of the groups.

    input_scales: {id(norm): (in,) scale} folds an RMSNorm's weight into the columns of the group it feeds
    (W diag(s) x == W (s * x)): the decoder's norm then skips its last multiply."""

    def __init__(self, groups: list[tuple[tuple, object]], rows: int, input_scales: dict | None = None):
        self.rows = rows
        self.folds_norms = bool(input_scales)  # the norms feeding these products skip their weight multiply
        self.products = {}  # group (tuple of modules) -> (packed weight, weight, bias, folded input scale)
        for group, norm in groups:
            weight = torch.cat([m.weight.detach() for m in group]) if len(group) > 1 else group[0].weight.detach()
            scale = (input_scales or {}).get(id(norm))
            if scale is not None:
                weight = weight * scale  # (out, in) * (in,): a new tensor, the model's weights stay as they are
            bias = _stacked_bias(group)
            packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
            self.products[group] = (packed, weight, bias, scale)

    def __call__(self, group: tuple, x: torch.Tensor) -> torch.Tensor:
        """x (rows, 1, in) -> the group's outputs side by side (rows, 1, sum of out)."""
        packed, weight, bias, _ = self.products[group]
        return torch.ops.mkl._mkl_linear(x, packed, weight, bias, self.rows)

    def matches(self, group: tuple) -> bool:
        """The packed product equals the modules' own `F.linear`s (of the scaled input, where a norm's weight is
        folded in) on fixed rows, float32 rounding aside."""
        features = group[0].in_features
        x = (torch.arange(self.rows * features, dtype=torch.float32).view(self.rows, 1, features) * 0.37).sin()
        scale = self.products[group][3]
        scaled = x if scale is None else x * scale
        reference = torch.cat([F.linear(scaled, m.weight, m.bias) for m in group], dim=-1)
        # float32 sums of `in` products in another order: absolute error ~1e-7 x the largest terms
        return torch.allclose(self(group, x), reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


# ---- fused elementwise chains (CUDA graphs): torch.compile'd, one kernel each instead of 2-4 ------------------
def _rotary(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qk * cos + rotate_half(qk) * sin, with the sign folded into sin (see `_rotary_tables`). (n, m, d)"""
    return qk * cos + torch.roll(qk, qk.shape[-1] // 2, dims=-1) * sin


def _add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add, then Llama/Qwen2's RMSNorm of the sum: (x + delta, weight * normalised(x + delta)), the
    norm in float32 and rounded once to x's dtype, as the module computes it."""
    x = x + delta
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return x, weight * h.to(x.dtype)


def _silu_mul(gate_up: torch.Tensor, inter: int) -> torch.Tensor:
    """silu(gate) * up of the stacked (gate | up) product (n, 1, 2 I) -> (n, 1, I)."""
    gate, up = gate_up.split(inter, dim=-1)
    return F.silu(gate) * up


def _inductor_options() -> dict:
    """Round every intermediate to its dtype as eager PyTorch does (bf16 sums, products), where this PyTorch
    can: the fused chains then compute what the model's modules compute, not a more precise variant of it."""
    try:
        import torch._inductor.config as inductor_config
    except ImportError:
        return {}
    return {"emulate_precision_casts": True} if hasattr(inductor_config, "emulate_precision_casts") else {}


class _Compiled:
    """torch.compile(fn), which turns into fn itself, with a warning, the first time a call fails (a recompile
    for a new shape that cannot build, say): the step then computes the same thing unfused."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, torch.compile(fn, dynamic=None, options=_inductor_options())

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as err:  # noqa: BLE001 - the eager function is always right
                warnings.warn(f"compiled {self.fn.__name__} failed ({type(err).__name__}: {str(err)[:200]}); "
                              "running it unfused from now on")
                self.compiled = None
        return self.fn(*args)


class FusedOps:
    """The three elementwise chains of a decode layer (rotary, residual add + RMSNorm, SiLU * up) compiled by
    torch.compile into one kernel each: a decode step inside a CUDA graph is bound by its kernel count
    (~20 a layer, each a few microseconds however small), and these cut ~8 a layer. Only under CUDA graphs,
    where a compiled function's host-side cost (guards, launch) is paid once at capture, not every step.

    Made once per process and model shape; `get` checks the compiled functions against the eager ones on two batch
    sizes (the second makes the batch dimension dynamic, so compactions to smaller batches recompile nothing)
    and returns None, with a warning, where compiling fails (no Triton, an unsupported PyTorch)."""

    _made: dict = {}  # (device type, dtype, hidden, head_dim, heads, inter, eps) -> FusedOps, or None if it failed

    def __init__(self):
        self.rotary = _Compiled(_rotary)
        self.add_rms_norm = _Compiled(_add_rms_norm)
        self.silu_mul = _Compiled(_silu_mul)

    @classmethod
    def get(cls, device, dtype, hidden: int, head_dim: int, heads: int, inter: int, eps: float):
        key = (device.type, dtype, hidden, head_dim, heads, inter, eps)
        if key not in cls._made:
            cls._made[key] = cls._checked(device, dtype, hidden, head_dim, heads, inter, eps)
        return cls._made[key]

    @classmethod
    def _checked(cls, device, dtype, hidden, head_dim, heads, inter, eps):
        try:
            ops = cls()
            tol = 1e-5 if dtype == torch.float32 else 3e-2

            def ramp(*shape, offset=0.0):  # fixed inputs, no RNG: sines of a ramp
                n = math.prod(shape)
                return (torch.arange(n, device=device, dtype=torch.float32).view(shape) * 0.37 + offset).sin().to(dtype)

            with torch.no_grad():
                for rows in (2, 3):
                    qk, cos, sin = ramp(rows, heads, head_dim), ramp(rows, 1, head_dim, offset=1.0), \
                        ramp(rows, 1, head_dim, offset=2.0)
                    x, delta = ramp(rows, 1, hidden), ramp(rows, 1, hidden, offset=3.0)
                    weight = ramp(hidden, offset=4.0)
                    gate_up = ramp(rows, 1, 2 * inter, offset=5.0)
                    pairs = [(ops.rotary(qk, cos, sin), _rotary(qk, cos, sin)),
                             *zip(ops.add_rms_norm(x, delta, weight, eps), _add_rms_norm(x, delta, weight, eps)),
                             (ops.silu_mul(gate_up, inter), _silu_mul(gate_up, inter))]
                    for ours, reference in pairs:
                        if ours.dtype != reference.dtype or not torch.allclose(ours.float(), reference.float(),
                                                                               rtol=tol, atol=tol):
                            raise RuntimeError("compiled result differs from the eager one")
            return ops
        except Exception as err:  # noqa: BLE001 - no compiler, no Triton, a changed API: the eager ops
            warnings.warn(f"fused decode ops unavailable ({type(err).__name__}: {str(err)[:200]}); "
                          "decoding with the eager ones")
            return None


def _stack_linears(groups: list[tuple[tuple, object]]) -> dict:
    """The groups of several linears (q, k, v and gate, up) as one weight and bias each, so a step runs one
    product per group instead of one per linear and a copy to put the outputs side by side."""
    stacked = {}
    with torch.no_grad():
        for group, _ in groups:
            if len(group) < 2:
                continue
            stacked[group] = (torch.cat([m.weight.detach() for m in group]), _stacked_bias(group))
    return stacked


def stacking_wanted(model, groups: list[tuple[tuple, object]]) -> bool:
    """Stacked weights by default: a CUDA model without autocast, where the stacked copy (about 60% of a Llama
    layer's weights, held while the decoder lives) takes under STACK_FREE_FRACTION of the free GPU memory."""
    param = next(model.parameters())
    if param.device.type != "cuda" or torch.is_autocast_enabled("cuda"):
        return False
    extra = sum(m.weight.numel() * m.weight.element_size() for group, _ in groups if len(group) > 1 for m in group)
    free, _ = torch.cuda.mem_get_info(param.device)
    return extra < STACK_FREE_FRACTION * free


class _LayerPlan(NamedTuple):
    """What a decode step takes from one decoder layer, looked up once (module attribute access is slow enough
    to show in a CPU step): the linear groups (see `_decode_linears`), the norms, the attention scale left
    after the queries' own scaling, and the gated MLP's activation (or the MLP module, run as it is)."""
    qkv: tuple
    o: tuple
    gate_up: tuple | None
    down: tuple | None
    gate_up_sizes: tuple
    act: object
    mlp: object
    input_norm: object
    post_norm: object
    scale: float
    silu: bool  # the gated MLP's activation is SiLU (what FusedOps.silu_mul computes)

    @classmethod
    def of(cls, layer, q_scale: float) -> "_LayerPlan":
        attn, mlp = layer.self_attn, layer.mlp
        gated = _gated_mlp(mlp)
        return cls(qkv=(attn.q_proj, attn.k_proj, attn.v_proj), o=(attn.o_proj,),
                   gate_up=(mlp.gate_proj, mlp.up_proj) if gated else None,
                   down=(mlp.down_proj,) if gated else None,
                   gate_up_sizes=(mlp.gate_proj.out_features, mlp.up_proj.out_features) if gated else (),
                   act=mlp.act_fn if gated else None, mlp=mlp, input_norm=layer.input_layernorm,
                   post_norm=layer.post_attention_layernorm, scale=attn.scaling / q_scale,
                   silu=gated and type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation"))


class SlotDecoder:
    """Preallocated KV slots, our attention over them, optional CUDA graphs, and on the CPU a split cache and
    packed weights (see the module docstring)."""

    can_compact = True

    def __init__(self, model, prompt_len: int, max_new_tokens: int, cuda_graphs: bool,
                 split_cache: bool | None = None, packed_weights: bool | None = None,
                 grid_cache: bool | None = None, stacked_weights: bool | None = None,
                 fused_ops: bool | None = None, shared_prefix: bool | None = None):
        self.model = model
        self.shared_prefix = True if shared_prefix is None else bool(shared_prefix)  # the prompts' common prefix once
        self.body = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.P = prompt_len
        self.max_new = max_new_tokens
        self.L = _aligned(prompt_len + max_new_tokens)  # slots, rounded up
        self.uses_graphs = cuda_graphs
        param = next(model.parameters())
        cpu_fp32 = param.device.type == "cpu" and param.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        # split cache: prompt keys/values once per prompt, each row's own tokens apart (None = on the CPU in fp32)
        # (it reads the slots written so far, a host-side length: asked for explicitly, it turns graphs off)
        self.split = cpu_fp32 and not self.uses_graphs if split_cache is None else bool(split_cache)
        self.uses_graphs = self.uses_graphs and not self.split
        self.flash_lse = flash_lse_kernel() if self.split else None
        if self.split and param.dtype != torch.float32:
            raise ValueError("split_cache needs a float32 model (its scores are plain matmuls in the cache dtype)")
        if self.split and grid_cache:
            raise ValueError("grid_cache and split_cache are two layouts of the same cache: ask for one")
        # grid cache: decided at prefill (None = wherever the split cache is off and prompts have G > 1 rows)
        self.grid_option = grid_cache
        self.grid = False
        self.prefix_slots = 0  # grid cache: prompt slots, P rounded up to SLOT_ALIGN
        self.open_steps = 0  # grid cache: completion slots written so far (each row's own, open in the mask)
        can_pack = packing_possible(model)
        self.pack = can_pack if packed_weights is None else bool(packed_weights)
        if self.pack and not can_pack:
            raise ValueError("packed_weights needs a float32 CPU model, PyTorch with MKL and linears of at most "
                             f"{PACK_LIMIT_BYTES / 2**30:g} GiB")
        self._packed = None  # PackedLinears for the current batch size (made at the first step of that size)
        # stacked weights (CUDA): packed products stack their groups already
        groups = _decode_linears(model)
        self.stack = not self.pack and (stacking_wanted(model, groups) if stacked_weights is None
                                        else bool(stacked_weights))
        if self.stack and torch.is_autocast_enabled(param.device.type):
            raise ValueError("stacked_weights needs the weights in the compute dtype (no autocast)")
        self._stacked = _stack_linears(groups) if self.stack else {}  # group -> (weight, bias)
        self.kv_heads = model.config.num_key_value_heads
        self.keys: list[torch.Tensor] = []  # per layer (n, h, L, d); split: each row's own tokens (n, h, T, d)
        self.values: list[torch.Tensor] = []
        self.mask = None  # (n, 1, 1, L) additive, the cache's dtype: 0 where a row may attend, -inf elsewhere
        # split cache only: the prompts' keys/values (B, h, P, d) per layer, their additive mask (B, 1, 1, P),
        # which prompt each row reads (host list), and how rows are laid out as G*r query positions per prompt
        self.prefix_keys: list[torch.Tensor] = []
        self.prefix_values: list[torch.Tensor] = []
        self.prefix_mask = None
        self.row_mask = None  # (n, 1, 1, P): prefix_mask of each row's prompt (None: no prompt is padded)
        self.grid_mask = None  # prefix_mask where some prompt is padded, else None
        self.row_prompt: list[int] = []
        self.group_rows = 0  # Gmax: rows per prompt in the grid (the most any prompt still has)
        self.grid_index = None  # (n,) slot of each row in the (B * Gmax) grid; None where the grid is the rows
        H = model.config.hidden_size
        self._fused_norm = _fused_norm_matches(self.body.norm, H, param.device, param.dtype)
        # float32 on the CPU: the RMSNorm in fewer dispatches, its scaled weights made once (checked like the other)
        self._norm_args = {}  # id(module) -> (weight * sqrt(H), sqrt(H * eps) as a 0-d tensor)
        if cpu_fp32 and _fused_norm_matches(self.body.norm, H, param.device, param.dtype,
                                            lambda m, x: _rms_norm_fp32(x, *_scaled_norm_args(m, H))):
            self._norm_args = {id(n): _scaled_norm_args(n, H) for n in self._all_norms()}
        attn = self.body.layers[0].self_attn
        self.q_heads = model.config.num_attention_heads
        self.head_dim = attn.head_dim
        # split cache: queries leave the rotary embedding already scaled (one multiply fewer per layer)
        scalings = {layer.self_attn.scaling for layer in self.body.layers}
        self.q_scale = scalings.pop() if self.split and len(scalings) == 1 else 1.0
        self.layers = [_LayerPlan.of(layer, self.q_scale) for layer in self.body.layers]
        # fused elementwise chains: only under CUDA graphs (None = wherever graphs are used); eps must be one value
        want_fused = self.uses_graphs if fused_ops is None else bool(fused_ops)
        eps = {n.variance_epsilon for n in self._all_norms() if hasattr(n, "variance_epsilon")}
        self._fused = None
        if want_fused and self._fused_norm and len(eps) == 1 and not self.pack:
            config = model.config
            self._fused = FusedOps.get(param.device, param.dtype, H, self.head_dim, self.q_heads + self.kv_heads,
                                       getattr(config, "intermediate_size", 1), eps.pop())
        self.write_pos = None  # (1,) long on the device: the slot this step writes
        self.write_slots = None  # grid cache: (G,) long on the device, the slots this step writes
        self._row_offsets = None  # grid cache: arange(G) on the device
        self._graph = None  # the captured step for the current batch size
        self._inputs = None  # its static input buffers: token ids (n, 1), positions (n, 1)
        self._output = None  # its static output: logits (n, V)

    # ---- prefill: Hugging Face's forward over the distinct prompts, then copied into the slots ---------------
    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
                max_new_tokens: int) -> torch.Tensor:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        # From here on the cache's own column mask stands for the prompt mask (the same, unless a common
        # prefix was prefilled once: grpo/fast/prefill.py).
        last_logits, prompt_mask = prefill(self.model, prompt_ids, prompt_mask, cache, self.shared_prefix)  # (B, V)
        B, P = prompt_ids.shape
        N = B * group_size
        suffix = self.L - P  # split cache: slots for the completion tokens only
        if self.grid_option is None:
            self.grid = not self.split and group_size > 1 and self._grid_fills_gpu(B, group_size)
        else:
            self.grid = not self.split and bool(self.grid_option)
        self.prefix_slots = _aligned(P)
        grid_slots = self.prefix_slots + _aligned(self.max_new * group_size)  # grid cache: S slots per prompt
        for layer in range(len(self.body.layers)):
            k, v = _layer_kv(cache, layer)  # (B, h, P, d) each
            # Under autocast keys arrive in fp32 (rotary) and values in bf16: one dtype for both, the values'.
            if self.grid:  # each prompt's keys/values once, then its G rows' own tokens, step-major
                for source, store in ((k, self.keys), (v, self.values)):
                    slots = torch.zeros((B, k.shape[1], grid_slots, k.shape[3]), dtype=v.dtype, device=v.device)
                    slots[:, :, :P] = source  # (B, h, S, d)
                    store.append(slots)
                continue
            if self.split:  # each prompt's keys/values kept once, read by all its G rows
                self.prefix_keys.append(k.to(v.dtype).contiguous())
                self.prefix_values.append(v.contiguous())
                shape = (N, k.shape[1], suffix, k.shape[3])  # (N, h, T, d)
                self.keys.append(torch.zeros(shape, dtype=v.dtype, device=v.device))
                self.values.append(torch.zeros(shape, dtype=v.dtype, device=v.device))
                continue
            keys = torch.zeros((N, k.shape[1], self.L, k.shape[3]), dtype=v.dtype, device=v.device)  # (N, h, L, d)
            values = torch.zeros((N, v.shape[1], self.L, v.shape[3]), dtype=v.dtype, device=v.device)
            keys[:, :, :P] = k.repeat_interleave(group_size, dim=0)  # each prompt's cache shared by its G rows
            values[:, :, :P] = v.repeat_interleave(group_size, dim=0)
            self.keys.append(keys)
            self.values.append(values)
        del cache
        dtype = self.values[0].dtype
        if self.split or self.grid:
            self.prefix_mask = torch.zeros((B, 1, 1, P), dtype=dtype, device=prompt_ids.device)  # (B, 1, 1, P)
            self.prefix_mask[:, 0, 0].masked_fill_(~prompt_mask.bool(), float("-inf"))
            self._lay_out_rows([row // group_size for row in range(N)])
            self.open_steps = 0
            if self.grid:
                self._set_grid_buffers()  # the mask (B, 1, G*r, S), the slots a step writes
        else:
            self.mask = torch.full((N, 1, 1, self.L), float("-inf"), dtype=dtype, device=prompt_ids.device)
            self.mask[:, 0, 0, :P].masked_fill_(prompt_mask.bool().repeat_interleave(group_size, dim=0), 0.0)
        self.write_pos = torch.zeros(1, dtype=torch.long, device=prompt_ids.device)
        return last_logits.repeat_interleave(group_size, dim=0)  # (N, V)

    # ---- split cache: rows <-> the per-prompt grid of query positions ---------------------------------------
    def _lay_out_rows(self, row_prompt: list[int]) -> None:
        """Row s reads prompt row_prompt[s]. Drops prompts no row reads any more, then places row s at grid
        slot (its prompt, its rank among that prompt's rows) of a (B, Gmax) grid. Host work, at prefill and
        compaction only."""
        used = sorted(set(row_prompt))
        device = self.prefix_mask.device
        if len(used) < self.prefix_mask.shape[0]:  # every row of some prompt has gone: stop reading its cache
            sel = torch.tensor(used, device=device)
            self.prefix_keys = [k.index_select(0, sel) for k in self.prefix_keys]
            self.prefix_values = [v.index_select(0, sel) for v in self.prefix_values]
            self.prefix_mask = self.prefix_mask.index_select(0, sel)
            renumber = {prompt: i for i, prompt in enumerate(used)}
            row_prompt = [renumber[prompt] for prompt in row_prompt]
        seen = [0] * len(used)
        grid = []
        for prompt in row_prompt:
            grid.append(seen[prompt])
            seen[prompt] += 1
        self.group_rows = max(seen)
        grid = [prompt * self.group_rows + rank for prompt, rank in zip(row_prompt, grid)]
        self.grid_index = None if grid == list(range(len(used) * self.group_rows)) else \
            torch.tensor(grid, device=device)
        self.row_prompt = row_prompt
        self.row_mask = self.grid_mask = None  # (n, 1, 1, P), (B, 1, 1, P): only where some prompt is padded
        if self.split and bool(torch.isinf(self.prefix_mask).any()):
            self.grid_mask = self.prefix_mask
            self.row_mask = self.prefix_mask.index_select(0, torch.tensor(row_prompt, device=device))
        return used

    def _grid_fills_gpu(self, prompts: int, group_size: int) -> bool:
        """Whether the grid cache's attention has enough independent blocks for this GPU. Its kernel gives each
        (prompt, key/value head) and 64 of its G*r query positions one block, against one per (row, head) for
        the full slot cache: reading 1/G of the prompt part is a loss when the blocks leave most of the GPU idle.
        On an H200 (132 SMs) it won with 96 blocks (SmolLM2-135M shape, 32 prompts of 8 rows) and lost with 32
        (Qwen2.5-7B shape, 8 prompts): docs/performance.md. Rule: at least half as many blocks as SMs. Off CUDA:
        always."""
        device = self.body.embed_tokens.weight.device
        if device.type != "cuda":
            return True
        r = self.q_heads // self.kv_heads
        blocks = prompts * self.kv_heads * -(-group_size * r // 64)
        return 2 * blocks >= torch.cuda.get_device_properties(device).multi_processor_count

    # ---- grid cache: per prompt, [its P prompt slots | step 0 of its Gmax rows | step 1 of them | ...] -------
    def _grid_mask(self) -> torch.Tensor:
        """The additive mask (B, 1, Gmax*r, S) of the grid cache: every query position sees its prompt (less its
        left padding) and, of the completion slots, only its own row's, for the `open_steps` steps written."""
        B, G, r = self.prefix_mask.shape[0], self.group_rows, self.q_heads // self.kv_heads
        S, Pp, T = self.keys[0].shape[2], self.prefix_slots, self.max_new
        mask = torch.full((B, 1, G * r, S), float("-inf"), dtype=self.prefix_mask.dtype, device=self.prefix_mask.device)
        mask[..., :self.P] = self.prefix_mask  # (B, 1, 1, P) over every query position
        own = mask[..., Pp:Pp + T * G].view(B, 1, G, r, T, G)  # [.., query row, head, step, key row]
        torch.diagonal(own, dim1=2, dim2=5)[..., :self.open_steps, :].fill_(0.0)  # (B, 1, r, T, G): row == row
        return mask

    def _grid_suffix(self, store: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """The completion part of a grid-cache tensor (B, h, S, d) as (B, h, T, Gmax, d): [prompt, head, step,
        row], a view (writes go to the cache). rows: Gmax of that tensor, if not the current one."""
        B, h, _, d = store.shape
        G = self.group_rows if rows is None else rows
        return store[:, :, self.prefix_slots:self.prefix_slots + self.max_new * G].view(B, h, self.max_new, G, d)

    def _compact_grid(self, keep: torch.Tensor) -> None:
        """Keep rows `keep` (m,) of the grid cache: drop the prompts none of them reads, re-rank each prompt's
        rows (Gmax may shrink), copy each kept row's completion slots to its new place, remake the mask."""
        old_slots = keep if self.grid_index is None else self.grid_index.index_select(0, keep)  # (m,) old grid
        old_prompts, old_rows = self.prefix_mask.shape[0], self.group_rows
        used = self._lay_out_rows([self.row_prompt[s] for s in keep.tolist()])
        B, G = len(used), self.group_rows
        new_slots = self.grid_index if self.grid_index is not None else torch.arange(B * G, device=keep.device)
        used_index = torch.tensor(used, device=keep.device)
        S = self.prefix_slots + _aligned(self.max_new * G)
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                _, h, _, d = old.shape
                new = old.new_zeros((B, h, S, d))
                new[:, :, :self.prefix_slots] = old[:, :, :self.prefix_slots].index_select(0, used_index)
                # (old B, h, T, old G, d) -> one (h, T, d) block per old grid slot, the kept ones, at their new slots
                rows = self._grid_suffix(old, old_rows).permute(0, 3, 1, 2, 4).reshape(
                    old_prompts * old_rows, h, self.max_new, d).index_select(0, old_slots)  # (m, h, T, d)
                grid = old.new_zeros((B * G, h, self.max_new, d)).index_copy_(0, new_slots, rows)
                self._grid_suffix(new).copy_(grid.view(B, G, h, self.max_new, d).permute(0, 2, 3, 1, 4))
                store[layer] = new
        self._set_grid_buffers()

    def _set_grid_buffers(self) -> None:
        """The mask for the rows' current layout and the (G,) slot indices a step writes (device tensors)."""
        self.mask = self._grid_mask()
        self._row_offsets = torch.arange(self.group_rows, device=self.mask.device)
        self.write_slots = self._row_offsets.clone()

    def _to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(n, h, r, m) per row -> (B, h, Gmax * r, m): the rows of one prompt as query positions of it."""
        n, h, r, m = x.shape
        B, G = self.prefix_mask.shape[0], self.group_rows
        if self.grid_index is not None:  # empty grid slots (finished prompts' rows dropped) stay zero
            x = x.new_zeros((B * G, h, r, m)).index_copy_(0, self.grid_index, x)
        return x.reshape(B, G, h, r, m).transpose(1, 2).reshape(B, h, G * r, m)

    def _from_grid(self, y: torch.Tensor, r: int) -> torch.Tensor:
        """(B, h, Gmax * r, m) -> (n, h, r, m), the inverse of `_to_grid`."""
        B, h, _, m = y.shape
        y = y.reshape(B, h, self.group_rows, r, m).transpose(1, 2).reshape(B * self.group_rows, h, r, m)
        return y if self.grid_index is None else y.index_select(0, self.grid_index)

    # ---- attention of one layer ----------------------------------------------------------------------------
    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                t: int | None) -> torch.Tensor:
        """q (n, h, r, d), this token's k, v (n, h, 1, d) -> attention output (n, h, r, d). Stores k, v first."""
        keys, values = self.keys[layer], self.values[layer]
        if self.grid:  # one (B, h, S, d) cache per prompt; this step's slots come from a device tensor (graph-safe)
            # step t's slots of a prompt's G rows are side by side: (B, h, G, d) into slots write_slots (G,)
            keys.index_copy_(2, self.write_slots, self._to_grid(k.to(keys.dtype)))
            values.index_copy_(2, self.write_slots, self._to_grid(v.to(values.dtype)))
            # the G*r queries of a prompt's rows in one attention: each prompt key is read once for all its rows
            out = F.scaled_dot_product_attention(self._to_grid(q), keys, values, attn_mask=self.mask, scale=scale)
            return self._from_grid(out, q.shape[2])  # (B, h, G*r, d) -> (n, h, r, d)
        if not self.split:  # every row's full cache; the slot comes from a device tensor (graph-safe)
            keys.index_copy_(2, self.write_pos, k.to(keys.dtype))  # slot P + t of every row
            values.index_copy_(2, self.write_pos, v.to(values.dtype))
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, scale=scale)
        keys[:, :, t] = k[:, :, 0]  # suffix slot t of every row
        values[:, :, t] = v[:, :, 0]
        keys, values = keys[:, :, :t + 1], values[:, :, :t + 1]  # (n, h, t + 1, d): only the slots written
        r = q.shape[2]
        if self.flash_lse is not None and q.device.type == "cpu":  # each part by PyTorch's CPU flash kernel, merged by their log-sum-exps
            grid_out, grid_lse = self.flash_lse(self._to_grid(q), self.prefix_keys[layer], self.prefix_values[layer],
                                            attn_mask=self.grid_mask, scale=scale)  # (B, h, G*r, d), (B, h, G*r)
            own_out, own_lse = self.flash_lse(q, keys, values, scale=scale)  # (n, h, r, d), (n, h, r)
            prompt_out, prompt_lse = self._from_grid(grid_out, r), self._from_grid(grid_lse[..., None], r)
            # softmax over both parts = the two partial softmaxes weighted by e^lse / (e^lse_prompt + e^lse_own)
            return torch.lerp(own_out, prompt_out, torch.sigmoid(prompt_lse - own_lse[..., None]))
        # prompt part: one (G*r, d) x (d, P) product per prompt and head reads its keys once for all its rows
        prompt_scores = self._from_grid(self._to_grid(q) @ self.prefix_keys[layer].transpose(-1, -2), r)
        if self.row_mask is not None:  # left padding: -inf before each row's prompt
            prompt_scores = prompt_scores + self.row_mask
        scores = torch.cat((prompt_scores, q @ keys.transpose(-1, -2)), dim=-1)  # (n, h, r, P + t + 1)
        if scale != 1.0:  # else the queries came scaled out of the rotary embedding
            scores = scores * scale
        probs = scores.softmax(-1)  # one softmax over prompt and completion slots
        P = prompt_scores.shape[-1]
        prompt_part = self._from_grid(self._to_grid(probs[..., :P]) @ self.prefix_values[layer], r)  # (n, h, r, d)
        return prompt_part + probs[..., P:] @ values

    # ---- one decode step ---------------------------------------------------------------------------------
    def _all_norms(self) -> list:
        """Every RMSNorm module a step runs: the final one and each layer's two."""
        return [self.body.norm] + [n for layer in self.body.layers
                                   for n in (layer.input_layernorm, layer.post_attention_layernorm)]

    def _norm(self, module, x: torch.Tensor) -> torch.Tensor:
        args = self._norm_args.get(id(module))
        if args is not None:
            if self._packed is not None and self._packed.folds_norms:  # the weight is in the next product
                return _normalised(x, args[1])
            return _rms_norm_fp32(x, *args)
        return _rms_norm(module, x) if self._fused_norm else module(x)

    def _linears(self, group: tuple, x: torch.Tensor) -> torch.Tensor:
        """The group's linears applied to x, outputs side by side: one packed product, or the modules."""
        if self._packed is not None:
            return self._packed(group, x)
        stacked = self._stacked.get(group)
        if stacked is not None:
            return F.linear(x, *stacked)
        return group[0](x) if len(group) == 1 else torch.cat([m(x) for m in group], dim=-1)

    def _rotary_tables(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for this step's positions, broadcast over the (q_heads + kv_heads) vectors of a row:
        (n, 1, d), or (n, q_heads + kv_heads, d) when the query rows also carry q_scale."""
        cos, sin = self.body.rotary_emb(x, positions)  # (n, 1, d) each
        half = cos.shape[-1] // 2
        # rotate_half(x) * sin == roll(x, d/2) * (sin with its first half negated): negation is exact, so this
        # is bit for bit the model's `x * cos + rotate_half(x) * sin`, one kernel less per tensor.
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        if self.q_scale != 1.0:
            rows = torch.ones((self.q_heads + self.kv_heads, 1), dtype=cos.dtype, device=cos.device)
            rows[:self.q_heads] = self.q_scale
            cos, sin = cos * rows, sin * rows  # (n, q_heads + kv_heads, d)
        return cos, sin

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, t: int | None = None) -> torch.Tensor:
        """token_ids, positions (n, 1) -> next-token logits (n, V) in float32. Writes this token's keys/values
        into every layer's cache (slot `write_pos`, or suffix slot t with the split cache). Without the split
        cache no host synchronisation: safe to capture in a CUDA graph."""
        n = token_ids.shape[0]
        d, hq, h = self.head_dim, self.q_heads, self.kv_heads
        fused = self._fused  # FusedOps (CUDA graphs) or None
        x = self.body.embed_tokens(token_ids)  # (n, 1, H)
        cos, sin = self._rotary_tables(x, positions)
        normed = self._norm(self.layers[0].input_norm, x)  # later layers get theirs with the residual add
        for index, layer in enumerate(self.layers):
            # one (q | k | v) row per token: its query and key vectors rotated together, in one pass
            qkv = self._linears(layer.qkv, normed)
            qk = qkv[..., :(hq + h) * d].view(n, hq + h, d)  # (n, hq + h, d)
            qk = fused.rotary(qk, cos, sin) if fused else _rotary(qk, cos, sin)  # rotary position embedding
            # The r query heads of one key/value head become r query positions of that head (n, h, r, d):
            # the attention then reads each cached key once (what repeat_kv would copy r times).
            q = qk[:, :hq].view(n, h, hq // h, d)  # (n, h, r, d)
            k = qk[:, hq:].view(n, h, 1, d)  # (n, h, 1, d)
            v = qkv[..., (hq + h) * d:].view(n, h, 1, d)  # (n, h, 1, d)
            o = self._attend(index, q, k, v, layer.scale, t)  # (n, h, r, d)
            x, normed = self._add_norm(x, self._linears(layer.o, o.reshape(n, 1, -1)), layer.post_norm)  # (n, 1, H)
            if layer.gate_up is not None:  # Llama/Qwen2 MLP, spelled out so gate and up are one packed product
                gate_up = self._linears(layer.gate_up, normed)  # (n, 1, 2 I)
                if fused and layer.silu:
                    act = fused.silu_mul(gate_up, layer.gate_up_sizes[0])
                else:
                    gate, up = gate_up.split(layer.gate_up_sizes, dim=-1)  # (n, 1, I) each
                    act = layer.act(gate) * up
                delta = self._linears(layer.down, act)
            else:
                delta = layer.mlp(normed)  # (n, 1, H)
            following = self.layers[index + 1].input_norm if index + 1 < len(self.layers) else self.body.norm
            x, normed = self._add_norm(x, delta, following)
        # float32 inside the graph: the sampler reads this buffer as it is, no (n, V) copy per step outside it
        return self._linears((self.head,), normed)[:, -1, :].float()  # (n, V)

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and the RMSNorm of its result: (x + delta, norm(x + delta)), fused where possible."""
        if self._fused is not None and self._fused_norm:
            return self._fused.add_rms_norm(x, delta, norm.weight, norm.variance_epsilon)
        x = x + delta
        return x, self._norm(norm, x)

    def _pack_for(self, rows: int) -> None:
        """Packed weights for a decode batch of `rows` (kept until the batch size changes)."""
        if not self.pack or (self._packed is not None and self._packed.rows == rows):
            return
        self._packed = None  # free the old copy before making the new one
        groups = _decode_linears(self.model)
        # fold each norm's (scaled) weight into the product it feeds, where the decoder runs its own fp32 norm
        scales = {key: args[0] for key, args in self._norm_args.items()}
        packed = PackedLinears(groups, rows, input_scales=scales)
        if not (packed.matches(groups[0][0]) and packed.matches(groups[-1][0])):
            warnings.warn("MKL packed weights disagree with F.linear; decoding with the modules' own linears")
            self.pack = False
            return
        self._packed = packed

    def step(self, token: torch.Tensor, position: torch.Tensor, t: int) -> torch.Tensor:
        """Feed token t (n,) at positions (n,); returns the logits for token t + 1 (n, V)."""
        if self.split or self.pack:
            # CPU float32: inference mode spares every op its autograd bookkeeping (the step is bound by op
            # count there). Not under autocast (CUDA): its cache of cast weights would keep inference tensors.
            with torch.inference_mode():
                self._pack_for(token.shape[0])
                if self.split:
                    return self.forward(token[:, None], position[:, None], t)
                self._advance(t)
                return self.forward(token[:, None], position[:, None])
        self._advance(t)
        if not self.uses_graphs:
            return self.forward(token[:, None], position[:, None])
        if self._graph is None:
            self._inputs = (token[:, None].clone(), position[:, None].clone())
            if not self._capture():
                return self.forward(token[:, None], position[:, None])
        self._inputs[0].copy_(token[:, None])
        self._inputs[1].copy_(position[:, None])
        self._graph.replay()
        return self._output  # overwritten by the next replay: the caller reads it before the next step

    def _advance(self, t: int) -> None:
        """Full-slot cache: step t writes slot P + t, which every row may now attend to. Grid cache: step t
        writes each row's slot of step t, which that row (and no other) may now attend to."""
        if self.grid:
            B, G, r = self.prefix_mask.shape[0], self.group_rows, self.q_heads // self.kv_heads
            start = self.prefix_slots + t * G
            step_slots = self.mask[..., start:start + G].view(B, 1, G, r, G)  # [.., query row, head, key row]
            torch.diagonal(step_slots, dim1=2, dim2=4).fill_(0.0)
            torch.add(self._row_offsets, start, out=self.write_slots)  # start + [0, G), in place, no sync
            self.open_steps = t + 1
            return
        slot = self.P + t
        self.mask[:, :, :, slot] = 0.0  # the row now sees its own new token
        self.write_pos.fill_(slot)

    def _capture(self) -> bool:
        """Capture `forward` on the static buffers. The warm-up runs write this step's keys/values into
        the same slot as the replay will (same inputs), so they change nothing."""
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up off the capture: lazy inits, cuBLAS handles, autotuning
                self.forward(*self._inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = self.forward(*self._inputs)
        except Exception as err:  # a clean fallback: the same step, launched eagerly
            warnings.warn(f"CUDA graph capture of the decode step failed ({type(err).__name__}: {err}); "
                          "this decoder runs eagerly")
            self.uses_graphs = False
            self._graph = self._inputs = self._output = None
            return False
        self._graph, self._output = graph, output
        return True


    def compact(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep` (m,) of the decode batch (finished rows stop costing work)."""
        self._graph = self._inputs = self._output = None  # its buffers have the old batch size
        if self.grid:
            self._compact_grid(keep)
            return
        self.keys = [k.index_select(0, keep) for k in self.keys]  # (m, h, L, d); split: (m, h, T, d)
        self.values = [v.index_select(0, keep) for v in self.values]
        if self.split:
            self._lay_out_rows([self.row_prompt[s] for s in keep.tolist()])
        else:
            self.mask = self.mask.index_select(0, keep)  # (m, 1, 1, L)

    def close(self) -> None:
        self._graph = self._inputs = self._output = self._packed = None
        self._stacked = {}
        self.keys, self.values, self.mask = [], [], None
        self.prefix_keys, self.prefix_values, self.prefix_mask, self.row_mask = [], [], None, None


def make_decoder(model, cache_impl: str, prompt_len: int, max_new_tokens: int, cuda_graphs: bool | None,
                 split_cache: bool | None = None, packed_weights: bool | None = None,
                 grid_cache: bool | None = None, stacked_weights: bool | None = None,
                 fused_ops: bool | None = None, shared_prefix: bool | None = None):
    """The engine for this model and setting. cache_impl 'static' prefers `SlotDecoder` (Hugging Face's
    StaticCache where the architecture is not supported, its DynamicCache under autocast); 'dynamic' is
    Hugging Face's growing cache. cuda_graphs: None = on for `SlotDecoder` on CUDA without autocast.
    split_cache, packed_weights: `SlotDecoder`'s CPU savings; None = on where they apply (float32 on the CPU).
    grid_cache, stacked_weights, fused_ops: its CUDA savings; None = on where they apply (the module docstring).
    shared_prefix: `SlotDecoder` prefills the prompts' common prefix once (grpo/fast/prefill.py); None = on."""
    if cache_impl not in ("static", "dynamic"):
        raise ValueError(f"cache_impl must be 'static' or 'dynamic', got {cache_impl!r}")
    device = next(model.parameters()).device
    autocast = torch.is_autocast_enabled(device.type)
    if cache_impl == "static" and slot_decoder_supported(model):
        # Graphs need the weights in the compute dtype: under autocast each step would capture casts of
        # weights that autocast caches and frees outside the graph's knowledge.
        graphs_possible = device.type == "cuda" and not autocast
        if cuda_graphs and not graphs_possible:
            warnings.warn("cuda_graphs=True needs a CUDA model run without autocast; decoding eagerly")
        use_graphs = graphs_possible if cuda_graphs is None else bool(cuda_graphs) and graphs_possible
        return SlotDecoder(model, prompt_len, max_new_tokens, cuda_graphs=use_graphs, split_cache=split_cache,
                           packed_weights=packed_weights, grid_cache=grid_cache, stacked_weights=stacked_weights,
                           fused_ops=fused_ops, shared_prefix=shared_prefix)
    if cache_impl == "static" and autocast:
        # Hugging Face's StaticCache takes one dtype, but under autocast keys (after the fp32 rotary embedding)
        # and values arrive in different ones: fall back to the growing cache.
        cache_impl = "dynamic"
    return HFDecoder(model, cache_impl, prompt_len, max_new_tokens)
