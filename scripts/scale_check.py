"""A few GRPO steps of our own loop on a random model of a real shape: what the memory planner predicts,
measured. The toy task (experiments/toy.py) and a word tokenizer of the model's vocabulary stand in for the
data and the real tokenizer, so nothing needs to be downloaded or copied to the machine.

    python scripts/scale_check.py --shape qwen7b --lora-rank 16                  # one GPU, LoRA
    torchrun --nproc_per_node 8 scripts/scale_check.py --shape qwen7b            # FSDP2, full fine-tune
    python scripts/scale_check.py --shape tiny --device cpu --steps 2            # this script's CPU smoke

Each prompt is exactly --prompt-tokens tokens; a random model almost never samples EOS, so completions run
to --new-tokens. Prints one JSON object (rank 0): the peak memory of every rank (CUDA: max allocated and
reserved; CPU: peak RSS), the per-step generation and update times and sampling tokens/s from the run's
metrics, the wall time of the final checkpoint, and the planner's figures for the same settings.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "qwen7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                   rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "smollm2": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "tiny": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 tie_word_embeddings=True),
}
VOCAB = {"qwen7b": 152064, "smollm2": 49152, "tiny": 128}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen7b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tune")
    parser.add_argument("--prompts", type=int, default=8, help="grpo.batch_prompts (all ranks together)")
    parser.add_argument("--group", type=int, default=8, help="grpo.group_size")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    parser.add_argument("--out", default="", help="folder for the tokenizer and the run (default: "
                        "runs/scale_check/<shape>_w<world size>_lora<rank>)")
    args = parser.parse_args(argv)

    from experiments.toy import WordTask, write_word_tokenizer
    from grpo import distributed
    from grpo.config import GRPOConfig, LoRAConfig, ModelConfig, RunConfig, SamplingConfig
    from grpo.runlog import read_jsonl
    from grpo.train import train

    dist = distributed.setup()
    root = Path(args.out or f"runs/scale_check/{args.shape}_w{dist.world_size}_lora{args.lora_rank}")
    n_words = VOCAB[args.shape] - 3  # + <pad>, <eos>, <unk>: the tokenizer's size is the model's vocabulary
    tokenizer = root / "tokenizer"
    if dist.is_main:
        write_word_tokenizer(tokenizer, n_words)
    dist.barrier()
    model = ModelConfig(tokenizer=str(tokenizer), random_init=SHAPES[args.shape], device=args.device,
                        gradient_checkpointing=not args.no_checkpointing, lora=LoRAConfig(rank=args.lora_rank))
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    grpo = GRPOConfig(steps=args.steps, batch_prompts=args.prompts, group_size=args.group,
                      micro_batch_size=args.micro_batch, lr=1e-6)
    run = RunConfig(output_dir=str(root / "run"), eval_examples=0, eval_at_start=False, samples_every=0, plot=False)
    task = WordTask(n_items=4 * args.prompts, prompt_words=(args.prompt_tokens, args.prompt_tokens), n_words=n_words)

    t0 = time.perf_counter()
    run_dir = train(model, sampling, grpo, run, task)
    wall = time.perf_counter() - t0
    cuda = torch.cuda.is_available() and args.device != "cpu"
    peak = {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30} if cuda else \
           {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    peaks = dist.gather_objects(peak)
    if dist.is_main:
        steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward/mean" in r]
        step_time = sum(r["time/generate_s"] + r["time/update_s"] for r in steps)
        result = {
            "shape": args.shape, "world_size": dist.world_size, "lora_rank": args.lora_rank,
            "prompts": args.prompts, "group": args.group, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "micro_batch": args.micro_batch,
            "gradient_checkpointing": not args.no_checkpointing,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "peaks_by_rank": peaks,
            "steps": [{k: r[k] for k in ("step", "time/generate_s", "time/update_s", "tokens_per_s",
                                         "len/completion_mean")} for r in steps],
            "wall_s": wall, "checkpoint_and_setup_s": wall - step_time,
            "planned": planned(args, model, sampling, grpo, run, dist.world_size, cuda),
        }
        print(json.dumps(result, indent=1))
    distributed.teardown()
    return 0


def planned(args, model, sampling, grpo, run, gpus: int, cuda: bool) -> dict:
    """The memory planner's figures (experiments/plan_memory.py) for the settings this run used."""
    from experiments import plan_memory
    from experiments.config import ExperimentConfig
    from experiments.task import TaskConfig

    if not cuda and gpus > 1:
        return {"skipped": "the planner plans one process on the CPU"}
    cfg = ExperimentConfig(model=model, sampling=sampling, grpo=grpo, run=run,
                           task=TaskConfig(max_prompt_tokens=args.prompt_tokens))
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 24.0
    setup = plan_memory.setup_from_config(cfg, gpus=gpus, memory_gib=memory, device="cuda" if cuda else "cpu")
    shape = plan_memory.shape_from_values(SHAPES[args.shape], vocab=VOCAB[args.shape], source=args.shape)
    p = plan_memory.plan(shape, setup)
    return {"peak_gib": p.peak / 2**30, "total_with_margin_gib": p.total / 2**30, "fits": p.fits,
            "phases_gib": {k: v / 2**30 for k, v in p.phases.items()}}


if __name__ == "__main__":
    sys.exit(main())
