"""Which run and which settings a run directory's checkpoints and artifacts belong to (#25).

``run.json`` in a run directory holds the run's ID (made when the directory is first claimed;
``--overwrite`` empties the directory and so makes a new one) and, for every artifact a stage
wrote, the run that made it, the hash of the settings that stage depends on and the file's
SHA-256. ``checkpoints/<stage>/owner.json`` names the run and settings hash its checkpoints
belong to. A checkpoint of another run or other settings is refused, not resumed; an artifact
changed after its stage wrote it is refused, not reused by a later stage run alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from qbert.config import ConfigError
from qbert.utils.io import atomic_write_json

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
OWNER_FILE = "owner.json"


def settings_hash(settings: dict[str, Any]) -> str:
    """A short, stable hash of the settings a stage's outputs depend on."""
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def read_manifest(out: Path) -> dict[str, Any]:
    path = out / RUN_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path}: unreadable run manifest (remove it, or --overwrite the run)") from None


def run_id(out: Path) -> str:
    """The directory's run ID, made (and written to ``run.json``) when it has none."""
    manifest = read_manifest(out)
    if "run_id" not in manifest:
        manifest = {"run_id": uuid.uuid4().hex[:12], "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "artifacts": {}}
        atomic_write_json(out / RUN_FILE, manifest)
    return manifest["run_id"]


def claim_checkpoints(out: Path, stage: str, rid: str, stage_hash: str) -> None:
    """Before ``stage`` runs: its checkpoints, if any, must belong to this run and these settings."""
    ckpt = out / "checkpoints" / stage
    owner = ckpt / OWNER_FILE
    mine = {"run_id": rid, "settings_hash": stage_hash}
    if owner.is_file():
        try:
            theirs = json.loads(owner.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            theirs = {}
        if {k: theirs.get(k) for k in mine} != mine:
            raise ConfigError(f"{ckpt}: checkpoints of run {theirs.get('run_id')!r} with settings "
                              f"{theirs.get('settings_hash')!r}, not of this run ({rid!r}, {stage_hash!r}): refused "
                              "(remove them, or --overwrite the run)")
    elif ckpt.is_dir() and any(p.name != OWNER_FILE for p in ckpt.iterdir()):
        # made before owners were recorded; the directory's config (checked by the caller) is this one's
        log.warning("%s: checkpoints that name no run (made by an older qbert): adopted by run %s", ckpt, rid)
    ckpt.mkdir(parents=True, exist_ok=True)
    atomic_write_json(owner, mine)


def record_artifacts(out: Path, stage: str, names: list[str], rid: str, stage_hash: str) -> None:
    """After ``stage`` wrote ``names`` (those present): the run, settings hash and SHA-256 of each."""
    manifest = read_manifest(out)
    manifest.setdefault("artifacts", {})
    for name in names:
        if (out / name).is_file():
            manifest["artifacts"][name] = {"stage": stage, "run_id": rid, "settings_hash": stage_hash,
                                           "sha256": file_hash(out / name)}
    atomic_write_json(out / RUN_FILE, manifest)


def check_artifacts(out: Path, stage: str, names: list[str], stage_hash: str) -> None:
    """Before a later stage uses ``stage``'s outputs without re-running it: each was recorded for
    these settings and is unchanged since."""
    recorded = read_manifest(out).get("artifacts", {})
    for name in names:
        if not (out / name).is_file() or name not in recorded:
            continue  # absent files are the caller's error; unrecorded ones predate manifests
        entry = recorded[name]
        if entry.get("settings_hash") != stage_hash:
            raise ConfigError(f"{out / name}: written by the {stage} stage with other settings "
                              f"({entry.get('settings_hash')!r}, here {stage_hash!r}): refused")
        if entry.get("sha256") != file_hash(out / name):
            raise ConfigError(f"{out / name}: changed after run {entry.get('run_id')!r} wrote it "
                              "(its SHA-256 differs from run.json): refused")
