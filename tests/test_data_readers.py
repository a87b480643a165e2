"""Readers: real shared datasets, fixture files written here, and every kind of bad input."""

from __future__ import annotations

import collections
import gzip
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qbert.data import DataError, SeqDataset
from qbert.data.multidomain import assemble_domains
from qbert.data.readers import (
    DataWarning,
    codes_to_multi_hot,
    detect_format,
    read_amazon_raw,
    read_code_file,
    read_mql4grec,
    read_recbole,
    read_source,
)
from qbert.data.synthetic import SyntheticConfig, make_synthetic
from conftest import shared_dataset

# documented filters warn; tests assert on the ones they are about with pytest.warns
pytestmark = pytest.mark.filterwarnings("ignore::qbert.data.readers.common.DataWarning")

# ----------------------------------------------------------------------------- shared data
@pytest.mark.shared
def test_instruments_matches_table1_and_carries_titles_and_codes(instruments_dir):
    ds = read_mql4grec(instruments_dir, with_codes=True)
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (17112, 6250, 136226)
    assert ds.lengths.min() >= 5
    assert ds.meta["text_columns"] == ["title"]
    assert ds.items.column("title").null_count == 0
    item2id = dict(line.split("\t") for line in (instruments_dir / "Instruments.item2id").read_text().splitlines())
    orig = ds.items.column("orig_id").to_pylist()
    assert all(int(item2id[a]) == i for i, a in enumerate(orig[:200]))
    first_user = (instruments_dir / "Instruments.user2id").read_text().splitlines()[0].split("\t")
    assert ds.user_ids[int(first_user[1])] == first_user[0]
    raw = json.loads((instruments_dir / "Instruments.inter.json").read_text())
    assert ds.sequence(123).tolist() == [int(x) for x in raw["123"]]
    codes = read_code_file(instruments_dir / "Instruments.index_lemb.json", 6250)
    assert codes.shape == (6250, 4)
    assert len({tuple(r) for r in codes.tolist()}) == 5988  # README: distinct LLaMA code tuples
    img = read_code_file(instruments_dir / "Instruments.index_vitemb.json", 6250)
    assert len({tuple(r) for r in img.tolist()}) == 6250
    hot = ds.feature("lemb_codes")
    assert hot.shape == (6250, 1024) and (hot.sum(1) == 4).all()
    assert (hot.reshape(6250, 4, 256).argmax(-1) == codes).all()
    assert ds.feature("vitemb_codes").shape == (6250, 1024)


@pytest.mark.shared
@pytest.mark.parametrize("name, row", [("amazon-instruments", ("Instruments", 17112, 6250, 136226)),
                                       ("amazon-arts", ("Arts", 22171, 9416, 174079)),
                                       ("amazon-games", ("Games", 42259, 13839, 373514))])
def test_data_stats_gives_table1_rows_of_the_three_target_domains(name, row, capsys):
    from qbert.cli import main

    path = shared_dataset(name)
    assert main(["data", "stats", str(path)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["name"], stats["users"], stats["items"], stats["interactions"]) == row
    assert stats["min_len"] >= 5


@pytest.mark.shared
def test_ml100k_counts_text_and_time_order_against_brute_force(ml100k_dir):
    ds = read_recbole(ml100k_dir)
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1682, 100000)
    lines = (ml100k_dir / "ml-100k.inter").read_text().splitlines()[1:]
    per_user = collections.defaultdict(list)
    for pos, line in enumerate(lines):
        u, i, _, ts = line.split("\t")
        per_user[u].append((float(ts), pos, i))
    for row, u in enumerate(ds.user_ids[:100]):
        expect = [int(i) - 1 for _, _, i in sorted(per_user[u])]  # dense id = sorted numeric id
        assert ds.sequence(row).tolist() == expect
    assert ds.items.slice(0, 1).to_pylist()[0]["title"] == "Toy Story"
    assert ds.meta["text_columns"][0] == "title" and "class" in ds.items.column_names


