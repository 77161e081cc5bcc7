"""An independent implementation of AlignedGen's shared attention on FLUX.1 (SPEC section 9), written as its reference
code is: heads split first, AdaIN on the image tokens, diffusers' rotary embedding, the reference's image keys and
values concatenated to every row's, and a dense float mask (-inf for row 0, the score shift for the others).

It runs inside the Refiners FLUX.1 transformer: `aligned_gen` swaps the rotary embedding and the kernel of the shared
attention layers for `AlignedGenAttention` during a call. One reference (row 0), no classifier-free guidance.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import refiners.fluxion.layers as fl
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb  # type: ignore[import-untyped]
from diffusers.models.transformers.transformer_flux import FluxPosEmbed  # type: ignore[import-untyped]
from torch import Tensor

from style_aligned.flux import FluxTransformer
from style_aligned.flux.transformer import JointAttention, RotaryQueryKey, SingleStreamAttention


@dataclass(frozen=True)
class AlignedGenSettings:
    """What AlignedGen's processor is given: lambda (`style_lambda`, or its decrease mode), the layers it shares
    (indices of the 57 attention layers, double-stream first), whether the reference's positions are shifted, and the
    options this project adds (score shift, AdaIN on values, swap)."""

    shared: tuple[int, ...]
    style_lambda: float = 1.1
    decrease: bool = False
    shifted: bool = True
    shift: float = 0.0
    adain_values: bool = False
    swap: bool = False


def adain(feat: Tensor, eps: float = 1e-5) -> Tensor:
    """Every row's statistics over tokens (dim -2) mapped onto row 0's, as AlignedGen's `adain`."""
    mean = feat.mean(dim=-2, keepdim=True)
    std = (feat.var(dim=-2, keepdim=True) + eps).sqrt()
    return (feat - mean) / std * std[:1] + mean[:1]


class AlignedGenAttention(fl.Module):
    """AlignedGen's `ShareAttnFluxAttnProcessor2_0` after the projections and norms: queries, keys and values of the
    `[text | image]` tokens, before the rotary embedding, in; attention output out."""

    def __init__(
        self,
        heads: int,
        text_tokens: int,
        ids: Tensor,
        reference_ids: Tensor,
        scale: float,
        settings: AlignedGenSettings,
    ) -> None:
        super().__init__()
        self.heads, self.text_tokens, self.scale, self.settings = heads, text_tokens, scale, settings
        self.ids, self.reference_ids = ids, reference_ids

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        batch, tokens, channels = query.shape
        head_dim = channels // self.heads
        q, k, v = (x.view(batch, tokens, self.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        n = self.text_tokens
        if not self.settings.swap:
            q = torch.cat([q[:, :, :n], adain(q[:, :, n:])], dim=2)
            k = torch.cat([k[:, :, :n], adain(k[:, :, n:])], dim=2)
            if self.settings.adain_values:
                v = torch.cat([v[:, :, :n], adain(v[:, :, n:])], dim=2)
        axes = _axes(head_dim)
        style_key = apply_rotary_emb(k[:, :, n:], FluxPosEmbed(theta=10000, axes_dim=axes)(self.reference_ids))
        style_value = v[:, :, n:]
        rotary = FluxPosEmbed(theta=10000, axes_dim=axes)(self.ids)
        q, k = apply_rotary_emb(q, rotary), apply_rotary_emb(k, rotary)
        # concat_first_block: row 0's image keys, scaled for the other rows, and its image values, after every row's
        scaled = torch.cat([style_key[:1], (self.scale * style_key[0]).unsqueeze(0).repeat(batch - 1, 1, 1, 1)])
        k = torch.cat([k, scaled], dim=2)
        v = torch.cat([v, style_value[:1].repeat(batch, 1, 1, 1)], dim=2)
        mask = torch.zeros(batch, self.heads, tokens, k.shape[2], dtype=q.dtype)
        mask[0, :, :, tokens:] = -math.inf  # constrain_first
        mask[1:, :, :, tokens:] = self.settings.shift
        if self.settings.swap:
            mask[1:, :, :, n:tokens] = -math.inf  # the targets' own image tokens swapped for the reference's
        output = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return output.transpose(1, 2).reshape(batch, tokens, channels)


def _axes(head_dim: int) -> list[int]:
    return [16, 56, 56] if head_dim == 128 else [4, 6, 6]


class Unrotated(fl.Module):
    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return query, key, value


def shifted_ids(image_ids: Tensor) -> Tensor:
    """The reference's image ids moved right by the width of the image in tokens (ShiftPE)."""
    shifted = image_ids.clone()
    shifted[:, 2] += image_ids[:, 2].max() + 1
    return shifted


@contextmanager
def aligned_gen(
    model: FluxTransformer, settings: AlignedGenSettings, *, text_ids: Tensor, image_ids: Tensor, timestep: float
) -> Iterator[None]:
    """Within this block, the shared layers of `model` run `AlignedGenAttention` at this timestep (in [0, 1000])."""
    layers = [*model.layers(JointAttention, recurse=True), *model.layers(SingleStreamAttention, recurse=True)]
    scale = (timestep / 1000) ** 2 if settings.decrease else settings.style_lambda
    ids = torch.cat([text_ids, image_ids])
    reference_ids = shifted_ids(image_ids) if settings.shifted else image_ids
    swapped: list[tuple[fl.Chain, fl.Module, fl.Module, fl.Module, fl.Module]] = []
    for index in settings.shared:
        layer = layers[index]
        rotary = layer.ensure_find(RotaryQueryKey)
        kernel = layer.ensure_find(fl.ScaledDotProductAttention)
        heads = kernel.num_heads
        replacement = AlignedGenAttention(heads, len(text_ids), ids, reference_ids, scale, settings)
        unrotated = Unrotated()
        layer.replace(rotary, unrotated)
        layer.replace(kernel, replacement)
        swapped.append((layer, rotary, unrotated, kernel, replacement))
    try:
        yield
    finally:
        for layer, rotary, unrotated, kernel, replacement in swapped:
            layer.replace(unrotated, rotary)
            layer.replace(replacement, kernel)
