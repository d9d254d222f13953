#!/usr/bin/env bash
# Drop this host's page cache before a timed run, as the MLPerf rules require: sync, then vm.drop_caches=3.
# Needs root on the host (or passwordless sudo for sysctl); inside a container it is usually not permitted.
# slurm/srun.sh runs it on every node, outside the container, before each run; slurm/run_and_time.sh runs it
# itself when nobody did. Exit status 0: dropped; 1: not permitted here (with the reason on stderr).
# Usage: slurm/drop_caches.sh [--quiet]
set -euo pipefail
PROG=drop_caches.sh
QUIET=0
case "${1-}" in
    -h|--help) sed -n '2,6p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --quiet) QUIET=1 ;;
    "") ;;
    *) echo "$PROG: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac

host=${SLURMD_NODENAME:-$(hostname)}  # the Slurm node name where there is one
sync
if [ -w /proc/sys/vm/drop_caches ] && { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; then
    [ "$QUIET" = 1 ] || echo "$PROG: page cache dropped on $host"
    exit 0
fi
if command -v sudo >/dev/null 2>&1 && sudo -n /sbin/sysctl -q vm.drop_caches=3 >/dev/null 2>&1; then
    [ "$QUIET" = 1 ] || echo "$PROG: page cache dropped on $host (sudo sysctl)"
    exit 0
fi
[ "$QUIET" = 1 ] || echo "$PROG: cannot drop the page cache on $host as $(id -un): needs root on the host," \
    "or passwordless 'sudo /sbin/sysctl vm.drop_caches=3'" >&2
exit 1
