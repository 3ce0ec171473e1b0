# LatentForge on NVIDIA's PyTorch container: CUDA toolchain, cuDNN, NCCL, a CUDA PyTorch and Transformer Engine
# built for them. The `gpu` extra (transformer-engine[pytorch]) is already satisfied by the image; installing it
# here keeps the image's own torch/TE (the container's PIP_CONSTRAINT pins them) instead of PyPI's builds.
#
#   docker build -t latentforge:gpu .
#   docker run --gpus all --ipc=host --rm -v $PWD/out:/out latentforge:gpu \
#       python bench/gpu_acceptance.py --out /out          # the GPU acceptance report (about 5-8 minutes)
#   docker run --gpus all --ipc=host --rm latentforge:gpu python -m pytest -q -m gpu tests/kernels
ARG BASE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE}

WORKDIR /workspace/latentforge
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled

# the project's constraints.txt pins the pure-Python packages; torch / triton / transformer-engine / nvidia-* stay
# the image's (its PIP_CONSTRAINT pins them too)
COPY . .
RUN grep -vE '^(torch|triton|transformer[-_]engine|nvidia-)' constraints.txt > /tmp/constraints-gpu.txt \
 && pip install --no-cache-dir -c /tmp/constraints-gpu.txt -e ".[gpu,dev]" \
 && python -c "import transformer_engine.pytorch, torch, latentforge.model; print('TE', transformer_engine.__version__, 'torch', torch.__version__)"

CMD ["python", "bench/gpu_acceptance.py", "--out", "/workspace/latentforge/bench/acceptance"]
