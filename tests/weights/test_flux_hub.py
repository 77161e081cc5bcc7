"""FLUX.1 pipelines named by Hub ids: only the files loading needs are fetched; a hand-built Hub cache loads offline,
`@revision` included; a bfloat16 transformer loads in about the memory of its weights."""

import json
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import style_aligned.weights.hub as hub
from style_aligned.weights.safetensors_io import WeightsError
from tests.helpers.flux import diffusers_transformer
from tests.helpers.flux_pipeline import PIPELINE_TINY, write_flux_pipeline
from tests.helpers.hub_cache import ROOT, add_snapshot, opened_pickles, run_offline

MAIN, OLD = "c" * 40, "d" * 40
FLUX_REPO_FILES = {  # as black-forest-labs/FLUX.1-dev lists them (the shards counted as published)
    "model_index.json",
    "flux1-dev.safetensors",
    "ae.safetensors",
    "README.md",
    "LICENSE.md",
    "dev_grid.jpg",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors.index.json",
    "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    *(f"transformer/diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "transformer/diffusion_pytorch_model.bin",  # decoys: never fetched
    "text_encoder_2/pytorch_model.bin",
}
UNNEEDED = {"flux1-dev.safetensors", "ae.safetensors", "README.md", "LICENSE.md", "dev_grid.jpg"}


def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[list[str]]:
    """Replace huggingface_hub's listing and downloads; return the patterns each download asked for."""
    fetched: list[list[str]] = []
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))

    def snapshot_download(repo_id: str, *, revision: str | None, allow_patterns: list[str]) -> str:
        fetched.append(sorted(allow_patterns))
        return str(tmp_path)

    api = types.SimpleNamespace(list_repo_files=lambda repo_id, revision=None: sorted(FLUX_REPO_FILES))
    fake = types.SimpleNamespace(
        HfApi=lambda: api,
        snapshot_download=snapshot_download,
        hf_hub_download=lambda repo_id, filename, revision=None: str(tmp_path / filename),
    )
    monkeypatch.setattr(hub, "_hf", lambda: fake)
    monkeypatch.setattr(hub, "_offline", lambda: False)
    return fetched


def test_only_the_files_loading_needs_are_fetched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fetched = fake_hub(monkeypatch, tmp_path)
    hub.resolve_model("black-forest-labs/FLUX.1-dev@0ef5fff")
    hub.resolve_model("black-forest-labs/FLUX.1-dev", without=("transformer",))
    expected = sorted(f for f in FLUX_REPO_FILES if f not in UNNEEDED and not f.endswith(".bin"))
    assert fetched[0] == expected
    assert fetched[1] == [f for f in expected if not f.startswith("transformer/")]


def test_an_incomplete_flux_repo_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_hub(monkeypatch, tmp_path)
    FLUX_REPO_FILES.difference_update({"tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json"})
    try:
        FLUX_REPO_FILES.difference_update({f for f in FLUX_REPO_FILES if f.startswith("tokenizer_2/")})
        with pytest.raises(WeightsError, match="lacks tokenizer_2/"):
            hub.resolve_model("black-forest-labs/FLUX.1-dev")
    finally:
        FLUX_REPO_FILES.update(
            f"tokenizer_2/{name}"
            for name in ("special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json")
        )


