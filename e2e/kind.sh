#!/usr/bin/env bash
# Runs the end-to-end test on a local kind cluster: creates the cluster (unless it exists),
# builds the agent and operator images, loads them into the cluster's nodes, and runs
# `NENCACHE_E2E=1 cargo test -p nencache-e2e`, which installs the chart, applies a
# NenCacheCluster and puts and gets a value through an injected pod. Without NENCACHE_E2E=1
# that test skips: it would change whatever cluster the kubeconfig points at.
#
# Needs: docker, kind, kubectl, helm, cargo. Set KIND_CLUSTER to use another cluster name and
# E2E_KEEP=1 to leave everything installed for a look around.
set -euo pipefail
cd "$(dirname "$0")/.."

cluster="${KIND_CLUSTER:-nencache-e2e}"
for tool in docker kind kubectl helm cargo; do
    command -v "$tool" >/dev/null || { echo "e2e/kind.sh needs $tool on the PATH" >&2; exit 2; }
done

if ! kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    kind create cluster --name "$cluster" --wait 120s
fi
kubectl config use-context "kind-$cluster"

docker build -f agent/Dockerfile -t nencache-agent:e2e .
docker build -f operator/Dockerfile -t nencache-operator:e2e .
kind load docker-image --name "$cluster" nencache-agent:e2e nencache-operator:e2e

NENCACHE_E2E=1 E2E_AGENT_IMAGE=nencache-agent:e2e E2E_OPERATOR_IMAGE=nencache-operator:e2e \
    cargo test -p nencache-e2e -- --nocapture
