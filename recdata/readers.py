"""Readers for the raw review dumps the paper uses, all normalised to `Interaction` and `Item`.

One parser pair (review line -> Interaction, metadata line -> Item) per distributed format:

- amazon2014: McAuley lab 2014 dumps. Reviews are JSON lines; metadata lines are *Python literals*
  (single quotes), parsed with `ast.literal_eval` (never `eval`), with a JSON fallback.
- amazon2018: the 2018 re-crawl. JSON lines; many titles are a scraped HTML fragment, replaced by a
  readable fallback (first description sentence, else the most specific category).
- amazon2023: the 2023 release. `parent_asin` is the item id, `timestamp` is in milliseconds.
- yelp: the Yelp Open Dataset; `date` is "YYYY-MM-DD HH:MM:SS", read as UTC.

Every file may be gzipped or plain (detected by its magic bytes); a truncated or corrupt gzip file is an
error naming the file (`CorruptFileError`). A line that cannot be parsed, or a record without user, item,
rating or time, is *malformed*: by default reading stops with an error naming the file and line; with
`on_error="skip"` it is counted by reason and the counts are returned, so a dropped line is always visible in
the dataset's stats.json.

Two kinds of lines are dropped and counted whatever `on_error` says, because real dumps hold them and one
bad line should not stop a multi-GB read:
- an *implausible timestamp* (only with `time_range`; `recdata.prepare` passes 1990-01-01 .. the time of the
  run): a date in the future would otherwise become the whole test split, a huge one (1.5e300) overflows;
- an exact *duplicate* review (same user, item, rating, time and text; `read_dataset` drops them by default):
  kept, it would show every history entry twice.

`check_format` looks at the first lines of both files and stops with "this looks like Amazon 2018: use
--format amazon2018" when they carry another format's keys (an Amazon 2018 file read as amazon2014 would
silently lose every category).
"""
from __future__ import annotations

import ast
import gzip
import html
import json
import math
import os
import re
import sys
import secrets
import time
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Iterator

__all__ = ["Interaction", "Item", "ReviewFormat", "FORMATS", "MalformedRecord", "ReadStats", "CorruptFileError",
           "FormatMismatchError", "open_lines", "read_interactions", "read_items", "read_dataset",
           "placeholder_item", "plausible_time_range", "detect_format", "check_format", "atomic_write",
           "same_file", "EARLIEST_PLAUSIBLE_TIME"]


# ----------------------------------------------------------------------------------------------------
# Normalised records
# ----------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Interaction:
    """One rating of one item by one user."""
    user_id: str
    item_id: str
    rating: float
    timestamp: int  # seconds since the epoch (UTC)
    summary: str    # the review's headline ("summary" in Amazon 2014/2018, "title" in 2023; "" for Yelp)
    text: str       # the review body


@dataclass(slots=True)
class Item:
    """An item's metadata, as shown in a prompt."""
    item_id: str
    title: str
    categories: list[str] = field(default_factory=list)
    brand: str = ""
    price: str = ""        # as shown text, e.g. "$9.49"; "" if unknown
    description: str = ""


def placeholder_item(item_id: str) -> Item:
    """The item when no metadata line exists for it: its id stands in for the title."""
    return Item(item_id=item_id, title=item_id)


class MalformedRecord(ValueError):
    """A line that is not a usable record. `reason` is a short key for the skip counts in stats.json."""

    always_skip = False  # True: skipped and counted even with on_error="raise"

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason


class ImplausibleRecord(MalformedRecord):
    """A well-formed record whose values cannot be real (a timestamp before 1990 or in the future): always
    skipped and counted, never an error (module docstring)."""

    always_skip = True


class CorruptFileError(ValueError):
    """A file that cannot be read to its end (a truncated or corrupt gzip file); the message names it."""


class FormatMismatchError(ValueError):
    """The files carry another format's keys than the one asked for; the message names the right --format."""


EARLIEST_PLAUSIBLE_TIME = 631152000  # 1990-01-01T00:00:00Z: older than any review in the paper's datasets


def plausible_time_range(now: float | None = None) -> tuple[int, int]:
    """(1990-01-01, now) in seconds since the epoch: the timestamps a review can have."""
    return EARLIEST_PLAUSIBLE_TIME, int(time.time() if now is None else now)


