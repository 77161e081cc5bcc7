"""The one interface through which the set engine (`denoise`, `generate`) runs a model, whatever its backbone: a
U-Net pipeline (SD1, SDXL) or FLUX.1's transformer. A new backbone is one more implementation of `Backbone` (its
models, weights and the options it refuses in `SetSpec.refusals`), not a new pipeline."""

import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from PIL import Image
from refiners.foundationals.latent_diffusion import SD1UNet, SDXLUNet, StableDiffusion_1, StableDiffusion_XL
from refiners.foundationals.latent_diffusion.solvers import Solver
from torch import Tensor

from style_aligned.flux.models import FluxModels
from style_aligned.flux.transformer import FluxTransformer
from style_aligned.options import ModelKind
from style_aligned.pipeline.flux_backbone import FluxBackbone
from style_aligned.pipeline.model import Model
from style_aligned.pipeline.spec import SetSpec
from style_aligned.pipeline.unet_backbone import UNetBackbone


class Conditioning(Protocol):
    """The text conditioning of a set's images: the model call's inputs for any batch of them."""

    def __call__(self, images: Sequence[int], classifier_free_guidance: bool = ..., /) -> dict[str, Tensor]: ...


class Backbone(Protocol):
    """What the set engine asks of a model. Every spec it is given is resolved for the backbone's `kind`."""

    @property
    def kind(self) -> ModelKind:
        """The model kind (its defaults and refusals: see `SetSpec.resolved`)."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the latents live and the model calls run."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the latents."""
        ...

    @property
    def target(self) -> SD1UNet | SDXLUNet | FluxTransformer:
        """The module the StyleAligned adapter is injected into (the U-Net, the transformer)."""
        ...

    def classifier_free_guidance(self, spec: SetSpec) -> bool:
        """Whether the batches have an unconditional and a conditional half."""
        ...

    def make_solver(self, spec: SetSpec) -> Solver:
        """A fresh solver for the spec's steps (and size, for a schedule that depends on it)."""
        ...

    def initial_latents(self, spec: SetSpec, count: int, solver: Solver) -> Tensor:
        """The seeded initial latents of the set's `count` images, scaled for the solver's first step."""
        ...

    def conditioning(self, spec: SetSpec) -> Conditioning:
        """The text conditioning of the spec's images."""
        ...

    def composed(
        self, spec: SetSpec, count: int
    ) -> contextlib.AbstractContextManager[Callable[[Sequence[int]], None] | None]:
        """The spec's extras applied for a block; yields what sets their inputs before each model call, if any."""
        ...

    def predict(
        self,
        x: Tensor,
        step: int,
        *,
        solver: Solver,
        conditioning: dict[str, Tensor],
        guidance: float,
        classifier_free_guidance: bool,
    ) -> Tensor:
        """The model's (guided) prediction for a batch of latents at a solver step."""
        ...

    def encode(self, image: Image.Image) -> Tensor:
        """The latents of an image of the set's size, `(1, *latent)` in the set's layout (the `"encode"` stage)."""
        ...

    def decode(self, latents: Tensor, spec: SetSpec) -> Image.Image:
        """The image of one image's final latents."""
        ...

    def unpacked(self, latents: Tensor, spec: SetSpec) -> Tensor:
        """Latents as the autoencoder takes them `(images, channels, height / 8, width / 8)` (for previews)."""
        ...

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        """A stage of a set, `"text"`, `"denoise"`, `"encode"` or `"decode"`: with an offload, only its models on the
        accelerator."""
        ...


def backbone_of(model: "Model | Backbone") -> Backbone:
    """The backbone of a model: a `FluxBackbone` for `FluxModels`, a `UNetBackbone` for a Stable Diffusion pipeline
    (a backbone is its own)."""
    if isinstance(model, FluxModels):
        return FluxBackbone(model)
    if isinstance(model, StableDiffusion_1 | StableDiffusion_XL):
        return UNetBackbone(model)
    return model
