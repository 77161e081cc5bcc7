"""The reference image of each batch half, and the layers that hand it to the other images.

StyleAligned works on a batch laid out in halves: with classifier-free guidance the batch is
`[uncond_0 .. uncond_{n-1} | cond_0 .. cond_{n-1}]` (the order of Refiners' `compute_clip_text_embedding`),
without it there is a single half. Image 0 of each half is the style reference; the others are targets.
"""

import refiners.fluxion.layers as fl
import torch
from jaxtyping import Float
from torch import Tensor


def images_per_half(batch_size: int, classifier_free_guidance: bool) -> int:
    """Check a batch layout and return the number of images in each half.

    Args:
        batch_size: The size of the batch.
        classifier_free_guidance: Whether the batch is an unconditional half followed by a conditional half.

    Returns:
        The number of images in each half: the reference plus the targets.

    Raises:
        ValueError: If the batch cannot be split into halves that each start with a reference image.
    """
    if classifier_free_guidance:
        if batch_size < 2 or batch_size % 2 != 0:
            raise ValueError(
                f"StyleAligned got a batch of {batch_size}: with classifier_free_guidance=True the batch must be"
                " [uncond_0 .. uncond_n-1 | cond_0 .. cond_n-1], an even size of at least 2 whose halves each start"
                " with the reference image (use classifier_free_guidance=False for a batch without guidance)"
            )
        return batch_size // 2
    if batch_size < 1:
        raise ValueError("StyleAligned got an empty batch: it needs at least the reference image")
    return batch_size


def by_half(x: Tensor, per_half: int) -> Tensor:
    """Reshape a batch to `(halves, per_half, *rest)`, a view when `x` is contiguous."""
    return x.reshape(x.shape[0] // per_half, per_half, *x.shape[1:])


def reference_rows(
    x: Float[Tensor, "batch ..."],
    classifier_free_guidance: bool,
) -> Float[Tensor, "batch ..."]:
    """Return the reference row of each batch half, repeated over that half.

    Args:
        x: Any tensor whose first axis is the batch.
        classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.

    Returns:
        A tensor shaped like `x` whose row `i` is the reference row of the half that holds row `i`.
    """
    per_half = images_per_half(x.shape[0], classifier_free_guidance)
    halves = x.shape[0] // per_half
    references = by_half(x, per_half)[:, :1]  # (halves, 1, *rest)
    return references.expand(halves, per_half, *x.shape[1:]).reshape(x.shape)  # (batch, *rest)


class GetReferences(fl.Module):
    """Replace every row of a batch by the reference row of its half.

    Receives:
        (Float[Tensor, "batch ..."]): Features of every image of the batch.

    Returns:
        (Float[Tensor, "batch ..."]): The features of the reference image of each row's half.

    Example:
        ```py
        get_references = GetReferences(classifier_free_guidance=True)
        x = torch.arange(4.0).reshape(4, 1)  # [uncond_0, uncond_1, cond_0, cond_1]
        assert get_references(x).flatten().tolist() == [0.0, 0.0, 2.0, 2.0]
        ```
    """

    def __init__(self, classifier_free_guidance: bool = True) -> None:
        """Initialize the layer.

        Args:
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
        """
        super().__init__()
        self.classifier_free_guidance = classifier_free_guidance

    def forward(self, x: Float[Tensor, "batch ..."]) -> Float[Tensor, "batch ..."]:
        return reference_rows(x, self.classifier_free_guidance)


class ScaleReferences(fl.Module):
    """Scale the reference features handed to the targets, leaving the reference's own copy unscaled.

    Used on the keys only, it scales the attention scores of targets towards the reference (`shared_score_scale`).
    The reference's own copy stays unscaled so that the reference keeps its plain self-attention output.

    Receives:
        (Float[Tensor, "batch tokens channels"]): Reference features, as given by `GetReferences`.

    Returns:
        (Float[Tensor, "batch tokens channels"]): The same features, multiplied by `scale` in the target rows.
    """

    def __init__(self, scale: float = 1.0, classifier_free_guidance: bool = True) -> None:
        """Initialize the layer.

        Args:
            scale: The factor applied to the reference features of target rows.
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
        """
        super().__init__()
        self.scale = scale
        self.classifier_free_guidance = classifier_free_guidance

    def forward(self, x: Float[Tensor, "batch ..."]) -> Float[Tensor, "batch ..."]:
        if self.scale == 1.0:
            return x
        per_half = images_per_half(x.shape[0], self.classifier_free_guidance)
        factors = torch.full((x.shape[0] // per_half, per_half), self.scale, device=x.device, dtype=x.dtype)
        factors[:, 0] = 1.0  # the reference's own copy
        return x * factors.reshape(x.shape[0], *(1,) * (x.ndim - 1))


class AppendReferences(fl.Concatenate):
    """Append to each row the reference features of its half, along a given axis.

    For keys, the appended copy can be scaled for the targets (see `ScaleReferences`).

    Receives:
        (Float[Tensor, "batch ..."]): Features of every image of the batch.

    Returns:
        (Float[Tensor, "batch ..."]): Each row followed, along `dim`, by its half's reference row.
    """

    def __init__(self, classifier_free_guidance: bool = True, dim: int = 1, scale: float | None = None) -> None:
        """Initialize the layer.

        Args:
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
            dim: The axis to append along: 1 for the tokens of attention inputs.
            scale: If given, the appended copies of target rows are scaled by it (a `ScaleReferences` layer).
        """
        references = fl.Chain(GetReferences(classifier_free_guidance))
        if scale is not None:
            references.append(ScaleReferences(scale, classifier_free_guidance))
        super().__init__(fl.Identity(), references, dim=dim)


class CheckBatchLayout(fl.ContextModule):
    """Check, before a U-Net runs, that its batch splits into halves that each start with a reference.

    Placed first in the U-Net, it refuses a bad batch before any layer has stored anything in the U-Net's context;
    should a side branch placed before it have done so, the U-Net's context is reset before the error is raised.

    Receives:
        (Float[Tensor, "batch channels height width"]): The U-Net's input.

    Returns:
        (Float[Tensor, "batch channels height width"]): The same input.
    """

    def __init__(self, classifier_free_guidance: bool = True) -> None:
        """Initialize the layer.

        Args:
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
        """
        super().__init__()
        self.classifier_free_guidance = classifier_free_guidance

    def forward(self, x: Float[Tensor, "batch ..."]) -> Float[Tensor, "batch ..."]:
        try:
            images_per_half(x.shape[0], self.classifier_free_guidance)
        except ValueError:
            if (unet := self.parent) is not None:
                for name, value in unet.init_context().items():
                    unet.set_context(name, value)
            raise
        return x
