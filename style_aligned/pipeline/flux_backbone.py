"""FLUX.1's models behind the set engine's `Backbone` interface, computing what diffusers' `FluxPipeline` computes.

A set's latents are packed tokens `(images, (height / 16) * (width / 16), 64)`. Image `i` starts from the `i`-th
latent that `FluxPipeline` draws for the whole set with `torch.Generator("cpu").manual_seed(seed)` (in the models'
dtype, on the CPU, then packed 2x2); the text tokens are T5's (`max_sequence_length` as loaded: 512 for [dev], 256
for [schnell]) and the pooled vector CLIP L's; each step gives the transformer the timestep and, for [dev], the
guidance value as `FluxPipeline` does (rounded to the models' dtype), then takes a flow-matching Euler step. With an
offload (`FluxModels.offload`), each stage has the accelerator alone: text encoders, transformer, autoencoder.
"""

import contextlib
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager

import torch
from PIL import Image
from refiners.foundationals.latent_diffusion.solvers import Solver
from torch import Tensor

from style_aligned.flux.latents import image_ids, pack_latents, text_ids, unpack_latents
from style_aligned.flux.models import TEXT_ENCODERS, FluxModels
from style_aligned.flux.text_encoders import clip_pooled_text_embedding
from style_aligned.flux.transformer import FluxTransformer
from style_aligned.options import ModelKind
from style_aligned.pipeline.spec import SetSpec

STAGES: dict[str, tuple[str, ...]] = {
    "text": TEXT_ENCODERS,
    "denoise": ("transformer",),
    "encode": ("autoencoder",),
    "decode": ("autoencoder",),
}
"""The models each stage of a set uses, by the names of `FluxModels.offload`."""