# ----------------------------------------------------------------------------- MQL4GRec fixtures
def write_mql(d: Path, inter: dict | str | None = None, n_items: int = 5, item2id: str | None = None,
              user2id: str | None = None, items: dict | None = None, codes: dict | str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    inter = inter if inter is not None else {"0": [0, 1, 2], "1": [3, 4, 0, 1], "2": [2, 3, 4]}
    (d / "X.inter.json").write_text(inter if isinstance(inter, str) else json.dumps(inter, indent=1))
    (d / "X.item2id").write_text(item2id if item2id is not None else "".join(f"A{i}\t{i}\n" for i in range(n_items)))
    if user2id is not None:
        (d / "X.user2id").write_text(user2id)
    if items is not None:
        (d / "X.item.json").write_text(json.dumps(items))
    if codes is not None:
        (d / "X.index_t.json").write_text(codes if isinstance(codes, str) else json.dumps(codes))
    return d


def test_mql4grec_fixture_roundtrip(tmp_path):
    codes = {str(i): [f"<a_{i}>", f"<b_{(i * 2) % 3}>"] for i in range(5)}
    d = write_mql(tmp_path / "m", inter={"1": [3, 4, 0], "0": ["0", "1", "2"]}, user2id="ua\t0\nub\t1\n",
                  items={"0": {"title": "  A &amp; B  "}, "3": {"title": "x", "brand": ["p", "q"]}}, codes=codes)
    ds = read_mql4grec(d, with_codes=["t"], codebook_size=8)
    assert ds.user_ids.tolist() == ["ua", "ub"]  # ordered by integer user id
    assert ds.sequence(0).tolist() == [0, 1, 2] and ds.sequence(1).tolist() == [3, 4, 0]
    assert ds.items.column("title").to_pylist() == ["A & B", None, None, "x", None]
    assert ds.items.column("brand").to_pylist()[3] == "p q"
    hot = ds.feature("t_codes")
    assert hot.shape == (5, 16) and hot[3].nonzero()[0].tolist() == [3, 8 + 0]
    assert codes_to_multi_hot(np.array([[1, 0]])).tolist() == [[0, 1, 1, 0]]
    assert read_source(d).fingerprint() == read_mql4grec(d).fingerprint()


@pytest.mark.parametrize("kwargs, match", [
    ({"inter": '{"0": [0, 1, 2],\n "1": [3, 4 0]}'}, r"X\.inter\.json: line 2, column .*malformed JSON"),
    ({"inter": {"0": [0, 1, 9]}}, r"X\.inter\.json: user 0: unknown item id 9"),
    ({"inter": '{"0": [0, 1, 2], "0": [1, 2, 3]}'}, r"X\.inter\.json: duplicate key '0'"),
    ({"inter": {"0": [0, 1]}}, r"X\.inter\.json: 1 user\(s\) have fewer than 3 interactions .*'0' with 2"),
    ({"inter": {"0": [0, "x", 2]}}, r"X\.inter\.json: user 0: item id 'x' is not an integer"),
    ({"inter": {"0": [0, 1.5, 2]}}, r"X\.inter\.json: user 0: item id 1\.5 is not an integer"),
    ({"inter": {"u": [0, 1, 2]}}, r"X\.inter\.json: user key 'u' is not an integer"),
    ({"inter": {}}, r"X\.inter\.json: empty dataset"),
    ({"item2id": "A0\t0\nA1\t0\n"}, r"X\.item2id: duplicate integer id 0"),
    ({"item2id": "A0\t0\nA0\t1\n"}, r"X\.item2id: duplicate original id 'A0'"),
    ({"item2id": "A0\t0\nA1 1\n"}, r"X\.item2id: line 2: expected"),
    ({"item2id": "A0\t0\nA1\t2\n"}, r"X\.item2id: integer ids must be dense"),
    ({"user2id": "ua\t0\n"}, r"X\.inter\.json: unknown user id 1 \(not in X\.user2id\)"),
    ({"items": {"7": {"title": "t"}}}, r"X\.item\.json: unknown item id '7'"),
    ({"items": {"1": {"item_id": "t"}}}, r"X\.item\.json: item 1: text field name 'item_id' clashes"),
    ({"codes": {str(i): ["<a_1>", "b_2"] for i in range(5)}}, r"X\.index_t\.json: item 0: malformed code token 'b_2'"),
    ({"codes": {str(i): ["<a_1>"] * (1 + (i == 3)) for i in range(5)}}, r"X\.index_t\.json: item .*same number"),
    ({"codes": {str(i): ["<a_1>"] for i in range(4)}}, r"X\.index_t\.json: 1 item\(s\) have no codes \(first: item 4\)"),    ({"codes": {str(i): ["<a_1>", "<a_2>"] for i in range(5)}},
     r"X\.index_t\.json: item 0: code token '<a_2>' at level 2 should carry the letter 'b'"),
    ({"codes": {str(i): [f"<a_{9999 if i == 2 else i}>", "<b_1>"] for i in range(5)}},
     r"X\.index_t\.json: item 2: code token '<a_9999>' is out of range \(codebook_size 256"),
])
def test_mql4grec_bad_input_names_file_and_place(tmp_path, kwargs, match):
    d = write_mql(tmp_path / "m", **kwargs)
    with pytest.raises(DataError, match=match):
        read_mql4grec(d, with_codes="codes" in kwargs)


def test_code_files_warn_on_shared_tuples_and_take_a_larger_codebook(tmp_path):
    codes = {"0": ["<a_1>", "<b_2>"], "1": ["<a_300>", "<b_2>"], "2": ["<a_1>", "<b_2>"], "3": ["<a_0>", "<b_0>"],
             "4": ["<a_0>", "<b_1>"]}
    d = write_mql(tmp_path / "m", codes=codes)
    with pytest.warns(DataWarning, match=r"X\.index_t\.json: 2 items share their whole code tuple .*items 0 and 2"):
        ds = read_mql4grec(d, with_codes=True, codebook_size=512)
    assert ds.feature("t_codes").shape == (5, 1024)
    with pytest.raises(DataError, match="out of range"):
        read_mql4grec(d, with_codes=True)


def test_mql4grec_short_users_can_be_dropped_with_a_warning(tmp_path):
    d = write_mql(tmp_path / "m", inter={"0": [0, 1], "1": [1, 2, 3], "2": [4]})
    with pytest.warns(DataWarning, match=r"dropped 2 user\(s\) with fewer than 3 interactions \(3 interactions\)"):
        ds = read_mql4grec(d, short_users="drop")
    assert ds.user_ids.tolist() == ["1"] and ds.sequence(0).tolist() == [1, 2, 3]
    with pytest.raises(DataError, match="missing"):
        read_mql4grec(d, with_codes=["missing"])
    with pytest.raises(DataError, match="short_users must be one of"):
        read_mql4grec(d, short_users="ignore")


# ----------------------------------------------------------------------------- RecBole fixtures
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def write_recbole(d: Path, rows: str, item: str | None = None, name: str = "r") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.inter").write_text(rows)
    if item is not None:
        (d / f"{name}.item").write_text(item)
    return d


def test_recbole_order_ties_ids_and_filters(tmp_path):
    rows = INTER_HEADER + "".join([
        "u2\t10\t5\t100\n", "u1\t9\t3\t50\n", "u2\t2\t1\t100\n", "u2\t9\t4\t90\n",  # u2 tie at 100: 10 then 2
        "u1\t10\t5\t40\n", "u1\t2\t2\t60\n", "u3\t2\t5\t1\n", "\n",
    ])
    item = "item_id:token\tmovie_title:token_seq\tyear:float\n10\tTen  Things\t1999\n2\tTwo\t2000\n9\tNine\t2001\n77\tUnused\t1\n"
    d = write_recbole(tmp_path / "r", rows, item)
    with pytest.warns(DataWarning) as rec:
        ds = read_recbole(d)
    msgs = [str(w.message) for w in rec]
    assert any("dropped 1 user(s) with fewer than 3" in m for m in msgs)
    assert any("dropped 1 item row(s) without interactions" in m for m in msgs)
    assert ds.items.column("orig_id").to_pylist() == ["2", "9", "10"]  # numeric order, not string order
    assert ds.user_ids.tolist() == ["u1", "u2"]
    assert ds.sequence(0).tolist() == [2, 1, 0]  # u1: 10@40, 9@50, 2@60
    assert ds.sequence(1).tolist() == [1, 2, 0]  # u2: 9@90, 10@100, 2@100 (file order)
    assert ds.items.column("title").to_pylist() == ["Two", "Nine", "Ten Things"]
    assert ds.items.column("year").to_pylist() == [2000.0, 2001.0, 1999.0]
    with pytest.warns(DataWarning, match=r"dropped 1 interaction\(s\) with rating < 2"):
        assert read_recbole(d / "r.inter", min_rating=2).num_interactions == 3  # only u1 keeps 3
    with pytest.raises(DataError, match=r"user 'u3' with 1"):
        read_recbole(d, short_users="error")


@pytest.mark.parametrize("rows, item, match", [
    (INTER_HEADER + "u1\t1\t3\t5\nu1\t2\t3\n", None, r"r\.inter: line 3: expected 4 tab-separated fields"),
    (INTER_HEADER + "u1\t1\t3\tabc\n", None, r"r\.inter: line 2: field 'timestamp': not a number: 'abc'"),
    (INTER_HEADER + "u1\t1\t3\tnan\n", None, r"r\.inter: line 2: field 'timestamp': NaN/inf"),
    ("user_id\titem_id\n", None, r"r\.inter: line 1: bad header column 'user_id'"),
    ("user_id:token\tuser_id:token\n", None, r"r\.inter: line 1: duplicate field 'user_id'"),
    ("uid:token\titem_id:token\n", None, r"r\.inter: no field 'user_id'"),
    (INTER_HEADER, None, r"r\.inter: empty dataset"),
    ("", None, r"r\.inter: line 1: missing header"),
    (INTER_HEADER + "u1\t1\t3\t5\nu1\t2\t3\t6\nu1\t3\t3\t7\n", "item_id:token\tt:token\n1\ta\n2\tb\n",
     r"r\.inter: line 4: unknown item id '3' \(no row in r\.item"),
    (INTER_HEADER + "u1\t1\t3\t5\nu1\t2\t3\t6\nu1\t1\t3\t7\n", "item_id:token\tt:token\n1\ta\n2\tb\n1\tc\n",
     r"r\.item: line 4: duplicate item id '1' \(also line 2\)"),
    (INTER_HEADER + "u1\t\t3\t5\n", None, r"r\.inter: line 2: empty user or item id"),
])
def test_recbole_bad_input_names_file_and_line(tmp_path, rows, item, match):
    d = write_recbole(tmp_path / "r", rows, item)
    with pytest.raises(DataError, match=match):
        read_recbole(d)


def test_missing_files_and_undetectable_sources(tmp_path):
    with pytest.raises(DataError, match="data source not found"):
        read_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no readable dataset found\. Looked for: a canonical .*X\.inter\.json.*X\.inter.*_5\.json"):
        read_source(tmp_path / "empty")
    with pytest.raises(DataError, match="dataset directory not found"):
        read_recbole(tmp_path / "nope")
    with pytest.raises(DataError, match=r"no \*\.inter\.json"):
        read_mql4grec(tmp_path / "empty")
    d = write_mql(tmp_path / "m")
    with pytest.raises(DataError, match=r"reader 'mql4grec' takes no option\(s\) \['min_rating'\]"):
        read_source(d, min_rating=3)


# ----------------------------------------------------------------------------- raw Amazon
def lcrec_reference(reviews: list[dict], meta: dict[str, dict], k: int, need_image: bool):
    """Straight transcription of LC-Rec's amazon18 preprocessing loops (the independent check)."""
    inters = [(r["reviewerID"], r["asin"], r["unixReviewTime"]) for r in reviews]

    def in_order(inters):
        by_user = collections.defaultdict(list)
        for it in inters:
            by_user[it[0]].append(it)
        out = []
        for u in by_user:
            seen = set()
            for it in sorted(by_user[u], key=lambda x: x[2]):
                if it[1] not in seen:
                    seen.add(it[1])
                    out.append(it)
        return out

    inters = in_order(inters)
    ok = {a for a, m in meta.items() if m.get("title", "").strip() and (not need_image or m.get("imageURLHighRes") or m.get("imageURL"))}
    inters = [it for it in inters if it[1] in ok]
    while True:
        uc = collections.Counter(it[0] for it in inters)
        ic = collections.Counter(it[1] for it in inters)
        new = [it for it in inters if uc[it[0]] >= k and ic[it[1]] >= k]
        if len(new) == len(inters):
            break
        inters = new
    inters = in_order(inters)
    users, items, seqs = {}, {}, collections.defaultdict(list)
    for u, i, _ in inters:
        users.setdefault(u, len(users))
        items.setdefault(i, len(items))
        seqs[users[u]].append(items[i])
    return list(users), list(items), [seqs[u] for u in range(len(users))]


def write_amazon(d: Path, reviews: list, meta: list, gz: bool, cat: str = "Toys") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    suffix = ".json.gz" if gz else ".json"
    opener = (lambda p: gzip.open(p, "wt")) if gz else (lambda p: open(p, "w"))
    for name, recs in ((f"{cat}_5{suffix}", reviews), (f"meta_{cat}{suffix}", meta)):
        with opener(d / name) as f:
            for r in recs:
                f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return d


def random_amazon(seed: int):
    rng = random.Random(seed)
    reviews = [{"reviewerID": f"U{rng.randrange(40)}", "asin": f"B{rng.randrange(25)}", "overall": 5.0,
                "unixReviewTime": rng.randrange(30)} for _ in range(700)]
    meta = []
    for i in range(25):
        m = {"asin": f"B{i}", "title": "" if i % 11 == 3 else f"Thing {i} &amp; co", "brand": "by\nAcme",
             "category": ["Toys", f"c{i % 3}", "<span>x</span>"], "description": ["nice", "toy"]}
        if i % 7 != 2:
            m["imageURLHighRes"] = [f"http://img/{i}.jpg"]
        if i != 24:  # one item without any meta record
            meta.append(m)
    return reviews, meta


@pytest.mark.parametrize("gz, k, need_image", [(True, 5, False), (False, 8, True), (False, 3, False)])
def test_amazon_raw_matches_lcrec_reference(tmp_path, gz, k, need_image):
    reviews, meta = random_amazon(k)
    d = write_amazon(tmp_path / "a", reviews, meta, gz)
    with pytest.warns(DataWarning):
        ds = read_amazon_raw(d, k_core_threshold=k, require_images=need_image)
    users, items, seqs = lcrec_reference(reviews, {m["asin"]: m for m in meta}, k, need_image)
    assert ds.user_ids.tolist() == users
    assert ds.items.column("orig_id").to_pylist() == items
    assert [ds.sequence(u).tolist() for u in range(ds.num_users)] == seqs
    assert ds.lengths.min() >= k and np.bincount(ds.seq_items).min() >= k
    row = ds.items.slice(0, 1).to_pylist()[0]
    n = int(row["orig_id"][1:])
    assert row["title"] == f"Thing {n} & co" and row["brand"] == "Acme" and row["categories"] == f"Toys, c{n % 3}"
    assert row["description"] == "nice toy"
    if need_image:
        assert ds.items.column("image_url").null_count == 0
    assert detect_format(d) == "amazon_raw"


def test_amazon_raw_dedupe_option_and_bad_lines(tmp_path):
    reviews = [{"reviewerID": "U1", "asin": f"B{i % 3}", "unixReviewTime": i} for i in range(6)]
    meta = [{"asin": f"B{i}", "title": f"t{i}"} for i in range(3)]
    d = write_amazon(tmp_path / "a", reviews, meta, gz=False)
    with pytest.warns(DataWarning, match=r"dropped 3 repeated"):
        assert read_amazon_raw(d, k_core_threshold=1).sequence(0).tolist() == [0, 1, 2]
    assert read_amazon_raw(d, k_core_threshold=1, dedupe=False).sequence(0).tolist() == [0, 1, 2, 0, 1, 2]
    bad = write_amazon(tmp_path / "b", [json.dumps(reviews[0]), '{"reviewerID": "U1", "asin": '], meta, gz=True)
    with pytest.raises(DataError, match=r"Toys_5\.json\.gz: line 2: malformed JSON"):
        read_amazon_raw(bad)
    bad = write_amazon(tmp_path / "c", [{"reviewerID": "U1", "asin": "B1"}], meta, gz=False)
    with pytest.raises(DataError, match=r"Toys_5\.json: line 1: missing field 'unixReviewTime'"):
        read_amazon_raw(bad)
    bad = write_amazon(tmp_path / "e", reviews, meta + [meta[0]], gz=False)
    with pytest.raises(DataError, match=r"meta_Toys\.json: line 4: duplicate asin 'B0'"):
        read_amazon_raw(bad, k_core_threshold=1, dedupe=False)
    with pytest.raises(DataError, match=r"empty dataset after preprocessing"):
        read_amazon_raw(d, k_core_threshold=5)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "Toys_5.json").write_text(json.dumps(reviews[0]) + "\n")
    with pytest.raises(DataError, match=r"Amazon file not found: .*meta_Toys\.json"):
        read_amazon_raw(tmp_path / "f")


