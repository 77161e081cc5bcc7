"""The StyleAligned paper's metrics of generated sets: CLIP text alignment and DINO set consistency.

Text alignment is the cosine similarity of the CLIP embeddings of an image and of its prompt (or of the prompt's
first part, the object's description), averaged over the images of a set. Set consistency is the cosine similarity
of the DINO CLS embeddings of two images of a set, averaged over all unordered pairs; a set of one image has no pair,
and its consistency is NaN (shown as n/a, left out of the mean). The models are read from Hugging Face folders
(`save_pretrained` layout) or Hub repo ids (safetensors weights only); `transformers` is imported when a model is
loaded, so the rest of the package does not need it.
"""

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from PIL import Image

from style_aligned.evaluation.tables import SCORE_COLUMNS, markdown_table, score_text, write_csv
from style_aligned.extras import require
from style_aligned.pipeline.set_files import SIDECAR, read_sidecar
from style_aligned.weights.hub import SCORER_FILES, resolve_folder

CLIP_EXAMPLE = "openai/clip-vit-large-patch14"
DINO_EXAMPLE = "facebook/dino-vitb8"
DINO_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")
"""Vision transformers whose `last_hidden_state[:, 0]` is the CLS token."""


def _transformers() -> Any:
    return require("transformers", extra="eval", feature="scoring sets with CLIP and DINO")


def _read_config(folder: Path, kind: str, example: str) -> dict[str, Any]:
    expected = f"give the folder of a {kind} model saved with save_pretrained, e.g. {example}"
    if not folder.is_dir():
        raise FileNotFoundError(f"the {kind} folder {folder} does not exist: {expected}")
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: {expected}")
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {config}: {error}; {expected}") from None


def _load(kind: str, folder: Path, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot load the {kind} model or its processor from {folder}: {error}") from None


def batch_starts(count: int, batch_size: int) -> range:
    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    return range(0, count, batch_size)


class ClipScorer:
    """CLIP image-text cosine similarity, from a local folder (a `CLIPModel` and its processor)."""

    def __init__(self, folder: Path | str = CLIP_EXAMPLE, device: torch.device | str = "cpu") -> None:
        """Load the model in float32.

        Args:
            folder: A CLIP model and processor saved with `save_pretrained`, or a Hub repo id (default:
                openai/clip-vit-large-patch14), fetched through `huggingface_hub` (safetensors weights only).
            device: The torch device.

        Raises:
            FileNotFoundError: If the folder or its config.json is missing.
            ValueError: If the folder holds no CLIP model or processor.
        """
        transformers = _transformers()
        folder = resolve_folder(folder, SCORER_FILES)
        model_type = _read_config(folder, "CLIP", CLIP_EXAMPLE).get("model_type")
        if model_type != "clip":
            raise ValueError(
                f"{folder} holds a {model_type!r} model, not CLIP: give a CLIPModel folder, e.g. {CLIP_EXAMPLE}"
            )
        self.device = torch.device(device)
        self.model: Any = _load(
            "CLIP",
            folder,
            lambda: transformers.CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True),
        )
        self.model.to(device=self.device, dtype=torch.float32).eval()
        self.processor: Any = _load(
            "CLIP", folder, lambda: transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
        )
        self.max_tokens: int = self.model.config.text_config.max_position_embeddings

    def text_alignment(self, images: Sequence[Image.Image], texts: Sequence[str], batch_size: int = 16) -> list[float]:
        """The cosine similarity of each image's CLIP embedding and its text's (texts are cut to CLIP's 77 tokens).

        Args:
            images: The images.
            texts: One text per image.
            batch_size: Images per forward pass.

        Returns:
            One similarity per image.
        """
        if len(images) != len(texts):
            raise ValueError(f"text_alignment needs one text per image, got {len(images)} images, {len(texts)} texts")
        similarities: list[float] = []
        for start in batch_starts(len(images), batch_size):
            inputs = self.processor(
                text=list(texts[start : start + batch_size]),
                images=[image.convert("RGB") for image in images[start : start + batch_size]],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
            ).to(self.device)
            with torch.inference_mode():
                vision = self.model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
                text = self.model.text_model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).pooler_output
                cosine = F.cosine_similarity(self.model.visual_projection(vision), self.model.text_projection(text))
            similarities.extend(float(value) for value in cosine.float().cpu())
        return similarities


