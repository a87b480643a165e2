"""`qbert configs list|show|copy`, bundled names in every --config, and the configs in the wheel."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qbert.bundled import bundled_names, resolve_config
from qbert.cli import main
from qbert.cli.pipeline_cmd import load_config
from qbert.pipeline import quickstart_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.relative_to(REPO / "configs").with_suffix("").as_posix() for p in (REPO / "configs").rglob("*.yaml"))


def test_list_names_every_shipped_config_with_its_description(capsys):
    assert sorted(bundled_names()) == SHIPPED and "instruments-tuned" in SHIPPED and "sweeps/ablations" in SHIPPED
    assert main(["configs", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in lines) == SHIPPED
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # every config says what it is
    assert any(line.startswith("sweeps/ablations") and "Tables 3-5" in line for line in lines)


def test_show_and_copy(tmp_path, capsys):
    text = (REPO / "configs" / "instruments.yaml").read_text()
    assert main(["configs", "show", "instruments"]) == 0
    assert capsys.readouterr().out == text
    assert main(["configs", "copy", "configs/instruments.yaml", str(tmp_path)]) == 0
    assert (tmp_path / "instruments.yaml").read_text() == text
    (tmp_path / "mine.yaml").write_text("seed: 1\n")
    assert main(["configs", "copy", "synthetic", str(tmp_path / "mine.yaml")]) == 2
    assert "exists (use --force" in capsys.readouterr().err
    assert (tmp_path / "mine.yaml").read_text() == "seed: 1\n"
    assert main(["configs", "copy", "synthetic", str(tmp_path / "mine.yaml"), "--force"]) == 0
    assert (tmp_path / "mine.yaml").read_text() == (REPO / "configs" / "synthetic.yaml").read_text()
    assert main(["configs", "copy", "synthetic", str(tmp_path / "no" / "dir.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert main(["configs", "copy", "sweeps/ablations", str(tmp_path / "my-sweep.yaml")]) == 0
    from qbert.platform.tune import SweepConfig

    base = SweepConfig.load(tmp_path / "my-sweep.yaml").base_config  # ../synthetic.yaml: found by name
    assert Path(base).read_text() == (REPO / "configs" / "synthetic.yaml").read_text()
    capsys.readouterr()
    assert main(["configs", "show", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no bundled config named 'nope'") and "instruments-tuned" in err


def test_config_flags_take_bundled_names_and_name_a_missing_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the name must come from the package
    assert load_config("synthetic", []) == quickstart_config()
    assert resolve_config("sweeps/ablations").read_text() == (REPO / "configs" / "sweeps" / "ablations.yaml").read_text()
    (tmp_path / "synthetic").mkdir()
    with pytest.raises(Exception, match="is not a file"):
        resolve_config("synthetic")
    assert main(["pipeline", "--config", "nope.yaml", "--out", str(tmp_path / "run")]) == 2
    assert "config file 'nope.yaml' not found" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_closed_pipe_is_not_an_error(monkeypatch):
    """`qbert configs list | head -n 1`: the reader left; no traceback, exit 0."""
    r, w = os.pipe()
    os.close(r)
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.FileIO(w, "w"), write_through=True))
    assert main(["configs", "list"]) == 0


@pytest.mark.timeout(300)
def test_the_wheel_ships_the_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(tmp_path)], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = tmp_path.glob("qbert-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"qbert/configs/{n}.yaml" for n in SHIPPED} <= names
