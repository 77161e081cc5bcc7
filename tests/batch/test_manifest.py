"""The batch manifest and the checks made before any work: no model is loaded here."""

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

import style_aligned.weights.loading as loading
from style_aligned.batch import ManifestError, read_manifest
from style_aligned.batch.runner import BATCH_KEY
from style_aligned.cli import main as cli
from style_aligned.pipeline.plan import SetPlan
from style_aligned.pipeline.transfer import TransferSpec


def write_manifest(folder: Path, lines: list[Any]) -> Path:
    path = folder / "sets.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = {"id": "toys", "kind": "generate", "prompts": ["a toy train", "a toy car"], "width": 64, "steps": 2}


def test_lines_read_as_the_commands_read_their_options(tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path,
        [
            {**GOOD, "style": {"shared_score_shift": 0.69}, "loras": [{"path": "style.safetensors", "scale": 0.5}]},
            "",
            {"id": "knight", "kind": "transfer", "prompts": ["a"] * 5, "image": "ref.png", "caption": "c", "split": 2},
            {"id": "saved", "kind": "transfer", "prompts": ["a"], "trajectory": "/t.safetensors", "model": "other"},
        ],
    )
    toys, knight, saved = read_manifest(manifest, model=Path("/models/sd1"))
    assert (toys.line, knight.line, saved.line) == (1, 3, 4)
    assert toys.model == Path("/models/sd1") and saved.model == tmp_path / "other"
    assert toys.spec.style.shared_score_shift == 0.69 and toys.spec.style.share_group_norm is None
    assert toys.spec.loras[0].path == tmp_path / "style.safetensors" and toys.shares() == [(0, 1)]
    assert isinstance(knight.spec, TransferSpec) and knight.image == tmp_path / "ref.png"
    assert knight.spec.style.shared_score_shift == math.log(2)  # the transfer example's defaults, as `transfer`
    assert knight.spec.chunk_size == 3 and knight.shares() == [(0, 1, 2, 3), (4, 5)]  # whole chunks of 3 targets
    assert saved.steps_from_trajectory() and saved.identity()["steps"] is None
    again = read_manifest(write_manifest(tmp_path, [{**GOOD, "id": "other", "seed": 0}]), model=Path("/models/sd1"))
    assert (
        again[0].identity() == read_manifest(write_manifest(tmp_path, [GOOD]), model=Path("/models/sd1"))[0].identity()
    )


@pytest.mark.parametrize(("targets", "split", "chunk_size"), [(5, 2, None), (7, 3, None), (7, 2, 2), (4, 3, None)])
def test_shares_are_whole_chunks_covering_every_target_once(
    tmp_path: Path, targets: int, split: int, chunk_size: int | None
) -> None:
    line = {**GOOD, "prompts": ["p"] * (targets + 1), "split": split, "chunk_size": chunk_size}
    (entry,) = read_manifest(write_manifest(tmp_path, [line]), model=tmp_path)
    shares = entry.shares()
    assert 1 < len(shares) <= split and shares[0][0] == 0
    assert sorted(image for share in shares for image in share) == list(range(targets + 1))
    for share in shares:  # a share is whole chunks: rendering it runs the same batches as the whole set
        assert SetPlan(targets + 1, 1, entry.spec.chunk_size).chunks_of([i for i in share if i])
    with pytest.raises(ValueError, match="not whole chunks"):
        SetPlan(5, 1, 2).chunks_of([1])
    assert SetPlan(5, 1, 2).chunks_of(None) == SetPlan(5, 1, 2).chunks


def test_bad_lines_fail_before_any_model_is_loaded_naming_each_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_pipeline", no_loading)
    manifest = write_manifest(
        tmp_path,
        [
            GOOD,
            {**GOOD, "id": "b", "prompt": "a toy"},
            {**GOOD, "id": "c", "steps": "two"},
            {**GOOD},
            {**GOOD, "id": "e", "style": {"adain_everything": True}},
            {**GOOD, "id": "f", "kind": "transfer", "image": "ref.png"},
            '{"id": "g", "kind": "generate"',
        ],
    )
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli(["batch", str(manifest), "--out", str(out), "--model", str(tmp_path), "--workers", "2"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"{manifest} line 2: unknown field 'prompt' for a generate set" in error
    assert 'line 3: steps must be a whole number, got "two"' in error
    assert "line 4: duplicate id 'toys' (first on line 1)" in error
    assert "line 5: unknown StyleAligned option 'adain_everything'" in error
    assert 'line 6: a transfer needs its reference as "image" and "caption"' in error
    assert "line 7: not JSON" in error and "line 1:" not in error
    assert not out.exists()
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    with pytest.raises(ManifestError, match="no model"):
        read_manifest(write_manifest(tmp_path, [GOOD]))


def test_a_folder_holding_another_set_is_an_error_not_an_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(loading, "load_pipeline", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    manifest = write_manifest(tmp_path, [GOOD])
    (entry,) = read_manifest(manifest, model=tmp_path)
    folder = tmp_path / "out" / "toys"
    folder.mkdir(parents=True)
    other = {**entry.identity(), "seed": 5}
    sidecar = json.dumps({"images": [], "request": other, BATCH_KEY: {"id": "toys", "split": 1}})
    (folder / "set.json").write_text(sidecar)
    for made_by, expected in [(sidecar, "made from another spec (seed differ)"), ("{}", "that records no request")]:
        (folder / "set.json").write_text(made_by)
        with pytest.raises(SystemExit) as exit_info:
            cli(["batch", str(manifest), "--out", str(tmp_path / "out"), "--model", str(tmp_path)])
        assert exit_info.value.code == 2
        assert f"{folder} (line 1) holds a set {expected}" in capsys.readouterr().err
        assert (folder / "set.json").read_text() == made_by


def test_workers_without_ray_name_the_extra_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(loading, "load_pipeline", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli(
            [
                "batch",
                str(write_manifest(tmp_path, [GOOD])),
                "--out",
                str(out),
                "--model",
                str(tmp_path),
                "--workers",
                "2",
            ]
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pip install 'style-aligned[batch]'" in error, error
    assert not out.exists()
