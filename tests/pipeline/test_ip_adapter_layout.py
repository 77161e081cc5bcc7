"""IP-Adapter files and their CLIP image encoder in the layouts they are published in; diffusers is the oracle."""

import gc
from pathlib import Path
from typing import Any

import pytest
import torch
from refiners.foundationals.clip.image_encoder import CLIPImageEncoder, CLIPImageEncoderH
from refiners.foundationals.latent_diffusion import SD1IPAdapter, StableDiffusion_1
from safetensors.torch import save_file

from style_aligned.pipeline.composition import _load_ip_adapter  # pyright: ignore[reportPrivateUsage]
from style_aligned.weights.ip_adapter import image_encoder_to_refiners, ip_adapter_to_refiners
from style_aligned.weights.safetensors_io import read_tensors
from tests.helpers.compare import assert_close


def test_image_encoder_in_the_transformers_layout_matches_transformers() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # type: ignore[import-untyped]

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
        image_size=224, projection_dim=32, hidden_act="gelu",
    )  # fmt: skip
    source = CLIPVisionModelWithProjection(config).eval()
    encoder = CLIPImageEncoder(
        embedding_dim=64, output_dim=32, patch_size=14, num_layers=2, num_attention_heads=4, feedforward_dim=128
    )
    encoder.load_state_dict(image_encoder_to_refiners(source.state_dict()), strict=True)
    image = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_close(encoder(image), source(pixel_values=image).image_embeds)


def test_published_ip_adapter_of_the_wrong_size_is_refused() -> None:
    weights = {"image_proj.proj.weight": torch.zeros(3072, 1024), "ip_adapter.1.to_k_ip.weight": torch.zeros(320, 768)}
    with pytest.raises(ValueError, match="expected N = 1, 3, ..., 31"):
        ip_adapter_to_refiners(weights, 16, "ip-adapter.safetensors")
    weights = {"image_proj.latents": torch.zeros(1, 16, 768), "ip_adapter.1.to_k_ip.weight": torch.zeros(320, 768)}
    with pytest.raises(ValueError, match="plus resamplers are not supported"):
        ip_adapter_to_refiners(weights, 16, "ip-adapter-plus.safetensors")


def published_sd1_ip_adapter(unet: Any, path: Path) -> None:
    """A random SD1 IP-Adapter in the layout of `ip-adapter_sd15.safetensors`: one `ip_adapter.N` per attention
    processor of diffusers' U-Net that is a cross-attention (N counts all processors)."""
    generator = torch.Generator().manual_seed(3)
    tensors = {
        "image_proj.proj.weight": torch.randn(3072, 1024, generator=generator) / 32,
        "image_proj.proj.bias": torch.randn(3072, generator=generator) / 32,
        "image_proj.norm.weight": 1 + torch.randn(768, generator=generator) / 8,
        "image_proj.norm.bias": torch.randn(768, generator=generator) / 8,
    }
    for number, (name, _) in enumerate(unet.attn_processors.items()):
        if name.endswith("attn2.processor"):
            module = unet.get_submodule(name.removesuffix(".processor"))
            hidden = module.to_k.weight.shape[0]
            for projection in ("to_k_ip", "to_v_ip"):
                tensors[f"ip_adapter.{number}.{projection}.weight"] = torch.randn(hidden, 768, generator=generator) / 8
    save_file(tensors, str(path))


def test_published_sd1_ip_adapter_matches_diffusers(
    sd1_source: dict[str, Any], sd1_pipeline: StableDiffusion_1, tmp_path: Path
) -> None:
    from diffusers import UNet2DConditionModel  # type: ignore[import-untyped]
    from diffusers.loaders import IPAdapterMixin  # type: ignore[import-untyped]

    inputs = sd1_source["inputs"]
    image_embedding = torch.randn(2, 1024, generator=torch.Generator().manual_seed(4))
    unet = UNet2DConditionModel.from_pretrained(sd1_source["pipeline"] / "unet").eval()
    path = tmp_path / "ip-adapter_sd15.safetensors"
    published_sd1_ip_adapter(unet, path)

    class Host(IPAdapterMixin):  # the part of a diffusers pipeline that reads IP-Adapter files
        def __init__(self, unet: Any) -> None:
            self.unet, self.image_encoder, self.feature_extractor = unet, object(), object()

    Host(unet).load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    with torch.no_grad():
        added = {"image_embeds": [image_embedding[:, None]]}
        expected = unet(inputs["x"], inputs["timestep"], inputs["embedding"], added_cond_kwargs=added).sample
    del unet
    gc.collect()

    sd_unet = sd1_pipeline.unet
    with torch.device("meta"):
        encoder = CLIPImageEncoderH()  # never run: the image embedding is given
    adapter = SD1IPAdapter(sd_unet, clip_image_encoder=encoder)
    weights = ip_adapter_to_refiners(read_tensors(path), len(adapter.sub_adapters), str(path))
    _load_ip_adapter(adapter, weights, path)
    adapter.inject()
    try:
        with torch.no_grad():
            adapter.set_clip_image_embedding(adapter.image_proj(image_embedding))
            sd_unet.set_timestep(inputs["timestep"])
            sd_unet.set_clip_text_embedding(inputs["embedding"])
            assert_close(sd_unet(inputs["x"]), expected)
    finally:
        adapter.eject()
