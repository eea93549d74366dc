"""Raw review files -> train/val/test JSONL examples and stats.json.

    python -m recdata.prepare --dataset amazon-music                  # named dataset, found or --download'ed
    python -m recdata.prepare --format amazon2018 --reviews R.json.gz --meta M.json.gz --out data/mags

Every BuildConfig field is a flag (--max-train, --seed, --min-history-total, ...); --skip-malformed skips
and counts malformed lines instead of stopping at the first one.

Guards (docs/failures.md): exact duplicate reviews are dropped and reviews dated before 1990 or after the time
of the run are skipped, both counted in stats.json (`duplicates_dropped`, `implausible_timestamps_skipped`);
files whose first lines carry another format's keys, a metadata file matching under half of the reviewed
items (unless --allow-missing-meta), a review file with no usable review, no example passing the filters and
a truncated gzip file are errors (exit 1). An --out folder holding an earlier output is replaced only with
--overwrite (or when its stats.json records the same command: a rerun), never when an output would replace
an input file (exit 2).
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
from recdata.readers import FORMATS, plausible_time_range, read_dataset, same_file

__all__ = ["prepare", "main", "build_parser", "config_field_docs", "OutputConflict", "OUTPUT_FILES",
           "MIN_META_COVERAGE"]

OUTPUT_FILES = tuple(f"{name}.jsonl" for name in SPLITS) + ("stats.json",)
MIN_META_COVERAGE = 0.5  # below it the metadata file is taken for the wrong one (unless allow_missing_meta)


class OutputConflict(ValueError):
    """Writing would replace an input file, or an earlier output without `overwrite` (the CLI exits 2)."""


def _same_command(out_dir: Path, dataset: str | None, fmt: str, sources: dict, config: BuildConfig) -> bool:
    """True when out_dir/stats.json records this very command (dataset, format, source paths, settings)."""
    try:
        earlier = json.loads((out_dir / "stats.json").read_text(encoding="utf-8"))
        return (earlier.get("dataset") == dataset and earlier.get("format") == fmt
                and earlier.get("settings") == dataclasses.asdict(config)
                and {role: (v or {}).get("path") for role, v in (earlier.get("sources") or {}).items()} == sources)
    except (OSError, ValueError, AttributeError):
        return False


def check_output(out_dir: str | Path, inputs: list[str | Path | None], overwrite: bool, dataset: str | None = None,
                 fmt: str = "", config: BuildConfig | None = None) -> None:
    """Raise OutputConflict when writing into out_dir would replace an input file (always refused), or an
    earlier output (train/val/test.jsonl, stats.json) without `overwrite`, unless that output's stats.json
    records the same command (rerunning a command, as `make data` does, rebuilds its own output)."""
    out_dir = Path(out_dir)
    for name in OUTPUT_FILES:
        for path in inputs:
            if path is not None and same_file(out_dir / name, path):
                raise OutputConflict(f"--out {out_dir} would overwrite the input file {path} with {name}: "
                                     f"choose another --out")
    held = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if not held or overwrite:
        return
    sources = {"reviews": str(inputs[0]) if inputs[0] is not None else None,
               "meta": str(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None}
    if _same_command(out_dir, dataset, fmt, sources, config or BuildConfig()):
        return
    raise OutputConflict(f"{out_dir} already holds an earlier output ({', '.join(held)}) made by another command: "
                         f"pass --overwrite to replace it, or choose another --out")


# ----------------------------------------------------------------------------------------------------
# The work
# ----------------------------------------------------------------------------------------------------

def prepare(fmt: str, reviews: str | Path, meta: str | Path | None, out_dir: str | Path,
            config: BuildConfig | None = None, on_error: str = "raise", dataset: str | None = None,
            verbose: bool = True, overwrite: bool = False, allow_missing_meta: bool = False,
            time_range: tuple[int, int] | None = None) -> dict:
    """Read, build and write `train.jsonl`, `val.jsonl`, `test.jsonl` and `stats.json` into out_dir.

    Files are written under temporary names and renamed at the end, stats.json last, so an interrupted run
    never leaves a set of files that looks complete. Returns the stats written to stats.json.
    Raises OutputConflict (see check_output) before reading anything, ValueError for unusable input (the
    module docstring's guards). time_range: plausible review times (default: 1990-01-01 .. now).
    """
    config = config or BuildConfig()
    out_dir = Path(out_dir)
    check_output(out_dir, [reviews, meta], overwrite, dataset, fmt, config)
    # Prompts show at most this many characters of a review; one more keeps the cut-with-"..." decision exact
    # while the multi-GB files stay small in memory.
    keep_chars = max(config.summary_chars, config.review_chars) + 1
    interactions, items, read_stats = read_dataset(
        fmt, reviews, meta, on_error=on_error, rating_range=config.rating_range, max_text_chars=keep_chars,
        time_range=time_range or plausible_time_range(), drop_duplicates=True)
    reviews_read = read_stats["reviews"]
    if not interactions:
        raise ValueError(f"{reviews}: no usable review in {reviews_read['lines']:,} non-blank lines (skipped: "
                         f"{reviews_read['skipped'] or 'none'}): nothing to prepare")
    reviewed = len({x.item_id for x in interactions})
    matched = reviewed - read_stats["items_without_meta"]
    if meta is not None and matched < MIN_META_COVERAGE * reviewed and not allow_missing_meta:
        raise ValueError(f"{meta}: the metadata matches only {matched:,} of the {reviewed:,} reviewed items "
                         f"({matched / reviewed:.0%}; the others would show their id as title): is it the metadata "
                         f"of {reviews}? Pass --allow-missing-meta to prepare anyway")
    builder = ExampleBuilder(interactions, items, config)
    if builder.eligible_count == 0:
        d = builder.dropped
        raise ValueError(f"{reviews}: no example passes the filters ({len(interactions):,} interactions; dropped: no "
                         f"user history {d['no_user_history']:,}, no item history {d['no_item_history']:,}, shown "
                         f"history below {config.min_history_total} {d['below_min_history_total']:,})")
    implausible = read_stats["implausible_timestamps"]
    stats = {
        "dataset": dataset,
        "format": fmt,
        "sources": {role: None if path is None else {"path": str(path), "bytes": os.path.getsize(path)}
                    for role, path in (("reviews", reviews), ("meta", meta))},
        "malformed_skipped": read_stats["skipped_total"] - implausible,
        "implausible_timestamps_skipped": implausible,
        "duplicates_dropped": read_stats["duplicates_dropped"],
        "read": read_stats,
        **builder.stats(),
        "files": {name: f"{name}.jsonl" for name in SPLITS},
    }

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
        f"{stats['items']:,} items; malformed lines skipped: {stats['malformed_skipped']:,}; duplicates "
        f"dropped: {stats['duplicates_dropped']:,}; implausible timestamps skipped: "
        f"{stats['implausible_timestamps_skipped']:,}",
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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier output in --out (made by another command)")
    parser.add_argument("--allow-missing-meta", action="store_true",
                        help="prepare even when the metadata matches under half of the reviewed items")
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
                dataset=args.dataset, verbose=not args.quiet, overwrite=args.overwrite,
                allow_missing_meta=args.allow_missing_meta)
    except OutputConflict as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # unusable input (the message names the file, and the line where there is one)
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
