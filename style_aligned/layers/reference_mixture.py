"""The statistics of several weighted references taken as one: the moments of their mixture."""

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor


def mixture_statistics(
    mean: Float[Tensor, "halves references ..."],
    variance: Float[Tensor, "halves references ..."],
    weights: Sequence[float],
) -> tuple[Float[Tensor, "halves 1 ..."], Float[Tensor, "halves 1 ..."]]:
    """The mean and variance of the weighted mixture of the references' feature distributions.

    With weights `p_j` (summing to 1), means `m_j` and variances `v_j` of the references (axis 1):
    `mean = sum_j p_j m_j` and `variance = sum_j p_j (v_j + (m_j - mean)^2)`, the moments of the mixture (as if the
    references' tokens were pooled, each reference's tokens counted in proportion to its weight). With one
    reference they are its own mean and variance, exactly.

    Args:
        mean: The references' means, by half: `(halves, k, ...)`.
        variance: Their variances, of the same shape.
        weights: The `k` weights, summing to 1.

    Returns:
        The mixture mean and variance, `(halves, 1, ...)`.
    """
    if mean.shape[1] != len(weights):
        raise ValueError(f"got the statistics of {mean.shape[1]} references for {len(weights)} weights")
    if len(weights) == 1:
        return mean, variance
    p = torch.tensor(weights, device=mean.device, dtype=mean.dtype).reshape(1, -1, *(1,) * (mean.ndim - 2))
    mixture_mean = (p * mean).sum(dim=1, keepdim=True)
    mixture_variance = (p * (variance + (mean - mixture_mean) ** 2)).sum(dim=1, keepdim=True)
    return mixture_mean, mixture_variance
