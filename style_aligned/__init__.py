"""StyleAligned shared attention for Stable Diffusion, as composable Refiners adapters.

The package, by layer of the architecture:

- `layers`: the method as Fluxion modules (references, AdaIN, the shared attention kernels, the reference cache);
- `adapters`: `StyleAlignedAdapter` and the per-layer adapters it injects, and the choice of layers;
- `options`: `StyleAlignedOptions`, every option of the method with its defaults and checks;
- `weights`: reading, converting and loading model weights, LoRAs and the SDXL ControlNet;
- `pipeline`: whole sets: generation, solvers, style transfer (DDIM inversion), panoramas, composition with other
  adapters, set files;
- `batch`: many sets from a manifest, in this process or on a Ray cluster, resumable;
- `app`: the local web app;
- `evaluation`: the paper's metrics, sweeps of options and their tables;
- `cli`: the `style-aligned` command, one module per subcommand.
"""

from style_aligned.adapters.group_norm import SharedGroupNormAdapter
from style_aligned.adapters.shared_attention import SharedAttentionAdapter
from style_aligned.adapters.style_aligned_adapter import StyleAlignedAdapter
from style_aligned.adapters.unet_layers import SelfAttentionLayer, self_attention_layers
from style_aligned.layers.adain import AdaIN
from style_aligned.layers.attention import (
    JointScaledDotProductAttention,
    SharedScaledDotProductAttention,
)
from style_aligned.layers.reference_attention import ReferenceAttention
from style_aligned.layers.reference_cache import ReferenceCache
from style_aligned.layers.references import (
    CheckBatchLayout,
    GetReferences,
    ScaleReferences,
    SplitHalves,
)
from style_aligned.options import StyleAlignedOptions
from style_aligned.pipeline.generate import generate_set
from style_aligned.pipeline.inversion import ReferenceTrajectory
from style_aligned.pipeline.spec import GeneratedSet, SetSpec
from style_aligned.pipeline.transfer import TransferSpec, make_trajectory, transfer_set
from style_aligned.weights.loading import load_pipeline

__all__ = [
    "AdaIN",
    "GeneratedSet",
    "ReferenceTrajectory",
    "SetSpec",
    "TransferSpec",
    "generate_set",
    "load_pipeline",
    "make_trajectory",
    "transfer_set",
    "CheckBatchLayout",
    "GetReferences",
    "JointScaledDotProductAttention",
    "ReferenceAttention",
    "ReferenceCache",
    "ScaleReferences",
    "SelfAttentionLayer",
    "SharedAttentionAdapter",
    "SplitHalves",
    "SharedGroupNormAdapter",
    "SharedScaledDotProductAttention",
    "StyleAlignedAdapter",
    "StyleAlignedOptions",
    "self_attention_layers",
]
