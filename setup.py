from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="zopro",
    version="0.1.0",
    description="Memory-lean, kernel-accelerated zeroth-order preference optimisation (ZOPrO) for LLMs",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["zokernels", "zokernels.*", "zopro", "zopro.*"]),
    package_data={"zopro.train": ["assets/*"]},
    install_requires=[
        # The CPU wheel is installed first by the README's set-up (pip install torch==2.13.0 ...): an unpinned torch
        # may pull a multi-GB CUDA build. On a GPU machine, keep the CUDA torch you already have.
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "transformers>=4.56",
        "peft>=0.13",
        "datasets>=3.0",
        "bitsandbytes>=0.48",
        "safetensors",
        "gguf>=0.10",  # transformers loads the offline SmolLM2 GGUF weights through it
        "pyyaml",  # --config file.yaml
        "tqdm",
        "matplotlib",  # reward-curve and benchmark PNGs
        "vaderSentiment",  # the default job's gold judge (--judge vader): MIT, its lexicon shipped in the wheel
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4"],
        "trl": ["trl>=1.13"],
    },
)
