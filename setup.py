"""Packaging for iapo-openrlhf.

torch is deliberately unpinned here: CI and users install the build that fits their machine first
(`pip install torch==2.13.0` for the CPU wheel); a pin here would make pip pull a CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="iapo-openrlhf",
    version="0.1.0",
    description="IAPO (Information-Aware Policy Optimization) for OpenRLHF: token-wise advantages shaped "
    "by conditional mutual information, with a fast early-exit estimator.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["iapo_openrlhf", "iapo_openrlhf.*"]),
    data_files=[("share/iapo-openrlhf/slurm", ["slurm/job.sbatch.template"])],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "tokenizers>=0.20",
        "numpy",
        "pyyaml",
        "tqdm",
        "math-verify>=0.9",
        "matplotlib",
    ],
    entry_points={
        "console_scripts": [
            "iapo-train=iapo_openrlhf.cli.train:main",
            "iapo-eval=iapo_openrlhf.cli.eval:main",
            "iapo-train-ray=iapo_openrlhf.openrlhf.launch:cli",
            "iapo-slurm=iapo_openrlhf.slurm:cli",
        ],
    },
    extras_require={
        "test": ["pytest>=8", "deepspeed>=0.19,<0.20"],
        # What OpenRLHF needs that installs on a CPU machine; OpenRLHF itself is installed with
        # --no-deps by .ci/run because its metadata pulls GPU-only packages (flash-attn, vllm).
        "openrlhf": [
            "deepspeed>=0.19,<0.20", "ray[default]>=2.55,<3", "peft", "datasets", "torchdata", "aiohttp",
            "einops", "jsonlines", "tensorboard", "pylatexenc", "math-verify>=0.9",
        ],
        # A GPU cluster: OpenRLHF with its own pins (vLLM, flash-attn) on top of the above.
        "gpu": ["openrlhf[vllm]>=0.11.2,<0.12", "flash-attn>=2.8"],
    },
)
