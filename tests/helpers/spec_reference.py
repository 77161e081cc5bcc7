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


def mixture_adain(x: Tensor, references: list[Tensor], weights: list[float]) -> Tensor:
    """x: (tokens, channels); AdaIN onto the weighted mixture of the references' token distributions.

    Mixture mean `sum p_j m_j`, mixture variance `sum p_j (v_j + (m_j - mean)^2)`, with `p = weights / sum(weights)`
    and each reference's unbiased variance `v_j`; std = sqrt(variance + 1e-5) on both sides.
    """
    total = sum(weights)
    p = [w / total for w in weights]
    means = [r.mean(0) for r in references]
    variances = [r.var(0, unbiased=True) for r in references]
    mixture_mean = sum(pj * m for pj, m in zip(p, means, strict=True))
    mixture_variance = sum(pj * (v + (m - mixture_mean) ** 2) for pj, m, v in zip(p, means, variances, strict=True))
    std = (x.var(0, unbiased=True) + 1e-5).sqrt()
    return (x - x.mean(0)) / std * (mixture_variance + 1e-5).sqrt() + mixture_mean


def biased_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, bias: Tensor) -> Tensor:
    """q: (nq, c), k/v: (nk, c), bias: (nk,) added to every query's logits."""
    head_dim = q.shape[-1] // num_heads
    outputs = []
    for h in range(num_heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        logits = q[:, cols] @ k[:, cols].T / math.sqrt(head_dim) + bias
        outputs.append(torch.softmax(logits, dim=-1) @ v[:, cols])
    return torch.cat(outputs, dim=-1)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_heads: int,
    *,
    weights: list[float],
    mode: str = "concat",
    adain_queries: bool = True,
    adain_keys: bool = True,
    adain_values: bool = False,
    shared_score_scale: float = 1.0,
    shared_score_shift: float = 0.0,
    classifier_free_guidance: bool = True,
) -> Tensor:
    """Shared attention with `len(weights)` references, the first images of each half.

    References: plain self-attention. Targets, concat mode: AdaIN onto the references' mixture, then attention over
    their own tokens and every reference's (keys scaled), the logits of reference j's tokens shifted by
    `shift + log(w_j / sum(w))`. Swap mode: no AdaIN, attention over the references' tokens only, reference j's logits
    shifted by `log(w_j / sum(w))`.
    """
    q, k, v = q.double(), k.double(), v.double()
    count = len(weights)
    total = sum(weights)
    out = torch.empty_like(q)
    num_tokens = k.shape[1]
    for rows in halves_of(q.shape[0], classifier_free_guidance):
        references, targets = rows[:count], rows[count:]
        for r in references:
            out[r] = attention(q[r], k[r], v[r], num_heads, None, 0.0)
        for i in targets:
            if mode == "swap":
                keys = torch.cat([k[r] for r in references])
                values = torch.cat([v[r] for r in references])
                bias = torch.cat([torch.full((num_tokens,), math.log(w / total)) for w in weights]).double()
                out[i] = biased_attention(q[i], keys, values, num_heads, bias)
                continue
            qi = mixture_adain(q[i], [q[r] for r in references], weights) if adain_queries else q[i]
            ki = mixture_adain(k[i], [k[r] for r in references], weights) if adain_keys else k[i]
            vi = mixture_adain(v[i], [v[r] for r in references], weights) if adain_values else v[i]
            keys = torch.cat([ki, *(shared_score_scale * k[r] for r in references)])
            values = torch.cat([vi, *(v[r] for r in references)])
            shifts = [torch.zeros(num_tokens)]
            shifts += [torch.full((num_tokens,), shared_score_shift + math.log(w / total)) for w in weights]
            out[i] = biased_attention(qi, keys, values, num_heads, torch.cat(shifts).double())
    return out
