"""StyleAligned with ControlNets, Control-LoRA, T2I-Adapter, LoRA and IP-Adapter on the random SDXL U-Net."""

import gc
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import refiners.fluxion.layers as fl
import torch
from refiners.foundationals.clip.image_encoder import CLIPImageEncoderH
from refiners.foundationals.latent_diffusion import SDXLIPAdapter, SDXLUNet
from refiners.foundationals.latent_diffusion.image_prompt import ImageProjection
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import ControlLoraAdapter
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.control_lora import ConditionEncoder, ZeroConvolution
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.t2i_adapter import SDXLT2IAdapter
from safetensors.torch import load_file, save_file

from style_aligned import StyleAlignedAdapter
from style_aligned.options import StyleAlignedOptions
from style_aligned.weights.controlnet_xl import SDXLControlnet, SDXLControlnetAdapter
from style_aligned.weights.lora import LoraManager
from style_aligned.weights.random_weights import build_random, fill_random_
from tests.helpers import models

REFERENCE_ROWS, TARGET_ROWS = [0, 2], [1, 3]  # batch of 1 reference + 1 target, with guidance


@pytest.fixture(scope="module")
def unet(sdxl_unet: SDXLUNet) -> SDXLUNet:
    return sdxl_unet


@pytest.fixture(scope="module")
def inputs(unet: SDXLUNet) -> dict[str, torch.Tensor]:
    return models.unet_inputs(unet, batch_size=4, size=4, seed=5)  # 4x4 latents: the smallest SDXL takes


