"""Attention kernels for shared attention: own and reference tokens merged by log-sum-exp, and joint attention."""

import math
from typing import Any, cast

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
    *,
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


def attention_with_lse(
    query: Float[Tensor, "batch heads num_queries head_dim"],
    key: Float[Tensor, "batch heads num_keys head_dim"],
    value: Float[Tensor, "batch heads num_keys head_dim"],
    *,
    scale: float,
) -> tuple[Float[Tensor, "batch heads num_queries head_dim"], Float[Tensor, "batch heads num_queries"]]:
    """Scaled dot-product attention and the log-sum-exp of its logits, by a fused kernel where torch has one.

    `softmax(scale * Q K^T) V` and `logsumexp(scale * Q K^T)` over the keys, without materialising the logits: on
    CPU by torch's flash attention for CPU, on CUDA by its flash kernel (16-bit) or memory-efficient kernel (32-bit).
    Elsewhere the logits are computed explicitly.

    Args:
        query: The queries (any strides: a `(batch, tokens, heads, head_dim)` layout seen transposed is kept).
        key: The keys.
        value: The values.
        scale: The factor on the logits.

    Returns:
        The attention output (laid out as the queries on CPU) and the log-sum-exp of each query's logits
        (float32 on CPU and CUDA).
    """
    aten: Any = torch.ops.aten
    if query.device.type == "cpu":
        output, lse = cast(
            tuple[Tensor, Tensor], aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, scale=scale)[:2]
        )
        return output, lse
    if query.device.type == "cuda":
        if query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] % 8 == 0 and query.shape[-1] <= 256:
            flash = cast(tuple[Tensor, ...], aten._scaled_dot_product_flash_attention(query, key, value, scale=scale))
            return flash[0], flash[1]
        efficient = cast(
            tuple[Tensor, ...],
            aten._scaled_dot_product_efficient_attention(query, key, value, None, compute_log_sumexp=True, scale=scale),
        )
        return efficient[0], efficient[1][..., : query.shape[-2]]
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    lse = logits.logsumexp(dim=-1)
    output = torch.matmul((logits - lse[..., None]).exp(), value.float()).to(query.dtype)
    return output, lse


