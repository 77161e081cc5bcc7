"""A Hugging Face Hub cache built by hand, in huggingface_hub's own layout, and commands run against it offline.

`models--ORG--NAME/blobs/<id>`, `refs/main` (the commit of `main`) and `snapshots/<commit>/<path>` (links to blobs).
huggingface_hub reads `HF_HUB_CACHE` and `HF_HUB_OFFLINE` once, when first imported: commands under test run in a
subprocess with their own environment.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

AUDITED_RUN = """
import json, os, sys
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, os.PathLike)) and str(args[0]).endswith((".bin", ".ckpt")):
        opened.append(str(args[0]))
sys.addaudithook(hook)
try:
    exec(sys.argv[1])
finally:
    with open(os.environ["OPENED_LOG"], "w") as log:
        json.dump(opened, log)
"""
"""Runs Python code and records every pickle file that Python opens (audit events), in $OPENED_LOG."""


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, Path | bytes], main: bool) -> Path:
    """Add a snapshot of `files` (repo path -> a file to hard-link, or content) to a hand-built Hub cache."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        blob_id = hashlib.sha256(f"{commit}/{name}".encode()).hexdigest()
        blob = repo / "blobs" / blob_id
        if not blob.exists():
            if isinstance(source, bytes):
                blob.write_bytes(source)
            else:
                os.link(source, blob)  # no copy of gigabytes
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snapshot


def run_offline(cache: Path, code: str, log: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run Python code in a subprocess with the Hub cache at `cache`, offline, auditing pickle files opened."""
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(cache.parent / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": str(ROOT),
        "OPENED_LOG": str(log),
    }
    env.pop("HF_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-c", AUDITED_RUN, code], env=env, capture_output=True, text=True, timeout=timeout
    )


def opened_pickles(log: Path) -> list[str]:
    return json.loads(log.read_text())
