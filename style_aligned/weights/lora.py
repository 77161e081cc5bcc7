"""LoRA files in the diffusers, peft and kohya layouts, attached by their keys to the layers they were trained on.

Refiners' `SDLoraManager` attaches LoRA layers by matching their order and shapes against the model's layers, and only
warns about the ones it cannot place. `LoraManager` keeps its interface (names, scales, removal) but places every
LoRA layer on the exact layer its key names, through the same key maps as the weight conversion, and refuses a file
with keys it cannot place, listing them, before anything is attached.
"""

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, cast

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.adapter import Adapter
from refiners.fluxion.adapters.lora import Conv2dLora, LinearLora, Lora, LoraAdapter
from refiners.fluxion.layers.chain import generate_unique_names
from refiners.foundationals.latent_diffusion import StableDiffusion_1, StableDiffusion_XL
from refiners.foundationals.latent_diffusion.lora import SDLoraManager
from torch import Tensor

from style_aligned.options import model_kind
from style_aligned.weights.architectures import ARCHITECTURES, PIPELINES, Architecture
from style_aligned.weights.empty import build_empty
from style_aligned.weights.key_maps import load_key_map
from style_aligned.weights.safetensors_io import WeightsError, read_tensors


class LoraError(WeightsError):
    """A LoRA file that cannot be attached to the model, with the reason."""


@dataclass(kw_only=True)
class LoraWeights:
    """The down and up weights (and optional alpha) of one LoRA layer, with the keys they came from."""

    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None
    keys: tuple[str, ...] = ()


_COMPONENTS = {
    "unet": "unet",
    "te": "text_encoder",
    "te1": "text_encoder",
    "te2": "text_encoder_2",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
}
_PATTERNS = [  # named groups: component (optional), module, role (and proj for diffusers' processor layout)
    re.compile(r"^lora_(?P<component>unet|te1|te2|te)_(?P<module>.+)\.(?P<role>lora_down|lora_up)\.weight$"),
    re.compile(r"^lora_(?P<component>unet|te1|te2|te)_(?P<module>.+)\.(?P<role>alpha)$"),
    re.compile(
        r"^(?:(?P<component>unet|text_encoder_2|text_encoder)\.)?(?P<module>.+?)"
        r"\.(?P<role>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)"
        r"(?:\.default)?\.weight$"
    ),
    re.compile(r"^(?:(?P<component>unet|text_encoder_2|text_encoder)\.)?(?P<module>.+?)\.(?P<role>alpha)$"),
    re.compile(
        r"^(?:(?P<component>unet)\.)?(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora"
        r"\.(?P<role>down|up)\.weight$"
    ),
]
_DOWN_ROLES = {"lora_down", "lora_A", "lora.down", "lora_linear_layer.down", "down"}


def parse_lora(tensors: dict[str, Tensor]) -> tuple[dict[tuple[str, str], LoraWeights], list[str]]:
    """Group a LoRA state dict by (component, module name), whatever its layout.

    Returns:
        The weights of each (component, module) pair, the module name as written in the file (dotted, or with
        underscores in the kohya layout), and the keys that follow no known layout.
    """
    groups: dict[tuple[str, str], LoraWeights] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        match = next((m for pattern in _PATTERNS if (m := pattern.match(key))), None)
        if match is None:
            unknown.append(key)
            continue
        parts = match.groupdict()
        component = _COMPONENTS[parts.get("component") or "unet"]
        module = parts["module"]
        if proj := parts.get("proj"):
            module = f"{module}.{proj}.0" if proj == "to_out" else f"{module}.{proj}"
        weights = groups.setdefault((component, module), LoraWeights())
        weights.keys = (*weights.keys, key)
        role = parts["role"]
        if role == "alpha":
            weights.alpha = float(tensor.float().item())
        elif role in _DOWN_ROLES:
            weights.down = tensor
        else:
            weights.up = tensor
    return groups, unknown


