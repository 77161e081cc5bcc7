"""Loading FLUX.1 weights into the Refiners models: diffusers folders and files, and Black Forest Labs' single files.

The transformer's diffusers keys map to Refiners keys by the shipped key map `flux_transformer` (a trace of
FLUX.1 [dev] on the meta device, see `tools/make_key_maps.py`); a model with fewer blocks or without guidance
embeds uses the matching part of it (block `i` of any depth has the keys of block `i` of the full model).

Black Forest Labs' single file (`flux1-dev.safetensors`, `flux1-schnell.safetensors`, optionally under
`model.diffusion_model.` as in full checkpoints) is read through its diffusers names, as diffusers'
`convert_flux_transformer_checkpoint_to_diffusers` gives them: fused `qkv` projections are cut in three, a
single-stream block's `linear1` into query, key, value and MLP rows, and the last modulation's shift and scale
halves are swapped. Black Forest Labs' autoencoder file (`ae.safetensors`: `encoder.down.0.block.0.norm1.weight`,
`decoder.up.3.upsample.conv.weight`, `encoder.mid.attn_1.q.weight`, ...) is read through the diffusers names of the
latent-diffusion VAE, as for SD single files (1x1-convolution attention weights reshaped, the decoder's blocks in
reverse order). Every tensor is read when needed, from memory-mapped files: loading holds one copy of the weights.
"""

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from style_aligned.flux.autoencoder import FLUX_AUTOENCODER, AutoencoderConfig, FluxAutoencoder
from style_aligned.flux.config import FluxConfig
from style_aligned.flux.transformer import FluxTransformer
from style_aligned.weights.convert import weight_files
from style_aligned.weights.empty import build_empty
from style_aligned.weights.key_maps import load_key_map
from style_aligned.weights.original_layout import Origin as VaeOrigin
from style_aligned.weights.original_layout import vae_origin
from style_aligned.weights.safetensors_io import SafetensorsReader, WeightsError

BFL_PREFIX = "model.diffusion_model."
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
_CONTAINERS = {"transformer_blocks": "DoubleStreamBlock", "single_transformer_blocks": "SingleStreamBlock"}


def flux_transformer_key_map(config: FluxConfig) -> dict[str, str]:
    """The diffusers key -> Refiners key map of a FLUX.1 transformer of any depth (at most FLUX.1's).

    Raises:
        ValueError: If the configuration has more blocks than FLUX.1.
    """
    full, _ = load_key_map("flux_transformer")
    counts = {"transformer_blocks": config.num_layers, "single_transformer_blocks": config.num_single_layers}
    keys: dict[str, str] = {}
    for source, (target, _) in full.items():
        if not config.guidance_embeds and source.startswith("time_text_embed.guidance_embedder."):
            continue
        if match := _BLOCK.match(source):
            container, index = match[1], int(match[2])
            if index >= counts[container]:
                continue
            if counts[container] == 1:  # Refiners numbers children of the same class only when there are several
                name = _CONTAINERS[container]
                target = target.replace(f".{name}_1.", f".{name}.")
        keys[source] = target
    for container, count in counts.items():
        if count and f"{container}.{count - 1}.attn.to_q.weight" not in keys:
            raise ValueError(f"FLUX.1 has fewer {container} than {count}")
    return keys


@dataclass(frozen=True)
class Origin:
    """Where a diffusers-layout tensor lies in a Black Forest Labs file.

    Attributes:
        key: The original key.
        rows: The rows to take (`(start, end)`), for the parts of a fused projection; None for all.
        swap: Whether to swap the two halves of the rows (the last modulation stores shift, then scale).
    """

    key: str
    rows: tuple[int, int] | None = None
    swap: bool = False

    def apply(self, tensor: Tensor) -> Tensor:
        if self.rows is not None:
            tensor = tensor[self.rows[0] : self.rows[1]]
        if self.swap:
            shift, scale = tensor.chunk(2, dim=0)
            tensor = torch.cat((scale, shift), dim=0)
        return tensor


_BFL_TOP = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_BFL_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
}
_BFL_SINGLE = {
    "modulation.lin": "norm.linear",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
    "linear2": "proj_out",
}
_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": tuple(f"attn.add_{name}_proj" for name in "qkv"),
}


def _renamed(name: str, table: dict[str, str]) -> str | None:
    """A BFL module or parameter name through a rename table (`lin.weight` with `lin` in the table, or an entry)."""
    if name in table:
        return table[name]
    module, _, parameter = name.rpartition(".")
    return f"{table[module]}.{parameter}" if module in table else None


