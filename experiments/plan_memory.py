"""Will this GRPO run fit? Bytes per GPU (or per CPU process) of every piece of a training step, before a run.

    python -m experiments.plan_memory --config CONFIG [--gpus N] [--gpu-memory GiB] [--device cuda|cpu]
                                      [--json] [--measure] [key=value ...]

It reads the experiment's config (the same `key=value` overrides as `experiments.train`), the model's shape
(never its weights) and prints the bytes of each term below, the peak, the margin, the verdict, and where it
does not fit, which settings to change, with the figures after each change. `--measure` (CPU only) runs the
real pieces of one step in a fresh process and prints the measured peak RSS growth next to the prediction.
Nothing is downloaded: the shape comes from `model.random_init`, `<model>/config.json` of a local folder, or
the small built-in table KNOWN_SHAPES (Qwen/Qwen2.5-7B-Instruct, SmolLM2-135M-Instruct = `default`).

Notation. P parameters (computed from the shape: embedding V*H, per layer the q/k/v/o and gate/up/down
linears with Qwen2's q/k/v biases and two norms, the final norm, and an untied LM head V*H), L layers,
H hidden, I intermediate, V vocabulary, h_q = heads x head_dim, h_kv = kv_heads x head_dim. N GPUs,
B = grpo.batch_prompts, G = grpo.group_size, B_g = ceil(B/N) prompts and R = B_g*G rows per GPU.
P_tok = task.max_prompt_tokens (a cap: real prompts are often shorter, so prompt terms are upper bounds),
T = sampling.max_new_tokens. Precision: on CUDA a full fine-tune on one GPU keeps fp32 master weights and
computes under bf16 autocast (c = 2 bytes per activation value, s = 4 for the residual stream, which stays
fp32 because the fp32 embedding feeds it); FSDP2 (N > 1) and LoRA compute with bf16 weights (c = s = 2); the
CPU runs everything in fp32 (c = s = 4).

Resident terms (held through the whole step):
  weights          full fine-tune: 4 B x P / N (fp32 master weights, FSDP2-sharded over N GPUs);
                   LoRA (model.lora.rank r > 0): 2 B x P / N frozen bf16 base (4 B on the CPU) plus
                   4 B x A / N adapter weights, A = sum over layers and adapted linears of r x (in + out)
  optimizer        AdamW moments: 8 B x trainable / N
  reference        grpo.beta > 0 and a full fine-tune: a frozen fp32 copy, 4 B x P / N (LoRA: none)
  decode copy      the sampler's copy of the (merged) weights, 2 B x P (bf16) on every GPU, never sharded:
                   always with N > 1 or LoRA; on one GPU `sampling.decode_weights: auto` makes it where it
                   takes under half the free memory at the first generation, `master` never. CPU: none
                   (the fp32 model samples directly), except LoRA's fp32 copy (4 B x P)
  runtime          CPU only: the tokenizer and the framework's scratch (CPU_RUNTIME_BYTES, measured)
  (model.cpu_offload=true, N > 1 only, moves the sharded weights, gradients, optimizer state and the
  optimizer step to CPU memory: reported as CPU bytes per process, not GPU bytes)

Phases (they do not overlap in time):
  rollout   KV cache: L x 2 (keys, values) x h_kv x 2 B (bf16; 4 B fp32 on the CPU) per cached token.
            Tokens: the CPU's split cache and CUDA's grid cache keep each prompt once per group:
            B_g*P_tok + R*T (rounded up to 16 slots). CUDA's slot cache, the default where the grid cache
            would leave the GPU idle (2 x B_g x kv_heads x ceil(G*heads/kv_heads/64) < 132 SMs, e.g. the
            7B with 8 prompts), keeps every row's prompt: R*(P_tok + T), the naive bound, plus the prefill's
            B_g*P_tok. Plus the decoder's working set: the prefill (B_g*P_tok tokens x c(3I + 4H)), its
            stacked (q|k|v), (gate|up) weights on CUDA (2 B each, where they take under a quarter of the free
            memory) or MKL-packed copies of every linear on the CPU (4 B x (2 x (qkv + gate/up + head) +
            o + down), for linears up to 4 GiB).
  eval      the same for greedy evaluation, G = 1: each GPU decodes every N-th of run.eval_examples
            prompts, run.eval_batch_size at a time.
  update    gradients 4 B x trainable / N (with a single micro-batch per step they fill in while its
            activations are freed, so they are not added), plus one micro-batch of n rows
            (grpo.micro_batch_size, or grpo.micro_batch_tokens // (P_tok + T) rows) of S = P_tok + T tokens:
            activations, saved tensors of one Qwen2/Llama decoder layer per token (bytes):
                A = norm(3) + norm(2) + c(3 h_q + 2 kv) + 4 heads + 4c I + c r (adapters)
                norm(k) = 4H (its fp32 input or fp32 copy) + s H (the normalised input, kept for a
                          trainable norm weight) + k c H (each of the k linears that read it keeps its own
                          bf16 cast under autocast; else s H, kept once)
                kv = h_q: Hugging Face repeats the key/value heads (`repeat_kv`) whenever a padding mask
                is passed, which a GRPO batch always has
            (i.e. about H x 10 + I x 4 values of c bytes, plus the fp32 RMSNorm inputs), and per token of
            the micro-batch:
                no checkpointing:    L x A + W      (W = one layer's backward working set, 3 c I + 4 s H)
                with checkpointing:  L x s H + A + W  (each layer's input, one layer recomputed)
            with grpo.logprobs=fast and no checkpointing, prompts run once per micro-batch:
            L x (U P_tok A + n T (A - 2 c kv) + n S 2 c kv), U = the distinct prompts of n rows.
            Plus the final norm and the completion hidden states, the attention mask (n S^2 bytes), the
            log-prob chunk (grpo.logprob_chunk_tokens tokens x V x (c + 12) bytes: the chunk's logits, their
            fp32 copy and the softmax's fp32 temporaries in backward) and the LM head's gradient
            (V H x (c + 4 under autocast) bytes, before it is added to the fp32 .grad).
            Single-GPU full fine-tune under autocast: + 2 B x P, the bf16 casts of every weight that
            autocast caches for the whole forward. FSDP2 (N > 1; each decoder layer a unit, the rest the
            root): + the root's all-gathered bf16 parameters and two layers', and for a full fine-tune the
            root's unsharded bf16 gradient and one layer's fp32 gradient before its reduce-scatter.
  step      gradients + AdamW's temporaries: CUDA's foreach AdamW allocates sqrt(v) for every trainable
            tensor at once (4 B x trainable / N); the CPU's per-tensor loop two of the largest tensor.
  start-up  CUDA, before sharding (grpo.policy.prepare_training): the full fp32 model (4 B x P), the fp32
            reference (beta > 0) and, with N > 1, the bf16 decode copy, on every GPU at once.

Peak = max(start-up, resident + max(rollout, eval, update, step)). Margin, stated apart: CUDA 10% of the peak
+ 1 GiB (the CUDA context, cuBLAS/NCCL workspaces and the caching allocator's fragmentation); CPU 25% of the
peak (glibc keeps freed heap memory in RSS: the rollout's packed weights are still resident when the update
allocates, and small tensors fragment; measured 0-18% over the live bytes, 72% with checkpointing on
4096-token micro-batches: docs/memory.md). Fits when peak + margin <= the memory (--gpu-memory GiB per GPU; on
the CPU this machine's RAM unless --gpu-memory is given). The JSON also gives the plain sum of all terms (no
reuse between phases) and the naive KV bound R*(P_tok + T).

Checked against measurement (`--measure`, docs/memory.md): peak RSS growth of load_policy + one sampler
rollout + one real update (completion_logprobs forward/backward per micro-batch, clipping, AdamW step) in a
fresh subprocess, against this module's prediction; CUDA terms against the H200 figures in docs/bench/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

GIB = 2 ** 30
CUDA_MARGIN_FRACTION = 0.10
CUDA_MARGIN_FIXED = 1 * GIB  # CUDA context (~0.5 GiB), cuBLAS / NCCL workspaces
CPU_MARGIN_FRACTION = 0.25  # glibc keeps freed heap memory in RSS: 0-18% over the live bytes (docs/memory.md)
CPU_RUNTIME_BYTES = 160 * 2 ** 20  # tokenizer, oneDNN/MKL scratch, first-call caches: measured with the tiny model
CUDA_SMS = 132  # H100 / H200 streaming multiprocessors (the grid-cache rule of grpo/fast/decode.py)
SLOT_ALIGN = 16  # grpo.fast.decode.SLOT_ALIGN
PACK_LIMIT_BYTES = 4 * GIB  # grpo.fast.decode.PACK_LIMIT_BYTES
STACK_FREE_FRACTION = 0.25  # grpo.fast.decode.STACK_FREE_FRACTION
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """A model whose shape cannot be found without downloading anything."""


# ----------------------------------------------------------------------------------------------------
# The model's shape and parameter counts
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool  # LM head shares the embedding
    qkv_bias: bool  # Qwen2: q/k/v have biases
    source: str = ""

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


QWEN25_7B = Shape(layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064,
                  tied=False, qkv_bias=True, source="built-in table: Qwen/Qwen2.5-7B-Instruct")
SMOLLM2_135M = Shape(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152,
                     tied=True, qkv_bias=False, source="built-in table: SmolLM2-135M-Instruct")
KNOWN_SHAPES = {"Qwen/Qwen2.5-7B-Instruct": QWEN25_7B, "HuggingFaceTB/SmolLM2-135M-Instruct": SMOLLM2_135M,
                "default": SMOLLM2_135M}
# transformers' defaults for the keys a `random_init` mapping may leave out (Qwen2Config / LlamaConfig)
_HF_DEFAULTS = {"qwen2": dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                              num_attention_heads=32, vocab_size=151936, tie_word_embeddings=False),
                "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, vocab_size=32000, tie_word_embeddings=False)}


def default_model_dir() -> Path:
    """grpo.models.default_model_dir() without importing torch (a test keeps the two equal)."""
    root = Path(os.environ.get("RECZERO_CACHE", Path.home() / ".cache" / "reczero")).expanduser()
    return root / "SmolLM2-135M-Instruct"


def shape_from_values(values: dict, vocab: int | None = None, source: str = "") -> Shape:
    """A Shape from transformers config values (config.json or `model.random_init`); `vocab` overrides."""
    model_type = values.get("model_type", "qwen2")
    if model_type not in _HF_DEFAULTS:
        raise PlanError(f"model_type {model_type!r}: only Llama-style decoders (qwen2, llama) are planned")
    v = {**_HF_DEFAULTS[model_type], **values}
    heads = int(v["num_attention_heads"])
    hidden = int(v["hidden_size"])
    return Shape(layers=int(v["num_hidden_layers"]), hidden=hidden, heads=heads,
                 kv_heads=int(v.get("num_key_value_heads") or heads),
                 head_dim=int(v.get("head_dim") or hidden // heads), intermediate=int(v["intermediate_size"]),
                 vocab=int(vocab if vocab is not None else v["vocab_size"]), tied=bool(v["tie_word_embeddings"]),
                 qkv_bias=model_type == "qwen2" or bool(v.get("attention_bias", False)), source=source)


def _local_config(name_or_path: str) -> Path | None:
    if name_or_path == "default":
        path = default_model_dir() / "config.json"
    else:
        path = Path(name_or_path).expanduser() / "config.json"
    return path if path.is_file() else None


def shape_of(name_or_path: str) -> Shape:
    """A model's shape: its local config.json (the converted default too), else the built-in table."""
    path = _local_config(name_or_path)
    if path is not None:
        return shape_from_values(json.loads(path.read_text()), source=str(path))
    if name_or_path in KNOWN_SHAPES:
        return KNOWN_SHAPES[name_or_path]
    raise PlanError(f"no shape for {name_or_path!r}: not a local folder with config.json and not one of "
                    f"{', '.join(KNOWN_SHAPES)}; set model.random_init to its config values (no download here)")


