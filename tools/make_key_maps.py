"""Compute the diffusers/transformers -> Refiners key maps shipped in `style_aligned/key_maps/`.

Both models of each pair are built on the meta device and traced with Refiners' `ModelConverter` (execution order
of their weighted layers, matched by type and shape): no weights, no memory, a few seconds. Converting then needs
neither diffusers nor transformers.

    python scripts/make_key_maps.py            # writes style_aligned/key_maps/*.json
    python scripts/make_key_maps.py --check    # fails if the shipped maps differ from a fresh trace
"""

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import refiners.fluxion.layers as fl
import torch
from refiners.fluxion.model_converter import ModelConverter
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder, CLIPTextEncoderG, CLIPTextEncoderL
from refiners.foundationals.latent_diffusion import SD1ControlnetAdapter, SD1UNet, SDXLUNet
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.text_encoder import DoubleTextEncoder
from torch import nn

from style_aligned.flux.autoencoder import FLUX_AUTOENCODER, FluxAutoencoder
from style_aligned.flux.config import FLUX_DEV
from style_aligned.flux.latents import image_ids, text_ids
from style_aligned.flux.transformer import FluxTransformer
from style_aligned.weights.architectures import ARCHITECTURES
from style_aligned.weights.controlnet_xl import SDXLControlnetAdapter
from style_aligned.weights.convert import canonical_key
from style_aligned.weights.key_maps import KEY_MAPS_DIR

META = torch.device("meta")


def expand(module_map: dict[str, str], source: nn.Module, target: nn.Module) -> dict[str, str]:
    """Turn a target -> source map of module paths into a source -> target map of state-dict keys."""
    source_modules, target_modules = dict(source.named_modules()), dict(target.named_modules())
    keys: dict[str, str] = {}
    for target_path, source_path in module_map.items():
        source_names = [n for n, _ in source_modules[source_path].named_parameters(recurse=False)]
        target_names = [n for n, _ in target_modules[target_path].named_parameters(recurse=False)]
        assert source_names == target_names, (source_path, target_path, source_names, target_names)
        for name in source_names:
            keys[f"{source_path}.{name}"] = f"{target_path}.{name}"
    return keys


def trace(source: nn.Module, target: nn.Module, source_args: Any, target_args: Any) -> dict[str, str]:
    converter = ModelConverter(source_model=source, target_model=target, skip_output_check=True, verbose=False)
    module_map = converter.map_state_dicts(source_args=source_args, target_args=target_args)
    assert module_map is not None, f"could not align {type(source).__name__} and {type(target).__name__}"
    return expand(module_map, source, target)


def shapes_of(model: nn.Module) -> dict[str, list[int]]:
    return {key: list(value.shape) for key, value in model.state_dict().items()}


def meta_conditioning(unet: SD1UNet | SDXLUNet, cross_attention_dim: int) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Set meta-device conditioning on a Refiners U-Net; return the matching diffusers inputs (x, t, text, kwargs)."""
    x = torch.randn(1, 4, 32, 32, device=META)
    timestep = torch.zeros(1, device=META)
    embedding = torch.randn(1, 77, cross_attention_dim, device=META)
    unet.set_timestep(timestep=timestep)
    unet.set_clip_text_embedding(clip_text_embedding=embedding)
    keyword: dict[str, Any] = {}
    if isinstance(unet, SDXLUNet):
        added = {"text_embeds": torch.randn(1, 1280, device=META), "time_ids": torch.randn(1, 6, device=META)}
        unet.set_time_ids(time_ids=added["time_ids"])
        unet.set_pooled_text_embedding(pooled_text_embedding=added["text_embeds"])
        keyword["added_cond_kwargs"] = added
    return x, timestep, embedding, keyword


def unet_map(kind: str) -> tuple[dict[str, str], nn.Module]:
    from diffusers import UNet2DConditionModel  # type: ignore[import-untyped]

    config = ARCHITECTURES[kind].configs["unet"]
    with META:
        source = UNet2DConditionModel(**config)
        target = SDXLUNet(in_channels=4) if kind == "sdxl_unet" else SD1UNet(in_channels=4)
    x, timestep, embedding, keyword = meta_conditioning(target, config["cross_attention_dim"])
    source_args = {"positional": (x, timestep, embedding), "keyword": keyword}
    return trace(source, target, source_args, (x,)), target


def clip_text_parameters(
    config_name: str, config: dict[str, Any], encoder: CLIPTextEncoder, projection: fl.Linear | None
) -> dict[str, nn.Parameter]:
    """Trace transformers' CLIP text model against a Refiners encoder (without its tokenizer) and projection.

    Returns:
        Each source key with the Refiners parameter it maps to.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # type: ignore

    with META:
        source = (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))
    traced = fl.Chain(encoder[1:], projection) if projection else encoder[1:]  # shares the encoder's parameters
    tokens = torch.zeros(1, 77, dtype=torch.long, device=META)
    parameters = dict(traced.named_parameters(remove_duplicate=False))
    keys = trace(source, traced, (tokens,), (tokens,))
    return {canonical_key(config_name, source_key): parameters[key] for source_key, key in keys.items()}


