"""Load speed against diffusers: from a random-weight SD1 diffusers folder to the first U-Net step and a decoded image.

One process saves a random-weight, full-size SD1 pipeline in the diffusers layout (4.3 GB, fp32). Then, each in a
fresh process whose imports are done before the clock starts, and alternately so both see the same page cache:

- diffusers: `from_pretrained` of the U-Net, the text encoder and the VAE, the text encoded, one U-Net call with
  classifier-free guidance, and one image decoded;
- style-aligned: `load_pipeline` on the same folder (converted on the fly), and the same three calls; then
  `load_pipeline` on the folder converted once by `convert` (the same three calls).

    python scripts/bench_load.py [--workdir DIR] [--rounds 3]

Needs diffusers and transformers (the `test` extra) and about 9 GB of free disk.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LATENT = 8  # latent side: 64x64 px, so that the load, not the compute, dominates
PROMPT = "a toy train. macro photo. 3d game asset"


def save_pipeline(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel  # type: ignore[import-untyped]
    from transformers import CLIPTextConfig, CLIPTextModel  # type: ignore[import-untyped]

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
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))


def run_diffusers(folder: Path) -> dict[str, float]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel  # type: ignore[import-untyped]
    from refiners.foundationals.clip.tokenizer import CLIPTokenizer
    from transformers import CLIPTextModel  # type: ignore[import-untyped]

    tokens = CLIPTokenizer()(["", PROMPT])  # the same token ids for both
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    loaded = time.perf_counter()
    embedding = text_encoder(tokens).last_hidden_state
    x = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    noise = unet(torch.cat([x, x]), torch.tensor([999]), embedding).sample
    uncond, cond = noise.chunk(2)
    x = x - 0.1 * (uncond + 7.5 * (cond - uncond))  # a step's worth of arithmetic; the U-Net call is the cost
    image = vae.decode(x / 0.18215).sample
    assert image.shape[-1] == 8 * LATENT
    return {"load": loaded - start, "total": time.perf_counter() - start}


def run_style_aligned(source: Path) -> dict[str, float]:
    import torch

    from style_aligned.weights.loading import load_pipeline

    torch.set_grad_enabled(False)
    start = time.perf_counter()
    sd = load_pipeline(source)
    loaded = time.perf_counter()
    embedding = sd.compute_clip_text_embedding(PROMPT)
    x = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    x = sd(x, step=0, clip_text_embedding=embedding)
    image = sd.lda.latents_to_images(x)[0]
    assert image.width == 8 * LATENT
    return {"load": loaded - start, "total": time.perf_counter() - start}


def child(*args: str) -> dict[str, float]:
    result = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the 2 x 4.3 GB of files")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each (default: 3)")
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
        runs: dict[str, list[dict[str, float]]] = {"diffusers": [], "folder": [], "converted": []}
        for _ in range(args.rounds):
            runs["diffusers"].append(child("--stage", "diffusers", str(folder)))
            runs["folder"].append(child("--stage", "style-aligned", str(folder)))
            runs["converted"].append(child("--stage", "style-aligned", str(converted)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def median(name: str, field: str) -> float:
        return statistics.median(run[field] for run in runs[name])

    baseline = median("diffusers", "total")
    print(f"random SD1 diffusers folder, {args.rounds} rounds, medians (imports not counted):")
    print("| loader | load | load + first U-Net step + decode | ratio to diffusers |")
    print("|---|---|---|---|")
    labels = {
        "diffusers": "diffusers `from_pretrained` (U-Net, text encoder, VAE)",
        "folder": "style-aligned `load_pipeline`, diffusers folder",
        "converted": "style-aligned `load_pipeline`, converted folder",
    }
    for name, label in labels.items():
        total = median(name, "total")
        print(f"| {label} | {median(name, 'load'):.2f} s | {total:.2f} s | {total / baseline:.2f} |")


if __name__ == "__main__":
    main()
