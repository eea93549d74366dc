"""Bad raw data into `recdata.prepare`: each case used to give silently wrong examples or a traceback (the issue's
findings); now it is dropped and counted in stats.json, or stops with an error naming the file. Small
hand-written files, plus the real samples where a case needs real data (skipped without them)."""
import gzip
import json
import time
from pathlib import Path

import pytest

from recdata.prepare import main
from recdata.readers import (CorruptFileError, FormatMismatchError, check_format, read_dataset,
                             read_interactions, plausible_time_range)

from conftest import data_sample

START = 1_300_000_000  # 2011-03-13
DAY = 86400
USERS, ITEMS = 6, 6


def review(u, i, t=None, **extra):
    """An Amazon 2014 review line's fields; every user rates every item, item by item, so histories build up."""
    t = START + (i * USERS + u) * DAY if t is None else t
    return {"reviewerID": f"U{u}", "asin": f"I{i}", "reviewerName": f"user {u}", "helpful": [0, 0],
            "reviewText": f"Review of item {i} by user {u}.", "overall": float(1 + (u + i) % 5),
            "summary": f"Item {i}", "unixReviewTime": t, "reviewTime": "03 13, 2011", **extra}


def meta(i, asin=None):
    return repr({"asin": asin or f"I{i}", "title": f"Album {i}", "price": 9.99, "salesRank": {"Music": 1000 + i},
                 "categories": [["CDs & Vinyl", "Pop"]]})


REVIEWS = [review(u, i) for i in range(ITEMS) for u in range(USERS)]


def write(path: Path, lines, gz: bool = False) -> Path:
    data = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def prepare(tmp_path, reviews, metas=None, *flags, name="out"):
    """Run the CLI on these lines; (exit code, stats or None, out folder)."""
    r = write(tmp_path / f"{name}-reviews.json", reviews)
    argv = ["--format", "amazon2014", "--reviews", str(r), "--out", str(tmp_path / name), "--quiet", *flags]
    if metas is not None:
        argv += ["--meta", str(write(tmp_path / f"{name}-meta.json", metas))]
    code = main(argv)
    stats_path = tmp_path / name / "stats.json"
    return code, json.loads(stats_path.read_text()) if stats_path.exists() else None, tmp_path / name


def split_lines(out: Path) -> dict:
    return {s: (out / f"{s}.jsonl").read_text() for s in ("train", "val", "test")}


# ----------------------------------------------------------------------------------------------------
# Duplicates: dropped and counted (before: kept, every history showed each item twice)
# ----------------------------------------------------------------------------------------------------

def test_identical_duplicate_lines_are_dropped_and_counted(tmp_path):
    code, once, out_once = prepare(tmp_path, REVIEWS, [meta(i) for i in range(ITEMS)], name="once")
    assert code == 0 and once["duplicates_dropped"] == 0
    doubled = [line for x in REVIEWS for line in (x, x)]
    code, twice, out_twice = prepare(tmp_path, doubled, [meta(i) for i in range(ITEMS)], name="twice")
    assert code == 0
    assert twice["duplicates_dropped"] == len(REVIEWS) == twice["read"]["reviews"]["duplicates_dropped"]
    assert twice["interactions"] == once["interactions"] == len(REVIEWS)
    assert twice["eligible_targets"] == once["eligible_targets"] > 0
    assert split_lines(out_twice) == split_lines(out_once)  # the same examples, histories without repeats
    for line in (out_twice / "train.jsonl").read_text().splitlines():
        shown = [(h["item_id"], h["timestamp"]) for h in json.loads(line)["user_history"]]
        assert len(shown) == len(set(shown))


def test_a_second_review_of_the_same_item_is_not_a_duplicate(tmp_path):
    """Same user, item and time but another rating or text: two reviews, both kept."""
    last = REVIEWS[-1]
    lines = REVIEWS + [dict(last, overall=last["overall"] % 5 + 1), dict(last, reviewText="Changed my mind.")]
    xs, _, stats = read_dataset("amazon2014", write(tmp_path / "r.json", lines))
    assert len(xs) == len(lines) and stats["duplicates_dropped"] == 0


