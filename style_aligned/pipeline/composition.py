"""ControlNets, LoRAs and an IP-Adapter applied to a model while a set is generated, and removed afterwards."""

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from PIL import Image
from refiners.fluxion.utils import image_to_tensor
from refiners.foundationals.clip.image_encoder import CLIPImageEncoderH
from refiners.foundationals.latent_diffusion import (
    SD1ControlnetAdapter,
    SD1IPAdapter,
    SDXLIPAdapter,
    StableDiffusion_1,
    StableDiffusion_XL,
)
from torch import Tensor

from style_aligned.pipeline.images import fit_image
from style_aligned.weights.controlnet_xl import SDXLControlnetAdapter
from style_aligned.weights.hub import resolve_file
from style_aligned.weights.ip_adapter import image_encoder_to_refiners, ip_adapter_to_refiners
from style_aligned.weights.loading import load_model
from style_aligned.weights.lora import LoraManager, load_lora_file
from style_aligned.weights.safetensors_io import read_tensors

StableDiffusion = StableDiffusion_XL | StableDiffusion_1
ImageSource = str | Path | Image.Image
_IP_KV = ("to_k_ip", "to_v_ip")


@dataclass
class ControlSpec:
    """A ControlNet that guides the targets of a set (the reference gets no control unless asked).

    Attributes:
        weights: A ControlNet file converted by `style-aligned convert` (SD1 or SDXL, as the model), or such a file
            on the Hub (`org/name/path/in/repo.safetensors`).
        images: The control images: one for all targets, or one per target, in order.
        scale: The factor on the ControlNet's residuals.
    """

    weights: str | Path
    images: list[ImageSource]
    scale: float = 1.0


@dataclass
class LoraSpec:
    """A LoRA file (kohya, peft or diffusers layout; a path or a Hub file `org/name/path.safetensors`) and its scale."""

    path: str | Path
    scale: float = 1.0


@dataclass(kw_only=True)
class IPAdapterSpec:
    """An IP-Adapter whose image prompt conditions every image of the set.

    Attributes:
        weights: The IP-Adapter's weights (`.safetensors`) as published (`image_proj.*`, `ip_adapter.N.*`) or in
            Refiners' layout: a file, or a Hub file `org/name/path/in/repo.safetensors`.
        image_encoder: The CLIP ViT-H image encoder's weights in the transformers layout (as published beside the
            IP-Adapters) or in Refiners' layout: a file, or a Hub file.
        image: The image prompt.
        scale: The IP-Adapter's scale.
    """

    weights: str | Path
    image_encoder: str | Path
    image: ImageSource
    scale: float = 1.0


@dataclass
class Extras:
    """What is added to the model for a set."""

    controls: list[ControlSpec] = field(default_factory=lambda: [])
    loras: list[LoraSpec] = field(default_factory=lambda: [])
    ip_adapter: IPAdapterSpec | None = None


def _to(tensors: dict[str, Tensor], sd: StableDiffusion) -> dict[str, Tensor]:
    return {key: tensor.to(device=sd.device, dtype=sd.dtype) for key, tensor in tensors.items()}


def _open(image: ImageSource) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        opened = Image.open(image)
        opened.load()
        return opened
    except OSError as error:
        raise ValueError(f"cannot read the image {image}: {error}") from None


def _load_ip_adapter(adapter: Any, weights: dict[str, Tensor], path: str | Path) -> None:
    """Load IP-Adapter weights in Refiners' layout, with an error that names what does not fit."""
    projection = {key.removeprefix("image_proj."): v for key, v in weights.items() if key.startswith("image_proj.")}
    expected = {f"ip_adapter.{i:03d}.{name}.weight" for i in range(len(adapter.sub_adapters)) for name in _IP_KV}
    given = set(weights) - {f"image_proj.{key}" for key in projection}
    if given != expected:
        unknown, missing = sorted(given - expected)[:5], sorted(expected - given)[:5]
        raise ValueError(
            f"{path} is not an IP-Adapter for this model in Refiners' layout: unknown keys {unknown},"
            f" missing keys {missing} (expected image_proj.* and {len(expected)} ip_adapter.NNN.to_k_ip/to_v_ip)"
        )
    try:
        adapter.image_proj.load_state_dict(projection)
    except RuntimeError as error:
        raise ValueError(f"the image projection of {path} does not fit this model: {error}") from None
    for index, cross_attention in enumerate(adapter.sub_adapters):
        key, value = (weights[f"ip_adapter.{index:03d}.{name}.weight"] for name in _IP_KV)
        if key.shape != cross_attention.image_key_projection.weight.shape:
            raise ValueError(f"the IP-Adapter layer {index} of {path} has shape {tuple(key.shape)}, not this model's")
        cross_attention.load_weights(key, value)


