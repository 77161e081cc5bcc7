"""Single-file checkpoints in the original Stability layout (SD1.x and SDXL), read one tensor at a time.

The files that ComfyUI, A1111 and Forge load, and that fine-tunes are shared as, hold the whole pipeline under the
original module names: `model.diffusion_model.` (U-Net), `first_stage_model.` (VAE), `cond_stage_model.transformer.`
(SD1's CLIP L) or `conditioner.embedders.0.transformer.` and `conditioner.embedders.1.model.` (SDXL's CLIP L and
OpenCLIP G). `original_key` names the original tensor of each diffusers key, with the operation that turns it into
the diffusers tensor; composed with the shipped diffusers-to-Refiners key maps, a single file converts and loads
exactly like a diffusers folder.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from style_aligned.weights.architectures import ARCHITECTURES, PIPELINES, Architecture
from style_aligned.weights.key_maps import load_key_map
from style_aligned.weights.safetensors_io import PICKLE_SUFFIXES, SafetensorsReader, WeightsError, pickle_error

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."

LAYOUTS: dict[str, tuple[str, ...]] = {
    "sd1": (UNET_PREFIX, VAE_PREFIX, SD1_CLIP_PREFIX),
    "sdxl": (UNET_PREFIX, VAE_PREFIX, SDXL_CLIP_L_PREFIX, SDXL_CLIP_G_PREFIX),
}
"""The key prefixes of each pipeline kind's single file."""


@dataclass(frozen=True)
class Origin:
    """Where a diffusers tensor lies in an original-layout file.

    Attributes:
        key: The original key.
        op: `"copy"`; `"reshape"` (a 1x1 convolution stored for a linear layer); `"transpose"` (OpenCLIP's text
            projection); or `"chunk"` (one of the query, key and value parts of a fused `in_proj`).
        part: For `"chunk"`, which of the three parts (0: query, 1: key, 2: value).
    """

    key: str
    op: str = "copy"
    part: int = 0

    def original_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the original tensor has, given the diffusers tensor's."""
        if self.op == "reshape":
            return (*shape, 1, 1)
        if self.op == "transpose":
            return tuple(reversed(shape))
        if self.op == "chunk":
            return (3 * shape[0], *shape[1:])
        return shape

    def apply(self, tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
        """The diffusers tensor of shape `shape`, from the original tensor."""
        if self.op == "reshape":
            return tensor.reshape(shape)
        if self.op == "transpose":
            return tensor.T.contiguous()
        if self.op == "chunk":
            return tensor.chunk(3)[self.part].contiguous()
        return tensor


_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str) -> str:
    module, _, tail = rest.partition(".")
    return f"{_RESNET.get(module, module)}.{tail}"


def _unet_key(key: str, up_block_types: list[str], layers_per_block: int) -> str:
    per_block = layers_per_block + 1
    module, _, tail = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{tail}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "downsamplers":
            return f"input_blocks.{1 + block * per_block + layers_per_block}.0.op.{rest.removeprefix('conv.')}"
        index = 1 + block * per_block + layer
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if match := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, layer, rest = match[1], int(match[2]), match[3]
        if kind == "resnets":
            return f"middle_block.{2 * layer}.{_resnet(rest)}"
        return f"middle_block.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "upsamplers":
            position = 2 if up_block_types[block].startswith("CrossAttn") else 1
            return f"output_blocks.{block * per_block + layers_per_block}.{position}.{rest}"
        index = block * per_block + layer
        return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    raise WeightsError(f"no original-layout name is known for the U-Net key {key}")


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_origin(key: str, num_blocks: int) -> Origin:
    """Where a diffusers VAE key lies in the original latent-diffusion layout (without `first_stage_model.`)."""
    part, _, rest = key.partition(".")  # encoder, decoder, quant_conv, post_quant_conv
    if part in ("quant_conv", "post_quant_conv"):
        return Origin(key)
    if rest.startswith("conv_norm_out."):
        return Origin(f"{part}.norm_out.{rest.removeprefix('conv_norm_out.')}")
    if rest.startswith(("conv_in.", "conv_out.")):
        return Origin(key)
    if match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest):
        direction, block, kind, layer, tail = match[1], int(match[2]), match[3], int(match[4]), match[5]
        original_block = block if direction == "down" else num_blocks - 1 - block
        if kind == "resnets":
            tail = tail.replace("conv_shortcut", "nin_shortcut")
            return Origin(f"{part}.{direction}.{original_block}.block.{layer}.{tail}")
        return Origin(f"{part}.{direction}.{original_block}.{direction}sample.{tail}")
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        tail = match[2].replace("conv_shortcut", "nin_shortcut")
        return Origin(f"{part}.mid.block_{int(match[1]) + 1}.{tail}")
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", rest):
        module, tail = _VAE_ATTENTION[match[1]], match[2]
        op = "reshape" if tail == "weight" and module != "norm" else "copy"
        return Origin(f"{part}.mid.attn_1.{module}.{tail}", op)
    raise WeightsError(f"no original-layout name is known for the VAE key {key}")


