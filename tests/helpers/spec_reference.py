"""An independent, deliberately plain implementation of the StyleAligned method (SPEC sections 1 and 2).

Written image by image and head by head, in float64, with explicit logits: slow and obvious, for parity tests.
"""

import math

import torch
from torch import Tensor


def adain(x: Tensor, reference: Tensor) -> Tensor:
    """x, reference: (tokens, channels). Statistics over tokens, std = sqrt(unbiased var + 1e-5)."""
    mean, ref_mean = x.mean(0), reference.mean(0)
    std = (x.var(0, unbiased=True) + 1e-5).sqrt()
    ref_std = (reference.var(0, unbiased=True) + 1e-5).sqrt()
    return (x - mean) / std * ref_std + ref_mean


def attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, shift_from: int | None, shift: float) -> Tensor:
    """q: (nq, c), k/v: (nk, c). Logits of keys at positions >= shift_from get `shift` added."""
    head_dim = q.shape[-1] // num_heads
    outputs = []
    for h in range(num_heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        logits = q[:, cols] @ k[:, cols].T / math.sqrt(head_dim)
        if shift_from is not None:
            logits[:, shift_from:] += shift
        outputs.append(torch.softmax(logits, dim=-1) @ v[:, cols])
    return torch.cat(outputs, dim=-1)


def halves_of(batch_size: int, classifier_free_guidance: bool) -> list[list[int]]:
    halves = 2 if classifier_free_guidance else 1
    per_half = batch_size // halves
    return [list(range(h * per_half, (h + 1) * per_half)) for h in range(halves)]


def shared_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_heads: int,
    *,
    adain_queries: bool = True,
    adain_keys: bool = True,
    adain_values: bool = False,
    shared_score_scale: float = 1.0,
    shared_score_shift: float = 0.0,
    full_attention_share: bool = False,
    classifier_free_guidance: bool = True,
) -> Tensor:
    """q, k, v: (batch, tokens, channels) projected features. Returns the attention output (batch, tokens, channels)."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    for rows in halves_of(q.shape[0], classifier_free_guidance):
        ref = rows[0]
        if full_attention_share:
            keys = torch.cat([k[j] for j in rows])
            values = torch.cat([v[j] for j in rows])
            for i in rows:
                out[i] = attention(q[i], keys, values, num_heads, None, 0.0)
            continue
        qa = {i: adain(q[i], q[ref]) if adain_queries else q[i] for i in rows}
        ka = {i: adain(k[i], k[ref]) if adain_keys else k[i] for i in rows}
        va = {i: adain(v[i], v[ref]) if adain_values else v[i] for i in rows}
        num_tokens = q.shape[1]
        for i in rows:
            scale = 1.0 if i == ref else shared_score_scale
            keys = torch.cat([ka[i], scale * ka[ref]])
            values = torch.cat([va[i], va[ref]])
            out[i] = attention(qa[i], keys, values, num_heads, num_tokens, shared_score_shift)
    return out


def shared_group_norm(
    x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float, classifier_free_guidance: bool = True
) -> Tensor:
    """x: (batch, channels, *spatial). Each image's group statistics are taken over it and its reference together."""
    x = x.double()
    out = torch.empty_like(x)
    for rows in halves_of(x.shape[0], classifier_free_guidance):
        reference = x[rows[0]]
        for i in rows:
            groups = torch.stack([x[i], reference]).transpose(0, 1)  # (channels, 2, *spatial)
            groups = groups.reshape(num_groups, -1)
            mean = groups.mean(-1, keepdim=True)
            var = groups.var(-1, unbiased=False, keepdim=True)
            channels = x.shape[1]
            own = x[i].reshape(num_groups, -1)
            normed = ((own - mean) / (var + eps).sqrt()).reshape(channels, -1)
            out[i] = (normed * weight.double()[:, None] + bias.double()[:, None]).reshape(x[i].shape)
    return out