def bfl_origins(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Origin]:
    """The diffusers key of each tensor of a Black Forest Labs FLUX.1 transformer, with its origin.

    Args:
        shapes: The shape of each original key (without the `model.diffusion_model.` prefix).

    Raises:
        WeightsError: If a key is not one of a FLUX.1 transformer.
    """
    inner = shapes["img_in.weight"][0] if "img_in.weight" in shapes else 0
    origins: dict[str, Origin] = {}
    for key in shapes:
        if key.startswith("final_layer.adaLN_modulation.1."):
            origins[f"norm_out.linear.{key.rpartition('.')[2]}"] = Origin(key, swap=True)
        elif (name := _renamed(key, _BFL_TOP)) is not None:
            origins[name] = Origin(key)
        elif match := re.fullmatch(r"double_blocks\.(\d+)\.(.+)", key):
            origins.update(_double_origins(key, f"transformer_blocks.{match[1]}.", match[2], inner))
        elif match := re.fullmatch(r"single_blocks\.(\d+)\.(.+)", key):
            origins.update(_single_origins(key, f"single_transformer_blocks.{match[1]}.", match[2], shapes, inner))
        else:
            raise WeightsError(f"{key} is not a key of a FLUX.1 transformer in the Black Forest Labs layout")
    return origins


def _double_origins(key: str, prefix: str, rest: str, inner: int) -> dict[str, Origin]:
    module, _, parameter = rest.rpartition(".")
    if module in _QKV:
        return {
            f"{prefix}{name}.{parameter}": Origin(key, rows=(part * inner, (part + 1) * inner))
            for part, name in enumerate(_QKV[module])
        }
    if (name := _renamed(rest, _BFL_DOUBLE)) is None:
        raise WeightsError(f"{key} is not a key of a FLUX.1 double-stream block")
    return {prefix + name: Origin(key)}


def _single_origins(
    key: str, prefix: str, rest: str, shapes: Mapping[str, tuple[int, ...]], inner: int
) -> dict[str, Origin]:
    module, _, parameter = rest.rpartition(".")
    if module == "linear1":
        total = shapes[key][0]
        bounds = [0, inner, 2 * inner, 3 * inner, total]
        names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        return {
            f"{prefix}{name}.{parameter}": Origin(key, rows=(bounds[i], bounds[i + 1])) for i, name in enumerate(names)
        }
    if (name := _renamed(rest, _BFL_SINGLE)) is None:
        raise WeightsError(f"{key} is not a key of a FLUX.1 single-stream block")
    return {prefix + name: Origin(key)}