class Composition:
    """Applies a set's ControlNets, LoRAs and IP-Adapter to a model, and sets their inputs for each U-Net call.

    Use it as a context manager: everything is removed on exit, and if applying fails midway, what was applied is
    removed before the error propagates.
    """

    def __init__(self, sd: StableDiffusion, extras: Extras, num_images: int, *, width: int, height: int) -> None:
        """Check the extras against the set.

        Raises:
            ValueError: If a ControlNet has neither one image for all targets nor one per target.
        """
        self.sd, self.extras = sd, extras
        self.width, self.height = width, height
        for control in extras.controls:
            if len(control.images) not in (1, num_images - 1):
                raise ValueError(
                    f"a ControlNet needs one control image for all targets or one per target ({num_images - 1}),"
                    f" got {len(control.images)}"
                )
        self._controls: list[tuple[Any, list[Tensor]]] = []
        self._lora_names: list[str] = []
        self._ip_adapter: Any = None
        self._ip_embedding: Tensor | None = None

    def __enter__(self) -> "Composition":
        try:
            self._apply()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _apply(self) -> None:
        sd, extras = self.sd, self.extras
        manager = LoraManager(sd)
        for index, lora in enumerate(extras.loras):
            name = f"lora_{index}"
            manager.add_loras(name, tensors=load_lora_file(resolve_file(lora.path)), scale=lora.scale)
            self._lora_names.append(name)
        if extras.ip_adapter is not None:  # before the ControlNets, so that it conditions the U-Net only
            self._ip_adapter, self._ip_embedding = self._image_prompt(extras.ip_adapter)
        for index, control in enumerate(extras.controls):
            adapter = self._controlnet(control, f"control_{index}").inject()
            conditions = [
                image_to_tensor(fit_image(_open(image), self.width, self.height), device=sd.device, dtype=sd.dtype)
                for image in control.images
            ]
            self._controls.append((adapter, conditions))

    def _controlnet(self, control: ControlSpec, name: str) -> Any:
        sd = self.sd
        if isinstance(sd, StableDiffusion_XL):
            weights = load_model(control.weights, device=sd.device, dtype=sd.dtype, kind="sdxl_controlnet").state_dict()
            return SDXLControlnetAdapter(sd.unet, name=name, scale=control.scale, weights=weights)
        weights = load_model(control.weights, device=sd.device, dtype=sd.dtype, kind="sd1_controlnet").state_dict()
        return SD1ControlnetAdapter(sd.unet, name=name, scale=control.scale, weights=weights)

    def _image_prompt(self, spec: IPAdapterSpec) -> tuple[Any, Tensor]:
        sd = self.sd
        with torch.device("meta"):
            encoder = CLIPImageEncoderH()
        encoder_weights = image_encoder_to_refiners(read_tensors(resolve_file(spec.image_encoder)))
        try:
            encoder.load_state_dict(_to(encoder_weights, sd), assign=True)
        except RuntimeError as error:
            message = str(error).splitlines()[0]
            raise ValueError(f"{spec.image_encoder} is not a CLIP ViT-H image encoder: {message}") from None
        weights = read_tensors(resolve_file(spec.weights))
        if isinstance(sd, StableDiffusion_XL):
            adapter: Any = SDXLIPAdapter(sd.unet, clip_image_encoder=encoder, scale=spec.scale)
        else:
            adapter = SD1IPAdapter(sd.unet, clip_image_encoder=encoder, scale=spec.scale)
        weights = _to(ip_adapter_to_refiners(weights, len(adapter.sub_adapters), str(spec.weights)), sd)
        _load_ip_adapter(adapter, weights, spec.weights)
        adapter.inject()
        with torch.no_grad():
            embedding = adapter.compute_clip_image_embedding(_open(spec.image))  # (2, tokens, dim): [negative, image]
        return adapter, embedding

    def before_call(self, images: Sequence[int], classifier_free_guidance: bool = True) -> None:
        """Set the inputs of the extras for a U-Net call on these images (`[uncond ... | cond ...]`, or `[cond ...]`
        without classifier-free guidance)."""
        halves = 2 if classifier_free_guidance else 1
        for adapter, conditions in self._controls:
            rows = [
                torch.zeros_like(conditions[0]) if image == 0 else conditions[min(image - 1, len(conditions) - 1)]
                for image in images
            ]  # the reference's row is ignored unless the reference is controlled too
            adapter.set_controlnet_condition(torch.cat(rows * halves))
        if self._ip_adapter is not None and self._ip_embedding is not None:
            negative, positive = self._ip_embedding.chunk(2)
            count = len(images)
            embeddings = [negative] * count + [positive] * count if classifier_free_guidance else [positive] * count
            self._ip_adapter.set_clip_image_embedding(torch.cat(embeddings))

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for adapter, _ in reversed(self._controls):
            adapter.eject()
        self._controls.clear()
        if self._ip_adapter is not None:
            self._ip_adapter.eject()
            self._ip_adapter = None
        if self._lora_names:
            LoraManager(self.sd).remove_loras(*self._lora_names)
            self._lora_names.clear()
        self._ip_embedding = None
        gc.collect()  # Refiners layers hold reference cycles: free the ejected weights now, not at a later collection