class FluxConditioning:
    """The text conditioning of every image of a set, batched for any subset of its images: T5's token embeddings,
    CLIP L's pooled vector, and the rotary ids of the text and image tokens."""

    def __init__(self, models: FluxModels, prompts: Sequence[str], *, width: int, height: int, device: torch.device):
        if models.t5 is None or models.clip_text_encoder is None:
            raise ValueError(f"{models.reference or 'these FLUX.1 models'} lack their text encoders (CLIP L and T5)")
        dtype = next(models.transformer.parameters()).dtype
        unique = list(dict.fromkeys(prompts))
        rows = [unique.index(prompt) for prompt in prompts]
        with torch.no_grad():
            texts = models.t5(unique).to(device=device, dtype=dtype)
            pooled = clip_pooled_text_embedding(models.clip_text_encoder, unique).to(device=device, dtype=dtype)
        self._texts, self._pooled = texts[rows], pooled[rows]
        self._text_ids = text_ids(texts.shape[1], device=device)
        self._image_ids = image_ids(height // 8, width // 8, device=device)

    def __call__(self, images: Sequence[int], classifier_free_guidance: bool = False) -> dict[str, Tensor]:
        """The transformer's inputs for a batch of images (there is no classifier-free guidance on FLUX.1)."""
        assert not classifier_free_guidance, "FLUX.1 runs without classifier-free guidance"
        rows = list(images)
        return {
            "text_embedding": self._texts[rows],
            "pooled_text_embedding": self._pooled[rows],
            "text_ids": self._text_ids,
            "image_ids": self._image_ids,
        }


class FluxBackbone:
    """FLUX.1's models as the set engine runs them (see the module's description)."""

    def __init__(self, models: FluxModels) -> None:
        self.models = models

    @property
    def kind(self) -> ModelKind:
        """`"flux_dev"` (with a guidance embedding) or `"flux_schnell"`."""
        return "flux_schnell" if self.models.is_schnell else "flux_dev"

    @property
    def device(self) -> torch.device:
        """Where the models run: the offload's accelerator, or the transformer's device."""
        offload = self.models.model_offload
        if offload is not None:
            return offload.device
        return next(self.models.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.models.transformer.parameters()).dtype

    @property
    def target(self) -> FluxTransformer:
        """The transformer, where StyleAligned is injected."""
        return self.models.transformer

    def classifier_free_guidance(self, spec: SetSpec) -> bool:
        """Never: FLUX.1 is guidance-distilled ([dev] takes the guidance value through its embedding)."""
        return False

    def make_solver(self, spec: SetSpec) -> Solver:
        """The flow-matching Euler solver of the pipeline's schedule for the spec's size and steps."""
        assert spec.width is not None and spec.height is not None and spec.steps is not None
        tokens = (spec.height // 16) * (spec.width // 16)
        return self.models.solver(spec.steps, image_seq_len=tokens, device=self.device)

    def initial_latents(self, spec: SetSpec, count: int, solver: Solver) -> Tensor:
        """The packed latents `FluxPipeline` draws for `count` images with the spec's seed (pure noise: sigma 1)."""
        assert spec.width is not None and spec.height is not None
        generator = torch.Generator("cpu").manual_seed(spec.seed)
        channels = self.models.transformer.config.in_channels // 4
        shape = (count, channels, spec.height // 8, spec.width // 8)
        noise = torch.randn(shape, generator=generator, dtype=self.dtype)
        return pack_latents(noise).to(device=self.device)

    def conditioning(self, spec: SetSpec) -> FluxConditioning:
        assert spec.width is not None and spec.height is not None
        return FluxConditioning(
            self.models, spec.image_prompts(), width=spec.width, height=spec.height, device=self.device
        )

    @contextmanager
    def composed(self, spec: SetSpec, count: int) -> Generator[Callable[[Sequence[int]], None] | None]:
        """Nothing to apply: the extras a FLUX.1 set could have are refused by `SetSpec.refusals`."""
        yield None

    def predict(
        self,
        x: Tensor,
        step: int,
        *,
        solver: Solver,
        conditioning: dict[str, Tensor],
        guidance: float,
        classifier_free_guidance: bool = False,
    ) -> Tensor:
        """The velocity the transformer predicts for a batch of packed latents at a step."""
        transformer, batch = self.models.transformer, x.shape[0]
        # as FluxPipeline: the timestep in the latents' dtype, divided by 1000, times 1000 again in the model
        sigma = solver.timesteps[step].expand(batch).to(x.dtype) / 1000
        transformer.set_timestep(timestep=sigma.to(self.dtype) * 1000)
        if transformer.config.guidance_embeds:
            transformer.set_guidance(guidance=torch.full((batch,), guidance, device=x.device).to(self.dtype))
        transformer.set_text_embedding(text_embedding=conditioning["text_embedding"])
        transformer.set_pooled_text_embedding(pooled_text_embedding=conditioning["pooled_text_embedding"])
        transformer.set_text_ids(text_ids=conditioning["text_ids"])
        transformer.set_image_ids(image_ids=conditioning["image_ids"])
        return transformer(x)

    def encode(self, image: Image.Image) -> Tensor:
        """The packed latents of an image: `(1, (height / 16) * (width / 16), 64)`, in the transformer's dtype."""
        autoencoder = self.models.autoencoder
        return pack_latents(autoencoder.image_to_latents(image)).to(device=self.device, dtype=self.dtype)

    def decode(self, latents: Tensor, spec: SetSpec) -> Image.Image:
        """The image of one image's packed latents."""
        autoencoder = self.models.autoencoder
        return autoencoder.latents_to_image(self.unpacked(latents, spec).to(autoencoder.dtype))

    def unpacked(self, latents: Tensor, spec: SetSpec) -> Tensor:
        """Packed latents of the spec's size as the autoencoder takes them: `(images, 16, height / 8, width / 8)`."""
        assert spec.width is not None and spec.height is not None
        return unpack_latents(latents, spec.height // 8, spec.width // 8)

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        """With an offload, only the models of the stage (`"text"`, `"denoise"`, `"encode"`, `"decode"`) on the
        accelerator."""
        offload = self.models.model_offload
        return contextlib.nullcontext() if offload is None else offload.use(*STAGES[name])
