"""One decode step of the sampler, made cheap: a preallocated KV cache, grouped-query attention without
copies, no host synchronisation, and (on CUDA) the whole step replayed as a CUDA graph.

Shapes: n rows in the decode batch (one per unfinished completion, padded to a bucket), L cache slots
(prompt + max_new_tokens, rounded up), h key/value heads, r query heads per key/value head, d head size,
H hidden size, V vocabulary.

Two engines share one interface (`prefill`, `step`, `compact`); the sampler's loop (grpo/sampler.py) does
not know which one it drives:

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
  Supported: Llama-style decoders (Llama, Qwen2: RMSNorm, rotary, GQA, gated MLP, no sliding window).
- `HFDecoder` calls the model's forward with a Hugging Face cache (`static` or `dynamic`): the reference
  path, and the fallback for every other architecture.

Every step computes exactly the next-token logits of a full forward pass over prompt + completion so far
(tests/test_sampler.py and tests/test_cuda.py check tokens against `generate` and log-probs against the
training forward).
"""
from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F

SLOT_ALIGN = 16  # cache length rounded up to this: aligned rows for the attention kernels' masks
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_graphs_broken = False  # set after a capture fails in this process: later calls go straight to eager


def cache_keyword(model) -> str:
    """transformers >= 5.2x calls the KV-cache argument `cache`; earlier releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0 at each row's first real token (GRPO_NOTES trap 2)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)  # (N, L)


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


def _fused_norm_matches(norm, hidden_size: int, device, dtype) -> bool:
    """Whether `_rms_norm` gives this RMSNorm module's output (Llama/Qwen2: weight * normalised(x) in the input
    dtype). Checked once on fixed rows; a module that computes anything else keeps running itself."""
    if not hasattr(norm, "variance_epsilon") or not isinstance(getattr(norm, "weight", None), torch.Tensor) \
            or not hasattr(F, "rms_norm"):
        return False
    try:
        with torch.no_grad():
            x = torch.arange(4 * hidden_size, device=device).view(4, hidden_size)  # (4, H): fixed, no RNG used
            x = (x * 0.37).sin().mul(3).to(dtype)
            ref, ours = norm(x), _rms_norm(norm, x)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        return ref.dtype == ours.dtype and torch.allclose(ref.float(), ours.float(), rtol=tol, atol=tol)
    except Exception:  # noqa: BLE001 - any surprise: the module runs itself
        return False


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """Llama/Qwen2 RMSNorm in 2 kernels instead of ~8: `F.rms_norm` normalises in fp32 and rounds once to x's
    dtype, as the module's `(x.float() * rsqrt(mean(x^2) + eps)).to(dtype)` does, then the weight multiplies."""
    return norm.weight * F.rms_norm(x, (x.shape[-1],), eps=norm.variance_epsilon)


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
        else:  # grows by concatenation every step (measured: 61% of CPU decode time)
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