class DinoScorer:
    """DINO CLS embeddings, from a local folder (a ViT such as facebook/dino-vitb8 and its image processor)."""

    def __init__(self, folder: Path | str = DINO_EXAMPLE, device: torch.device | str = "cpu") -> None:
        """Load the model in float32.

        Args:
            folder: A DINO model and image processor saved with `save_pretrained`, or a Hub repo id (default:
                facebook/dino-vitb8), fetched through `huggingface_hub` (safetensors weights only).
            device: The torch device.

        Raises:
            FileNotFoundError: If the folder or its config.json is missing.
            ValueError: If the folder holds no ViT model or image processor.
        """
        transformers = _transformers()
        folder = resolve_folder(folder, SCORER_FILES)
        model_type = _read_config(folder, "DINO", DINO_EXAMPLE).get("model_type")
        if model_type not in DINO_MODEL_TYPES:
            raise ValueError(
                f"{folder} holds a {model_type!r} model, not a DINO vision transformer"
                f" ({', '.join(DINO_MODEL_TYPES)}): give a folder such as {DINO_EXAMPLE}"
            )
        options = {"add_pooling_layer": False} if model_type == "vit" else {}
        self.device = torch.device(device)
        self.model: Any = _load(
            "DINO",
            folder,
            lambda: transformers.AutoModel.from_pretrained(
                folder, local_files_only=True, use_safetensors=True, **options
            ),
        )
        self.model.to(device=self.device, dtype=torch.float32).eval()
        self.processor: Any = _load(
            "DINO", folder, lambda: transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        )

    def embeddings(self, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
        """The CLS embeddings `last_hidden_state[:, 0]` of the images, shape (images, hidden size), on the CPU."""
        embeddings: list[torch.Tensor] = []
        for start in batch_starts(len(images), batch_size):
            batch = [image.convert("RGB") for image in images[start : start + batch_size]]
            inputs = self.processor(images=batch, return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(pixel_values=inputs["pixel_values"].to(self.device)).last_hidden_state
            embeddings.append(hidden[:, 0].float().cpu())
        return torch.cat(embeddings)

    def consistency(self, images: Sequence[Image.Image], batch_size: int = 16) -> float:
        """The mean pairwise cosine similarity of the images' CLS embeddings; NaN for fewer than two images."""
        if len(images) < 2:
            return math.nan
        return mean_pairwise_cosine(self.embeddings(images, batch_size))


def mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """The mean cosine similarity over all unordered pairs `i < j` of rows; NaN for fewer than two rows."""
    if len(embeddings) < 2:
        return math.nan
    unit = F.normalize(embeddings.double(), dim=-1)
    rows, columns = torch.triu_indices(len(unit), len(unit), offset=1)
    return float((unit @ unit.T)[rows, columns].mean())


@dataclass(frozen=True, kw_only=True)
class SetFiles:
    """The images of a set and their prompts, read from its sidecar (the reference first)."""

    path: Path
    command: str
    prompts: list[str]
    images: list[Path]


def read_set(directory: Path) -> SetFiles:
    """Read and check the sidecar of a set written by `generate` or `transfer`; the images are not opened.

    Raises:
        FileNotFoundError: If the sidecar or an image is missing.
        ValueError: If the sidecar does not list one prompt per image.
    """
    data = read_sidecar(directory)
    prompts, names = _strings(data.get("image_prompts")), _strings(data.get("images"))
    if prompts is None or names is None or len(prompts) != len(names) or not names:
        raise ValueError(f"{directory / SIDECAR} must list one image per prompt in 'images' and 'image_prompts'")
    paths = [directory / name for name in names]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the set is incomplete (was its generation interrupted?)")
    return SetFiles(path=directory, command=str(data.get("command", "")), prompts=prompts, images=paths)


def _strings(value: Any) -> list[str] | None:
    return [str(item) for item in cast(list[Any], value)] if isinstance(value, list) else None


def find_sets(directory: Path) -> list[Path]:
    """The set folder `directory` itself if it holds a set, else every folder below it that holds one, sorted.

    Raises:
        FileNotFoundError: If `directory` does not exist or holds no set.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder")
    if (directory / SIDECAR).is_file():
        return [directory]
    sets = sorted(path.parent for path in directory.rglob(SIDECAR))
    if not sets:
        raise FileNotFoundError(
            f"no set in {directory}: expected a set folder (with {SIDECAR}, written by style-aligned generate or"
            " transfer) or a folder of set folders"
        )
    return sets


@dataclass(frozen=True, kw_only=True)
class SetScores:
    """The metrics of one set.

    Attributes:
        name: The set's folder, relative to the folder common to the evaluated sets.
        path: The set's folder.
        command: The command that wrote it (`generate` or `transfer`).
        images: The number of images scored.
        image_text_alignment: The CLIP image-text similarity of each image scored.
        text_alignment: Their mean.
        consistency: The mean pairwise DINO similarity of the images scored; NaN for a single image.
    """

    name: str
    path: Path
    command: str
    images: int
    image_text_alignment: tuple[float, ...]
    text_alignment: float
    consistency: float


@dataclass(frozen=True)
class Evaluation:
    """The metrics of several sets and their means over the sets that have them (NaN values are left out).

    A set of one scored image has no consistency, and a set with no image scored (its reference alone, left out)
    has neither metric; the means are NaN when no set has the metric.
    """

    sets: list[SetScores]

    @property
    def text_alignment(self) -> float:
        return _mean([scores.text_alignment for scores in self.sets])

    @property
    def consistency(self) -> float:
        return _mean([scores.consistency for scores in self.sets])

    @property
    def images(self) -> int:
        return sum(scores.images for scores in self.sets)


def _mean(values: Sequence[float]) -> float:
    """The mean of the values that are not NaN; NaN if there are none."""
    values = [value for value in values if not math.isnan(value)]
    return math.fsum(values) / len(values) if values else math.nan


def _open_rgb(path: Path) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except OSError as error:
        raise ValueError(f"cannot read the image {path}: {error}") from None


def evaluate_set(
    files: SetFiles,
    clip: ClipScorer,
    dino: DinoScorer,
    *,
    name: str | None = None,
    text_until: str | None = None,
    include_reference: bool = True,
    batch_size: int = 16,
) -> SetScores:
    """Score one set.

    Args:
        files: The set, from `read_set`.
        clip: The text alignment model.
        dino: The consistency model.
        name: The set's name in tables (default: its folder's name).
        text_until: If given, each image is scored against its prompt up to the first occurrence of this text
            (e.g. `"."` scores `a toy train. macro photo` against `a toy train`), else against the whole prompt.
        include_reference: Whether image 0 (the reference) is scored with the others.
        batch_size: Images per forward pass.

    Returns:
        The set's metrics.
    """
    start = 0 if include_reference else 1
    prompts = files.prompts[start:]
    texts = [prompt.split(text_until, 1)[0].strip() if text_until else prompt for prompt in prompts]
    images = [_open_rgb(path) for path in files.images[start:]]
    alignment = tuple(clip.text_alignment(images, texts, batch_size)) if images else ()
    return SetScores(
        name=name or files.path.name,
        path=files.path,
        command=files.command,
        images=len(images),
        image_text_alignment=alignment,
        text_alignment=_mean(alignment),
        consistency=dino.consistency(images, batch_size),
    )


def evaluate_sets(
    directories: Sequence[Path],
    clip: ClipScorer,
    dino: DinoScorer,
    *,
    text_until: str | None = None,
    include_reference: bool = True,
    batch_size: int = 16,
    progress: Callable[[int, int, Path], None] | None = None,
) -> Evaluation:
    """Score sets; every sidecar and image file is checked before the first set is scored.

    Args:
        directories: The set folders.
        clip: The text alignment model.
        dino: The consistency model.
        text_until: See `evaluate_set`.
        include_reference: See `evaluate_set`.
        batch_size: Images per forward pass.
        progress: Called as `progress(index, count, directory)` before each set (index from 1).

    Returns:
        The per-set metrics (named by their path relative to the folder common to all sets) and their means.
    """
    batch_starts(0, batch_size)
    sets = [read_set(directory) for directory in directories]
    common = Path(os.path.commonpath([files.path.resolve() for files in sets])) if sets else Path()
    rows: list[SetScores] = []
    for index, files in enumerate(sets, start=1):
        if progress:
            progress(index, len(sets), files.path)
        relative = files.path.resolve().relative_to(common).as_posix()
        name = files.path.resolve().name if relative == "." else relative
        rows.append(
            evaluate_set(
                files,
                clip,
                dino,
                name=name,
                text_until=text_until,
                include_reference=include_reference,
                batch_size=batch_size,
            )
        )
    return Evaluation(rows)


COLUMNS = ("set", "command", "images", "text_alignment", "dino_consistency", "path")


def write_scores_csv(evaluation: Evaluation, path: Path) -> None:
    """Write one row per set, then a `mean` row (images: their total; NaN is written `nan`)."""
    rows: list[list[object]] = [
        [row.name, row.command, row.images, row.text_alignment, row.consistency, row.path] for row in evaluation.sets
    ]
    rows.append(["mean", "", evaluation.images, evaluation.text_alignment, evaluation.consistency, ""])
    write_csv(path, COLUMNS, rows)


def scores_table(evaluation: Evaluation) -> str:
    """A Markdown table: one row per set, then the means over the sets (see `tables.score_text`)."""
    rows = [
        [row.name, row.images, score_text(row.text_alignment), score_text(row.consistency)] for row in evaluation.sets
    ]
    rows.append(
        ["**mean**", evaluation.images, score_text(evaluation.text_alignment), score_text(evaluation.consistency)]
    )
    return markdown_table(["set", "images", *SCORE_COLUMNS], [False, True, True, True], rows)
