"""Readers: real lines from the shared data samples, plus hand-written files for the variants they lack."""
import gzip
import json
from pathlib import Path

import pytest

from recdata.readers import FORMATS, Item, read_dataset, read_interactions, read_items

from conftest import data_sample as sample  # noqa: E402


# ----------------------------------------------------------------------------------------------------
# Real samples
# ----------------------------------------------------------------------------------------------------

def test_amazon2014_music_sample():
    d = sample("amazon-music-2014-sample")
    xs, items, stats = read_dataset("amazon2014", d / "reviews_Digital_Music_5.json.gz",
                                    d / "meta_Digital_Music.json.gz")
    assert (len(xs), len({x.user_id for x in xs}), len(items)) == (6908, 2490, 382)
    first = xs[0]
    assert (first.user_id, first.item_id, first.rating, first.timestamp) == ("A3EBHHCZO6V2A4", "5555991584",
                                                                              5.0, 1158019200)
    assert first.summary == "Enya's last great album"
    assert first.text.startswith("It's hard to believe \"Memory of Trees\" came out 11 years ago")
    histogram = {r: sum(x.rating == r for x in xs) for r in (1.0, 2.0, 3.0, 4.0, 5.0)}
    assert histogram == {1.0: 111, 2.0: 161, 3.0: 500, 4.0: 1474, 5.0: 4662}  # as the data README says
    enya = items["5555991584"]
    assert enya.title == "Memory of Trees" and enya.price == "$9.49"
    # Python-literal list of category paths, flattened, deduplicated, in order.
    assert enya.categories == ["CDs & Vinyl", "New Age", "Celtic New Age", "Meditation", "Pop", "Rock",
                               "Digital Music"]
    assert stats["items_without_meta"] == 0 and stats["skipped_total"] == 0
    assert stats["reviews"]["lines"] == 6908 and stats["meta"]["items_kept"] == 382


def test_amazon2018_magazines_junk_titles_fall_back():
    d = sample("amazon-magazines-2018")
    xs, items, stats = read_dataset("amazon2018", d / "Magazine_Subscriptions_5.json.gz",
                                    d / "meta_Magazine_Subscriptions.json.gz")
    # 44 of the 2,375 lines repeat an earlier review exactly (user, item, rating, time, text): dropped, counted.
    assert (len(xs), len({x.user_id for x in xs}), len(items)) == (2375 - 44, 348, 157)
    assert stats["duplicates_dropped"] == stats["reviews"]["duplicates_dropped"] == 44
    assert stats["reviews"]["records"] == 2375 - 44 and stats["reviews"]["lines"] == 2375
    first = xs[0]
    assert (first.user_id, first.item_id, first.rating, first.timestamp, first.summary) == (
        "A5QQOOZJOVPSF", "B00005N7P0", 4.0, 1393372800, "Cheapskates guide")
    # The raw title of B00005N7P0 is '<span class="a-size-medium a-color-secondary"'.
    maximum_pc = items["B00005N7P0"]
    assert maximum_pc.title == "MAXIMUM PC is the ultimate upgrade for the savvy PC owners."
    assert maximum_pc.brand == "Future US, Inc." and "Computers & Internet" in maximum_pc.categories
    for item in items.values():
        assert item.title and "<" not in item.title and "/>" not in item.title and 'class="' not in item.title
        assert all("&amp;" not in c for c in item.categories)
    # The 2018 meta repeats some items; 6 reviewed items have no meta line at all.
    assert stats["meta"]["duplicate_items"] > 0
    assert stats["items_without_meta"] == 6
    assert sum(items[i].title == i for i in items) == 6
    # 73 duplicated (user, item) pairs in the file; the 29 that are not exact copies stay separate interactions.
    pairs = [(x.user_id, x.item_id) for x in xs]
    assert len(pairs) - len(set(pairs)) == 73 - 44
    kept_all = read_dataset("amazon2018", d / "Magazine_Subscriptions_5.json.gz", drop_duplicates=False)[0]
    assert len(kept_all) == 2375


