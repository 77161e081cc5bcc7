"""Sets of 4 to 32 images with a full-size, random-weight SDXL: time per image and peak memory against set size.

Two ways of generating a set:
- through the reference cache (the reference once per step, targets in chunks of `--chunk-size`), as `generate` does;
- in one batch holding the whole set (the reference implementation's way), for comparison.
Each (set size, way) runs in a child process of this one, which builds the same random pipeline, warms up, then
generates the set (`--steps` denoising steps at `--size` px, and decoding) and reports its time and its peak resident
memory (ru_maxrss: the peak RSS of the whole process, pipeline included). Large tensors are returned to the system
when freed (glibc's mmap threshold is fixed), so that resident memory follows what is live.

    python scripts/bench_sets.py [--sizes 4 8 16 32] [--chunk-size 4] [--size 128] [--steps 1]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from measure import gib  # the scripts' folder is on the path when a script runs
from refiners.foundationals.latent_diffusion import SDXLUNet, StableDiffusion_XL
from refiners.foundationals.latent_diffusion.solvers import DDIM
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXLAutoencoder
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.text_encoder import DoubleTextEncoder

from style_aligned import StyleAlignedAdapter
from style_aligned.pipeline.conditioning import SetConditioning
from style_aligned.pipeline.denoise import denoise_set
from style_aligned.pipeline.generate import decode, initial_noise
from style_aligned.pipeline.spec import SetSpec
from style_aligned.weights.random_weights import build_random

OBJECTS = ["train", "airplane", "bicycle", "car", "boat", "owl", "castle", "teapot"]


def random_sdxl() -> StableDiffusion_XL:
    return StableDiffusion_XL(
        unet=build_random(lambda: SDXLUNet(in_channels=4), seed=0),
        clip_text_encoder=build_random(DoubleTextEncoder, seed=1),
        lda=build_random(SDXLAutoencoder, seed=2),
        solver=DDIM(num_inference_steps=50),
    )


def run_set(sd: StableDiffusion_XL, count: int, chunk_size: int | None, size: int, steps: int) -> float:
    """Generate a set of `count` images; return the seconds it took."""
    prompts = [f"a toy {OBJECTS[i % len(OBJECTS)]} number {i}. macro photo. 3d game asset" for i in range(count)]
    spec = SetSpec(prompts=prompts, width=size, height=size, steps=steps, chunk_size=chunk_size).resolved(sd)
    assert spec.guidance is not None
    conditioning = SetConditioning(sd, prompts, "", width=size, height=size)
    latents = initial_noise(spec, count, device=sd.device, dtype=sd.dtype)
    sd.solver = DDIM(num_inference_steps=steps)
    adapter = StyleAlignedAdapter(sd.unet).inject()
    start = time.perf_counter()
    with torch.no_grad():
        if chunk_size is None:  # the whole set in one batch, the reference in it
            x = latents
            for step in sd.steps:
                x = sd(x, step, **conditioning(list(range(count))), condition_scale=spec.guidance)
        else:
            x = denoise_set(
                sd, adapter, latents, conditioning=conditioning, guidance=spec.guidance, chunk_size=chunk_size
            )
        decode(sd, x)
    seconds = time.perf_counter() - start
    adapter.eject()
    return seconds


def child(count: int, chunk_size: int | None, size: int, steps: int) -> None:
    sd = random_sdxl()
    run_set(sd, 2, chunk_size, size, 1)  # warm up
    seconds = run_set(sd, count, chunk_size, size, steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32], help="set sizes")
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)  # set size, chunk size (0: one batch)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1] or None, args.size, args.steps)

    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SDXL {args.size}px, {args.steps} step(s)")
    print("| set size | way | time per image | peak RSS of the process | peak RSS / that of the smallest set |")
    print("|---|---|---|---|---|")
    first: dict[str, int] = {}
    for count in args.sizes:
        for way, chunk_size in ((f"cache, chunks of {args.chunk_size}", args.chunk_size), ("one batch", 0)):
            command = [sys.executable, __file__, "--child", str(count), str(chunk_size)]
            command += ["--size", str(args.size), "--steps", str(args.steps)]
            output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
            result = json.loads(output.strip().splitlines()[-1])
            first.setdefault(way, result["peak_rss"])
            print(
                f"| {count} | {way} | {result['seconds'] / count:.2f} s | {gib(result['peak_rss'])} |"
                f" {result['peak_rss'] / first[way]:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
