#!/usr/bin/env bash
# Make a stand-in for the NGC PyTorch base image where nvcr.io cannot be reached (CI, an offline build host),
# so that the real docker/Dockerfile builds on it unchanged:
#   docker/standin_base.sh                                   # tags sd_mlperf-standin:bookworm
#   docker/build.sh --base-image sd_mlperf-standin:bookworm -- --network host
# Two images, each made once and reused (--rebuild makes them again):
#   1. MINBASE (sd_mlperf-standin-minbase:bookworm): `debootstrap --variant=minbase` Debian with python3, pip and
#      `python`, this host's CA bundle and pip index settings, imported with `docker import` (no registry needed);
#   2. TAG: MINBASE + the CPU torch pair of tests/constraints-cpu.txt (+ numpy, pillow), installed the way NGC's
#      image holds its torch: system-wide pip with no PEP 668 marker, every pip-installed version pinned in
#      /etc/pip/constraint.txt and PIP_CONSTRAINT naming it, so a later `pip install` cannot replace the torch.
# It has no CUDA toolkit, Transformer Engine, apex or DALI: `sd-mlperf backends` resolves every role to its CPU twin.
# Needs root (debootstrap), debootstrap and a running dockerd; the package index and the Debian mirror reachable.
set -euo pipefail
PROG=standin_base.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=slurm/lib.sh
. "$REPO/slurm/lib.sh"

usage() {
    cat <<'EOF2'
Usage: docker/standin_base.sh [--tag TAG] [--suite SUITE] [--mirror URI] [--rebuild] [--dry-run]

  -t, --tag TAG      the stand-in base (default sd_mlperf-standin:bookworm); its minimal Debian layer is tagged
                     sd_mlperf-standin-minbase:SUITE
      --suite SUITE  Debian release for debootstrap (default bookworm)
      --mirror URI   Debian mirror (default: the first URI of this host's apt sources, else http://deb.debian.org/debian)
      --rebuild      make both images again even if they exist
      --dry-run      print the commands; run nothing
  -h, --help
The environment variable DOCKER names the docker client; by default the one docker/build.sh picks (BuildKit).
EOF2
}

TAG=sd_mlperf-standin:bookworm
SUITE=bookworm
MIRROR=""
REBUILD=0
DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        -t|--tag) need_value "$1" $# "${2-}"; TAG=$2; shift ;;
        --suite) need_value "$1" $# "${2-}"; SUITE=$2; shift ;;
        --mirror) need_value "$1" $# "${2-}"; MIRROR=$2; shift ;;
        --rebuild) REBUILD=1 ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
[[ "$TAG" =~ ^[a-z0-9]([a-z0-9._/:-]*[a-z0-9_])?(:[A-Za-z0-9_.-]+)?$ ]] \
    || die "--tag '$TAG' is not a valid image reference (lower-case name, optional :tag)"
[[ "$SUITE" =~ ^[a-z]+$ ]] || die "--suite must be a Debian release name such as bookworm, got '$SUITE'"
if [ -z "$MIRROR" ]; then
    MIRROR=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi
MINBASE=sd_mlperf-standin-minbase:$SUITE
export DOCKER_BUILDKIT=1
DOCKER=$(buildkit_docker)
# The versions the stand-in installs: exactly those CI tests with.
PINS=$REPO/tests/constraints-cpu.txt
for pkg in torch torchvision numpy pillow; do
    grep -qiE "^$pkg==" "$PINS" || die "$PINS pins no $pkg; the stand-in installs exactly the CPU pins"
done

if [ "$DRY_RUN" = 0 ]; then
    [ "$(id -u)" = 0 ] || die "run as root: debootstrap needs it (or build on a host that can pull the NGC image)"
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    "$DOCKER" info >/dev/null 2>&1 || die "dockerd is not reachable with '$DOCKER info' (start it: dockerd &)"
    # One maker at a time (CI starts one in the background; a test may ask for the same images meanwhile).
    exec 9>/tmp/sd_mlperf-standin.lock
    flock 9
fi
exists() { [ "$DRY_RUN" = 0 ] && [ "$REBUILD" = 0 ] && "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

# The host's pip index settings, where they name an http(s) index the container can reach too.
pip_conf() {
    local key value
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ntimeout = 180\ndisable-pip-version-check = true\n'
    for key in index-url extra-index-url; do
        value=$(pip config get "global.$key" 2>/dev/null | tr ' ' '\n' | grep -E '^https?://' | tr '\n' ' ' || true)
        [ -z "${value// /}" ] || printf '%s = %s\n' "$key" "${value% }"
    done
}

if exists "$MINBASE"; then
    note "$MINBASE exists; not bootstrapped again (--rebuild to)"
else
    start=$(date +%s)
    ROOTFS=$(mktemp -d /tmp/sd_mlperf-standin.XXXXXX)
    trap 'rm -rf "$ROOTFS"' EXIT
    run_cmd debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
        "$SUITE" "$ROOTFS" "$MIRROR"
    if [ "$DRY_RUN" = 0 ]; then
        # Trust what this host trusts (a TLS-inspecting proxy's CA too); pip system-wide as in NGC's image.
        cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
        rm -f "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED
        pip_conf > "$ROOTFS/etc/pip.conf"
        rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
        tar -C "$ROOTFS" -c . | "$DOCKER" import --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' - "$MINBASE" >/dev/null
        note "imported $MINBASE in $(( $(date +%s) - start )) s"
    else
        echo "tar -C $ROOTFS -c . | $DOCKER import --change 'CMD [\"bash\"]' --change 'ENV LANG=C.UTF-8' - $MINBASE"
    fi
fi

if exists "$TAG"; then
    note "$TAG exists; not built again (--rebuild to)"
    exit 0
fi
CONTEXT=$(mktemp -d /tmp/sd_mlperf-standin-ctx.XXXXXX)
trap 'rm -rf "$CONTEXT" "${ROOTFS-}"' EXIT
cp "$PINS" "$CONTEXT/cpu-pins.txt"
cat > "$CONTEXT/Dockerfile" <<EOF2
FROM $MINBASE
COPY cpu-pins.txt /tmp/cpu-pins.txt
# pip installs into /usr/local; what it installed is frozen into the constraint file (not Debian's own packages).
RUN mkdir -p /etc/pip && pip install --no-cache-dir -c /tmp/cpu-pins.txt torch torchvision numpy pillow \\
 && pip list --format=freeze --path /usr/local/lib/python3*/dist-packages > /etc/pip/constraint.txt \\
 && rm /tmp/cpu-pins.txt && python -c 'import torch, torchvision; print("torch", torch.__version__, torchvision.__version__)'
ENV PIP_CONSTRAINT=/etc/pip/constraint.txt
WORKDIR /workspace
EOF2
start=$(date +%s)
run_cmd "$DOCKER" build --network host -t "$TAG" "$CONTEXT"
[ "$DRY_RUN" = 1 ] || note "built $TAG in $(( $(date +%s) - start )) s"
