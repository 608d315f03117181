#!/bin/bash
# The two-machine launch of docs/scale_out.md (`--strategy=multi_worker`), on one Linux box as
# two "hosts":
# two network namespaces joined by a veth pair, each worker seeing only its own address
# (10.0.0.1, 10.0.0.2), the workdir a folder both see (as NFS would be). Needs root (ip netns).
#
#   sudo scripts/two_hosts.sh [WORKDIR]      # default /tmp/two_hosts
#
# Runs the smoke preset's teacher stage in one process, then its distill stage on the two
# workers for 12 steps; prints each worker's exit status, the wall time and the stage folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WD=${1:-/tmp/two_hosts}
DATA=${DATA:-${IMAGENETTE_DIR:?set IMAGENETTE_DIR (or DATA) to the imagenette2-160 folder}}

cleanup() { ip netns del hA 2>/dev/null || true; ip netns del hB 2>/dev/null || true; }
trap cleanup EXIT
cleanup
ip netns add hA; ip netns add hB
ip link add vA type veth peer name vB
ip link set vA netns hA; ip link set vB netns hB
ip -n hA addr add 10.0.0.1/24 dev vA; ip -n hB addr add 10.0.0.2/24 dev vB
for n in hA hB; do ip -n $n link set lo up; done
ip -n hA link set vA up; ip -n hB link set vB up

rm -rf "$WD"; mkdir -p "$WD"
COMMON=(--student=mobilevit_xxs --teacher=vit_tiny_patch16 "--data=$DATA" "--workdir=$WD/run"
        --preset=smoke)
"$PY" -m experiments.pipeline "${COMMON[@]}" --stages=teacher > "$WD/teacher.log" 2>&1
CLUSTER='"cluster": {"worker": ["10.0.0.1:23456", "10.0.0.2:23456"]}'
t0=$(date +%s)
pids=()
for i in 0 1; do
  ns=$([ $i = 0 ] && echo hA || echo hB)
  ip netns exec $ns env TF_CONFIG="{$CLUSTER, \"task\": {\"type\": \"worker\", \"index\": $i}}" \
    "$PY" -m experiments.pipeline "${COMMON[@]}" --stages=distill --strategy=multi_worker \
    --config.distill.steps=12 --config.distill.checkpoint_every=4 > "$WD/worker$i.log" 2>&1 &
  pids+=($!)
done
for i in 0 1; do
  rc=0; wait "${pids[$i]}" || rc=$?
  echo "worker $i: exit $rc (log $WD/worker$i.log)"
done
echo "wall $(( $(date +%s) - t0 )) s"
ls "$WD/run/distill"
