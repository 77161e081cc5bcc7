"""The SD1 and SDXL U-Net pipelines behind the set engine's `Backbone` interface."""

import contextlib
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager

import torch
from PIL import Image
from refiners.foundationals.latent_diffusion import SD1UNet, SDXLUNet
from refiners.foundationals.latent_diffusion.solvers import Solver
from torch import Tensor

from style_aligned.options import ModelKind, model_kind
from style_aligned.pipeline.composition import Composition
from style_aligned.pipeline.conditioning import SetConditioning
from style_aligned.pipeline.model import StableDiffusion, autoencoder_in_float32, lcm_guidance_embedding
from style_aligned.pipeline.solvers import make_solver
from style_aligned.pipeline.spec import SetSpec


def initial_noise(spec: SetSpec, count: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The initial latents of a U-Net set: image `i` gets the `i`-th draw of the seeded generator."""
    assert spec.width is not None and spec.height is not None
    generator = torch.Generator().manual_seed(spec.seed)
    noise = torch.randn(count, 4, spec.height // 8, spec.width // 8, generator=generator)
    return noise.to(device=device, dtype=dtype)


class UNetBackbone:
    """A Refiners `StableDiffusion_1` or `StableDiffusion_XL` as the set engine runs it: a batch of latents
    `(images, 4, height / 8, width / 8)`, classifier-free guidance in two batch halves, the spec's solver, and the
    spec's ControlNets, LoRAs and IP-Adapter applied around the denoising."""

    def __init__(self, sd: StableDiffusion) -> None:
        self.sd = sd

    @property
    def kind(self) -> ModelKind:
        """`"sd1"` or `"sdxl"`."""
        return model_kind(self.sd)

    @property
    def device(self) -> torch.device:
        return self.sd.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sd.dtype

    @property
    def target(self) -> SD1UNet | SDXLUNet:
        """The U-Net, where StyleAligned is injected."""
        return self.sd.unet

    def classifier_free_guidance(self, spec: SetSpec) -> bool:
        """With a guidance scale above 1 and no LCM guidance embedding (which then gets the scale)."""
        return spec.classifier_free_guidance and lcm_guidance_embedding(self.sd) is None

    def make_solver(self, spec: SetSpec) -> Solver:
        """A fresh solver of the resolved spec, on the model's device and dtype."""
        assert spec.solver is not None and spec.steps is not None
        sd = self.sd
        return make_solver(spec.solver, spec.steps, spacing=spec.timestep_spacing, device=sd.device, dtype=sd.dtype)

    def initial_latents(self, spec: SetSpec, count: int, solver: Solver) -> Tensor:
        """The initial noise (see `initial_noise`), scaled as the solver needs it (Euler's initial sigma)."""
        noise = initial_noise(spec, count, device=self.device, dtype=self.dtype)
        return solver.scale_model_input(noise, step=-1)

    def conditioning(self, spec: SetSpec) -> SetConditioning:
        """The CLIP text conditioning of the spec's images (and its negative prompt)."""
        assert spec.width is not None and spec.height is not None
        return SetConditioning(
            self.sd, spec.image_prompts(), spec.negative_prompt, width=spec.width, height=spec.height
        )

    @contextmanager
    def composed(self, spec: SetSpec, count: int) -> Generator[Callable[[Sequence[int]], None]]:
        """The spec's extras applied (and the guidance scale given to an LCM guidance embedding) until the block
        ends, whether it succeeds or fails; yields what sets the extras' inputs before each model call."""
        lcm = lcm_guidance_embedding(self.sd)
        previous_scale = None if lcm is None else lcm.condition_scale
        cfg = self.classifier_free_guidance(spec)
        assert spec.width is not None and spec.height is not None and spec.guidance is not None
        try:
            if lcm is not None:
                lcm.set_condition_scale(spec.guidance)
            with Composition(self.sd, spec.extras(), count, width=spec.width, height=spec.height) as composition:
                yield lambda images: composition.before_call(images, classifier_free_guidance=cfg)
        finally:
            if lcm is not None and previous_scale is not None:
                lcm.set_condition_scale(previous_scale)

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
        """The guided noise prediction of a batch of latents, as `LatentDiffusionModel.forward` computes it."""
        sd = self.sd
        sd.set_unet_context(timestep=solver.timesteps[step].unsqueeze(dim=0), **conditioning)
        latents = torch.cat((x, x)) if classifier_free_guidance else x
        latents = solver.scale_model_input(latents, step=step)
        if not classifier_free_guidance:
            return sd.unet(latents)
        unconditional, conditional = sd.unet(latents).chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    def encode(self, image: Image.Image) -> Tensor:
        """The autoencoder's scaled latent mean of an image `(1, 4, height / 8, width / 8)`, in the model's dtype (in
        the `"encode"` stage: computed in float32)."""
        return self.sd.lda.image_to_latents(image).to(dtype=self.dtype)

    def decode(self, latents: Tensor, spec: SetSpec) -> Image.Image:
        """The image of one latent `(1, 4, height / 8, width / 8)` (in the `"decode"` stage: in float32)."""
        return self.sd.lda.latents_to_image(latents.to(self.sd.lda.dtype))

    def unpacked(self, latents: Tensor, spec: SetSpec) -> Tensor:
        """The latents as the autoencoder takes them (they are already)."""
        return latents

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Every model stays where it is; the autoencoder encodes and decodes in float32 (see
        `autoencoder_in_float32`)."""
        return autoencoder_in_float32(self.sd) if name in ("encode", "decode") else contextlib.nullcontext()
