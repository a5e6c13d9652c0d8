"""mcpo-jax: MC-PO / OnMC-PO and the DPO family in pure JAX/Flax NNX."""

from setuptools import find_packages, setup

# Pinned to the versions this project is tested with; the APIs of flax.nnx, orbax and grain
# moved a lot during 2025-2026, so a floating pin is a silent break waiting to happen.
RUNTIME = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "datasets==5.2.0",
    "safetensors==0.8.0",
    "huggingface_hub>=1.0",
    "numpy>=2.0",
    "pyarrow>=15",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "jinja2>=3.1",  # chat templates (transformers apply_chat_template)
    "absl-py>=2.0",
    "gguf==0.19.0",  # GGUF checkpoints (models.gguf, models.fetch): NumPy reader and dequantizers, no torch
]

setup(
    name="mcpo-jax",
    version="0.1.0",
    description="Preference optimization via contrastive divergence (MC-PO, OnMC-PO) and the DPO family in JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mcpo_jax", "mcpo_jax.*"]),
    include_package_data=True,
    # XLA's GPU target specs for deviceless compilation (mcpo_jax.targets); listed here, they go into the
    # wheel and the sdist without a MANIFEST.in.
    package_data={"mcpo_jax": ["aot/*.txtpb", "aot/README.md"]},
    install_requires=RUNTIME,
    extras_require={
        # torch==2.13.0 is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
        "test": ["pytest>=8", "torch==2.13.0", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"],
        # Jupyter for examples/*.ipynb (objectives on arrays; a custom objective trained on the demo task).
        "notebook": ["notebook>=7", "jupyter>=1.0", "ipykernel>=6.29"],
        "cuda": ["jax[cuda13]==0.10.2"],
        "tpu": ["jax[tpu]==0.10.2", "gcsfs"],  # gcsfs: the gs:// backend of etils.epath (orbax)
        # Deviceless compilation on a CPU host (mcpo_jax.targets): libtpu for the TPU targets, the CUDA plugin
        # for the GPU ones. jax[cuda12] and jax[cuda13] both compiled the same HLO for h100 here (cuDNN attention
        # included, no GPU); cuda13 is the `cuda` extra's plugin, so one environment serves both (with both
        # plugins installed, jax reports "ALREADY_EXISTS: PJRT_Api already exists for device type cuda").
        "aot-tpu": ["jax[tpu]==0.10.2"],
        "aot-gpu": ["jax[cuda13]==0.10.2"],
    },
    entry_points={"console_scripts": ["mcpo-train=mcpo_jax.train:main"]},
)
