"""The parts of a FLUX.1 pipeline, loaded together: transformer, autoencoder, both text encoders and the schedule."""

from dataclasses import dataclass, field
from typing import Any

import torch
from refiners.foundationals.clip.text_encoder import CLIPTextEncoderL

from style_aligned.flux.autoencoder import FluxAutoencoder
from style_aligned.flux.offload import ModelOffload
from style_aligned.flux.solver import FlowMatchEuler, calculate_shift
from style_aligned.flux.text_encoders import T5TextEncoder
from style_aligned.flux.transformer import FluxTransformer

TEXT_ENCODERS = ("clip_text_encoder", "t5")
"""The models of the first stage of a generation."""


@dataclass(kw_only=True)
class FluxModels:
    """A FLUX.1 pipeline's models.

    Attributes:
        transformer: The FLUX.1 transformer.
        autoencoder: The 16-channel autoencoder.
        clip_text_encoder: CLIP L, whose pooled vector conditions the transformer (None if not loaded).
        t5: T5-XXL, whose token embeddings are the text tokens (None if not loaded).
        scheduler: The diffusers `scheduler_config.json` of the pipeline (its shift settings), or {}.
        reference: What the models were loaded from, for messages and set files.
        model_offload: The offload made by `offload`, which the set pipeline then follows (None: no offload).
    """

    transformer: FluxTransformer
    autoencoder: FluxAutoencoder
    clip_text_encoder: CLIPTextEncoderL | None = None
    t5: T5TextEncoder | None = None
    scheduler: dict[str, Any] = field(default_factory=lambda: {})
    reference: str = ""
    model_offload: ModelOffload | None = field(default=None, repr=False)

    @property
    def is_schnell(self) -> bool:
        """Whether the transformer has no guidance embedding (FLUX.1 [schnell])."""
        return not self.transformer.config.guidance_embeds

    def solver(
        self, num_inference_steps: int, *, image_seq_len: int, device: torch.device | str = "cpu"
    ) -> FlowMatchEuler:
        """The flow-matching solver of the pipeline's schedule for an image of `image_seq_len` tokens: time-shifted by
        its size where the scheduler uses dynamic shifting ([dev]), else by its static shift ([schnell]: 1)."""
        config = self.scheduler
        if config.get("use_dynamic_shifting", not self.is_schnell):
            mu = calculate_shift(
                image_seq_len,
                base_seq_len=config.get("base_image_seq_len", 256),
                max_seq_len=config.get("max_image_seq_len", 4096),
                base_shift=config.get("base_shift", 0.5),
                max_shift=config.get("max_shift", 1.15),
            )
            return FlowMatchEuler(num_inference_steps, mu=mu, device=device)
        return FlowMatchEuler(num_inference_steps, shift=float(config.get("shift", 1.0)), device=device)

    def offload(self, device: torch.device | str, *, offload_device: torch.device | str = "cpu") -> ModelOffload:
        """A `ModelOffload` over the loaded models (`clip_text_encoder`, `t5`, `transformer`, `autoencoder`): use the
        text encoders, then the transformer, then the autoencoder, each stage alone on `device`. It is kept as
        `model_offload`, so that sets made with these models follow it."""
        models: dict[str, torch.nn.Module] = {"transformer": self.transformer, "autoencoder": self.autoencoder}
        if self.clip_text_encoder is not None:
            models["clip_text_encoder"] = self.clip_text_encoder
        if self.t5 is not None:
            models["t5"] = self.t5.model
        self.model_offload = ModelOffload(models, device=device, offload_device=offload_device)
        return self.model_offload
