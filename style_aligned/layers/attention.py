"""Attention kernels for shared attention: own and reference tokens merged by log-sum-exp, and joint attention."""

import math
from typing import Any, cast

import refiners.fluxion.layers as fl
import torch
from jaxtyping import Float
from torch import Tensor

from style_aligned.layers.batch_layout import images_per_half
from style_aligned.layers.reference_cache import ReferenceCache
from style_aligned.layers.strength import check_strength, reference_logit_shift

References = tuple[Tensor, Tensor]
"""The reference keys and values given to the targets of each half, `(halves, tokens, embedding_dim)` each."""


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
    """Attention of every image over its own tokens and the reference tokens it is given, merged by log-sum-exp.

    The shared attention kernel. For a target image, `softmax([Q K^T, Q K_ref^T] / sqrt(d) + [0, b]) [V; V_ref]`
    (SPEC section 1: `K_ref` the reference keys it is given, already scaled by `ScaleReferences`; shift `b` on their
    logits) is computed as two attentions merged exactly: the output `O_own` over its own tokens with log-sum-exp
    `L_own`, and `O_ref` over the reference's tokens with `L_ref`; then `O = O_own + sigmoid(L_ref + b - L_own)
    (O_ref - O_own)`. No float mask is passed and no keys or values are concatenated. The targets of a half are given
    the same reference tokens (`GetReferences`), so each target attends to one copy of the reference's keys and
    values, and only one target's attention over them is held at a time, beside the output.

    A reference image's appended tokens duplicate its own, which leaves its output unchanged for any scale and
    shift: its output is the attention over its own tokens, and the reference tokens it is given are not read. When
    the reference cache replays recorded references, every image is a target.

    At a style strength `s` below 1 (see `style_aligned.layers.strength`), the reference tokens' logits gain `log s`
    on top of the shift; at 0 the reference tokens get no weight and are not attended to at all: every image's
    output is its plain self-attention output.

    Receives:
        Query (Float[Tensor, "halves images_per_half num_queries embedding_dim"]):
        Key (Float[Tensor, "halves images_per_half num_tokens embedding_dim"]):
        Value (Float[Tensor, "halves images_per_half num_tokens embedding_dim"]):
        Reference key (Float[Tensor, "halves images_per_half num_tokens embedding_dim"]): The reference keys each
            image is given (the same for every target of a half).
        Reference value (Float[Tensor, "halves images_per_half num_tokens embedding_dim"]): The reference values
            each image is given.

    Returns:
        (Float[Tensor, "batch num_queries embedding_dim"]): With `batch = halves * images_per_half`.
    """

    def __init__(
        self,
        num_heads: int = 1,
        *,
        shift: float = 0.0,
        strength: float = 1.0,
        slice_size: int | None = None,
        reference_cache: ReferenceCache,
    ) -> None:
        """Initialize the layer.

        Args:
            num_heads: The number of heads.
            shift: The constant added to the logits of the reference tokens of targets (`shared_score_shift`).
            strength: The style strength, in [0, 1]: `log strength` is added to those logits too.
            slice_size: If given, the queries are processed in slices of this size.
            reference_cache: Tells whether the batch holds the references.

        Raises:
            ValueError: If the strength is not in [0, 1].
        """
        super().__init__()
        self.num_heads = num_heads
        self.slice_size = slice_size
        self.shift = shift
        self.strength = check_strength(strength)
        self.reference_cache = reference_cache

    @property
    def reference_shift(self) -> float:
        """What is added to the logits of the reference tokens given to the targets: `shift + log strength`."""
        return reference_logit_shift(self.shift, self.strength)

    @property
    def first_target(self) -> int:
        """Where the targets start in each half: after the references, or at 0 when the references are replayed."""
        cache = self.reference_cache
        return cache.num_references if cache.batch_has_references else 0

    def forward(
        self,
        query: Float[Tensor, "halves images_per_half num_queries embedding_dim"],
        key: Float[Tensor, "halves images_per_half num_tokens embedding_dim"],
        value: Float[Tensor, "halves images_per_half num_tokens embedding_dim"],
        reference_key: Float[Tensor, "halves images_per_half num_tokens embedding_dim"],
        reference_value: Float[Tensor, "halves images_per_half num_tokens embedding_dim"],
    ) -> Float[Tensor, "batch num_queries embedding_dim"]:
        halves, per_half, num_queries, _ = query.shape
        first = self.first_target
        # the reference tokens given to the targets of each half: one copy per half, (halves, tokens, embedding_dim);
        # none without targets, or at strength 0 (the targets attend to their own tokens only)
        attends = per_half > first and self.strength > 0.0
        shared = (reference_key[:, first], reference_value[:, first]) if attends else None
        step = self.slice_size or num_queries
        if step >= num_queries:
            return self._attend(query, key, value, shared).reshape(halves * per_half, num_queries, -1)
        output = query.new_empty(halves, per_half, num_queries, value.shape[-1])
        for start in range(0, num_queries, step):
            queries = slice(start, start + step)
            output[:, :, queries] = self._attend(query[:, :, queries], key, value, shared)
        return output.reshape(halves * per_half, num_queries, -1)

    def _heads(self, x: Tensor) -> Tensor:
        """`(..., tokens, heads * head_dim)` -> `(..., heads, tokens, head_dim)`, a view."""
        return x.reshape(*x.shape[:-1], self.num_heads, -1).transpose(-2, -3)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, shared: References | None) -> Tensor:
        """The output of every image for these queries, `(halves, images_per_half, num_queries, embedding_dim)`.

        `query`, `key`, `value`: `(halves, images_per_half, tokens, embedding_dim)`; `shared`: the reference keys
        and values given to the targets, `(halves, tokens, embedding_dim)` each, or `None` (no target attends to
        them).
        """
        halves, per_half, num_queries, channels = query.shape
        first = self.first_target
        scale = 1 / math.sqrt(channels // self.num_heads)
        # every image over its own tokens (the references' whole output)
        own, own_lse = attention_with_lse(
            self._heads(query.flatten(0, 1)),
            self._heads(key.flatten(0, 1)),
            self._heads(value.flatten(0, 1)),
            scale=scale,
        )  # (batch, heads, num_queries, head_dim), (batch, heads, num_queries)
        if shared is not None:
            self._merge_reference(
                own.view(halves, per_half, self.num_heads, num_queries, -1)[:, first:],
                own_lse.view(halves, per_half, self.num_heads, num_queries)[:, first:],
                query[:, first:],
                shared,
                scale=scale,
            )
        return own.transpose(1, 2).reshape(halves, per_half, num_queries, channels)

    def _merge_reference(
        self, own: Tensor, own_lse: Tensor, query: Tensor, shared: References, *, scale: float
    ) -> None:
        """Merge into `own` (in place) the targets' attention over their reference tokens, one target at a time.

        `own`: `(halves, targets, heads, num_queries, head_dim)`, `own_lse`: `(halves, targets, heads, num_queries)`,
        `query`: `(halves, targets, num_queries, embedding_dim)`; `shared`: the reference keys and values,
        `(halves, num_tokens, embedding_dim)` each, read by every target without a copy. Only one target's attention
        over the reference is held at a time.
        """
        keys, values = self._heads(shared[0]), self._heads(shared[1])  # (halves, heads, num_tokens, head_dim)
        shift = self.reference_shift
        for target in range(own.shape[1]):
            reference, reference_lse = attention_with_lse(
                self._heads(query[:, target]), keys, values, scale=scale
            )  # (halves, heads, num_queries, head_dim), (halves, heads, num_queries)
            weight = reference_lse.add_(shift).sub_(own_lse[:, target]).sigmoid_().to(own.dtype)
            own[:, target].lerp_(reference, weight[..., None])  # in place: own + weight * (reference - own)
            del reference, reference_lse, weight  # freed before the next target's attention is allocated


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
