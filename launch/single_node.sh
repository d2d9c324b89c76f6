#!/usr/bin/env bash
# One machine, one part per GPU (or per process on CPU, with gloo).
#   launch/single_node.sh configs/cifar10_glow.toml runs/c10-pipe [--set key=value ...]
# The number of processes is the config's parts.count (times REPLICAS, default 1).
set -euo pipefail
config=${1:?usage: single_node.sh CONFIG OUT [pipeflow.launch options]}
out=${2:?usage: single_node.sh CONFIG OUT [pipeflow.launch options]}
shift 2
parts=$(python3 - "$config" <<'PY'
import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb")).get("parts", {}).get("count") or 2)
PY
)
nproc=$(( parts * ${REPLICAS:-1} ))
exec torchrun --standalone --nproc_per_node="$nproc" -m pipeflow.launch --config "$config" --out "$out" "$@"
