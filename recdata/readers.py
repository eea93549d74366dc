"""Readers for the raw review dumps the paper uses, all normalised to `Interaction` and `Item`.

One parser pair (review line -> Interaction, metadata line -> Item) per distributed format:

- amazon2014: McAuley lab 2014 dumps. Reviews are JSON lines; metadata lines are *Python literals*
  (single quotes), parsed with `ast.literal_eval` (never `eval`), with a JSON fallback.
- amazon2018: the 2018 re-crawl. JSON lines; many titles are a scraped HTML fragment, replaced by a
  readable fallback (first description sentence, else the most specific category).
- amazon2023: the 2023 release. `parent_asin` is the item id, `timestamp` is in milliseconds.
- yelp: the Yelp Open Dataset; `date` is "YYYY-MM-DD HH:MM:SS", read as UTC.

Every file may be gzipped or plain (detected by its magic bytes). A line that cannot be parsed, or a
record without user, item, rating or time, is *malformed*: by default reading stops with an error naming
the file and line; with `on_error="skip"` it is counted by reason and the counts are returned, so a
dropped line is always visible in the dataset's stats.json.
"""
from __future__ import annotations

import ast
import gzip
import html
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["Interaction", "Item", "ReviewFormat", "FORMATS", "MalformedRecord", "ReadStats",
           "open_lines", "read_interactions", "read_items", "read_dataset", "placeholder_item"]


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

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason


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
    except (TypeError, ValueError):
        raise MalformedRecord("bad rating", f"{key}={value!r}") from None
    if not math.isfinite(rating):
        raise MalformedRecord("bad rating", f"{key}={value!r}")
    return rating


def _seconds(value: Any, key: str, divisor: int = 1) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = int(value) if isinstance(value, str) else value
        if not isinstance(number, (int, float)) or not math.isfinite(number) or number < 0:
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
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                yield lineno, raw


@dataclass
class ReadStats:
    """What reading one file did: lines seen, records kept, malformed lines skipped (by reason)."""
    path: str
    lines: int = 0
    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skipped: list[str] = field(default_factory=list)  # the first few skip messages, for the log
    duplicates: int = 0  # metadata only: repeated lines for an item already read (the first one wins)

    def skip(self, message: str, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.first_skipped) < 5:
            self.first_skipped.append(message)

    def as_dict(self) -> dict:
        return {"path": self.path, "lines": self.lines, "records": self.records,
                "skipped_total": sum(self.skipped.values()), "skipped": dict(sorted(self.skipped.items())),
                "first_skipped": list(self.first_skipped)}


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
            if on_error == "raise":
                raise ValueError(message + " (pass on_error='skip' / --skip-malformed to skip such lines)") \
                    from None
            stats.skip(message, err.reason)
            continue
        stats.records += 1
        yield record


def read_interactions(fmt: str, path: str | Path, on_error: str = "raise",
                      rating_range: tuple[float, float] | None = None, max_text_chars: int | None = None,
                      stats: ReadStats | None = None) -> Iterator[Interaction]:
    """Yield the interactions of a review file in file order.

    rating_range: (min, max); a rating outside it makes the line malformed.
    max_text_chars: keep at most this many characters of each summary and text (memory for the big files;
        pass more than the longest text a prompt shows so the cut-with-"..." decision stays correct).
    """
    _check_on_error(on_error)
    review_format = FORMATS[fmt]
    path = Path(path)
    stats = stats if stats is not None else ReadStats(str(path))

    def parse(record: dict) -> Interaction:
        x = review_format.parse_review(record)
        if rating_range is not None and not rating_range[0] <= x.rating <= rating_range[1]:
            raise MalformedRecord("rating out of range", f"{x.rating:g} not in [{rating_range[0]:g}, "
                                                         f"{rating_range[1]:g}]")
        if max_text_chars is not None:
            x.summary, x.text = x.summary[:max_text_chars], x.text[:max_text_chars]
        return x

    yield from _parse_lines(path, _json_object, parse, on_error, stats)


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
                 max_text_chars: int | None = None) -> tuple[list[Interaction], dict[str, Item], dict]:
    """Read a review file and (optionally) its metadata file.

    Returns (interactions in file order, {item_id: Item} for every reviewed item, read_stats). Items without
    a metadata line get a placeholder whose title is the item id. read_stats holds, per file, the lines
    read, records kept and malformed lines skipped by reason; it goes into stats.json.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {sorted(FORMATS)}")
    review_stats = ReadStats(str(reviews_path))
    interactions = list(read_interactions(fmt, reviews_path, on_error, rating_range, max_text_chars,
                                          review_stats))
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
    read_stats["skipped_total"] = review_stats.as_dict()["skipped_total"] + (
        read_stats["meta"]["skipped_total"] if read_stats["meta"] else 0)
    return interactions, items, read_stats
