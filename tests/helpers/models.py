"""Full-size random-weight models shared by the tests: built once, and one large model family in memory at a time.

A test gets a full-size model only through a fixture declared with `full_size_fixture`: `tests/conftest.py` marks
`slow` every test whose fixtures include one, and fails any other test that builds a large model.
"""

import gc
from collections.abc import Callable, Collection
from typing import Any, TypeVar, cast

import pytest
import torch
from refiners.foundationals.clip.text_encoder import CLIPTextEncoderL
from refiners.foundationals.latent_diffusion import SD1UNet, SDXLUNet, StableDiffusion_1
from refiners.foundationals.latent_diffusion.solvers import DDIM
from refiners.foundationals.latent_diffusion.stable_diffusion_1.model import SD1Autoencoder

from style_aligned.weights.random_weights import build_random
from tests.helpers.peak_memory import trim

F = TypeVar("F", bound=Callable[..., Any])

FULL_SIZE_FIXTURES: set[Callable[..., Any]] = set()
"""The fixture functions that build or load full-size models (filled by `full_size_fixture`)."""


def full_size_fixture(*, scope: str = "module", **options: Any) -> Callable[[F], F]:
    """Declare a fixture that builds or loads a full-size model: every test that uses it, directly or through other
    fixtures, is marked `slow`. Module scope by default, so that pytest drops the model when the module ends."""

    def declare(function: F) -> F:
        FULL_SIZE_FIXTURES.add(function)
        return cast(F, pytest.fixture(scope=scope, **options)(function))  # type: ignore[call-overload]

    return declare


def uses_full_size_fixture(item: pytest.Item) -> bool:
    """Whether a test's fixtures, with those they use in turn, include one declared with `full_size_fixture`."""
    info = getattr(item, "_fixtureinfo", None)
    definitions = info.name2fixturedefs.values() if info is not None else ()
    return any(chain[-1].func in FULL_SIZE_FIXTURES for chain in definitions if chain)  # the definition in effect


_held: dict[str, Any] = {}


def held(name: str, factory: Callable[[], Any]) -> Any:
    """Return the model called `name`, building it (after dropping any other held model) if needed."""
    if name not in _held:
        release()
        _held[name] = factory()
    return _held[name]


def release(keep: Collection[str] = ()) -> None:
    """Drop the held models (but those named in `keep`) and free their memory."""
    dropped = [name for name in _held if name not in keep]
    for name in dropped:
        del _held[name]
    if dropped:
        gc.collect()
        trim()


def sdxl_unet() -> SDXLUNet:
    return cast(SDXLUNet, held("sdxl_unet", lambda: build_random(lambda: SDXLUNet(in_channels=4), seed=0)))


def sd1() -> StableDiffusion_1:
    def build() -> StableDiffusion_1:
        return StableDiffusion_1(
            unet=build_random(lambda: SD1UNet(in_channels=4), seed=1),
            lda=build_random(SD1Autoencoder, seed=2),
            clip_text_encoder=build_random(CLIPTextEncoderL, seed=3),
            solver=DDIM(num_inference_steps=2),
        )

    return cast(StableDiffusion_1, held("sd1_random", build))


def unet_inputs(unet: SD1UNet | SDXLUNet, batch_size: int, size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random latents and conditioning for one U-Net call."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(batch_size, 4, size, size, generator=generator),
        "timestep": torch.tensor([400]),
    }
    if isinstance(unet, SDXLUNet):
        inputs["clip_text_embedding"] = torch.randn(batch_size, 77, 2048, generator=generator)
        inputs["pooled_text_embedding"] = torch.randn(batch_size, 1280, generator=generator)
        inputs["time_ids"] = torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch_size).float()
    else:
        inputs["clip_text_embedding"] = torch.randn(batch_size, 77, 768, generator=generator)
    return inputs


@torch.no_grad()
def run_unet(unet: SD1UNet | SDXLUNet, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Set the U-Net's context (reset after every call) and run it."""
    unet.set_timestep(timestep=inputs["timestep"])
    unet.set_clip_text_embedding(clip_text_embedding=inputs["clip_text_embedding"])
    if isinstance(unet, SDXLUNet):
        unet.set_pooled_text_embedding(pooled_text_embedding=inputs["pooled_text_embedding"])
        unet.set_time_ids(time_ids=inputs["time_ids"])
    return unet(inputs["x"])


def fingerprint(module: torch.nn.Module) -> dict[str, tuple[Any, ...]]:
    """Each state-dict key with its tensor's storage, shape, dtype and a checksum of its raw bits.

    Equal fingerprints mean the same keys and bit-identical tensors, without copying a 10 GB state dict.
    """
    bit_types = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return {
        key: (
            tensor.data_ptr(),
            tuple(tensor.shape),
            tensor.dtype,
            int(tensor.reshape(-1).view(bit_types[tensor.element_size()]).sum(dtype=torch.int64)),
        )
        for key, tensor in module.state_dict().items()
    }
