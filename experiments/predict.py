"""Batch inference: examples in, reasoning and ratings out.

    python -m experiments.predict --model runs/reczero/checkpoints/step_16 \
        --input data/amazon-music/test.jsonl --output predictions.jsonl

Each input line is an example as written by `python -m recdata.prepare` (the label `rating` may be absent;
`user_history` and `item` may not: a line without them is an error naming it, exit 2). Each output line holds
the example's ids, the model's full answer (its reasoning sections), the parsed rating (null when the answer is
malformed), whether the format was correct, and the parser's error.

The output is written to a temporary file beside it and renamed when every prediction is in, so a crash leaves
an earlier output as it was; --output naming the --input file is refused (exit 2).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from experiments.evaluate import resolve_config
from experiments.task import RecTask
from grpo.policy import load_policy
from grpo.rollout import greedy_completions
from recdata.readers import atomic_write, same_file

# Fields an example needs to make a prompt, and their JSON types.
REQUIRED = {"user_history": list, "item": dict}


class InputError(ValueError):
    """An input line that is not a usable example; the message names the file and line."""


def read_input(path: Path) -> list[dict]:
    """The examples of a JSONL file; a line that is not an object with `user_history` (a list) and `item` (an
    object) raises InputError naming it (a prompt built without them would have empty sections)."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except ValueError as err:
                raise InputError(f"{path}:{lineno}: not valid JSON ({err})") from None
            if not isinstance(example, dict):
                raise InputError(f"{path}:{lineno}: expected an example (a JSON object), got "
                                 f"{type(example).__name__}")
            for key, kind in REQUIRED.items():
                if key not in example:
                    raise InputError(f"{path}:{lineno}: the example has no {key!r} (an example as written by "
                                     f"`python -m recdata.prepare` has user_history and item)")
                if not isinstance(example[key], kind):
                    raise InputError(f"{path}:{lineno}: {key!r} is a {type(example[key]).__name__}, expected a "
                                     f"{'list' if kind is list else 'JSON object'}")
            examples.append(example)
    return examples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a checkpoint folder, a hub id or `default`")
    parser.add_argument("--input", required=True, help="examples JSONL")
    parser.add_argument("--output", required=True, help="predictions JSONL (one line per example)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--config", default=None, help="prompt/sampling settings (default: the run's, else reczero.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)

    out = Path(args.output)
    if same_file(out, args.input):
        print(f"error: --output {args.output} is the --input file: the predictions would replace the examples; "
              f"choose another --output", file=sys.stderr)
        return 2
    try:
        examples = read_input(Path(args.input))
    except OSError as err:
        print(f"error: cannot read --input {args.input}: {err}", file=sys.stderr)
        return 2
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not examples:
        print(f"{args.input} holds no examples", file=sys.stderr)
        return 1
    cfg, _ = resolve_config(args.model, args.config, args.overrides)
    policy = load_policy(cfg.model, for_training=False)
    task = RecTask(cfg.task, policy.tokenizer)
    with atomic_write(out) as f:
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
