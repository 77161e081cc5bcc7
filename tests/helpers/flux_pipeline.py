"""A random FLUX.1 diffusers pipeline folder, small enough for fast tests: tiny transformer and T5 (both sharded),
CLIP L and the FLUX.1 autoencoder at their real sizes (their key maps fix them), tokenizers and scheduler."""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL  # type: ignore[import-untyped]
from tokenizers import Tokenizer, models, pre_tokenizers  # type: ignore[import-untyped]
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel  # type: ignore[import-untyped]

from style_aligned.flux import FLUX_AUTOENCODER, FluxConfig
from tests.helpers import diffusers_models as dm
from tests.helpers.flux import diffusers_transformer

T5_CONFIG = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
PIPELINE_TINY = FluxConfig(
    num_layers=2,
    num_single_layers=2,
    num_attention_heads=2,
    attention_head_dim=32,
    joint_attention_dim=32,  # T5_CONFIG.d_model
    pooled_projection_dim=768,  # CLIP L
    axes_dims_rope=(4, 14, 14),  # as told from a single file's shapes
)
WORDS = ["a", "toy", "train", "car", "watercolor", "fox"]
SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
INDEX = {
    "_class_name": "FluxPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def t5_tokenizer() -> PreTrainedTokenizerFast:
    vocabulary = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {word: i + 3 for i, word in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@torch.no_grad()
def write_flux_pipeline(folder: Path, config: FluxConfig = PIPELINE_TINY, seed: int = 30) -> None:
    """Write a random FLUX.1 pipeline in the diffusers layout; the transformer and T5 in several shards."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(INDEX))
    transformer = diffusers_transformer(config, seed=seed)
    transformer.save_pretrained(folder / "transformer", safe_serialization=True, max_shard_size="100KB")
    torch.manual_seed(seed + 1)
    T5EncoderModel(T5_CONFIG).save_pretrained(folder / "text_encoder_2", max_shard_size="20KB")
    t5_tokenizer().save_pretrained(folder / "tokenizer_2")
    dm.save(dm.text_encoder("text_encoder", "sd1", seed=seed + 2), folder / "text_encoder")
    (folder / "tokenizer").mkdir()
    for name in ("vocab.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / "tokenizer" / name).write_text("{}")
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    dm.save(dm.build(lambda: AutoencoderKL(**FLUX_AUTOENCODER.to_diffusers()), seed + 3), folder / "vae")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
