"""Key maps from diffusers and transformers state dicts to Refiners state dicts, shipped as data.

Each `<name>.json` holds `keys` (source key -> [Refiners key, shape]) and `unused` (source keys with no Refiners
counterpart, such as the last layer of SDXL's CLIP L, whose output SDXL does not use). They are made by
`tools/make_key_maps.py` from a trace of both models on the meta device.
"""

import json
from functools import cache
from pathlib import Path
from typing import Any

KEY_MAPS_DIR = Path(__file__).parent


@cache
def load_key_map(name: str) -> tuple[dict[str, tuple[str, tuple[int, ...]]], frozenset[str]]:
    """Load a key map.

    Args:
        name: The key map's name (e.g. `"sdxl_unet"`).

    Returns:
        The map from source key to (Refiners key, shape), and the set of source keys that are not used.
    """
    data: dict[str, Any] = json.loads((KEY_MAPS_DIR / f"{name}.json").read_text())
    keys = {source: (target, tuple(shape)) for source, (target, shape) in data["keys"].items()}
    return keys, frozenset(data["unused"])
