#!/usr/bin/env bash
# Runs one command on every host of a TPU pod slice: tpu/pod.sh TPU_NAME ZONE "COMMAND"
set -euo pipefail
name=$1; zone=$2; cmd=$3
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "cd ~/jaxemb && $cmd"
