"""Recording the references once and running targets in batches of any size equals one batch with everything."""

import math
from typing import Any

import pytest
import refiners.fluxion.layers as fl
import torch
from refiners.fluxion.layers.chain import ChainError

from style_aligned import ReferenceCache, SharedGroupNormAdapter
from tests.helpers.layers import shared_attention

TOLERANCE = 1e-5
OPTIONS: list[dict[str, Any]] = [
    {},
    {"shared_score_scale": 0.6, "shared_score_shift": math.log(2)},
    {"adain_values": True, "adain_queries": False, "shared_score_shift": -0.4},
    {"classifier_free_guidance": False, "shared_score_scale": 1.3},
]


def rows(x: torch.Tensor, indices: list[int], halves: int) -> torch.Tensor:
    """Pick the same images in every half: [h0[indices] | h1[indices]]."""
    per_half = x.shape[0] // halves
    return torch.cat([x[h * per_half + i][None] for h in range(halves) for i in indices])


def chunked(
    layer: fl.Chain, cache: ReferenceCache, x: torch.Tensor, halves: int, chunk: int, ride: bool = False
) -> torch.Tensor:
    """Run the references alone, or with the first chunk of targets if `ride` (recording), then the (other) targets
    in chunks (replaying); reassemble the batch."""
    per_half = x.shape[0] // halves
    first = list(range(min(1 + chunk, per_half))) if ride else [0]
    with cache.record():
        references = layer(rows(x, first, halves))
    outputs = [references]
    with cache.replay():
        for start in range(len(first), per_half, chunk):
            outputs.append(layer(rows(x, list(range(start, min(start + chunk, per_half))), halves)))
    halves_out = [torch.cat([o.reshape(halves, -1, *o.shape[1:])[h] for o in outputs]) for h in range(halves)]
    return torch.cat(halves_out)


@pytest.mark.parametrize("ride", [False, True], ids=["reference-alone", "reference-with-first-chunk"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_attention_with_recorded_references_equals_one_batch(options: dict[str, Any], chunk: int, ride: bool) -> None:
    torch.manual_seed(0)
    layer = fl.SelfAttention(embedding_dim=64, num_heads=4)
    cache = ReferenceCache()
    shared_attention(layer, **options, reference_cache=cache).inject(layer)
    halves = 2 if options.get("classifier_free_guidance", True) else 1
    x = torch.randn(8 * halves, 24, 64)
    expected = layer(x)
    assert (chunked(layer, cache, x, halves, chunk, ride) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("ride", [False, True], ids=["reference-alone", "reference-with-first-chunk"])
@pytest.mark.parametrize("classifier_free_guidance", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_group_norm_with_recorded_references_equals_one_batch(
    classifier_free_guidance: bool, chunk: int, ride: bool
) -> None:
    torch.manual_seed(1)
    norm = fl.GroupNorm(channels=32, num_groups=8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    cache = ReferenceCache()
    parent = fl.Chain(norm)
    SharedGroupNormAdapter(norm, classifier_free_guidance, cache).inject(parent)
    halves = 2 if classifier_free_guidance else 1
    x = torch.randn(8 * halves, 32, 5, 6) * 2 + 0.5
    expected = parent(x)
    assert (chunked(parent, cache, x, halves, chunk, ride) - expected).abs().max().item() <= TOLERANCE


def test_misuse_of_the_cache_is_a_clear_error() -> None:
    layer = fl.SelfAttention(embedding_dim=64, num_heads=4)
    cache = ReferenceCache()
    shared_attention(layer, reference_cache=cache).inject(layer)
    with cache.replay(), pytest.raises(ChainError, match="no recorded references"):
        layer(torch.randn(4, 8, 64))
    with cache.record():
        layer(torch.randn(2, 8, 64))
    assert cache.nbytes > 0
    with cache.replay(), pytest.raises(ChainError, match="record them again"):
        layer(torch.randn(4, 12, 64))
    with cache.replay(), pytest.raises(RuntimeError, match="already in replay mode"), cache.record():
        pass
    assert cache.mode == "batch"
    cache.clear()
    assert cache.nbytes == 0

    joint = fl.SelfAttention(embedding_dim=64, num_heads=4)
    joint_cache = ReferenceCache()
    shared_attention(joint, full_attention_share=True, reference_cache=joint_cache).inject(joint)
    with joint_cache.record(), pytest.raises(ChainError, match="whole set in one batch"):
        joint(torch.randn(2, 8, 64))