def bfl_transformer_shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of a FLUX.1 transformer of this configuration in the Black Forest Labs layout."""
    dim, mlp = config.inner_dim, config.mlp_dim
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    embedders = [("time_in", 256), ("vector_in", config.pooled_projection_dim)]
    for name, inp in embedders + ([("guidance_in", 256)] if config.guidance_embeds else []):
        linear(f"{name}.in_layer", dim, inp)
        linear(f"{name}.out_layer", dim, dim)
    linear("txt_in", dim, config.joint_attention_dim)
    linear("img_in", dim, config.in_channels)
    for i in range(config.num_layers):
        for stream in ("img", "txt"):
            block = f"double_blocks.{i}.{stream}"
            linear(f"{block}_mod.lin", 6 * dim, dim)
            linear(f"{block}_attn.qkv", 3 * dim, dim)
            linear(f"{block}_attn.proj", dim, dim)
            linear(f"{block}_mlp.0", mlp, dim)
            linear(f"{block}_mlp.2", dim, mlp)
            for norm in ("query_norm", "key_norm"):
                shapes[f"{block}_attn.norm.{norm}.scale"] = (config.attention_head_dim,)
    for i in range(config.num_single_layers):
        block = f"single_blocks.{i}"
        linear(f"{block}.modulation.lin", 3 * dim, dim)
        linear(f"{block}.linear1", 3 * dim + mlp, dim)
        linear(f"{block}.linear2", dim, dim + mlp)
        for norm in ("query_norm", "key_norm"):
            shapes[f"{block}.norm.{norm}.scale"] = (config.attention_head_dim,)
    linear("final_layer.adaLN_modulation.1", 2 * dim, dim)
    linear("final_layer.linear", config.in_channels, dim)
    return shapes


def is_bfl_autoencoder(keys: list[str]) -> bool:
    """Whether keys are those of an autoencoder in the original latent-diffusion layout (`ae.safetensors`)."""
    return any(key.startswith(("encoder.down.", "decoder.up.")) for key in keys)


def autoencoder_origins(keys: list[str]) -> dict[str, VaeOrigin]:
    """The original key of each diffusers key of the FLUX.1 autoencoder, for a file in the original layout.

    Raises:
        WeightsError: If the file holds keys that no diffusers key reads.
    """
    num_blocks = len({key.split(".")[2] for key in keys if key.startswith("encoder.down.")})
    origins = {key: vae_origin(key, num_blocks) for key in load_key_map("flux_autoencoder")[0]}
    used = {origin.key for origin in origins.values()}
    if unknown := sorted(key for key in keys if key not in used):
        listed = ", ".join(unknown[:6]) + (", ..." if len(unknown) > 6 else "")
        raise WeightsError(f"{len(unknown)} keys are not those of the FLUX.1 autoencoder: {listed}")
    return {key: origin for key, origin in origins.items() if origin.key in keys}


def _diffusers_shape(origin: VaeOrigin, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:-2] if origin.op == "reshape" else shape


class TensorSource:
    """Tensors in the diffusers layout, read one at a time: from safetensors files (diffusers or Black Forest Labs
    layout) or from a state dict.

    Attributes:
        shapes: The shape of each diffusers key.
        origin: What the tensors were read from, for messages.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        read: Callable[[str], Tensor],
        origin: str,
        *,
        close: Callable[[], None],
    ) -> None:
        self.shapes, self.read, self.origin, self._close = shapes, read, origin, close

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], origin: str = "the state dict") -> "TensorSource":
        """Tensors of a diffusers-layout state dict (shared, not copied)."""
        return cls({k: tuple(v.shape) for k, v in state.items()}, state.__getitem__, origin, close=lambda: None)

    @classmethod
    def from_files(cls, paths: list[Path]) -> "TensorSource":
        """Tensors of safetensors files in the diffusers or the Black Forest Labs layout (told by their keys).

        Raises:
            WeightsError: If a file is not valid safetensors or holds unknown keys.
        """
        readers = [SafetensorsReader(path) for path in paths]
        try:
            located = {key: (reader, key) for reader in readers for key in reader.keys()}
            origin = ", ".join(str(path) for path in paths)
            if is_bfl_autoencoder(list(located)):
                return cls._autoencoder(located, origin, readers)
            if not any(key.startswith(("double_blocks.", "single_blocks.", BFL_PREFIX)) for key in located):
                shapes = {key: reader.tensors[key].shape for key, (reader, _) in located.items()}
                return cls(shapes, lambda key: located[key][0].read(key), origin, close=lambda: _close_all(readers))
            if any(key.startswith(BFL_PREFIX) for key in located):  # a full checkpoint: keep the transformer's keys
                located = {k.removeprefix(BFL_PREFIX): v for k, v in located.items() if k.startswith(BFL_PREFIX)}
            origins = bfl_origins({key: reader.tensors[name].shape for key, (reader, name) in located.items()})

            def read(key: str) -> Tensor:
                reader, name = located[origins[key].key]
                return origins[key].apply(reader.read(name))

            shapes = {key: _origin_shape(origin_, located) for key, origin_ in origins.items()}
            return cls(shapes, read, origin, close=lambda: _close_all(readers))
        except BaseException:
            _close_all(readers)
            raise

    @classmethod
    def _autoencoder(
        cls, located: dict[str, tuple[SafetensorsReader, str]], origin: str, readers: list[SafetensorsReader]
    ) -> "TensorSource":
        origins = autoencoder_origins(list(located))
        shapes = {
            key: _diffusers_shape(item, located[item.key][0].tensors[item.key].shape) for key, item in origins.items()
        }

        def read(key: str) -> Tensor:
            reader, name = located[origins[key].key]
            return origins[key].apply(reader.read(name), shapes[key])

        return cls(shapes, read, origin, close=lambda: _close_all(readers))

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _origin_shape(origin: Origin, located: Mapping[str, tuple[SafetensorsReader, str]]) -> tuple[int, ...]:
    reader, name = located[origin.key]
    shape = reader.tensors[name].shape
    return (origin.rows[1] - origin.rows[0], *shape[1:]) if origin.rows else shape


def _close_all(readers: list[SafetensorsReader]) -> None:
    for reader in readers:
        reader.close()


