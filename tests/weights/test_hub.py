"""Models named by Hugging Face Hub ids, resolved offline from a Hub cache built by hand in huggingface_hub's layout.

Each command runs in a subprocess with its own `HF_HUB_CACHE` and `HF_HUB_OFFLINE=1` (huggingface_hub reads them when
first imported), under an audit hook that records every pickle file Python opens.
"""

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from style_aligned.weights.safetensors_io import write_safetensors
from tests.helpers.hub_cache import add_snapshot, opened_pickles, run_offline

MAIN, OLD = "a" * 40, "b" * 40
INDEX = json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}).encode()
DECOYS = {"unet/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin", "vae/diffusion_pytorch_model.bin"}
PICKLE = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00}\x94."


def last_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache whose files are tiny: enough to resolve ids, revisions and variants (nothing is loaded)."""
    cache = tmp_path_factory.mktemp("hub") / "cache"
    files: dict[str, Path | bytes] = {"model_index.json": INDEX}
    for component, weights in (
        ("unet", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
        ("vae", "diffusion_pytorch_model"),
    ):
        files[f"{component}/config.json"] = b"{}"
        files[f"{component}/{weights}.safetensors"] = b"0"
        files[f"{component}/{weights}.fp16.safetensors"] = b"0"
    add_snapshot(cache, "test-org/sd1", MAIN, {**files, **{decoy: PICKLE for decoy in DECOYS}}, main=True)
    old = {name: content for name, content in files.items() if "fp16" not in name}
    add_snapshot(cache, "test-org/sd1", OLD, old, main=False)
    return cache


def test_ids_revisions_and_variants_resolve_offline(small_cache: Path, tmp_path: Path) -> None:
    code = """
import json
from style_aligned.weights.hub import resolve_model
cases = (("test-org/sd1", False), ("test-org/sd1", True), ("test-org/sd1@OLD", True))
models = [resolve_model(*case) for case in cases]
print(json.dumps([[str(model.path), model.variant, model.reference] for model in models]))
""".replace("OLD", OLD)
    result = run_offline(small_cache, code, tmp_path / "opened.json")
    assert result.returncode == 0, result.stderr
    (plain, half, old) = json.loads(result.stdout.strip().splitlines()[-1])
    snapshots = small_cache / "models--test-org--sd1" / "snapshots"
    assert plain == [str(snapshots / MAIN), None, "test-org/sd1"]
    assert half == [str(snapshots / MAIN), "fp16", "test-org/sd1"]
    assert old == [str(snapshots / OLD), None, f"test-org/sd1@{OLD}"]  # @revision picks that snapshot; no fp16 there
    assert opened_pickles(tmp_path / "opened.json") == []


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("other-org/missing", "other-org/missing is not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
        (None, "stabilityai/stable-diffusion-xl-base-1.0 is not in the Hugging Face cache"),  # the default model
        ("test-org/sd1@" + "c" * 40, "is not in the Hugging Face cache"),
    ],
)
def test_an_id_not_in_the_cache_is_a_one_line_error(
    small_cache: Path, tmp_path: Path, model: str | None, expected: str
) -> None:
    arguments = ["generate", "--prompt", "a toy", "--out", str(tmp_path / "set")]
    arguments += ["--model", model] if model else []
    code = f"from style_aligned.cli import main; main({arguments!r})"
    error = last_error(run_offline(small_cache, code, tmp_path / "opened.json"))
    assert expected in error and "hf download" in error, error
    assert not (tmp_path / "set").exists()


@pytest.fixture(scope="module")
def sd1_cache(sd1_source: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's random SD1 pipeline as a Hub repo (hard links), with an fp16 variant and `.bin` decoys.

    The fp16 U-Net's `conv_in.bias` is zero, so that a model loaded from it is told from one cast from float32.
    """
    root = tmp_path_factory.mktemp("hub-sd1")
    pipeline: Path = sd1_source["pipeline"]
    files: dict[str, Path | bytes] = {
        path.relative_to(pipeline).as_posix(): path for path in pipeline.rglob("*") if path.is_file()
    }
    for name, source in list(files.items()):
        if name.endswith(".safetensors"):
            assert isinstance(source, Path)
            half = root / "fp16" / name.replace(".safetensors", ".fp16.safetensors")
            half.parent.mkdir(parents=True, exist_ok=True)
            with safe_open(str(source), framework="pt") as handle:  # pyright: ignore[reportUnknownMemberType]
                entries = [(key, torch.float16, tuple(handle.get_slice(key).get_shape())) for key in handle.keys()]

                def produce(key: str, handle: Any = handle) -> torch.Tensor:
                    tensor = handle.get_tensor(key).half()
                    return torch.zeros_like(tensor) if key == "conv_in.bias" else tensor

                write_safetensors(half, entries, produce)
            files[half.relative_to(root / "fp16").as_posix()] = half
    files.update({decoy: PICKLE for decoy in DECOYS})
    cache = root / "cache"
    add_snapshot(cache, "test-org/sd1-random", MAIN, files, main=True)
    yield cache
    import shutil

    shutil.rmtree(root)


GENERATE = [
    "generate",
    "--device",
    "cpu",
    "--prompt",
    "a toy train",
    "--prompt",
    "a toy car",
    "--steps",
    "2",
    "--size",
    "64x64",
]


def test_generate_from_a_hub_id_equals_the_plain_folder(
    sd1_source: dict[str, Any], sd1_cache: Path, tmp_path: Path
) -> None:
    sets = {}
    for label, model in (("hub", "test-org/sd1-random"), ("folder", str(sd1_source["pipeline"]))):
        out = tmp_path / label
        code = f"from style_aligned.cli import main; main({[*GENERATE, '--model', model, '--out', str(out)]!r})"
        result = run_offline(sd1_cache, code, tmp_path / f"{label}.json")
        assert result.returncode == 0, result.stderr[-3000:]
        assert opened_pickles(tmp_path / f"{label}.json") == []  # the decoys are never opened
        sets[label] = {path.name: path.read_bytes() for path in out.glob("*.png")}
    assert sets["hub"] and sets["hub"] == sets["folder"]


def test_half_precision_reads_the_fp16_variant(sd1_cache: Path, tmp_path: Path) -> None:
    code = """
import torch
from style_aligned.weights.key_maps import load_key_map
from style_aligned.weights.loading import load_pipeline
sd = load_pipeline("test-org/sd1-random", dtype=torch.float16)
bias = sd.unet.state_dict()[load_key_map("sd1_unet")[0]["conv_in.bias"][0]]
print(sd.unet.dtype, float(bias.abs().max()))
"""
    result = run_offline(sd1_cache, code, tmp_path / "opened.json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["torch.float16", "0.0"]
    assert opened_pickles(tmp_path / "opened.json") == []
