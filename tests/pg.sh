#!/usr/bin/env bash
# tests/pg.sh: a private, throw-away PostgreSQL cluster kept in one directory.
#
# Used by the test harness and by `tools/dev run`.  Run `tests/pg.sh help`.
#
# Layout of DIR:
#   DIR/data/             the cluster (initdb, mode 700)
#   DIR/sock/             its unix socket directory (the server listens on no TCP port)
#   DIR/postgresql.log    the server log (pg_ctl -l)
#   DIR/initdb.log        initdb's output
#   DIR/.causeway-pg      marker: `destroy` only removes directories that carry it
#   DIR/sockdir           only when DIR/sock would be too long for a unix socket
#                         path (107 bytes): holds the short directory used instead
#
# As root the server runs as the `postgres` user (PostgreSQL refuses root);
# otherwise everything runs as the current user.
set -euo pipefail
umask 022

PROG=tests/pg.sh
PG_PORT=5432
PG_ROLE=causeway
PG_DB=causeway
START_TIMEOUT=${PG_START_TIMEOUT:-30}
MARKER=.causeway-pg

# Settings from the caller's environment must not redirect our clients.
unset PGDATA PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGSERVICEFILE \
    PGOPTIONS PGCLUSTER PGPASSFILE

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

note() {
    printf '%s: %s\n' "$PROG" "$*" >&2
}