def keys_in(model: nn.Module, parameters: dict[str, nn.Parameter]) -> dict[str, str]:
    """Name each parameter by its key in `model` ("" where `model` does not use it)."""
    by_identity = {id(p): k for k, p in model.named_parameters(remove_duplicate=False)}
    return {source: by_identity.get(id(parameter), "") for source, parameter in parameters.items()}


def text_encoder_maps() -> dict[str, tuple[dict[str, str], nn.Module]]:
    sd1_configs = ARCHITECTURES["sd1_text_encoder"].configs
    with META:
        encoder = CLIPTextEncoderL()
    sd1_parameters = clip_text_parameters("text_encoder", sd1_configs["text_encoder"], encoder, projection=None)
    sd1_keys = keys_in(encoder, sd1_parameters)

    sdxl_configs = ARCHITECTURES["sdxl_text_encoder"].configs
    with META:
        encoder_l, encoder_g = CLIPTextEncoderL(), CLIPTextEncoderG()
        projection = fl.Linear(1280, 1280, bias=False)
    parameters_l = clip_text_parameters("text_encoder", sdxl_configs["text_encoder"], encoder_l, None)
    parameters_g = clip_text_parameters("text_encoder_2", sdxl_configs["text_encoder_2"], encoder_g, projection)
    with META:
        double = DoubleTextEncoder(text_encoder_l=encoder_l, text_encoder_g=encoder_g, projection=projection)
    sdxl_keys = {f"text_encoder/{k}": v for k, v in keys_in(double, parameters_l).items()}
    sdxl_keys |= {f"text_encoder_2/{k}": v for k, v in keys_in(double, parameters_g).items()}
    return {"sd1_text_encoder": (sd1_keys, encoder), "sdxl_text_encoder": (sdxl_keys, double)}


def autoencoder_map() -> tuple[dict[str, str], nn.Module]:
    from diffusers import AutoencoderKL  # type: ignore[import-untyped]

    with META:
        source = AutoencoderKL(**ARCHITECTURES["sdxl_autoencoder"].configs["vae"])
        target = LatentDiffusionAutoencoder()
    x = torch.randn(1, 3, 64, 64, device=META)
    return trace(source, target, (x,), (x,)), target


