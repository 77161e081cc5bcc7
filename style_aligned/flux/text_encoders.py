"""The text encoders of FLUX.1: CLIP L's pooled vector and T5-XXL's token embeddings.

CLIP L is Refiners' `CLIPTextEncoderL`; FLUX.1 takes its output at the first end-of-text token (transformers'
`pooler_output`, without projection). T5-XXL is transformers' `T5EncoderModel`, an optional dependency
(`pip install 'style-aligned[flux]'`): prompts are padded or cut to `max_sequence_length` tokens (512 for [dev],
256 for [schnell]) and encoded without attention mask, as `FluxPipeline` does.
"""

from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from refiners.foundationals.clip.text_encoder import CLIPTextEncoderL
from refiners.foundationals.clip.tokenizer import CLIPTokenizer
from torch import Tensor

from style_aligned.extras import require

DEV_MAX_SEQUENCE_LENGTH = 512
SCHNELL_MAX_SEQUENCE_LENGTH = 256


def clip_pooled_text_embedding(text_encoder: CLIPTextEncoderL, text: str | list[str]) -> Float[Tensor, "batch 768"]:
    """CLIP L's pooled embedding of prompts: its last hidden state at each prompt's first end-of-text token.

    Args:
        text_encoder: Refiners' CLIP L (its tokenizer included).
        text: One prompt or several.
    """
    tokenizer = text_encoder.ensure_find(CLIPTokenizer)
    tokens = tokenizer(text)  # batch 77
    hidden = text_encoder(text)  # batch 77 768
    end = (tokens == tokenizer.end_of_text_token_id).int().argmax(dim=1).to(hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), end]


class T5TextEncoder:
    """T5-XXL token embeddings of prompts, as FLUX.1 takes them.

    Example:
        ```py
        encoder = T5TextEncoder.from_pretrained("FLUX.1-dev", max_sequence_length=512)
        embedding = encoder(["a cat", "a dog"])  # (2, 512, 4096)
        ```
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_sequence_length: int = DEV_MAX_SEQUENCE_LENGTH) -> None:
        """Wrap a transformers T5 encoder and its tokenizer.

        Args:
            model: A transformers `T5EncoderModel`.
            tokenizer: Its tokenizer (a transformers tokenizer, called with `padding="max_length"`).
            max_sequence_length: The number of text tokens (512 for [dev], 256 for [schnell]).
        """
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be positive, not {max_sequence_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(
        cls,
        root: Path | str,
        *,
        max_sequence_length: int = DEV_MAX_SEQUENCE_LENGTH,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "T5TextEncoder":
        """Load T5 from a FLUX.1 diffusers folder (`text_encoder_2/`, `tokenizer_2/`) or a T5 model folder.

        Raises:
            MissingExtraError: If transformers is not installed.
        """
        transformers = require("transformers", extra="flux", feature="FLUX.1's T5 text encoder")
        root = Path(root)
        model_folder = root / "text_encoder_2" if (root / "text_encoder_2").is_dir() else root
        tokenizer_folder = root / "tokenizer_2" if (root / "tokenizer_2").is_dir() else root
        model = transformers.T5EncoderModel.from_pretrained(model_folder, torch_dtype=dtype).to(device).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
        return cls(model, tokenizer, max_sequence_length=max_sequence_length)

    def tokenize(self, text: str | list[str]) -> Tensor:
        """The token ids of prompts, padded or cut to `max_sequence_length`."""
        encoded = self.tokenizer(
            [text] if isinstance(text, str) else text,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        )
        return encoded.input_ids

    @torch.no_grad()
    def __call__(self, text: str | list[str]) -> Float[Tensor, "batch tokens dim"]:
        """The token embeddings of prompts (no attention mask: padding tokens are encoded like the others)."""
        tokens = self.tokenize(text).to(self.model.device)
        return self.model(tokens, output_hidden_states=False)[0]
