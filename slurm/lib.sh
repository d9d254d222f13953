# shellcheck shell=bash
# Shared helpers of the slurm/, docker/, examples/ and scripts/ scripts: flag validation with messages that
# name the flag and the fix, and one way to print (--dry-run) or run a command.
# Source it; it defines functions only. Each script sets PROG (its name, for messages) first.

# Print an error naming the script and exit 2 (the usual exit status for usage errors).
die() {
    echo "${PROG:-sd_mlperf}: error: $*" >&2
    exit 2
}

note() {
    echo "${PROG:-sd_mlperf}: $*" >&2
}

# need_value FLAG ARGC [VALUE]: a flag that takes a value must have one that is not another flag.
need_value() {
    if [ "$2" -lt 2 ] || [ -z "${3-}" ] || [[ "$3" == --* ]]; then
        die "$1 needs a value (see --help)"
    fi
}

# check_positive_int FLAG VALUE [MAX]
check_positive_int() {
    [[ "$2" =~ ^[0-9]+$ ]] && [ "$((10#$2))" -gt 0 ] \
        || die "$1 must be a positive integer, got '$2'"
    if [ -n "${3-}" ] && [ "$((10#$2))" -gt "$3" ]; then
        die "$1 must be at most $3, got '$2'"
    fi
}

# check_walltime FLAG VALUE: the Slurm forms MM, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (and MM:SS).
check_walltime() {
    [[ "$2" =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] \
        || die "$1 must be a Slurm time limit such as 04:00:00 or 1-00:00:00, got '$2'"
}

# check_file FLAG PATH: the file must exist (checked on the submitting host).
check_file() {
    [ -f "$2" ] || die "$1 file '$2' does not exist"
}

check_dir() {
    [ -d "$2" ] || die "$1 directory '$2' does not exist"
}

# shell_join ARGS...: one line that a shell reads back as the same words (quotes only where needed).
shell_join() {
    local out="" word
    for word in "$@"; do
        if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+#-]+$ ]]; then
            out+="${word} "
        else
            out+="'${word//\'/\'\\\'\'}' "
        fi
    done
    printf '%s\n' "${out% }"
}

# run_cmd ARGS...: print the command when DRY_RUN=1, else run it.
run_cmd() {
    if [ "${DRY_RUN:-0}" = 1 ]; then
        shell_join "$@"
    else
        "$@"
    fi
}

# yaml_section_int SECTION KEY FILE: an integer `KEY:` under a top-level `SECTION:` of a flat YAML
# file (our conf/system overlays), or nothing. Enough to cross-check flags against a config.
yaml_section_int() {
    awk -v section="$1" -v key="$2" '
        /^[A-Za-z_][A-Za-z0-9_]*:/ { in_section = ($1 == section ":") ; next }
        in_section && $1 == key ":" && $2 ~ /^[0-9]+$/ { print $2; exit }
    ' "$3"
}

# check_config_agrees FILE NUM_NODES GPUS_PER_NODE: flags must match what a config file sets, or the
# global batch (and with it the learning rate and eval cadence) would silently change.
check_config_agrees() {
    local key flag_value flag conf_value
    while read -r key flag_value flag; do
        conf_value=$(yaml_section_int parallel "$key" "$1")
        if [ -n "$conf_value" ] && [ "$conf_value" != "$flag_value" ]; then
            die "$flag $flag_value disagrees with parallel.$key: $conf_value in $1; pass $flag $conf_value or use a config for this system"
        fi
    done <<EOF2
num_nodes $2 --num-nodes
gpus_per_node $3 --gpus-per-node
EOF2
}

# read_env_file FILE: the NAME=VALUE lines of a system environment file (slurm/env/*.env), without comments
# and blank lines; dies naming the line of any other form. Values are literal: no quotes, no expansion.
read_env_file() {
    local line n=0
    while IFS= read -r line || [ -n "$line" ]; do
        n=$((n + 1))
        [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
        [[ "$line" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] \
            || die "$1:$n: expected NAME=VALUE (no spaces, no 'export'), got '$line'"
        printf '%s\n' "$line"
    done < "$1"
}

# rendezvous_addr NODELIST: where the other nodes reach the first node of a Slurm host list: its name when that
# resolves here, else its NodeAddr from Slurm's node table (clusters whose node names are not in DNS or
# /etc/hosts). Prints nothing and fails when neither is known.
rendezvous_addr() {
    local first addr
    first=$(scontrol show hostnames "$1" 2>/dev/null | head -n 1)
    [ -n "$first" ] || return 1
    if getent hosts "$first" >/dev/null 2>&1; then
        printf '%s\n' "$first"
        return 0
    fi
    addr=$(scontrol show node "$first" -o 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
    [ -n "$addr" ] || return 1
    printf '%s\n' "$addr"
}

# buildkit_docker: the docker client that builds with BuildKit (docker/Dockerfile.dockerignore is a BuildKit file; the
# legacy builder would send the whole checkout, .venv included): $DOCKER when set; else `docker` when it has the
# buildx plugin or is older than 23.0 (BuildKit built in); else Debian's /usr/bin/docker (docker.io, 20.10) where a
# newer client without buildx comes first on PATH. Dies naming the fix otherwise. Callers export DOCKER_BUILDKIT=1.
# Under DRY_RUN=1 (commands printed, not run) it looks at nothing: $DOCKER or `docker`.
buildkit_docker() {
    local client major
    if [ -n "${DOCKER:-}" ] || [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%s\n' "${DOCKER:-docker}"
        return 0
    fi
    command -v docker >/dev/null || die "docker is not on PATH (install Docker, e.g. apt-get install docker.io)"
    client=$(docker version --format '{{.Client.Version}}' 2>/dev/null || true)
    major=${client%%.*}
    if ! [[ "$major" =~ ^[0-9]+$ ]] || [ "$major" -lt 23 ] || docker buildx version >/dev/null 2>&1; then
        printf 'docker\n'
    elif [ -x /usr/bin/docker ] && [ "$(/usr/bin/docker version --format '{{.Client.Version}}' 2>/dev/null \
            | cut -d. -f1)" -lt 23 ] 2>/dev/null; then
        printf '/usr/bin/docker\n'
    else
        die "docker client $client has no buildx plugin, so it cannot build with BuildKit: install docker-buildx," \
            "or set DOCKER to a client older than 23.0 (Debian's docker.io is 20.10)"
    fi
}
