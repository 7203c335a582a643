#!/usr/bin/env bash
# Run a command in the resops pipeline workspace on the shared volume; the RayJob's entrypoint.
#
#   bash /app/k8s/workspace.sh [-S key.path=value ...] COMMAND [ARG ...]
#   e.g. bash /app/k8s/workspace.sh -S train.epochs=10 bash -c 'dvc repro && dvc push'
#
# The workspace ($RESOPS_WORKSPACE, from the resops-storage ConfigMap) is a project directory on the
# ReadWriteMany volume, mounted at the same path in every Ray pod: stages write absolute paths that
# Ray Data tasks and Ray Train workers on other pods open (shards, the checkpoint directory), so the
# image's /app, which exists once per pod, cannot be the working directory.
#
# Each run refreshes the pipeline definition from the image (dvc.yaml, params.yaml, .dvc/config and
# the code the stages depend on) and keeps what the pipeline made (data/, models/, metrics/, plots/,
# reports/, dvc.lock and the DVC cache), so `dvc repro` re-runs only the stages whose inputs changed
# and training resumes from its checkpoints. `-S key.path=value` overrides a parameter in the
# workspace's params.yaml for this run (dvc.lock records it). DVC runs without Git (core.no_scm)
# and pushes to $DVC_REMOTE_URL.
set -euo pipefail

src="${RESOPS_SOURCE:-/app}"
ws="${RESOPS_WORKSPACE:?RESOPS_WORKSPACE is not set: deploy an overlay (k8s/overlays/*), whose pod-defaults component mounts the shared volume and sets it}"

overrides=()
while [[ $# -gt 0 && $1 == -S ]]; do
    [[ $# -ge 2 && $2 == *=* ]] || { echo "workspace.sh: -S needs key.path=value" >&2; exit 2; }
    overrides+=("$2")
    shift 2
done
[[ $# -gt 0 ]] || { echo "usage: workspace.sh [-S key.path=value ...] COMMAND [ARG ...]" >&2; exit 2; }

mkdir -p "$ws/.dvc"
for dir in components pipelines; do
    rm -rf "${ws:?}/$dir"
    cp -R "$src/$dir" "$ws/$dir"
done
cp "$src/dvc.yaml" "$src/params.yaml" "$src/.dvcignore" "$ws/"
mkdir -p "$ws/data/extra"  # the prepare stage's dep: labelled feedback folders (data.extra) live on the volume
cp "$src/.dvc/config" "$ws/.dvc/config"
cd "$ws"

dvc config --local core.no_scm true
if [[ -n "${DVC_REMOTE_URL:-}" ]]; then
    [[ $DVC_REMOTE_URL == *://* ]] || mkdir -p "$DVC_REMOTE_URL"
    dvc remote modify --local default url "$DVC_REMOTE_URL"
fi

if [[ ${#overrides[@]} -gt 0 ]]; then
    python - "${overrides[@]}" <<'PY'
import sys

import yaml

from pipelines.params import load_params

params = load_params("params.yaml", sys.argv[1:])  # refuses a malformed override
with open("params.yaml", "w") as f:
    yaml.safe_dump(dict(params), f, sort_keys=False)
print("workspace.sh: params.yaml with " + ", ".join(sys.argv[1:]), flush=True)
PY
fi

# Inside a Ray pod, "auto" is this pod's cluster (a Ray job's driver already has RAY_ADDRESS set):
# the stages join it instead of starting a Ray of their own (pipelines/runtime.py).
export RAY_ADDRESS="${RAY_ADDRESS:-auto}"
echo "workspace.sh: running '$*' in $ws (RAY_ADDRESS=$RAY_ADDRESS)" >&2
exec "$@"