def test_real_music_sample_doubled_gives_the_same_examples(tmp_path):
    d = data_sample("amazon-music-2014-sample")
    raw = gzip.decompress((d / "reviews_Digital_Music_5.json.gz").read_bytes()).splitlines(keepends=True)
    doubled = tmp_path / "reviews_doubled.json"
    doubled.write_bytes(b"".join(line + line for line in raw))
    common = ["--format", "amazon2014", "--meta", str(d / "meta_Digital_Music.json.gz"), "--quiet"]
    assert main(common + ["--reviews", str(d / "reviews_Digital_Music_5.json.gz"), "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--reviews", str(doubled), "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / x / "stats.json").read_text()) for x in "ab")
    assert b["duplicates_dropped"] == 6908 and b["eligible_targets"] == a["eligible_targets"] < 3900
    assert split_lines(tmp_path / "a") == split_lines(tmp_path / "b")


# ----------------------------------------------------------------------------------------------------
# Implausible timestamps: skipped and counted (before: the future became the test split; 1.5e300 overflowed)
# ----------------------------------------------------------------------------------------------------

def test_future_and_ancient_timestamps_are_skipped_and_counted(tmp_path):
    year_2100 = 4_102_444_800
    bad = [review(0, 0, t=year_2100), review(1, 1, t=year_2100 + 1), review(2, 2, t=year_2100 + 2),
           review(3, 3, t=86400 * 365),  # 1971
           review(4, 4, t=1.5e300), review(5, 5, t=10 ** 400)]
    before = time.time()
    code, stats, out = prepare(tmp_path, REVIEWS + bad)  # without --skip-malformed: counted, not fatal
    assert code == 0
    assert stats["implausible_timestamps_skipped"] == len(bad) == stats["read"]["implausible_timestamps"]
    assert stats["read"]["reviews"]["skipped"] == {"implausible timestamp": len(bad)}
    assert stats["malformed_skipped"] == 0 and stats["interactions"] == len(REVIEWS)
    assert "implausible timestamp" in stats["read"]["reviews"]["first_skipped"][0]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert test and max(e["timestamp"] for e in test) < before


def test_huge_timestamps_in_milliseconds_do_not_overflow(tmp_path):
    lines = [{"rating": 5, "user_id": "U", "parent_asin": "P", "timestamp": t}
             for t in (1.5e300, 10 ** 400, 1_600_000_000_000, 4_102_444_800_000)]
    path = write(tmp_path / "r.jsonl", lines)
    xs = list(read_interactions("amazon2023", path, time_range=plausible_time_range()))
    assert [x.timestamp for x in xs] == [1_600_000_000]
    assert len(list(read_interactions("amazon2023", path))) == 4  # no time_range: nothing checked


# ----------------------------------------------------------------------------------------------------
# The wrong --format: stop and name the right one (before: an Amazon 2018 file lost its categories silently)
# ----------------------------------------------------------------------------------------------------

def review_2018(u, i):
    x = review(u, i)
    del x["helpful"]
    return {**x, "verified": True, "style": {"Format:": " Audio CD"}}


def meta_2018(i):
    return json.dumps({"asin": f"I{i}", "title": f"Album {i}", "category": ["CDs & Vinyl", "Pop"], "main_cat": "Music",
                       "also_buy": [], "rank": "1,000 in CDs"})


def test_amazon2018_files_read_as_amazon2014_stop_with_the_right_format(tmp_path, capsys):
    reviews = write(tmp_path / "r.json", [review_2018(u, i) for i in range(ITEMS) for u in range(USERS)])
    metas = write(tmp_path / "m.json", [meta_2018(i) for i in range(ITEMS)])
    out = tmp_path / "out"
    assert main(["--format", "amazon2014", "--reviews", str(reviews), "--meta", str(metas), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "looks like Amazon 2018" in err and "use --format amazon2018" in err and str(reviews) in err
    assert not out.exists()
    # only the metadata file of 2018 (the case that loses categories): named too
    with pytest.raises(FormatMismatchError, match=r"m\.json: this looks like Amazon 2018.*--format amazon2018"):
        check_format("amazon2014", write(tmp_path / "r14.json", REVIEWS), metas)
    assert main(["--format", "amazon2018", "--reviews", str(reviews), "--meta", str(metas), "--out", str(out),
                 "--quiet"]) == 0
    example = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert example["item"]["categories"] == ["CDs & Vinyl", "Pop"]


def test_real_magazines_2018_read_as_amazon2014(tmp_path, capsys):
    d = data_sample("amazon-magazines-2018")
    assert main(["--format", "amazon2014", "--reviews", str(d / "Magazine_Subscriptions_5.json.gz"),
                 "--meta", str(d / "meta_Magazine_Subscriptions.json.gz"), "--out", str(tmp_path / "o")]) == 1
    assert "this looks like Amazon 2018" in capsys.readouterr().err


def test_bare_hand_written_lines_give_no_verdict(tmp_path):
    """Lines with only the needed keys match no format's signature: no false alarm."""
    bare = [{"reviewerID": "U", "asin": "A", "overall": 4.0, "unixReviewTime": START}]
    check_format("amazon2014", write(tmp_path / "r.json", bare))
    check_format("amazon2018", write(tmp_path / "r.json", bare))


# ----------------------------------------------------------------------------------------------------
# Metadata that matches nothing (before: every title became an id, exit 0)
# ----------------------------------------------------------------------------------------------------

def test_metadata_matching_under_half_of_the_items_is_an_error(tmp_path, capsys):
    wrong = [meta(i, asin=f"OTHER{i}") for i in range(ITEMS)] + [meta(0), meta(1)]  # 2 of 6 items match
    code, stats, out = prepare(tmp_path, REVIEWS, wrong)
    err = capsys.readouterr().err
    assert code == 1 and stats is None and "matches only 2 of the 6 reviewed items" in err
    assert "--allow-missing-meta" in err
    code, stats, _ = prepare(tmp_path, REVIEWS, wrong, "--allow-missing-meta")
    assert code == 0 and stats["read"]["items_without_meta"] == 4
    code, stats, _ = prepare(tmp_path, REVIEWS, wrong[-2:] + [meta(2)], "--overwrite")  # 3 of 6: half is enough
    assert code == 0


# ----------------------------------------------------------------------------------------------------
# Nothing to prepare (before: 0 examples written, exit 0)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lines, message", [
    ([], "no usable review in 0 non-blank lines"),
    (["", "   "], "no usable review in 0 non-blank lines"),
    ([review(0, 0, t=4_102_444_800)], "no usable review in 1 non-blank lines"),
    ([review(0, 0), review(1, 1)], "no example passes the filters"),
])
def test_empty_input_is_an_error(tmp_path, capsys, lines, message):
    code, stats, out = prepare(tmp_path, lines)
    assert code == 1 and stats is None and not (out / "train.jsonl").exists()
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# A truncated .gz (before: an EOFError traceback without the file name)
# ----------------------------------------------------------------------------------------------------

def test_truncated_gzip_is_an_error_naming_the_file(tmp_path, capsys):
    whole = write(tmp_path / "whole.json.gz", REVIEWS * 20, gz=True)
    cut = tmp_path / "reviews_cut.json.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match=r"reviews_cut\.json\.gz: the gzip file is truncated or corrupt"):
        read_dataset("amazon2014", cut, on_error="skip")
    assert main(["--format", "amazon2014", "--reviews", str(cut), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(cut) in err and "Traceback" not in err
