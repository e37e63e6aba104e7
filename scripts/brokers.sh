#!/usr/bin/env bash
# Makes sure the brokers the tests need answer on loopback: NATS (JetStream on), RabbitMQ and Redis.
#
# For each broker: if its port answers, nothing is done. Otherwise the server binary is installed when it is
# missing (only as root with apt-get), the server is started bound to loopback, and the script waits until
# the port answers. Brokers that are already up are never touched, so running this again is cheap (well
# under a second when all three answer).
#
# Usage: scripts/brokers.sh          check, start what is down
#        scripts/brokers.sh --check  check only; exit 1 if any broker is down
#
# Environment:
#   HAMOK_NATS_URL   default nats://127.0.0.1:4222
#   HAMOK_AMQP_URL   default amqp://guest:guest@127.0.0.1:5672/%2f
#   HAMOK_REDIS_URL  default redis://127.0.0.1:6379
#   HAMOK_BROKER_DIR where servers started here keep their logs, pid files and data
#                    (default ${TMPDIR:-/tmp}/hamok-brokers)
#   HAMOK_BROKER_WAIT_SECS  how long to wait for a started broker's port (default 60)
#
# Only loopback hosts (127.0.0.0/8, localhost, ::1) are checked and started; a URL naming another host is
# left alone (reported, neither connected to nor started).
set -euo pipefail

