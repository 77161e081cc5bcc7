"""Peak memory of converting a full-size SDXL U-Net, as a ratio to the size of its weights file.

A random-weight diffusers SDXL U-Net (fp32, 2.6 B parameters) is saved in the diffusers layout by one process; a
second process converts it with `style_aligned.weights.convert.convert` and reports its peak resident memory
(ru_maxrss), and a third only imports what the second imports, for the fixed cost of Python and torch.

    python scripts/bench_convert.py [--workdir DIR] [--half]

Needs diffusers (installed by the `test` extra) and about 21 GB of free disk.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def save_random_unet(folder: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel  # type: ignore[import-untyped]

    from style_aligned.weights.architectures import ARCHITECTURES
    from style_aligned.weights.random_weights import fill_random_

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHITECTURES["sdxl_unet"].configs["unet"])
    unet = unet.to_empty(device="cpu")
    fill_random_(unet, seed=0)
    unet.save_pretrained(folder, safe_serialization=True, max_shard_size="20GB")


def convert_unet(source: Path, destination: Path, half: bool) -> None:
    from style_aligned.weights.convert import convert

    start = time.perf_counter()
    convert(source, destination, half=half)
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": seconds}))


def import_only() -> None:
    import style_aligned.weights.convert  # noqa: F401

    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def child(*args: str) -> dict[str, float]:
    output = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1]) if output.strip() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the 2 x 10 GB of files")
    parser.add_argument("--half", action="store_true", help="convert to float16")
    parser.add_argument("--stage", choices=["save", "convert", "import"], help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage == "save":
        return save_random_unet(args.paths[0])
    if args.stage == "convert":
        return convert_unet(args.paths[0], args.paths[1], args.half)
    if args.stage == "import":
        return import_only()

    workdir = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        source, destination = workdir / "unet", workdir / "converted"
        child("--stage", "save", str(source))
        source_size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        converted = child("--stage", "convert", str(source), str(destination), *(["--half"] if args.half else []))
        output_size = (destination / "unet.safetensors").stat().st_size
        baseline = child("--stage", "import")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    gib = 1024**3
    print(f"SDXL U-Net weights file: {source_size / gib:.2f} GiB (converted: {output_size / gib:.2f} GiB)")
    print(f"peak RSS while converting: {converted['peak_rss'] / gib:.2f} GiB in {converted['seconds']:.0f} s")
    print(f"peak RSS of the same imports alone: {baseline['peak_rss'] / gib:.2f} GiB")
    print(f"ratio peak RSS / weights file: {converted['peak_rss'] / source_size:.3f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
