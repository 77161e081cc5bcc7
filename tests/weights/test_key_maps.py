"""The shipped key maps equal a fresh trace of the diffusers/transformers and Refiners models."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "tools" / "make_key_maps.py"


def test_shipped_key_maps_match_a_fresh_trace() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
