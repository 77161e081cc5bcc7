"""One shared single-stream attention layer of FLUX.1 at 1024 px: plain, this adapter, AlignedGen's masked way.

Full width (24 heads of 128, 3072 channels), 4096 image tokens + 512 text tokens, a set of 4 images (1 reference +
3 targets, no classifier-free guidance: FLUX.1 is guidance-distilled). Variants, all in this process on the same
weights and inputs:

- plain attention: the layer as it is (`SingleStreamAttention`: projections, RMS norms, rotary embedding, attention);
- style-aligned: the same layer with `FluxSharedAttentionAdapter` (AdaIN on the image tokens, the reference's image
  keys at shifted positions scaled by lambda 1.1, own and reference tokens merged by log-sum-exp);
- masked way: AlignedGen's processor (SPEC section 9, steps 1-6) on the same projections: AdaIN, rotary embedding,
  the reference's image keys and values concatenated to every row's, a dense float mask of shape
  (batch, 24, queries, keys) with -inf for the reference's appended tokens.

Times are medians; memory is the peak a call adds to what is live before it (see `measure.py`).

    python scripts/bench_flux_attention.py [--repeat 3] [--device cpu|cuda] [--dtype float32|bfloat16]

Prints one JSON object per variant, then a Markdown table and the ratios against the goals.
"""

import argparse
import json
import math
from typing import Any

import refiners.fluxion.layers as fl
import torch
from measure import Measure, gib, measure  # the scripts' folder is on the path when a script runs
from refiners.fluxion.context import Contexts
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention

from style_aligned.adapters.flux_attention import DeferredRotary, FluxSharedAttentionAdapter
from style_aligned.adapters.flux_sharing import SharingSchedule
from style_aligned.flux import FluxConfig, image_ids, text_ids
from style_aligned.flux.layers import FLUX_CONTEXT, apply_rotary, rotary_frequencies
from style_aligned.flux.transformer import QKVProjection, RotaryQueryKey, SingleStreamAttention
from style_aligned.layers.reference_cache import ReferenceCache
from style_aligned.options import StyleAlignedOptions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAMBDA = 1.1
TIMESTEP = 500.0


class OneLayer(fl.Chain):
    """A single-stream attention layer with the context a FLUX.1 transformer gives it (text length, token ids,
    rotary frequencies, timestep)."""

    def __init__(self, layer: SingleStreamAttention, *, text: Tensor, ids: Tensor, image: Tensor) -> None:
        self.text, self.ids, self.image = text, ids, image
        super().__init__(layer)

    def init_context(self) -> Contexts:
        frequencies = rotary_frequencies(torch.cat([self.ids, self.image]), (16, 56, 56), 10000).to(self.text.device)
        return {
            "diffusion": {"timestep": torch.tensor([TIMESTEP])},
            FLUX_CONTEXT: {"text_embedding": self.text, "image_ids": self.image, "rotary": frequencies},
        }


def adain(x: Tensor) -> Tensor:
    """AlignedGen's AdaIN: every row onto row 0, over tokens (axis -2), std = sqrt(unbiased var + 1e-5)."""
    mean, std = x.mean(-2, keepdim=True), (x.var(-2, keepdim=True) + 1e-5).sqrt()
    return (x - mean) / std * std[:1] + mean[:1]


def masked_way(layer: OneLayer, x: Tensor, *, text_tokens: int, heads: int) -> Tensor:
    """AlignedGen's shared attention with its dense mask, on the layer's own projections and norms."""
    attention = layer.layer("SingleStreamAttention", SingleStreamAttention)
    query, key, value = attention.layer("QKVProjection", QKVProjection)(x)
    batch, tokens, channels = query.shape
    q, k, v = (t.view(batch, tokens, heads, -1).transpose(1, 2) for t in (query, key, value))  # (B, H, N, D)
    n = text_tokens
    q = torch.cat([q[:, :, :n], adain(q[:, :, n:])], dim=2)
    k = torch.cat([k[:, :, :n], adain(k[:, :, n:])], dim=2)
    shifted = layer.image.clone()
    shifted[:, 2] += layer.image[:, 2].max() + 1
    rotary = rotary_frequencies(torch.cat([layer.ids, layer.image]), (16, 56, 56), 10000).to(x.device)
    reference_rotary = rotary_frequencies(shifted, (16, 56, 56), 10000).to(x.device)
    style_key = _turn(k[:, :, n:], reference_rotary)
    q, k = _turn(q, rotary), _turn(k, rotary)
    scaled = torch.cat([style_key[:1], (LAMBDA * style_key[0]).unsqueeze(0).repeat(batch - 1, 1, 1, 1)])
    k = torch.cat([k, scaled], dim=2)
    v = torch.cat([v, v[:1, :, n:].repeat(batch, 1, 1, 1)], dim=2)
    mask = torch.zeros(batch, heads, tokens, k.shape[2], dtype=q.dtype, device=q.device)
    mask[0, :, :, tokens:] = -math.inf
    output = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return output.transpose(1, 2).reshape(batch, tokens, channels)


