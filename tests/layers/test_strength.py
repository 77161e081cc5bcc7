"""The style strength in each shared layer: 1 is the method exactly, 0 the plain layer exactly, and in between the
formulas written out here: `x + s (adain(x) - x)`, `log s` on the reference logits, `own + s (joint - own)`."""

import math
from typing import Any

import pytest
import refiners.fluxion.layers as fl
import torch

from style_aligned import AdaIN, ReferenceAttention, ReferenceCache, SharedGroupNormAdapter, StyleAlignedOptions
from style_aligned.layers.strength import check_strength, reference_logit_shift, toward
from tests.helpers import spec_reference as spec
from tests.helpers.layers import make_self_attention, projections, shared_attention
from tests.layers.test_reference_cache import chunked

TOLERANCE = 1e-5
STRENGTHS = [0.0, 0.2, 0.65, 1.0]


def test_toward_gives_both_ends_as_they_are() -> None:
    own, shared = torch.randn(3), torch.randn(3)
    assert toward(own, shared, 1.0) is shared and toward(own, shared, 0.0) is own
    assert torch.allclose(toward(own, shared, 0.25), 0.75 * own + 0.25 * shared)
    assert toward(2.0, 4.0, 0.5) == 3.0
    assert reference_logit_shift(0.3, 1.0) == 0.3
    assert reference_logit_shift(0.3, 0.5) == pytest.approx(0.3 + math.log(0.5))
    assert reference_logit_shift(0.3, 0.0) == -math.inf


@pytest.mark.parametrize("strength", [-0.1, 1.01, math.nan, math.inf])
def test_a_strength_outside_zero_one_is_refused(strength: float) -> None:
    message = r"strength must be a number in \[0, 1\]"
    with pytest.raises(ValueError, match=message):
        check_strength(strength)
    with pytest.raises(ValueError, match=message):
        AdaIN(strength=strength, reference_cache=ReferenceCache())
    with pytest.raises(ValueError, match=message):
        StyleAlignedOptions(strength=strength)


@pytest.mark.parametrize("strength", STRENGTHS)
def test_adain_moves_each_image_part_of_the_way(strength: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 30, 8) * 2 + 3  # (halves, images_per_half, tokens, channels)
    output = AdaIN(strength=strength, reference_cache=ReferenceCache())(x)
    full = AdaIN(reference_cache=ReferenceCache())(x)
    assert torch.equal(output[:, 0], x[:, 0])  # the references are never changed
    for half in range(2):
        for i in range(1, 4):
            image = x[half, i].double()
            expected = image + strength * (spec.adain(image, x[half, 0].double()) - image)
            assert (output[half, i].double() - expected).abs().max().item() <= TOLERANCE
    if strength == 1.0:
        assert torch.equal(output, full)
    if strength == 0.0:
        assert torch.equal(output, x)


def test_adain_keeps_several_references_as_they_are() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 5, 24, 16) * 2 + 1  # 2 references, 3 targets
    weights = [3.0, 1.0]
    output = AdaIN(strength=0.4, reference_cache=ReferenceCache(weights))(x)
    for half in range(2):
        assert torch.equal(output[half, :2], x[half, :2])
        for i in range(2, 5):
            image = x[half, i].double()
            mapped = spec.mixture_adain(image, [x[half, 0].double(), x[half, 1].double()], weights)
            assert (output[half, i].double() - (image + 0.4 * (mapped - image))).abs().max().item() <= TOLERANCE


