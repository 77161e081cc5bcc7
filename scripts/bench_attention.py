"""One self-attention layer at SDXL's shapes: plain attention, this adapter, Refiners 0.4.0's, the reference method.

Batch: 1 reference + 3 targets, with classifier-free guidance (8 rows). Shapes: 4096 tokens x 640 channels, 10 heads
(SDXL's 64x64 level at 1024 px) and 1024 tokens x 1280 channels, 20 heads (its 32x32 level). The reference method is
the reference implementation's algorithm written here as a diffusers attention processor (AdaIN on Q and K, the
reference's keys and values concatenated, and with a shift the full logits materialised, as it does). This project's
layer runs with its kernel (own and reference tokens attended separately, merged by log-sum-exp) and with the
previous one (reference tokens concatenated to each image's, the shift as a float mask). All run in this process on
the same weights and inputs; times are medians, memory is the peak a call adds.

    python scripts/bench_attention.py [--repeat 3] [--device cpu|cuda] [--dtype float32|float16] [--no-materialised]

Prints one JSON object per variant and shape (machine-readable), then Markdown tables and ratios.
"""

import argparse
import json
import math
from typing import Any

import refiners.fluxion.layers as fl
import torch
from diffusers.models.attention_processor import Attention  # type: ignore[import-untyped]
from measure import Measure, gib, measure  # the scripts' folder is on the path when a script runs
from previous_kernel import ConcatenatingAdapter  # this project's earlier kernel, beside this script
from refiners.foundationals.latent_diffusion.style_aligned import SharedSelfAttentionAdapter
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention

from style_aligned import ReferenceCache, SharedAttentionAdapter, StyleAlignedOptions

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def reference_rows(x: Tensor) -> Tensor:
    """Row 0 of each CFG half, repeated over the half (x: batch first)."""
    halves = x.reshape(2, x.shape[0] // 2, *x.shape[1:])
    return halves[:, :1].expand_as(halves).reshape(x.shape)


def adain(x: Tensor) -> Tensor:
    """AdaIN over tokens (axis -2) onto each half's reference, std = sqrt(unbiased var + 1e-5)."""
    mean, std = x.mean(-2, keepdim=True), (x.var(-2, keepdim=True) + 1e-5).sqrt()
    return (x - mean) / std * reference_rows(std) + reference_rows(mean)


class ReferenceMethodProcessor:
    """StyleAligned as the reference implementation computes it, as a diffusers attention processor."""

    def __init__(self, shift: float, scale: float = 1.0) -> None:
        self.shift, self.scale = shift, scale

    def __call__(self, attn: Attention, hidden_states: Tensor, *_: Any, **__: Any) -> Tensor:
        batch, tokens, _ = hidden_states.shape
        heads = attn.heads
        q, k, v = (
            projection(hidden_states).view(batch, tokens, heads, -1).transpose(1, 2)
            for projection in (attn.to_q, attn.to_k, attn.to_v)
        )  # (batch, heads, tokens, head_dim)
        q, k = adain(q), adain(k)
        reference_keys = reference_rows(k)
        if self.scale != 1.0:  # targets get scaled reference keys; the reference's own copy is unscaled
            factors = torch.full((2, batch // 2, 1, 1, 1), self.scale, dtype=k.dtype, device=k.device)
            factors[:, 0] = 1.0
            reference_keys = reference_keys * factors.reshape(batch, 1, 1, 1)
        k = torch.cat([k, reference_keys], dim=-2)
        v = torch.cat([v, reference_rows(v)], dim=-2)
        if self.shift != 0:
            logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * attn.scale
            logits[:, :, :, tokens:] += self.shift
            out = torch.einsum("bhqk,bhkd->bhqd", logits.softmax(-1), v)
        else:
            out = scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return attn.to_out[0](out)


def diffusers_attention(layer: fl.SelfAttention) -> Attention:
    """A diffusers attention module with the same weights as a Refiners self-attention layer."""
    channels = layer.embedding_dim
    attention = Attention(query_dim=channels, heads=layer.num_heads, dim_head=channels // layer.num_heads, bias=False)
    q, k, v = layer.layer("Distribute", fl.Distribute)
    out = layer.layer("Linear", fl.Linear)
    with torch.no_grad():
        pairs = ((q, attention.to_q), (k, attention.to_k), (v, attention.to_v), (out, attention.to_out[0]))
        for source, target in pairs:
            target.weight.copy_(source.weight)
            if source.bias is not None:
                target.bias.copy_(source.bias)
    return attention.to(device=layer.device, dtype=layer.dtype).eval()


def bench_shape(
    tokens: int,
    channels: int,
    heads: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    repeat: int,
    materialised: bool,
) -> list[str]:
    torch.manual_seed(0)
    layer = fl.SelfAttention(embedding_dim=channels, num_heads=heads, use_bias=False).to(device=device, dtype=dtype)
    reference_attention = diffusers_attention(layer)
    x = torch.randn(8, tokens, channels, device=device, dtype=dtype)
    sdpa = layer.ensure_find(fl.ScaledDotProductAttention)
    results: dict[str, Measure] = {}
    outputs: dict[str, Tensor] = {}

    def run(name: str, module: Any) -> None:
        with torch.no_grad():
            outputs[name] = module(x)
            results[name] = measure(lambda: module(x), device, repeat=repeat)
        seconds, peak = results[name].seconds, results[name].peak_bytes
        record = {"tokens": tokens, "channels": channels, "heads": heads, "variant": name}
        record |= {"seconds": round(seconds, 5), "peak_bytes": peak, "device": str(device), "dtype": str(dtype)}
        print(json.dumps(record), flush=True)

    run("plain attention", layer)
    refiners = SharedSelfAttentionAdapter(layer).inject()
    run("Refiners 0.4.0 StyleAlignedAdapter (shift 0)", layer)
    refiners.eject()
    for shift in (0.0, math.log(2)):
        ours = SharedAttentionAdapter(
            sdpa,
            options=StyleAlignedOptions(shared_score_shift=shift),
            classifier_free_guidance=True,
            reference_cache=ReferenceCache(),
        ).inject(layer)
        run(f"style-aligned (shift {shift:.3g})", layer)
        ours.eject()
        previous = ConcatenatingAdapter(sdpa, shift).inject(layer)
        run(f"style-aligned, previous kernel (shift {shift:.3g})", layer)
        previous.eject()
        if shift == 0.0 or materialised:
            reference_attention.set_processor(ReferenceMethodProcessor(shift))
            run(f"reference method (shift {shift:.3g})", reference_attention)

    plain = results["plain attention"]
    lines = [
        f"\n{tokens} tokens x {channels} channels, {heads} heads, batch 8 (1 reference + 3 targets, CFG), {device},"
        f" {str(dtype).removeprefix('torch.')}",
        "| variant | time | peak memory | time / plain | memory / plain |",
        "|---|---|---|---|---|",
    ]
    for name, result in results.items():
        time_ratio, memory_ratio = result.ratio(plain)
        lines.append(
            f"| {name} | {result.seconds:.4f} s | {gib(result.peak_bytes)} | {time_ratio:.2f} | {memory_ratio:.2f} |"
        )
    for shift in ("0", "0.693"):
        ours = results[f"style-aligned (shift {shift})"]
        time_ratio, memory_ratio = ours.ratio(results[f"style-aligned, previous kernel (shift {shift})"])
        lines.append(
            f"style-aligned / its previous kernel, shift {shift}: time {time_ratio:.2f}, peak memory {memory_ratio:.3f}"
        )
        if f"reference method (shift {shift})" not in results:
            continue
        reference = results[f"reference method (shift {shift})"]
        time_ratio, memory_ratio = ours.ratio(reference)
        difference = (outputs[f"style-aligned (shift {shift})"] - outputs[f"reference method (shift {shift})"]).abs()
        lines.append(
            f"style-aligned / reference method, shift {shift}: time {time_ratio:.2f}, peak memory {memory_ratio:.3f}"
            f" (outputs differ by at most {difference.max().item():.1e})"
        )
    time_ratio, _ = results["style-aligned (shift 0)"].ratio(results["Refiners 0.4.0 StyleAlignedAdapter (shift 0)"])
    lines.append(f"style-aligned / Refiners 0.4.0, shift 0: time {time_ratio:.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument(
        "--no-materialised",
        dest="materialised",
        action="store_false",
        help="skip the reference method with a shift (it materialises the logits: 10 GiB per 4096-token call)",
    )
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {name}")
    for tokens, channels, heads in ((4096, 640, 10), (1024, 1280, 20)):
        lines = bench_shape(
            tokens, channels, heads, device=device, dtype=dtype, repeat=args.repeat, materialised=args.materialised
        )
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
