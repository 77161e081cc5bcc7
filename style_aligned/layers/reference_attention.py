"""Attention of the targets over the tokens of several weighted references: concatenated to their own, or swapped.

`concat` is StyleAligned's shared attention (arXiv 2312.02133) generalised to `k` references; `swap` is Visual Style
Prompting's swapping self-attention (arXiv 2402.12974): the target's queries attend to the references' keys and
values only. With one reference in `concat` mode this computes what `SharedScaledDotProductAttention` computes.
"""

import math
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention

from style_aligned.layers.attention import References, SharedScaledDotProductAttention
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


class ReferenceAttention(SharedScaledDotProductAttention):
    """Scaled dot-product attention of every target over the tokens of the `k` references of its batch half.

    The shared attention kernel generalised to several references and to swap mode: it takes the place of
    `SharedScaledDotProductAttention` after the same layers and receives the same inputs. The references are the
    first `k` images of each half (or a recording, see `ReferenceCache`); each runs plain self-attention over its own
    tokens, so it is the image the model makes of its prompt. Each target attends:

    - in `concat` mode, to its own tokens followed by the reference tokens it is given (`GetReferences`: the tokens
      of every reference, keys already scaled by `ScaleReferences`), whose logits get `shift + log p_j` added
      (`shared_score_shift`, and the normalised weight `p_j` of reference `j`: a log-weight);
    - in `swap` mode, to the reference tokens only (their logits get `log p_j`, so one reference is plain attention of
      the target's queries over the reference's keys and values).

    The log-weights are a float attention mask given to the fused kernel; the logits are never materialised.

    In `concat` mode, a style strength `s` below 1 adds `log s` to the logits of every reference token too (see
    `style_aligned.layers.strength`); at 0 each target attends to its own tokens only. `swap` mode has no own tokens
    to fall back to: it takes strength 1 only.

    Receives:
        Query (Float[Tensor, "halves images_per_half num_queries embedding_dim"]):
        Key (Float[Tensor, "halves images_per_half num_tokens embedding_dim"]): Each image's own keys.
        Value (Float[Tensor, "halves images_per_half num_tokens embedding_dim"]): Each image's own values.
        Reference key (Float[Tensor, "halves images_per_half references*num_tokens embedding_dim"]): The keys of the
            references each image is given, one reference after another.
        Reference value (Float[Tensor, "halves images_per_half references*num_tokens embedding_dim"]): Their values.

    Returns:
        (Float[Tensor, "batch num_queries embedding_dim"]): With `batch = halves * images_per_half`; the rows of the
            references are their plain self-attention outputs.
    """

    def __init__(
        self,
        num_heads: int = 1,
        *,
        mode: AttentionMode = "concat",
        shift: float = 0.0,
        strength: float = 1.0,
        slice_size: int | None = None,
        reference_cache: ReferenceCache,
    ) -> None:
        """Initialize the kernel.

        Args:
            num_heads: The number of attention heads.
            mode: `"concat"` (own and reference tokens) or `"swap"` (reference tokens only).
            shift: `shared_score_shift`, added with each reference's log-weight to the logits of its tokens.
            strength: The style strength, in [0, 1] (`concat` mode; `log strength` is added to those logits too).
            slice_size: If given, the queries of every image are processed in slices of this size.
            reference_cache: Tells which images are references, how many there are and their weights.

        Raises:
            ValueError: If the strength is not in [0, 1], or not 1 in `swap` mode.
        """
        super().__init__(
            num_heads, shift=shift, strength=strength, slice_size=slice_size, reference_cache=reference_cache
        )
        if mode == "swap" and strength != 1.0:
            raise ValueError(f"swap mode takes strength 1 only, got {strength}")
        self.mode: AttentionMode = mode

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, shared: References | None) -> Tensor:
        """The output of every image for these queries, `(halves, images_per_half, num_queries, embedding_dim)`.

        `shared`: the keys and values of the references given to the targets, `(halves, references * tokens,
        embedding_dim)` each, or `None` (no target attends to them: every image attends to its own tokens only).
        """
        if shared is None:
            return self._attend_images(query, key, value, bias=None)
        halves, per_half, num_queries, _ = query.shape
        first = self.first_target
        output = query.new_empty(halves, per_half, num_queries, value.shape[-1])
        if first > 0:  # the references: plain attention over their own tokens
            output[:, :first] = self._attend_images(query[:, :first], key[:, :first], value[:, :first], bias=None)
        targets = per_half - first
        # the tokens of all references, given to every target: (halves, targets, references * tokens, channels)
        shared_keys, shared_values = (x[:, None].expand(-1, targets, -1, -1) for x in shared)
        if self.mode == "concat":
            keys = torch.cat([key[:, first:], shared_keys], dim=-2)
            values = torch.cat([value[:, first:], shared_values], dim=-2)
        else:
            keys, values = shared_keys, shared_values
        num_tokens = key.shape[-2]
        bias = reference_logit_bias(
            num_tokens if self.mode == "concat" else 0,
            num_tokens,
            self.reference_cache.mixture_weights,
            shift=self.reference_shift,
            device=query.device,
            dtype=query.dtype,
        )
        output[:, first:] = self._attend_images(query[:, first:], keys, values, bias=bias)
        return output

    def _attend_images(self, query: Tensor, key: Tensor, value: Tensor, *, bias: Tensor | None) -> Tensor:
        """The attention of each image's queries over its keys, all `(halves, images, tokens, embedding_dim)`."""
        halves, count, num_queries, _ = query.shape
        attended = scaled_dot_product_attention(
            self._heads(query.flatten(0, 1)),
            self._heads(key.flatten(0, 1)),
            self._heads(value.flatten(0, 1)),
            attn_mask=bias,
        )  # (halves * images, heads, num_queries, head_dim)
        return attended.transpose(1, 2).reshape(halves, count, num_queries, -1)
