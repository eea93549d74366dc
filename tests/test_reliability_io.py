"""Output files of predict, prepare, evaluate (--out) and report: written atomically (a crash leaves an earlier
output as it was, and no temporary file), never over their own input (exit 2); prepare needs --overwrite to replace
an earlier output; predict and evaluate reject unusable input with one line naming it (exit 2). No model is
loaded: the checks run before one would be, and the writing is driven by stand-ins."""
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

import experiments.evaluate as evaluate
import experiments.predict as predict
import experiments.report as report
from recdata.prepare import main as prepare_main
from recdata.readers import atomic_write

from test_reliability_data import ITEMS, REVIEWS, meta, write


def example(k, **changes):
    ex = {"example_id": f"ex{k}", "user_id": f"U{k}", "item_id": f"I{k}", "timestamp": 1_300_000_000 + k,
          "rating": 4.0, "rating_scale": [1.0, 5.0],
          "user_history": [{"item_id": "H", "title": "Rumours", "categories": ["Pop"], "brand": "", "price": "",
                            "rating": 5.0, "timestamp": 1_200_000_000, "summary": "Timeless", "text": "Great.",
                            "description": ""}],
          "user_avg_rating": 5.0, "item": {"title": f"Item {k}", "categories": ["Pop"], "brand": "", "price": "",
                                           "description": ""},
          "item_history": [], "item_avg_rating": 4.0}
    ex.update(changes)
    return {k: v for k, v in ex.items() if v is not None}


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".tmp")))


# ----------------------------------------------------------------------------------------------------
# The atomic writer
# ----------------------------------------------------------------------------------------------------

