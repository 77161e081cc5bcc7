"""FLUX.1 LoRAs in the diffusers/peft and kohya layouts, attached by key to the Refiners FLUX.1 transformer.

A LoRA layer names its module in one of three ways, each found here:

- diffusers / peft: `transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight` and `lora_B` (also the older
  `lora.down` / `lora.up`, with an optional `.alpha`);
- kohya (sd-scripts): `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up.weight`, `.alpha`, with
  Black Forest Labs' module names underscored (some trainers write diffusers' names underscored after
  `lora_transformer_`: accepted too);
- Black Forest Labs' module names dotted (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`).

A LoRA on one of Black Forest Labs' fused projections (`img_attn.qkv`, `txt_attn.qkv`, a single block's `linear1`)
becomes one LoRA layer on each of the Refiners layers the projection was cut into: the same down weights, the up
weights' rows of that part. The update of a layer is `up @ down * alpha / rank` times the LoRA's scale, as in kohya's
and peft's own code. Each LoRA layer is a Refiners `LoraAdapter` on the `fl.Linear` its key names; removing a LoRA
ejects the adapters it alone used, so the model is the same as before, bit for bit.
"""

import re
from functools import cache
from typing import Any

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.adapter import Adapter
from refiners.fluxion.adapters.lora import Lora, LoraAdapter
from torch import Tensor

from style_aligned.flux.config import FluxConfig
from style_aligned.flux.transformer import FluxTransformer
from style_aligned.weights.empty import build_empty
from style_aligned.weights.flux import Origin, bfl_origins, bfl_transformer_shapes, flux_transformer_key_map
from style_aligned.weights.lora import LoraError, LoraWeights, attach_loras, find_layer

_KOHYA = re.compile(r"^lora_(?:unet|transformer)_(?P<module>.+)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha)$")
_DOTTED = re.compile(
    r"^(?:(?:transformer|diffusion_model|model\.diffusion_model)\.)?(?P<module>.+?)"
    r"\.(?P<role>lora_A(?:\.default)?\.weight|lora_B(?:\.default)?\.weight|lora\.down\.weight|lora\.up\.weight|alpha)$"
)
_DOWN = ("lora_down.weight", "lora_A.weight", "lora_A.default.weight", "lora.down.weight")
Parts = list[tuple[str, Origin | None]]


def parse_flux_lora(tensors: dict[str, Tensor]) -> tuple[dict[str, LoraWeights], list[str]]:
    """Group a LoRA state dict by the module name it writes (`double_blocks_0_img_attn_qkv`, `transformer_blocks.0
    .attn.to_q`, ...), and list the keys that follow no known layout."""
    groups: dict[str, LoraWeights] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        match = _KOHYA.match(key) or _DOTTED.match(key)
        if match is None:
            unknown.append(key)
            continue
        weights = groups.setdefault(match["module"], LoraWeights())
        weights.keys = (*weights.keys, key)
        if match["role"] == "alpha":
            weights.alpha = float(tensor.float().item())
        elif match["role"] in _DOWN:
            weights.down = tensor
        else:
            weights.up = tensor
    return groups, unknown


@cache
def flux_lora_modules(config: FluxConfig) -> dict[str, Parts]:
    """Every module name a FLUX.1 LoRA may use -> the diffusers modules it covers, with the rows of each.

    Diffusers' names cover one module each; Black Forest Labs' fused projections cover several (their rows cut as
    the weights are, see `weights.flux.bfl_origins`). Both are also given with dots replaced by underscores.
    """
    modules: dict[str, Parts] = {}
    for key in flux_transformer_key_map(config):
        if key.endswith(".weight"):
            modules[key.removesuffix(".weight")] = [(key.removesuffix(".weight"), None)]
    for key, origin in bfl_origins(bfl_transformer_shapes(config)).items():
        if key.endswith(".weight") and origin.key.endswith(".weight"):
            modules.setdefault(origin.key.removesuffix(".weight"), []).append((key.removesuffix(".weight"), origin))
    return modules | {name.replace(".", "_"): parts for name, parts in modules.items()}


