"""One step of a full-size, random-weight SDXL U-Net: plain, and with StyleAligned (overhead ratios).

Batch: 1 reference + 3 targets with classifier-free guidance (8 rows), latents of 16x16 and 32x32 (128 and 256 px).
Everything runs in this process on the same U-Net and inputs; times are medians, memory is the peak a call adds.

    python scripts/bench_unet.py [--sizes 16 32] [--repeat 2] [--device cpu|cuda] [--dtype float32|float16]

Prints one JSON object per variant and size (machine-readable), then Markdown tables.
"""

import argparse
import json
import math
import sys
from typing import Any

import torch
from measure import Measure, gib, measure  # the scripts' folder is on the path when a script runs
from refiners.foundationals.latent_diffusion import SDXLUNet

from style_aligned import StyleAlignedAdapter
from style_aligned.options import StyleAlignedOptions
from style_aligned.weights.random_weights import build_random

VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain U-Net": None,
    "StyleAligned, defaults": {},
    "StyleAligned, transfer settings (shift log 2, shared GroupNorm)": {
        "shared_score_shift": math.log(2),
        "share_group_norm": True,
    },
}


def call(unet: SDXLUNet, x: torch.Tensor) -> torch.Tensor:
    batch = x.shape[0]
    generator = torch.Generator().manual_seed(0)
    unet.set_timestep(torch.tensor([500], device=x.device))
    unet.set_clip_text_embedding(torch.randn(batch, 77, 2048, generator=generator).to(x))
    unet.set_pooled_text_embedding(torch.randn(batch, 1280, generator=generator).to(x))
    size = x.shape[-1] * 8
    unet.set_time_ids(torch.tensor([[size, size, 0, 0, size, size]] * batch).to(x))
    with torch.no_grad():
        return unet(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32], help="latent sizes")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    default = torch.float16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else default
    unet = build_random(lambda: SDXLUNet(in_channels=4), device=device, dtype=dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {name}, {device}, {dtype}")
    for size in args.sizes:
        x = torch.randn(8, 4, size, size, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
        results: dict[str, Measure] = {}
        for name, options in VARIANTS.items():
            adapter = None if options is None else StyleAlignedAdapter(unet, StyleAlignedOptions(**options)).inject()
            results[name] = measure(lambda x=x: call(unet, x), device, repeat=args.repeat)
            if adapter is not None:
                adapter.eject()
            record = {"latent_size": size, "variant": name, "seconds": round(results[name].seconds, 5)}
            record |= {"peak_bytes": results[name].peak_bytes, "device": str(device), "dtype": str(dtype)}
            print(json.dumps(record), flush=True)
        plain = results["plain U-Net"]
        print(f"\nSDXL U-Net step, {size}x{size} latents ({size * 8} px), batch 8 (1 reference + 3 targets, CFG)")
        print("| variant | time | peak memory added | time / plain | memory / plain |\n|---|---|---|---|---|")
        for name, result in results.items():
            time_ratio, memory_ratio = result.ratio(plain)
            figures = f"{result.seconds:.2f} s | {gib(result.peak_bytes)} | {time_ratio:.2f} | {memory_ratio:.2f}"
            print(f"| {name} | {figures} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