# ----------------------------------------------------------------------------- canonical + features
def test_canonical_dir_detection_and_bad_features(tmp_path):
    ds = make_synthetic(SyntheticConfig(num_users=20, num_items=20, num_clusters=4))
    ds.save(tmp_path / "c")
    assert detect_format(tmp_path / "c") == "canonical"
    assert read_source(tmp_path / "c").fingerprint() == ds.fingerprint()
    assert detect_format("synthetic:users=5") == "synthetic"
    assert read_source("synthetic", num_users=30).num_users == 30
    bad = ds.feature("text").copy()
    bad[7, 3] = np.nan
    with pytest.raises(DataError, match=r"feat_text.*NaN/inf.*item_id 7"):
        ds.with_feature("text", bad)
    items = ds.items.set_column(ds.items.column_names.index("feat_image"), "feat_image",
                                pa.array([[1.0, 2.0]] * 19 + [[1.0]], pa.list_(pa.float32())))
    pq.write_table(items, tmp_path / "c" / "items.parquet")
    with pytest.raises(DataError, match=r"feat_image.*fixed_size_list"):
        read_source(tmp_path / "c")
    with pytest.raises(DataError, match=r"shape \[20, d\]"):
        ds.with_feature("x", np.zeros((19, 3)))


# ----------------------------------------------------------------------------- multi-domain
def test_assemble_domains_offsets_columns_and_errors():
    a = make_synthetic(SyntheticConfig(num_users=30, num_items=20, num_clusters=4))
    b = make_synthetic(SyntheticConfig(num_users=25, num_items=30, num_clusters=5, seed=7))
    b2 = SeqDataset(b.name, b.items.drop_columns(["cluster"]), b.seq_offsets, b.seq_items, b.user_ids, b.meta)
    m = assemble_domains([a, b2], ["A", "B"])
    assert (m.num_users, m.num_items, m.num_interactions) == (55, 50, a.num_interactions + b.num_interactions)
    assert m.meta["domains"]["B"]["item_start"] == 20 and m.meta["domains"]["B"]["item_end"] == 50
    assert m.items.column("domain").to_pylist() == ["A"] * 20 + ["B"] * 30
    assert m.items.column("cluster").null_count == 30
    assert m.sequence(30).tolist() == (b.sequence(0) + 20).tolist() and m.user_ids[30] == "B:" + b.user_ids[0]
    np.testing.assert_array_equal(m.feature("text")[20:], b.feature("text"))
    assert len(set(m.user_ids)) == 55
    with pytest.raises(DataError, match=r"feature 'feat_text' has dimension 8 in domain 'B' but 64"):
        assemble_domains([a, b.with_feature("text", np.zeros((30, 8)))], ["A", "B"])
    no_img = SeqDataset(b.name, b.items.drop_columns(["feat_image"]), b.seq_offsets, b.seq_items, b.user_ids, b.meta)
    with pytest.raises(DataError, match=r"domain 'B' has feature columns"):
        assemble_domains([a, no_img], ["A", "B"])
    with pytest.raises(DataError, match="unique"):
        assemble_domains([a, b], ["A", "A"])
    with pytest.raises(DataError, match="no datasets"):
        assemble_domains([], [])


