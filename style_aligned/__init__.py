"""StyleAligned shared attention for Stable Diffusion, as composable Refiners adapters."""

from style_aligned.adapters.group_norm import SharedGroupNormAdapter
from style_aligned.adapters.shared_attention import SharedAttentionAdapter
from style_aligned.adapters.style_aligned_adapter import StyleAlignedAdapter
from style_aligned.adapters.unet_layers import SelfAttentionLayer, self_attention_layers
from style_aligned.layers.adain import AdaIN
from style_aligned.layers.attention import JointScaledDotProductAttention, ShiftedScaledDotProductAttention
from style_aligned.layers.reference_attention import ReferenceAttention
from style_aligned.layers.reference_cache import ReferenceCache
from style_aligned.layers.references import (
    AppendReferences,
    CheckBatchLayout,
    GetReferences,
    ScaleReferences,
    SplitHalves,
)
from style_aligned.options import StyleAlignedOptions

__all__ = [
    "AdaIN",
    "AppendReferences",
    "CheckBatchLayout",
    "GetReferences",
    "JointScaledDotProductAttention",
    "ReferenceAttention",
    "ReferenceCache",
    "ScaleReferences",
    "SelfAttentionLayer",
    "SharedAttentionAdapter",
    "SplitHalves",
    "SharedGroupNormAdapter",
    "ShiftedScaledDotProductAttention",
    "StyleAlignedAdapter",
    "StyleAlignedOptions",
    "self_attention_layers",
]