class SharedScaledDotProductAttention(fl.Module):
    """Attention of every image over its own tokens and its half's reference tokens, merged by log-sum-exp.

    For a target image, `softmax([Q K^T, s Q K_ref^T] / sqrt(d) + [0, b]) [V; V_ref]` (SPEC section 1: scale `s` on
    the reference keys, shift `b` on their logits) is computed as two attentions merged exactly: the output `O_own`
    over its own tokens with log-sum-exp `L_own`, and `O_ref` over the reference's tokens (the factor `s` folded into
    the kernel's scale) with `L_ref`; then `O = O_own + sigmoid(L_ref + b - L_own) (O_ref - O_own)`. No float mask is
    passed and the appended keys and values are never concatenated. The targets of a half attend to their reference
    as one long query sequence against its keys and values, which are never copied per target.

    A reference image's appended tokens duplicate its own, which leaves its output unchanged for any scale and
    shift: its output is the attention over its own tokens. When the reference cache replays recorded references,
    every image is a target.

    Receives:
        Query (Float[Tensor, "halves images_per_half num_queries embedding_dim"]):
        Key (Float[Tensor, "halves images_per_half num_tokens embedding_dim"]):
        Value (Float[Tensor, "halves images_per_half num_tokens embedding_dim"]):
        Reference key (Float[Tensor, "halves 1 num_tokens embedding_dim"]): The reference's keys of each half.
        Reference value (Float[Tensor, "halves 1 num_tokens embedding_dim"]): The reference's values of each half.

    Returns:
        (Float[Tensor, "batch num_queries embedding_dim"]): With `batch = halves * images_per_half`.
    """

    def __init__(
        self,
        num_heads: int = 1,
        *,
        scale: float = 1.0,
        shift: float = 0.0,
        slice_size: int | None = None,
        reference_cache: ReferenceCache,
    ) -> None:
        """Initialize the layer.

        Args:
            num_heads: The number of heads.
            scale: The factor on the reference keys given to the targets (`shared_score_scale`).
            shift: The constant added to the logits of the reference tokens of targets (`shared_score_shift`).
            slice_size: If given, the queries are processed in slices of this size.
            reference_cache: Tells whether the batch holds the references.
        """
        super().__init__()
        self.num_heads = num_heads
        self.slice_size = slice_size
        self.scale = scale
        self.shift = shift
        self.reference_cache = reference_cache

    def forward(
        self,
        query: Float[Tensor, "halves images_per_half num_queries embedding_dim"],
        key: Float[Tensor, "halves images_per_half num_tokens embedding_dim"],
        value: Float[Tensor, "halves images_per_half num_tokens embedding_dim"],
        reference_key: Float[Tensor, "halves 1 num_tokens embedding_dim"],
        reference_value: Float[Tensor, "halves 1 num_tokens embedding_dim"],
    ) -> Float[Tensor, "batch num_queries embedding_dim"]:
        halves, per_half, num_queries, _ = query.shape
        first_target = 1 if self.reference_cache.batch_has_references else 0
        step = self.slice_size or num_queries
        if step >= num_queries:
            output = self._attend(query, key, value, reference_key, reference_value, first_target)
            return output.reshape(halves * per_half, num_queries, -1)
        output = query.new_empty(halves, per_half, num_queries, value.shape[-1])
        for start in range(0, num_queries, step):
            queries = slice(start, start + step)
            output[:, :, queries] = self._attend(
                query[:, :, queries], key, value, reference_key, reference_value, first_target
            )
        return output.reshape(halves * per_half, num_queries, -1)

    def _heads(self, x: Tensor) -> Tensor:
        """`(..., tokens, heads * head_dim)` -> `(..., heads, tokens, head_dim)`, a view."""
        return x.reshape(*x.shape[:-1], self.num_heads, -1).transpose(-2, -3)

    def _attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        reference_key: Tensor,
        reference_value: Tensor,
        first_target: int,
    ) -> Tensor:
        """The output of every image for these queries, `(halves, images_per_half, num_queries, embedding_dim)`."""
        halves, per_half, num_queries, channels = query.shape
        head_dim = channels // self.num_heads
        # every image over its own tokens (the references' whole output)
        own, own_lse = attention_with_lse(
            self._heads(query.flatten(0, 1)),
            self._heads(key.flatten(0, 1)),
            self._heads(value.flatten(0, 1)),
            scale=1 / math.sqrt(head_dim),
        )  # (batch, heads, num_queries, head_dim), (batch, heads, num_queries)
        targets = per_half - first_target
        if targets > 0:
            # the targets of each half as one query sequence over the reference's tokens
            target_queries = query[:, first_target:].reshape(halves, targets * num_queries, channels)
            shared, shared_lse = attention_with_lse(
                self._heads(target_queries),
                self._heads(reference_key[:, 0]),
                self._heads(reference_value[:, 0]),
                scale=self.scale / math.sqrt(head_dim),
            )  # (halves, heads, targets * num_queries, head_dim), (halves, heads, targets * num_queries)
            heads = self.num_heads
            own_targets = own.view(halves, per_half, heads, num_queries, -1)[:, first_target:]  # (h, t, heads, q, d)
            own_targets_lse = own_lse.view(halves, per_half, heads, num_queries)[:, first_target:]
            shared = shared.view(halves, heads, targets, num_queries, -1).transpose(1, 2)  # (h, t, heads, q, d)
            shared_lse = shared_lse.view(halves, heads, targets, num_queries).transpose(1, 2)
            weight = torch.sigmoid(shared_lse + self.shift - own_targets_lse).to(own.dtype)
            own_targets.lerp_(shared, weight[..., None])  # in place: own + weight * (shared - own)
        return own.transpose(1, 2).reshape(halves, per_half, num_queries, channels)


class BiasedScaledDotProductAttention(fl.ScaledDotProductAttention):
    """Scaled dot-product attention whose subclasses attend over chosen keys with an optional float bias on the logits.

    The bias (an attention mask broadcast over batch, heads and queries) goes to the fused kernel; the logits are
    never materialised.
    """

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


class ShiftedScaledDotProductAttention(BiasedScaledDotProductAttention):
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
