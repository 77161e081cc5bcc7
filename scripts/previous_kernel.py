"""This project's earlier shared attention kernel, kept as a baseline for `bench_attention.py`.

Each image's keys and values get its reference's appended (`AppendReferences`: one concatenation per image), then
one fused attention runs over them, with `shared_score_shift` given to the kernel as a float attention mask on the
appended tokens (`ShiftedScaledDotProductAttention`). The package's kernel, `SharedScaledDotProductAttention`,
attends to the own and the reference tokens separately and merges the two by log-sum-exp instead: no concatenation
and no mask.
"""

import refiners.fluxion.layers as fl
import torch
from jaxtyping import Float
from refiners.fluxion.adapters.adapter import Adapter
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention

from style_aligned import AdaIN, GetReferences, ReferenceCache, ScaleReferences, SplitHalves


def reference_score_bias(num_keys: int, shift: float, like: Tensor) -> Float[Tensor, "1 1 1 num_keys"]:
    """The float attention mask that adds `shift` to the logits of the appended reference tokens (the second half of
    the keys)."""
    bias = torch.zeros(1, 1, 1, num_keys, device=like.device, dtype=like.dtype)
    bias[..., num_keys // 2 :] = shift
    return bias


class AppendReferences(fl.Concatenate):
    """Append to each image's tokens the tokens of its half's reference (scaled for the targets, if asked).

    Receives:
        (Float[Tensor, "halves images_per_half tokens channels"]): Features of every image, by half.

    Returns:
        (Float[Tensor, "halves images_per_half 2*tokens channels"]): Each image's tokens, then its reference's.
    """

    def __init__(self, scale: float | None = None, *, reference_cache: ReferenceCache) -> None:
        references = fl.Chain(GetReferences(reference_cache))
        if scale is not None:
            references.append(ScaleReferences(scale, reference_cache=reference_cache))
        super().__init__(fl.Identity(), references, dim=-2)


class ShiftedScaledDotProductAttention(fl.ScaledDotProductAttention):
    """Attention over each image's own tokens and the appended tokens of its reference, the shift as a float mask.

    A reference image's appended tokens duplicate its own, so it attends over its own tokens only.

    Receives:
        Query (Float[Tensor, "halves images_per_half num_queries embedding_dim"]):
        Key (Float[Tensor, "halves images_per_half 2*num_tokens embedding_dim"]): Own tokens, then the reference's.
        Value (Float[Tensor, "halves images_per_half 2*num_tokens embedding_dim"]): Own tokens, then the reference's.

    Returns:
        (Float[Tensor, "batch num_queries embedding_dim"]): With `batch = halves * images_per_half`.
    """

    def __init__(self, num_heads: int = 1, shift: float = 0.0, *, reference_cache: ReferenceCache) -> None:
        super().__init__(num_heads=num_heads)
        self.shift = shift
        self.reference_cache = reference_cache

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None) -> Tensor:
        output = scaled_dot_product_attention(
            self._split_to_multi_head(query),
            self._split_to_multi_head(key),
            self._split_to_multi_head(value),
            attn_mask=bias,
        )  # (batch, heads, num_queries, head_dim)
        return self._merge_multi_head(output)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        halves, per_half, num_queries, _ = query.shape
        output = query.new_empty(halves, per_half, num_queries, value.shape[-1])
        bias = None if self.shift == 0.0 else reference_score_bias(key.shape[-2], self.shift, query)
        if not self.reference_cache.batch_has_references:  # every image is a target
            attended = self._attend(query.flatten(0, 1), key.flatten(0, 1), value.flatten(0, 1), bias)
            return attended.reshape(halves * per_half, num_queries, -1)
        num_tokens = key.shape[-2] // 2
        # references: plain attention over their own tokens
        output[:, 0] = self._attend(query[:, 0], key[:, 0, :num_tokens], value[:, 0, :num_tokens], bias=None)
        for half in range(halves if per_half > 1 else 0):
            output[half, 1:] = self._attend(query[half, 1:], key[half, 1:], value[half, 1:], bias=bias)
        return output.reshape(halves * per_half, num_queries, -1)


class ConcatenatingAdapter(fl.Chain, Adapter[fl.ScaledDotProductAttention]):
    """The earlier kernel in place of a layer's attention: each image's keys and values with its reference's
    appended, one attention (AdaIN on queries and keys, classifier-free guidance)."""

    def __init__(self, target: fl.ScaledDotProductAttention, shift: float) -> None:
        cache = ReferenceCache()
        with self.setup_adapter(target):
            super().__init__(
                fl.Distribute(SplitHalves(True, cache), SplitHalves(True, cache), SplitHalves(True, cache)),
                fl.Distribute(AdaIN(reference_cache=cache), AdaIN(reference_cache=cache), fl.Identity()),
                fl.Distribute(
                    fl.Identity(), AppendReferences(1.0, reference_cache=cache), AppendReferences(reference_cache=cache)
                ),
                ShiftedScaledDotProductAttention(target.num_heads, shift, reference_cache=cache),
            )