def test_atomic_write_replaces_on_success_and_keeps_the_old_file_on_a_crash(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    with atomic_write(path) as f:
        f.write("one\n")
    assert path.read_text() == "one\n"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as f:
            f.write("half of two")
            raise KeyboardInterrupt
    assert path.read_text() == "one\n" and leftovers(path.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would make it


# ----------------------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------------------

def test_predict_refuses_to_write_over_its_input(tmp_path, capsys):
    examples = jsonl(tmp_path / "test.jsonl", [example(0), example(1)])
    before = examples.read_bytes()
    for output in (examples, tmp_path / "." / "test.jsonl"):
        assert predict.main(["--model", "default", "--input", str(examples), "--output", str(output)]) == 2
        assert "is the --input file" in capsys.readouterr().err
    link = tmp_path / "link.jsonl"
    link.symlink_to(examples)
    assert predict.main(["--model", "default", "--input", str(examples), "--output", str(link)]) == 2
    assert examples.read_bytes() == before


@pytest.mark.parametrize("bad, message", [
    (example(1, user_history=None), r"in\.jsonl:2: the example has no 'user_history'"),
    (example(1, item=None), r"in\.jsonl:2: the example has no 'item'"),
    (example(1, item="Graceland"), r"in\.jsonl:2: 'item' is a str, expected a JSON object"),
    ("{not json", r"in\.jsonl:2: not valid JSON"),
    ("[1, 2]", r"in\.jsonl:2: expected an example"),
])
def test_predict_rejects_an_unusable_line_naming_it(tmp_path, capsys, bad, message):
    examples = jsonl(tmp_path / "in.jsonl", [example(0), bad])
    out = tmp_path / "out.jsonl"
    assert predict.main(["--model", "default", "--input", str(examples), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()


class StandIns:
    """predict's model side replaced: one answer per prompt; `crash_at` raises in that batch (a kill)."""

    def __init__(self, monkeypatch, crash_at=None):
        self.batches = 0

        class Task:
            def __init__(self, cfg, tokenizer):
                pass

            def item(self, ex):
                return {"id": ex["example_id"], "prompt": "p", "example": ex}

            def answer(self, completion):
                return completion

            def parse(self, ex, completion):
                from prompts import parse_completion
                return parse_completion(completion)

        def completions(policy, prompts, sampling, batch_size):
            self.batches += 1
            if self.batches == crash_at:
                raise KeyboardInterrupt("killed")
            return ["<analyze user>u</analyze user><analyze item>i</analyze item><match>m</match><rate>4</rate>"] \
                * len(prompts), [1] * len(prompts)

        monkeypatch.setattr(predict, "resolve_config", lambda model, config, overrides: (_Cfg(), "x"))
        monkeypatch.setattr(predict, "load_policy", lambda model_cfg, for_training: _Cfg())
        monkeypatch.setattr(predict, "RecTask", Task)
        monkeypatch.setattr(predict, "greedy_completions", completions)


class _Cfg:
    model = task = sampling = tokenizer = None


def test_predict_crash_leaves_the_earlier_output_intact(tmp_path, monkeypatch):
    examples = jsonl(tmp_path / "in.jsonl", [example(k) for k in range(5)])
    out = tmp_path / "preds.jsonl"
    argv = ["--model", "m", "--input", str(examples), "--output", str(out), "--batch-size", "2"]
    StandIns(monkeypatch)
    assert predict.main(argv) == 0
    first = out.read_bytes()
    assert [json.loads(x)["rating"] for x in first.decode().splitlines()] == [4.0] * 5
    StandIns(monkeypatch, crash_at=2)
    with pytest.raises(KeyboardInterrupt):
        predict.main(argv)
    assert out.read_bytes() == first and leftovers(tmp_path) == []  # before: truncated to the lines written so far


# ----------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------

def data_folder(tmp_path: Path, test_rows) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for split in ("train", "val"):
        jsonl(d / f"{split}.jsonl", [example(k) for k in range(3)])
    jsonl(d / "test.jsonl", test_rows)
    return d


@pytest.mark.parametrize("rows, message", [
    ([example(0), example(1, rating=None)], r"test\.jsonl:2: the example has no numeric 'rating' label \(None\)"),
    ([example(0, rating="4 stars")], r"test\.jsonl:1: the example has no numeric 'rating' label"),
    ([], r"test\.jsonl holds no examples"),
    (["", "  "], r"test\.jsonl holds no examples"),
])
def test_evaluate_needs_labelled_rows_one_line_error(tmp_path, capsys, rows, message):
    d = data_folder(tmp_path, rows)
    assert evaluate.main(["--model", "default", "--data", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_evaluate_limit_only_checks_the_rows_it_evaluates(tmp_path):
    d = data_folder(tmp_path, [example(0), example(1, rating=None)])
    assert evaluate.check_split(str(d), "test", limit=1) is None
    assert "test.jsonl:2" in evaluate.check_split(str(d), "test")
    assert "not found" in evaluate.check_split(str(tmp_path / "nowhere"), "test")


def test_evaluate_refuses_an_out_that_is_one_of_its_inputs(tmp_path, capsys):
    d = data_folder(tmp_path, [example(0)])
    before = (d / "test.jsonl").read_bytes()
    assert evaluate.main(["--model", "default", "--data", str(d), "--out", str(d / "test.jsonl")]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert (d / "test.jsonl").read_bytes() == before


def test_evaluate_out_is_written_atomically(tmp_path, monkeypatch):
    d = data_folder(tmp_path, [example(0)])
    metrics = {"fallback": "user_avg", "mae": 0.5}
    cfg = SimpleNamespace(model=SimpleNamespace(tokenizer="", name_or_path="m"), task=None)
    monkeypatch.setattr(evaluate, "resolve_config", lambda model, config, overrides: (cfg, "x"))
    monkeypatch.setattr(evaluate, "evaluate_model", lambda cfg, split, limit, batch: (dict(metrics), [
        {"scored_as": 4.0, "label": 4.0}]))
    monkeypatch.setattr(evaluate, "load_tokenizer", lambda name: None)
    monkeypatch.setattr(evaluate, "RecTask", lambda cfg, tok: type("T", (), {"examples": lambda s, split: [
        example(0)]})())
    monkeypatch.setattr(evaluate, "format_table", lambda rows, baselines: "table")
    out = tmp_path / "results" / "eval.json"  # the folder is made
    argv = ["--model", "m", "--data", str(d), "--split", "val", "--out", str(out)]
    assert evaluate.main(argv) == 0
    first = out.read_bytes()
    assert json.loads(first)["models"]["m"]["mae"] == 0.5

    def broken(record):
        raise RuntimeError("disk full")
    monkeypatch.setattr(evaluate, "json_safe", broken)
    with pytest.raises(RuntimeError):
        evaluate.main(argv)
    assert out.read_bytes() == first and leftovers(out.parent) == []


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------

def test_report_writes_atomically_and_not_over_an_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    out = tmp_path / "report"
    assert report.main(["--runs", "runs", "--out", str(out)]) == 0
    md, csv_bytes = (out / "results.md").read_bytes(), (out / "results.csv").read_bytes()
    assert csv_bytes.startswith(b"dataset,kind,name") and leftovers(out) == []
    # An --evals input where an output would go: refused before anything is read or written.
    assert report.main(["--runs", "runs", "--out", str(out), "--evals", str(out / "results.md")]) == 2
    assert "would overwrite the input" in capsys.readouterr().err and (out / "results.md").read_bytes() == md

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(report.csv, "writer", crash)
    with pytest.raises(KeyboardInterrupt):
        report.main(["--runs", "runs", "--out", str(out)])
    assert (out / "results.csv").read_bytes() == csv_bytes and leftovers(out) == []


# ----------------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------------

def prepare_argv(tmp_path, out, *flags):
    reviews = tmp_path / "reviews.json"
    if not reviews.exists():
        write(reviews, REVIEWS)
        write(tmp_path / "meta.json", [meta(i) for i in range(ITEMS)])
    return ["--format", "amazon2014", "--reviews", str(reviews), "--meta", str(tmp_path / "meta.json"),
            "--out", str(out), "--quiet", *flags]


def test_prepare_needs_overwrite_to_replace_an_earlier_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare_main(prepare_argv(tmp_path, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert prepare_main(prepare_argv(tmp_path, out)) == 0  # the same command again (`make data`): a rerun
    assert prepare_main(prepare_argv(tmp_path, out, "--seed", "5", "--max-train", "3")) == 2
    err = capsys.readouterr().err
    assert "already holds an earlier output" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert prepare_main(prepare_argv(tmp_path, out, "--seed", "5", "--max-train", "3", "--overwrite")) == 0
    assert len((out / "train.jsonl").read_text().splitlines()) == 3


def test_prepare_into_a_folder_without_an_earlier_output_needs_no_flag(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert prepare_main(prepare_argv(tmp_path, out)) == 0 and (out / "notes.txt").read_text() == "mine"


def test_prepare_never_writes_over_its_input(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    reviews = write(out / "train.jsonl", REVIEWS)  # raw reviews saved under an output's name
    before = reviews.read_bytes()
    for flags in ([], ["--overwrite"]):
        assert prepare_main(["--format", "amazon2014", "--reviews", str(reviews), "--out", str(out), "--quiet",
                             *flags]) == 2
        assert "would overwrite the input file" in capsys.readouterr().err
    assert reviews.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["train.jsonl"]