NATS_URL=${HAMOK_NATS_URL:-nats://127.0.0.1:4222}
AMQP_URL=${HAMOK_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
REDIS_URL=${HAMOK_REDIS_URL:-redis://127.0.0.1:6379}
BROKER_DIR=${HAMOK_BROKER_DIR:-${TMPDIR:-/tmp}/hamok-brokers}
WAIT_SECS=${HAMOK_BROKER_WAIT_SECS:-60}
CONNECT_TIMEOUT=1

CHECK_ONLY=0
case "${1:-}" in
    "") ;;
    --check) CHECK_ONLY=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "brokers.sh: unknown argument '$1' (try --help)" >&2
        exit 2
        ;;
esac

log() { echo "brokers: $*"; }
die() {
    echo "brokers: ERROR: $*" >&2
    exit 1
}

# parse_url URL DEFAULT_PORT -> sets HOST and PORT.
# Accepts scheme://[user[:pass]@]host[:port][/path][?query], host:port, [v6]:port; for a comma-separated
# list of servers (NATS) the first one is used.
parse_url() {
    local url=$1 default_port=$2 rest
    rest=${url%%,*}
    rest=${rest#*://}
    rest=${rest%%/*}
    rest=${rest%%\?*}
    rest=${rest##*@}
    if [[ $rest == \[* ]]; then
        HOST=${rest#\[}
        HOST=${HOST%%\]*}
        rest=${rest#*\]}
        PORT=${rest#:}
    elif [[ $rest == *:* ]]; then
        HOST=${rest%%:*}
        PORT=${rest#*:}
    else
        HOST=$rest
        PORT=
    fi
    [[ -n $HOST ]] || HOST=127.0.0.1
    [[ -n $PORT ]] || PORT=$default_port
    [[ $PORT =~ ^[0-9]+$ ]] && ((PORT > 0 && PORT < 65536)) || die "cannot read a port from '$url'"
}

is_loopback() {
    [[ $1 == localhost || $1 == ::1 || $1 =~ ^127\.[0-9]+\.[0-9]+\.[0-9]+$ ]]
}

# The address a server started here binds to.
bind_addr() {
    if [[ $1 == localhost ]]; then echo 127.0.0.1; else echo "$1"; fi
}

# answers HOST PORT: true when a TCP connection to HOST:PORT succeeds within the connect timeout.
answers() {
    timeout "$CONNECT_TIMEOUT" bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# close_inherited_fds: closes every descriptor above 2 of the current (sub)shell. Called in a subshell right
# before it execs a server, so a server started here holds neither the lock below nor any pipe of whoever
# ran this script (a CI runner waiting for end-of-file on its pipe would otherwise wait forever).
close_inherited_fds() {
    local fd
    for fd in /proc/"$BASHPID"/fd/*; do
        fd=${fd##*/}
        if [[ $fd =~ ^[0-9]+$ ]] && ((fd > 2)); then
            eval "exec $fd>&-" 2>/dev/null || true
        fi
    done
}

# fail NAME WHAT LOGFILE...: stops with what was tried, the log files and the end of the first one.
fail() {
    local name=$1 what=$2 logfile=$3
    shift 2
    {
        echo "brokers: ERROR: $name: $what"
        echo "brokers: see $*"
        if [[ -s $logfile ]]; then
            echo "brokers: last lines of $logfile:"
            tail -n 15 "$logfile" | sed 's/^/    /'
        fi
    } >&2
    exit 1
}

# wait_port NAME HOST PORT TRIED PID LOGFILE...: polls HOST:PORT every 0.5 s for up to WAIT_SECS; stops early
# when PID (if not empty) has exited.
wait_port() {
    local name=$1 host=$2 port=$3 tried=$4 pid=$5 i
    shift 5
    for ((i = 0; i < WAIT_SECS * 2; i++)); do
        answers "$host" "$port" && return 0
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            fail "$name" "tried '$tried'; it exited before $host:$port answered" "$@"
        fi
        sleep 0.5
    done
    fail "$name" "tried '$tried'; $host:$port did not answer within ${WAIT_SECS}s" "$@"
}

# find_bin NAME: prints the path of a server binary (PATH, then /usr/sbin, /usr/bin) or nothing.
find_bin() {
    local p
    p=$(command -v "$1" 2>/dev/null) && { echo "$p"; return 0; }
    for p in "/usr/sbin/$1" "/usr/bin/$1"; do
        [[ -x $p ]] && { echo "$p"; return 0; }
    done
    return 0
}

APT_UPDATED=0
# ensure_bin BROKER BINARY PACKAGE: sets BIN to the binary's path, installing PACKAGE with apt-get when it is
# missing (as root only; `apt-get update` runs once per invocation).
ensure_bin() {
    local broker=$1 bin=$2 pkg=$3 aptlog="$BROKER_DIR/apt.log"
    BIN=$(find_bin "$bin")
    [[ -z $BIN ]] || return 0
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        die "$broker is down and '$bin' is not installed; install the Debian package '$pkg' (as root: apt-get install $pkg) or start $broker yourself"
    fi
    if ((APT_UPDATED == 0)); then
        log "$broker: '$bin' missing; apt-get update (log: $aptlog)"
        (close_inherited_fds; export DEBIAN_FRONTEND=noninteractive; exec apt-get update) </dev/null >>"$aptlog" 2>&1 ||
            fail "$broker" "'$bin' is missing; tried 'apt-get update', which failed" "$aptlog"
        APT_UPDATED=1
    fi
    log "$broker: apt-get install $pkg (log: $aptlog)"
    (close_inherited_fds; export DEBIAN_FRONTEND=noninteractive; exec apt-get install -y --no-install-recommends "$pkg") \
        </dev/null >>"$aptlog" 2>&1 ||
        fail "$broker" "'$bin' is missing; tried 'apt-get install $pkg', which failed" "$aptlog"
    BIN=$(find_bin "$bin")
    [[ -n $BIN ]] || die "$broker: package $pkg installed but '$bin' is still not found; see $aptlog"
}

start_nats() {
    local host=$1 port=$2 bin addr logfile store pidfile
    addr=$(bind_addr "$host")
    logfile="$BROKER_DIR/nats-$port.log"
    store="$BROKER_DIR/nats-$port"
    pidfile="$BROKER_DIR/nats-$port.pid"
    ensure_bin NATS nats-server nats-server
    bin=$BIN
    answers "$host" "$port" && return 0 # the package may have started it
    mkdir -p "$store"
    local tried="$bin -a $addr -p $port -js -sd $store"
    log "starting NATS: $tried (log: $logfile)"
    # setsid + nohup: the server outlives this script, in its own session. (No job control here, so setsid
    # does not fork and $! is the server itself.)
    (close_inherited_fds; exec setsid nohup "$bin" -a "$addr" -p "$port" -js -sd "$store" -P "$pidfile") \
        </dev/null >>"$logfile" 2>&1 &
    local pid=$!
    disown || true
    wait_port NATS "$host" "$port" "$tried" "$pid" "$logfile"
}

start_redis() {
    local host=$1 port=$2 bin addr logfile
    addr=$(bind_addr "$host")
    logfile="$BROKER_DIR/redis-$port.log"
    ensure_bin Redis redis-server redis-server
    bin=$BIN
    answers "$host" "$port" && return 0
    local tried="$bin --daemonize yes --bind $addr --port $port --save '' --appendonly no"
    log "starting Redis: $tried (log: $logfile)"
    (
        close_inherited_fds
        exec "$bin" --daemonize yes --bind "$addr" --port "$port" --save "" --appendonly no \
            --dir "$BROKER_DIR" --logfile "$logfile" --pidfile "$BROKER_DIR/redis-$port.pid"
    ) </dev/null >>"$logfile" 2>&1 ||
        fail Redis "tried '$tried'; it failed" "$logfile"
    wait_port Redis "$host" "$port" "$tried" "" "$logfile"
}

start_rabbitmq() {
    local host=$1 port=$2 addr logfile server=/usr/sbin/rabbitmq-server ctl=/usr/sbin/rabbitmqctl
    local node_args=() rlogs node base tried ip_tuple
    addr=$(bind_addr "$host")
    logfile="$BROKER_DIR/rabbitmq-$port.log"
    if [[ ! -x $server ]]; then
        ensure_bin RabbitMQ rabbitmq-server rabbitmq-server
        [[ -x $server ]] || die "RabbitMQ: $server not found after installing rabbitmq-server"
    fi
    answers "$host" "$port" && return 0
    [[ $addr == *.*.*.* ]] || die "RabbitMQ: only an IPv4 loopback address can be started here, not '$addr'"
    ip_tuple=${addr//./,}
    if ((port == 5672)); then
        # The machine's own node (name, data and config from /etc/rabbitmq), bound to loopback.
        rlogs=/var/log/rabbitmq/
        tried="ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_NODE_IP_ADDRESS=$addr"
        tried+=" RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=\"-kernel inet_dist_use_interface {$ip_tuple}\""
        tried+=" $server -detached"
        log "starting RabbitMQ: $tried (log: $logfile and $rlogs)"
        (
            close_inherited_fds
            export ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_NODE_IP_ADDRESS="$addr"
            export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {$ip_tuple}"
            exec "$server" -detached
        ) </dev/null >>"$logfile" 2>&1 || fail RabbitMQ "tried '$tried'; it failed" "$logfile" "$rlogs"
    else
        # A separate node for a non-default port, with its own name, config, data and logs under
        # $BROKER_DIR, so it cannot collide with the machine's node on 5672.
        node="hamok-$port@localhost"
        base="$BROKER_DIR/rabbitmq-$port"
        rlogs="$base/log/"
        mkdir -p "$base/mnesia" "$base/log"
        printf 'listeners.tcp.local = %s:%s\n' "$addr" "$port" >"$base/rabbitmq.conf"
        printf '[].\n' >"$base/enabled_plugins"
        [[ $(id -u) -ne 0 ]] || chown -R rabbitmq:rabbitmq "$base" 2>/dev/null || true
        node_args=(-n "$node")
        tried="ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_NODENAME=$node RABBITMQ_CONFIG_FILE=$base/rabbitmq.conf"
        tried+=" RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=\"-kernel inet_dist_use_interface {$ip_tuple}\""
        tried+=" $server -detached"
        log "starting RabbitMQ node $node on $addr:$port (log: $logfile and $rlogs)"
        (
            close_inherited_fds
            export ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_NODENAME="$node" RABBITMQ_DIST_PORT=$((port + 20000))
            export RABBITMQ_CONFIG_FILE="$base/rabbitmq.conf" RABBITMQ_MNESIA_BASE="$base/mnesia"
            export RABBITMQ_LOG_BASE="$base/log" RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins"
            export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {$ip_tuple}"
            exec "$server" -detached
        ) </dev/null >>"$logfile" 2>&1 || fail RabbitMQ "tried '$tried'; it failed" "$logfile" "$rlogs"
    fi
    # Right after -detached the node may not be registered with epmd yet, and await_startup then fails at
    # once ("not running at all"): retry it every 2 s (each call costs ~0.5 s), 120 s in all.
    local deadline=$((SECONDS + 120))
    until (close_inherited_fds; exec timeout $((deadline - SECONDS)) "$ctl" "${node_args[@]}" -q await_startup) \
        </dev/null >>"$logfile" 2>&1; do
        ((SECONDS + 2 < deadline)) ||
            fail RabbitMQ "tried '$tried', then '$ctl ${node_args[*]} -q await_startup', which did not succeed within 120s" \
                "$logfile" "$rlogs"
        sleep 2
    done
    wait_port RabbitMQ "$host" "$port" "$tried" "" "$logfile" "$rlogs"
}

# ensure NAME HOST PORT START_FUNCTION
ensure() {
    local name=$1 host=$2 port=$3 start=$4
    if ! is_loopback "$host"; then
        log "$name at $host:$port is not on loopback: not checked, not started (that broker is yours to run)"
        return 0
    fi
    if answers "$host" "$port"; then
        return 0
    fi
    if ((CHECK_ONLY)); then
        echo "brokers: $name is down at $host:$port" >&2
        return 1
    fi
    "$start" "$host" "$port"
    log "$name up at $host:$port"
}

parse_url "$NATS_URL" 4222
NATS_HOST=$HOST NATS_PORT=$PORT
parse_url "$AMQP_URL" 5672
AMQP_HOST=$HOST AMQP_PORT=$PORT
parse_url "$REDIS_URL" 6379
REDIS_HOST=$HOST REDIS_PORT=$PORT

# Fast path: all three are on loopback and answer.
up() { is_loopback "$1" && answers "$1" "$2"; }
if up "$NATS_HOST" "$NATS_PORT" && up "$AMQP_HOST" "$AMQP_PORT" && up "$REDIS_HOST" "$REDIS_PORT"; then
    log "NATS $NATS_HOST:$NATS_PORT, RabbitMQ $AMQP_HOST:$AMQP_PORT, Redis $REDIS_HOST:$REDIS_PORT: all up"
    exit 0
fi

if ((CHECK_ONLY)); then
    down=0
    ensure NATS "$NATS_HOST" "$NATS_PORT" : || down=1
    ensure RabbitMQ "$AMQP_HOST" "$AMQP_PORT" : || down=1
    ensure Redis "$REDIS_HOST" "$REDIS_PORT" : || down=1
    exit "$down"
fi

mkdir -p "$BROKER_DIR"
# Two runs at once (two test runs) must not both start the same broker: serialize the slow path. (Servers
# started below do not inherit the lock: see close_inherited_fds.)
if command -v flock >/dev/null; then
    exec 9>"$BROKER_DIR/.lock"
    flock -w 300 9 || die "another scripts/brokers.sh holds $BROKER_DIR/.lock for over 300s"
fi

ensure NATS "$NATS_HOST" "$NATS_PORT" start_nats
ensure RabbitMQ "$AMQP_HOST" "$AMQP_PORT" start_rabbitmq
ensure Redis "$REDIS_HOST" "$REDIS_PORT" start_redis
log "NATS $NATS_HOST:$NATS_PORT, RabbitMQ $AMQP_HOST:$AMQP_PORT, Redis $REDIS_HOST:$REDIS_PORT: ready"
