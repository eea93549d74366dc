"""The prepare CLI (run in-process through main(argv)), dataset lookup, download and atomic writing."""
import dataclasses
import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest

import recdata.download as download
from recdata.build import BuildConfig, ExampleBuilder
from recdata.prepare import build_parser, config_field_docs, main

DATA_DIR = Path(os.environ.get("RECZERO_DATA_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
OUTPUTS = ("train.jsonl", "val.jsonl", "test.jsonl", "stats.json")


def sample(folder: str) -> Path:
    path = DATA_DIR / folder
    if not path.is_dir():
        pytest.skip(f"real data sample {folder!r} not found in {DATA_DIR} (set RECZERO_DATA_DIR)")
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No data directory in the environment, and a fresh working directory (no data/raw/ there)."""
    monkeypatch.delenv("RECZERO_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)


def test_prepare_music_end_to_end(tmp_path, capsys):
    music = sample("amazon-music-2014-sample")
    out = tmp_path / "music"
    assert main(["--dataset", "amazon-music", "--raw-dir", str(music), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temp files left behind
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dataset"] == "amazon-music" and stats["format"] == "amazon2014"
    assert stats["sources"]["reviews"]["path"].endswith("reviews_Digital_Music_5.json.gz")
    assert stats["settings"] == dataclasses.asdict(BuildConfig())
    assert set(stats["dropped"]) == {"no_user_history", "no_item_history", "below_min_history_total"}
    assert stats["malformed_skipped"] == 0
    for name in ("train", "val", "test"):
        lines = (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == stats["splits"][name]["count"] > 0
    assert "amazon-music (amazon2014): 6,908 interactions" in capsys.readouterr().out


def test_two_runs_are_byte_identical_and_caps_apply(tmp_path):
    music = sample("amazon-music-2014-sample")
    argv = ["--dataset", "amazon-music", "--raw-dir", str(music), "--quiet",
            "--max-train", "100", "--max-val", "20", "--max-test", "20", "--seed", "3"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert [stats["splits"][s]["count"] for s in ("train", "val", "test")] == [100, 20, 20]
    assert stats["settings"]["seed"] == 3 and stats["sampled_out"]["train"] > 0


def test_dataset_found_through_data_dir_sample_folder(tmp_path, monkeypatch):
    sample("amazon-music-2014-sample")
    monkeypatch.setenv("RECZERO_DATA_DIR", str(DATA_DIR))
    monkeypatch.chdir(tmp_path)
    assert main(["--dataset", "amazon-music", "--quiet"]) == 0  # default --out: data/amazon-music
    assert (tmp_path / "data" / "amazon-music" / "stats.json").is_file()


def test_offline_without_files_says_what_to_put_where(tmp_path, capsys, offline):
    raw = tmp_path / "raw"
    raw.mkdir()
    assert main(["--dataset", "amazon-music", "--raw-dir", str(raw), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    for needed in ("reviews_Digital_Music_5.json.gz", "meta_Digital_Music.json.gz"):
        assert f"put {needed} into {raw}/" in err
        assert f"https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/{needed}" in err
    assert "--download" in err
    assert not (tmp_path / "o").exists()


def test_yelp_gives_instructions_instead_of_a_url(tmp_path, capsys, offline):
    assert main(["--dataset", "yelp", "--download"]) == 2
    err = capsys.readouterr().err
    assert "https://www.yelp.com/dataset" in err and "yelp_academic_dataset_review.json" in err
    assert str(Path("data") / "raw" / "yelp") in err  # where to put them


def test_yelp_accepts_the_official_file_names(tmp_path, offline):
    d = sample("yelp-sample")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "yelp_academic_dataset_review.json").write_bytes(gzip.decompress((d / "review.json.gz").read_bytes()))
    (raw / "yelp_academic_dataset_business.json").write_bytes(gzip.decompress((d / "business.json.gz").read_bytes()))
    assert main(["--dataset", "yelp", "--raw-dir", str(raw), "--out", str(tmp_path / "y"), "--quiet"]) == 0
    assert json.loads((tmp_path / "y" / "stats.json").read_text())["interactions"] == 4362


def fake_source(tmp_path: Path, sha256: str | None = None) -> download.DatasetSource:
    """A dataset whose 'official URLs' are file:// URLs of two small local files."""
    served = tmp_path / "server"
    served.mkdir()
    review = {"reviewerID": "U", "asin": "A", "overall": 5.0, "unixReviewTime": 1, "summary": "", "reviewText": ""}
    (served / "reviews.json.gz").write_bytes(gzip.compress((json.dumps(review) + "\n").encode()))
    (served / "meta.json.gz").write_bytes(gzip.compress(b"{'asin': 'A', 'title': 'T'}\n"))
    return download.DatasetSource(
        name="fake", format="amazon2014",
        reviews=download.RawFile(("reviews.json.gz",), (served / "reviews.json.gz").as_uri(), sha256),
        meta=download.RawFile(("meta.json.gz",), (served / "meta.json.gz").as_uri()),
        sample_dirs=(), homepage="file://")


def test_download_streams_checks_and_renames(tmp_path, monkeypatch, capsys):
    source = fake_source(tmp_path)
    digest = hashlib.sha256((tmp_path / "server" / "reviews.json.gz").read_bytes()).hexdigest()
    monkeypatch.setitem(download.DATASETS, "fake", dataclasses.replace(
        source, reviews=dataclasses.replace(source.reviews, sha256=digest)))
    raw = tmp_path / "raw"
    reviews, meta = download.resolve_files("fake", raw_dir=raw, download=True, progress=False)
    assert (reviews, meta) == (raw / "reviews.json.gz", raw / "meta.json.gz")
    assert sorted(p.name for p in raw.iterdir()) == ["meta.json.gz", "reviews.json.gz"]
    out = capsys.readouterr().out
    assert "meta.json.gz (sha256 " in out and "reviews.json.gz (sha256" not in out  # printed only when unknown
    # Found locally the second time: nothing is downloaded.
    assert download.resolve_files("fake", raw_dir=raw, download=True, progress=False) == (reviews, meta)


def test_download_with_wrong_sha256_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(download.DATASETS, "fake", fake_source(tmp_path, sha256="0" * 64))
    raw = tmp_path / "raw"
    with pytest.raises(download.MissingDataError, match="sha256 mismatch"):
        download.resolve_files("fake", raw_dir=raw, download=True, progress=False)
    assert list(raw.iterdir()) == []


def test_make_data_downloads_the_official_files_when_no_sample_is_found(tmp_path, monkeypatch):
    # `make data` in a clone without ../shared/data: the Makefile's own command line, with the official URLs
    # standing in as file:// URLs of the sample's files (same names, same format), fetched with a checked sha256.
    d = sample("amazon-music-2014-sample")
    recipe = next(line.strip() for line in (Path(__file__).resolve().parents[1] / "Makefile").read_text().splitlines()
                  if "-m recdata.prepare" in line)
    argv = recipe.split("-m recdata.prepare", 1)[1].split()
    assert argv == ["--dataset", "amazon-music", "--download", "--out", "data/amazon-music"]
    official = download.DATASETS["amazon-music"]
    digest = hashlib.sha256((d / official.reviews.names[0]).read_bytes()).hexdigest()
    monkeypatch.setitem(download.DATASETS, "amazon-music", dataclasses.replace(
        official, reviews=dataclasses.replace(official.reviews, url=(d / official.reviews.names[0]).as_uri(),
                                              sha256=digest),
        meta=dataclasses.replace(official.meta, url=(d / official.meta.names[0]).as_uri())))
    empty = tmp_path / "no-samples"
    empty.mkdir()
    monkeypatch.setenv("RECZERO_DATA_DIR", str(empty))
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--quiet"]) == 0
    raw = tmp_path / "data" / "raw" / "amazon-music"
    assert sorted(p.name for p in raw.iterdir()) == ["meta_Digital_Music.json.gz", "reviews_Digital_Music_5.json.gz"]
    assert all((tmp_path / "data" / "amazon-music" / name).is_file() for name in OUTPUTS)


def messy_reviews(tmp_path: Path) -> Path:
    rows = [{"reviewerID": f"U{k % 3}", "asin": f"A{k % 2}", "overall": 1.0 + k % 5,
             "unixReviewTime": 1_300_000_000 + 100 * k,
             "summary": "s", "reviewText": "t"} for k in range(12)]
    lines = [json.dumps(r) for r in rows]
    lines[4] = "not json"
    lines[7] = json.dumps({**rows[7], "overall": 0.0})  # below the rating scale
    path = tmp_path / "reviews.json"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_skip_malformed_counts_end_up_in_stats(tmp_path, capsys):
    reviews = messy_reviews(tmp_path)
    assert main(["--format", "amazon2014", "--reviews", str(reviews), "--out", str(tmp_path / "o")]) == 1
    assert "reviews.json:5: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "o" / "stats.json").exists()
    assert main(["--format", "amazon2014", "--reviews", str(reviews), "--out", str(tmp_path / "o"),
                 "--skip-malformed", "--min-history-total", "2", "--quiet"]) == 0
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["malformed_skipped"] == 2 and stats["interactions"] == 10
    assert stats["read"]["reviews"]["skipped"] == {"malformed JSON": 1, "rating out of range": 1}
    assert stats["sources"]["meta"] is None and stats["settings"]["min_history_total"] == 2


def test_crash_while_writing_leaves_the_previous_dataset_intact(tmp_path, monkeypatch):
    music = sample("amazon-music-2014-sample")
    out = tmp_path / "o"
    argv = ["--dataset", "amazon-music", "--raw-dir", str(music), "--out", str(out), "--quiet", "--max-train", "50"]
    assert main(argv) == 0
    before = {name: (out / name).read_bytes() for name in OUTPUTS}
    real_iter = ExampleBuilder.iter_split

    def crash_in_val(self, name):
        if name == "val":
            raise KeyboardInterrupt("simulated crash")
        return real_iter(self, name)

    monkeypatch.setattr(ExampleBuilder, "iter_split", crash_in_val)
    with pytest.raises(KeyboardInterrupt):
        main(argv[:-1] + ["60", "--overwrite"])  # other settings: replacing the output needs --overwrite
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)


def test_every_config_field_is_documented_and_a_flag():
    docs = config_field_docs(BuildConfig)
    fields = [f.name for f in dataclasses.fields(BuildConfig)]
    assert sorted(docs) == sorted(fields) and all(docs.values())
    args = build_parser().parse_args(["--dataset", "amazon-music", "--max-train", "7", "--max-val", "none",
                                      "--val-frac", "0.2"])
    assert (args.max_train, args.max_val, args.val_frac, args.user_history_max) == (7, None, 0.2, 10)
