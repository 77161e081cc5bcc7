"""FLUX.1 transformer speed and memory against diffusers' `FluxTransformer2DModel`, on random weights of full width.

Two measurements, each against diffusers in the same run:

- `step`: one transformer call at 1024 px (4096 image tokens + 512 text tokens, batch of 1), both models holding the
  same weights (converted by this project), in one process: time (median of `--repeat` after a warm-up) and the peak
  memory a call adds to what is live before it.
- `load`: load to first step, each in a fresh process, alternately so that both see the same page cache: diffusers'
  `FluxTransformer2DModel.from_pretrained` against `load_flux_transformer` on the same diffusers `transformer/`
  folder, then one call at 256 px (256 image + 256 text tokens); imports are timed apart and not counted.

The depth is set by `--double` and `--single` (FLUX.1 has 19 and 38); the width is FLUX.1's (24 heads of 128, text
4096, pooled 768), so a block costs what it costs in the full model.

    python scripts/bench_flux.py step [--double 1 --single 1] [--dtype float32] [--repeat 1]
    python scripts/bench_flux.py load [--double 2 --single 4] [--rounds 2] [--workdir DIR]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from measure import gib, measure, release_memory  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def config(double: int, single: int) -> Any:
    from style_aligned.flux import FluxConfig

    return FluxConfig(num_layers=double, num_single_layers=single)


def inputs(cfg: Any, *, size: int, text_tokens: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Random inputs of one call on a `size` px image (`(size / 16)^2` tokens), diffusers' argument names."""
    from style_aligned.flux import image_ids, text_ids

    generator = torch.Generator().manual_seed(0)
    latent = size // 8

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return {
        "hidden_states": randn(1, (latent // 2) ** 2, cfg.in_channels),
        "encoder_hidden_states": randn(1, text_tokens, cfg.joint_attention_dim),
        "pooled_projections": randn(1, cfg.pooled_projection_dim),
        "timestep": torch.tensor([0.5], device=device, dtype=dtype),
        "guidance": torch.tensor([3.5], device=device, dtype=dtype),
        "img_ids": image_ids(latent, latent, device=device),
        "txt_ids": text_ids(text_tokens, device=device),
    }


def call_refiners(model: Any, given: dict[str, Any]) -> torch.Tensor:
    model.set_timestep(timestep=given["timestep"] * 1000)  # diffusers multiplies the sigma by 1000 inside
    model.set_guidance(guidance=given["guidance"])
    model.set_text_embedding(text_embedding=given["encoder_hidden_states"])
    model.set_pooled_text_embedding(pooled_text_embedding=given["pooled_projections"])
    model.set_text_ids(text_ids=given["txt_ids"])
    model.set_image_ids(image_ids=given["img_ids"])
    return model(given["hidden_states"])


def random_diffusers(cfg: Any, dtype: torch.dtype) -> Any:
    from diffusers import FluxTransformer2DModel  # type: ignore[import-untyped]

    from style_aligned.weights.random_weights import fill_random_

    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg.to_diffusers())
    model = model.to_empty(device="cpu")
    fill_random_(model, 0)
    return model.to(dtype=dtype).eval().requires_grad_(False)


def step(args: argparse.Namespace) -> None:
    from style_aligned.weights.flux import load_flux_transformer

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = config(args.double, args.single)
    theirs = random_diffusers(cfg, dtype).to(device)
    ours = load_flux_transformer(theirs.state_dict(), config=cfg, device=device, dtype=dtype)
    given = inputs(cfg, size=1024, text_tokens=512, device=device, dtype=dtype)
    with torch.no_grad():
        difference = (call_refiners(ours, given) - theirs(**given).sample).abs().max().item()
        release_memory()
        runs = {
            "diffusers `FluxTransformer2DModel`": measure(lambda: theirs(**given), device, args.repeat, warmup=1),
            "style-aligned `FluxTransformer`": measure(lambda: call_refiners(ours, given), device, args.repeat, 1),
        }
    baseline = runs["diffusers `FluxTransformer2DModel`"]
    print(f"{args.double} double + {args.single} single blocks, 4096 + 512 tokens, {args.dtype}, {device}:")
    print("| model | time | peak memory | time / diffusers | memory / diffusers |\n|---|---|---|---|---|")
    for name, run in runs.items():
        time_ratio, memory_ratio = run.ratio(baseline)
        print(f"| {name} | {run.seconds:.2f} s | {gib(run.peak_bytes)} | {time_ratio:.2f} | {memory_ratio:.2f} |")
    print(f"outputs differ by at most {difference:.2e}")


def save(folder: Path, double: int, single: int) -> None:
    random_diffusers(config(double, single), torch.float32).save_pretrained(folder, safe_serialization=True)


def first_step(stage: str, folder: Path) -> dict[str, float]:
    """Load the transformer from `folder` and call it once at 256 px: the seconds of imports, load and both."""
    start = time.perf_counter()
    if stage == "diffusers":
        from diffusers import FluxTransformer2DModel  # type: ignore[import-untyped]
    else:
        from style_aligned.weights.flux import load_flux_transformer
    imported = time.perf_counter()
    if stage == "diffusers":
        model: Any = FluxTransformer2DModel.from_pretrained(folder).eval()
    else:
        model = load_flux_transformer(folder)
    loaded = time.perf_counter()
    cfg = config(1, 1)  # the widths are FLUX.1's whatever the depth
    given = inputs(cfg, size=256, text_tokens=256, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        model(**given) if stage == "diffusers" else call_refiners(model, given)
    return {"imports": imported - start, "load": loaded - imported, "total": time.perf_counter() - imported}


def child(stage: str, folder: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "load", "--stage", stage, str(folder)]
    result = subprocess.run(command, check=True, capture_output=True, text=True, env=dict(os.environ))
    return json.loads(result.stdout.strip().splitlines()[-1])


def load(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        folder = workdir / "transformer"
        subprocess.run([sys.executable, __file__, "load", "--stage", "save", str(folder), *_depth(args)], check=True)
        runs: dict[str, list[dict[str, float]]] = {"diffusers": [], "style-aligned": []}
        for _ in range(args.rounds):
            for stage in runs:
                runs[stage].append(child(stage, folder))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    best = {name: min(timings, key=lambda timing: timing["total"]) for name, timings in runs.items()}
    print(f"{args.double} double + {args.single} single blocks, float32, best of {args.rounds} fresh processes:")
    print("| loader | imports (not counted) | load | load + one call at 256 px | ratio to diffusers |")
    print("|---|---|---|---|---|")
    for name, timing in best.items():
        ratio = timing["total"] / best["diffusers"]["total"]
        seconds = f"{timing['imports']:.2f} s | {timing['load']:.2f} s | {timing['total']:.2f} s"
        print(f"| {name} | {seconds} | {ratio:.2f} |")
    print(json.dumps(runs))


def _depth(args: argparse.Namespace) -> list[str]:
    return ["--double", str(args.double), "--single", str(args.single)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", choices=["step", "load"], default="step")
    parser.add_argument("--double", type=int, default=None, help="double-stream blocks (step: 1, load: 2)")
    parser.add_argument("--single", type=int, default=None, help="single-stream blocks (step: 1, load: 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--repeat", type=int, default=1, help="step: timed calls after a warm-up (default: 1)")
    parser.add_argument("--rounds", type=int, default=2, help="load: fresh processes of each loader (default: 2)")
    parser.add_argument("--workdir", type=Path, default=None, help="load: where to write the model's files")
    parser.add_argument("--stage", choices=["save", "diffusers", "style-aligned"], help=argparse.SUPPRESS)
    parser.add_argument("path", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args()  # the path of a stage comes after its options
    deep = args.what == "load" or args.stage == "save"
    args.double = args.double if args.double is not None else (2 if deep else 1)
    args.single = args.single if args.single is not None else (4 if deep else 1)
    if args.stage == "save":
        return save(args.path, args.double, args.single)
    if args.stage:
        print(json.dumps(first_step(args.stage, args.path)))
        return
    step(args) if args.what == "step" else load(args)


if __name__ == "__main__":
    main()