# ----------------------------------------------------------------------------------------------------
# Field helpers shared by the formats
# ----------------------------------------------------------------------------------------------------

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"<[^>]*>")
# Signs that a scraped title is a piece of HTML rather than a name (Amazon 2018 magazines:
# '<span class="a-size-medium a-color-secondary"' and ' Magazines" />').
_HTML_JUNK = re.compile(r"</?[a-zA-Z][\w-]*(?:\s|/?>)|/>|\b[\w-]+=\"")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_FALLBACK_TITLE_CHARS = 120


def _require(record: dict, key: str) -> Any:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise MalformedRecord("missing field", f"{key!r} is absent or empty")
    return value


def _id(record: dict, key: str) -> str:
    value = _require(record, key)
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise MalformedRecord("bad id", f"{key}={value!r}")
    # Interned: ids repeat across millions of lines in the full files.
    return sys.intern(str(value).strip())


def _rating(record: dict, key: str) -> float:
    value = _require(record, key)
    try:
        if isinstance(value, bool):
            raise ValueError
        rating = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond any float (10**400)
        raise MalformedRecord("bad rating", f"{key}={value!r}") from None
    if not math.isfinite(rating):
        raise MalformedRecord("bad rating", f"{key}={value!r}")
    return rating


def _seconds(value: Any, key: str, divisor: int = 1) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = int(value) if isinstance(value, str) else value
        if (not isinstance(number, (int, float)) or (isinstance(number, float) and not math.isfinite(number))
                or number < 0):
            raise ValueError
    except (TypeError, ValueError):
        raise MalformedRecord("bad timestamp", f"{key}={value!r}") from None
    return int(number) // divisor


def clean_text(value: Any) -> str:
    """Review or metadata text as plain text: HTML entities decoded, <br> tags as newlines."""
    if value is None:
        return ""
    if isinstance(value, list):  # Amazon 2018/2023 descriptions are lists of paragraphs
        return " ".join(part for part in (clean_text(v) for v in value) if part)
    text = html.unescape(str(value))
    return _BR.sub("\n", text).strip()


def _clean_meta_text(value: Any) -> str:
    """Metadata text (descriptions) with HTML tags removed and whitespace collapsed."""
    return " ".join(_TAG.sub(" ", clean_text(value)).split())


def _categories(value: Any) -> list[str]:
    """Flatten (Amazon 2014: list of category paths), decode, drop empties, dedupe keeping order."""
    flat: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif v is not None:
            flat.append(_clean_meta_text(v))

    walk(value)
    return list(dict.fromkeys(c for c in flat if c and not _HTML_JUNK.search(c)))


def _price(value: Any) -> str:
    """A price as display text: numbers as "$12.34"; strings kept if they look like a price."""
    if value is None or isinstance(value, bool):
        return ""
    if isinstance(value, (int, float)):
        return f"${value:.2f}" if math.isfinite(value) and value >= 0 else ""
    text = clean_text(value)
    # Amazon 2018 price fields sometimes hold scraped CSS/HTML; keep only short, price-like text.
    if len(text) > 40 or not re.search(r"\d", text) or re.search(r"[<>{}]", text):
        return ""
    return text


def is_junk_title(title: str) -> bool:
    """True for an empty title or a piece of HTML (a known defect of Amazon 2018 meta), e.g.
    '<span class="a-size-medium a-color-secondary"' or ' Magazines" />'."""
    stripped = title.strip()
    return not stripped or stripped.startswith("<") or bool(_HTML_JUNK.search(stripped))


def _title(raw: Any, item_id: str, description: str, categories: list[str]) -> str:
    title = _clean_meta_text(raw)  # complete tags removed: "<b>Name</b>" -> "Name"
    if not is_junk_title(title):
        return title
    if description:
        first = _SENTENCE_END.split(description, maxsplit=1)[0].strip()
        if len(first) > _FALLBACK_TITLE_CHARS:
            first = first[:_FALLBACK_TITLE_CHARS - 3].rstrip() + "..."
        return first
    if categories:
        return categories[-1]  # the most specific category
    return item_id


# ----------------------------------------------------------------------------------------------------
# The formats
# ----------------------------------------------------------------------------------------------------

def _review_2014(r: dict) -> Interaction:
    return Interaction(user_id=_id(r, "reviewerID"), item_id=_id(r, "asin"), rating=_rating(r, "overall"),
                       timestamp=_seconds(_require(r, "unixReviewTime"), "unixReviewTime"),
                       summary=clean_text(r.get("summary")), text=clean_text(r.get("reviewText")))


