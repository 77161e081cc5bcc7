"""Adaptive instance normalisation of every image's features onto its half's reference image."""

import refiners.fluxion.layers as fl
import torch
from jaxtyping import Float
from torch import Tensor

from style_aligned.references import reference_rows


class AdaIN(fl.Module):
    """Give every image's features the token statistics of its half's reference image.

    `adain(x) = (x - mean(x)) / std(x) * std(ref(x)) + mean(ref(x))`, with mean and standard deviation over the
    token axis, per channel, and `std = sqrt(unbiased variance + epsilon)`. The reference maps onto itself.

    See [[arXiv:1703.06868] Arbitrary Style Transfer in Real-time with Adaptive Instance Normalization](
    https://arxiv.org/abs/1703.06868) and [[arXiv:2312.02133] Style Aligned Image Generation via Shared Attention](
    https://arxiv.org/abs/2312.02133) (section 3).

    Receives:
        (Float[Tensor, "batch tokens channels"]): Queries, keys or values of every image of the batch.

    Returns:
        (Float[Tensor, "batch tokens channels"]): The same features, renormalised onto the reference statistics.
    """

    def __init__(self, classifier_free_guidance: bool = True, epsilon: float = 1e-5) -> None:
        """Initialize the layer.

        Args:
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
            epsilon: Added to the variance before the square root.
        """
        super().__init__()
        self.classifier_free_guidance = classifier_free_guidance
        self.epsilon = epsilon

    def forward(self, x: Float[Tensor, "batch tokens channels"]) -> Float[Tensor, "batch tokens channels"]:
        # Unbiased variance; a single token has none, so it gets the reference's mean (the limit as variance -> 0).
        correction = 1 if x.shape[-2] > 1 else 0
        variance, mean = torch.var_mean(x, dim=-2, keepdim=True, correction=correction)  # (batch, 1, channels)
        std = (variance + self.epsilon).sqrt()
        # x * (ref_std / std) + (ref_mean - mean * ref_std / std): the reference rows get factor 1 and offset 0 exactly.
        factor = reference_rows(std, self.classifier_free_guidance) / std
        offset = reference_rows(mean, self.classifier_free_guidance) - mean * factor
        return torch.addcmul(offset, x, factor)
