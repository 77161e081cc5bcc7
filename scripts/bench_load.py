"""Load speed against diffusers: a user's first set, from a random-weight SD1 diffusers folder.

One process saves a random-weight, full-size SD1 pipeline in the diffusers layout (4.3 GB, fp32), complete enough for
`StableDiffusionPipeline.from_pretrained` (tokenizer and DDIM scheduler included, no safety checker). Then, each in a
fresh process, alternately so that all see the same page cache, the same first set of one 64x64 px image:

- diffusers: `StableDiffusionPipeline.from_pretrained`, then the pipeline called with one DDIM step and guidance 7.5
  (the prompt and the empty negative prompt encoded, one U-Net call with classifier-free guidance, one image decoded);
- style-aligned: `load_pipeline` on the same folder (converted on the fly), then `generate_set` with one DDIM step
  (the same three stages); then the same on the folder converted once by `convert`.

With `--before TREE`, the style-aligned runs are repeated with the package imported from another source tree (e.g. a
worktree of an earlier commit), in the same rounds. With `--accelerate DIR` (a folder made by `pip install --target DIR
accelerate psutil pyyaml`), the diffusers run is repeated with accelerate importable, which makes `from_pretrained`
build its models on the meta device and assign the weights (without it, it builds them on the CPU with its
initialisers patched out and copies the weights in). Imports are timed apart and not counted in the ratios.

    python scripts/bench_load.py [--workdir DIR] [--rounds 3] [--before TREE] [--accelerate DIR]

Needs diffusers and transformers (the `test` extra) and about 9 GB of free disk.
"""

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZE = 64  # pixels: 8x8 latents, so that loading, not computing, dominates
PROMPT = "a toy train. macro photo. 3d game asset"
GUIDANCE = 7.5


def _clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges, from the file Refiners ships (the construction of OpenAI's CLIP tokenizer)."""
    from refiners.foundationals.clip import tokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    characters = [chr(c) for c in printable] + [chr(256 + n) for n in range(len(others))]
    text = gzip.open(Path(tokenizer.__file__).parent / "bpe_simple_vocab_16e6.txt.gz").read().decode()
    merges = [(a, b) for a, b in (line.split() for line in text.split("\n")[1 : 49152 - 256 - 2 + 1])]
    tokens = [*characters, *(c + "</w>" for c in characters), *(a + b for a, b in merges)]
    return {token: index for index, token in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}, merges


def save_pipeline(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # type: ignore[import-untyped]
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # type: ignore[import-untyped]

    from style_aligned.weights.architectures import ARCHITECTURES
    from style_aligned.weights.random_weights import fill_random_

    configs = {name: architecture.configs for name, architecture in ARCHITECTURES.items()}
    factories = {
        "unet": lambda: UNet2DConditionModel(**configs["sd1_unet"]["unet"]),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**configs["sd1_text_encoder"]["text_encoder"])),
        "vae": lambda: AutoencoderKL(**configs["sd1_autoencoder"]["vae"]),
    }
    for seed, (name, factory) in enumerate(factories.items()):
        with torch.device("meta"):
            model = factory()
        model = model.to_empty(device="cpu")
        fill_random_(model, seed)
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
        model.save_pretrained(folder / name, safe_serialization=True)
        del model
    vocabulary, merges = _clip_vocabulary()
    CLIPTokenizer(vocab=vocabulary, merges=merges, model_max_length=77).save_pretrained(folder / "tokenizer")
    scheduler = DDIMScheduler(  # SD1's own settings
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index))


def run_diffusers(folder: Path) -> dict[str, float]:
    start = time.perf_counter()
    import torch
    from diffusers import StableDiffusionPipeline  # type: ignore[import-untyped]

    imported = time.perf_counter()
    pipeline: Any = StableDiffusionPipeline.from_pretrained(folder)
    loaded = time.perf_counter()
    output = pipeline(
        PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=1,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(0),
    )
    assert output.images[0].width == SIZE
    return {"imports": imported - start, "load": loaded - imported, "total": time.perf_counter() - imported}