def expected_attention(
    layer: fl.SelfAttention, x: torch.Tensor, *, strength: float, cfg: bool, **options: Any
) -> torch.Tensor:
    """The shared self-attention at a strength, image by image: AdaIN moved part of the way, `shift + log s` on the
    reference logits (no reference tokens at 0), written with the plain helpers of `spec_reference`."""
    q, k, v = (t.double() for t in projections(layer, x))
    scale, shift = options.get("shared_score_scale", 1.0), options.get("shared_score_shift", 0.0)
    adain = {"q": True, "k": True, "v": options.get("adain_values", False)}
    out = torch.empty_like(q)
    for rows in spec.halves_of(x.shape[0], cfg):
        ref = rows[0]
        for i in rows:
            if i == ref:
                out[i] = spec.attention(q[i], k[i], v[i], layer.num_heads, None, 0.0)
                continue
            moved = {
                name: t[i] + strength * (spec.adain(t[i], t[ref]) - t[i]) if adain[name] else t[i]
                for name, t in (("q", q), ("k", k), ("v", v))
            }
            if strength == 0.0:
                out[i] = spec.attention(moved["q"], moved["k"], moved["v"], layer.num_heads, None, 0.0)
                continue
            keys, values = torch.cat([moved["k"], scale * k[ref]]), torch.cat([moved["v"], v[ref]])
            num_tokens = x.shape[1]
            out[i] = spec.attention(moved["q"], keys, values, layer.num_heads, num_tokens, shift + math.log(strength))
    return layer.layer("Linear", fl.Linear)(out.float())


ATTENTION_OPTIONS: list[dict[str, Any]] = [
    {},
    {"shared_score_scale": 0.7, "shared_score_shift": math.log(2), "adain_values": True},
    {"shared_score_shift": 6.0},  # a large shift: at strength 0 still no weight on the reference, and no NaN
]


@pytest.mark.parametrize("options", ATTENTION_OPTIONS, ids=["default", "scaled-shifted", "large-shift"])
@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("strength", STRENGTHS)
def test_shared_attention_at_a_strength(strength: float, cfg: bool, options: dict[str, Any]) -> None:
    layer = make_self_attention()
    torch.manual_seed(2)
    x = torch.randn(6, 20, 64)
    plain = layer(x)
    expected = expected_attention(layer, x, strength=strength, cfg=cfg, **options)
    full = shared_attention(layer, classifier_free_guidance=cfg, **options).inject(layer)
    method = layer(x)
    full.eject()
    shared_attention(layer, classifier_free_guidance=cfg, strength=strength, **options).inject(layer)
    output = layer(x)
    assert torch.isfinite(output).all()
    assert (output - expected).abs().max().item() <= TOLERANCE
    references = [0, 3] if cfg else [0]
    assert (output[references] - plain[references]).abs().max().item() <= TOLERANCE
    if strength == 1.0:
        assert torch.equal(output, method)  # the adapter without a strength, bit for bit
    if strength == 0.0:
        assert torch.equal(output, plain)  # the plain layer, bit for bit