def test_a_prepared_dataset_with_nan_features_is_an_error_naming_its_directory(tmp_path, capsys):
    from qbert.cli import main
    from qbert.data.dataset import numpy_to_fixed_list

    ds = make_synthetic(SyntheticConfig(num_users=50, num_items=30, num_clusters=3))
    ds.save(tmp_path / "d")
    items = pq.read_table(tmp_path / "d" / "items.parquet")
    text = ds.feature("text").copy()
    text[3, 2] = np.nan
    items = items.set_column(items.column_names.index("feat_text"), "feat_text", numpy_to_fixed_list(text))
    pq.write_table(items, tmp_path / "d" / "items.parquet")
    assert main(["data", "stats", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'd'}: " in err and "NaN/inf" in err and "item_id 3" in err


def test_recbole_duplicate_rows_are_dropped_with_a_warning(tmp_path):
    d = tmp_path / "rb"
    d.mkdir()
    rows = "".join(f"u{u}\ti{i}\t{u * 10 + i}\n" for u in range(3) for i in range(4))
    (d / "rb.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + rows + "u1\ti2\t12\nu1\ti2\t13\n")
    with pytest.warns(DataWarning, match=r"dropped 1 duplicate interaction row\(s\) .*first at line 14"):
        ds = read_recbole(d)
    assert ds.num_interactions == 13  # the same line twice is one interaction; another timestamp is a repeat


def test_recbole_dense_ids_never_merge_distinct_raw_ids():
    from qbert.data.readers.recbole import _dense_ids

    orig, idx = _dense_ids(np.array(["10", "9", "2", "9"]))
    assert orig.tolist() == ["2", "9", "10"] and idx.tolist() == [2, 1, 0, 1]
    orig, idx = _dense_ids(np.array(["7", "007"]))  # same integer value: fall back to string order
    assert orig.tolist() == ["007", "7"] and idx.tolist() == [1, 0]
