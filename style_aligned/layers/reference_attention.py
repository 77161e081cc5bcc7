"""Attention of the targets over the tokens of several weighted references: concatenated to their own, or swapped.

`concat` is StyleAligned's shared attention (arXiv 2312.02133) generalised to `k` references; `swap` is Visual Style
Prompting's swapping self-attention (arXiv 2402.12974): the target's queries attend to the references' keys and
values only. With one reference in `concat` mode this computes what `ShiftedScaledDotProductAttention` computes.
"""

import math
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from style_aligned.layers.attention import BiasedScaledDotProductAttention
from style_aligned.layers.reference_cache import ReferenceCache

AttentionMode = Literal["concat", "swap"]


def reference_logit_bias(
    num_own: int,
    num_tokens: int,
    mixture_weights: tuple[float, ...],
    *,
    shift: float,
    device: torch.device,
    dtype: torch.dtype,
) -> Float[Tensor, "1 1 1 num_keys"] | None:
    """The float attention mask of a target: 0 on its own tokens, `shift + log p_j` on the tokens of reference `j`.

    Args:
        num_own: The number of the target's own tokens among the keys (0 in swap mode).
        num_tokens: The number of tokens of each reference.
        mixture_weights: The references' weights `p_j`, summing to 1.
        shift: `shared_score_shift`, added to the logits of every reference token.
        device: The device of the mask.
        dtype: The dtype of the mask (that of the queries).

    Returns:
        The mask, broadcast over batch, heads and queries; `None` when it is zero everywhere.
    """
    logits = [shift + math.log(weight) for weight in mixture_weights]
    if all(logit == 0.0 for logit in logits):
        return None
    per_reference = torch.tensor(logits, device=device, dtype=dtype).repeat_interleave(num_tokens)
    return torch.cat([per_reference.new_zeros(num_own), per_reference]).reshape(1, 1, 1, -1)


class ReferenceAttention(BiasedScaledDotProductAttention):
    """Scaled dot-product attention of every target over the tokens of the `k` references of its batch half.

    The references are the first `k` images of each half (or a recording, see `ReferenceCache`); each runs plain
    self-attention over its own tokens, so it is the image the model makes of its prompt. Each target attends:

    - in `concat` mode, to its own tokens followed by the tokens of every reference, whose keys are multiplied by
      `scale` (`shared_score_scale`) and whose logits get `shift + log p_j` added (`shared_score_shift`, and the
      normalised weight `p_j` of reference `j`: a log-weight);
    - in `swap` mode, to the tokens of the references only (their logits get `log p_j`, so one reference is plain
      attention of the target's queries over the reference's keys and values).

    Receives:
        Query (Float[Tensor, "halves images_per_half num_queries embedding_dim"]):
        Key (Float[Tensor, "halves images_per_half num_tokens embedding_dim"]): Each image's own keys.
        Value (Float[Tensor, "halves images_per_half num_tokens embedding_dim"]): Each image's own values.

    Returns:
        (Float[Tensor, "batch num_queries embedding_dim"]): With `batch = halves * images_per_half`.
    """

    def __init__(
        self,
        num_heads: int = 1,
        *,
        mode: AttentionMode = "concat",
        scale: float = 1.0,
        shift: float = 0.0,
        slice_size: int | None = None,
        reference_cache: ReferenceCache,
    ) -> None:
        """Initialize the layer.

        Args:
            num_heads: The number of heads.
            mode: `"concat"` (own and reference tokens) or `"swap"` (reference tokens only).
            scale: The factor on the reference keys given to the targets.
            shift: The constant added to the logits of the reference tokens of targets.
            slice_size: If given, the queries are processed in slices of this size.
            reference_cache: The cache of the adapter that owns this layer (where the references come from).
        """
        super().__init__(num_heads=num_heads, slice_size=slice_size)
        self.mode: AttentionMode = mode
        self.scale = scale
        self.shift = shift
        self.reference_cache = reference_cache

    def forward(
        self,
        query: Float[Tensor, "halves images_per_half num_queries embedding_dim"],
        key: Float[Tensor, "halves images_per_half num_tokens embedding_dim"],
        value: Float[Tensor, "halves images_per_half num_tokens embedding_dim"],
    ) -> Float[Tensor, "batch num_queries embedding_dim"]:
        cache = self.reference_cache
        halves, per_half, num_queries, _ = query.shape
        num_tokens, key_dim = key.shape[-2:]
        recorded = cache.references(self, torch.cat([key, value], dim=-1))  # (halves, k, tokens, key + value dims)
        reference_keys, reference_values = recorded[..., :key_dim], recorded[..., key_dim:]
        first_target = cache.num_references if cache.batch_has_references else 0
        num_targets = per_half - first_target
        output = query.new_empty(halves, per_half, num_queries, value.shape[-1])
        step = self.slice_size or num_queries
        if first_target > 0:  # the references: plain attention over their own tokens
            own = (key[:, :first_target].flatten(0, 1), value[:, :first_target].flatten(0, 1))
            for start in range(0, num_queries, step):
                queries = slice(start, start + step)
                attended = self._attend(query[:, :first_target, queries].flatten(0, 1), *own, bias=None)
                output[:, :first_target, queries] = attended.reshape(halves, first_target, -1, value.shape[-1])
        if num_targets == 0:
            return output.reshape(halves * per_half, num_queries, -1)
        # the tokens of all references of each half, one after the other: (halves, targets, k * tokens, channels)
        shared_keys = reference_keys.flatten(1, 2)[:, None].expand(-1, num_targets, -1, -1)
        shared_values = reference_values.flatten(1, 2)[:, None].expand(-1, num_targets, -1, -1)
        if self.scale != 1.0:
            shared_keys = shared_keys * self.scale
        if self.mode == "concat":
            keys = torch.cat([key[:, first_target:], shared_keys], dim=-2)
            values = torch.cat([value[:, first_target:], shared_values], dim=-2)
        else:
            keys, values = shared_keys, shared_values
        num_own = num_tokens if self.mode == "concat" else 0
        bias = reference_logit_bias(
            num_own, num_tokens, cache.mixture_weights, shift=self.shift, device=query.device, dtype=query.dtype
        )
        keys, values = keys.flatten(0, 1), values.flatten(0, 1)  # (halves * targets, keys, channels)
        for start in range(0, num_queries, step):
            queries = slice(start, start + step)
            attended = self._attend(query[:, first_target:, queries].flatten(0, 1), keys, values, bias=bias)
            output[:, first_target:, queries] = attended.reshape(halves, num_targets, -1, value.shape[-1])
        return output.reshape(halves * per_half, num_queries, -1)
