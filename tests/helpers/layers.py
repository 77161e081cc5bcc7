"""Shared attention on one layer, built the way the adapter builds it, for the layer tests."""

from typing import Any

import refiners.fluxion.layers as fl
import torch

from style_aligned import ReferenceCache, SharedAttentionAdapter, StyleAlignedOptions


def shared_attention(
    layer: fl.Chain,
    *,
    reference_cache: ReferenceCache | None = None,
    classifier_free_guidance: bool = True,
    **options: Any,
) -> SharedAttentionAdapter:
    """Make a `SharedAttentionAdapter` for the scaled dot-product attention of `layer` (not injected)."""
    return SharedAttentionAdapter(
        layer.ensure_find(fl.ScaledDotProductAttention),
        options=StyleAlignedOptions(**options),
        classifier_free_guidance=classifier_free_guidance,
        reference_cache=reference_cache or ReferenceCache(),
    )


def make_self_attention(seed: int = 0, channels: int = 64, num_heads: int = 4) -> fl.SelfAttention:
    """A seeded random self-attention layer."""
    torch.manual_seed(seed)
    return fl.SelfAttention(embedding_dim=channels, num_heads=num_heads, use_bias=True)


def projections(layer: fl.SelfAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries, keys and values a self-attention layer computes from `x`."""
    q_proj, k_proj, v_proj = layer.layer("Distribute", fl.Distribute)
    return q_proj(x), k_proj(x), v_proj(x)
