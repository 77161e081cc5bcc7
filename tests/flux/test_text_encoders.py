"""CLIP L's pooled vector equals transformers' `pooler_output`; the T5 wrapper encodes as `FluxPipeline` does."""

import types

import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # type: ignore[import-untyped]
from refiners.foundationals.clip.text_encoder import CLIPTextEncoderL
from refiners.foundationals.clip.tokenizer import CLIPTokenizer
from tokenizers import Tokenizer, models, pre_tokenizers  # type: ignore[import-untyped]
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel  # type: ignore[import-untyped]

import style_aligned.flux.text_encoders as text_encoders
from style_aligned.extras import MissingExtraError
from style_aligned.flux import T5TextEncoder, clip_pooled_text_embedding
from style_aligned.weights.key_maps import load_key_map
from tests.helpers import diffusers_models as dm

PROMPTS = ["a watercolor fox", "a very long prompt " * 30]


@torch.no_grad()
def test_clip_pooled_embedding_equals_transformers_pooler_output() -> None:
    source = dm.text_encoder("text_encoder", "sd1", seed=22)
    keys, _ = load_key_map("sd1_text_encoder")
    state = {target: source.state_dict()[key.removeprefix("text_model.")] for key, (target, _) in keys.items()}
    with torch.device("meta"):
        encoder = CLIPTextEncoderL()
    encoder.load_state_dict(state, strict=True, assign=True)
    tokens = encoder.ensure_find(CLIPTokenizer)(PROMPTS)
    expected = source(tokens).pooler_output
    actual = clip_pooled_text_embedding(encoder.eval(), PROMPTS)
    assert actual.shape == (2, 768)
    assert (actual - expected).abs().max() < 1e-4


def word_tokenizer() -> PreTrainedTokenizerFast:
    words = sorted({word for prompt in PROMPTS for word in prompt.split()})
    vocabulary = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {word: i + 3 for i, word in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("max_sequence_length", [8, 64])
@torch.no_grad()
def test_t5_wrapper_encodes_as_flux_pipeline(max_sequence_length: int) -> None:
    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    model, tokenizer = T5EncoderModel(config).eval(), word_tokenizer()
    pipeline = types.SimpleNamespace(
        tokenizer_2=tokenizer, text_encoder_2=model, text_encoder=model, tokenizer_max_length=77
    )
    expected = FluxPipeline._get_t5_prompt_embeds(
        pipeline, PROMPTS, max_sequence_length=max_sequence_length, device=torch.device("cpu")
    )
    actual = T5TextEncoder(model, tokenizer, max_sequence_length=max_sequence_length)(PROMPTS)
    assert actual.shape == (2, max_sequence_length, 32)
    assert torch.equal(actual, expected)


def test_t5_without_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(module: str, *, extra: str, feature: str) -> None:
        raise MissingExtraError(
            f"{feature} needs {module}, which is not installed: pip install 'style-aligned[{extra}]'"
        )

    monkeypatch.setattr(text_encoders, "require", missing)
    with pytest.raises(MissingExtraError, match=r"style-aligned\[flux\]"):
        T5TextEncoder.from_pretrained("nowhere")
