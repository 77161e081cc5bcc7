"""Black Forest Labs' `ae.safetensors` (the original latent-diffusion layout) loads as diffusers' own converter
reads it."""

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL  # type: ignore[import-untyped]
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # type: ignore[import-untyped]
from safetensors.torch import save_file

from style_aligned.flux import FLUX_AUTOENCODER
from style_aligned.weights.flux import load_flux_autoencoder
from style_aligned.weights.key_maps import load_key_map
from style_aligned.weights.safetensors_io import WeightsError

CHANNELS = FLUX_AUTOENCODER.block_out_channels
LATENT = FLUX_AUTOENCODER.latent_channels


def _resnet(shapes: dict[str, tuple[int, ...]], name: str, inp: int, out: int) -> None:
    shapes |= {f"{name}.norm1.weight": (inp,), f"{name}.norm1.bias": (inp,)}
    shapes |= {f"{name}.conv1.weight": (out, inp, 3, 3), f"{name}.conv1.bias": (out,)}
    shapes |= {f"{name}.norm2.weight": (out,), f"{name}.norm2.bias": (out,)}
    shapes |= {f"{name}.conv2.weight": (out, out, 3, 3), f"{name}.conv2.bias": (out,)}
    if inp != out:
        shapes |= {f"{name}.nin_shortcut.weight": (out, inp, 1, 1), f"{name}.nin_shortcut.bias": (out,)}


def _middle(shapes: dict[str, tuple[int, ...]], part: str, channels: int) -> None:
    _resnet(shapes, f"{part}.mid.block_1", channels, channels)
    _resnet(shapes, f"{part}.mid.block_2", channels, channels)
    for name in ("norm", "q", "k", "v", "proj_out"):
        weight = (channels,) if name == "norm" else (channels, channels, 1, 1)
        shapes |= {f"{part}.mid.attn_1.{name}.weight": weight, f"{part}.mid.attn_1.{name}.bias": (channels,)}


def original_shapes() -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the FLUX.1 autoencoder as Black Forest Labs' `ae.safetensors` writes them."""
    shapes: dict[str, tuple[int, ...]] = {"encoder.conv_in.weight": (CHANNELS[0], 3, 3, 3)}
    shapes["encoder.conv_in.bias"] = (CHANNELS[0],)
    for i, out in enumerate(CHANNELS):
        for j in range(2):
            _resnet(shapes, f"encoder.down.{i}.block.{j}", CHANNELS[max(i - 1, 0)] if j == 0 else out, out)
        if i < len(CHANNELS) - 1:
            shapes |= {f"encoder.down.{i}.downsample.conv.weight": (out, out, 3, 3)}
            shapes |= {f"encoder.down.{i}.downsample.conv.bias": (out,)}
    _middle(shapes, "encoder", CHANNELS[-1])
    shapes |= {"encoder.norm_out.weight": (CHANNELS[-1],), "encoder.norm_out.bias": (CHANNELS[-1],)}
    shapes |= {"encoder.conv_out.weight": (2 * LATENT, CHANNELS[-1], 3, 3), "encoder.conv_out.bias": (2 * LATENT,)}
    shapes |= {"decoder.conv_in.weight": (CHANNELS[-1], LATENT, 3, 3), "decoder.conv_in.bias": (CHANNELS[-1],)}
    _middle(shapes, "decoder", CHANNELS[-1])
    for i in reversed(range(len(CHANNELS))):  # original order: up.3 runs first, at the lowest resolution
        out = CHANNELS[i]
        for j in range(3):
            _resnet(
                shapes, f"decoder.up.{i}.block.{j}", CHANNELS[min(i + 1, len(CHANNELS) - 1)] if j == 0 else out, out
            )
        if i > 0:
            shapes |= {
                f"decoder.up.{i}.upsample.conv.weight": (out, out, 3, 3),
                f"decoder.up.{i}.upsample.conv.bias": (out,),
            }
    shapes |= {"decoder.norm_out.weight": (CHANNELS[0],), "decoder.norm_out.bias": (CHANNELS[0],)}
    shapes |= {"decoder.conv_out.weight": (3, CHANNELS[0], 3, 3), "decoder.conv_out.bias": (3,)}
    return shapes


@torch.no_grad()
def test_black_forest_labs_autoencoder_loads_as_diffusers_converts_it(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    original = {key: torch.randn(shape, generator=generator) * 0.05 for key, shape in original_shapes().items()}
    path = tmp_path / "ae.safetensors"
    save_file(original, str(path))
    expected = convert_ldm_vae_checkpoint(dict(original), FLUX_AUTOENCODER.to_diffusers())
    reference = AutoencoderKL(**FLUX_AUTOENCODER.to_diffusers())
    reference.load_state_dict(expected, strict=True)  # the hand-written original layout is complete
    model = load_flux_autoencoder(path)
    state = model.state_dict()
    key_map, _ = load_key_map("flux_autoencoder")
    assert sorted(key_map) == sorted(expected)
    for source, (target, _) in key_map.items():
        assert torch.equal(state[target], expected[source].reshape(state[target].shape)), source
    latents = torch.randn(1, LATENT, 4, 4, generator=generator)
    scale, shift = FLUX_AUTOENCODER.scaling_factor, FLUX_AUTOENCODER.shift_factor
    actual = model.decode(latents)
    wanted = reference.decode(latents / scale + shift).sample
    assert ((actual - wanted).abs().max() / wanted.abs().max()).item() < 1e-5


def test_an_autoencoder_file_with_other_keys_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ae.safetensors"
    save_file(
        {"encoder.down.0.block.0.norm1.weight": torch.ones(128), "encoder.extra.weight": torch.ones(1)}, str(path)
    )
    with pytest.raises(WeightsError, match="not those of the FLUX.1 autoencoder: encoder.extra.weight"):
        load_flux_autoencoder(path)
