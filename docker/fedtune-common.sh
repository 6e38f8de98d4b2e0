# Functions the container scripts share; sourced, never run.
# shellcheck shell=bash

say() {
    printf '%s: %s\n' "${0##*/}" "$*" >&2
}

die() {
    say "$*"
    exit 1
}

# A TOML basic string holding $1 (backslashes and double quotes escaped).
toml_string() {
    local value=${1//\\/\\\\}
    value=${value//\"/\\\"}
    printf '"%s"' "$value"
}

# The database password, when FEDTUNE_DATABASE_PASSWORD_FILE names a file, goes into a libpq
# password file (default ~/.pgpass, mode 0600): it never appears on a command line or in a
# config file, and `docker compose exec ... fedtune ...` finds it as the entrypoint's command
# does. A password file that this function did not write is never overwritten.
write_pgpass() {
    local secret=${FEDTUNE_DATABASE_PASSWORD_FILE:-}
    [ -n "$secret" ] || return 0
    [ -r "$secret" ] || die "FEDTUNE_DATABASE_PASSWORD_FILE=$secret cannot be read"
    local target=${PGPASSFILE:-$HOME/.pgpass}
    local marker="# written by fedtune's container entrypoint from $secret"
    if [ -e "$target" ] && [ "$(head -n 1 "$target")" != "$marker" ]; then
        die "$target exists and was not written by this entrypoint; remove it or set PGPASSFILE"
    fi
    local password
    password=$(<"$secret")
    [ -n "$password" ] || die "$secret is empty"
    password=${password//\\/\\\\}
    password=${password//:/\\:}
    (
        umask 077
        printf '%s\n*:*:*:*:%s\n' "$marker" "$password" >"$target.tmp"
    )
    mv -f "$target.tmp" "$target"
}