def _turn(x: Tensor, frequencies: Tensor) -> Tensor:
    """The rotary embedding of `(batch, heads, tokens, head_dim)` features."""
    return apply_rotary(x.transpose(1, 2).flatten(2), frequencies).unflatten(2, (x.shape[1], -1)).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--pixels", type=int, default=1024, help="image side (tokens: (pixels / 16) ** 2)")
    parser.add_argument("--text-tokens", type=int, default=512)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {name}, {str(dtype).removeprefix('torch.')}", flush=True)
    torch.manual_seed(0)
    config = FluxConfig()
    text_tokens, size = args.text_tokens, args.pixels // 8  # 1024 px: 128x128 latents, 64x64 = 4096 image tokens
    attention = SingleStreamAttention(config, device=device, dtype=dtype)
    for parameter in attention.parameters():
        torch.nn.init.normal_(parameter, std=1 / math.sqrt(parameter.shape[-1]) if parameter.ndim > 1 else 1.0)
    image = image_ids(size, size, device=device)
    text = torch.zeros(args.images, text_tokens, 1, device=device)  # only its length is read
    layer = OneLayer(attention, text=text, ids=text_ids(text_tokens, device=device), image=image)
    x = torch.randn(args.images, text_tokens + image.shape[0], config.inner_dim, device=device, dtype=dtype)
    results: dict[str, Measure] = {}
    outputs: dict[str, Tensor] = {}

    def run(variant: str, function: Any) -> None:
        with torch.no_grad():
            outputs[variant] = function()
            results[variant] = measure(function, device, repeat=args.repeat, warmup=0)  # the call above warmed up
        record = {"variant": variant, "seconds": round(results[variant].seconds, 4)}
        record |= {"peak_bytes": results[variant].peak_bytes, "device": str(device), "dtype": str(dtype)}
        print(json.dumps(record), flush=True)

    run("plain attention", lambda: layer(x))
    options = StyleAlignedOptions(shared_score_scale=LAMBDA).resolved("flux_dev")
    schedule = SharingSchedule(
        window=options.window,
        scale=LAMBDA,
        schedule="fixed",
        shifted_positions=True,
        axes_dims=config.axes_dims_rope,
        theta=config.rope_theta,
    )
    kernel = attention.ensure_find(fl.ScaledDotProductAttention)
    adapters = (
        DeferredRotary(attention.ensure_find(RotaryQueryKey)),
        FluxSharedAttentionAdapter(
            kernel, options=options, classifier_free_guidance=False, reference_cache=ReferenceCache(), schedule=schedule
        ),
    )
    for adapter in adapters:
        adapter.inject(attention)
    for context, values in layer.init_context().items():  # given to the adapters' layers too
        layer.set_context(context, values)
    run("style-aligned (log-sum-exp, no mask)", lambda: layer(x))
    for adapter in reversed(adapters):
        adapter.eject()
    heads = config.num_attention_heads
    run("masked way (AlignedGen, dense mask)", lambda: masked_way(layer, x, text_tokens=text_tokens, heads=heads))
    print("\n".join(report(results, outputs, images=args.images, text_tokens=text_tokens)), flush=True)


def report(results: dict[str, Measure], outputs: dict[str, Tensor], *, images: int, text_tokens: int) -> list[str]:
    plain, ours = results["plain attention"], results["style-aligned (log-sum-exp, no mask)"]
    masked = results["masked way (AlignedGen, dense mask)"]
    lines = [
        f"\nFLUX.1 single-stream attention, {outputs['plain attention'].shape[1] - text_tokens} image + {text_tokens}"
        f" text tokens x 3072 channels, 24 heads, {images} images",
        "| variant | time | peak memory | time / plain | memory / plain |",
        "|---|---|---|---|---|",
    ]
    for variant, result in results.items():
        time_ratio, memory_ratio = result.ratio(plain)
        lines.append(
            f"| {variant} | {result.seconds:.2f} s | {gib(result.peak_bytes)} | {time_ratio:.2f} | {memory_ratio:.2f} |"
        )
    time_ratio, memory_ratio = ours.ratio(masked)
    difference = (
        outputs["style-aligned (log-sum-exp, no mask)"] - outputs["masked way (AlignedGen, dense mask)"]
    ).abs()
    scale = outputs["masked way (AlignedGen, dense mask)"].abs().max()
    lines += [
        f"style-aligned / masked way: time {time_ratio:.2f}, peak memory {memory_ratio:.3f}"
        f" (outputs differ by at most {difference.max().item():.1e}, {(difference.max() / scale).item():.1e} relative)",
        f"style-aligned / plain attention: time {ours.ratio(plain)[0]:.2f}",
    ]
    return lines


if __name__ == "__main__":
    main()
