"""StyleAlignedAdapter takes a FLUX.1 transformer with the U-Net's interface; it shares no layer in it yet."""

import pytest
import torch

from style_aligned import StyleAlignedAdapter
from style_aligned.flux import FluxTransformer
from style_aligned.options import StyleAlignedOptions
from tests.helpers.flux import TINY, run_refiners, transformer_inputs


def test_a_flux_transformer_is_adapted_with_the_same_interface() -> None:
    torch.manual_seed(0)
    transformer = FluxTransformer(TINY).eval()
    inputs = transformer_inputs(TINY, batch_size=3)
    before = run_refiners(transformer, inputs)
    state = transformer.state_dict()
    adapter = StyleAlignedAdapter(transformer, classifier_free_guidance=False, reference_weights=(1.0,)).inject()
    assert adapter.options.share_group_norm is False
    assert adapter.reference_cache.num_references == 1
    with adapter.reference_cache.record():
        recorded = run_refiners(transformer, inputs)
    with adapter.reference_cache.replay():
        run_refiners(transformer, inputs)
    adapter.reference_cache.clear()
    assert torch.equal(recorded, before)
    adapter.eject()
    assert list(transformer.state_dict()) == list(state)
    assert torch.equal(run_refiners(transformer, inputs), before)


def test_unet_only_options_are_refused_on_flux() -> None:
    with torch.device("meta"):
        transformer = FluxTransformer(TINY)
    with pytest.raises(ValueError, match="share_group_norm does not apply to FLUX.1"):
        StyleAlignedAdapter(transformer, StyleAlignedOptions(share_group_norm=True))
    with pytest.raises(ValueError, match="shared_blocks"):
        StyleAlignedAdapter(transformer, StyleAlignedOptions(shared_blocks=("up",)))