@models.full_size_fixture()
def controlnet_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A random SDXL ControlNet's weights (5 GB), on disk: read when a test injects it, so that they are in memory
    beside the U-Net only while a ControlNet is."""
    path = tmp_path_factory.mktemp("controlnet") / "controlnet.safetensors"
    controlnet = build_random(lambda: SDXLControlnet(name="random"), seed=7)
    save_file(controlnet.state_dict(), path)
    del controlnet
    gc.collect()
    yield path
    path.unlink()


@pytest.fixture(autouse=True)
def free_adapters() -> Iterator[None]:
    """Free what a test's adapters held (a ControlNet's 5 GB) when it ends: Refiners modules hold reference cycles."""
    yield
    gc.collect()


def random_controlnet(unet: SDXLUNet, path: Path) -> SDXLControlnetAdapter:
    return SDXLControlnetAdapter(unet, name="depth", weights=load_file(path))


def conditions(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 32, 32, generator=generator).repeat(4, 1, 1, 1)


def run(unet: SDXLUNet, inputs: dict[str, torch.Tensor], before: Callable[[], None] = lambda: None) -> torch.Tensor:
    before()
    return models.run_unet(unet, inputs)


def test_controlnet_guides_the_targets_only(
    unet: SDXLUNet, inputs: dict[str, torch.Tensor], controlnet_file: Path
) -> None:
    style_aligned = StyleAlignedAdapter(unet).inject()
    without = models.run_unet(unet, inputs)
    controlnet = random_controlnet(unet, controlnet_file).inject()
    try:
        first = run(unet, inputs, lambda: controlnet.set_controlnet_condition(conditions(1)))
        second = run(unet, inputs, lambda: controlnet.set_controlnet_condition(conditions(2)))
    finally:
        controlnet.eject()
    style_aligned.eject()
    for output in (first, second):
        assert (output[REFERENCE_ROWS] - without[REFERENCE_ROWS]).abs().max().item() <= 1e-5
        assert (output[TARGET_ROWS] - without[TARGET_ROWS]).abs().max().item() > 1e-3
    assert (first[TARGET_ROWS] - second[TARGET_ROWS]).abs().max().item() > 1e-3  # each target follows its control

    controlled = StyleAlignedAdapter(
        unet, StyleAlignedOptions(control_reference=True)
    ).inject()  # the reference can be controlled too
    controlnet.inject()
    try:
        both = run(unet, inputs, lambda: controlnet.set_controlnet_condition(conditions(1)))
    finally:
        controlnet.eject()
        controlled.eject()
    assert (both[REFERENCE_ROWS] - without[REFERENCE_ROWS]).abs().max().item() > 1e-3


def test_control_lora_and_t2i_adapter_guide_the_targets_only(unet: SDXLUNet, inputs: dict[str, torch.Tensor]) -> None:
    control_lora = ControlLoraAdapter(name="canny", target=unet)  # built before StyleAligned: it copies U-Net blocks
    for layer in control_lora.control_lora.modules():  # its own weights only (its blocks share the U-Net's)
        if isinstance(layer, ZeroConvolution | ConditionEncoder):
            fill_random_(layer, seed=8)
    t2i = SDXLT2IAdapter(target=unet, name="sketch")
    fill_random_(t2i.condition_encoder, seed=9)
    style_aligned = StyleAlignedAdapter(unet).inject()
    without = models.run_unet(unet, inputs)
    for adapter, set_input in (
        (control_lora, lambda: control_lora.set_condition(conditions(3))),
        (t2i, lambda: t2i.set_condition_features(t2i.compute_condition_features(conditions(4)[:1]))),
    ):
        adapter.inject()
        try:
            with torch.no_grad():
                output = run(unet, inputs, set_input)
        finally:
            adapter.eject()
        assert (output[REFERENCE_ROWS] - without[REFERENCE_ROWS]).abs().max().item() <= 1e-5
        assert (output[TARGET_ROWS] - without[TARGET_ROWS]).abs().max().item() > 1e-3
    style_aligned.eject()


class Composable:
    """One of the four adapters of the pair tests, with what it needs before each U-Net call."""

    def __init__(
        self, name: str, make: Callable[[], Any], before: Callable[[Any], None], remove: Callable[[Any], None]
    ) -> None:
        self.name, self._make, self._before, self._remove = name, make, before, remove
        self.instance: Any = None

    def inject(self) -> None:
        self.instance = self._make()

    def prepare(self) -> None:
        self._before(self.instance)

    def eject(self) -> None:
        self._remove(self.instance)
        self.instance = None
        gc.collect()  # an ejected IP-Adapter holds 1 GB of projections in reference cycles


def lora_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(10)
    tensors: dict[str, torch.Tensor] = {}
    for block, channels in (("input_blocks_4_1", 640), ("middle_block_1", 1280), ("output_blocks_2_1", 1280)):
        key = f"lora_unet_{block}_transformer_blocks_0_attn1_to_q"
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, channels, generator=generator) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(channels, 4, generator=generator) * 0.3
    return tensors


@pytest.fixture(scope="module")
def composables(unet: SDXLUNet, controlnet_file: Path) -> dict[str, Composable]:
    holder = cast(Any, SimpleNamespace(unet=unet, clip_text_encoder=fl.Chain(), device=unet.device, dtype=unet.dtype))
    with torch.device("meta"):
        image_encoder = CLIPImageEncoderH()  # never run: the image embedding is given
    embedding = torch.randn(1, 4, 2048, generator=torch.Generator().manual_seed(11)).repeat(4, 1, 1)

    def ip_adapter() -> Any:
        projection = ImageProjection(clip_image_embedding_dim=1024, clip_text_embedding_dim=2048)
        adapter = SDXLIPAdapter(unet, clip_image_encoder=image_encoder, image_proj=projection, scale=0.8)
        for sub_adapter in adapter.sub_adapters:
            fill_random_(sub_adapter.image_cross_attention, seed=12)
        return adapter.inject()

    def lora() -> Any:
        manager = LoraManager(holder)
        manager.add_loras("style", tensors=lora_tensors(), scale=0.9)
        return manager

    def nothing(_: Any) -> None:
        pass

    return {
        "style-aligned": Composable(
            "style-aligned", lambda: StyleAlignedAdapter(unet).inject(), nothing, lambda a: a.eject()
        ),
        "controlnet": Composable(
            "controlnet",
            lambda: random_controlnet(unet, controlnet_file).inject(),
            lambda a: a.set_controlnet_condition(conditions(6)),
            lambda a: a.eject(),
        ),
        "lora": Composable("lora", lora, nothing, lambda manager: manager.remove_loras("style")),
        "ip-adapter": Composable(
            "ip-adapter", ip_adapter, lambda a: a.set_clip_image_embedding(embedding), lambda a: a.eject()
        ),
    }


@pytest.fixture(scope="module")
def alone(
    unet: SDXLUNet, inputs: dict[str, torch.Tensor], composables: dict[str, Composable]
) -> dict[str, torch.Tensor]:
    """The U-Net's output with nothing, and with each adapter alone; and the U-Net's state at the start."""
    outputs = {"plain": models.run_unet(unet, inputs)}
    for name, composable in composables.items():
        composable.inject()
        outputs[name] = run(unet, inputs, composable.prepare)
        composable.eject()
        assert not torch.equal(outputs[name], outputs["plain"])
    return outputs


@pytest.fixture(scope="module")
def together() -> dict[frozenset[str], torch.Tensor]:
    """The output with both adapters of a pair, for the first injection order tested."""
    return {}


PAIRS = [
    pair
    for pair in itertools.permutations(["style-aligned", "controlnet", "lora", "ip-adapter"], 2)
    if "style-aligned" in pair
]
"""StyleAligned with each other adapter, injected first or second (pairs of the others are Refiners' own affair)."""


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_pairs_inject_in_any_order_and_eject_in_any_order(
    unet: SDXLUNet,
    inputs: dict[str, torch.Tensor],
    composables: dict[str, Composable],
    alone: dict[str, torch.Tensor],
    together: dict[frozenset[str], torch.Tensor],
    first: str,
    second: str,
) -> None:
    modules = [(name, type(module)) for name, module in unet.named_modules()]
    parameters = {name: (id(p), p.data_ptr(), p._version) for name, p in unet.named_parameters()}  # noqa: SLF001
    a, b = composables[first], composables[second]

    def prepare() -> None:
        a.prepare()
        b.prepare()

    results: list[torch.Tensor] = []
    for ejected_first in (a, b):  # inject first then second; eject either first
        a.inject()
        b.inject()
        if not results:
            results.append(run(unet, inputs, prepare))
        remaining = b if ejected_first is a else a
        ejected_first.eject()
        assert torch.equal(run(unet, inputs, remaining.prepare), alone[remaining.name])  # the other still works
        remaining.eject()
        assert [(name, type(module)) for name, module in unet.named_modules()] == modules
    assert not torch.equal(results[0], alone[a.name]) and not torch.equal(results[0], alone[b.name])
    pair = frozenset((first, second))
    # The other injection order gives the same output, except for Refiners' IP-Adapter after a ControlNet: it also
    # adapts the cross-attention layers of a ControlNet already in the U-Net.
    if pair in together and pair != {"controlnet", "ip-adapter"}:
        assert torch.equal(together[pair], results[0])
    together[pair] = results[0]
    current = {name: (id(p), p.data_ptr(), p._version) for name, p in unet.named_parameters()}  # noqa: SLF001
    assert current == parameters  # the same tensors, never written to
    if first == "style-aligned":  # and the same outputs (once per other adapter: each U-Net call takes seconds)
        assert torch.equal(models.run_unet(unet, inputs), alone["plain"])
