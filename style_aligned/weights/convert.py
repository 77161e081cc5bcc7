"""Conversion of diffusers-layout weights to Refiners models, by shipped key maps, one tensor at a time.

A source is checked whole before anything is written: its folders, `config.json` (the right architecture), weight
files (safetensors only, valid headers, not truncated) and keys (none missing, none unexpected, right shapes).
"""

import json
from collections.abc import Callable, Generator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from style_aligned.weights.architectures import ARCHITECTURES, PIPELINES, Architecture
from style_aligned.weights.key_maps import load_key_map
from style_aligned.weights.original_layout import SingleFileSource, is_single_file, open_single_file
from style_aligned.weights.safetensors_io import (
    PICKLE_SUFFIXES,
    SafetensorsReader,
    WeightsError,
    pickle_error,
    write_safetensors,
)

_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
_IGNORED_SUFFIXES = ("position_ids",)  # buffers that older transformers checkpoints stored


def canonical_key(config_name: str, key: str) -> str:
    """A source key as published checkpoints write it.

    transformers 5 saves `CLIPTextModel` weights without their `text_model.` prefix; the text encoders of published
    SD1 and SDXL checkpoints have it. Both spellings are accepted.
    """
    if config_name.startswith("text_encoder") and not key.startswith(("text_model.", "text_projection.")):
        return f"text_model.{key}"
    return key


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """Find the safetensors weights of a diffusers or transformers model folder (single, variant or sharded).

    Args:
        folder: The model folder.
        variant: The variant to prefer (e.g. `"fp16"` for `*.fp16.safetensors`); without one, or if the folder lacks
            it, the plain weights are preferred, then any variant.

    Raises:
        WeightsError: If the folder only has pickle weights, or none.
    """
    preferred = [f".{variant}", "", ".*"] if variant else ["", ".*"]
    for name in _WEIGHT_NAMES:
        for infix in preferred:
            if found := sorted(folder.glob(f"{name}{infix}.safetensors")):
                return found[:1]
            if found := sorted(folder.glob(f"{name}{infix}.safetensors.index.json")):
                return _shards(found[0])
    if pickles := sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES):
        raise pickle_error(pickles[0])
    raise WeightsError(f"{folder} holds no .safetensors weights")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as error:
        raise WeightsError(f"{index} is not a valid safetensors index ({error})") from None
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    if missing := [shard.name for shard in shards if not shard.is_file()]:
        raise WeightsError(f"{index} lists shards that are missing: {missing}")
    return shards


def _normalized(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples and lists compare equal


def check_config(folder: Path, architecture: Architecture, config_name: str) -> None:
    """Check that a folder's `config.json` describes the expected architecture.

    Raises:
        WeightsError: If `config.json` is missing, unreadable, or describes another model.
    """
    path = folder / "config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{folder} has no config.json: it is not a diffusers model folder") from None
    except ValueError as error:
        raise WeightsError(f"{path} is not valid JSON ({error})") from None
    expected = architecture.configs[config_name]
    mismatches = [
        f"{field} is {config[field]!r}, expected {expected[field]!r}"
        for field in architecture.checked
        if field in config and field in expected and _normalized(config[field]) != _normalized(expected[field])
    ]
    if mismatches:
        others = [
            f"the {other.description}"
            for other in ARCHITECTURES.values()
            if other is not architecture
            and config_name in other.configs
            and all(
                _normalized(config[f]) == _normalized(other.configs[config_name][f])
                for f in other.checked
                if f in config and f in other.configs[config_name]
            )
        ]
        hint = f" (it looks like {' or '.join(others)})" if others else ""
        raise WeightsError(f"{path} does not describe the {architecture.description}{hint}: {'; '.join(mismatches)}")