@pytest.fixture(scope="module")
def flux_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A random tiny FLUX.1 pipeline as a Hub repo: `main` and an older revision whose scheduler differs, with
    `.bin` decoys; and the transformer as a single file."""
    root = tmp_path_factory.mktemp("hub-flux")
    pipeline = root / "pipeline"
    write_flux_pipeline(pipeline)
    files: dict[str, Path | bytes] = {p.relative_to(pipeline).as_posix(): p for p in pipeline.rglob("*") if p.is_file()}
    files["transformer/diffusion_pytorch_model.bin"] = b"\x80\x04}\x94."
    cache = root / "cache"
    add_snapshot(cache, "test-org/flux-tiny", MAIN, files, main=True)
    old = dict(files) | {"scheduler/scheduler_config.json": json.dumps({"use_dynamic_shifting": False}).encode()}
    add_snapshot(cache, "test-org/flux-tiny", OLD, old, main=False)
    single = root / "flux1-tiny.safetensors"
    save_file(diffusers_transformer(PIPELINE_TINY, seed=30).state_dict(), str(single))
    yield {"cache": cache, "pipeline": pipeline, "single": single}
    shutil.rmtree(root)


LOAD = """
import json, torch
from style_aligned.weights.flux_loading import load_flux
result = {}
for name, reference, options in (("main", "test-org/flux-tiny", {}), ("old", "test-org/flux-tiny@OLD", {}),
                                 ("single", "SINGLE", {"components": "test-org/flux-tiny@OLD"})):
    models = load_flux(reference, dtype=torch.float32, **options)
    result[name] = {
        "reference": models.reference,
        "dynamic": models.scheduler.get("use_dynamic_shifting"),
        "transformer": float(sum(p.double().sum() for p in models.transformer.parameters())),
        "t5": models.t5(["a toy car"]).shape[1],
        "clip": type(models.clip_text_encoder).__name__,
    }
print(json.dumps(result))
"""


def test_a_flux_pipeline_loads_offline_from_the_cache_at_a_revision(flux_cache: dict[str, Any], tmp_path: Path) -> None:
    code = LOAD.replace("OLD", OLD).replace("SINGLE", str(flux_cache["single"]))
    result = run_offline(flux_cache["cache"], code, tmp_path / "opened.json")
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["main"]["reference"] == "test-org/flux-tiny" and loaded["main"]["dynamic"] is True
    assert loaded["old"]["reference"] == f"test-org/flux-tiny@{OLD}" and loaded["old"]["dynamic"] is False
    assert loaded["single"]["dynamic"] is False  # the components' revision
    assert loaded["main"]["transformer"] == loaded["old"]["transformer"] == loaded["single"]["transformer"]
    assert {entry["t5"] for entry in loaded.values()} == {512}  # [dev]: 512 text tokens
    assert {entry["clip"] for entry in loaded.values()} == {"CLIPTextEncoderL"}
    assert opened_pickles(tmp_path / "opened.json") == []


MEASURE = """
import json, re, sys, torch
from style_aligned.weights.flux import load_flux_transformer

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024

before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # restart the peak resident size from here
model = load_flux_transformer(sys.argv[1], dtype=torch.bfloat16)
touched = [float(p.sum()) for p in model.parameters()]  # every page of the weights read
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"weights": weights, "peak": status("VmHWM") - before, "dtype": str(next(model.parameters()).dtype)}))
"""


@torch.no_grad()
def test_a_bfloat16_transformer_loads_in_the_memory_of_its_weights(tmp_path: Path) -> None:
    """A 0.23 GB bfloat16 file (full head width, 8 heads, 2 + 2 blocks): the peak resident size while loading and
    reading every weight stays under 1.1 times the weights' bytes (they are memory-mapped, never copied)."""
    from style_aligned.flux import FluxConfig
    from style_aligned.weights.random_weights import build_random

    config = FluxConfig(num_layers=2, num_single_layers=2, num_attention_heads=8, joint_attention_dim=1024)
    from style_aligned.flux import FluxTransformer

    model = build_random(lambda: FluxTransformer(config), seed=0)
    from style_aligned.weights.flux import flux_transformer_key_map

    state = model.state_dict()
    path = tmp_path / "transformer.safetensors"
    save_file(
        {
            source: state[target].to(torch.bfloat16).contiguous()
            for source, target in flux_transformer_key_map(config).items()
        },
        str(path),
    )
    del model, state
    env = {"PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    ratio = measured["peak"] / measured["weights"]
    print(f"bfloat16 transformer of {measured['weights'] / 2**20:.0f} MiB: load peak {ratio:.3f} x its weights")
    assert measured["dtype"] == "torch.bfloat16" and ratio < 1.1
