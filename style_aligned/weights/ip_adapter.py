"""IP-Adapter weights and their CLIP ViT-H image encoder, read in the layouts they are published in.

The public IP-Adapter files (`ip-adapter_sd15.safetensors`, `ip-adapter_sdxl_vit-h.safetensors`, ...) hold
`image_proj.proj.*` and `image_proj.norm.*` (the image projection) and `ip_adapter.N.to_k_ip.weight` /
`ip_adapter.N.to_v_ip.weight`, where N is the position of the cross-attention's processor among all of the U-Net's
attention processors in diffusers' registration order (down blocks, up blocks, then the mid block; self- and
cross-attention alternate, so N is odd). Refiners runs the U-Net's cross-attentions down, mid, up. The image encoder
is published in the transformers layout (`CLIPVisionModelWithProjection`: `vision_model.*`, `visual_projection.*`).
Both are renamed here to Refiners' layout; files already in Refiners' layout are accepted as they are.
"""

import re

from torch import Tensor

from style_aligned.weights.safetensors_io import WeightsError

CROSS_ATTENTIONS: dict[int, tuple[int, int, int]] = {16: (6, 1, 9), 70: (24, 10, 36)}
"""The U-Net's cross-attention layers in the down, mid and up blocks, by their number (SD1: 16, SDXL: 70)."""


def published_index(index: int, count: int) -> int:
    """The `ip_adapter.N` index of a published file for Refiners' cross-attention `index` of `count`."""
    down, mid, up = CROSS_ATTENTIONS[count]
    if index < down:
        position = index
    elif index < down + mid:
        position = down + up + (index - down)
    else:
        position = down + (index - down - mid)
    return 2 * position + 1


def is_published_ip_adapter(weights: dict[str, Tensor]) -> bool:
    return any(key.startswith("image_proj.proj.") for key in weights) or any(
        re.fullmatch(r"ip_adapter\.\d+\.to_k_ip\.weight", key) and not re.fullmatch(r"ip_adapter\.\d{3}\..*", key)
        for key in weights
    )


def ip_adapter_to_refiners(weights: dict[str, Tensor], count: int, origin: str) -> dict[str, Tensor]:
    """Rename a published IP-Adapter's weights to Refiners' layout (a Refiners-layout file is returned as it is).

    Args:
        weights: The file's tensors.
        count: The number of cross-attention layers of the model's U-Net (16 for SD1, 70 for SDXL).
        origin: The file, for messages.

    Raises:
        WeightsError: If the file has the published layout's keys but not for this U-Net, or an image projection
            that is not the plain one (`proj`, `norm`; the "plus" resampler is not supported).
    """
    if not is_published_ip_adapter(weights):
        return weights
    if count not in CROSS_ATTENTIONS:
        raise WeightsError(f"{origin}: an IP-Adapter for a U-Net with {count} cross-attention layers is not supported")
    projection = {"image_proj.proj.": "image_proj.Linear.", "image_proj.norm.": "image_proj.LayerNorm."}
    result: dict[str, Tensor] = {}
    for key, tensor in weights.items():
        if key.startswith("image_proj."):
            prefix = next((p for p in projection if key.startswith(p)), None)
            if prefix is None:
                raise WeightsError(
                    f"{origin}: {key} is not part of the plain IP-Adapter image projection (image_proj.proj,"
                    " image_proj.norm); IP-Adapter plus resamplers are not supported"
                )
            result[projection[prefix] + key.removeprefix(prefix)] = tensor
    indices = {published_index(index, count): index for index in range(count)}
    found = {int(match[1]) for key in weights if (match := re.fullmatch(r"ip_adapter\.(\d+)\.to_k_ip\.weight", key))}
    if found != set(indices):
        raise WeightsError(
            f"{origin} is not an IP-Adapter for a U-Net with {count} cross-attention layers: it has"
            f" {len(found)} ip_adapter.N.to_k_ip layers (N in {min(found, default=0)}..{max(found, default=0)}),"
            f" expected N = 1, 3, ..., {2 * count - 1}"
        )
    for number, index in indices.items():
        for name in ("to_k_ip", "to_v_ip"):
            key = f"ip_adapter.{number}.{name}.weight"
            if key not in weights:
                raise WeightsError(f"{origin} lacks {key}")
            result[f"ip_adapter.{index:03d}.{name}.weight"] = weights[key]
    return result


_LAYER = {
    "layer_norm1": "Residual_1.LayerNorm",
    "self_attn.q_proj": "Residual_1.SelfAttention.Distribute.Linear_1",
    "self_attn.k_proj": "Residual_1.SelfAttention.Distribute.Linear_2",
    "self_attn.v_proj": "Residual_1.SelfAttention.Distribute.Linear_3",
    "self_attn.out_proj": "Residual_1.SelfAttention.Linear",
    "layer_norm2": "Residual_2.LayerNorm",
    "mlp.fc1": "Residual_2.FeedForward.Linear_1",
    "mlp.fc2": "Residual_2.FeedForward.Linear_2",
}
_TOP = {
    "vision_model.embeddings.class_embedding": "ViTEmbeddings.Concatenate.ClassToken.Parameter.weight",
    "vision_model.embeddings.patch_embedding.weight": "ViTEmbeddings.Concatenate.Chain.PatchEncoder.Conv2d.weight",
    "vision_model.embeddings.position_embedding.weight": "ViTEmbeddings.Residual.PositionalEncoder.Embedding.weight",
    "vision_model.pre_layrnorm.weight": "LayerNorm_1.weight",
    "vision_model.pre_layrnorm.bias": "LayerNorm_1.bias",
    "vision_model.post_layernorm.weight": "LayerNorm_2.weight",
    "vision_model.post_layernorm.bias": "LayerNorm_2.bias",
    "visual_projection.weight": "Linear.weight",
}


def image_encoder_key(key: str) -> str | None:
    """The Refiners `CLIPImageEncoder` key of a transformers `CLIPVisionModelWithProjection` key (None: unused)."""
    if key in _TOP:
        return _TOP[key]
    if match := re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
        layer, module, tail = int(match[1]), match[2], match[3]
        if module in _LAYER:
            return f"Chain.TransformerLayer_{layer + 1}.{_LAYER[module]}.{tail}"
    if key.endswith("position_ids"):
        return None
    raise WeightsError(f"{key} is not a key of a transformers CLIP vision model with projection")


def image_encoder_to_refiners(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a CLIP image encoder in the transformers layout to Refiners' (a Refiners-layout one is returned as is).

    Raises:
        WeightsError: If a key is not one of a transformers `CLIPVisionModelWithProjection`.
    """
    if not any(key.startswith("vision_model.") for key in weights):
        return weights
    result: dict[str, Tensor] = {}
    for key, tensor in weights.items():
        if (target := image_encoder_key(key)) is not None:
            result[target] = tensor.reshape(1, -1) if key.endswith("class_embedding") else tensor
    return result
