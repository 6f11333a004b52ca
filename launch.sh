#!/usr/bin/env bash
# bash launch.sh N [train flags]: N processes on this node through torchrun (DDP; NCCL on GPUs, gloo on CPU).
# Multi-node: torchrun reads PET_NNODES, PET_NODE_RANK, PET_RDZV_BACKEND, PET_RDZV_ENDPOINT, PET_RDZV_ID and
# PET_MAX_RESTARTS itself; set the same ones on every node and run the same command there.
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ || $1 -lt 1 ]]; then
  echo "usage: bash launch.sh N [train flags]   (N = processes on this node)" >&2
  exit 2
fi
nproc=$1; shift
# torchrun sets OMP_NUM_THREADS=1 when it is unset; remember whether the user chose it, so that the
# training splits this node's cores between its processes only when the user did not.
export BERT_FINETUNE_OMP_NUM_THREADS=${OMP_NUM_THREADS:-}
standalone=(--standalone)
[[ -n ${PET_NNODES:-} ]] && standalone=()
# ${a[@]+"${a[@]}"}: an empty array under set -u is an error in bash before 4.4 (older clusters' multi-node case)
# A worker that stops on purpose (preempted: checkpoint saved, exit 143) or on bad input (one line, exit 2)
# exits non-zero, and torchrun then prints a Python traceback of its own on top of the workers' lines. The
# filter drops torchrun's traceback (its frames only; the exception line and the failure summary stay).
# Workers' own output passes untouched; BERT_FINETUNE_FULL_TRACEBACK=1 turns the filter off. The filter
# ignores SIGINT/SIGTERM so that it outlives torchrun and prints everything up to its end.
if [[ -n ${BERT_FINETUNE_FULL_TRACEBACK:-} ]]; then
  exec torchrun ${standalone[@]+"${standalone[@]}"} --nproc-per-node "$nproc" -m bert_finetune.train "$@"
fi
exec torchrun ${standalone[@]+"${standalone[@]}"} --nproc-per-node "$nproc" -m bert_finetune.train "$@" \
  2> >(trap '' INT TERM; exec awk '
    held != "" { if ($0 ~ /\/torchrun", line/) { skip = 1 } else { print held; print } held = ""; fflush(); next }
    skip && (/^ / || /^$/ || /^Traceback/ || /^During handling/ || /^The above exception/) { next }
    skip { skip = 0 }
    /^Traceback \(most recent call last\):$/ { held = $0; next }
    { print; fflush() }
    END { if (held != "") print held }' >&2)
