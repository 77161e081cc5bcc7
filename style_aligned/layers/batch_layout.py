"""The layout of a StyleAligned batch: halves that each start with the reference image.

With classifier-free guidance the batch is `[uncond_0 .. uncond_{n-1} | cond_0 .. cond_{n-1}]` (the order of
Refiners' `compute_clip_text_embedding`); without it there is a single half. Image 0 of each half is the style
reference; the others are targets.
"""

from torch import Tensor


def images_per_half(batch_size: int, classifier_free_guidance: bool) -> int:
    """Check a batch layout and return the number of images in each half.

    Args:
        batch_size: The size of the batch.
        classifier_free_guidance: Whether the batch is an unconditional half followed by a conditional half.

    Returns:
        The number of images in each half.

    Raises:
        ValueError: If the batch cannot be split into halves of at least one image.
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