class ModelSource:
    """The weights of one architecture in the diffusers layout, checked against its key map.

    Example:
        ```py
        with ModelSource(ARCHITECTURES["sdxl_unet"], {"unet": Path("sdxl/unet")}) as source:
            tensor = source.read("DownBlocks.Chain_1.Conv2d.weight")
        ```
    """

    def __init__(self, architecture: Architecture, folders: dict[str, Path], variant: str | None = None) -> None:
        """Check a source.

        Args:
            architecture: The architecture the weights should have.
            folders: The folder of each of the architecture's configurations (e.g. `{"unet": root / "unet"}`).
            variant: The weights variant to prefer (e.g. `"fp16"`), see `weight_files`.

        Raises:
            WeightsError: If a folder, its configuration, its files or its keys do not fit the architecture.
        """
        self.architecture = architecture
        self._readers: list[SafetensorsReader] = []
        self._sources: dict[str, tuple[SafetensorsReader, str]] = {}
        try:
            for config_name, folder in folders.items():
                if not folder.is_dir():
                    raise WeightsError(f"{folder} is missing: the {architecture.description} needs it")
                check_config(folder, architecture, config_name)
                prefix = f"{config_name}/" if len(folders) > 1 else ""
                for path in weight_files(folder, variant):
                    reader = SafetensorsReader(path)
                    self._readers.append(reader)
                    self._sources.update(
                        {prefix + canonical_key(config_name, key): (reader, key) for key in reader.keys()}
                    )
            self._check_keys()
        except BaseException:
            self.close()
            raise

    def _check_keys(self) -> None:
        key_map, unused = load_key_map(self.architecture.key_map)
        missing = [key for key in key_map if key not in self._sources]
        unexpected = [
            key
            for key in self._sources
            if key not in key_map and key not in unused and not key.endswith(_IGNORED_SUFFIXES)
        ]
        mismatched = [
            f"{key} is {list(self._info(key).shape)}, expected {list(shape)}"
            for key, (_, shape) in key_map.items()
            if key in self._sources and self._info(key).shape != shape
        ]
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("wrong shapes", mismatched),
            )
            if keys
        ]
        if problems:
            files = sorted({str(reader.path) for reader in self._readers})
            raise WeightsError(
                f"{', '.join(files)} do not hold the weights of the {self.architecture.description}: "
                + "; ".join(problems)
            )
        self._targets = {target: source for source, (target, _) in key_map.items()}

    def _info(self, source_key: str) -> Any:
        reader, key = self._sources[source_key]
        return reader.tensors[key]

    def entries(self, dtype: torch.dtype | None = None) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """The Refiners key, dtype and shape of every converted tensor.

        Args:
            dtype: The floating-point dtype to convert to (None keeps the source's).
        """
        result: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for target, source in self._targets.items():
            info = self._info(source)
            result.append((target, dtype if dtype and info.dtype.is_floating_point else info.dtype, info.shape))
        return result

    def read(self, target_key: str, dtype: torch.dtype | None = None) -> Tensor:
        """Read the tensor of a Refiners key, optionally converted to a floating-point dtype."""
        reader, key = self._sources[self._targets[target_key]]
        tensor = reader.read(key)
        return tensor.to(dtype) if dtype and tensor.is_floating_point() else tensor

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def __enter__(self) -> "ModelSource":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def detect_source(root: Path) -> dict[str, dict[str, Path]]:
    """Tell what a diffusers folder holds.

    Args:
        root: A pipeline folder (with `model_index.json`) or a model folder (with `config.json`).

    Returns:
        For each architecture found, the folder of each of its configurations.

    Raises:
        WeightsError: If the folder is not a supported diffusers pipeline or model.
    """
    if not root.is_dir():
        raise WeightsError(f"{root} is not a folder")
    if (index := root / "model_index.json").is_file():
        pipeline_class = str(json.loads(index.read_text()).get("_class_name", ""))
        kind = "sdxl" if pipeline_class.startswith("StableDiffusionXL") else "sd1"
        if not pipeline_class.startswith("StableDiffusion") or "Upscale" in pipeline_class:
            raise WeightsError(f"{index}: {pipeline_class or 'this pipeline'} is not an SD1 or SDXL pipeline")
        return {name: {config: root / config for config in ARCHITECTURES[name].configs} for name in PIPELINES[kind]}
    try:
        config: dict[str, Any] = json.loads((root / "config.json").read_text())
    except (FileNotFoundError, ValueError):
        raise WeightsError(
            f"{root} has neither model_index.json nor a valid config.json: not a diffusers folder"
        ) from None
    model_class = config.get("_class_name")
    is_sdxl = config.get("addition_embed_type") == "text_time"
    names = {
        "UNet2DConditionModel": "sdxl_unet" if is_sdxl else "sd1_unet",
        "ControlNetModel": "sdxl_controlnet" if is_sdxl else "sd1_controlnet",
    }
    if (name := names.get(str(model_class))) is None or name not in ARCHITECTURES:
        raise WeightsError(f"{root}: converting a {model_class} on its own is not supported")
    return {name: {config_name: root for config_name in ARCHITECTURES[name].configs}}


