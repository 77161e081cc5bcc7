"""The reference image of each batch half, and the layers that hand its features to the other images.

See `style_aligned.batch_layout` for the batch layout and `style_aligned.reference_cache` for where the references
come from (the batch itself by default, or a recording of an earlier pass).
"""

import refiners.fluxion.layers as fl
import torch
from jaxtyping import Float
from torch import Tensor

from style_aligned.reference_cache import ReferenceCache


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

    def __init__(self, classifier_free_guidance: bool = True, reference_cache: ReferenceCache | None = None) -> None:
        """Initialize the layer.

        Args:
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
            reference_cache: Where the references come from (by default, image 0 of each batch half).
        """
        super().__init__()
        self.classifier_free_guidance = classifier_free_guidance
        self.reference_cache = reference_cache or ReferenceCache()

    def forward(self, x: Float[Tensor, "batch ..."]) -> Float[Tensor, "batch ..."]:
        references = self.reference_cache.references(self, x, self.classifier_free_guidance)  # (halves, 1, ...)
        per_half = x.shape[0] // references.shape[0]
        return references.expand(references.shape[0], per_half, *x.shape[1:]).reshape(x.shape)


class ScaleReferences(fl.Module):
    """Scale the reference features handed to the targets, leaving the reference's own copy unscaled.

    Used on the keys only, it scales the attention scores of targets towards the reference (`shared_score_scale`).
    The reference's own copy stays unscaled so that the reference keeps its plain self-attention output.

    Receives:
        (Float[Tensor, "batch tokens channels"]): Reference features, as given by `GetReferences`.

    Returns:
        (Float[Tensor, "batch tokens channels"]): The same features, multiplied by `scale` in the target rows.
    """

    def __init__(
        self,
        scale: float = 1.0,
        classifier_free_guidance: bool = True,
        reference_cache: ReferenceCache | None = None,
    ) -> None:
        """Initialize the layer.

        Args:
            scale: The factor applied to the reference features of target rows.
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
            reference_cache: Tells whether the batch holds the references (by default, it does).
        """
        super().__init__()
        self.scale = scale
        self.classifier_free_guidance = classifier_free_guidance
        self.reference_cache = reference_cache or ReferenceCache()

    def forward(self, x: Float[Tensor, "batch ..."]) -> Float[Tensor, "batch ..."]:
        if self.scale == 1.0:
            return x
        per_half = self.reference_cache.images_per_half(x.shape[0], self.classifier_free_guidance)
        factors = torch.full((x.shape[0] // per_half, per_half), self.scale, device=x.device, dtype=x.dtype)
        if self.reference_cache.batch_has_references:
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

    def __init__(
        self,
        classifier_free_guidance: bool = True,
        dim: int = 1,
        scale: float | None = None,
        reference_cache: ReferenceCache | None = None,
    ) -> None:
        """Initialize the layer.

        Args:
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
            dim: The axis to append along: 1 for the tokens of attention inputs.
            scale: If given, the appended copies of target rows are scaled by it (a `ScaleReferences` layer).
            reference_cache: Where the references come from (by default, image 0 of each batch half).
        """
        cache = reference_cache or ReferenceCache()
        references = fl.Chain(GetReferences(classifier_free_guidance, cache))
        if scale is not None:
            references.append(ScaleReferences(scale, classifier_free_guidance, cache))
        super().__init__(fl.Identity(), references, dim=dim)


class CheckBatchLayout(fl.ContextModule):
    """Check, before a U-Net runs, that its batch fits the StyleAligned layout.

    Placed first in the U-Net, it refuses a bad batch before any layer has stored anything in the U-Net's context;
    should a side branch placed before it have done so, the U-Net's context is reset before the error is raised.

    Receives:
        (Float[Tensor, "batch channels height width"]): The U-Net's input.

    Returns:
        (Float[Tensor, "batch channels height width"]): The same input.
    """

    def __init__(self, classifier_free_guidance: bool = True, reference_cache: ReferenceCache | None = None) -> None:
        """Initialize the layer.

        Args:
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
            reference_cache: Tells the mode (a batch of references only, when recording them).
        """
        super().__init__()
        self.classifier_free_guidance = classifier_free_guidance
        self.reference_cache = reference_cache or ReferenceCache()

    def forward(self, x: Float[Tensor, "batch ..."]) -> Float[Tensor, "batch ..."]:
        try:
            self.reference_cache.images_per_half(x.shape[0], self.classifier_free_guidance)
        except ValueError:
            if (unet := self.parent) is not None:
                for name, value in unet.init_context().items():
                    unet.set_context(name, value)
            raise
        return x
