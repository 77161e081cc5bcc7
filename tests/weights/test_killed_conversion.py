"""A conversion killed with SIGKILL leaves a temporary file; the next conversion to the same place removes it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from style_aligned.cli import main as cli
from tests.helpers.hub_cache import ROOT


def test_next_conversion_removes_what_a_killed_one_left(sd1_source: dict[str, Any], tmp_path: Path) -> None:
    destination = tmp_path / "converted"
    code = f"from style_aligned.cli import main; main(['convert', '--from', {str(sd1_source['controlnet'])!r},"
    code += f" '--to', {str(destination)!r}])"
    process = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while not list(destination.glob(".*.partial")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(destination.glob(".*.partial")), "the conversion ended before it could be killed"
    assert not (destination / "controlnet.safetensors").exists()  # never renamed into place

    cli(["convert", "--from", str(sd1_source["controlnet"]), "--to", str(destination)])
    assert [path.name for path in destination.iterdir()] == ["controlnet.safetensors"]
