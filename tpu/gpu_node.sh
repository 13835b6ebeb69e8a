#!/usr/bin/env bash
# One node of a multi-node GPU run: tpu/gpu_node.sh COORDINATOR:PORT NUM_NODES NODE_ID "COMMAND"
set -euo pipefail
coord=$1; n=$2; i=$3; cmd=$4
exec $cmd distributed.coordinator="$coord" distributed.num_processes="$n" distributed.process_id="$i"