class SlotDecoder:
    """Preallocated KV slots, our attention over them, optional CUDA graphs (see the module docstring)."""

    can_compact = True

    def __init__(self, model, prompt_len: int, max_new_tokens: int, cuda_graphs: bool):
        self.model = model
        self.body = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.P = prompt_len
        self.L = -(-(prompt_len + max_new_tokens) // SLOT_ALIGN) * SLOT_ALIGN  # slots, rounded up
        self.uses_graphs = cuda_graphs and not _graphs_broken
        self.keys: list[torch.Tensor] = []  # per layer (n, h, L, d)
        self.values: list[torch.Tensor] = []
        self.mask = None  # (n, 1, 1, L) additive, the cache's dtype: 0 where a row may attend, -inf elsewhere
        param = next(model.parameters())
        self._fused_norm = _fused_norm_matches(self.body.norm, model.config.hidden_size, param.device, param.dtype)
        self.write_pos = None  # (1,) long on the device: the slot this step writes
        self._graph = None  # the captured step for the current batch size
        self._inputs = None  # its static input buffers: token ids (n, 1), positions (n, 1)
        self._output = None  # its static output: logits (n, V)

    # ---- prefill: Hugging Face's forward over the distinct prompts, then copied into the slots ---------------
    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
                max_new_tokens: int) -> torch.Tensor:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=prompt_ids, attention_mask=prompt_mask,
                         position_ids=positions_from_mask(prompt_mask), use_cache=True, logits_to_keep=1,
                         **{cache_keyword(self.model): cache})
        B, P = prompt_ids.shape
        N = B * group_size
        for layer in range(len(self.body.layers)):
            k, v = _layer_kv(cache, layer)  # (B, h, P, d) each
            # Under autocast keys arrive in fp32 (rotary) and values in bf16: one dtype for both, the values'.
            keys = torch.zeros((N, k.shape[1], self.L, k.shape[3]), dtype=v.dtype, device=v.device)  # (N, h, L, d)
            values = torch.zeros((N, v.shape[1], self.L, v.shape[3]), dtype=v.dtype, device=v.device)
            keys[:, :, :P] = k.repeat_interleave(group_size, dim=0)  # each prompt's cache shared by its G rows
            values[:, :, :P] = v.repeat_interleave(group_size, dim=0)
            self.keys.append(keys)
            self.values.append(values)
        del cache
        dtype = self.values[0].dtype
        self.mask = torch.full((N, 1, 1, self.L), float("-inf"), dtype=dtype, device=prompt_ids.device)  # (N, 1, 1, L)
        self.mask[:, 0, 0, :P].masked_fill_(prompt_mask.bool().repeat_interleave(group_size, dim=0), 0.0)
        self.write_pos = torch.zeros(1, dtype=torch.long, device=prompt_ids.device)
        return out.logits[:, -1, :].repeat_interleave(group_size, dim=0)  # (N, V)

    # ---- one decode step ---------------------------------------------------------------------------------
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """token_ids, positions (n, 1) -> next-token logits (n, V) in float32. Writes this token's keys/values
        into slot `write_pos` of every layer. No host synchronisation: safe to capture in a CUDA graph."""
        n = token_ids.shape[0]
        norm = _rms_norm if self._fused_norm else (lambda module, h: module(h))
        x = self.body.embed_tokens(token_ids)  # (n, 1, H)
        cos, sin = self.body.rotary_emb(x, positions)  # (n, 1, d) each
        half = cos.shape[-1] // 2
        # rotate_half(x) * sin == roll(x, d/2) * (sin with its first half negated): negation is exact, so this
        # is bit for bit the model's `x * cos + rotate_half(x) * sin`, one kernel less per tensor.
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        cos, sin = cos[:, None], sin[:, None]  # (n, 1, 1, d): broadcast over heads and query positions
        for layer, keys, values in zip(self.body.layers, self.keys, self.values):
            attn = layer.self_attn
            kv_heads, head_dim = keys.shape[1], keys.shape[3]
            h = norm(layer.input_layernorm, x)  # (n, 1, H)
            # The r query heads of one key/value head become r query positions of that head (n, h, r, d):
            # the attention then reads each cached key once (what repeat_kv would copy r times).
            q = attn.q_proj(h).view(n, kv_heads, -1, head_dim)  # (n, h, r, d)
            k = attn.k_proj(h).view(n, kv_heads, 1, head_dim)  # (n, h, 1, d)
            v = attn.v_proj(h).view(n, kv_heads, 1, head_dim)  # (n, h, 1, d)
            r = q.shape[2]
            qk = torch.cat((q, k), dim=2)  # (n, h, r + 1, d): one rotary pass for the queries and the key
            qk = qk * cos + torch.roll(qk, half, dims=-1) * sin  # rotary position embedding
            q, k = qk[:, :, :r], qk[:, :, r:]  # (n, h, r, d), (n, h, 1, d)
            keys.index_copy_(2, self.write_pos, k.to(keys.dtype))  # slot P + t of every row
            values.index_copy_(2, self.write_pos, v.to(values.dtype))
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask,
                                               scale=attn.scaling)  # (n, h, r, d)
            x = x + attn.o_proj(o.reshape(n, 1, -1))  # (n, 1, H)
            x = x + layer.mlp(norm(layer.post_attention_layernorm, x))  # (n, 1, H)
        # float32 inside the graph: the sampler reads this buffer as it is, no (n, V) copy per step outside it
        return self.head(norm(self.body.norm, x))[:, -1, :].float()  # (n, V)

    def step(self, token: torch.Tensor, position: torch.Tensor, t: int) -> torch.Tensor:
        """Feed token t (n,) at positions (n,); returns the logits for token t + 1 (n, V)."""
        slot = self.P + t
        self.mask[:, :, :, slot] = 0.0  # the row now sees its own new token
        self.write_pos.fill_(slot)
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

    def _capture(self) -> bool:
        """Capture `forward` on the static buffers. The warm-up runs write this step's keys/values into
        the same slot as the replay will (same inputs), so they change nothing."""
        global _graphs_broken
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up off the capture: lazy inits, cuBLAS handles, autotuning
                for _ in range(2):
                    self.forward(*self._inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = self.forward(*self._inputs)
        except Exception as err:  # a clean fallback: the same step, launched eagerly
            warnings.warn(f"CUDA graph capture of the decode step failed ({type(err).__name__}: {err}); "
                          "decoding eagerly from now on")
            _graphs_broken = True
            self.uses_graphs = False
            self._graph = self._inputs = self._output = None
            return False
        self._graph, self._output = graph, output
        return True

    def compact(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep` (m,) of the decode batch (finished rows stop costing work)."""
        self._graph = self._inputs = self._output = None  # its buffers have the old batch size
        self.keys = [k.index_select(0, keep) for k in self.keys]  # (m, h, L, d)
        self.values = [v.index_select(0, keep) for v in self.values]
        self.mask = self.mask.index_select(0, keep)  # (m, 1, 1, L)

    def close(self) -> None:
        self._graph = self._inputs = self._output = None
        self.keys, self.values, self.mask = [], [], None


def make_decoder(model, cache_impl: str, prompt_len: int, max_new_tokens: int, cuda_graphs: bool | None):
    """The engine for this model and setting. cache_impl 'static' prefers `SlotDecoder` (Hugging Face's
    StaticCache where the architecture is not supported, its DynamicCache under autocast); 'dynamic' is
    Hugging Face's growing cache. cuda_graphs None = on for `SlotDecoder` on CUDA without autocast."""
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
        return SlotDecoder(model, prompt_len, max_new_tokens, cuda_graphs=use_graphs)
    if cache_impl == "static" and autocast:
        # Hugging Face's StaticCache takes one dtype, but under autocast keys (after the fp32 rotary embedding)
        # and values arrive in different ones: fall back to the growing cache.
        cache_impl = "dynamic"
    return HFDecoder(model, cache_impl, prompt_len, max_new_tokens)
