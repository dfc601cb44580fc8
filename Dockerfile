# sn-lightning for cloud GPUs: training (`fit`), evaluation, and W&B sweep agents.
#
#   docker build -t sn-lightning .
#   docker run --rm --init --gpus all sn-lightning info
#   docker run --rm --init --gpus all -e WANDB_API_KEY -v sn-runs:/workspace/runs \
#       sn-lightning fit --config configs/quickstart.yaml --trainer.accelerator=gpu
#   docker run --rm --init --gpus all -e WANDB_API_KEY sn-lightning agent ENTITY/PROJECT/SWEEP_ID
#
# Base: the official PyTorch runtime image, pinned by its exact tag: torch 2.14.0 built for CUDA 12.6
# with cuDNN 9, which runs on NVIDIA drivers >= 525 and GPUs up to Hopper (H100). For Blackwell
# (B200, RTX 50xx) build from a CUDA 13 tag of the same release (drivers >= 580):
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.14.0-cuda13.0-cudnn9-runtime -t sn-lightning .
ARG BASE_IMAGE=pytorch/pytorch:2.14.0-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="sn-lightning" \
      org.opencontainers.image.description="Exact spectral normalization, adversarial and certified training on PyTorch Lightning" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    MPLBACKEND=Agg \
    WANDB_DIR=/workspace/runs

# The unprivileged user. Ubuntu 24.04 bases ship a user `ubuntu` with uid 1000; it is removed so the
# default uid stays 1000, the usual first user on the host. For bind mounts owned by another user,
# build with --build-arg SN_UID="$(id -u)" --build-arg SN_GID="$(id -g)".
ARG SN_UID=1000
ARG SN_GID=1000
RUN if getent passwd ubuntu > /dev/null; then userdel --remove ubuntu; fi \
    && groupadd --gid "${SN_GID}" sn \
    && useradd --uid "${SN_UID}" --gid sn --create-home --shell /bin/bash sn \
    && mkdir -p /workspace/data /workspace/runs \
    && chown -R sn:sn /workspace

# Note [keep the base image's torch]: the package needs torch>=2.2 and torchvision>=0.17, which the
# CUDA build already in the image satisfies. pip keeps a satisfied requirement, but a dependency that
# asked for another torch would make pip download one from PyPI (a different CUDA build, gigabytes)
# and silently replace it. Constraining torch and torchvision to the installed versions makes such
# a conflict fail the build instead. The `sweeps` extra is the engine behind `sweep validate|run`;
# it pins numpy<2, whose wheels stop at Python 3.12 (the base image's Python must not be newer).
COPY pyproject.toml README.md /tmp/sn-lightning/
COPY sn_lightning /tmp/sn-lightning/sn_lightning
RUN python -c "import importlib.metadata as m; print(*(f'{d}=={m.version(d)}' for d in ('torch', 'torchvision')), sep='\n')" > /tmp/base-torch.txt \
    && python -m pip install --no-cache-dir --constraint /tmp/base-torch.txt "/tmp/sn-lightning[sweeps]" \
    && python -c "import torch, sn_lightning; print('torch', torch.__version__, 'sn_lightning', sn_lightning.__version__)" \
    && rm -rf /tmp/sn-lightning /tmp/base-torch.txt

COPY docker/entrypoint.sh /usr/local/bin/sn-entrypoint

WORKDIR /workspace
# Configs and sweeps name paths relative to here: data in ./data, outputs in ./runs.
COPY --chown=sn:sn configs ./configs
COPY --chown=sn:sn sweeps ./sweeps

# Datasets (e.g. CIFAR-10 downloads into ./data) and everything a run writes (checkpoints,
# results.json, the W&B run folders under WANDB_DIR, sweep CSVs and plots). Mount a named volume or
# a host folder on each so they outlive the container.
VOLUME ["/workspace/data", "/workspace/runs"]

USER ${SN_UID}:${SN_GID}
ENTRYPOINT ["bash", "/usr/local/bin/sn-entrypoint"]
CMD ["help"]
