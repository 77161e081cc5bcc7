"""Parity of the StyleAligned layers with the independent implementation in `spec_reference`."""

import itertools
import math

import pytest
import refiners.fluxion.layers as fl
import torch
from refiners.fluxion.layers.chain import ChainError

from style_aligned import (
    AdaIN,
    GetReferences,
    ReferenceCache,
    ScaleReferences,
    SharedAttentionAdapter,
    SharedGroupNormAdapter,
    SplitHalves,
)
from tests.helpers import spec_reference as spec
from tests.helpers.layers import make_self_attention, projections, shared_attention

TOLERANCE = 1e-5


def expected_output(layer: fl.SelfAttention, x: torch.Tensor, **options: float | bool) -> torch.Tensor:
    q, k, v = projections(layer, x)
    attended = spec.shared_attention(q, k, v, layer.num_heads, **options)  # type: ignore[arg-type]
    return layer.layer("Linear", fl.Linear)(attended.float())


def adapt(layer: fl.SelfAttention, **options: float | bool) -> SharedAttentionAdapter:
    return shared_attention(layer, **options).inject(layer)


def batch_sizes(classifier_free_guidance: bool) -> list[int]:
    return [2, 4, 6] if classifier_free_guidance else [1, 2, 5]


CASES = [
    dict(
        adain_queries=aq,
        adain_keys=ak,
        adain_values=av,
        shared_score_scale=scale,
        shared_score_shift=shift,
        classifier_free_guidance=cfg,
        batch_size=batch_size,
    )
    for aq, ak, av, scale, shift, cfg in itertools.product(
        [True, False], [True, False], [True, False], [1.0, 0.5, 1.7], [0.0, math.log(2), -0.8], [True, False]
    )
    for batch_size in batch_sizes(cfg)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_shared_attention_matches_spec(case: dict[str, float | bool | int]) -> None:
    options = {k: v for k, v in case.items() if k != "batch_size"}
    layer = make_self_attention()
    torch.manual_seed(1)
    x = torch.randn(int(case["batch_size"]), 24, 64)
    expected = expected_output(layer, x, **options)
    adapt(layer, **options)
    assert (layer(x) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("classifier_free_guidance", [True, False])
@pytest.mark.parametrize("batch_size", [2, 4, 6])
def test_full_attention_share_matches_spec(classifier_free_guidance: bool, batch_size: int) -> None:
    layer = make_self_attention()
    torch.manual_seed(2)
    x = torch.randn(batch_size, 20, 64)
    options: dict[str, float | bool] = dict(
        full_attention_share=True, classifier_free_guidance=classifier_free_guidance
    )
    expected = expected_output(layer, x, **options)
    adapt(layer, **options)
    assert (layer(x) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("shift", [0.0, math.log(2)])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_reference_rows_keep_plain_attention(scale: float, shift: float) -> None:
    layer = make_self_attention()
    torch.manual_seed(3)
    x = torch.randn(6, 16, 64)
    plain = layer(x)
    adapt(layer, shared_score_scale=scale, shared_score_shift=shift)
    shared = layer(x)
    assert (shared[[0, 3]] - plain[[0, 3]]).abs().max().item() <= TOLERANCE
    assert (shared[[1, 2, 4, 5]] - plain[[1, 2, 4, 5]]).abs().max().item() > 1e-3


def test_log2_shift_equals_reference_tokens_appended_twice() -> None:
    layer = make_self_attention()
    torch.manual_seed(4)
    x = torch.randn(4, 12, 64)
    q, k, v = projections(layer, x)
    # AdaIN off, so appending the reference twice is plain attention over [own, ref, ref].
    refs = torch.cat([k[[0, 0, 2, 2]], k[[0, 0, 2, 2]]], dim=1), torch.cat([v[[0, 0, 2, 2]], v[[0, 0, 2, 2]]], dim=1)
    twice = torch.nn.functional.scaled_dot_product_attention(
        *(t.unflatten(-1, (4, 16)).transpose(1, 2) for t in (q, torch.cat([k, refs[0]], 1), torch.cat([v, refs[1]], 1)))
    )
    expected = layer.layer("Linear", fl.Linear)(twice.transpose(1, 2).flatten(2))
    adapt(layer, adain_queries=False, adain_keys=False, shared_score_shift=math.log(2))
    assert (layer(x) - expected).abs().max().item() <= TOLERANCE


def test_scale_and_shift_change_while_injected() -> None:
    layer = make_self_attention()
    torch.manual_seed(5)
    x = torch.randn(4, 12, 64)
    options: dict[str, float | bool] = dict(shared_score_scale=0.5, shared_score_shift=0.3)
    expected = expected_output(layer, x, **options)
    adapter = adapt(layer)
    adapter.shared_score_scale, adapter.shared_score_shift = 0.5, 0.3
    assert (adapter.shared_score_scale, adapter.shared_score_shift) == (0.5, 0.3)
    assert (layer(x) - expected).abs().max().item() <= TOLERANCE


def test_eject_restores_layer() -> None:
    layer = make_self_attention()
    sdpa = layer.ensure_find(fl.ScaledDotProductAttention)
    x = torch.randn(4, 12, 64)
    plain = layer(x)
    adapter = adapt(layer)
    assert not torch.equal(layer(x), plain)
    adapter.eject()
    assert layer.ensure_find(fl.ScaledDotProductAttention) is sdpa
    assert torch.equal(layer(x), plain)


@pytest.mark.parametrize("classifier_free_guidance", [True, False])
@pytest.mark.parametrize("batch_size", [2, 4, 6])
def test_shared_group_norm_matches_spec(classifier_free_guidance: bool, batch_size: int) -> None:
    torch.manual_seed(6)
    norm = fl.GroupNorm(channels=32, num_groups=8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    parent = fl.Chain(norm)
    x = torch.randn(batch_size, 32, 6, 5) * 3 + 1
    expected = spec.shared_group_norm(x, 8, norm.weight, norm.bias, 1e-6, classifier_free_guidance)
    adapter = SharedGroupNormAdapter(norm, classifier_free_guidance, ReferenceCache()).inject(parent)
    assert (parent(x) - expected).abs().max().item() <= TOLERANCE
    adapter.eject()
    assert torch.equal(parent(x), norm(x))


def test_references_are_broadcast_views_and_scale_spares_the_reference() -> None:
    x = SplitHalves(True, ReferenceCache())(torch.arange(6.0).reshape(6, 1, 1))  # (halves, per_half, tokens, channels)
    assert x.shape == (2, 3, 1, 1)
    references = GetReferences(ReferenceCache())(x)
    assert references.flatten().tolist() == [0, 0, 0, 3, 3, 3]
    assert references.stride(1) == 0  # a broadcast view: no copy per image
    assert (
        GetReferences(ReferenceCache())(SplitHalves(False, ReferenceCache())(torch.arange(6.0).reshape(6, 1, 1)))
        .flatten()
        .tolist()
        == [0] * 6
    )
    assert ScaleReferences(0.5, reference_cache=ReferenceCache())(
        GetReferences(ReferenceCache())(x + 1)
    ).flatten().tolist() == [1, 0.5, 0.5, 4, 2, 2]


def test_adain_maps_reference_onto_itself() -> None:
    torch.manual_seed(7)
    x = torch.randn(2, 2, 30, 8) * 2 + 3
    y = AdaIN(reference_cache=ReferenceCache())(x)
    assert torch.equal(y[:, 0], x[:, 0])
    assert torch.allclose(y[:, 1].mean(-2), x[:, 0].mean(-2), atol=1e-5)
    assert torch.allclose(y[:, 1].std(-2), x[:, 0].std(-2), rtol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3, 5])
def test_odd_batch_under_guidance_is_a_clear_error(batch_size: int) -> None:
    layer = make_self_attention()
    adapt(layer)
    with pytest.raises(ChainError, match="classifier_free_guidance=True the batch must be"):
        layer(torch.randn(batch_size, 8, 64))


def test_empty_batch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        SplitHalves(False, ReferenceCache())(torch.randn(0, 8, 64))


def test_sliced_attention_matches_spec() -> None:
    layer = make_self_attention()
    layer.ensure_find(fl.ScaledDotProductAttention).slice_size = 5  # queries in slices of 5 tokens
    torch.manual_seed(8)
    x = torch.randn(6, 23, 64)
    options: dict[str, float | bool] = dict(shared_score_shift=0.4, shared_score_scale=0.7)
    expected = expected_output(layer, x, **options)
    adapt(layer, **options)
    assert (layer(x) - expected).abs().max().item() <= TOLERANCE