def test_sliced_attention_at_a_strength() -> None:
    layer = make_self_attention()
    layer.ensure_find(fl.ScaledDotProductAttention).slice_size = 7
    torch.manual_seed(3)
    x = torch.randn(4, 23, 64)
    expected = expected_attention(layer, x, strength=0.5, cfg=True, shared_score_shift=0.3)
    shared_attention(layer, strength=0.5, shared_score_shift=0.3).inject(layer)
    assert (layer(x) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("strength", STRENGTHS)
def test_several_references_at_a_strength(strength: float) -> None:
    """Without AdaIN, the strength is `log s` on every reference's logits, beside its log-weight."""
    layer = make_self_attention()
    torch.manual_seed(4)
    x = torch.randn(8, 16, 64)  # two halves: 2 references and 2 targets each
    plain = layer(x)
    weights = [2.0, 1.0]
    options: dict[str, Any] = {"adain_queries": False, "adain_keys": False}
    cache = ReferenceCache(weights)
    shared_attention(layer, reference_cache=cache, strength=strength, shared_score_shift=0.4, **options).inject(layer)
    output = layer(x)
    assert layer.find(ReferenceAttention) is not None and torch.isfinite(output).all()
    if strength == 0.0:
        assert torch.equal(output, plain)
        return
    q, k, v = projections(layer, x)
    shift = 0.4 + math.log(strength)
    attended = spec.reference_attention(q, k, v, layer.num_heads, weights=weights, shared_score_shift=shift, **options)
    expected = layer.layer("Linear", fl.Linear)(attended.float())
    assert (output - expected).abs().max().item() <= TOLERANCE


def test_several_references_with_adain_at_strength_zero_is_plain() -> None:
    layer = make_self_attention()
    torch.manual_seed(5)
    x = torch.randn(8, 16, 64)
    plain = layer(x)
    shared_attention(layer, reference_cache=ReferenceCache([1.0, 3.0]), strength=0.0, adain_values=True).inject(layer)
    assert torch.equal(layer(x), plain)


def test_swap_mode_takes_strength_one_only() -> None:
    with pytest.raises(ValueError, match="swap mode takes strength 1 only"):
        ReferenceAttention(4, mode="swap", strength=0.5, reference_cache=ReferenceCache())
    with pytest.raises(ValueError, match="strength only apply with attention_mode='concat'"):
        StyleAlignedOptions(attention_mode="swap", strength=0.5)
    with pytest.raises(ValueError, match="strength only applies without full_attention_share"):
        StyleAlignedOptions(full_attention_share=True, strength=0.5)


def group_norm(seed: int) -> tuple[fl.GroupNorm, fl.Chain]:
    torch.manual_seed(seed)
    norm = fl.GroupNorm(channels=32, num_groups=8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    return norm, fl.Chain(norm)


def expected_group_norm(norm: fl.GroupNorm, x: torch.Tensor, strength: float, cfg: bool) -> torch.Tensor:
    """Each target normalised with `own + s (joint - own)` for its mean and variance, the joint statistics taken over
    it and its reference stacked side by side."""
    x = x.double()
    out = torch.empty_like(x)
    groups = norm.num_groups
    for rows in spec.halves_of(x.shape[0], cfg):
        reference = x[rows[0]]
        for i in rows:
            own = x[i].reshape(groups, -1)
            joint = torch.stack([x[i], reference]).transpose(0, 1).reshape(groups, -1)
            own_mean, own_var = own.mean(-1, keepdim=True), own.var(-1, unbiased=False, keepdim=True)
            joint_mean, joint_var = joint.mean(-1, keepdim=True), joint.var(-1, unbiased=False, keepdim=True)
            mean = own_mean + strength * (joint_mean - own_mean)
            var = own_var + strength * (joint_var - own_var)
            normed = ((own - mean) / (var + norm.eps).sqrt()).reshape(x.shape[1], -1)
            out[i] = (normed * norm.weight.double()[:, None] + norm.bias.double()[:, None]).reshape(x[i].shape)
    return out


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("strength", STRENGTHS)
def test_shared_group_norm_at_a_strength(strength: float, cfg: bool) -> None:
    norm, parent = group_norm(6)
    x = torch.randn(6, 32, 6, 5) * 3 + 1
    plain = norm(x)
    full = SharedGroupNormAdapter(norm, cfg, ReferenceCache()).inject(parent)
    method = parent(x)
    full.eject()
    SharedGroupNormAdapter(norm, cfg, ReferenceCache(), strength=strength).inject(parent)
    output = parent(x)
    assert (output - expected_group_norm(norm, x, strength, cfg)).abs().max().item() <= TOLERANCE
    references = [0, 3] if cfg else [0]
    assert torch.equal(output[references], plain[references])
    if strength == 1.0:
        assert torch.equal(output, method)
    if strength == 0.0:
        assert torch.equal(output, plain)


@pytest.mark.parametrize("strength", [0.0, 0.5])
def test_recorded_references_at_a_strength_equal_one_batch(strength: float) -> None:
    torch.manual_seed(7)
    layer = fl.SelfAttention(embedding_dim=64, num_heads=4)
    cache = ReferenceCache()
    shared_attention(layer, reference_cache=cache, strength=strength, shared_score_shift=0.2).inject(layer)
    x = torch.randn(12, 16, 64)
    expected = layer(x)
    assert (chunked(layer, cache, x, 2, 2) - expected).abs().max().item() <= TOLERANCE
    norm, parent = group_norm(8)
    cache = ReferenceCache()
    SharedGroupNormAdapter(norm, True, cache, strength=strength).inject(parent)
    x = torch.randn(12, 32, 5, 6) * 2 + 0.5
    expected = parent(x)
    assert (chunked(parent, cache, x, 2, 3) - expected).abs().max().item() <= TOLERANCE