def controlnet_map(kind: str) -> tuple[dict[str, str], nn.Module]:
    from diffusers import ControlNetModel  # type: ignore[import-untyped]

    config = ARCHITECTURES[f"{kind}_controlnet"].configs["."]
    with META:
        source = ControlNetModel(**config)
        unet = SDXLUNet(in_channels=4) if kind == "sdxl" else SD1UNet(in_channels=4)
        if isinstance(unet, SDXLUNet):
            adapter: Any = SDXLControlnetAdapter(unet, name="controlnet").inject()
        else:
            adapter = SD1ControlnetAdapter(unet, name="controlnet").inject()
    target = adapter.controlnet
    x, timestep, embedding, source_kwargs = meta_conditioning(unet, config["cross_attention_dim"])
    condition = torch.randn(1, 3, 256, 256, device=META)
    adapter.set_controlnet_condition(condition)
    converter = ModelConverter(source_model=source, target_model=target, skip_output_check=True, verbose=False)
    source_order = converter._trace_module_execution_order(  # pyright: ignore[reportPrivateUsage]
        module=source,
        args={"positional": (x, timestep, embedding, condition), "keyword": source_kwargs},
        keys_to_skip=[],
    )
    target_order = converter._trace_module_execution_order(  # pyright: ignore[reportPrivateUsage]
        module=target, args=(x,), keys_to_skip=[]
    )
    # diffusers runs the zero convolutions after all down blocks, Refiners right after each block: put each
    # `controlnet_down_blocks.i` after the block whose output it takes.
    for type_shape, source_keys in source_order.items():
        zero_convs = [k for k in source_keys if k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
        if not zero_convs:
            continue
        others = [k for k in source_keys if k not in zero_convs]
        target_keys = target_order[type_shape]
        reordered: list[str] = []
        for target_key in target_keys:
            reordered.append(zero_convs.pop(0) if "Passthrough" in target_key else others.pop(0))
        source_order[type_shape] = reordered
    assert converter._assert_shapes_aligned(  # pyright: ignore[reportPrivateUsage]
        source_order=source_order, target_order=target_order
    )
    module_map: dict[str, str] = {}
    for type_shape, source_keys in source_order.items():
        module_map.update(zip(target_order[type_shape], source_keys, strict=True))
    return expand(module_map, source, target), target


def flux_transformer_map() -> tuple[dict[str, str], nn.Module]:
    """FLUX.1 [dev] (19 double-stream and 38 single-stream blocks, guidance embeds): the map of every FLUX.1 depth."""
    from diffusers import FluxTransformer2DModel  # type: ignore[import-untyped]

    with META:
        source = FluxTransformer2DModel(**FLUX_DEV.to_diffusers())
        target = FluxTransformer(FLUX_DEV)
    x = torch.randn(1, 16, 64, device=META)
    inputs = {
        "encoder_hidden_states": torch.randn(1, 8, 4096, device=META),
        "pooled_projections": torch.randn(1, 768, device=META),
        "timestep": torch.ones(1, device=META),
        "guidance": torch.ones(1, device=META),
        "img_ids": image_ids(8, 8, device=META),
        "txt_ids": text_ids(8, device=META),
    }
    target.set_timestep(timestep=inputs["timestep"])
    target.set_guidance(guidance=inputs["guidance"])
    target.set_text_embedding(text_embedding=inputs["encoder_hidden_states"])
    target.set_pooled_text_embedding(pooled_text_embedding=inputs["pooled_projections"])
    target.set_image_ids(image_ids=inputs["img_ids"])
    target.set_text_ids(text_ids=inputs["txt_ids"])
    weightless = [
        name for name, m in source.named_modules() if isinstance(m, nn.LayerNorm) and not m.elementwise_affine
    ]
    converter = ModelConverter(
        source_model=source,
        target_model=target,
        source_keys_to_skip=weightless,
        custom_layer_mapping={nn.RMSNorm: nn.RMSNorm},
        skip_output_check=True,
        verbose=False,
    )
    module_map = converter.map_state_dicts(source_args={"positional": (x,), "keyword": inputs}, target_args=(x,))
    assert module_map is not None, "could not align the FLUX.1 transformers"
    return expand(module_map, source, target), target


def flux_autoencoder_map() -> tuple[dict[str, str], nn.Module]:
    from diffusers import AutoencoderKL  # type: ignore[import-untyped]

    with META:
        source = AutoencoderKL(**FLUX_AUTOENCODER.to_diffusers())
        target = FluxAutoencoder(FLUX_AUTOENCODER)
    x = torch.randn(1, 3, 64, 64, device=META)
    return trace(source, target, (x,), (x,)), target


def all_maps() -> dict[str, dict[str, Any]]:
    builders: dict[str, Callable[[], tuple[dict[str, str], nn.Module]]] = {
        "sdxl_unet": lambda: unet_map("sdxl_unet"),
        "sd1_unet": lambda: unet_map("sd1_unet"),
        "autoencoder": autoencoder_map,
        "sd1_controlnet": lambda: controlnet_map("sd1"),
        "sdxl_controlnet": lambda: controlnet_map("sdxl"),
        "flux_transformer": flux_transformer_map,
        "flux_autoencoder": flux_autoencoder_map,
    }
    results = {name: build() for name, build in builders.items()} | text_encoder_maps()
    maps: dict[str, dict[str, Any]] = {}
    for name, (keys, target) in results.items():
        target_shapes = shapes_of(target)
        used = {k: v for k, v in keys.items() if v}
        assert sorted(used.values()) == sorted(target_shapes), f"{name}: the map does not cover the target exactly"
        maps[name] = {
            "keys": {source: [target_key, target_shapes[target_key]] for source, target_key in sorted(used.items())},
            "unused": sorted(k for k, v in keys.items() if not v),
        }
    return maps


def dump(key_map: dict[str, Any]) -> str:
    """JSON with one key per line, for readable diffs."""
    entries = ",\n".join(f"  {json.dumps(source)}: {json.dumps(target)}" for source, target in key_map["keys"].items())
    return f'{{"keys": {{\n{entries}\n}},\n"unused": {json.dumps(key_map["unused"])}}}\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped maps instead of writing")
    args = parser.parse_args()
    differing: list[str] = []
    for name, key_map in all_maps().items():
        path = KEY_MAPS_DIR / f"{name}.json"
        text = dump(key_map)
        if args.check:
            if not path.exists() or path.read_text() != text:
                differing.append(name)
        else:
            path.write_text(text)
            print(f"{path}: {len(key_map['keys'])} keys, {len(key_map['unused'])} unused source keys")
    if differing:
        sys.exit(f"shipped key maps differ from a fresh trace: {differing}")


if __name__ == "__main__":
    main()
