"""How a generation reports where it stands: one event type for every phase of every front end."""

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class ProgressEvent:
    """Where a generation stands: one unit of work per U-Net call and per decoded image.

    Attributes:
        done: Units done.
        total: Units in all.
        phase: `"reference"` (a U-Net call on the references alone, in a set without targets), `"targets"` (a U-Net
            call on a chunk of targets; the first chunk carries the references), `"decode"` or `"invert"` (a step of the
            inversion of a reference image, whose units are its steps).
        step: The denoising step (1-based; steps done when decoding).
        steps: The number of denoising steps.
        chunk: The U-Net call of the step (1-based), or the image decoded (1-based, of `chunks`).
        chunks: The number of U-Net calls per step, or of images when decoding.
        index: When decoding, the index in the set of the image decoded.
        image: When decoding, the image decoded.
    """

    done: int
    total: int
    phase: str
    step: int
    steps: int
    chunk: int
    chunks: int
    index: int | None = None
    image: Image.Image | None = None

    @staticmethod
    def decoded(*, done: int, total: int, number: int, count: int, index: int, image: Image.Image) -> "ProgressEvent":
        """The event of a decoded image: the `number`-th of `count`, image `index` of the set."""
        return ProgressEvent(
            done=done,
            total=total,
            phase="decode",
            step=0,
            steps=0,
            chunk=number,
            chunks=count,
            index=index,
            image=image,
        )

    @staticmethod
    def inverted(*, step: int, steps: int) -> "ProgressEvent":
        """The event of an inversion step: `step` of `steps`."""
        return ProgressEvent(done=step, total=steps, phase="invert", step=step, steps=steps, chunk=1, chunks=1)


Progress = Callable[[ProgressEvent], None]


Preview = Callable[[Tensor], None]
"""Called with the reference's latent `(1, 4, height / 8, width / 8)` after each of its denoising steps."""
