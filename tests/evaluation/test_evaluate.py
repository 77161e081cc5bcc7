"""The evaluate command against a plain computation with the transformers models.

The test builds a random-weight DINO with the shape of ViT-B/8 and a small random CLIP, saves them with their
processors like downloaded checkpoints, and scores sets written with the sidecar layout of `generate` and `transfer`.
"""

import argparse
import csv
import itertools
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from transformers import ViTConfig, ViTImageProcessor, ViTModel  # noqa: E402

from style_aligned.cli.evaluate import add_evaluate_command  # noqa: E402
from style_aligned.evaluation.scoring import (  # noqa: E402
    ClipScorer,
    DinoScorer,
    evaluate_sets,
    mean_pairwise_cosine,
)
from style_aligned.pipeline.set_files import SIDECAR, image_name, write_json  # noqa: E402
from tests.helpers.random_scorers import random_clip  # noqa: E402

SETS = {  # folder: (command, prompts, number of images)
    "watercolor": ("generate", ["a toy train. watercolor", "a toy car. watercolor", "a red bicycle. watercolor"], 3),
    "photo": ("transfer", ["a house. old photo", "a mountain lake. old photo, sepia"], 2),
    "single": ("generate", ["a cat. pencil sketch"], 1),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Random CLIP and DINO models with their processors, in memory and saved to folders."""
    root = tmp_path_factory.mktemp("evaluation-models")
    clip, clip_processor = random_clip()
    dino_config = ViTConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=8
    )
    dino = ViTModel(dino_config, add_pooling_layer=False).eval()
    dino_processor = ViTImageProcessor(size={"height": 224, "width": 224})
    for model, processor, name in ((clip, clip_processor, "clip"), (dino, dino_processor, "dino")):
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    yield {"clip": clip, "clip_processor": clip_processor, "dino": dino, "dino_processor": dino_processor, "root": root}
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Set folders (and a folder without a sidecar, ignored) with their images in memory."""
    root = tmp_path_factory.mktemp("evaluation-sets") / "styles"
    generator = np.random.default_rng(0)
    images: dict[str, list[Image.Image]] = {}
    for index, (name, (command, prompts, count)) in enumerate(SETS.items()):
        directory = root / name
        directory.mkdir(parents=True)
        base = generator.integers(0, 256, size=3)
        images[name] = []
        for image_index in range(count):
            noise = generator.normal(0, 40 * (image_index + 1), size=(40 + 8 * index, 48, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            if image_index == 1 and name == "photo":
                image = image.convert("L")  # read back as RGB
            image.save(directory / image_name(image_index, prompts[image_index]))
            images[name].append(image.convert("RGB"))
        names = [image_name(i, prompt) for i, prompt in enumerate(prompts)]
        write_json(directory / SIDECAR, {"command": command, "seed": 0, "image_prompts": prompts, "images": names})
    (root / "notes").mkdir()
    Image.new("RGB", (8, 8)).save(root / "notes" / "not-a-set.png")
    return {"root": root, "images": images}


@pytest.fixture(scope="module")
def expected(models: dict[str, Any], sets: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """The metrics computed plainly with the in-memory models: whole prompts, object prompts, DINO pairs."""
    result: dict[tuple[str, str], Any] = {}
    with torch.no_grad():
        for name, (_, prompts, _) in SETS.items():
            images = sets["images"][name]
            for key, texts in (("full", prompts), ("object", [prompt.split(".")[0] for prompt in prompts])):
                inputs = models["clip_processor"](text=texts, images=images, return_tensors="pt", padding=True)
                output = models["clip"](**inputs)
                result[name, key] = [float(output.image_embeds[i] @ output.text_embeds[i]) for i in range(len(images))]
            if len(images) > 1:
                pixels = models["dino_processor"](images=images, return_tensors="pt")["pixel_values"]
                cls = models["dino"](pixel_values=pixels).last_hidden_state[:, 0, :]
                pairs = itertools.combinations(range(len(images)), 2)
                similarities = [float(torch.cosine_similarity(cls[i], cls[j], dim=0)) for i, j in pairs]
                result[name, "dino"] = sum(similarities) / len(similarities)
    return result


def run(arguments: list[str]) -> None:
    parser = argparse.ArgumentParser()
    add_evaluate_command(parser)
    args = parser.parse_args(arguments)
    args.command(args)


def model_options(models: dict[str, Any]) -> list[str]:
    return ["--clip", str(models["root"] / "clip"), "--dino", str(models["root"] / "dino"), "--device", "cpu"]


def test_command_scores_every_set(
    models: dict[str, Any], sets: dict[str, Any], expected: dict[tuple[str, str], Any], tmp_path: Path, capsys: Any
) -> None:
    prefix = tmp_path / "results" / "scores"
    run([str(sets["root"]), *model_options(models), "--out", str(prefix), "--batch-size", "2"])
    names = sorted(SETS)
    text = {name: sum(expected[name, "full"]) / len(SETS[name][1]) for name in names}
    dino = {name: expected.get((name, "dino"), math.nan) for name in names}
    mean_text = sum(text.values()) / len(names)
    mean_dino = (dino["photo"] + dino["watercolor"]) / 2
    assert math.isnan(dino["single"])

    with open(f"{prefix}.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["set"] for row in rows] == [*names, "mean"]
    for row, name in zip(rows, names, strict=False):
        assert (row["command"], int(row["images"])) == (SETS[name][0], SETS[name][2])
        assert Path(row["path"]) == sets["root"] / name
        assert float(row["text_alignment"]) == pytest.approx(text[name], abs=1e-5)
        assert float(row["dino_consistency"]) == pytest.approx(dino[name], abs=1e-5, nan_ok=True)
    assert int(rows[-1]["images"]) == 6
    assert float(rows[-1]["text_alignment"]) == pytest.approx(mean_text, abs=1e-5)
    assert float(rows[-1]["dino_consistency"]) == pytest.approx(mean_dino, abs=1e-5)

    markdown = Path(f"{prefix}.md").read_text()
    assert capsys.readouterr().out == markdown
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()]
    assert table[0] == ["set", "images", "text alignment (CLIP)", "set consistency (DINO)"]
    expected_rows = [[name, str(SETS[name][2]), f"{text[name]:.4f}", f"{dino[name]:.4f}"] for name in names]
    expected_rows[names.index("single")][3] = "n/a"
    assert table[2:] == [*expected_rows, ["**mean**", "6", f"{mean_text:.4f}", f"{mean_dino:.4f}"]]


def test_object_text_without_reference(models: dict[str, Any], sets: dict[str, Any], expected: Any) -> None:
    clip, dino = ClipScorer(models["root"] / "clip"), DinoScorer(models["root"] / "dino")
    directories = [sets["root"] / "photo", sets["root"] / "single"]
    evaluation = evaluate_sets(directories, clip, dino, text_until=".", include_reference=False)
    assert [row.name for row in evaluation.sets] == ["photo", "single"]
    photo, single = evaluation.sets
    assert (photo.images, single.images) == (1, 0)
    assert photo.image_text_alignment == pytest.approx(expected["photo", "object"][1:], abs=1e-5)
    assert math.isnan(photo.consistency)  # one image: no pair
    assert single.image_text_alignment == ()  # the reference alone, left out
    assert math.isnan(single.text_alignment) and math.isnan(single.consistency)
    assert evaluation.text_alignment == photo.text_alignment  # NaN values are left out of the means
    assert math.isnan(evaluation.consistency)
    assert expected["photo", "object"][1] != pytest.approx(expected["photo", "full"][1], abs=1e-3)


def test_single_set_folder_writes_into_it(models: dict[str, Any], sets: dict[str, Any], expected: Any) -> None:
    directory = sets["root"] / "single"
    try:
        run([str(directory), *model_options(models)])
        rows = list(csv.DictReader((directory / "evaluation.csv").open(newline="")))
        assert [row["set"] for row in rows] == ["single", "mean"]
        assert float(rows[0]["text_alignment"]) == pytest.approx(expected["single", "full"][0], abs=1e-5)
        assert rows[0]["dino_consistency"] == rows[1]["dino_consistency"] == "nan"
        assert "| single | 1 |" in (directory / "evaluation.md").read_text()
    finally:
        (directory / "evaluation.csv").unlink(missing_ok=True)
        (directory / "evaluation.md").unlink(missing_ok=True)


def test_mean_pairwise_cosine() -> None:
    embeddings = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    pairs = [(i, j) for i in range(5) for j in range(5) if i < j]
    plain = [float(embeddings[i] @ embeddings[j] / (embeddings[i].norm() * embeddings[j].norm())) for i, j in pairs]
    assert mean_pairwise_cosine(embeddings) == pytest.approx(sum(plain) / len(plain), abs=1e-6)
    assert math.isnan(mean_pairwise_cosine(embeddings[:1]))


def test_errors(models: dict[str, Any], sets: dict[str, Any], tmp_path: Path) -> None:
    single = str(sets["root"] / "single")
    clip, dino = str(models["root"] / "clip"), str(models["root"] / "dino")
    with pytest.raises(FileNotFoundError, match=r"CLIP folder .*missing-clip does not exist.*openai/clip-vit"):
        run([single, "--clip", str(tmp_path / "missing-clip"), "--dino", dino])
    with pytest.raises(FileNotFoundError, match=r"DINO folder .*missing-dino does not exist.*facebook/dino-vitb8"):
        run([single, "--clip", clip, "--dino", str(tmp_path / "missing-dino")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no config.json: give the folder of a CLIP model"):
        run([single, "--clip", str(tmp_path / "empty"), "--dino", dino])
    with pytest.raises(ValueError, match="holds a 'vit' model, not CLIP"):
        run([single, "--clip", dino, "--dino", dino])
    with pytest.raises(ValueError, match="holds a 'clip' model, not a DINO vision transformer"):
        run([single, "--clip", clip, "--dino", clip])
    (tmp_path / "config-only").mkdir()
    shutil.copy(models["root"] / "clip" / "config.json", tmp_path / "config-only")
    with pytest.raises(ValueError, match="cannot load the CLIP model or its processor from .*config-only"):
        run([single, "--clip", str(tmp_path / "config-only"), "--dino", dino])

    with pytest.raises(FileNotFoundError, match=r"no set in .*nothing: expected a set folder"):
        (tmp_path / "nothing" / "sub").mkdir(parents=True)
        run([str(tmp_path / "nothing"), "--clip", clip, "--dino", dino])
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        run([str(tmp_path / "absent"), "--clip", clip, "--dino", dino])
    broken = tmp_path / "broken"
    shutil.copytree(sets["root"] / "watercolor", broken)
    next(broken.glob("01-*.png")).unlink()
    with pytest.raises(FileNotFoundError, match=r"01-a-toy-car-watercolor.png is missing: the set is incomplete"):
        run([str(broken), "--clip", clip, "--dino", dino])
    data = json.loads((broken / SIDECAR).read_text())
    write_json(broken / SIDECAR, data | {"images": data["images"][:1]})
    with pytest.raises(ValueError, match="must list one image per prompt"):
        run([str(broken), "--clip", clip, "--dino", dino])