def sgm_unet_names(architecture: Architecture) -> dict[str, str]:
    """Map the original (SGM/LDM) U-Net module names to diffusers names, for kohya's SDXL LoRA layout."""
    config = architecture.configs["unet"]
    levels = len(config["block_out_channels"])
    per_block = config["layers_per_block"]
    attention = [kind.startswith("CrossAttn") for kind in config["down_block_types"]]
    up_attention = [kind.startswith("CrossAttn") for kind in config["up_block_types"]]
    names = {
        "input_blocks.0.0": "conv_in",
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1",
        "label_emb.0.2": "add_embedding.linear_2",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
        "middle_block.0": "mid_block.resnets.0",
        "middle_block.1": "mid_block.attentions.0",
        "middle_block.2": "mid_block.resnets.1",
    }
    for level in range(levels):
        for layer in range(per_block):
            block = level * (per_block + 1) + layer + 1
            names[f"input_blocks.{block}.0"] = f"down_blocks.{level}.resnets.{layer}"
            if attention[level]:
                names[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{layer}"
        if level < levels - 1:
            names[f"input_blocks.{(level + 1) * (per_block + 1)}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
        for layer in range(per_block + 1):
            block = level * (per_block + 1) + layer
            names[f"output_blocks.{block}.0"] = f"up_blocks.{level}.resnets.{layer}"
            if up_attention[level]:
                names[f"output_blocks.{block}.1"] = f"up_blocks.{level}.attentions.{layer}"
        if level < levels - 1:
            upsampler = 2 if up_attention[level] else 1
            names[f"output_blocks.{level * (per_block + 1) + per_block}.{upsampler}.conv"] = (
                f"up_blocks.{level}.upsamplers.0.conv"
            )
    return names


_RESNET_PARTS = {  # diffusers -> original names inside a ResNet block
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def sgm_unet_modules(architecture: Architecture) -> dict[str, str]:
    """Map every diffusers module name of a U-Net's weights to its original (SGM/LDM) name."""
    key_map, _ = load_key_map(architecture.key_map)
    blocks = sgm_unet_names(architecture)
    result: dict[str, str] = {}
    for path in sorted({key.rsplit(".", 1)[0] for key in key_map}):
        for sgm, diffusers_name in blocks.items():
            if path == diffusers_name or path.startswith(diffusers_name + "."):
                rest = path[len(diffusers_name) :].lstrip(".")
                if ".resnets." in diffusers_name and rest:
                    first, _, tail = rest.partition(".")
                    rest = ".".join(filter(None, [_RESNET_PARTS.get(first, first), tail]))
                result[path] = f"{sgm}.{rest}" if rest else sgm
    return result


@cache
def _module_names(pipeline: str, component: str) -> dict[str, str]:
    """Every module name a LoRA key may use for a component (dotted, underscored, SGM) -> its Refiners key prefix."""
    unet_name, text_name, _ = PIPELINES[pipeline]
    architecture = ARCHITECTURES[unet_name if component == "unet" else text_name]
    prefix = f"{component}/" if len(architecture.configs) > 1 else ""
    key_map, _ = load_key_map(architecture.key_map)
    modules = {
        source.removeprefix(prefix).rsplit(".", 1)[0]: target.rsplit(".", 1)[0]
        for source, (target, _) in key_map.items()
        if source.startswith(prefix)
    }
    if component == "unet":
        modules |= {sgm: modules[path] for path, sgm in sgm_unet_modules(architecture).items()}
    return modules | {name.replace(".", "_"): target for name, target in modules.items()}


@cache
def _structural_adapter_types(architecture_name: str) -> frozenset[type]:
    """Adapter types that are part of a model as built (e.g. `RangeAdapter2d`), unlike adapters injected later."""
    model = build_empty(ARCHITECTURES[architecture_name].build)
    return frozenset(type(m) for m in model.modules() if isinstance(m, Adapter))


def find_layer(root: fl.Chain, path: str, structural: frozenset[type]) -> tuple[fl.WeightedModule, fl.Chain]:
    """Find a layer by its key in the model as built, seeing through adapters injected since.

    Returns:
        The layer and the chain that holds it now (an existing `LoraAdapter` if it has one).

    Raises:
        KeyError: If there is no such weighted layer.
    """
    module: fl.Module = root
    parent = root
    for segment in path.split("."):
        if not isinstance(module, fl.Chain):
            raise KeyError(path)
        actual = list(module)
        built = [_unwrap(child, structural) for child in actual]
        named = generate_unique_names(tuple(built))
        target = named[segment]
        holder = actual[built.index(target)]
        parent = module
        while holder is not target:  # descend through injected adapters to the one holding the target
            assert isinstance(holder, fl.Chain) and isinstance(holder, Adapter)
            parent = holder
            holder = next(child for child in holder if child is target or _unwrap(child, structural) is target)
        module = target
    if not isinstance(module, fl.Linear | fl.Conv2d):
        raise KeyError(path)
    return module, parent


def _unwrap(module: fl.Module, structural: frozenset[type]) -> fl.Module:
    while isinstance(module, Adapter) and type(module) not in structural:
        module = cast(Adapter[fl.Module], module).target
    return module


def make_lora(name: str, weights: LoraWeights, layer: fl.WeightedModule) -> Lora[Any]:
    """A Refiners LoRA layer of these weights for a layer (alpha applied), on its device and dtype.

    Raises:
        LoraError: If the weights' shapes do not fit the layer.
    """
    down, up = weights.down, weights.up
    assert down is not None and up is not None
    if weights.alpha is not None:  # kohya and peft: the update is up @ down * alpha / rank
        up = up * (weights.alpha / down.shape[0])
    if isinstance(layer, fl.Conv2d) and down.ndim == 2:
        down, up = down[:, :, None, None], up[:, :, None, None]
    if isinstance(layer, fl.Linear) and down.ndim == 4:
        down, up = down.flatten(1), up.flatten(1)
    lora = (LinearLora if down.ndim == 2 else Conv2dLora).from_weights(name, down=down, up=up)
    if not lora.is_compatible(layer):
        shapes = f"{list(down.shape)}/{list(up.shape)}"
        raise LoraError(f"LoRA {name!r}: {weights.keys[0]} has shapes {shapes} that do not fit its layer")
    return lora.to(device=layer.device, dtype=layer.dtype)


def attach_loras(
    name: str,
    placements: list[tuple[LoraWeights, fl.WeightedModule, fl.Chain]],
    unplaced: list[str],
    *,
    model: str,
) -> None:
    """Attach the LoRA layers of a LoRA to their layers, once all are known to fit.

    Args:
        name: The LoRA's name.
        placements: Each LoRA layer's weights, the layer it goes on, and the chain holding that layer now.
        unplaced: The LoRA's keys that fit no layer (an error that lists them, if any).
        model: What the model is, for messages (`"SDXL model"`).

    Raises:
        LoraError: If keys fit no layer, the LoRA is empty, or a LoRA layer's shapes do not fit its layer.
    """
    if not placements and not unplaced:
        raise LoraError(f"LoRA {name!r} holds no LoRA weights")
    if unplaced:
        keys = sorted(set(unplaced))
        listed = ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")
        raise LoraError(f"LoRA {name!r} has {len(keys)} keys that match no layer of this {model}: {listed}")
    loras = [(make_lora(name, weights, layer), layer, parent) for weights, layer, parent in placements]
    for lora, layer, parent in loras:
        if isinstance(parent, LoraAdapter) and parent.target is layer:
            parent.add_lora(lora)
        else:
            LoraAdapter(layer, lora).inject(parent)


class LoraManager(SDLoraManager):
    """An `SDLoraManager` that places each LoRA layer on the layer its key names, and refuses unknown keys.

    Example:
        ```py
        manager = LoraManager(sd)
        manager.add_loras("pixel-art", tensors=load_lora_file("pixel-art.safetensors"), scale=0.8)
        manager.remove_loras("pixel-art")
        ```
    """

    def __init__(self, target: StableDiffusion_XL | StableDiffusion_1) -> None:
        super().__init__(target)
        self.pipeline = model_kind(target.unet)

    def add_loras(self, name: str, /, tensors: dict[str, Tensor], scale: float = 1.0) -> None:
        """Attach a LoRA given as a state dict in the diffusers, peft or kohya layout.

        Everything is checked before anything is attached.

        Args:
            name: The name of the LoRA, to change its scale or remove it later.
            tensors: The LoRA's state dict.
            scale: The scale of the LoRA.

        Raises:
            LoraError: If the name is taken, or keys follow no known layout, name no layer of this model, are
                incomplete or have shapes that do not fit.
        """
        if name in self.names:
            raise LoraError(f"a LoRA named {name!r} is already loaded")
        groups, unknown = parse_lora(tensors)
        placements: list[tuple[LoraWeights, fl.WeightedModule, fl.Chain]] = []
        unplaced: list[str] = list(unknown)
        for (component, module), weights in groups.items():
            if weights.down is None or weights.up is None:
                unplaced.extend(weights.keys)
                continue
            try:
                root, architecture = self._component(component)
                target_path = _module_names(self.pipeline, component)[module]
                layer, parent = find_layer(root, target_path, _structural_adapter_types(architecture))
            except KeyError:
                unplaced.extend(weights.keys)
                continue
            placements.append((weights, layer, parent))
        attach_loras(name, placements, unplaced, model=f"{self.pipeline.upper()} model")
        self.set_scale(name, scale)

    def _component(self, component: str) -> tuple[fl.Chain, str]:
        unet_name, text_name, _ = PIPELINES[self.pipeline]
        if component == "unet":
            return self.unet, unet_name
        if component == "text_encoder_2" and self.pipeline != "sdxl":
            raise KeyError(component)
        return self.clip_text_encoder, text_name


def load_lora_file(path: Path | str) -> dict[str, Tensor]:
    """Read a LoRA `.safetensors` file (pickle files are refused)."""
    return read_tensors(path)
