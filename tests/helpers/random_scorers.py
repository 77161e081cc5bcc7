"""Small random-weight CLIP and DINO (ViT) models saved with their processors, as `--clip` and `--dino` folders."""

from pathlib import Path
from typing import Any

import torch

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


def random_clip() -> tuple[Any, Any]:
    """A small random CLIP (32x32 px images, a byte-level vocabulary) and its processor."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    letters = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1} | {token: 2 + i for i, token in enumerate(letters)}
    vocab |= {f"{letter}</w>": len(vocab) + i for i, letter in enumerate(letters)}
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
    )
    text = {"vocab_size": len(vocab), "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1}
    vision = SMALL | {"image_size": 32, "patch_size": 8}
    return CLIPModel(CLIPConfig(text_config=SMALL | text, vision_config=vision, projection_dim=32)).eval(), processor


def save_random_scorers(root: Path) -> tuple[Path, Path]:
    """Write a small random CLIP and a small random ViT (32x32 px inputs) to `root/clip` and `root/dino`.

    Returns:
        The CLIP folder and the DINO folder.
    """
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    clip, clip_processor = random_clip()
    dino = ViTModel(ViTConfig(**SMALL, image_size=32, patch_size=8), add_pooling_layer=False).eval()
    dino_processor = ViTImageProcessor(size={"height": 32, "width": 32})
    folders = root / "clip", root / "dino"
    for model, processor, folder in ((clip, clip_processor, folders[0]), (dino, dino_processor, folders[1])):
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folders
