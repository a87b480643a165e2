"""A run directory has one owner and one configuration (#25): a second run on a directory in use
fails at once; a run of another config onto it is refused unless --overwrite."""

from __future__ import annotations

import pytest

from qbert.cli import main as cli
from qbert.config import ConfigError
from qbert.pipeline import config_differences, quickstart_config, run_pipeline
from qbert.utils.rundir import LOCK_NAME, claim_run_dir, run_lock

pytestmark = pytest.mark.timeout(120)


def test_a_directory_in_use_is_refused_at_once_naming_its_owner(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom qbert.utils.rundir import run_lock\n"
                               f"with run_lock({str(tmp_path)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"in use by PID {holder.pid} on host"):
            run_pipeline(quickstart_config(), tmp_path)
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path):  # released when the holder is gone; re-entrant within one process
        with run_lock(tmp_path):
            pass


def test_another_config_onto_a_run_is_refused_unless_overwrite(tmp_path, capsys):
    cfg = quickstart_config()
    cfg.to_yaml(tmp_path / "config.yaml")
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    assert config_differences(tmp_path / "config.yaml", cfg) == []
    assert config_differences(tmp_path / "config.yaml", cfg.override({"progress": True, "device": "cpu"})) == []
    other = cfg.override({"seed": 7, "finetune.lr": 0.5})
    diff = config_differences(tmp_path / "config.yaml", other)
    assert diff == ["finetune.lr", "fusion.seed", "quantize.seed", "seed"]
    with pytest.raises(ConfigError, match="other settings .*finetune.lr.*--overwrite"):
        run_pipeline(other, tmp_path)
    assert (tmp_path / "metrics.json").is_file()  # nothing touched
    rc = cli(["pipeline", "--out", str(tmp_path), "--set", "seed=7"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "--overwrite" in err
    with run_lock(tmp_path):
        claim_run_dir(tmp_path, diff, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]
