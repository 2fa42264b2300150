#!/usr/bin/env bash
# A Docker engine for the container tests: use the one that answers, else start our own dockerd.
#
#   scripts/containers/engine.sh start   # prints the DOCKER_HOST to use (an engine that answers, or ours)
#   scripts/containers/engine.sh stop    # stops the dockerd that `start` started (never someone else's)
#
# Our dockerd has its own socket, data root and exec root (DREAMBOOTH_DOCKER_ROOT, default
# /var/lib/dreambooth-docker; images persist there between runs, so a rerun reuses them). It runs without
# iptables or a bridge (containers get only loopback: builds use --network host, the tests need no network),
# on overlay2, under `nice` so builds and containers leave the machine responsive. Needs root and dockerd
# (Debian: apt-get install docker.io).
set -euo pipefail

ROOT=${DREAMBOOTH_DOCKER_ROOT:-/var/lib/dreambooth-docker}
# The exec root holds containerd's sockets, whose paths must stay short (108 bytes): /run, not the data root.
EXEC_ROOT=${DREAMBOOTH_DOCKER_EXEC_ROOT:-/run/dreambooth-docker}
SOCK=unix://$EXEC_ROOT/docker.sock
PIDFILE=$EXEC_ROOT/dockerd.pid
LOG=$ROOT/dockerd.log

answers() {  # the engine at $1 answers a version request
  DOCKER_HOST=$1 timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

start() {
  if ! command -v docker >/dev/null 2>&1; then
    echo "engine.sh: no docker client (Debian: apt-get install docker.io)" >&2
    return 1
  fi
  local current=${DOCKER_HOST:-unix:///var/run/docker.sock}
  if answers "$current"; then
    echo "engine.sh: using the engine that answers at $current" >&2
    echo "$current"
    return 0
  fi
  if answers "$SOCK"; then
    echo "engine.sh: using our engine at $SOCK" >&2
    echo "$SOCK"
    return 0
  fi
  if ! command -v dockerd >/dev/null 2>&1; then
    echo "engine.sh: no engine answers and dockerd is not installed (Debian: apt-get install docker.io)" >&2
    return 1
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "engine.sh: no engine answers, and starting dockerd needs root" >&2
    return 1
  fi
  mkdir -p "$ROOT" "$EXEC_ROOT"
  echo "engine.sh: starting dockerd (data root $ROOT, socket $SOCK, log $LOG)" >&2
  # setsid: the engine outlives this script's process group; `stop` ends it by its pid file.
  setsid nice -n 10 dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver=overlay2 \
    -H "$SOCK" --data-root "$ROOT/data" --exec-root "$EXEC_ROOT" --pidfile "$PIDFILE" \
    >"$LOG" 2>&1 </dev/null &
  for _ in $(seq 1 60); do
    if answers "$SOCK"; then
      touch "$EXEC_ROOT/started-by-engine.sh"
      echo "$SOCK"
      return 0
    fi
    sleep 1
  done
  echo "engine.sh: dockerd did not answer within 60 s; the end of $LOG:" >&2
  tail -20 "$LOG" >&2 || true
  return 1
}

stop() {
  if [ ! -f "$EXEC_ROOT/started-by-engine.sh" ] || [ ! -f "$PIDFILE" ]; then
    return 0  # not ours to stop
  fi
  local pid
  pid=$(cat "$PIDFILE")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  rm -f "$EXEC_ROOT/started-by-engine.sh"
  echo "engine.sh: stopped dockerd $pid" >&2
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