def resolve_shape(model_cfg) -> Shape:
    """`model.random_init` values (vocab from the tokenizer's model, as grpo.models builds it), else the model."""
    if model_cfg.random_init:
        vocab_source = model_cfg.tokenizer or model_cfg.name_or_path
        vocab = shape_of(vocab_source).vocab
        return shape_from_values(model_cfg.random_init, vocab=vocab,
                                 source=f"model.random_init (vocab {vocab} of {vocab_source})")
    return shape_of(model_cfg.name_or_path)


def linear_shapes(shape: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear of one decoder layer, by its Hugging Face module name."""
    H, I = shape.hidden, shape.intermediate
    return {"q_proj": (H, shape.q_width), "k_proj": (H, shape.kv_width), "v_proj": (H, shape.kv_width),
            "o_proj": (shape.q_width, H), "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}


def layer_params(shape: Shape) -> int:
    linears = sum(i * o for i, o in linear_shapes(shape).values())
    bias = (shape.q_width + 2 * shape.kv_width) if shape.qkv_bias else 0
    return linears + bias + 2 * shape.hidden  # + the two RMSNorm weights


def param_count(shape: Shape) -> int:
    embedding = shape.vocab * shape.hidden
    head = 0 if shape.tied else shape.vocab * shape.hidden
    return embedding + shape.layers * layer_params(shape) + shape.hidden + head


def lora_params(shape: Shape, rank: int, targets=LORA_TARGETS) -> int:
    """Adapter parameters: A (r x in) + B (out x r) for each adapted linear of each layer."""
    linears = linear_shapes(shape)
    unknown = sorted(set(targets) - set(linears))
    if unknown:
        raise PlanError(f"model.lora.targets {unknown} are not linears of a decoder layer: {', '.join(linears)}")
    return shape.layers * sum(rank * (linears[t][0] + linears[t][1]) for t in set(targets)) if rank > 0 else 0


def largest_tensor(shape: Shape) -> int:
    """Elements of the largest weight (the embedding / LM head for every model planned here)."""
    return max(shape.vocab * shape.hidden, shape.hidden * shape.intermediate)


def root_params(shape: Shape) -> int:
    """The FSDP2 root unit (grpo.distributed.shard_model): embedding, final norm, untied LM head."""
    return param_count(shape) - shape.layers * layer_params(shape)


# ----------------------------------------------------------------------------------------------------
# The run's settings, flattened from the config
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """Bytes per value: `compute` of activations, `stream` of the residual stream; `casts`: autocast over fp32
    weights (each linear keeps its own bf16 cast of its input); `trainable_norms`: norm weights get gradients."""
    compute: int
    stream: int
    casts: bool
    trainable_norms: bool


@dataclass(frozen=True)
class Setup:
    device: str  # "cuda" or "cpu"
    gpus: int
    memory_bytes: int
    lora_rank: int
    lora_targets: tuple[str, ...]
    checkpointing: bool
    cpu_offload: bool
    beta: float
    decode_weights: str
    prompts: int  # B
    group: int  # G
    prompt_tokens: int  # P_tok (cap)
    new_tokens: int  # T
    micro_rows: int
    micro_tokens: int
    chunk_tokens: int
    share_prompt: bool
    eval_rows: int  # run.eval_batch_size
    eval_examples: int  # run.eval_examples

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def prompts_per_gpu(self) -> int:
        return -(-self.prompts // self.gpus)

    @property
    def rows_per_gpu(self) -> int:
        return self.prompts_per_gpu * self.group

    @property
    def seq(self) -> int:
        return self.prompt_tokens + self.new_tokens

    @property
    def rows_per_micro_batch(self) -> int:
        rows = self.micro_tokens // self.seq if self.micro_tokens > 0 else self.micro_rows
        return max(1, min(rows, self.rows_per_gpu))

    @property
    def precision(self) -> Precision:
        if not self.cuda:
            return Precision(compute=4, stream=4, casts=False, trainable_norms=self.lora_rank == 0)
        if self.lora_rank > 0:
            return Precision(compute=2, stream=2, casts=False, trainable_norms=False)
        if self.gpus > 1:  # FSDP2 mixed precision: bf16 all-gathered parameters, no autocast casts
            return Precision(compute=2, stream=2, casts=False, trainable_norms=True)
        return Precision(compute=2, stream=4, casts=True, trainable_norms=True)


def setup_from_config(cfg, gpus: int = 1, memory_gib: float = 80.0, device: str = "cuda") -> Setup:
    if gpus < 1:
        raise PlanError("--gpus must be >= 1")
    if device == "cpu" and gpus > 1:
        raise PlanError("a CPU plan is one process: drop --gpus or plan --device cuda")
    g = cfg.grpo
    return Setup(device=device, gpus=gpus, memory_bytes=int(memory_gib * GIB), lora_rank=cfg.model.lora.rank,
                 lora_targets=tuple(cfg.model.lora.targets), checkpointing=cfg.model.gradient_checkpointing,
                 cpu_offload=cfg.model.cpu_offload and device == "cuda" and gpus > 1, beta=g.beta,
                 decode_weights=cfg.sampling.decode_weights, prompts=g.batch_prompts, group=g.group_size,
                 prompt_tokens=cfg.task.max_prompt_tokens, new_tokens=cfg.sampling.max_new_tokens,
                 micro_rows=g.micro_batch_size, micro_tokens=g.micro_batch_tokens,
                 chunk_tokens=g.logprob_chunk_tokens,
                 share_prompt=g.logprobs == "fast", eval_rows=cfg.run.eval_batch_size,
                 eval_examples=cfg.run.eval_examples)


# ----------------------------------------------------------------------------------------------------
# Pure formulas: numbers in, bytes out
# ----------------------------------------------------------------------------------------------------
def aligned(n: int, to: int = SLOT_ALIGN) -> int:
    return -(-n // to) * to


def kv_bytes_per_token(shape: Shape, value_bytes: int) -> int:
    return shape.layers * 2 * shape.kv_width * value_bytes


def kv_tokens_shared(prompts: int, group: int, prompt_tokens: int, new_tokens: int) -> int:
    """Each prompt cached once for its group: B_g*P + B_g*G*T."""
    return prompts * prompt_tokens + prompts * group * new_tokens


def kv_tokens_naive(prompts: int, group: int, prompt_tokens: int, new_tokens: int) -> int:
    """Every row caches its own prompt: B_g*G*(P + T)."""
    return prompts * group * (prompt_tokens + new_tokens)


def grid_cache_used(shape: Shape, prompts: int, group: int, sms: int = CUDA_SMS) -> bool:
    """grpo.fast.decode.SlotDecoder._grid_fills_gpu: one block per (prompt, kv head, 64 query positions)."""
    if group <= 1:
        return False
    r = shape.heads // shape.kv_heads
    return 2 * prompts * shape.kv_heads * -(-group * r // 64) >= sms


def kv_cache(shape: Shape, cuda: bool, prompts: int, group: int, prompt_tokens: int,
             new_tokens: int) -> tuple[int, int, str]:
    """(bytes, cached tokens, layout) of the sampler's KV cache, as grpo/fast/decode.py lays it out."""
    P, T = prompt_tokens, new_tokens
    if not cuda:  # split cache: prompts once, each row's completion slots (L - P of them)
        tokens, layout = prompts * P + prompts * group * (aligned(P + T) - P), "split (CPU)"
    elif grid_cache_used(shape, prompts, group):
        tokens, layout = prompts * (aligned(P) + aligned(T * group)) + prompts * P, "grid (CUDA)"
    else:  # every row's slots, and the prefill's cache while it is copied in
        tokens, layout = prompts * group * aligned(P + T) + prompts * P, "slot (CUDA)"
    return tokens * kv_bytes_per_token(shape, 2 if cuda else 4), tokens, layout


def decoder_weight_copies(shape: Shape, cuda: bool, free_bytes: float, decode_copy: bool) -> int:
    """The decoder's extra weights while it samples: CUDA stacked (q|k|v), (gate|up) bf16 weights where they
    take under a quarter of the free memory (only when sampling from the bf16 copy); CPU MKL-packed copies."""
    lin = linear_shapes(shape)
    qkv = sum(i * o for n, (i, o) in lin.items() if n in ("q_proj", "k_proj", "v_proj")) * shape.layers
    gate_up = (lin["gate_proj"][0] * lin["gate_proj"][1] + lin["up_proj"][0] * lin["up_proj"][1]) * shape.layers
    o_down = (lin["o_proj"][0] * lin["o_proj"][1] + lin["down_proj"][0] * lin["down_proj"][1]) * shape.layers
    head = shape.vocab * shape.hidden
    if cuda:
        stacked = 2 * (qkv + gate_up)
        return stacked if decode_copy and stacked < STACK_FREE_FRACTION * free_bytes else 0
    if 4 * (qkv + gate_up + o_down + head) > PACK_LIMIT_BYTES:
        return 0
    return 4 * (2 * (qkv + gate_up + head) + o_down)  # stacked/scaled copies + packed copies


def prefill_working(shape: Shape, prec: Precision, prompts: int, prompt_tokens: int, rows: int) -> int:
    """Prefill (no gradient) keeps one layer's intermediates at a time, plus its mask and the decode logits."""
    tokens = prompts * prompt_tokens
    layer = tokens * prec.compute * (3 * shape.intermediate + 4 * shape.hidden)
    return layer + prompts * prompt_tokens ** 2 + 3 * 4 * rows * shape.vocab


def norm_bytes(shape: Shape, prec: Precision, consumers: int) -> int:
    """Saved per token by one RMSNorm and the linears reading it (see the module docstring)."""
    H = shape.hidden
    b = 4 * H
    if prec.trainable_norms:
        b += prec.stream * H
    b += consumers * prec.compute * H if prec.casts else prec.stream * H
    return b


def attention_kv_width(shape: Shape) -> int:
    """Key/value width the attention keeps for backward: Hugging Face repeats them to all heads (repeat_kv)
    whenever a padding mask is passed, as in every GRPO batch."""
    return shape.q_width


def layer_activation_bytes(shape: Shape, prec: Precision, lora_rank: int = 0, lora_targets: int = 0) -> int:
    """A: bytes saved for backward per token by one decoder layer."""
    c = prec.compute
    kv = attention_kv_width(shape)
    attention = c * (3 * shape.q_width + 2 * kv) + 4 * shape.heads  # q, k, v, output, o_proj input; logsumexp
    mlp = 4 * c * shape.intermediate  # gate, up, SiLU(gate), the product (down_proj's input)
    adapters = c * lora_rank * lora_targets
    return norm_bytes(shape, prec, 3) + norm_bytes(shape, prec, 2) + attention + mlp + adapters


def backward_working_bytes(shape: Shape, prec: Precision) -> int:
    """W: per token, the gradients of one layer's intermediates alive while its backward runs."""
    return 3 * prec.compute * shape.intermediate + 4 * prec.stream * shape.hidden


def distinct_prompts(rows: int, group: int, total_rows: int) -> int:
    """Most distinct prompts in one micro-batch: slices of `rows` consecutive rows out of `total_rows`, whose
    groups of `group` rows share a prompt (a slice may straddle two groups)."""
    return max(len({r // group for r in range(start, min(start + rows, total_rows))})
               for start in range(0, total_rows, rows))


def update_activations(shape: Shape, prec: Precision, s: Setup, checkpointing: bool) -> int:
    """Activations of one micro-batch's forward + backward (the decoder body, the final norm, the mask)."""
    n, P, T, L = s.rows_per_micro_batch, s.prompt_tokens, s.new_tokens, shape.layers
    targets = len(set(s.lora_targets)) if s.lora_rank > 0 else 0
    A = layer_activation_bytes(shape, prec, s.lora_rank, targets)
    W = backward_working_bytes(shape, prec)
    c, kv = prec.compute, attention_kv_width(shape)
    if checkpointing:  # HF checkpointing runs whole rows (completion_logprobs skips prompt sharing then)
        tokens = n * (P + T)
        body = tokens * (L * prec.stream * shape.hidden + A + W)
        mask = n * (P + T) ** 2
    elif s.share_prompt:
        U = distinct_prompts(n, s.group, s.rows_per_gpu)
        tokens = U * P + n * T
        body = L * (U * P * A + n * T * (A - 2 * c * kv) + n * (P + T) * 2 * c * kv) + tokens * W
        mask = U * P * P + n * T * (P + T)
    else:
        tokens = n * (P + T)
        body = tokens * (L * A + W)
        mask = n * (P + T) ** 2
    final = tokens * norm_bytes(shape, prec, 1) + n * T * prec.stream * shape.hidden
    return body + final + mask


def logprob_chunk_bytes(shape: Shape, prec: Precision, s: Setup) -> int:
    """One chunk's logits and fp32 softmax temporaries, and the LM head's gradient before accumulation."""
    tokens = min(s.chunk_tokens, s.rows_per_micro_batch * s.new_tokens)
    logits = tokens * shape.vocab * (prec.compute + 12)
    head_trains = s.lora_rank == 0 and not (s.cuda and s.gpus > 1)  # FSDP: counted in the gather buffers
    head_grad = shape.vocab * shape.hidden * (prec.compute + (4 if prec.casts else 0)) if head_trains else 0
    return logits + head_grad


def fsdp_buffers(shape: Shape, full_finetune: bool) -> int:
    """FSDP2 working buffers during forward and backward (grpo.distributed.shard_model: each decoder layer a
    unit, the rest the root, all-gathered in bf16): the root's bf16 parameters (gathered for the whole
    `completion_logprobs`), two layers' (the running one and the prefetched one); for a full fine-tune the
    root's unsharded bf16 gradient (the LM head's from the first chunk on) and one layer's fp32 gradient
    before its reduce-scatter. (The root's fp32 reduce-scatter copy at the very end comes when the
    activations are gone.)"""
    root, layer = root_params(shape), layer_params(shape)
    params = 2 * root + 2 * 2 * layer
    return params + (2 * root + 4 * layer if full_finetune else 0)


# ----------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------
@dataclass
class Term:
    name: str
    bytes: int
    phase: str  # resident, rollout, eval, update, step
    where: str = "gpu"  # gpu or cpu (offloaded)
    note: str = ""
    counted: bool = True


@dataclass
class Plan:
    setup: Setup
    shape: Shape
    params: int
    trainable: int
    terms: list[Term]
    phases: dict[str, int]
    peak: int
    margin: int
    total: int
    capacity: int
    fits: bool
    kv: dict
    cpu_bytes: int
    notes: list[str] = field(default_factory=list)


def decode_copy_made(shape: Shape, s: Setup, gpu_before_adam: int) -> bool:
    """grpo.train: a sharded (N > 1) or LoRA model is always sampled through its copy; otherwise on CUDA
    `decode_weights` decides (`auto`: where the copy takes under half the free memory at the first
    generation, before the AdamW state exists); on the CPU the fp32 model samples itself."""
    if s.gpus > 1 or s.lora_rank > 0:
        return True
    if not s.cuda:
        return False
    return {"master": False, "copy": True}.get(
        s.decode_weights, 2 * param_count(shape) < 0.5 * (s.memory_bytes - gpu_before_adam - CUDA_MARGIN_FIXED))


def resident_terms(shape: Shape, s: Setup) -> list[Term]:
    """Weights, adapters, AdamW moments, reference, decode copy (and the CPU's runtime): held all step."""
    N, P, lora = s.gpus, param_count(shape), s.lora_rank > 0
    trainable = lora_params(shape, s.lora_rank, s.lora_targets) if lora else P
    where = "cpu" if s.cpu_offload else "gpu"
    shard = f", FSDP2-sharded / {N}" if N > 1 else ""
    if lora:
        terms = [Term("weights (frozen base)", (2 if s.cuda else 4) * P // N, "resident", where,
                      f"{'bf16' if s.cuda else 'fp32'} base, {P / 1e9:.3g} B parameters{shard}"),
                 Term("LoRA adapters", 4 * trainable // N, "resident", where,
                      f"fp32, rank {s.lora_rank}, {trainable / 1e6:.3g} M parameters")]
    else:
        terms = [Term("weights", 4 * P // N, "resident", where, f"fp32 master, {P / 1e9:.3g} B parameters{shard}")]
    terms.append(Term("optimizer state", 8 * trainable // N, "resident", where, "AdamW moments, fp32"))
    if s.beta > 0 and not lora:  # sharded like the weights, never offloaded
        terms.append(Term("reference model", 4 * P // N, "resident", "gpu", "grpo.beta > 0: frozen fp32 copy"))
    before_adam = sum(t.bytes for t in terms if t.where == "gpu" and t.name != "optimizer state")
    made = decode_copy_made(shape, s, before_adam)
    value_bytes = 2 if s.cuda else 4
    if made:
        why = "sharded or LoRA: always" if N > 1 or lora else f"decode_weights={s.decode_weights}"
        note = f"{'bf16' if s.cuda else 'fp32'} copy of the merged weights, every GPU, not sharded ({why})"
    elif s.cuda:
        note = ("decodes from the master weights (decode_weights=master)" if s.decode_weights == "master" else
                "decode_weights=auto: would take over half the free memory, not made")
    else:
        note = "CPU: none, the fp32 model samples directly"
    terms.append(Term("decode copy", value_bytes * P if made else 0, "resident", "gpu", note))
    if not s.cuda:
        terms.append(Term("runtime", CPU_RUNTIME_BYTES, "resident", "gpu", "tokenizer, framework scratch (measured)"))
    return terms


def load_peak(shape: Shape, s: Setup) -> int:
    """Start-up on CUDA (grpo.policy.prepare_training), before sharding: every process loads the full fp32 model
    onto its GPU, deep-copies the reference (beta > 0, full fine-tune) and makes the bf16 decode copy (N > 1
    or LoRA; LoRA first casts its frozen base to bf16), then shards."""
    if not s.cuda:
        return 0
    P = param_count(shape)
    if s.lora_rank > 0:
        return 4 * P  # fp32 as loaded; then bf16 base + bf16 copy
    reference = 4 * P if s.beta > 0 else 0
    return 4 * P + reference + (2 * P if s.gpus > 1 else 0)


def sampling_terms(shape: Shape, s: Setup, resident: int, decode_copy: bool) -> tuple[list[Term], tuple]:
    """KV caches and decoder working sets of the rollout and of the greedy evaluation; and the rollout's
    (bytes, tokens, layout) of the KV cache."""
    prec, N = s.precision, s.gpus
    # the decoder decides on stacked weights when it is built, before it allocates its KV cache
    extra = decoder_weight_copies(shape, s.cuda, s.memory_bytes - resident - CUDA_MARGIN_FIXED, decode_copy)
    copies = ("stacked bf16 q|k|v, gate|up + " if s.cuda else "MKL-packed fp32 linears + ") if extra else ""
    kv = kv_cache(shape, s.cuda, s.prompts_per_gpu, s.group, s.prompt_tokens, s.new_tokens)
    per_token = kv_bytes_per_token(shape, 2 if s.cuda else 4)
    eval_prompts = min(s.eval_rows, -(-s.eval_examples // N))  # each rank decodes every N-th item, in batches
    ev_bytes, _, ev_layout = kv_cache(shape, s.cuda, eval_prompts, 1, s.prompt_tokens, s.new_tokens)
    terms = [Term("KV cache (rollout)", kv[0], "rollout", "gpu",
                  f"{kv[2]}: {kv[1]:,} cached tokens of {per_token:,} B ({s.prompts_per_gpu} prompts x {s.group}, "
                  f"prompt <= {s.prompt_tokens} + {s.new_tokens} new)"),
             Term("sampler working set", extra + prefill_working(shape, prec, s.prompts_per_gpu, s.prompt_tokens,
                                                                  s.rows_per_gpu), "rollout", "gpu",
                  f"{copies}prefill of {s.prompts_per_gpu} prompts"),
             Term("KV cache (evaluation)", ev_bytes, "eval", "gpu",
                  f"{ev_layout}: {eval_prompts} prompts x 1 (run.eval_batch_size), greedy"),
             Term("sampler working set (evaluation)", extra + prefill_working(shape, prec, eval_prompts,
                                                                               s.prompt_tokens, eval_prompts),
                  "eval", "gpu", f"{copies}prefill of {eval_prompts} prompts")]
    return terms, kv


def update_terms(shape: Shape, s: Setup, trainable: int) -> list[Term]:
    """Gradients, autocast casts or FSDP2 buffers, activations (both ways), the log-prob chunk."""
    N, prec, lora = s.gpus, s.precision, s.lora_rank > 0
    where = "cpu" if s.cpu_offload else "gpu"
    micro_batches = -(-s.rows_per_gpu // s.rows_per_micro_batch)
    # With one micro-batch the gradients fill in while the activations are freed (backward goes layer by
    # layer), so they do not add to the activations' peak; from the second micro-batch on they do.
    terms = [Term("gradients", 4 * trainable // N, "update", where,
                  "fp32" + (f", sharded / {N}" if N > 1 else "") +
                  ("" if micro_batches > 1 else "; one micro-batch: filled as activations are freed"),
                  counted=micro_batches > 1)]
    if s.cuda and N == 1 and not lora:
        terms.append(Term("autocast bf16 weight casts", 2 * param_count(shape), "update", "gpu",
                          "autocast caches a bf16 cast of every weight for the whole forward"))
    if s.cuda and N > 1:
        terms.append(Term("FSDP2 gather buffers", fsdp_buffers(shape, not lora), "update", "gpu",
                          "bf16 params of the root and 2 layers" + ("" if lora else
                                                                     "; root bf16 grad, a layer's fp32 grad")))
    n = s.rows_per_micro_batch
    mb = f"micro-batch {n} rows x {s.seq} tokens, {micro_batches} per step"
    return terms + [
        Term("activations, checkpointing", update_activations(shape, prec, s, True), "update", "gpu", mb,
             counted=s.checkpointing),
        Term("activations, no checkpointing", update_activations(shape, prec, s, False), "update", "gpu",
             mb + (", prompts shared" if s.share_prompt else ""), counted=not s.checkpointing),
        Term("log-prob chunk + head grad", logprob_chunk_bytes(shape, prec, s), "update", "gpu",
             f"{min(s.chunk_tokens, n * s.new_tokens)} tokens x {shape.vocab} vocab")]


def step_terms(shape: Shape, s: Setup, trainable: int) -> list[Term]:
    """The gradients, still alive, and AdamW's temporaries."""
    N, where = s.gpus, "cpu" if s.cpu_offload else "gpu"
    largest = largest_tensor(shape) if s.lora_rank == 0 else s.lora_rank * shape.intermediate
    if s.cuda and not s.cpu_offload:
        temp, note = 4 * trainable // N, "foreach AdamW: sqrt(v) of every tensor at once"
    else:  # no foreach on CPU tensors: a per-tensor loop, two temporaries of the largest (shard)
        temp, note = 2 * 4 * largest // N, "AdamW on the CPU (per-tensor loop): two of the largest tensor"
    return [Term("gradients (step)", 4 * trainable // N, "step", where, "still alive during the step"),
            Term("optimizer step temporaries", temp, "step", where, note)]


def plan(shape: Shape, s: Setup) -> Plan:
    """Every term, the phases, the peak, the margin and the verdict."""
    P = param_count(shape)
    trainable = lora_params(shape, s.lora_rank, s.lora_targets) if s.lora_rank > 0 else P
    terms = resident_terms(shape, s)
    resident = sum(t.bytes for t in terms if t.where == "gpu")
    decode_copy = any(t.name == "decode copy" and t.bytes > 0 for t in terms)
    sampling, (_, kv_tokens, layout) = sampling_terms(shape, s, resident, decode_copy)
    terms += sampling + update_terms(shape, s, trainable) + step_terms(shape, s, trainable)

    phases = {ph: sum(t.bytes for t in terms if t.phase == ph and t.counted and t.where == "gpu")
              for ph in ("resident", "rollout", "eval", "update", "step")}
    if not s.cpu_offload:  # one micro-batch: at the end of its backward, the gradients alone
        phases["update"] = max(phases["update"], 4 * trainable // s.gpus)
    phases["load"] = load_peak(shape, s)
    steady = phases["resident"] + max(phases["rollout"], phases["eval"], phases["update"], phases["step"])
    peak = max(steady, phases["load"])
    margin = int(CUDA_MARGIN_FRACTION * peak + CUDA_MARGIN_FIXED) if s.cuda else int(CPU_MARGIN_FRACTION * peak)
    cpu_bytes = sum(t.bytes for t in terms if t.where == "cpu" and t.name != "gradients (step)")
    B_g, G, P_tok, T = s.prompts_per_gpu, s.group, s.prompt_tokens, s.new_tokens
    kv = {"layout": layout, "tokens_counted": kv_tokens, "tokens_shared": kv_tokens_shared(B_g, G, P_tok, T),
          "tokens_naive": kv_tokens_naive(B_g, G, P_tok, T),
          "bytes_per_token": kv_bytes_per_token(shape, 2 if s.cuda else 4)}
    kv["bytes_shared"] = kv["tokens_shared"] * kv["bytes_per_token"]
    kv["bytes_naive"] = kv["tokens_naive"] * kv["bytes_per_token"]
    notes = [f"prompt length is the cap task.max_prompt_tokens={P_tok}: real prompts may be shorter, so the "
             "prompt's share of the KV cache and activations is an upper bound"]
    if s.cpu_offload:
        notes.append("model.cpu_offload needs torchrun (FSDP2's CPUOffloadPolicy); CPU bytes are per process")
    if not s.cuda and s.checkpointing:
        notes.append("CPU + gradient checkpointing: glibc's default malloc kept up to ~2 GiB (70%) more RSS than the "
                     "live bytes in measurements (docs/memory.md); MALLOC_MMAP_THRESHOLD_=131072 removes it")
    return Plan(setup=s, shape=shape, params=P, trainable=trainable, terms=terms, phases=phases, peak=peak,
                margin=margin, total=peak + margin, capacity=s.memory_bytes, fits=peak + margin <= s.memory_bytes,
                kv=kv, cpu_bytes=cpu_bytes, notes=notes)


# ----------------------------------------------------------------------------------------------------
# Suggestions: re-plan with one change at a time, then cumulatively
# ----------------------------------------------------------------------------------------------------
def candidate_changes(s: Setup) -> list[tuple[str, dict]]:
    """(the override a user would type, the Setup fields it changes), least disruptive first."""
    out: list[tuple[str, dict]] = []
    if not s.checkpointing:
        out.append(("model.gradient_checkpointing=true", {"checkpointing": True}))
    if s.cuda and s.decode_weights != "master" and s.gpus == 1 and s.lora_rank == 0:
        out.append(("sampling.decode_weights=master", {"decode_weights": "master"}))
    if s.micro_tokens > 0 and s.micro_tokens > s.seq:
        out.append((f"grpo.micro_batch_tokens={s.seq}", {"micro_tokens": s.seq}))
    elif s.micro_tokens <= 0 and s.rows_per_micro_batch > 1:
        out.append((f"grpo.micro_batch_size={max(1, s.rows_per_micro_batch // 2)}",
                    {"micro_rows": max(1, s.rows_per_micro_batch // 2)}))
        out.append(("grpo.micro_batch_size=1", {"micro_rows": 1}))
    if s.chunk_tokens > 256:
        out.append(("grpo.logprob_chunk_tokens=256", {"chunk_tokens": 256}))
    if s.lora_rank == 0:
        out.append(("model.lora.rank=16", {"lora_rank": 16}))
    if s.cuda:
        for gpus in (2, 4, 8):
            if gpus > s.gpus:
                out.append((f"--gpus {gpus}", {"gpus": gpus}))
        if not s.cpu_offload and s.gpus > 1:  # FSDP2's offload: only with 2+ processes
            out.append(("model.cpu_offload=true", {"cpu_offload": True}))
    if s.new_tokens > 64:
        out.append((f"sampling.max_new_tokens={s.new_tokens // 2}", {"new_tokens": s.new_tokens // 2}))
    return out


def suggest(shape: Shape, s: Setup) -> dict:
    """Each change alone with its figures; and, where none fits alone, changes added in order until one does."""
    singles = []
    for label, change in candidate_changes(s):
        p = plan(shape, replace(s, **change))
        singles.append({"change": label, "total_bytes": p.total, "fits": p.fits})
    combined, current = [], s
    if not any(x["fits"] for x in singles):
        for label, change in candidate_changes(s):
            current = replace(current, **change)
            p = plan(shape, current)
            combined.append({"change": label, "total_bytes": p.total, "fits": p.fits})
            if p.fits:
                break
    return {"single": singles, "combined": combined}


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------
def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def render(p: Plan, suggestions: dict | None, title: str) -> str:
    s = p.setup
    training = f"LoRA rank {s.lora_rank}, {p.trainable / 1e6:.3g} M trainable" if s.lora_rank else "full fine-tune"
    lines = [title,
             f"model: {p.params / 1e9:.4g} B parameters ({p.shape.layers} layers, hidden {p.shape.hidden}, "
             f"{p.shape.heads} heads / {p.shape.kv_heads} kv, intermediate {p.shape.intermediate}, vocab "
             f"{p.shape.vocab}, {'tied' if p.shape.tied else 'untied'}; {p.shape.source})",
             f"training: {training}, {s.device}" + (f" x {s.gpus} GPUs (FSDP2)" if s.gpus > 1 else "")
             + f", checkpointing {'on' if s.checkpointing else 'off'}"
             + (", cpu_offload" if s.cpu_offload else "")
             + f"; rollout {s.prompts_per_gpu} prompts x {s.group} per {'GPU' if s.cuda else 'process'}, "
               f"prompt <= {s.prompt_tokens} + {s.new_tokens} new tokens",
             "",
             f"{'term':34s} {'phase':9s} {'GiB':>8s}  note"]
    for t in p.terms:
        mark = "" if t.counted else " (not counted)"
        where = " [CPU]" if t.where == "cpu" else ""
        lines.append(f"{t.name:34s} {t.phase:9s} {gib(t.bytes):>8s}  {t.note}{where}{mark}")
    ph = p.phases
    big = max(("rollout", "eval", "update", "step"), key=lambda k: ph[k])
    steady = ph["resident"] + ph[big]
    lines += ["",
              f"phases ({'per GPU' if s.cuda else 'RSS growth'}): resident {gib(ph['resident'])} + rollout "
              f"{gib(ph['rollout'])} | eval {gib(ph['eval'])} | update {gib(ph['update'])} | "
              f"step {gib(ph['step'])} GiB" + (f"; start-up {gib(ph['load'])} GiB" if ph["load"] else ""),
              (f"peak = resident + {big} = {gib(steady)} GiB" if steady >= ph["load"] else
               f"peak = start-up {gib(ph['load'])} GiB (the steady state: {gib(steady)})")
              + f"; margin {gib(p.margin)} GiB "
              + ("(10% + 1 GiB: CUDA context, workspaces, fragmentation)" if s.cuda else
                 "(25%: freed heap memory stays in RSS, fragmentation)"),
              f"total {gib(p.total)} GiB of {gib(p.capacity)} GiB per {'GPU' if s.cuda else 'machine'}: "
              + ("FITS" if p.fits else f"DOES NOT FIT (over by {gib(p.total - p.capacity)} GiB)")]
    if p.cpu_bytes:
        lines.append(f"CPU memory per process (offloaded): {gib(p.cpu_bytes)} GiB")
    lines.append(f"KV cache tokens per {'GPU' if s.cuda else 'process'}: {p.kv['tokens_counted']:,} counted "
                 f"({p.kv['layout']}); prompt once per group: {p.kv['tokens_shared']:,}; naive "
                 f"rows x (prompt + new): {p.kv['tokens_naive']:,}")
    lines += [f"note: {n}" for n in p.notes]
    if suggestions and not p.fits:
        lines += ["", f"what to change (each alone; total GiB per {'GPU' if s.cuda else 'machine'} after it):"]
        for x in suggestions["single"]:
            verdict = "fits" if x["fits"] else "does not fit"
            lines.append(f"  {x['change']:40s} {gib(x['total_bytes']):>8s}  {verdict}")
        if suggestions["combined"]:
            lines.append("none fits alone; together, in this order:")
            for x in suggestions["combined"]:
                verdict = "fits" if x["fits"] else "does not fit"
                lines.append(f"  + {x['change']:38s} {gib(x['total_bytes']):>8s}  {verdict}")
    return "\n".join(lines)


def plan_to_json(p: Plan, suggestions: dict | None) -> dict:
    return {"setup": asdict(p.setup), "shape": asdict(p.shape), "params": p.params, "trainable": p.trainable,
            "terms": [asdict(t) for t in p.terms], "phases": p.phases, "peak_bytes": p.peak,
            "margin_bytes": p.margin, "total_bytes": p.total, "capacity_bytes": p.capacity, "fits": p.fits,
            "sum_all_terms_bytes": sum(t.bytes for t in p.terms if t.counted and t.where == "gpu"
                                       and t.name != "gradients (step)"),
            "cpu_bytes": p.cpu_bytes, "kv": p.kv, "notes": p.notes, "suggestions": suggestions}


# ----------------------------------------------------------------------------------------------------
# Measurement (CPU): the real pieces of one step in a fresh process, peak RSS growth
# ----------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")


def _measure_worker(cfg, seed: int = 0) -> dict:
    """Runs in its own process (fresh allocator, clean baseline): the resident model and AdamW state, a rollout
    of the planned shape, then one update over it (micro-batches, clipping, AdamW step). Peak RSS per phase."""
    import time

    import torch

    from grpo.batching import plan_micro_batches
    from grpo.fast import sample
    from grpo.functional import group_advantages, grpo_loss
    from grpo.logprobs import completion_logprobs, completion_logprobs_fast
    from grpo.policy import load_policy, make_optimizer

    torch.manual_seed(seed)
    cfg.model.device = "cpu"
    base = _status_kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    policy = load_policy(cfg.model, seed=seed)
    model = policy.model
    g = cfg.grpo
    optimizer, _ = make_optimizer(model, g.lr, g.weight_decay, g.warmup_steps, g.adam_betas)
    for p in model.parameters():  # the AdamW state exists from the first step on: create it now (zero grads)
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    setup_peak = _status_kib("VmHWM")
    resident = _status_kib("VmRSS")
    _reset_peak()

    B, G, P, T = g.batch_prompts, g.group_size, cfg.task.max_prompt_tokens, cfg.sampling.max_new_tokens
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    # prompts of P and P - 8 tokens: left padding, hence an attention mask, as in real batches
    prompts = [torch.randint(3, vocab, (P - 8 * (b % 2),), generator=gen).tolist() for b in range(B)]
    t_setup = time.perf_counter()
    rollout = sample(model, prompts, group_size=G, max_new_tokens=T, eos_ids=[], pad_id=policy.pad_id,
                     temperature=cfg.sampling.temperature, generator=gen)
    rollout_peak = _status_kib("VmHWM")
    _reset_peak()
    t_rollout = time.perf_counter()

    micro = plan_micro_batches(rollout.prompt_mask, rollout.completion_mask, g.micro_batch_size, g.micro_batch_tokens)
    rewards = torch.rand(B * G, generator=gen)
    advantages, _ = group_advantages(rewards, G, scale_by_std=g.scale_rewards_by_std)

    def logprobs_of(rows):
        args = (rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows],
                rollout.completion_mask[rows])
        if g.logprobs == "reference":
            return completion_logprobs(model, *args, temperature=cfg.sampling.temperature,
                                       chunk_tokens=g.logprob_chunk_tokens)
        return completion_logprobs_fast(model, *args, temperature=cfg.sampling.temperature,
                                        chunk_tokens=g.logprob_chunk_tokens, prompt_index=rollout.prompt_index[rows])

    model.train()
    mask = rollout.completion_mask  # (N, T)
    for rows in micro:  # the GRPO update of grpo/train.py, phase 6, with mu = 1 and no KL
        logp = logprobs_of(rows)  # (n, T)
        loss, _ = grpo_loss(logp, logp.detach(), None, advantages[rows], mask[rows], total_tokens=float(mask.sum()),
                            loss_agg=g.loss_agg, total_seqs=float(B * G), max_completion_len=T)
        loss.backward()
    update_peak = _status_kib("VmHWM")
    _reset_peak()
    torch.nn.utils.clip_grad_norm_(model.parameters(), g.max_grad_norm if g.max_grad_norm > 0 else math.inf)
    optimizer.step()
    step_peak = _status_kib("VmHWM")
    t_end = time.perf_counter()
    kib = 1024
    return {"baseline_bytes": base * kib, "resident_bytes": (resident - base) * kib,
            "setup_peak_bytes": (setup_peak - base) * kib, "rollout_peak_bytes": (rollout_peak - base) * kib,
            "update_peak_bytes": (update_peak - base) * kib, "step_peak_bytes": (step_peak - base) * kib,
            "peak_bytes": (max(rollout_peak, update_peak, step_peak) - base) * kib,
            "micro_batches": len(micro), "seconds": t_end - t0, "setup_s": t_setup - t0,
            "rollout_s": t_rollout - t_setup, "update_s": t_end - t_rollout, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def measure(config: str | None, overrides: list[str], live_malloc: bool = False, timeout: float = 1800) -> dict:
    """Run `_measure_worker` in a fresh Python process (CPU) and return its figures. `live_malloc` fixes glibc's
    mmap threshold at 128 KiB, so every tensor over it is returned to the system when freed and RSS follows the
    live bytes (the default threshold rises to 32 MiB as tensors are freed, and freed heap memory stays in RSS:
    what a real run sees)."""
    cmd = [sys.executable, "-m", "experiments.plan_memory", "--measure-worker",
           *(["--config", config] if config else []), *overrides]
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if live_malloc else {})}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(p: Plan, m: dict) -> list[dict]:
    """Predicted vs measured, per phase (RSS growth over the process's baseline after imports)."""
    ph = p.phases
    rows = [("resident (weights, AdamW state, runtime)", ph["resident"], m["resident_bytes"]),
            ("rollout peak", ph["resident"] + ph["rollout"], m["rollout_peak_bytes"]),
            ("update peak (forward + backward)", ph["resident"] + ph["update"], m["update_peak_bytes"]),
            ("step peak (clip + AdamW)", ph["resident"] + ph["step"], m["step_peak_bytes"]),
            ("peak of these phases (evaluation not run)",
             ph["resident"] + max(ph["rollout"], ph["update"], ph["step"]), m["peak_bytes"])]
    peak = rows[-1][1]
    rows.append(("that peak + the margin", peak + int(CPU_MARGIN_FRACTION * peak), m["peak_bytes"]))
    return [{"what": w, "predicted_bytes": a, "measured_bytes": b, "ratio": a / b if b > 0 else float("nan")}
            for w, a, b in rows]


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def _pick_device(arg: str, model_device: str, gpus_given: bool) -> str:
    if arg != "auto":
        return arg
    if model_device.startswith("cuda"):
        return "cuda"
    if model_device == "cpu":
        return "cpu"
    return "cuda" if gpus_given or Path("/proc/driver/nvidia/gpus").is_dir() else "cpu"


def _machine_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML file in experiments/configs/")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs (FSDP2 under torchrun); default 1")
    parser.add_argument("--gpu-memory", type=float, default=None,
                        help="usable GiB per GPU (default 80; on the CPU: this machine's RAM)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="plan a CUDA or a CPU run (auto: model.device, else cuda if --gpus is given or a GPU "
                             "is visible, else cpu)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--measure", action="store_true",
                        help="also run the step's pieces on this CPU and print measured peak RSS next to the plan")
    parser.add_argument("--live-malloc", action="store_true",
                        help="with --measure: fix glibc's mmap threshold so that RSS follows the live bytes")
    parser.add_argument("--measure-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.lora.rank=16")
    args = parser.parse_args(argv)

    from experiments.config import load_experiment
    from grpo.config import ConfigError

    try:
        cfg = load_experiment(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.measure_worker:
        print(json.dumps(_measure_worker(cfg)))
        return 0
    device = "cpu" if args.measure else _pick_device(args.device, cfg.model.device, args.gpus is not None)
    memory = args.gpu_memory if args.gpu_memory is not None else (80.0 if device == "cuda" else _machine_ram() / GIB)
    try:
        shape = resolve_shape(cfg.model)
        setup = setup_from_config(cfg, gpus=args.gpus or 1, memory_gib=memory, device=device)
        p = plan(shape, setup)
    except PlanError as e:
        print(f"plan error: {e}", file=sys.stderr)
        return 2
    if cfg.model.cpu_offload and not setup.cpu_offload:
        p.notes.append("model.cpu_offload is ignored here: FSDP2 (and its offload) runs only under torchrun with "
                       "2+ processes on CUDA")
    if device == "cpu" and args.device == "auto" and not args.measure and cfg.model.device == "auto":
        p.notes.append("planned for the CPU (no GPU visible here); --device cuda or --gpus N plans a GPU run")
    suggestions = suggest(shape, setup)
    title = f"memory plan: {args.config or '(defaults)'} {' '.join(args.overrides)}".rstrip()
    measured = None
    if args.measure:
        try:
            measured = measure(args.config, args.overrides, live_malloc=args.live_malloc)
        except (RuntimeError, subprocess.TimeoutExpired) as e:  # e.g. the default model not converted yet
            print(f"measurement failed: {e}", file=sys.stderr)
            return 1
    if args.json:
        out = plan_to_json(p, suggestions)
        if measured is not None:
            out["measured"] = measured
            out["comparison"] = compare(p, measured)
        print(json.dumps(out, indent=1))
    else:
        print(render(p, suggestions, title))
        if measured is not None:
            print(f"\nmeasured on this CPU (torch {measured['torch']}, {measured['threads']} threads, "
                  f"{measured['micro_batches']} micro-batches, {measured['seconds']:.0f} s, "
                  f"{'live' if args.live_malloc else 'default'} malloc), peak RSS growth over the baseline after "
                  f"imports ({gib(measured['baseline_bytes'])} GiB), GiB:")
            print(f"  {'':42s} {'predicted':>9s} {'measured':>9s} {'ratio':>6s}")
            for row in compare(p, measured):
                print(f"  {row['what']:42s} {gib(row['predicted_bytes']):>9s} {gib(row['measured_bytes']):>9s} "
                      f"{row['ratio']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