def _item_2014(m: dict) -> Item:
    item_id = _id(m, "asin")
    categories = _categories(m.get("categories"))
    description = _clean_meta_text(m.get("description"))
    return Item(item_id=item_id, title=_title(m.get("title"), item_id, description, categories),
                categories=categories, brand=_clean_meta_text(m.get("brand")), price=_price(m.get("price")),
                description=description)


def _item_2018(m: dict) -> Item:
    item_id = _id(m, "asin")
    categories = _categories(m.get("category"))
    if not categories:
        categories = _categories(m.get("main_cat"))
    description = _clean_meta_text(m.get("description"))
    return Item(item_id=item_id, title=_title(m.get("title"), item_id, description, categories),
                categories=categories, brand=_clean_meta_text(m.get("brand")), price=_price(m.get("price")),
                description=description)


def _review_2023(r: dict) -> Interaction:
    # parent_asin groups the variants (colour, size) of one product, as the 2023 release recommends.
    item_key = "parent_asin" if r.get("parent_asin") else "asin"
    return Interaction(user_id=_id(r, "user_id"), item_id=_id(r, item_key), rating=_rating(r, "rating"),
                       timestamp=_seconds(_require(r, "timestamp"), "timestamp", divisor=1000),
                       summary=clean_text(r.get("title")), text=clean_text(r.get("text")))


def _item_2023(m: dict) -> Item:
    item_id = _id(m, "parent_asin")
    categories = _categories([m.get("main_category"), m.get("categories")])
    description = _clean_meta_text(m.get("description"))
    return Item(item_id=item_id, title=_title(m.get("title"), item_id, description, categories),
                categories=categories, brand=_clean_meta_text(m.get("store")), price=_price(m.get("price")),
                description=description)


