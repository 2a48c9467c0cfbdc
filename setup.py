from setuptools import find_packages, setup

setup(
    name="dsv3-jax",
    version="0.1.0",
    description="DeepSeek-V3 (MLA, DeepSeekMoE, MTP, FP8) in JAX/Flax, with Pallas kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["dsv3_jax", "dsv3_jax.*", "pallas_kernels", "pallas_kernels.*"])
    + ["dsv3_jax.configs"],
    # The presets live in the top-level configs/ and ship inside the package as dsv3_jax/configs.
    package_dir={"dsv3_jax.configs": "configs"},
    package_data={"dsv3_jax.configs": ["*.json"], "dsv3_jax.ops.cpu_kernels": ["*.cc"]},  # C++ built on first use
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.12",
        "numpy>=1.26",
        "ml_dtypes>=0.5",
        "safetensors>=0.4",
        "absl-py>=2.0",
        "tokenizers>=0.15",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "tqdm>=4.66",
    ],
    extras_require={
        # libtpu: compile-only TPU plans (dsv3_jax.plan, tests/test_plan.py); the release jax[tpu]==0.10.2 pins.
        "dev": ["pytest>=8", "ruff>=0.5", "torch", "transformers>=5.0", "tensorboard>=2.16", "nbclient>=0.10",
                "nbformat>=5.9", "ipykernel>=6.29", "pytest-xdist>=3.5", "libtpu==0.0.42.*"],
        "gpu": ["jax[cuda12]>=0.6", "jax-triton>=0.3"],
    },
)
