"""Several weighted references and swap mode, against the independent implementation in `spec_reference`."""

import itertools
import math

import pytest
import refiners.fluxion.layers as fl
import torch

from style_aligned import (
    AdaIN,
    ReferenceAttention,
    ReferenceCache,
    SharedAttentionAdapter,
    SharedGroupNormAdapter,
    StyleAlignedOptions,
)
from style_aligned.adapters.shared_attention import reference_attention_layers
from style_aligned.layers.reference_cache import mixture_weights
from tests.helpers import spec_reference as spec
from tests.helpers.layers import make_self_attention, projections, shared_attention

TOLERANCE = 1e-5


def inputs(batch_size: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch_size, 24, 64)


@pytest.mark.parametrize(
    ("adain", "scale", "shift", "cfg", "batch_size"),
    [
        (adain, scale, shift, cfg, batch_size)
        for adain, scale, shift, cfg in itertools.product(
            [(True, True, False), (False, False, False), (True, True, True)],
            [1.0, 0.5],
            [0.0, math.log(2)],
            [True, False],
        )
        for batch_size in ([2, 6] if cfg else [1, 3])
    ],
)
def test_one_reference_reduces_to_the_single_reference_layers(
    adain: tuple[bool, bool, bool], scale: float, shift: float, cfg: bool, batch_size: int
) -> None:
    options = dict(
        adain_queries=adain[0],
        adain_keys=adain[1],
        adain_values=adain[2],
        shared_score_scale=scale,
        shared_score_shift=shift,
    )
    layer = make_self_attention()
    x = inputs(batch_size)
    q, k, v = projections(layer, x)
    general = fl.Chain(
        *reference_attention_layers(
            layer.ensure_find(fl.ScaledDotProductAttention), StyleAlignedOptions(**options), cfg, cache=ReferenceCache()
        )
    )
    assert general.find(ReferenceAttention) is not None
    expected = layer.layer("Linear", fl.Linear)(general(q, k, v))
    shared_attention(layer, classifier_free_guidance=cfg, **options).inject(layer)
    assert not list(layer.layers(ReferenceAttention))  # one reference in concat mode: the single-reference layers
    assert (layer(x) - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("weights", [[1.0, 1.0], [3.0, 1.0], [0.2, 0.5, 0.3]])
@pytest.mark.parametrize(("scale", "shift"), [(1.0, 0.0), (0.7, math.log(2)), (1.3, -0.5)])
@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("adain_values", [False, True])
def test_several_references_match_spec(
    weights: list[float], scale: float, shift: float, cfg: bool, adain_values: bool
) -> None:
    layer = make_self_attention()
    batch_size = (len(weights) + 2) * (2 if cfg else 1)
    x = inputs(batch_size)
    q, k, v = projections(layer, x)
    options = dict(shared_score_scale=scale, shared_score_shift=shift, adain_values=adain_values)
    attended = spec.reference_attention(
        q, k, v, layer.num_heads, weights=weights, classifier_free_guidance=cfg, **options
    )
    expected = layer.layer("Linear", fl.Linear)(attended.float())
    cache = ReferenceCache(weights)
    shared_attention(layer, reference_cache=cache, classifier_free_guidance=cfg, **options).inject(layer)
    assert layer.find(ReferenceAttention) is not None
    with torch.no_grad():
        output = layer(x)
    assert (output - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0]])
@pytest.mark.parametrize("cfg", [True, False])
def test_swap_matches_spec(weights: list[float], cfg: bool) -> None:
    layer = make_self_attention(seed=3)
    batch_size = (len(weights) + 3) * (2 if cfg else 1)
    x = inputs(batch_size, seed=4)
    q, k, v = projections(layer, x)
    attended = spec.reference_attention(
        q, k, v, layer.num_heads, weights=weights, mode="swap", classifier_free_guidance=cfg
    )
    expected = layer.layer("Linear", fl.Linear)(attended.float())
    cache = ReferenceCache(weights)
    shared_attention(layer, reference_cache=cache, classifier_free_guidance=cfg, attention_mode="swap").inject(layer)
    with torch.no_grad():
        output = layer(x)
    assert (output - expected).abs().max().item() <= TOLERANCE