def test_amazon2023_sample():
    d = sample("amazon-2023-sample")
    xs, items, stats = read_dataset("amazon2023", d / "reviews.jsonl.gz", d / "meta.jsonl.gz")
    assert (len(xs), len({x.user_id for x in xs}), len(items)) == (3455, 354, 3228)
    first = xs[0]
    assert (first.user_id, first.item_id, first.rating) == ("AHWCZ47A7FIYEJ7KEJG3BO3F5YXQ", "B081D87QCJ", 4.0)
    assert first.timestamp == 1586445693  # 1586445693499 ms
    assert first.summary == "Make your eyes feel delightful!"
    assert all("<br" not in x.text for x in xs)
    assert stats["items_without_meta"] == 3228 - 3154
    all_items = read_items("amazon2023", d / "meta.jsonl.gz")  # every meta line, not only reviewed items
    clip = all_items["B095RWJJB8"]
    assert clip.title.startswith("Summer Crystal Hair Clip Sparkling Sequins")
    assert (clip.categories, clip.price, clip.brand) == (["All Beauty"], "", "")
    assert all_items["B09CPH2QLY"].price == "$60.69"


def test_yelp_sample():
    d = sample("yelp-sample")
    xs, items, stats = read_dataset("yelp", d / "review.json.gz", d / "business.json.gz")
    assert (len(xs), len({x.user_id for x in xs})) == (4362, 1711)
    first = xs[0]
    assert (first.user_id, first.item_id, first.rating) == ("-2BsDZWzob5Q1ZGHcDJ6gw", "9zlIJ7Q5W4AENjpGgaNSsQ", 5.0)
    assert first.timestamp == 1121446215  # "2005-07-15 16:50:15" read as UTC
    assert first.summary == "" and first.text.startswith("Great deep dish pizza.")
    bricks = items["dIpTuL2T1L98GQGU17IeSw"]
    assert bricks.title == "The Bricks"
    assert bricks.categories[:3] == ["Bars", "Breakfast & Brunch", "Restaurants"]
    assert (bricks.brand, bricks.price, bricks.description) == ("", "$$", "Located in Tampa, FL.")
    assert stats["meta"]["items_kept"] == 432


def test_yelp_open_dataset_head_joins_a_third():
    d = sample("yelp-open-dataset-head")
    xs, items, stats = read_dataset("yelp", d / "review.json.gz", d / "business.json.gz")
    assert len(xs) == 5000
    assert (xs[0].user_id, xs[0].rating, xs[0].timestamp) == ("mh_-eMZ6K5RLWhZyISBhwA", 3.0, 1531001351)
    joined = sum(items[x.item_id].title != x.item_id for x in xs) / len(xs)
    assert 0.2 < joined < 0.5
    # Businesses with "categories": null read as no categories.
    businesses = read_items("yelp", d / "business.json.gz")
    assert len(businesses) == 5000
    assert businesses["Pns2l4eNsfO8kk83dixA6A"].title == "Abby Rappoport, LAC, CMQ"
    assert sum(not b.categories for b in businesses.values()) >= 5


# ----------------------------------------------------------------------------------------------------
# Hand-written variants
# ----------------------------------------------------------------------------------------------------

REVIEW_2014 = {"reviewerID": "U1", "asin": "A1", "overall": 4.0, "unixReviewTime": 1000,
               "summary": "Nice &amp; loud", "reviewText": "Line one<br />line two"}
META_2014 = {"asin": "A1", "title": "An Album", "price": 12.5, "brand": "Label",
             "categories": [["Music", "Rock"], ["Music", "Pop"]], "description": "<b>Great</b> record."}


