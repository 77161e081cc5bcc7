"""StyleAligned and a Refiners LoRA (SDLoraManager) on one random-weight SD1 model, in both orders."""

import pytest
import refiners.fluxion.layers as fl
import torch
from refiners.fluxion.adapters.lora import LoraAdapter
from refiners.foundationals.latent_diffusion import StableDiffusion_1
from refiners.foundationals.latent_diffusion.lora import SDLoraManager

from style_aligned import SharedAttentionAdapter, StyleAlignedAdapter
from tests.helpers import models


def lora_tensors(seed: int = 0, rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA on the q, k, v projections of the first self-attention layer (diffusers/kohya key layout)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for projection in ("to_q", "to_k", "to_v"):
        key = f"unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_{projection}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, 320, generator=generator) * 0.2
        tensors[f"{key}.lora_up.weight"] = torch.randn(320, rank, generator=generator) * 0.2
    return tensors


@pytest.fixture(scope="module")
def sd(sd1_pipeline: StableDiffusion_1) -> StableDiffusion_1:
    return sd1_pipeline


@pytest.fixture(scope="module")
def outputs(sd: StableDiffusion_1) -> dict[str, torch.Tensor]:
    """U-Net outputs with nothing, with StyleAligned alone and with the LoRA alone."""
    inputs = models.unet_inputs(sd.unet, batch_size=4, size=16)
    result = {"inputs": inputs, "plain": models.run_unet(sd.unet, inputs)}
    adapter = StyleAlignedAdapter(sd.unet).inject()
    result["style_aligned"] = models.run_unet(sd.unet, inputs)
    adapter.eject()
    manager = SDLoraManager(sd)
    manager.add_loras("lora", tensors=lora_tensors())
    result["lora"] = models.run_unet(sd.unet, inputs)
    manager.remove_all()
    assert torch.equal(models.run_unet(sd.unet, inputs), result["plain"])
    return result


def lora_in_place(sd: StableDiffusion_1) -> bool:
    adapters = list(sd.unet.layers(LoraAdapter))
    return len(adapters) == 3 and all(isinstance(a.target, fl.Linear) for a in adapters)


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-then-style-aligned", "style-aligned-then-lora"])
def test_ejecting_either_keeps_the_other_working(
    sd: StableDiffusion_1, outputs: dict[str, torch.Tensor], lora_first: bool
) -> None:
    inputs = outputs["inputs"]
    manager = SDLoraManager(sd)
    adapter = StyleAlignedAdapter(sd.unet)
    if lora_first:
        manager.add_loras("lora", tensors=lora_tensors())
        adapter.inject()
    else:
        adapter.inject()
        manager.add_loras("lora", tensors=lora_tensors())
    both = models.run_unet(sd.unet, inputs)
    assert not torch.equal(both, outputs["lora"]) and not torch.equal(both, outputs["style_aligned"])

    adapter.eject()  # the LoRA stays in place and working
    assert lora_in_place(sd) and manager.names == ["lora"]
    assert torch.equal(models.run_unet(sd.unet, inputs), outputs["lora"])

    adapter.inject()
    assert torch.equal(models.run_unet(sd.unet, inputs), both)
    manager.remove_loras("lora")  # StyleAligned stays in place and working
    assert not list(sd.unet.layers(LoraAdapter))
    assert sum(1 for _ in sd.unet.layers(SharedAttentionAdapter)) == 16
    assert torch.equal(models.run_unet(sd.unet, inputs), outputs["style_aligned"])

    adapter.eject()
    assert torch.equal(models.run_unet(sd.unet, inputs), outputs["plain"])
