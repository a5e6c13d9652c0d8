"""Llama / Mistral in Flax NNX, with Hugging Face checkpoints in and out."""

from .config import DTYPES, ModelConfig, UnsupportedConfigError, dtype_of, load_config
from .decoder import KVCache, REMAT_POLICIES, Transformer, logical_axes

__all__ = [
    "KVCache",
    "ModelConfig",
    "REMAT_POLICIES",
    "Transformer",
    "UnsupportedConfigError",
    "load_config",
    "logical_axes",
]

from .hf_io import CheckpointError, from_pretrained, save_pretrained  # noqa: E402

__all__ += ["CheckpointError", "from_pretrained", "save_pretrained"]
from .presets import PRESETS, init_random, preset_config  # noqa: E402

__all__ += ["PRESETS", "init_random", "preset_config"]
from .gguf import GGUFError, convert_gguf  # noqa: E402

# The model fetcher is the submodule `mcpo_jax.models.fetch` (also a script: python -m mcpo_jax.models.fetch);
# it is not imported here so that running it as __main__ does not import it twice.
__all__ += ["GGUFError", "convert_gguf"]
