#!/usr/bin/env bash
# The image's entry point: short names for the project's commands, everything else verbatim.
#
#   docker run IMAGE fit --config configs/x.yaml [--a.b=value ...]   python -m sn_lightning.fit ...
#   docker run IMAGE evaluate ...                                      python -m sn_lightning.evaluate ...
#   docker run IMAGE sweep validate|run sweeps/x.yaml ...              python -m sn_lightning.sweep ...
#   docker run IMAGE agent ENTITY/PROJECT/SWEEP_ID [--count N]         wandb agent ...
#   docker run IMAGE --config configs/x.yaml ...                       (leading option: fit)
#   docker run IMAGE info                                              torch, CUDA and the visible GPUs
#   docker run IMAGE ANY COMMAND ...                                   run as given (bash, wandb sync, ...)
#
# Every command is exec'd: it replaces this shell as the container's main process, so the signals
# docker sends (SIGTERM on `docker stop`, SIGINT on Ctrl-C) reach it directly. Run with `--init` so a
# process that installs no SIGTERM handler still stops on `docker stop` (PID 1 ignores default actions).
set -euo pipefail

readonly PROG="sn-entrypoint"

usage() {
    cat <<'EOF'
usage: docker run [docker options] IMAGE COMMAND [ARGS...]

commands:
  fit ARGS...            python -m sn_lightning.fit ARGS...  (e.g. fit --config configs/quickstart.yaml)
  evaluate ARGS...       python -m sn_lightning.evaluate ARGS...
  sweep ARGS...          python -m sn_lightning.sweep ARGS...  (validate | run sweeps/x.yaml --count N)
  agent SWEEP [ARGS...]  wandb agent ENTITY/PROJECT/SWEEP_ID [--count N]
  info                   print the torch and CUDA versions and the GPUs this container sees
  help                   this message
  -*/--*                 a leading option means fit: IMAGE --config configs/x.yaml ...
  anything else          run verbatim (bash, wandb sync runs/..., python -m ...)

W&B: pass the key from the environment, never bake it in: docker run -e WANDB_API_KEY ...
Volumes: /workspace/data (datasets), /workspace/runs (checkpoints, results.json, offline W&B runs).
EOF
}

warn_without_wandb_key() {
    # wandb agent polls the W&B server for runs: without credentials it cannot start any.
    if [[ -z "${WANDB_API_KEY:-}" && ! -f "${HOME:-/nonexistent}/.netrc" ]]; then
        printf '%s: warning: WANDB_API_KEY is not set; pass it with docker run -e WANDB_API_KEY\n' \
            "${PROG}" >&2
    fi
}

if [[ $# -eq 0 ]]; then
    usage >&2
    exit 2
fi

cmd="$1"
case "${cmd}" in
    fit | evaluate | sweep)
        shift
        exec python -m "sn_lightning.${cmd}" "$@"
        ;;
    agent)
        shift
        warn_without_wandb_key
        exec wandb agent "$@"
        ;;
    info)
        exec python -c 'import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
n = torch.cuda.device_count()
print(f"{n} GPU(s) visible" + (":" if n else " (run with --gpus all?)"))
for i in range(n):
    print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")'
        ;;
    help | -h | --help)
        usage
        exit 0
        ;;
    -*)
        exec python -m sn_lightning.fit "$@"
        ;;
    *)
        if [[ "${cmd}" == "wandb" && "${2:-}" == "agent" ]]; then
            warn_without_wandb_key
        fi
        exec "$@"
        ;;
esac