Source = ModelSource | SingleFileSource


@contextmanager
def open_sources(root: Path, variant: str | None = None) -> Generator[list[Source]]:
    """Open and check every model of a diffusers folder or single-file checkpoint; all are checked before any is used.

    Args:
        root: A diffusers pipeline or model folder, or a single `.safetensors` checkpoint in the original layout.
        variant: For a diffusers folder, the weights variant to prefer (e.g. `"fp16"`).
    """
    if is_single_file(root):
        reader, single = open_single_file(root)
        try:
            yield list(single)
        finally:
            reader.close()
        return
    sources: list[Source] = []
    try:
        for name, folders in detect_source(root).items():
            sources.append(ModelSource(ARCHITECTURES[name], folders, variant))
        yield sources
    finally:
        for source in sources:
            source.close()


def convert(
    source: Path | str,
    destination: Path,
    *,
    half: bool = False,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    variant: str | None = None,
) -> list[Path]:
    """Convert a diffusers folder, a single-file checkpoint or a Hub pipeline into a folder of Refiners files.

    Each model becomes one file (`unet.safetensors`, `text_encoder.safetensors`, `autoencoder.safetensors` or
    `controlnet.safetensors`) whose metadata names its source, model kind and dtype. Tensors are streamed one at a
    time; each file is written under a temporary name and renamed when complete. If anything fails, the files this
    call wrote are removed: nothing is left half-written.

    Args:
        source: A diffusers pipeline or model folder, a single-file SD1/SDXL checkpoint in the original Stability
            layout, or a Hugging Face Hub pipeline repo id `org/name[@revision]` (see `hub.resolve_model`).
        destination: The folder to write to (created if needed).
        half: Store floating-point weights as float16.
        overwrite: Replace existing files in `destination`.
        progress: Called with a message before each model is converted.
        variant: For a diffusers folder, the weights variant to prefer (e.g. `"fp16"`; a Hub id picks it by `half`).

    Returns:
        The files written.

    Raises:
        WeightsError: If the source is not valid (see `ModelSource`) or a file would be overwritten.
    """
    from style_aligned.weights.hub import resolve_model

    dtype = torch.float16 if half else None
    if not overwrite and not Path(source).exists():  # a Hub pipeline: check before fetching it
        names = {ARCHITECTURES[name].filename for names in PIPELINES.values() for name in names}
        if existing := sorted(str(destination / name) for name in names if (destination / name).exists()):
            raise WeightsError(f"{', '.join(existing)} already exist (pass overwrite=True / --overwrite to replace)")
    resolved = resolve_model(source, half=half)
    source, variant = resolved.path, variant or resolved.variant
    written: list[Path] = []
    created = not destination.exists()
    with open_sources(source, variant) as sources:
        outputs = [destination / model.architecture.filename for model in sources]
        if not overwrite and (existing := [str(path) for path in outputs if path.exists()]):
            raise WeightsError(f"{', '.join(existing)} already exist (pass overwrite=True / --overwrite to replace)")
        try:
            destination.mkdir(parents=True, exist_ok=True)
            for model, output in zip(sources, outputs, strict=True):
                if progress:
                    progress(f"converting the {model.architecture.description} to {output}")
                entries = model.entries(dtype)
                metadata = {
                    "format": "refiners",
                    "model": model.architecture.name,
                    "source": resolved.reference if resolved.from_hub else str(source.resolve()),
                    "dtype": str(entries[0][1]).removeprefix("torch."),
                    "converter": f"style-aligned {version('style-aligned')}",
                }
                write_safetensors(output, entries, lambda key, m=model: m.read(key, dtype), metadata=metadata)
                written.append(output)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            if created and destination.is_dir() and not any(destination.iterdir()):
                destination.rmdir()
            raise
    return written
