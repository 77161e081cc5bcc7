"""Attention kernels for shared attention: a logit shift on the appended reference tokens, and joint attention."""

import refiners.fluxion.layers as fl
import torch
from jaxtyping import Float
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention

from style_aligned.layers.batch_layout import images_per_half
from style_aligned.layers.reference_cache import ReferenceCache


def reference_score_bias(
    num_keys: int,
    shift: float,
    device: torch.device,
    dtype: torch.dtype,
) -> Float[Tensor, "1 1 1 num_keys"]:
    """Build the float attention mask that adds `shift` to the logits of the appended reference tokens.

    Args:
        num_keys: The number of keys: the image's own tokens followed by as many appended reference tokens.
        shift: The constant added to the logits of the appended tokens.
        device: The device of the mask.
        dtype: The dtype of the mask (that of the queries).

    Returns:
        A mask broadcast over batch, heads and queries by `scaled_dot_product_attention`.
    """
    bias = torch.zeros(1, 1, 1, num_keys, device=device, dtype=dtype)
    bias[..., num_keys // 2 :] = shift
    return bias


class ShiftedScaledDotProductAttention(fl.ScaledDotProductAttention):
    """Scaled dot-product attention over each image's own tokens and the appended tokens of its reference.

    The keys and values hold each image's own tokens followed by as many appended reference tokens (see
    `AppendReferences`). For target images, `shift` is added to the attention logits of the appended tokens before
    the softmax (`shared_score_shift`; `log 2` weighs them as if appended twice). The shift is given to the fused
    `scaled_dot_product_attention` kernel as a float attention mask broadcast over batch, heads and queries, so the
    logits are never materialised; with `shift == 0` no mask is passed at all.

    A reference image's appended tokens duplicate its own, which leaves its output unchanged for any shift: its
    attention runs over its own tokens only, which is exact and half the work. When the reference cache replays
    recorded references, every image is a target.

    Receives:
        Query (Float[Tensor, "halves images_per_half num_queries embedding_dim"]):
        Key (Float[Tensor, "halves images_per_half 2*num_tokens embedding_dim"]): Own tokens, then the reference's.
        Value (Float[Tensor, "halves images_per_half 2*num_tokens embedding_dim"]): Own tokens, then the reference's.

    Returns:
        (Float[Tensor, "batch num_queries embedding_dim"]): With `batch = halves * images_per_half`.
    """

    def __init__(
        self,
        num_heads: int = 1,
        shift: float = 0.0,
        slice_size: int | None = None,
        *,
        reference_cache: ReferenceCache,
    ) -> None:
        """Initialize the layer.

        Args:
            num_heads: The number of heads.
            shift: The constant added to the logits of the appended reference tokens of target images.
            slice_size: If given, the queries are processed in slices of this size.
            reference_cache: The cache of the adapter that owns this layer (where the references come from).
        """
        super().__init__(num_heads=num_heads, slice_size=slice_size)
        self.shift = shift
        self.reference_cache = reference_cache

    def forward(
        self,
        query: Float[Tensor, "halves images_per_half num_queries embedding_dim"],
        key: Float[Tensor, "halves images_per_half num_keys embedding_dim"],
        value: Float[Tensor, "halves images_per_half num_keys embedding_dim"],
    ) -> Float[Tensor, "batch num_queries embedding_dim"]:
        halves, per_half, num_queries, _ = query.shape
        output = query.new_empty(halves, per_half, num_queries, value.shape[-1])
        step = self.slice_size or num_queries
        for start in range(0, num_queries, step):
            queries = slice(start, start + step)
            self._attend_by_half(query[:, :, queries], key, value, output[:, :, queries])
        return output.reshape(halves * per_half, num_queries, -1)

    def _attend_by_half(self, query: Tensor, key: Tensor, value: Tensor, output: Tensor) -> None:
        """Write into `output` (by half) the attention of every image; see the class docstring."""
        bias = (
            None
            if self.shift == 0.0
            else reference_score_bias(key.shape[-2], self.shift, device=query.device, dtype=query.dtype)
        )
        if not self.reference_cache.batch_has_references:  # every image is a target
            attended = self._attend(query.flatten(0, 1), key.flatten(0, 1), value.flatten(0, 1), bias)
            output.copy_(attended.reshape(output.shape))
            return
        num_tokens = key.shape[-2] // 2
        # references: plain attention over their own tokens
        output[:, 0] = self._attend(query[:, 0], key[:, 0, :num_tokens], value[:, 0, :num_tokens], bias=None)
        for half in range(output.shape[0] if output.shape[1] > 1 else 0):
            output[half, 1:] = self._attend(query[half, 1:], key[half, 1:], value[half, 1:], bias=bias)

    def _attend(
        self,
        query: Float[Tensor, "batch num_queries embedding_dim"],
        key: Float[Tensor, "batch num_keys embedding_dim"],
        value: Float[Tensor, "batch num_keys embedding_dim"],
        bias: Float[Tensor, "1 1 1 num_keys"] | None,
    ) -> Float[Tensor, "batch num_queries embedding_dim"]:
        output = scaled_dot_product_attention(
            self._split_to_multi_head(query),
            self._split_to_multi_head(key),
            self._split_to_multi_head(value),
            attn_mask=bias,
        )  # (batch, heads, num_queries, head_dim)
        return self._merge_multi_head(output)


class JointScaledDotProductAttention(fl.ScaledDotProductAttention):
    """Attention of every image of a batch half over the tokens of all images of that half.

    This is the `full_attention_share` variant: the tokens of each half are merged into one sequence, so every image
    attends to every image of its half, the reference included, and no AdaIN is applied.

    Receives:
        Query (Float[Tensor, "batch tokens embedding_dim"]):
        Key (Float[Tensor, "batch tokens embedding_dim"]):
        Value (Float[Tensor, "batch tokens embedding_dim"]):

    Returns:
        (Float[Tensor, "batch tokens embedding_dim"]):
    """

    def __init__(
        self,
        num_heads: int = 1,
        classifier_free_guidance: bool = True,
        slice_size: int | None = None,
        *,
        reference_cache: ReferenceCache,
    ) -> None:
        """Initialize the layer.

        Args:
            num_heads: The number of heads.
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
            slice_size: If given, the queries are processed in slices of this size.
            reference_cache: The cache of the adapter that owns this layer (where the references come from).
        """
        super().__init__(num_heads=num_heads, slice_size=slice_size)
        self.classifier_free_guidance = classifier_free_guidance
        self.reference_cache = reference_cache

    def forward(
        self,
        query: Float[Tensor, "batch tokens embedding_dim"],
        key: Float[Tensor, "batch tokens embedding_dim"],
        value: Float[Tensor, "batch tokens embedding_dim"],
    ) -> Float[Tensor, "batch tokens embedding_dim"]:
        if self.reference_cache.mode != "batch":
            raise RuntimeError("full_attention_share needs the whole set in one batch, without the reference cache")
        batch_size, num_tokens, _ = query.shape
        halves = batch_size // images_per_half(batch_size, self.classifier_free_guidance)
        output = super().forward(
            query.reshape(halves, -1, query.shape[-1]),
            key.reshape(halves, -1, key.shape[-1]),
            value.reshape(halves, -1, value.shape[-1]),
        )  # (halves, images_per_half * tokens, embedding_dim)
        return output.reshape(batch_size, num_tokens, -1)
