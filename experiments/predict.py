"""Batch inference: examples in, reasoning and ratings out.

    python -m experiments.predict --model runs/reczero/checkpoints/step_16 \
        --input data/amazon-music/test.jsonl --output predictions.jsonl

Each input line is an example as written by `python -m recdata.prepare` (the label `rating` may be absent).
Each output line holds the example's ids, the model's full answer (its reasoning sections), the parsed
rating (null when the answer is malformed), whether the format was correct, and the parser's error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from experiments.evaluate import resolve_config
from experiments.task import RecTask, read_examples
from grpo.train import greedy_completions, load_policy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a checkpoint folder, a hub id or `default`")
    parser.add_argument("--input", required=True, help="examples JSONL")
    parser.add_argument("--output", required=True, help="predictions JSONL (one line per example)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--config", default=None, help="prompt/sampling settings (default: the run's, else reczero.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)

    cfg, _ = resolve_config(args.model, args.config, args.overrides)
    examples = read_examples(Path(args.input))
    if not examples:
        print(f"{args.input} holds no examples", file=sys.stderr)
        return 1
    policy = load_policy(cfg.model, for_training=False)
    task = RecTask(cfg.task, policy.tokenizer)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for start in tqdm(range(0, len(examples), args.batch_size), desc="predict"):
            batch = [task.item(ex) for ex in examples[start:start + args.batch_size]]
            completions, _ = greedy_completions(policy, [it["prompt"] for it in batch], cfg.sampling, args.batch_size)
            for item, completion in zip(batch, completions):
                ex = item["example"]
                parsed = task.parse(ex, completion)
                f.write(json.dumps({"example_id": item["id"], "user_id": ex.get("user_id"),
                                    "item_id": ex.get("item_id"), "answer": task.answer(completion),
                                    "sections": parsed.sections, "rating": parsed.rating,
                                    "format_ok": parsed.format_ok, "error": parsed.error,
                                    "label": ex.get("rating")}, ensure_ascii=False) + "\n")
    print(f"wrote {len(examples)} predictions to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
