"""Raw review files -> train/val/test JSONL examples and stats.json.

    python -m recdata.prepare --dataset amazon-music                  # named dataset, found or --download'ed
    python -m recdata.prepare --format amazon2018 --reviews R.json.gz --meta M.json.gz --out data/mags

Every BuildConfig field is a flag (--max-train, --seed, --min-history-total, ...); --skip-malformed skips
and counts malformed lines instead of stopping at the first one.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import sys
import textwrap
from pathlib import Path

from recdata.build import SPLITS, BuildConfig, ExampleBuilder
from recdata.download import DATASETS, MissingDataError, resolve_files
from recdata.readers import FORMATS, read_dataset

__all__ = ["prepare", "main", "build_parser", "config_field_docs"]


# ----------------------------------------------------------------------------------------------------
# The work
# ----------------------------------------------------------------------------------------------------

def prepare(fmt: str, reviews: str | Path, meta: str | Path | None, out_dir: str | Path,
            config: BuildConfig | None = None, on_error: str = "raise", dataset: str | None = None,
            verbose: bool = True) -> dict:
    """Read, build and write `train.jsonl`, `val.jsonl`, `test.jsonl` and `stats.json` into out_dir.

    Files are written under temporary names and renamed at the end, stats.json last, so an interrupted run
    never leaves a set of files that looks complete. Returns the stats written to stats.json.
    """
    config = config or BuildConfig()
    # Prompts show at most this many characters of a review; one more keeps the cut-with-"..." decision exact
    # while the multi-GB files stay small in memory.
    keep_chars = max(config.summary_chars, config.review_chars) + 1
    interactions, items, read_stats = read_dataset(fmt, reviews, meta, on_error=on_error,
                                                   rating_range=config.rating_range, max_text_chars=keep_chars)
    builder = ExampleBuilder(interactions, items, config)
    stats = {
        "dataset": dataset,
        "format": fmt,
        "sources": {role: None if path is None else {"path": str(path), "bytes": os.path.getsize(path)}
                    for role, path in (("reviews", reviews), ("meta", meta))},
        "malformed_skipped": read_stats["skipped_total"],
        "read": read_stats,
        **builder.stats(),
        "files": {name: f"{name}.jsonl" for name in SPLITS},
    }

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = {name: out_dir / f".{name}.jsonl.partial" for name in (*SPLITS, "stats")}
    try:
        for name in SPLITS:
            with open(partial[name], "w", encoding="utf-8", newline="\n") as f:
                for example in builder.iter_split(name):
                    f.write(json.dumps(example, ensure_ascii=False) + "\n")
        with open(partial["stats"], "w", encoding="utf-8", newline="\n") as f:
            json.dump(stats, f, ensure_ascii=False, indent=2)
            f.write("\n")
        (out_dir / "stats.json").unlink(missing_ok=True)  # the old run's marker goes first ...
        for name in SPLITS:
            os.replace(partial[name], out_dir / f"{name}.jsonl")
        os.replace(partial["stats"], out_dir / "stats.json")  # ... and the new one comes last
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
    if verbose:
        print(summary(stats, out_dir))
    return stats


def summary(stats: dict, out_dir: Path) -> str:
    """A few lines for the terminal."""
    d, s = stats["dropped"], stats["splits"]
    name = stats["dataset"] or Path(stats["sources"]["reviews"]["path"]).name
    median = lambda split, side: s[split][f"{side}_history_len"]["median"]  # noqa: E731
    lines = [
        f"{name} ({stats['format']}): {stats['interactions']:,} interactions, {stats['users']:,} users, "
        f"{stats['items']:,} items; malformed lines skipped: {stats['malformed_skipped']:,}",
        f"targets kept: {stats['eligible_targets']:,}; dropped: no user history {d['no_user_history']:,}, "
        f"no item history {d['no_item_history']:,}, shown history below min {d['below_min_history_total']:,}",
        "  ".join(f"{split} {s[split]['count']:,} (sampled out {stats['sampled_out'][split]:,}; median shown "
                  f"user/item history {median(split, 'user')}/{median(split, 'item')})" for split in SPLITS),
        f"wrote {out_dir}/{{train,val,test}}.jsonl and stats.json",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------

def config_field_docs(cls: type = BuildConfig) -> dict[str, str]:
    """{field: its docstring} for a dataclass whose fields each have a docstring line below them."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("none", "") else int(text)


_FLAG_TYPES = {"int": int, "float": float, "int | None": _optional_int}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recdata.prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=sorted(DATASETS), help="a named dataset of the paper")
    source.add_argument("--format", choices=sorted(FORMATS), help="the raw format of --reviews/--meta")
    parser.add_argument("--reviews", type=Path, help="review file (with --format)")
    parser.add_argument("--meta", type=Path, help="item metadata file (with --format; optional)")
    parser.add_argument("--raw-dir", type=Path, help="folder holding the named dataset's raw files "
                                                     "(default: $RECZERO_DATA_DIR and its sample folders)")
    parser.add_argument("--download", action="store_true", help="download missing raw files of --dataset")
    parser.add_argument("--out", type=Path, help="output folder (default: data/<dataset>)")
    parser.add_argument("--skip-malformed", action="store_true",
                        help="skip and count malformed lines instead of stopping at the first")
    parser.add_argument("--quiet", action="store_true", help="no summary, no progress bar")
    settings = parser.add_argument_group("example builder settings (BuildConfig)")
    docs = config_field_docs()
    for f in dataclasses.fields(BuildConfig):
        settings.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_FLAG_TYPES[str(f.type)],
                              default=f.default, help=docs.get(f.name, ""))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = BuildConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildConfig)})
    except ValueError as err:
        parser.error(str(err))
    if args.dataset:
        if args.reviews or args.meta:
            parser.error("--reviews/--meta go with --format, not --dataset")
        data_dir = os.environ.get("RECZERO_DATA_DIR")
        try:
            reviews, meta = resolve_files(args.dataset, raw_dir=args.raw_dir, data_dir=data_dir,
                                          download=args.download, progress=not args.quiet)
        except MissingDataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        fmt = DATASETS[args.dataset].format
        out = args.out or Path("data") / args.dataset
    else:
        if args.reviews is None:
            parser.error("--format needs --reviews PATH")
        if args.raw_dir or args.download:
            parser.error("--raw-dir/--download go with --dataset")
        fmt, reviews, meta = args.format, args.reviews, args.meta
        out = args.out or Path("data") / f"{fmt}-{reviews.name.split('.')[0]}"
        for path in (reviews, meta):
            if path is not None and not path.is_file():
                print(f"error: no such file: {path}", file=sys.stderr)
                return 2
    try:
        prepare(fmt, reviews, meta, out, config, on_error="skip" if args.skip_malformed else "raise",
                dataset=args.dataset, verbose=not args.quiet)
    except ValueError as err:  # malformed input (the message names file and line)
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