def _yelp_seconds(r: dict) -> int:
    value = _require(r, "date")
    try:
        moment = datetime.strptime(str(value).strip(), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        raise MalformedRecord("bad timestamp", f"date={value!r}") from None
    return int(moment.replace(tzinfo=timezone.utc).timestamp())


def _review_yelp(r: dict) -> Interaction:
    return Interaction(user_id=_id(r, "user_id"), item_id=_id(r, "business_id"), rating=_rating(r, "stars"),
                       timestamp=_yelp_seconds(r), summary="", text=clean_text(r.get("text")))


def _item_yelp(b: dict) -> Item:
    item_id = _id(b, "business_id")
    raw_categories = b.get("categories") or ""
    if isinstance(raw_categories, str):
        raw_categories = raw_categories.split(",")
    categories = _categories(raw_categories)
    place = ", ".join(p for p in (clean_text(b.get("city")), clean_text(b.get("state"))) if p)
    description = f"Located in {place}." if place else ""
    # RestaurantsPriceRange2 is "1".."4" (or the string "None"); shown the way Yelp shows it: "$$".
    attributes = b.get("attributes") if isinstance(b.get("attributes"), dict) else {}
    price_level = str(attributes.get("RestaurantsPriceRange2") or "").strip()
    price = "$" * int(price_level) if price_level in {"1", "2", "3", "4"} else ""
    return Item(item_id=item_id, title=_title(b.get("name"), item_id, description, categories),
                categories=categories, brand="", price=price, description=description)


def _json_object(line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise MalformedRecord("malformed JSON", str(err)) from None
    if not isinstance(obj, dict):
        raise MalformedRecord("malformed JSON", f"expected an object, got {type(obj).__name__}")
    return obj


def _literal_object(line: str) -> dict:
    """A Python-literal dict line (Amazon 2014 metadata); JSON lines are accepted too."""
    try:
        obj = ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise MalformedRecord("malformed literal", str(err)) from None
    if not isinstance(obj, dict):
        raise MalformedRecord("malformed literal", f"expected a dict, got {type(obj).__name__}")
    return obj


@dataclass(frozen=True)
class ReviewFormat:
    """How to read one distributed format."""
    name: str
    parse_review: Callable[[dict], Interaction]
    parse_item: Callable[[dict], Item]
    decode_meta_line: Callable[[str], dict]
    meta_id_key: str  # the metadata key holding the item id (used to skip unneeded metadata lines fast)


FORMATS: dict[str, ReviewFormat] = {
    "amazon2014": ReviewFormat("amazon2014", _review_2014, _item_2014, _literal_object, "asin"),
    # Amazon 2018 review lines use the 2014 keys (plus vote, style, verified, which we do not need).
    "amazon2018": ReviewFormat("amazon2018", _review_2014, _item_2018, _json_object, "asin"),
    "amazon2023": ReviewFormat("amazon2023", _review_2023, _item_2023, _json_object, "parent_asin"),
    "yelp": ReviewFormat("yelp", _review_yelp, _item_yelp, _json_object, "business_id"),
}


# ----------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------

def open_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, raw bytes) of the non-blank lines of a plain or gzipped file.

    Gzip is detected by its magic bytes, not the suffix. Lines stay bytes so that a line that is not
    UTF-8 fails on its own, with its line number, instead of stopping the whole file.
    """
    path = Path(path)
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    lineno = 0
    with opener(path, "rb") as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    yield lineno, raw
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise CorruptFileError(f"{path}: the gzip file is truncated or corrupt after line {lineno} "
                                   f"({type(err).__name__}: {err}); download or copy it again") from None


@dataclass
class ReadStats:
    """What reading one file did: lines seen, records kept, malformed lines skipped (by reason)."""
    path: str
    lines: int = 0
    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skipped: list[str] = field(default_factory=list)  # the first few skip messages, for the log
    duplicates: int = 0  # repeated records: reviews identical in all fields, or meta lines of an item already read

    def skip(self, message: str, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.first_skipped) < 5:
            self.first_skipped.append(message)

    def as_dict(self) -> dict:
        return {"path": self.path, "lines": self.lines, "records": self.records,
                "skipped_total": sum(self.skipped.values()), "skipped": dict(sorted(self.skipped.items())),
                "first_skipped": list(self.first_skipped), "duplicates_dropped": self.duplicates}


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _parse_lines(path: Path, decode: Callable[[str], dict], parse: Callable[[dict], Any], on_error: str,
                 stats: ReadStats, keep_line: Callable[[str], bool] | None = None) -> Iterator[Any]:
    """The loop shared by both readers: decode, parse, and raise or count each malformed line."""
    for lineno, raw in open_lines(path):
        stats.lines += 1
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise MalformedRecord("invalid UTF-8", str(err)) from None
            if keep_line is not None and not keep_line(text):
                continue
            record = parse(decode(text))
        except MalformedRecord as err:
            message = f"{path.name}:{lineno}: {err}"
            if on_error == "raise" and not err.always_skip:
                raise ValueError(message + " (pass on_error='skip' / --skip-malformed to skip such lines)") \
                    from None
            stats.skip(message, err.reason)
            continue
        stats.records += 1
        yield record


def read_interactions(fmt: str, path: str | Path, on_error: str = "raise",
                      rating_range: tuple[float, float] | None = None, max_text_chars: int | None = None,
                      stats: ReadStats | None = None, time_range: tuple[int, int] | None = None,
                      drop_duplicates: bool = False) -> Iterator[Interaction]:
    """Yield the interactions of a review file in file order.

    rating_range: (min, max); a rating outside it makes the line malformed.
    max_text_chars: keep at most this many characters of each summary and text (memory for the big files;
        pass more than the longest text a prompt shows so the cut-with-"..." decision stays correct).
    time_range: (earliest, latest) seconds; a timestamp outside it is skipped and counted as "implausible
        timestamp" whatever on_error says (`plausible_time_range()`: 1990 .. now).
    drop_duplicates: drop a review identical to an earlier one in user, item, rating, time and text (the
        whole text, before max_text_chars cuts it), counted in stats.duplicates. The check keeps a 64-bit
        hash per review, not the review: two different reviews are taken for one only on a hash collision.
    """
    _check_on_error(on_error)
    review_format = FORMATS[fmt]
    path = Path(path)
    stats = stats if stats is not None else ReadStats(str(path))
    seen: set[int] = set()

    def parse(record: dict) -> tuple[Interaction, int | None]:
        x = review_format.parse_review(record)
        if rating_range is not None and not rating_range[0] <= x.rating <= rating_range[1]:
            raise MalformedRecord("rating out of range", f"{x.rating:g} not in [{rating_range[0]:g}, "
                                                         f"{rating_range[1]:g}]")
        if time_range is not None and not time_range[0] <= x.timestamp <= time_range[1]:
            raise ImplausibleRecord("implausible timestamp", f"{_show_time(x.timestamp)} is not between "
                                    f"{_show_time(time_range[0])} and {_show_time(time_range[1])}")
        key = hash((x.user_id, x.item_id, x.rating, x.timestamp, x.text)) if drop_duplicates else None
        if max_text_chars is not None:
            x.summary, x.text = x.summary[:max_text_chars], x.text[:max_text_chars]
        return x, key

    for x, key in _parse_lines(path, _json_object, parse, on_error, stats):
        if key is not None:
            if key in seen:
                stats.duplicates += 1
                stats.records -= 1
                continue
            seen.add(key)
        yield x


def _show_time(seconds: int) -> str:
    """A timestamp for a message: its UTC date when it has one, else the number."""
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d")
    except (OverflowError, OSError, ValueError):
        digits = str(seconds)
        return digits if len(digits) <= 20 else f"{digits[:6]}... ({len(digits)} digits)"


def read_items(fmt: str, path: str | Path, wanted: set[str] | None = None, on_error: str = "raise",
               stats: ReadStats | None = None) -> dict[str, Item]:
    """Read a metadata file into {item_id: Item}; the first line of a repeated item wins.

    wanted: only keep these item ids. Lines whose id (found by a quick text search) is not wanted are not
    parsed at all, which matters for the multi-GB metadata files.
    """
    _check_on_error(on_error)
    review_format = FORMATS[fmt]
    path = Path(path)
    stats = stats if stats is not None else ReadStats(str(path))
    keep_line = None
    if wanted is not None:
        id_pattern = re.compile(r"""["']%s["']\s*:\s*["']([^"']+)["']""" % re.escape(review_format.meta_id_key))

        def keep_line(text: str) -> bool:
            found = id_pattern.search(text)
            return found is None or found.group(1).strip() in wanted  # no match: parse it to be sure

    items: dict[str, Item] = {}
    for item in _parse_lines(path, review_format.decode_meta_line, review_format.parse_item, on_error, stats,
                             keep_line):
        if wanted is not None and item.item_id not in wanted:
            continue
        if item.item_id in items:
            stats.duplicates += 1
            continue
        items[item.item_id] = item
    return items


def read_dataset(fmt: str, reviews_path: str | Path, meta_path: str | Path | None = None,
                 on_error: str = "raise", rating_range: tuple[float, float] | None = None,
                 max_text_chars: int | None = None, time_range: tuple[int, int] | None = None,
                 drop_duplicates: bool = True,
                 check_formats: bool = True) -> tuple[list[Interaction], dict[str, Item], dict]:
    """Read a review file and (optionally) its metadata file.

    Returns (interactions in file order, {item_id: Item} for every reviewed item, read_stats). Items without
    a metadata line get a placeholder whose title is the item id. read_stats holds, per file, the lines
    read, records kept, malformed lines skipped by reason and duplicates dropped; it goes into stats.json.
    time_range, drop_duplicates: see read_interactions. check_formats: `check_format` first.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {sorted(FORMATS)}")
    if check_formats:
        check_format(fmt, reviews_path, meta_path)
    review_stats = ReadStats(str(reviews_path))
    interactions = list(read_interactions(fmt, reviews_path, on_error, rating_range, max_text_chars,
                                          review_stats, time_range=time_range, drop_duplicates=drop_duplicates))
    reviewed = {x.item_id for x in interactions}
    items: dict[str, Item] = {}
    read_stats: dict[str, Any] = {"format": fmt, "reviews": review_stats.as_dict(), "meta": None}
    if meta_path is not None:
        meta_stats = ReadStats(str(meta_path))
        items = read_items(fmt, meta_path, wanted=reviewed, on_error=on_error, stats=meta_stats)
        read_stats["meta"] = {**meta_stats.as_dict(), "items_kept": len(items),
                              "duplicate_items": meta_stats.duplicates}
    missing = sorted(reviewed - items.keys())
    for item_id in missing:
        items[item_id] = placeholder_item(item_id)
    read_stats["items_without_meta"] = len(missing)
    read_stats["duplicates_dropped"] = review_stats.duplicates
    read_stats["implausible_timestamps"] = review_stats.skipped.get("implausible timestamp", 0)
    read_stats["skipped_total"] = review_stats.as_dict()["skipped_total"] + (
        read_stats["meta"]["skipped_total"] if read_stats["meta"] else 0)
    return interactions, items, read_stats


# ----------------------------------------------------------------------------------------------------
# Which format is this? (the first lines' keys)
# ----------------------------------------------------------------------------------------------------

FORMAT_NAMES = {"amazon2014": "Amazon 2014", "amazon2018": "Amazon 2018", "amazon2023": "Amazon 2023",
                "yelp": "Yelp"}

# Per format, a test of one decoded line's keys that only that format's lines pass. A line with too few keys to
# tell passes none (hand-written files: no verdict, no error).
_REVIEW_SIGNS: dict[str, Callable[[set], bool]] = {
    "amazon2014": lambda k: "reviewerID" in k and "helpful" in k and not k & {"verified", "vote", "style"},
    "amazon2018": lambda k: "reviewerID" in k and bool(k & {"verified", "vote", "style"}),
    "amazon2023": lambda k: "user_id" in k and "rating" in k and bool(k & {"asin", "parent_asin"}),
    "yelp": lambda k: "business_id" in k and "stars" in k,
}
_META_SIGNS: dict[str, Callable[[set], bool]] = {
    "amazon2014": lambda k: "asin" in k and bool(k & {"categories", "salesRank", "related", "imUrl"})
    and not k & {"category", "main_cat", "main_category"},
    "amazon2018": lambda k: "asin" in k and bool(k & {"category", "main_cat", "also_buy", "also_view", "tech1"})
    and "categories" not in k,
    "amazon2023": lambda k: "parent_asin" in k or "main_category" in k,
    "yelp": lambda k: "business_id" in k and "asin" not in k,
}


def _first_keys(path: Path, lines: int) -> list[set]:
    """The key sets of the first `lines` decodable object lines of a file (JSON, else a Python literal)."""
    found: list[set] = []
    try:
        for _, raw in open_lines(path):
            if len(found) >= lines:
                break
            text = raw.decode("utf-8", errors="replace")
            try:
                obj = json.loads(text)
            except ValueError:
                try:
                    obj = ast.literal_eval(text)
                except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                    continue
            if isinstance(obj, dict):
                found.append(set(obj))
    except CorruptFileError:
        pass  # reading proper reports it, with the line
    return found


def _votes(keys: list[set], meta: bool) -> Counter:
    """Per format, how many of these lines match its signature and no other format's."""
    signs = _META_SIGNS if meta else _REVIEW_SIGNS
    votes: Counter = Counter()
    for k in keys:
        matches = [name for name, test in signs.items() if test(k)]
        if len(matches) == 1:
            votes[matches[0]] += 1
    return votes


def _guess(votes: Counter, n_lines: int) -> str | None:
    if not votes:
        return None
    name, count = votes.most_common(1)[0]
    return name if count * 2 > n_lines else None


def detect_format(path: str | Path, meta: bool = False, lines: int = 20) -> str | None:
    """The format whose key signature most of the first `lines` lines match, or None (no clear verdict)."""
    keys = _first_keys(Path(path), lines)
    return _guess(_votes(keys, meta), len(keys))


def check_format(fmt: str, reviews_path: str | Path, meta_path: str | Path | None = None,
                 lines: int = 20) -> None:
    """Raise FormatMismatchError when most of a file's first lines look like another format and none like
    `fmt` (lines too bare to tell, as in small hand-written files, give no verdict)."""
    for path, meta in ((reviews_path, False), (meta_path, True)):
        if path is None:
            continue
        keys = _first_keys(Path(path), lines)
        votes = _votes(keys, meta)
        guess = _guess(votes, len(keys))
        if guess is None or guess == fmt or votes[fmt]:
            continue
        raise FormatMismatchError(
            f"{path}: this looks like {FORMAT_NAMES[guess]}, not {FORMAT_NAMES.get(fmt, fmt)} (the keys of its first "
            f"lines are {guess}'s): use --format {guess}")


# ----------------------------------------------------------------------------------------------------
# Writing output files
# ----------------------------------------------------------------------------------------------------

def same_file(a: str | Path, b: str | Path) -> bool:
    """True when the two paths name one file (the same path, a link to it, or a hard link)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it replaces `path` in one rename, on any
    error (or Ctrl-C) it is deleted and `path` is left as it was. The folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to a plain open()
    try:
        with open(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