usage() {
    cat <<EOF
usage: $PROG COMMAND DIR [ARGS]

  init DIR [--fast]          create the cluster in DIR (if needed), start it and
                             create database '$PG_DB' owned by role '$PG_ROLE';
                             --fast: fsync, synchronous_commit and
                             full_page_writes off (only when creating)
  start DIR                  start the cluster, wait until it accepts connections
  stop DIR [fast|immediate]  stop it (default: fast); no error if not running
  status DIR                 exit 0 if it is running
  url DIR                    print the libpq URL of database '$PG_DB'
  destroy DIR                stop it if running and remove DIR
  reachable DIR              exit 0 if the server user can use DIR (always true
                             when not root; as root: every existing parent
                             directory must be traversable by 'postgres')

The server listens only on a unix socket (port $PG_PORT) in DIR/sock.
Binaries: \$PG_BINDIR, else \`pg_config --bindir\`, else the newest
/usr/lib/postgresql/*/bin.  PG_START_TIMEOUT (seconds, default 30).
PG_LC_COLLATE: the cluster's collation (initdb --lc-collate), e.g. C; by
default the locale's (C.UTF-8, else C), the character classes staying the
locale's either way (docs/performance.md, fifty-first session).
EOF
}

# ---------------------------------------------------------------- helpers

find_bindir() {
    local d
    if [[ -n ${PG_BINDIR:-} ]]; then
        [[ -x $PG_BINDIR/initdb ]] || die "PG_BINDIR=$PG_BINDIR has no initdb"
        printf '%s\n' "$PG_BINDIR"
        return
    fi
    if command -v pg_config >/dev/null 2>&1; then
        d=$(pg_config --bindir 2>/dev/null || true)
        if [[ -n $d && -x $d/initdb ]]; then
            printf '%s\n' "$d"
            return
        fi
    fi
    d=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null |
        sort -V | tail -n 1)
    if [[ -n $d && -x $d/initdb ]]; then
        printf '%s\n' "$d"
        return
    fi
    die "no PostgreSQL server binaries found (looked at \$PG_BINDIR, pg_config --bindir," \
        "/usr/lib/postgresql/*/bin); on Debian: apt-get install postgresql"
}

IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1

# Run a command as the server user (postgres when we are root), from /,
# so that an unreadable current directory does not matter.  The lock on
# DIR/.lock (fd 9) is closed: the server must not inherit it.
as_pg() {
    if ((IS_ROOT)); then
        if command -v setpriv >/dev/null 2>&1; then
            (cd / && setpriv --reuid=postgres --regid=postgres --init-groups --reset-env "$@" 9>&-)
        else
            (cd / && runuser -u postgres -- "$@" 9>&-)
        fi
    else
        "$@" 9>&-
    fi
}

need_pg_user() {
    ((IS_ROOT)) || return 0
    id -u postgres >/dev/null 2>&1 ||
        die "running as root, but there is no 'postgres' user to run the server" \
            "(on Debian: apt-get install postgresql)"
}

# As root: fail unless the postgres user can traverse every existing
# directory on the way to $1.  Prints nothing and returns 0 if fine.
check_reachable() {
    local target=$1 p="" part bad=""
    ((IS_ROOT)) || return 0
    need_pg_user
    local -a parts
    IFS=/ read -r -a parts <<<"${target#/}"
    for part in "${parts[@]}"; do
        [[ -n $part ]] || continue
        p="$p/$part"
        [[ -d $p ]] || break
        if ! as_pg test -x "$p"; then
            bad=$p
            break
        fi
    done
    if [[ -z $bad ]] && ! as_pg test -x / ; then
        bad=/
    fi
    if [[ -n $bad ]]; then
        printf '%s: error: the postgres user cannot reach %s: directory %s is not traversable by postgres (%s %s:%s).\n' \
            "$PROG" "$target" "$bad" "$(stat -c %A "$bad")" "$(stat -c %U "$bad")" "$(stat -c %G "$bad")" >&2
        printf '%s: use a directory under /tmp or /var/tmp, or run: chmod o+x %s\n' "$PROG" "$bad" >&2
        return 1
    fi
    return 0
}

# Percent-encode a path for use in a URI query value.
uri_encode() {
    local s=$1 out="" c i
    local LC_ALL=C
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in
            [A-Za-z0-9/._~-]) out+=$c ;;
            *) out+=$(printf '%%%02X' "'$c") ;;
        esac
    done
    printf '%s\n' "$out"
}

sock_dir() {
    if [[ -s $DIR/sockdir ]]; then
        head -n 1 "$DIR/sockdir"
    else
        printf '%s\n' "$DIR/sock"
    fi
}

is_running() {
    [[ -f $DATA/PG_VERSION ]] || return 1
    as_pg "$BINDIR/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

show_log_tail() {
    local f
    for f in "$@"; do
        [[ -s $f ]] || continue
        printf -- '---- last lines of %s ----\n' "$f" >&2
        tail -n 30 "$f" >&2
        printf -- '----\n' >&2
    done
}

# Take an exclusive lock on DIR so that parallel tests do not race.
lock_dir() {
    exec 9>>"$DIR/.lock"
    flock -w 300 9 || die "timed out waiting for the lock on $DIR/.lock"
}

psql_q() {
    "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PG_PORT" -U "$PG_ROLE" "$@"
}

# ---------------------------------------------------------------- actions

make_dir() {
    need_pg_user
    check_reachable "$DIR" || exit 1
    mkdir -p "$DIR"
    [[ -e $DIR/$MARKER ]] || : >"$DIR/$MARKER"
    if ((IS_ROOT)); then
        chown postgres:postgres "$DIR"
        chmod 755 "$DIR"
        as_pg test -w "$DIR" ||
            die "the postgres user cannot write to $DIR (check the directory and its parents)"
    fi
}

ensure_sock_dir() {
    mkdir -p "$SOCK"
    if ((IS_ROOT)); then
        chown postgres:postgres "$SOCK"
    fi
    chmod 755 "$SOCK"
}

do_initdb() {
    local fast=$1 loc ok=0 esc

    if [[ -e $DATA && ! -f $DATA/PG_VERSION ]]; then
        note "removing incomplete cluster directory $DATA"
        rm -rf "$DATA"
    fi

    # The socket path (SOCK/.s.PGSQL.5432) must fit in sun_path (107 bytes).
    rm -f "$DIR/sockdir"
    if ((${#DIR} + 5 + 14 > 107)); then
        SOCK=$(mktemp -d /tmp/causeway-pg.XXXXXX)
        printf '%s\n' "$SOCK" >"$DIR/sockdir"
        note "$DIR is too long for a unix socket path; the socket goes to $SOCK"
    else
        SOCK=$DIR/sock
    fi
    ensure_sock_dir

    for loc in C.UTF-8 C; do
        if as_pg "$BINDIR/initdb" -D "$DATA" --auth=trust -U "$PG_ROLE" \
            --encoding=UTF8 --locale="$loc" ${PG_LC_COLLATE:+--lc-collate="$PG_LC_COLLATE"} \
            >"$DIR/initdb.log" 2>&1; then
            ok=1
            break
        fi
        note "initdb with --locale=$loc failed"
        rm -rf "$DATA"
    done
    if ((!ok)); then
        show_log_tail "$DIR/initdb.log"
        die "initdb failed in $DATA (see $DIR/initdb.log)"
    fi
    chmod 700 "$DATA"

    esc=${SOCK//\'/\'\'}
    {
        printf '\n# ---- written by tests/pg.sh ----\n'
        printf "listen_addresses = ''\n"
        printf "unix_socket_directories = '%s'\n" "$esc"
        printf 'unix_socket_permissions = 0777\n'
        printf 'port = %s\n' "$PG_PORT"
        printf 'max_connections = 200\n'
        if ((fast)); then
            printf 'fsync = off\n'
            printf 'synchronous_commit = off\n'
            printf 'full_page_writes = off\n'
        fi
    } >>"$DATA/postgresql.conf"
    if ((fast)); then
        note "initialised a cluster in $DATA (fast: fsync off)"
    else
        note "initialised a cluster in $DATA"
    fi
}

do_start() {
    local logf=$DIR/postgresql.log out deadline
    [[ -f $DATA/PG_VERSION ]] || die "no cluster in $DATA (run: $PROG init $DIR)"
    check_version
    ensure_sock_dir
    if ! is_running; then
        if ! out=$(as_pg "$BINDIR/pg_ctl" -D "$DATA" -l "$logf" -w -t "$START_TIMEOUT" start 2>&1); then
            printf '%s\n' "$out" >&2
            show_log_tail "$logf"
            die "PostgreSQL in $DATA did not start (log: $logf)"
        fi
    fi
    deadline=$((SECONDS + START_TIMEOUT))
    until "$BINDIR/pg_isready" -q -h "$SOCK" -p "$PG_PORT" -U "$PG_ROLE" -d postgres; do
        if ((SECONDS >= deadline)); then
            show_log_tail "$logf"
            die "PostgreSQL in $DATA is not accepting connections on $SOCK after ${START_TIMEOUT}s (log: $logf)"
        fi
        sleep 0.2
    done
}

check_version() {
    local have want
    have=$(head -n 1 "$DATA/PG_VERSION")
    want=$("$BINDIR/postgres" --version | sed -E 's/.* ([0-9]+)(\.[0-9]+)*.*/\1/')
    [[ $have == "$want" ]] ||
        die "the cluster in $DATA is PostgreSQL $have but the binaries in $BINDIR are $want;" \
            "remove it with: $PROG destroy $DIR"
}

ensure_db() {
    local have
    have=$(psql_q -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")
    if [[ $have != 1 ]]; then
        psql_q -d postgres -c "CREATE DATABASE $PG_DB OWNER $PG_ROLE" >/dev/null ||
            die "could not create database $PG_DB"
    fi
}

cmd_init() {
    local fast=0 arg
    for arg in "$@"; do
        case $arg in
            --fast) fast=1 ;;
            *) die "init: unknown option '$arg'" ;;
        esac
    done
    make_dir
    lock_dir
    if [[ ! -f $DATA/PG_VERSION ]]; then
        do_initdb "$fast"
    fi
    do_start
    ensure_db
}

cmd_start() {
    [[ -f $DATA/PG_VERSION ]] || die "no cluster in $DATA (run: $PROG init $DIR)"
    need_pg_user
    lock_dir
    do_start
}

cmd_stop() {
    local mode=${1:-fast} out
    case $mode in
        fast | immediate) ;;
        *) die "stop: mode must be 'fast' or 'immediate', not '$mode'" ;;
    esac
    [[ -f $DATA/PG_VERSION ]] || { note "no cluster in $DATA"; return 0; }
    need_pg_user
    lock_dir
    if ! is_running; then
        note "not running ($DATA)"
        return 0
    fi
    if ! out=$(as_pg "$BINDIR/pg_ctl" -D "$DATA" -m "$mode" -w -t 60 stop 2>&1); then
        printf '%s\n' "$out" >&2
        show_log_tail "$DIR/postgresql.log"
        die "could not stop PostgreSQL in $DATA"
    fi
}

cmd_status() {
    if [[ ! -f $DATA/PG_VERSION ]]; then
        echo "no cluster in $DATA"
        return 3
    fi
    need_pg_user
    if is_running; then
        echo "running: $DATA, socket $SOCK, port $PG_PORT"
        return 0
    fi
    echo "not running: $DATA"
    return 3
}

cmd_url() {
    printf 'postgresql:///%s?host=%s&port=%s&user=%s\n' \
        "$PG_DB" "$(uri_encode "$SOCK")" "$PG_PORT" "$PG_ROLE"
}

cmd_destroy() {
    local short=""
    [[ -e $DIR ]] || return 0
    [[ -d $DIR ]] || die "$DIR is not a directory"
    if [[ ! -e $DIR/$MARKER ]] && [[ -n $(ls -A "$DIR") ]]; then
        die "refusing to remove $DIR: it was not made by $PROG (no $MARKER file)"
    fi
    [[ $DIR != / ]] || die "refusing to remove /"
    if [[ -f $DATA/PG_VERSION ]]; then
        need_pg_user
        lock_dir
        if is_running; then
            as_pg "$BINDIR/pg_ctl" -D "$DATA" -m immediate -w -t 60 stop >/dev/null 2>&1 ||
                die "could not stop PostgreSQL in $DATA"
        fi
    fi
    if [[ -s $DIR/sockdir ]]; then
        short=$(head -n 1 "$DIR/sockdir")
    fi
    rm -rf "$DIR"
    if [[ $short == /tmp/causeway-pg.* ]]; then
        rm -rf "$short"
    fi
}

# ---------------------------------------------------------------- main

main() {
    local cmd=${1:-help}
    case $cmd in
        help | -h | --help)
            usage
            return 0
            ;;
        init | start | stop | status | url | destroy | reachable) ;;
        *)
            usage >&2
            die "unknown command '$cmd'"
            ;;
    esac
    [[ $# -ge 2 && -n $2 ]] || die "$cmd: missing DIR (see: $PROG help)"
    DIR=$(realpath -m -- "$2")
    shift 2
    DATA=$DIR/data
    SOCK=$(sock_dir)

    case $cmd in
        url)
            [[ $# -eq 0 ]] || die "url: unexpected argument '$1'"
            cmd_url
            return
            ;;
        reachable)
            check_reachable "$DIR"
            return
            ;;
    esac

    BINDIR=$(find_bindir)
    case $cmd in
        init) cmd_init "$@" ;;
        start | status | destroy)
            [[ $# -eq 0 ]] || die "$cmd: unexpected argument '$1'"
            "cmd_$cmd"
            ;;
        stop)
            [[ $# -le 1 ]] || die "stop: unexpected argument '$2'"
            cmd_stop "$@"
            ;;
    esac
}

main "$@"
