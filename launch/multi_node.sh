#!/usr/bin/env bash
# Several machines with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=2 NPROC_PER_NODE=4 RDZV_HOST=node0.example:29400 launch/multi_node.sh configs/X.toml runs/X
# World size = NNODES * NPROC_PER_NODE must be a multiple of parts.count: P stages times R
# replicas. Rank r is stage r % P of replica r // P, so keep P a divisor of NPROC_PER_NODE
# and each pipeline stays inside one node (its forward traffic never crosses the network;
# only the per-stage gradient all-reduce of the replicas does).
set -euo pipefail
config=${1:?usage: multi_node.sh CONFIG OUT [pipeflow.launch options]}
out=${2:?usage: multi_node.sh CONFIG OUT [pipeflow.launch options]}
shift 2
exec torchrun \
  --nnodes="${NNODES:?set NNODES}" \
  --nproc_per_node="${NPROC_PER_NODE:?set NPROC_PER_NODE}" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="${RDZV_HOST:?set RDZV_HOST to host:port of one node}" \
  --rdzv_id="${RDZV_ID:-pipeflow}" \
  --max-restarts="${MAX_RESTARTS:-0}" \
  -m pipeflow.launch --config "$config" --out "$out" "$@"
