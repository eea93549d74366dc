"""Where the paper's datasets come from, how to find them locally, and how to download them.

The table `DATASETS` is the one place that names the official files. Amazon 2014 files come from the
McAuley lab's per-category dumps; Yelp's Open Dataset needs its terms accepted on yelp.com, so it has
instructions instead of a URL.

Lookup order (see `resolve_files`): an explicit raw directory only, if given; otherwise the data
directory (RECZERO_DATA_DIR, passed in by the CLI), its sample sub-folders for the dataset, then the
default download directory. Nothing found: download with `download=True`, or a `MissingDataError` that
says which file to put in which folder.
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

__all__ = ["RawFile", "DatasetSource", "DATASETS", "MissingDataError", "find_files", "resolve_files",
           "download_file"]

_AMAZON_2014 = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"


@dataclass(frozen=True)
class RawFile:
    """One raw file of a dataset."""
    names: tuple[str, ...]    # accepted file names; names[0] is the official one (and the download's name)
    url: str | None = None    # None: cannot be downloaded automatically
    sha256: str | None = None  # None: unknown; the computed digest is printed after a download


@dataclass(frozen=True)
class DatasetSource:
    """A named dataset of the paper and where its raw files come from."""
    name: str
    format: str                     # a key of recdata.readers.FORMATS
    reviews: RawFile
    meta: RawFile
    sample_dirs: tuple[str, ...]    # sub-folders of the data directory holding a sample of it
    homepage: str
    manual_steps: str = ""          # how to get the files by hand when there is no URL


DATASETS: dict[str, DatasetSource] = {
    "amazon-music": DatasetSource(
        name="amazon-music", format="amazon2014",
        reviews=RawFile(("reviews_Digital_Music_5.json.gz", "reviews_Digital_Music_5.json"),
                        _AMAZON_2014 + "reviews_Digital_Music_5.json.gz"),
        meta=RawFile(("meta_Digital_Music.json.gz", "meta_Digital_Music.json"),
                     _AMAZON_2014 + "meta_Digital_Music.json.gz"),
        sample_dirs=("amazon-music-2014-sample",),
        homepage="https://jmcauley.ucsd.edu/data/amazon/"),
    "amazon-book": DatasetSource(
        name="amazon-book", format="amazon2014",
        reviews=RawFile(("reviews_Books_5.json.gz", "reviews_Books_5.json"),
                        _AMAZON_2014 + "reviews_Books_5.json.gz"),
        meta=RawFile(("meta_Books.json.gz", "meta_Books.json"), _AMAZON_2014 + "meta_Books.json.gz"),
        sample_dirs=(),
        homepage="https://jmcauley.ucsd.edu/data/amazon/"),
    "yelp": DatasetSource(
        name="yelp", format="yelp",
        reviews=RawFile(("yelp_academic_dataset_review.json", "yelp_academic_dataset_review.json.gz",
                         "review.json", "review.json.gz")),
        meta=RawFile(("yelp_academic_dataset_business.json", "yelp_academic_dataset_business.json.gz",
                      "business.json", "business.json.gz")),
        sample_dirs=("yelp-sample",),
        homepage="https://www.yelp.com/dataset",
        manual_steps=("Yelp's files need its terms accepted: open https://www.yelp.com/dataset, accept the "
                      "Dataset License, download the JSON archive (yelp_dataset.tar), and extract "
                      "yelp_academic_dataset_review.json and yelp_academic_dataset_business.json")),
}


class MissingDataError(RuntimeError):
    """The raw files of a dataset are neither local nor downloadable; the message says how to fix it."""


def _find_one(raw: RawFile, folder: Path) -> Path | None:
    for name in raw.names:
        if (folder / name).is_file():
            return folder / name
    return None


def find_files(source: DatasetSource, folders: list[Path]) -> tuple[Path, Path] | None:
    """The first folder holding both the reviews and the metadata file, as (reviews, meta) paths."""
    for folder in folders:
        reviews, meta = _find_one(source.reviews, folder), _find_one(source.meta, folder)
        if reviews is not None and meta is not None:
            return reviews, meta
    return None


def candidate_folders(source: DatasetSource, raw_dir: Path | None, data_dir: Path | None,
                      download_dir: Path) -> list[Path]:
    """Where `resolve_files` looks, in order."""
    if raw_dir is not None:
        return [raw_dir]  # an explicit folder is the only place looked at (and where downloads go)
    folders = []
    if data_dir is not None:
        folders += [data_dir] + [data_dir / sub for sub in source.sample_dirs]
    return folders + [download_dir]


def _downloadable(source: DatasetSource) -> bool:
    return bool(source.reviews.url and source.meta.url)


def _how_to_get(source: DatasetSource, folder: Path) -> str:
    lines = []
    if source.manual_steps:
        lines.append(f"  - {source.manual_steps} into {folder}/")
    else:
        for raw in (source.reviews, source.meta):
            lines.append(f"  - put {raw.names[0]} into {folder}/  (official URL: {raw.url})")
        lines.append(f"  - or rerun with --download to fetch them into {folder}/")
    return "\n".join(lines)


def resolve_files(name: str, raw_dir: str | Path | None = None, data_dir: str | Path | None = None,
                  download: bool = False, download_dir: str | Path | None = None,
                  progress: bool = True) -> tuple[Path, Path]:
    """(reviews path, meta path) of a named dataset: found locally, else downloaded if allowed."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    source = DATASETS[name]
    raw_dir = Path(raw_dir) if raw_dir is not None else None
    data_dir = Path(data_dir) if data_dir is not None else None
    target = raw_dir or Path(download_dir if download_dir is not None else Path("data") / "raw" / name)
    folders = candidate_folders(source, raw_dir, data_dir, target)
    found = find_files(source, folders)
    if found is not None:
        return found

    looked = "\n".join(f"  - {folder}" for folder in folders)
    wanted = f"{source.reviews.names[0]} and {source.meta.names[0]}"
    if download and _downloadable(source):
        target.mkdir(parents=True, exist_ok=True)
        paths = []
        for raw in (source.reviews, source.meta):
            path = _find_one(raw, target)
            if path is None:
                path = target / raw.names[0]
                try:
                    download_file(raw.url, path, raw.sha256, progress=progress)
                except (urllib.error.URLError, OSError) as err:
                    raise MissingDataError(
                        f"Could not download {raw.url} ({err}).\nDataset {name!r} needs {wanted}; to get them "
                        f"by hand:\n{_how_to_get(source, target)}") from None
            paths.append(path)
        return paths[0], paths[1]
    why = "--download was not given" if _downloadable(source) else "they cannot be downloaded automatically"
    raise MissingDataError(f"Dataset {name!r} needs {wanted}, and they were not found in:\n{looked}\n"
                           f"({why}). To get them:\n{_how_to_get(source, target)}\n"
                           f"Homepage: {source.homepage}")


def download_file(url: str, dest: str | Path, sha256: str | None = None, progress: bool = True,
                  chunk_bytes: int = 1 << 20) -> str:
    """Stream `url` into `dest` through `dest.partial`, check or print its sha256, return the digest.

    The file only appears under its final name once complete (and verified, when a digest is known).
    """
    dest = Path(dest)
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
            size = response.headers.get("Content-Length")
            with tqdm(total=int(size) if size else None, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=dest.name, disable=not progress) as bar:
                while chunk := response.read(chunk_bytes):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        hexdigest = digest.hexdigest()
        if sha256 is not None and hexdigest != sha256.lower():
            raise OSError(f"sha256 mismatch for {url}: expected {sha256}, got {hexdigest}")
        os.replace(partial, dest)
    finally:
        if partial.exists():
            partial.unlink()
    if sha256 is None:
        print(f"downloaded {dest} (sha256 {hexdigest}; record it in recdata/download.py to check later downloads)")
    return hexdigest
