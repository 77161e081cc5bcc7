"""StyleAligned shared attention for Stable Diffusion, as composable Refiners adapters."""

from style_aligned.adain import AdaIN
from style_aligned.adapter import StyleAlignedAdapter
from style_aligned.attention import JointScaledDotProductAttention, ShiftedScaledDotProductAttention
from style_aligned.group_norm import SharedGroupNormAdapter
from style_aligned.reference_cache import ReferenceCache
from style_aligned.references import AppendReferences, CheckBatchLayout, GetReferences, ScaleReferences, SplitHalves
from style_aligned.shared_attention import SharedAttentionAdapter
from style_aligned.unet_layers import SelfAttentionLayer, self_attention_layers

__all__ = [
    "AdaIN",
    "AppendReferences",
    "CheckBatchLayout",
    "GetReferences",
    "JointScaledDotProductAttention",
    "ReferenceCache",
    "ScaleReferences",
    "SelfAttentionLayer",
    "SharedAttentionAdapter",
    "SplitHalves",
    "SharedGroupNormAdapter",
    "ShiftedScaledDotProductAttention",
    "StyleAlignedAdapter",
    "self_attention_layers",
]
