"""`qbert data prepare|stats` through the real CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qbert.cli import main
from qbert.data import SeqDataset
from qbert.data.synthetic import make_synthetic, parse_synthetic_spec

SPEC = "synthetic:users=60,items=40,clusters=4"


@pytest.mark.parametrize("argv", [["data", "--help"], ["data", "prepare", "--help"], ["data", "stats", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: qbert data" in capsys.readouterr().out


def test_prepare_then_stats(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "prepare", SPEC, "--out", str(out), "--max-len", "20"]) == 0
    printed = json.loads(capsys.readouterr().out)
    ds = SeqDataset.load(out)
    assert ds.fingerprint() == make_synthetic(parse_synthetic_spec(SPEC)).fingerprint() == printed["fingerprint"]
    assert ds.meta["max_len"] == 20
    assert main(["data", "stats", str(out)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {k: stats[k] for k in ("users", "items", "interactions")} == {"users": 60, "items": 40,
                                                                       "interactions": ds.num_interactions}
    assert stats["avg_len"] == pytest.approx(ds.num_interactions / 60, abs=1e-4)
    assert stats["sparsity"] == pytest.approx(1 - ds.num_interactions / (60 * 40), abs=1e-6)
    assert stats["features"] == {"text": 64, "image": 48}
    # overwriting an existing dataset dir is allowed and atomic
    assert main(["data", "prepare", "synthetic:users=30,items=40,clusters=4", "--out", str(out)]) == 0
    assert SeqDataset.load(out).num_users == 30


def test_stats_of_source_dir_records_filters_and_multidomain(tmp_path, capsys):
    src = tmp_path / "rb"
    src.mkdir()
    rows = ["user_id:token\titem_id:token\ttimestamp:float"]
    rows += [f"u{u}\t{i}\t{u * 10 + i}" for u in range(4) for i in range(3 + u)] + ["lonely\t1\t5"]
    (src / "rb.inter").write_text("\n".join(rows) + "\n")
    assert main(["data", "stats", str(src)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["users"] == 4
    assert "warning:" in captured.err and "dropped 1 user(s)" in captured.err
    out = tmp_path / "multi"
    # rb has no feature columns, synthetic has two: assembling them must fail cleanly
    assert main(["data", "prepare", str(src), SPEC, "--domains", "rb,syn", "--out", str(out)]) == 2
    assert "domain 'syn' has feature columns" in capsys.readouterr().err and not out.exists()
    out2 = tmp_path / "multi2"
    assert main(["data", "prepare", SPEC, "synthetic:users=20,items=30,clusters=3,seed=4", "--domains", "a,b",
                 "--out", str(out2)]) == 0
    ds = SeqDataset.load(out2)
    assert ds.num_items == 70 and set(ds.items.column("domain").to_pylist()) == {"a", "b"}
    capsys.readouterr()
    (src / "rb.inter").write_text("\n".join(rows[:-1]) + "\n")
    out3 = tmp_path / "rbds"
    assert main(["data", "prepare", str(src), "--out", str(out3)]) == 0
    assert SeqDataset.load(out3).meta["filters"] == []


def test_bad_input_fails_with_message_and_leaves_nothing(tmp_path, capsys):
    src = tmp_path / "m"
    src.mkdir()
    (src / "X.inter.json").write_text('{"0": [0, 1, 2],\n "1": [0, 1,, 2]}')
    out = tmp_path / "out"
    assert main(["data", "prepare", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "X.inter.json: line 2" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert main(["data", "prepare", SPEC, "--out", str(out), "--with-codes"]) == 2
    assert "with_codes" in capsys.readouterr().err and not out.exists()
    assert main(["data", "stats", str(tmp_path / "missing")]) == 2
    assert "data source not found" in capsys.readouterr().err
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    assert main(["data", "prepare", SPEC, "--out", str(precious)]) == 2
    assert "refusing" in capsys.readouterr().err and (precious / "keep.txt").read_text() == "x"


def test_console_entry_point_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qbert", "data", "stats", SPEC], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["users"] == 60
