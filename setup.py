"""RecZero: a from-scratch GRPO trainer that teaches an LLM to think before it recommends."""
from setuptools import find_packages, setup

setup(
    name="reczero",
    version="0.1.0",
    description="GRPO in pure PyTorch for reasoning-based rating prediction (RecZero / RecOne)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["grpo", "grpo.*", "recdata", "recdata.*", "prompts", "prompts.*",
                                    "experiments", "experiments.*"]),
    package_data={"experiments": ["configs/*.yaml"]},
    install_requires=[
        # Pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 installs a CPU build here.
        # GPU users install the CUDA build of the same version first (see docs/scaling.md).
        "torch==2.13.0",
        "transformers>=4.46",
        "safetensors",
        "numpy",
        "tqdm",
        "pyyaml",
        "matplotlib",
    ],
    extras_require={
        # gguf + accelerate: only to convert the packaged SmolLM2 GGUF into safetensors (`make model`).
        # hypothesis: the property tests of the completion parser and the rewards (tests/test_prompts_property.py).
        "dev": ["pytest", "gguf", "accelerate", "hypothesis"],
    },
)