def infer_flux_config(shapes: Mapping[str, tuple[int, ...]]) -> FluxConfig:
    """The configuration of a diffusers-layout FLUX.1 transformer, from its tensors' shapes.

    The rotary axes are FLUX.1's (16, 56, 56) for heads of 128 channels, else split as 1/8, 7/16, 7/16.

    Raises:
        WeightsError: If the shapes are not those of a FLUX.1 transformer.
    """
    try:
        inner, in_channels = shapes["x_embedder.weight"]
        head_dim = next(shape[0] for key, shape in shapes.items() if key.endswith("attn.norm_q.weight"))
        counts = {name: 0 for name in _CONTAINERS}
        for key in shapes:
            if match := _BLOCK.match(key):
                counts[match[1]] = max(counts[match[1]], int(match[2]) + 1)
        mlp = next(
            shape[0] for key, shape in shapes.items() if key.endswith(("ff.net.0.proj.weight", "proj_mlp.weight"))
        )
        axes = (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
        return FluxConfig(
            num_layers=counts["transformer_blocks"],
            num_single_layers=counts["single_transformer_blocks"],
            num_attention_heads=inner // head_dim,
            attention_head_dim=head_dim,
            in_channels=in_channels,
            joint_attention_dim=shapes["context_embedder.weight"][1],
            pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
            guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
            axes_dims_rope=axes,
            mlp_ratio=mlp / inner,
        )
    except (KeyError, StopIteration, ValueError) as error:
        raise WeightsError(f"these weights are not those of a FLUX.1 transformer ({error})") from None


def open_flux_source(source: Path | str | Mapping[str, Tensor]) -> tuple[TensorSource, dict[str, Any] | None]:
    """Open FLUX.1 transformer or autoencoder weights: a diffusers model folder (its `config.json` returned too), a
    safetensors file in the diffusers or Black Forest Labs layout, or a diffusers-layout state dict.

    Raises:
        WeightsError: If the source is missing or not readable as such weights.
    """
    if isinstance(source, Mapping):
        return TensorSource.from_state_dict(source), None
    path = Path(source)
    if path.is_dir():
        config: dict[str, Any] | None = None
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
        return TensorSource.from_files(weight_files(path)), config
    if not path.is_file():
        raise WeightsError(f"{path} does not exist")
    return TensorSource.from_files([path]), None


def _load(
    model: torch.nn.Module,
    key_map: Mapping[str, str],
    source: TensorSource,
    device: torch.device | str,
    dtype: torch.dtype,
) -> None:
    """Check a source against a key map and a meta-built model, then assign its tensors to the model."""
    expected = model.state_dict()
    missing = sorted(key for key in key_map if key not in source.shapes)
    unexpected = sorted(key for key in source.shapes if key not in key_map)
    wrong = [
        f"{key} is {list(shape)}, expected {list(expected[key_map[key]].shape)}"
        for key, shape in source.shapes.items()
        if key in key_map and tuple(shape) != tuple(expected[key_map[key]].shape)
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if keys
    ]
    if problems:
        raise WeightsError(f"{source.origin} does not fit the model: " + "; ".join(problems))
    state: dict[str, Tensor] = {}
    for source_key, target_key in key_map.items():
        tensor = source.read(source_key)
        state[target_key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(state, strict=True, assign=True)


def load_flux_transformer(
    source: Path | str | Mapping[str, Tensor],
    *,
    config: FluxConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> FluxTransformer:
    """Load a FLUX.1 transformer, in eval mode with gradients off.

    Args:
        source: A diffusers `transformer/` folder (single or sharded safetensors), a safetensors file in the diffusers
            or the Black Forest Labs layout (`flux1-dev.safetensors`), or a diffusers-layout state dict, whose
            tensors the model then shares.
        config: The model's configuration; by default that of the folder's `config.json`, else told by the weights.
        device: Where to put the model.
        dtype: The floating-point dtype of the model.

    Raises:
        WeightsError: If the source is not the weights of a FLUX.1 transformer of that configuration.
    """
    tensors, folder_config = open_flux_source(source)
    with tensors:
        if config is None:
            config = FluxConfig.from_diffusers(folder_config) if folder_config else infer_flux_config(tensors.shapes)
        model = build_empty(lambda: FluxTransformer(config))
        _load(model, flux_transformer_key_map(config), tensors, device, dtype)
    return model.eval().requires_grad_(False)


def load_flux_autoencoder(
    source: Path | str | Mapping[str, Tensor],
    *,
    config: AutoencoderConfig = FLUX_AUTOENCODER,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> FluxAutoencoder:
    """Load the FLUX.1 autoencoder from a diffusers `vae/` folder, file or state dict, in eval mode.

    Raises:
        WeightsError: If the source is not the weights of the FLUX.1 autoencoder.
    """
    key_map = {source_key: target for source_key, (target, _) in load_key_map("flux_autoencoder")[0].items()}
    tensors, _ = open_flux_source(source)
    with tensors:
        model = build_empty(lambda: FluxAutoencoder(config))
        _load(model, key_map, tensors, device, dtype)
    return model.eval().requires_grad_(False)