def flux_lora_layers(tensors: dict[str, Tensor], config: FluxConfig) -> tuple[dict[str, LoraWeights], list[str]]:
    """A FLUX.1 LoRA in any supported layout as one (down, up) pair per diffusers module, the alpha scale applied.

    Returns:
        The LoRA weights of each diffusers module (`transformer_blocks.0.attn.to_q`), and the keys that fit no module
        of this configuration (unknown layout, unknown module or missing half).
    """
    groups, unplaced = parse_flux_lora(tensors)
    modules = flux_lora_modules(config)
    layers: dict[str, LoraWeights] = {}
    for name, weights in groups.items():
        if weights.down is None or weights.up is None or name not in modules:
            unplaced.extend(weights.keys)
            continue
        up = weights.up
        if weights.alpha is not None:
            up = up * (weights.alpha / weights.down.shape[0])
        for module, origin in modules[name]:
            part = origin.apply(up) if origin is not None else up
            layers[module] = LoraWeights(down=weights.down, up=part, keys=weights.keys)
    return layers, unplaced


@cache
def _structural_adapter_types(config: FluxConfig) -> frozenset[type]:
    model = build_empty(lambda: FluxTransformer(config))
    return frozenset(type(m) for m in model.modules() if isinstance(m, Adapter))


class FluxLoraManager:
    """Attach, rescale and remove named LoRAs on a Refiners FLUX.1 transformer.

    Example:
        ```py
        manager = FluxLoraManager(transformer)
        manager.add_loras("ghibli", tensors=load_lora_file("ghibli-flux.safetensors"), scale=0.8)
        manager.set_scale("ghibli", 0.5)
        manager.remove_loras("ghibli")
        ```
    """

    def __init__(self, target: FluxTransformer) -> None:
        self.target = target

    @property
    def lora_adapters(self) -> list[LoraAdapter]:
        return list(self.target.layers(LoraAdapter))

    @property
    def loras(self) -> list[Lora[Any]]:
        return [lora for adapter in self.lora_adapters for lora in adapter.lora_layers]

    @property
    def names(self) -> list[str]:
        """The names of the LoRAs attached, in the order they were first found."""
        return list(dict.fromkeys(lora.name for lora in self.loras))

    def add_loras(self, name: str, /, tensors: dict[str, Tensor], scale: float = 1.0) -> None:
        """Attach a FLUX.1 LoRA given as a state dict (diffusers/peft, kohya or Black Forest Labs names).

        Everything is checked before anything is attached.

        Raises:
            LoraError: If the name is taken, or keys follow no known layout, name no layer of this transformer, are
                incomplete or have shapes that do not fit.
        """
        if name in self.names:
            raise LoraError(f"a LoRA named {name!r} is already loaded")
        layers, unplaced = flux_lora_layers(tensors, self.target.config)
        key_map = flux_transformer_key_map(self.target.config)
        structural = _structural_adapter_types(self.target.config)
        placements: list[tuple[LoraWeights, fl.WeightedModule, fl.Chain]] = []
        for module, weights in layers.items():
            try:
                layer, parent = find_layer(self.target, key_map[f"{module}.weight"].removesuffix(".weight"), structural)
            except KeyError:
                unplaced.extend(weights.keys)
                continue
            placements.append((weights, layer, parent))
        attach_loras(name, placements, unplaced, model="FLUX.1 transformer")
        self.set_scale(name, scale)

    def set_scale(self, name: str, scale: float, /) -> None:
        """Set the scale of a LoRA.

        Raises:
            LoraError: If no LoRA has that name.
        """
        found = [lora for lora in self.loras if lora.name == name]
        if not found:
            raise LoraError(f"no LoRA named {name!r} is loaded")
        for lora in found:
            lora.scale = scale

    def remove_loras(self, *names: str) -> None:
        """Remove LoRAs; an adapter left without LoRA layers is ejected, restoring the layer it wrapped."""
        for adapter in self.lora_adapters:
            for name in names:
                adapter.remove_lora(name)
            if not adapter.loras:
                adapter.eject()
