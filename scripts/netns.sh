#!/bin/sh
# Inspect or clean the network namespaces made by tests/netns (names start with "mgt").
#   scripts/netns.sh list    namespaces made by test labs
#   scripts/netns.sh clean   delete labs whose owning test process is dead
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
case "${1:-list}" in
  list)  ip netns list | grep '^mgt' || true ;;
  clean) "$PY" -c 'from tests.netns.harness import cleanup_stale; print("\n".join(cleanup_stale()) or "nothing stale")' ;;
  *) echo "usage: $0 list|clean" >&2; exit 64 ;;
esac
