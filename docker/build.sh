#!/usr/bin/env bash
# Build the sd_mlperf image on the NGC PyTorch base (docker/Dockerfile); optionally push it or turn
# it into an enroot .sqsh file for pyxis (slurm/sbatch.sh --container FILE.sqsh).
set -euo pipefail
PROG=build.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=slurm/lib.sh
. "$REPO/slurm/lib.sh"

usage() {
    cat <<'EOF2'
Usage: docker/build.sh [--tag TAG] [--base-image IMAGE] [--push] [--sqsh FILE] [--dry-run] [-- DOCKER_BUILD_ARGS...]

  -t, --tag TAG          image tag (default sd_mlperf:latest; use REGISTRY/sd_mlperf:TAG with --push)
  -b, --base-image IMG   NGC PyTorch base (default: the Dockerfile's, nvcr.io/nvidia/pytorch:25.12-py3)
      --push             docker push the tag after building
      --sqsh FILE        enroot import the built image into FILE (.sqsh) for pyxis
      --dry-run          print the commands; run nothing
  -h, --help
Arguments after -- go to docker build (e.g. --no-cache, --progress=plain, --network host).
The build uses BuildKit (DOCKER_BUILDKIT=1), which sends only what docker/Dockerfile.dockerignore lets in; the
legacy builder would send the whole checkout, .venv included. The environment variable DOCKER names the docker
client (default: docker, or Debian's /usr/bin/docker where docker is 23.0 or newer without buildx: such a
client cannot build with BuildKit; an older one has it built in). Without nvcr.io, docker/standin_base.sh makes a
stand-in base: docker/build.sh --base-image sd_mlperf-standin:bookworm -- --network host
EOF2
}

TAG=sd_mlperf:latest
BASE_IMAGE=""
PUSH=0
SQSH=""
DRY_RUN=0
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        -t|--tag) need_value "$1" $# "${2-}"; TAG=$2; shift ;;
        -b|--base-image) need_value "$1" $# "${2-}"; BASE_IMAGE=$2; shift ;;
        --push) PUSH=1 ;;
        --sqsh) need_value "$1" $# "${2-}"; SQSH=$2; shift ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown argument '$1' (see --help; docker build arguments go after --)" ;;
    esac
    shift
done

[[ "$TAG" =~ ^[a-z0-9]([a-z0-9._/:-]*[a-z0-9_])?(:[A-Za-z0-9_.-]+)?$ ]] \
    || die "--tag '$TAG' is not a valid image reference (lower-case name, optional :tag)"
[ -z "$BASE_IMAGE" ] || [[ "$BASE_IMAGE" =~ ^[a-z0-9][a-z0-9._/:-]*$ ]] \
    || die "--base-image '$BASE_IMAGE' is not a valid image reference"
[ "$PUSH" = 0 ] || [[ "$TAG" == */* ]] \
    || die "--push needs a tag with a registry, e.g. --tag registry.example.com/team/sd_mlperf:latest"
[ -z "$SQSH" ] || [[ "$SQSH" == *.sqsh ]] || die "--sqsh must name a .sqsh file, got '$SQSH'"
export DOCKER_BUILDKIT=1
DOCKER=$(buildkit_docker)

BUILD=("$DOCKER" build -f "$REPO/docker/Dockerfile" -t "$TAG")
[ -z "$BASE_IMAGE" ] || BUILD+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
BUILD+=("${EXTRA[@]+"${EXTRA[@]}"}" "$REPO")

run_cmd "${BUILD[@]}"
[ "$PUSH" = 0 ] || run_cmd "$DOCKER" push "$TAG"
[ -z "$SQSH" ] || run_cmd enroot import -o "$SQSH" "dockerd://$TAG"