_OPEN_CLIP_TOP = {
    "text_model.embeddings.position_embedding.weight": Origin("positional_embedding"),
    "text_model.embeddings.token_embedding.weight": Origin("token_embedding.weight"),
    "text_model.final_layer_norm.weight": Origin("ln_final.weight"),
    "text_model.final_layer_norm.bias": Origin("ln_final.bias"),
    "text_projection.weight": Origin("text_projection", "transpose"),
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _open_clip_key(key: str) -> Origin:
    if key in _OPEN_CLIP_TOP:
        return _OPEN_CLIP_TOP[key]
    if match := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
        layer, module, tail = int(match[1]), match[2], match[3]
        prefix = f"transformer.resblocks.{layer}"
        if projection := re.fullmatch(r"self_attn\.([qkv])_proj", module):
            return Origin(f"{prefix}.attn.in_proj_{tail}", "chunk", "qkv".index(projection[1]))
        if module in _OPEN_CLIP_LAYER:
            return Origin(f"{prefix}.{_OPEN_CLIP_LAYER[module]}.{tail}")
    raise WeightsError(f"no original-layout name is known for the OpenCLIP key {key}")


def original_key(kind: str, key: str) -> Origin:
    """Where the tensor of a diffusers key lies in an original-layout single file.

    Args:
        kind: `"sd1"` or `"sdxl"`.
        key: A source key of the pipeline's key maps, with its component: `unet/...`, `vae/...`, `text_encoder/...`
            or `text_encoder_2/...`.

    Returns:
        The original key (with its prefix) and how to turn its tensor into the diffusers one.

    Raises:
        WeightsError: If the key has no original counterpart.
    """
    component, _, key = key.partition("/")
    if component == "unet":
        config = ARCHITECTURES[f"{kind}_unet"].configs["unet"]
        return Origin(UNET_PREFIX + _unet_key(key, config["up_block_types"], config["layers_per_block"]))
    if component == "vae":
        origin = vae_origin(key, len(ARCHITECTURES[f"{kind}_autoencoder"].configs["vae"]["block_out_channels"]))
        return Origin(VAE_PREFIX + origin.key, origin.op, origin.part)
    if component == "text_encoder":
        return Origin((SD1_CLIP_PREFIX if kind == "sd1" else SDXL_CLIP_L_PREFIX) + key)
    if component == "text_encoder_2" and kind == "sdxl":
        origin = _open_clip_key(key)
        return Origin(SDXL_CLIP_G_PREFIX + origin.key, origin.op, origin.part)
    raise WeightsError(f"no original-layout name is known for {component}/{key} of {kind}")


def pipeline_keys(kind: str) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """For each architecture of a pipeline kind, its source keys with their component prefix, mapped as in its key map.

    A pipeline's text encoders have one component (`text_encoder`) or two (already prefixed in the SDXL map).
    """
    result: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for name in PIPELINES[kind]:
        architecture = ARCHITECTURES[name]
        key_map, _ = load_key_map(architecture.key_map)
        (component,) = architecture.configs if len(architecture.configs) == 1 else (None,)
        result[name] = {(f"{component}/{key}" if component else key): value for key, value in key_map.items()}
    return result


def detect_layout(keys: list[str], path: Path) -> str:
    """The pipeline kind of an original-layout file, from its keys.

    Raises:
        WeightsError: If the keys are not those of an SD1 or SDXL single-file checkpoint (listing what was expected
            and what was found).
    """
    found = {key.split(".", 1)[0] for key in keys}
    prefixes = {prefix for prefix in {p for layout in LAYOUTS.values() for p in layout} if _has(keys, prefix)}
    for kind in ("sdxl", "sd1"):
        if all(prefix in prefixes for prefix in LAYOUTS[kind]):
            return kind
    others = sorted(found)[:8]
    expected = "; ".join(f"{kind.upper()}: {', '.join(LAYOUTS[kind])}" for kind in ("sd1", "sdxl"))
    detail = f"found keys under {', '.join(sorted(prefixes)) or 'none of these'}"
    if "cond_stage_model.model." in {key[:23] for key in keys}:
        detail += " and cond_stage_model.model. (an SD2 checkpoint, which is not supported)"
    raise WeightsError(
        f"{path} is not a single-file SD1 or SDXL checkpoint in the original layout: expected keys under {expected};"
        f" {detail} (top-level names: {', '.join(others)})"
    )


def _has(keys: list[str], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


class SingleFileSource:
    """One model of a single-file checkpoint in the original layout, checked against its key map.

    It reads like `convert.ModelSource`: `entries()` lists the Refiners keys, `read(key)` returns one tensor.
    """

    def __init__(self, reader: SafetensorsReader, kind: str, name: str) -> None:
        """Check that the file holds every tensor of the model, with the right shapes.

        Args:
            reader: The open file (it stays open while the source is used; the caller closes it).
            kind: `"sd1"` or `"sdxl"`.
            name: The architecture (e.g. `"sdxl_unet"`).

        Raises:
            WeightsError: If tensors are missing or have the wrong shapes (the first ones are listed).
        """
        self.architecture: Architecture = ARCHITECTURES[name]
        self._reader = reader
        self._targets: dict[str, tuple[Origin, tuple[int, ...]]] = {}
        missing: list[str] = []
        mismatched: list[str] = []
        for key, (target, shape) in pipeline_keys(kind)[name].items():
            origin = original_key(kind, key)
            info = reader.tensors.get(origin.key)
            if info is None:
                missing.append(origin.key)
                continue
            expected = origin.original_shape(shape)
            if info.shape != expected and not (origin.op == "reshape" and info.shape == shape):
                mismatched.append(f"{origin.key} is {list(info.shape)}, expected {list(expected)}")
            self._targets[target] = (origin, shape)
        problems = [
            f"{label} ({len(items)}): {', '.join(items[:8])}{', ...' if len(items) > 8 else ''}"
            for label, items in (("missing keys", sorted(set(missing))), ("wrong shapes", mismatched))
            if items
        ]
        if problems:
            raise WeightsError(
                f"{reader.path} does not hold the {self.architecture.description} of an original-layout"
                f" {kind.upper()} checkpoint: {'; '.join(problems)}"
            )

    def entries(self, dtype: torch.dtype | None = None) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """The Refiners key, dtype and shape of every converted tensor (see `convert.ModelSource.entries`)."""
        result: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for target, (origin, shape) in self._targets.items():
            source_dtype = self._reader.tensors[origin.key].dtype
            result.append((target, dtype if dtype and source_dtype.is_floating_point else source_dtype, shape))
        return result

    def read(self, target_key: str, dtype: torch.dtype | None = None) -> Tensor:
        """Read the tensor of a Refiners key, optionally converted to a floating-point dtype."""
        origin, shape = self._targets[target_key]
        tensor = origin.apply(self._reader.read(origin.key), shape)
        return tensor.to(dtype) if dtype and tensor.is_floating_point() else tensor

    def close(self) -> None:
        """Nothing to release: the file belongs to the caller."""

    def __enter__(self) -> "SingleFileSource":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def is_single_file(path: Path) -> bool:
    """Whether a path names a checkpoint file (rather than a folder)."""
    return path.is_file() or path.suffix in (".safetensors", *PICKLE_SUFFIXES)


def open_single_file(path: Path) -> tuple[SafetensorsReader, list[SingleFileSource]]:
    """Open a single-file checkpoint and check each of its models; the caller closes the reader.

    Raises:
        WeightsError: If the file is a pickle, missing, truncated, or not an SD1/SDXL checkpoint in the original
            layout.
    """
    if path.suffix in PICKLE_SUFFIXES:
        raise pickle_error(path)
    reader = SafetensorsReader(path)
    try:
        kind = detect_layout(reader.keys(), path)
        return reader, [SingleFileSource(reader, kind, name) for name in PIPELINES[kind]]
    except BaseException:
        reader.close()
        raise