def write_lines(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_gzip_detected_by_magic_bytes_not_suffix(tmp_path):
    line = json.dumps(REVIEW_2014)
    plain = write_lines(tmp_path / "plain.json.gz", [line])  # misleading suffix
    zipped = write_lines(tmp_path / "zipped.json", [line], gz=True)
    a = list(read_interactions("amazon2014", plain))
    b = list(read_interactions("amazon2014", zipped))
    assert a == b
    assert (a[0].summary, a[0].text) == ("Nice & loud", "Line one\nline two")


def test_2014_meta_literal_and_json_read_the_same(tmp_path):
    literal = write_lines(tmp_path / "meta_literal.json", [repr(META_2014)])
    as_json = write_lines(tmp_path / "meta_json.json.gz", [json.dumps(META_2014)], gz=True)
    expected = Item("A1", "An Album", ["Music", "Rock", "Pop"], "Label", "$12.50", "Great record.")
    assert read_items("amazon2014", literal) == {"A1": expected}
    assert read_items("amazon2014", as_json) == {"A1": expected}
    # Python-only literals (True, None, tuples) are what json.loads cannot read.
    with_python_values = write_lines(tmp_path / "m.json", [repr({**META_2014, "x": True, "brand": None})])
    assert read_items("amazon2014", with_python_values)["A1"].brand == ""


def test_literal_meta_is_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    path = write_lines(tmp_path / "meta.json", [evil])
    with pytest.raises(ValueError, match=r"meta.json:1: malformed literal"):
        read_items("amazon2014", path)
    assert not marker.exists()


def test_missing_meta_titles_fall_back_to_item_id(tmp_path):
    reviews = write_lines(tmp_path / "r.json", [json.dumps(REVIEW_2014), json.dumps({**REVIEW_2014, "asin": "A2"})])
    meta = write_lines(tmp_path / "m.json", [repr(META_2014)])
    _, items, stats = read_dataset("amazon2014", reviews)  # no metadata file at all
    assert items == {"A1": Item("A1", "A1"), "A2": Item("A2", "A2")}
    assert stats["meta"] is None and stats["items_without_meta"] == 2
    _, items, stats = read_dataset("amazon2014", reviews, meta)  # metadata for A1 only
    assert items["A1"].title == "An Album" and items["A2"].title == "A2"
    assert stats["items_without_meta"] == 1


@pytest.mark.parametrize("title, expected", [
    ('<span class="a-size-medium a-color-secondary"', "First sentence."),
    (' Magazines" />', "First sentence."),
    ("", "First sentence."),
    ("Real &amp; Proper", "Real & Proper"),
    ("<b>Bold</b> Name", "Bold Name"),  # complete tags are removed, not the whole title
])
def test_2018_title_fallback(tmp_path, title, expected):
    meta = {"asin": "M1", "title": title, "category": ["Magazine Subscriptions", "Sports"],
            "description": ["First sentence. Second one.", ""], "brand": "Pub", "price": "$4.99"}
    item = read_items("amazon2018", write_lines(tmp_path / "m.json", [json.dumps(meta)]))["M1"]
    assert item.title == expected
    assert (item.price, item.description) == ("$4.99", "First sentence. Second one.")


def test_2018_title_fallback_without_description_uses_category_then_id(tmp_path):
    lines = [json.dumps({"asin": "M1", "title": "<span", "category": ["Magazines", "Sports"], "description": []}),
             json.dumps({"asin": "M2", "title": "<span", "category": [], "description": [],
                         "price": ".a-box{display:block}"})]
    items = read_items("amazon2018", write_lines(tmp_path / "m.json", lines))
    assert items["M1"].title == "Sports"
    assert (items["M2"].title, items["M2"].price) == ("M2", "")


def test_2023_timestamp_ms_and_parent_asin(tmp_path):
    line = json.dumps({"rating": 5, "title": "Great", "text": "ok", "asin": "CHILD", "parent_asin": "PARENT",
                       "user_id": "U", "timestamp": 1600000000999})
    x, = read_interactions("amazon2023", write_lines(tmp_path / "r.jsonl", [line]))
    assert (x.item_id, x.timestamp, x.rating, x.summary) == ("PARENT", 1600000000, 5.0, "Great")


def test_yelp_price_range_and_categories(tmp_path):
    lines = [json.dumps({"business_id": "B1", "name": "Cafe", "city": "Reno", "state": "NV",
                         "categories": "Food, Coffee & Tea", "attributes": {"RestaurantsPriceRange2": "3"}}),
             json.dumps({"business_id": "B2", "name": "Shop", "categories": None, "attributes": None})]
    items = read_items("yelp", write_lines(tmp_path / "b.json", lines))
    assert items["B1"] == Item("B1", "Cafe", ["Food", "Coffee & Tea"], "", "$$$", "Located in Reno, NV.")
    assert items["B2"] == Item("B2", "Shop", [], "", "", "")


# ----------------------------------------------------------------------------------------------------
# Malformed lines
# ----------------------------------------------------------------------------------------------------

def messy_reviews(tmp_path: Path) -> Path:
    good = json.dumps(REVIEW_2014)
    lines = [good,
             "",                                                               # blank: not a record
             '{"reviewerID": "U1", "asin": ',                                  # 3: truncated JSON
             json.dumps({k: v for k, v in REVIEW_2014.items() if k != "overall"}),  # 4: no rating
             json.dumps({**REVIEW_2014, "unixReviewTime": "yesterday"}),       # 5: bad time
             json.dumps({**REVIEW_2014, "overall": 7.0}),                      # 6: outside the 1-5 scale
             json.dumps({**REVIEW_2014, "reviewerID": ""}),                    # 7: empty user
             json.dumps({**REVIEW_2014, "reviewText": "Another review"})]       # 8: good (not a copy of 1)
    path = write_lines(tmp_path / "reviews.json.gz", lines, gz=True)
    with gzip.open(path, "ab") as f:
        f.write(b'{"reviewerID": "\xff\xfe"}\n')                               # 9: not UTF-8
    return path


def test_malformed_line_error_names_file_and_line(tmp_path):
    path = messy_reviews(tmp_path)
    with pytest.raises(ValueError, match=r"^reviews\.json\.gz:3: malformed JSON"):
        read_dataset("amazon2014", path)


def test_malformed_lines_skipped_and_counted(tmp_path):
    path = messy_reviews(tmp_path)
    xs, _, stats = read_dataset("amazon2014", path, on_error="skip", rating_range=(1.0, 5.0))
    assert len(xs) == 2
    assert stats["reviews"]["skipped"] == {"bad timestamp": 1, "invalid UTF-8": 1, "malformed JSON": 1,
                                           "missing field": 2, "rating out of range": 1}
    assert stats["skipped_total"] == 6 and stats["reviews"]["lines"] == 8
    assert stats["reviews"]["first_skipped"][0].startswith("reviews.json.gz:3: malformed JSON")


@pytest.mark.parametrize("bad_line, reason", [
    (json.dumps({k: v for k, v in REVIEW_2014.items() if k != "asin"}), r"missing field \('asin' is absent"),
    (json.dumps({**REVIEW_2014, "overall": 7.0}), "rating out of range"),
    (json.dumps({**REVIEW_2014, "overall": "five"}), "bad rating"),
    ("[1, 2]", "malformed JSON"),
])
def test_each_malformed_kind_raises_with_its_line(tmp_path, bad_line, reason):
    path = write_lines(tmp_path / "r.json", [json.dumps(REVIEW_2014), bad_line])
    with pytest.raises(ValueError, match=rf"^r\.json:2: {reason}"):
        read_dataset("amazon2014", path, rating_range=(1.0, 5.0))


def test_malformed_meta_lines_are_counted_too(tmp_path):
    reviews = write_lines(tmp_path / "r.json", [json.dumps(REVIEW_2014)])
    meta = write_lines(tmp_path / "m.json", ["{'asin': 'A1', 'title': ", repr(META_2014)])
    with pytest.raises(ValueError, match=r"^m\.json:1: malformed literal"):
        read_dataset("amazon2014", reviews, meta)
    _, items, stats = read_dataset("amazon2014", reviews, meta, on_error="skip")
    assert items["A1"].title == "An Album"
    assert stats["meta"]["skipped"] == {"malformed literal": 1} and stats["skipped_total"] == 1


def test_formats_registry_and_bad_arguments(tmp_path):
    assert set(FORMATS) == {"amazon2014", "amazon2018", "amazon2023", "yelp"}
    path = write_lines(tmp_path / "r.json", [json.dumps(REVIEW_2014)])
    with pytest.raises(ValueError, match="unknown format"):
        read_dataset("amazon2099", path)
    with pytest.raises(ValueError, match="on_error"):
        read_dataset("amazon2014", path, on_error="ignore")
