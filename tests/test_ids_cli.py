"""`qbert ids show`: items under a prefix, a whole semantic ID or beside an item, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qbert.cli import main
from qbert.explore import parse_prefix
from qbert.quantize.semantic_ids import write_semantic_ids

CODES = np.array([[1, 2, 3], [1, 2, 4], [1, 5, 0], [7, 2, 3], [1, 2, 9]])
ORIG = ["B01", "B02", "B03", "B04", "B05"]
TITLES = ["red guitar", "blue guitar", "drum", "violin", "green guitar"]


@pytest.fixture
def run(tmp_path):
    write_semantic_ids(tmp_path / "semantic_ids.parquet", CODES, np.arange(5), [8, 8, 10],
                       columns={"orig_id": ORIG, "title": TITLES})
    return tmp_path


def _show(run, capsys, *args):
    assert main(["ids", "show", "--run", str(run), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_prefix_sid_and_item(run, capsys):
    out = _show(run, capsys, "--prefix", "<a_1><b_2>")
    assert out["prefix"] == "<a_1><b_2>" and out["items"] == 3
    assert [it["title"] for it in out["shown"]] == ["red guitar", "blue guitar", "green guitar"]
    assert out["next_level"] == [["<c_3>", 1], ["<c_4>", 1], ["<c_9>", 1]]
    assert _show(run, capsys, "--prefix", "1")["next_level"] == [["<b_2>", 3], ["<b_5>", 1]]
    out = _show(run, capsys, "--sid", "a_7,b_2,c_3")
    assert [it["orig_id"] for it in out["shown"]] == ["B04"]
    out = _show(run, capsys, "--item", "B02", "--depth", "2")
    assert out["item"]["sid"] == "<a_1><b_2><c_4>" and out["items"] == 3
    assert _show(run, capsys, "--item", "2")["item"]["orig_id"] == "B03"  # integer item ID
    assert len(_show(run, capsys, "--prefix", "a_1", "--limit", "2")["shown"]) == 2
    assert main(["ids", "show", "--run", str(run), "--prefix", "a_1"]) == 0
    text = capsys.readouterr().out
    assert "prefix <a_1>: 4 item(s) of 5" in text and "B05  <a_1><b_2><c_9>  green guitar" in text


@pytest.mark.parametrize("args, message", [
    (["--prefix", "b_1"], "at level 1, whose letter is 'a'"),
    (["--prefix", "a_1,b_2,c_3,d_4"], "expected 1 to 3 code tokens"),
    (["--prefix", "a_x"], "malformed token"),
    (["--sid", "<a_1><b_2>"], "a whole semantic ID has 3 tokens"),
    (["--item", "NOPE"], "item 'NOPE' is neither"),
    (["--item", "B01", "--depth", "4"], "--depth must be between 1 and 3"),
])
def test_bad_input_is_named(run, capsys, args, message):
    assert main(["ids", "show", "--run", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_missing_table_and_prefix_forms(tmp_path, capsys):
    assert main(["ids", "show", "--run", str(tmp_path), "--prefix", "1"]) == 2
    assert "semantic_ids.parquet" in capsys.readouterr().err
    assert parse_prefix("<a_12><b_3>", 4) == parse_prefix("a_12, b_3", 4) == parse_prefix("12,3", 4) == [12, 3]
