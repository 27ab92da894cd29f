"""Builds megavlm: the Python package, kernels/ as megavlm.kernels, csrc/ as megavlm._C."""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "megavlm._C",
        sorted(glob("csrc/*.cpp")),
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    name="megavlm",
    version="0.1.0",
    description="Megatron-style training system for vision-language models",
    python_requires=">=3.10",
    packages=find_packages(include=["megavlm", "megavlm.*"]) + ["megavlm.kernels"],
    package_dir={"megavlm.kernels": "kernels"},
    package_data={"megavlm.training": ["gpus.yaml"]},   # the planner's GPU table
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    install_requires=[
        # torch itself is installed first by tools/setup_env.sh (CPU: the pinned 2.13.0 build);
        # a range here so pip never replaces the installed build.
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy>=1.24",
        "pyyaml>=6",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "pillow>=10",
        "psutil>=5.9",
        "tensorboard>=2.14",
        "rich>=13",
        "webdataset>=0.2",
        "pycocoevalcap>=1.2,<1.3",   # CIDEr-D and BLEU scorers (the Java tokenizer, METEOR, SPICE are not used)
        "imagehash>=4.3,<5",         # perceptual hashes of tools/filter_dataset.py (near-duplicate images)
        "datasketch>=1.6,<3",        # MinHash LSH of tools/filter_dataset.py (near-duplicate captions)
    ],
    extras_require={
        # 5.25 made the `kernels` package a hard dependency and imports it on start-up; run from a
        # checkout, the repository's kernels/ folder would stand in for it and break the import
        "hf": ["transformers>=5,<5.25"],
        "kernels": ["triton>=3.2"],
        "dali": ["nvidia-dali-cuda130>=2.4"],
        "peft": ["peft>=0.13", "torchao>=0.10"],
        "test": ["pytest>=8", "transformers>=5,<5.25", "triton>=3.2", "nvidia-dali-cuda130>=2.4", "peft>=0.13",
                 "torchao>=0.10"],
    },
    entry_points={"console_scripts": ["megavlm=megavlm.cli:main", "megavlm-train=megavlm.train:main"]},
)
