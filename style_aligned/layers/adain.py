"""Adaptive instance normalisation of every image's features onto its half's reference image."""

import refiners.fluxion.layers as fl
import torch
from jaxtyping import Float
from torch import Tensor

from style_aligned.layers.reference_cache import ReferenceCache
from style_aligned.layers.reference_mixture import mixture_statistics
from style_aligned.layers.strength import check_strength, toward


class AdaIN(fl.Module):
    """Give every image's features the token statistics of its half's reference image.

    `adain(x) = (x - mean(x)) / std(x) * std(ref(x)) + mean(ref(x))`, with mean and standard deviation over the
    token axis, per channel, and `std = sqrt(unbiased variance + epsilon)`. The reference maps onto itself.

    With several references (see `ReferenceCache.mixture_weights`), `mean(ref(x))` and the variance under
    `std(ref(x))` are those of the weighted mixture of the references (see `mixture_statistics`), and the references
    map onto themselves.

    At a style strength `s` below 1 (see `style_aligned.layers.strength`), every image is mapped to
    `x + s (adain(x) - x)`; at 0 the features pass unchanged.

    See [[arXiv:1703.06868] Arbitrary Style Transfer in Real-time with Adaptive Instance Normalization](
    https://arxiv.org/abs/1703.06868) and [[arXiv:2312.02133] Style Aligned Image Generation via Shared Attention](
    https://arxiv.org/abs/2312.02133) (section 3).

    Receives:
        (Float[Tensor, "halves images_per_half tokens channels"]): Queries, keys or values of every image, by half.

    Returns:
        (Float[Tensor, "halves images_per_half tokens channels"]): The same features, renormalised onto the
            reference statistics.
    """

    def __init__(self, epsilon: float = 1e-5, *, strength: float = 1.0, reference_cache: ReferenceCache) -> None:
        """Initialize the layer.

        Args:
            epsilon: Added to the variance before the square root.
            strength: The style strength, in [0, 1]: 1 is AdaIN, 0 the identity.
            reference_cache: The cache of the adapter that owns this layer (where the reference statistics come from).

        Raises:
            ValueError: If the strength is not in [0, 1].
        """
        super().__init__()
        self.epsilon = epsilon
        self.strength = check_strength(strength)
        self.reference_cache = reference_cache

    def forward(
        self, x: Float[Tensor, "halves images_per_half tokens channels"]
    ) -> Float[Tensor, "halves images_per_half tokens channels"]:
        if self.strength == 0.0:
            return x
        # Unbiased variance; a single token has none, so it gets the reference's mean (the limit as variance -> 0).
        correction = 1 if x.shape[-2] > 1 else 0
        variance, mean = torch.var_mean(x, dim=-2, keepdim=True, correction=correction)  # (halves, per_half, 1, C)
        std = (variance + self.epsilon).sqrt()
        cache = self.reference_cache
        references = cache.references(self, torch.cat([mean, variance], dim=-2))  # (halves, k, 2, C)
        reference_mean, reference_variance = mixture_statistics(
            references[:, :, :1], references[:, :, 1:], cache.mixture_weights
        )
        reference_std = (reference_variance + self.epsilon).sqrt()  # (halves, 1, 1, C)
        # x * (ref_std / std) + (ref_mean - mean * ref_std / std): the reference rows get factor 1 and offset 0 exactly.
        factor = reference_std / std
        offset = reference_mean - mean * factor
        # at strength s: x + s (adain(x) - x) = x * (1 + s (factor - 1)) + s * offset (the references keep 1 and 0)
        factor, offset = (
            toward(factor.new_ones(()), factor, self.strength),
            toward(offset.new_zeros(()), offset, self.strength),
        )
        if cache.num_references > 1 and cache.batch_has_references:  # each reference maps onto itself
            count = cache.num_references
            factor, offset = factor.expand_as(mean), offset.expand_as(mean)  # (halves, per_half, 1, C)
            factor = torch.cat([torch.ones_like(factor[:, :count]), factor[:, count:]], dim=1)
            offset = torch.cat([torch.zeros_like(offset[:, :count]), offset[:, count:]], dim=1)
        return torch.addcmul(offset, x, factor)
