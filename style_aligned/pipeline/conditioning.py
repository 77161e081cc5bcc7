"""The text conditioning of a set's images, batched for any of its model calls."""

from collections.abc import Sequence

import torch
from refiners.foundationals.latent_diffusion import StableDiffusion_XL
from torch import Tensor

from style_aligned.pipeline.model import StableDiffusion


class SetConditioning:
    """The text conditioning of every image of a set, batched for any subset of its images.

    With SDXL, an empty negative prompt gives zero embeddings, as diffusers' SDXL pipeline does for the base model
    (`force_zeros_for_empty_prompt`) and the reference implementation's inversion does.
    """

    def __init__(self, sd: StableDiffusion, prompts: Sequence[str], negative_prompt: str, *, width: int, height: int):
        with torch.no_grad():
            encoded = {prompt: self._encode(sd, prompt, negative_prompt) for prompt in dict.fromkeys(prompts)}
        self._texts = [encoded[prompt][0] for prompt in prompts]  # (2, tokens, channels) each: [negative, prompt]
        self._pooled = [pooled for prompt in prompts if (pooled := encoded[prompt][1]) is not None]
        # [original height, original width, crop top, crop left, target height, target width]
        self._time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=sd.device, dtype=sd.dtype)

    @staticmethod
    def _encode(sd: StableDiffusion, prompt: str, negative_prompt: str) -> tuple[Tensor, Tensor | None]:
        if not isinstance(sd, StableDiffusion_XL):
            return sd.compute_clip_text_embedding(prompt, negative_text=negative_prompt), None
        text, pooled = sd.compute_clip_text_embedding(prompt, negative_text=negative_prompt)
        if not negative_prompt:
            text[0], pooled[0] = 0, 0
        return text, pooled

    def __call__(self, images: Sequence[int], classifier_free_guidance: bool = True) -> dict[str, Tensor]:
        """Keyword arguments of the model's call for a batch of images: `[uncond ... | cond ...]`, or `[cond ...]`
        without classifier-free guidance."""
        halves = (0, 1) if classifier_free_guidance else (1,)

        def guided(tensors: list[Tensor]) -> Tensor:
            return torch.cat([tensors[i][half : half + 1] for half in halves for i in images])

        kwargs = {"clip_text_embedding": guided(self._texts)}
        if self._pooled:
            kwargs["pooled_text_embedding"] = guided(self._pooled)
            kwargs["time_ids"] = self._time_ids.repeat(len(halves) * len(images), 1)
        return kwargs
