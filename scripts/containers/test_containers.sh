#!/usr/bin/env bash
# `make test-containers`: build the images and run both pipelines in them, the way a cluster runs them.
#
#   1. a Docker engine: the one that answers, else our own dockerd (engine.sh; stopped again at the end);
#   2. the images (build.py): the CPU image on python:3.11-slim-bookworm, or on a base made from Debian packages
#      where no registry answers, with this machine's torch wheel as its torch index; the CPU image doubles as
#      the CUDA image unless DREAMBOOTH_BUILD_CUDA=1; reused when nothing they are built from changed;
#   3. tests/containers (pytest -m containers): each image's `pip freeze` is its lock; any uid gets a writable
#      HOME and caches; `personalize` and `batch_personalize` through kfp.local's DockerRunner as uid 4242 with
#      only the pipeline root mounted, compared with SubprocessRunner runs of the same inputs.
#
# No engine is a failure (exit 1) unless DREAMBOOTH_SKIP_CONTAINERS=1 (exit 0, loudly skipped).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}

no_engine() {
  {
    echo "=========================================================================================="
    echo "test-containers: NO DOCKER ENGINE: $1"
    if [ "${DREAMBOOTH_SKIP_CONTAINERS:-}" = 1 ]; then
      echo "test-containers: SKIPPED (DREAMBOOTH_SKIP_CONTAINERS=1): no image was built or tested"
    else
      echo "test-containers: FAILED. Install Docker (Debian: apt-get install docker.io debootstrap) and run as"
      echo "root, point DOCKER_HOST at an engine, or set DREAMBOOTH_SKIP_CONTAINERS=1 to skip these tests."
    fi
    echo "=========================================================================================="
  } >&2
  [ "${DREAMBOOTH_SKIP_CONTAINERS:-}" = 1 ] && exit 0
  exit 1
}

t0=$(date +%s)
host=$(scripts/containers/engine.sh start) || no_engine "none answers and none could be started (see above)"
export DOCKER_HOST=$host
trap 'scripts/containers/engine.sh stop' EXIT

"$PYTHON" scripts/containers/build.py
"$PYTHON" -m pytest -q -m containers tests/containers
echo "test-containers: passed in $(( $(date +%s) - t0 )) s"