def run_style_aligned(source: Path) -> dict[str, float]:
    start = time.perf_counter()
    from style_aligned.pipeline.generate import SetSpec, generate_set
    from style_aligned.weights.loading import load_pipeline

    imported = time.perf_counter()
    sd = load_pipeline(source)
    loaded = time.perf_counter()
    generated = generate_set(sd, SetSpec(prompts=[PROMPT], steps=1, guidance=GUIDANCE, width=SIZE))
    assert generated.images[0].width == SIZE
    return {"imports": imported - start, "load": loaded - imported, "total": time.perf_counter() - imported}


def child(stage: str, path: Path, tree: Path | None = None) -> dict[str, float]:
    """Run a stage in a fresh process, the package imported from `tree` if given; its timings."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, __file__, "--stage", stage, str(path)]
    result = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(
    folder: Path, converted: Path, rounds: int, *, before: Path | None, accelerate: Path | None
) -> dict[str, list[dict[str, float]]]:
    """Every variant once per round, alternately; for each variant its timings in each round."""
    variants: dict[str, tuple[str, Path, Path | None]] = {"diffusers": ("diffusers", folder, None)}
    if accelerate is not None:
        variants["diffusers, accelerate"] = ("diffusers", folder, accelerate)
    if before is not None:
        variants["folder, before"] = ("style-aligned", folder, before)
    variants["folder"] = ("style-aligned", folder, None)
    if before is not None:
        variants["converted, before"] = ("style-aligned", converted, before)
    variants["converted"] = ("style-aligned", converted, None)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (stage, path, tree) in variants.items():
            runs[name].append(child(stage, path, tree))
    return runs


LABELS = {
    "diffusers": "diffusers `StableDiffusionPipeline.from_pretrained`",
    "diffusers, accelerate": "diffusers `StableDiffusionPipeline.from_pretrained`, with accelerate",
    "folder, before": "style-aligned `load_pipeline`, diffusers folder (before)",
    "folder": "style-aligned `load_pipeline`, diffusers folder",
    "converted, before": "style-aligned `load_pipeline`, converted folder (before)",
    "converted": "style-aligned `load_pipeline`, converted folder",
}


def report(runs: dict[str, list[dict[str, float]]]) -> None:
    """Print the best round of each variant (the one with the shortest load + first set) and its ratios."""
    best = {name: min(timings, key=lambda timing: timing["total"]) for name, timings in runs.items()}
    baselines = {"diffusers": "ratio to diffusers", "diffusers, accelerate": "ratio to diffusers with accelerate"}
    baselines = {name: header for name, header in baselines.items() if name in best}
    print(f"random SD1 diffusers folder, {SIZE}x{SIZE} px, 1 step, best of {len(runs['diffusers'])} fresh processes:")
    print(
        "| loader | imports (not counted) | load | load + text encoding + step + decode | "
        + " | ".join(baselines.values())
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(baselines))
    for name, timing in best.items():
        times = f"{timing['imports']:.2f} s | {timing['load']:.2f} s | {timing['total']:.2f} s"
        ratios = " | ".join(f"{timing['total'] / best[baseline]['total']:.2f}" for baseline in baselines)
        print(f"| {LABELS[name]} | {times} | {ratios} |")
    print(json.dumps(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the 2 x 4.3 GB of files")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes of each variant (default: 3)")
    parser.add_argument("--before", type=Path, default=None, help="a source tree of style-aligned to compare with")
    parser.add_argument("--accelerate", type=Path, default=None, help="a folder holding accelerate, for diffusers")
    parser.add_argument("--stage", choices=["save", "diffusers", "style-aligned"], help=argparse.SUPPRESS)
    parser.add_argument("path", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage == "save":
        return save_pipeline(args.path)
    if args.stage:
        print(json.dumps((run_diffusers if args.stage == "diffusers" else run_style_aligned)(args.path)))
        return

    from style_aligned.weights.convert import convert

    workdir = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        folder, converted = workdir / "sd1", workdir / "converted"
        subprocess.run([sys.executable, __file__, "--stage", "save", str(folder)], check=True)
        convert(folder, converted)
        runs = measure(folder, converted, args.rounds, before=args.before, accelerate=args.accelerate)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(runs)


if __name__ == "__main__":
    main()