def test_swap_with_one_reference_is_the_targets_queries_over_the_references_keys_and_values() -> None:
    layer = make_self_attention(seed=5)
    x = inputs(4, seed=6)  # [uncond_ref, uncond_target | cond_ref, cond_target]
    q, k, v = projections(layer, x)
    heads = layer.num_heads
    expected = torch.stack(
        [
            torch.nn.functional.scaled_dot_product_attention(
                *(t[i].reshape(24, heads, -1).transpose(0, 1) for t in (q, k if i % 2 == 0 else k, v)),
            )
            .transpose(0, 1)
            .reshape(24, -1)
            if i % 2 == 0
            else torch.nn.functional.scaled_dot_product_attention(
                q[i].reshape(24, heads, -1).transpose(0, 1),
                k[i - 1].reshape(24, heads, -1).transpose(0, 1),
                v[i - 1].reshape(24, heads, -1).transpose(0, 1),
            )
            .transpose(0, 1)
            .reshape(24, -1)
            for i in range(4)
        ]
    )
    expected = layer.layer("Linear", fl.Linear)(expected)
    shared_attention(layer, attention_mode="swap", adain_queries=True).inject(layer)
    with torch.no_grad():
        assert (layer(x) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("mode", ["concat", "swap"])
def test_recorded_references_give_the_same_targets(mode: str) -> None:
    layer = make_self_attention(seed=7)
    weights = [2.0, 1.0]
    x = inputs(2 * 5, seed=8)  # two references and three targets per half
    cache = ReferenceCache(weights)
    adapter = shared_attention(layer, reference_cache=cache, attention_mode=mode).inject(layer)
    assert isinstance(adapter, SharedAttentionAdapter)
    with torch.no_grad():
        whole = layer(x).reshape(2, 5, 24, -1)
        by_half = x.reshape(2, 5, 24, -1)
        with cache.record():
            references = layer(by_half[:, :2].flatten(0, 1)).reshape(2, 2, 24, -1)
        with cache.replay():
            chunks = [layer(by_half[:, i : i + 1].flatten(0, 1)).reshape(2, 1, 24, -1) for i in range(2, 5)]
    assert (references - whole[:, :2]).abs().max().item() <= TOLERANCE
    assert (torch.cat(chunks, dim=1) - whole[:, 2:]).abs().max().item() <= TOLERANCE


def test_weights_are_relative_and_checked() -> None:
    assert mixture_weights([2.0, 1.0]) == pytest.approx((2 / 3, 1 / 3))
    assert mixture_weights([5.0]) == (1.0,)
    for bad in ([], [1.0, 0.0], [1.0, -2.0], [math.inf]):
        with pytest.raises(ValueError, match="reference weight"):
            ReferenceCache(bad)


def test_two_copies_of_one_reference_are_that_reference() -> None:
    layer = make_self_attention(seed=9)
    x = inputs(6, seed=10)  # [ref, target, target] per half
    with torch.no_grad():
        shared_attention(layer).inject(layer)
        single = layer(x).reshape(2, 3, 24, -1)[:, 1:]
        layer.ensure_find(SharedAttentionAdapter).eject()
        doubled_x = x.reshape(2, 3, 24, -1)[:, [0, 0, 1, 2]].flatten(0, 1)
        shared_attention(layer, reference_cache=ReferenceCache([1.0, 1.0])).inject(layer)
        doubled = layer(doubled_x).reshape(2, 4, 24, -1)[:, 2:]
    assert (single - doubled).abs().max().item() <= TOLERANCE


def test_swap_refuses_concat_only_options() -> None:
    for changes in (
        {"adain_values": True},
        {"shared_score_shift": 0.5},
        {"shared_score_scale": 0.5},
        {"full_attention_share": True},
    ):
        with pytest.raises(ValueError, match="only apply with attention_mode='concat'"):
            StyleAlignedOptions(attention_mode="swap", **changes)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attention_mode must be"):
        StyleAlignedOptions(attention_mode="mix")  # type: ignore[arg-type]


def test_full_attention_share_refuses_several_references() -> None:
    with pytest.raises(ValueError, match="one reference"):
        shared_attention(make_self_attention(), reference_cache=ReferenceCache([1.0, 1.0]), full_attention_share=True)


@pytest.mark.parametrize("cfg", [True, False])
def test_shared_group_norm_with_equally_weighted_references_pools_them(cfg: bool) -> None:
    """Equal weights: a target's statistics are those of its own map taken k times beside each reference once."""
    torch.manual_seed(11)
    norm = fl.GroupNorm(channels=8, num_groups=2)
    norm.weight.data.uniform_(0.5, 1.5)
    norm.bias.data.uniform_(-0.5, 0.5)
    parent = fl.Chain(norm)
    halves, count, per_half = (2 if cfg else 1), 2, 4
    x = torch.randn(halves * per_half, 8, 4, 4) * torch.linspace(0.5, 2.0, halves * per_half)[:, None, None, None]
    plain = parent(x)
    SharedGroupNormAdapter(norm, cfg, ReferenceCache([1.0, 1.0])).inject(parent)
    with torch.no_grad():
        output = parent(x)
    for half in range(halves):
        rows = list(range(half * per_half, (half + 1) * per_half))
        references = [x[r] for r in rows[:count]]
        for r in rows[:count]:  # references: the plain GroupNorm
            assert (output[r] - plain[r]).abs().max().item() <= TOLERANCE
        for i in rows[count:]:
            pooled = torch.stack([x[i]] * count + references).double()  # (2k, channels, h, w)
            groups = pooled.reshape(2 * count, 2, 4, 4, 4).transpose(0, 1).reshape(2, -1)
            mean, variance = groups.mean(-1), groups.var(-1, unbiased=False)
            own = x[i].double().reshape(2, -1)
            normed = ((own - mean[:, None]) / (variance[:, None] + norm.eps).sqrt()).reshape(8, -1)
            expected = normed * norm.weight.double()[:, None] + norm.bias.double()[:, None]
            assert (output[i].double().reshape(8, -1) - expected).abs().max().item() <= TOLERANCE


def test_adain_with_two_references_matches_spec() -> None:
    torch.manual_seed(12)
    x = torch.randn(2, 5, 24, 16) * 2 + 1  # (halves, images_per_half, tokens, channels): 2 references, 3 targets
    weights = [3.0, 1.0]
    output = AdaIN(reference_cache=ReferenceCache(weights))(x)
    for half in range(2):
        assert torch.equal(output[half, :2], x[half, :2])
        for i in range(2, 5):
            expected = spec.mixture_adain(x[half, i].double(), [x[half, 0].double(), x[half, 1].double()], weights)
            assert (output[half, i].double() - expected).abs().max().item() <= TOLERANCE
