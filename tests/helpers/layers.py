"""Shared attention on one layer, built the way the adapter builds it, for the layer tests."""

from typing import Any

import refiners.fluxion.layers as fl

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
