"""The denoising of a whole FLUX.1 set on a reduced-depth transformer of full width: this project's shared attention
against AlignedGen's masked way, and against plain (unshared) denoising.

A set of `--images` images (1 reference + targets, no classifier-free guidance) at `--pixels` px, `--steps` flow
steps of FLUX.1 [dev]'s schedule, on a random FluxTransformer of `--double` double-stream and `--single`
single-stream blocks at FLUX.1's width (24 heads of 128), random text embeddings of `--text-tokens` tokens. Every
single-stream block shares (AlignedGen's default), lambda 1.1, shifted positions. Variants, in this process on the
same weights, noise and text:

- plain: the transformer as it is;
- style-aligned: `StyleAlignedAdapter(transformer).inject()`, the set denoised by `denoise_set` in one batch;
- masked way: every shared layer's attention replaced, at every step, by the independent implementation of
  AlignedGen's processor in the tests (`tests/helpers/aligned_gen.py`: concatenation and a dense float mask of
  shape (batch, 24, queries, keys)), the same loop.

Times are of one whole denoising (no warm-up: each call takes seconds to minutes on a CPU); memory is the peak the
denoising adds to what is live before it (see `measure.py`). The final latents of style-aligned and the masked way
are compared.

    python scripts/bench_flux_set.py [--pixels 512] [--images 4] [--steps 2] [--double 2 --single 4] [--text-tokens 512]
"""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from measure import Measure, gib, measure  # the scripts' folder is on the path when a script runs
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parents[1]))  # the tests' independent implementation of AlignedGen

from style_aligned import StyleAlignedAdapter  # noqa: E402
from style_aligned.flux import FluxConfig, FluxTransformer, image_ids, text_ids  # noqa: E402
from style_aligned.flux.solver import FlowMatchEuler, calculate_shift  # noqa: E402
from style_aligned.weights.random_weights import build_random  # noqa: E402
from tests.helpers.aligned_gen import AlignedGenSettings, aligned_gen  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, default=512, help="image side (tokens: (pixels / 16) ** 2)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = FluxConfig(num_layers=args.double, num_single_layers=args.single)
    model = build_random(lambda: FluxTransformer(config), seed=0).to(device=device, dtype=dtype).eval()
    latent = args.pixels // 8
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(args.images, (latent // 2) ** 2, config.in_channels, generator=generator)
    text = torch.randn(args.images, args.text_tokens, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(args.images, config.pooled_projection_dim, generator=generator)
    given = {"noise": noise, "text": text, "pooled": pooled}
    given = {key: value.to(device=device, dtype=dtype) for key, value in given.items()}
    ids = {"text_ids": text_ids(args.text_tokens, device=device), "image_ids": image_ids(latent, latent, device=device)}
    solver = FlowMatchEuler(args.steps, mu=calculate_shift((latent // 2) ** 2), device=device)

    def call(x: Tensor, step: int) -> Tensor:
        model.set_timestep(timestep=solver.timesteps[step].expand(x.shape[0]).to(dtype))
        model.set_guidance(guidance=torch.full((x.shape[0],), 3.5, device=device, dtype=dtype))
        model.set_text_embedding(text_embedding=given["text"])
        model.set_pooled_text_embedding(pooled_text_embedding=given["pooled"])
        model.set_text_ids(text_ids=ids["text_ids"])
        model.set_image_ids(image_ids=ids["image_ids"])
        return model(x)

    def plain(steps: list[int]) -> Tensor:
        x = given["noise"]
        for step in steps:
            x = solver(x, call(x, step), step)
        return x

    def shared(steps: list[int]) -> Tensor:
        adapter = StyleAlignedAdapter(model, classifier_free_guidance=False).inject()
        try:
            return plain(steps)
        finally:
            adapter.eject()

    settings = AlignedGenSettings(shared=tuple(range(args.double, args.double + args.single)))

    def masked(steps: list[int]) -> Tensor:
        x = given["noise"]
        for step in steps:
            timestep = float(solver.timesteps[step].to(dtype))
            with aligned_gen(model, settings, timestep=timestep, **ids):
                x = solver(x, call(x, step), step)
        return x

    variants: dict[str, Callable[[list[int]], Tensor]] = {
        "plain denoising (no sharing)": plain,
        "style-aligned (log-sum-exp, no mask)": shared,
        "masked way (AlignedGen, dense mask)": masked,
    }
    results: dict[str, Measure] = {}
    finals: dict[str, Tensor] = {}
    every_step = list(range(args.steps))
    with torch.no_grad():
        for name, denoise in variants.items():

            def run(denoise: Callable[[list[int]], Tensor] = denoise, name: str = name) -> None:
                finals[name] = denoise(every_step)

            results[name] = measure(run, device, repeat=1, warmup=0)  # one whole denoising, timed and kept
            print(
                json.dumps(
                    {
                        "variant": name,
                        "seconds": round(results[name].seconds, 2),
                        "peak_bytes": results[name].peak_bytes,
                    }
                ),
                flush=True,
            )
    report(args, device, dtype, results, finals)


def report(
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    results: dict[str, Measure],
    finals: dict[str, Tensor],
) -> None:
    names = list(results)
    plain, ours, theirs = (results[name] for name in names)
    tokens = (args.pixels // 16) ** 2
    print(
        f"\n{args.images} images at {args.pixels} px ({tokens} image + {args.text_tokens} text tokens),"
        f" {args.steps} steps, {args.double} double + {args.single} single blocks,"
        f" {str(dtype).removeprefix('torch.')}, {device}:\n"
    )
    print("| variant | time | time / image | peak memory | time / plain | memory / plain |")
    print("|---|---|---|---|---|---|")
    for name, run in results.items():
        time_ratio, memory_ratio = run.ratio(plain)
        per_image = run.seconds / args.images
        print(
            f"| {name} | {run.seconds:.2f} s | {per_image:.2f} s | {gib(run.peak_bytes)} | {time_ratio:.2f}"
            f" | {memory_ratio:.2f} |"
        )
    time_ratio, memory_ratio = ours.ratio(theirs)
    difference = (finals[names[1]] - finals[names[2]]).abs().max().item()
    scale = finals[names[2]].abs().max().item()
    print(f"\nstyle-aligned against the masked way: time {time_ratio:.2f}, peak memory {memory_ratio:.3f}")
    print(f"final latents differ by at most {difference:.2e} ({difference / scale:.1e} relative)")


if __name__ == "__main__":
    main()
