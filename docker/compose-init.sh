#!/usr/bin/env bash
# One-shot set-up steps of docker/compose.yaml; each is idempotent (what exists is kept).
#
#   compose-init.sh coordinator
#       the consortium CA and the coordinator's TLS certificate (`fedtune certs init`, for the
#       names in FEDTUNE_TLS_HOSTS [coordinator localhost 127.0.0.1]) in FEDTUNE_CA_DIR
#       [/etc/fedtune/ca]; copies of ca.pem, server.pem, server.key into FEDTUNE_CERTS_DIR
#       [/etc/fedtune/certs] and of ca.pem into FEDTUNE_PUBLIC_DIR [/etc/fedtune/public];
#       the checkpoint key (`fedtune coordinator encryption-key`) as
#       FEDTUNE_ENCRYPTION_KEY_FILE [/etc/fedtune/secrets/checkpoint.key]; the base model
#       FEDTUNE_MODEL [smollm2-135m] in FEDTUNE_CACHE_DIR (`fedtune model fetch`).
#   compose-init.sh node NAME DOMAIN
#       the node's keys (`fedtune node keygen`) in FEDTUNE_STATE_DIR [/var/lib/fedtune/node],
#       its enrollment.json (public keys only) copied to
#       FEDTUNE_ENROLLMENTS_DIR/NAME.json [/var/lib/fedtune/enrollments], and synthetic
#       demo data of DOMAIN (hospital or bank) in FEDTUNE_DATA_DIR [/var/lib/fedtune/data]
#       unless it holds train.jsonl already (put your own data there instead).
#   compose-init.sh certify NAME...
#       the CA key's holder: `fedtune certs certify-node` of FEDTUNE_ENROLLMENTS_DIR/NAME.json
#       into NAME.certified.json beside it (again when NAME.json is newer), with the CA key in
#       FEDTUNE_CA_DIR [/etc/fedtune/ca].
#   compose-init.sh enroll NAME...
#       `fedtune coordinator enroll` for each node whose FEDTUNE_ENROLLMENTS_DIR/NAME.certified.json
#       was not enrolled yet; run where the running coordinator's SuperLink is on
#       127.0.0.1:superlink_port [9093] of its coordinator.toml (in compose: network_mode
#       "service:coordinator") with its state volume.
set -euo pipefail
# shellcheck source=docker/fedtune-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/fedtune-common.sh"

enrollments=${FEDTUNE_ENROLLMENTS_DIR:-/var/lib/fedtune/enrollments}

init_coordinator() {
    local ca=${FEDTUNE_CA_DIR:-/etc/fedtune/ca}
    local certs=${FEDTUNE_CERTS_DIR:-/etc/fedtune/certs}
    local public=${FEDTUNE_PUBLIC_DIR:-/etc/fedtune/public}
    local key=${FEDTUNE_ENCRYPTION_KEY_FILE:-/etc/fedtune/secrets/checkpoint.key}
    local hosts=() host
    for host in ${FEDTUNE_TLS_HOSTS:-coordinator localhost 127.0.0.1}; do
        hosts+=(--host "$host")
    done
    if [ -f "$ca/ca.pem" ]; then
        say "keeping the CA and certificates in $ca"
    else
        fedtune certs init --out "$ca" "${hosts[@]}"
    fi
    install -m 0644 "$ca/ca.pem" "$ca/server.pem" "$certs/"
    install -m 0600 "$ca/server.key" "$certs/"
    install -m 0644 "$ca/ca.pem" "$public/"
    if [ -f "$key" ]; then
        say "keeping the checkpoint key $key"
    else
        fedtune coordinator encryption-key --out "$key"
    fi
    fedtune model fetch "${FEDTUNE_MODEL:-smollm2-135m}"
}

init_node() {
    local name=${1:?usage: compose-init.sh node NAME DOMAIN} domain=${2:?usage: compose-init.sh node NAME DOMAIN}
    local state=${FEDTUNE_STATE_DIR:-/var/lib/fedtune/node}
    local data=${FEDTUNE_DATA_DIR:-/var/lib/fedtune/data}
    if [ -f "$state/enrollment.json" ]; then
        say "keeping node $name's keys in $state"
    else
        fedtune node keygen --out "$state"
    fi
    install -m 0644 "$state/enrollment.json" "$enrollments/$name.json"
    if [ -f "$data/train.jsonl" ]; then
        say "keeping node $name's data in $data"
    else
        fedtune data demo --out "$data" --domain "$domain"
        # `fedtune data demo` writes DATA/DOMAIN/{train,held_out}.jsonl
        mv "$data/$domain"/*.jsonl "$data/"
        rmdir "$data/$domain"
    fi
}

certify() {
    local ca=${FEDTUNE_CA_DIR:-/etc/fedtune/ca}
    local name file out
    [ "$#" -gt 0 ] || die "usage: compose-init.sh certify NAME..."
    for name in "$@"; do
        file=$enrollments/$name.json
        out=$enrollments/$name.certified.json
        [ -f "$file" ] || die "$file is missing: run \`compose-init.sh node $name ...\` first"
        if [ -f "$out" ] && [ "$out" -nt "$file" ]; then
            say "node $name's enrollment is certified already"
            continue
        fi
        rm -f "$out"
        fedtune certs certify-node "$file" --name "$name" --ca-dir "$ca" --out "$out"
    done
}

enroll() {
    local state=${FEDTUNE_STATE_DIR:-/var/lib/fedtune/coordinator}
    local config=${FEDTUNE_COORDINATOR_CONFIG:-$state/coordinator.toml}
    local name file done_marker
    [ "$#" -gt 0 ] || die "usage: compose-init.sh enroll NAME..."
    write_pgpass
    for name in "$@"; do
        file=$enrollments/$name.certified.json
        done_marker=$state/enrolled/$name.enrollment.sha256
        [ -f "$file" ] || die "$file is missing: run \`compose-init.sh certify $name\` first"
        if [ -f "$done_marker" ] && sha256sum --check --status "$done_marker"; then
            say "node $name is enrolled already with these keys"
            continue
        fi
        fedtune coordinator enroll "$file" --name "$name" --config "$config"
        sha256sum "$file" >"$done_marker"
    done
}

case ${1:-} in
coordinator) init_coordinator ;;
node) shift && init_node "$@" ;;
certify) shift && certify "$@" ;;
enroll) shift && enroll "$@" ;;
*) die "usage: compose-init.sh coordinator | node NAME DOMAIN | certify NAME... | enroll NAME..." ;;
esac
