"""Whole 4-image sets on a random-weight SD1 pipeline: the reference method's way against this project's solvers.

All in one process, on the same pipeline, each set timed end to end (text encoding, denoising, decoding):
- the reference method's way: the whole set in one batch with the reference in it, 50 DDIM steps with CFG (every
  step one U-Net call of 8 rows, as the reference implementation runs its sets);
- `generate_set` with DDIM, 50 steps, CFG 7.5;
- `generate_set` with DPM-Solver++, 20 steps, CFG 7.5;
- `generate_set` with Euler, trailing spacing, 4 steps, without CFG (guidance 1).

    python scripts/bench_set_solvers.py [--size 256] [--device cpu|cuda] [--dtype float32|float16] [--reverse]

`--reverse` runs the ways in the opposite order (the reference method's way last), to show order effects.

Prints one JSON object per way, then a Markdown table with the ratio of each to the reference method's time.
"""

import argparse
import json
import time
from collections.abc import Callable

import torch
from refiners.foundationals.clip.text_encoder import CLIPTextEncoderL
from refiners.foundationals.latent_diffusion import SD1UNet, StableDiffusion_1
from refiners.foundationals.latent_diffusion.stable_diffusion_1.model import SD1Autoencoder

from style_aligned import StyleAlignedAdapter
from style_aligned.options import StyleAlignedOptions
from style_aligned.pipeline.conditioning import SetConditioning
from style_aligned.pipeline.generate import decode, generate_set, initial_noise
from style_aligned.pipeline.solvers import ddim
from style_aligned.pipeline.spec import SetSpec
from style_aligned.weights.random_weights import build_random

PROMPTS = [f"a toy {name}. macro photo. 3d game asset" for name in ("train", "airplane", "bicycle", "car")]
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def random_sd1(device: torch.device, dtype: torch.dtype) -> StableDiffusion_1:
    return StableDiffusion_1(
        unet=build_random(lambda: SD1UNet(in_channels=4), seed=1, device=device, dtype=dtype),
        lda=build_random(SD1Autoencoder, seed=2, device=device, dtype=dtype),
        clip_text_encoder=build_random(CLIPTextEncoderL, seed=3, device=device, dtype=dtype),
        device=device,
        dtype=dtype,
    )


def reference_way(sd: StableDiffusion_1, spec: SetSpec) -> None:
    """The whole set in one batch, the reference in it, DDIM with CFG, StyleAligned as the reference method runs it."""
    spec = spec.resolved(sd)
    assert spec.width is not None and spec.height is not None and spec.guidance is not None
    prompts = spec.image_prompts()
    conditioning = SetConditioning(sd, prompts, spec.negative_prompt, width=spec.width, height=spec.height)
    x = initial_noise(spec, len(prompts), device=sd.device, dtype=sd.dtype)
    previous, sd.solver = sd.solver, ddim(sd, spec.steps)
    adapter = StyleAlignedAdapter(sd.unet, StyleAlignedOptions(share_group_norm=True)).inject()
    try:
        with torch.no_grad():
            for step in sd.steps:
                x = sd(x, step, **conditioning(list(range(len(prompts)))), condition_scale=spec.guidance)
        decode(sd, x)
    finally:
        adapter.eject()
        sd.solver = previous


def timed(function: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image size in pixels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--reverse", action="store_true", help="run the reference method's way last")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sd = random_sd1(device, dtype)
    size, style = args.size, StyleAlignedOptions(share_group_norm=True)
    base = SetSpec(prompts=PROMPTS, width=size, height=size, seed=0, style=style)
    ways: dict[str, Callable[[], object]] = {
        "reference method's way: one batch, DDIM 50, CFG": lambda: reference_way(sd, base),
        "style-aligned, DDIM 50, CFG": lambda: generate_set(sd, SetSpec(**{**base.__dict__, "steps": 50})),
        "style-aligned, DPM-Solver++ 20, CFG": lambda: generate_set(
            sd, SetSpec(**{**base.__dict__, "steps": 20, "solver": "dpm"})
        ),
        "style-aligned, Euler trailing 4, no CFG": lambda: generate_set(
            sd,
            SetSpec(**{**base.__dict__, "steps": 4, "solver": "euler", "timestep_spacing": "trailing", "guidance": 1}),
        ),
    }
    generate_set(sd, SetSpec(**{**base.__dict__, "steps": 1}))  # warm up
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, {args.dtype}, {size}x{size} px")
    seconds: dict[str, float] = {}
    for name, run in reversed(ways.items()) if args.reverse else ways.items():
        seconds[name] = timed(run, device)
        print(json.dumps({"way": name, "seconds": round(seconds[name], 2), "size": size, "device": str(device)}))
    baseline = seconds[next(iter(ways))]
    print("\n| set of 4 images | wall time | / reference method's |\n|---|---|---|")
    for name in ways:
        print(f"| {name} | {seconds[name]:.1f} s | {seconds[name] / baseline:.3f} |")


if __name__ == "__main__":
    main()
