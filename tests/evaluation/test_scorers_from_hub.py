"""CLIP and DINO scorers named by Hub ids, from a hand-built Hub cache, offline (subprocesses, see hub_cache)."""

import subprocess
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests.helpers.hub_cache import add_snapshot, opened_pickles, run_offline  # noqa: E402
from tests.helpers.random_scorers import save_random_scorers  # noqa: E402

COMMIT = "d" * 40


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scorers-hub")
    folders = save_random_scorers(root / "saved")
    cache = root / "cache"
    for name, folder in zip(("clip", "dino"), folders, strict=True):
        files: dict[str, Path | bytes] = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
        files["pytorch_model.bin"] = b"\x80\x04}\x94."  # a pickle decoy: never fetched, never opened
        add_snapshot(cache, f"test-org/{name}", COMMIT, files, main=True)
    return cache


def test_scorers_load_from_hub_ids_offline(cache: Path, tmp_path: Path) -> None:
    code = """
from style_aligned.evaluation.scoring import ClipScorer, DinoScorer
clip, dino = ClipScorer("test-org/clip"), DinoScorer("test-org/dino")
print(type(clip.model).__name__, type(dino.model).__name__)
"""
    result = run_offline(cache, code, tmp_path / "opened.json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["CLIPModel", "ViTModel"]
    assert opened_pickles(tmp_path / "opened.json") == []


def test_default_scorers_not_cached_offline_are_a_one_line_error(cache: Path, tmp_path: Path) -> None:
    sets = tmp_path / "sets"
    code = f"from style_aligned.cli import main; main(['evaluate', {str(sets)!r}, '--dino', 'test-org/dino'])"
    sets.mkdir()
    (sets / "set.json").write_text('{"command": "generate", "image_prompts": ["a"], "images": ["00-a.png"]}')
    from PIL import Image

    Image.new("RGB", (8, 8)).save(sets / "00-a.png")
    result: subprocess.CompletedProcess[str] = run_offline(cache, code, tmp_path / "opened.json")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert "openai/clip-vit-large-patch14 is not in the Hugging Face cache" in error and "hf download" in error
