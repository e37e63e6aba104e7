#!/usr/bin/env bash
# The one test command: brokers, formatting, lints, docs, every test, and the release simulation run.
#
#   scripts/test.sh
#
# Environment (all optional):
#   HAMOK_NATS_URL, HAMOK_AMQP_URL, HAMOK_REDIS_URL  where the brokers are (see scripts/brokers.sh); they are
#       exported with their defaults so the tests and scripts/brokers.sh agree
#   HAMOK_BROKER_DIR   logs and data of brokers that scripts/brokers.sh starts
#   HAMOK_NATS_SERVER  the nats-server binary of the tests that start their own NATS cluster (default: found
#       on PATH, /usr/sbin, /usr/bin)
#   HAMOK_SIM_SEEDS    number of simulation seeds for the release run (unset: the simulation's own default)
#   HAMOK_SIM_SEED     replay one simulation seed with its trace
#   HAMOK_SIM_THREADS  simulation worker threads
#   HAMOK_PEER_SIM_SEEDS, HAMOK_PEER_SIM_SEED, HAMOK_PEER_SIM_THREADS  the same for the whole-peer
#       simulation (hamok-testkit)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || {
    echo "test.sh: cargo not found (not on PATH, not in ~/.cargo/bin); install Rust with rustup" >&2
    exit 1
}

export HAMOK_NATS_URL=${HAMOK_NATS_URL:-nats://127.0.0.1:4222}
export HAMOK_AMQP_URL=${HAMOK_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export HAMOK_REDIS_URL=${HAMOK_REDIS_URL:-redis://127.0.0.1:6379}

STEPS=(brokers nats-server fmt clippy docs features test simulation peer-simulation)
declare -A RESULT=() SECS=()
CURRENT=""
START_ALL=$SECONDS

summary() {
    local rc=$? step status
    echo
    echo "================================ summary ================================"
    for step in "${STEPS[@]}"; do
        status=${RESULT[$step]:-}
        if [[ -z $status ]]; then
            if [[ $step == "$CURRENT" ]]; then status="FAILED (exit $rc)"; else status="not run"; fi
        fi
        printf '  %-16s %-18s %s\n' "$step" "$status" "${SECS[$step]:+${SECS[$step]}s}"
    done
    echo "  total: $((SECONDS - START_ALL))s"
    if ((rc == 0)); then
        echo "  ALL PASSED"
    else
        echo "  FAILED at step '${CURRENT:-setup}' (exit $rc)"
    fi
    echo "========================================================================="
}
trap summary EXIT

# step NAME DESCRIPTION COMMAND...
step() {
    local name=$1 description=$2 start=$SECONDS
    shift 2
    CURRENT=$name
    echo
    echo "==> [$name] $description"
    echo "    \$ $*"
    "$@"
    SECS[$name]=$((SECONDS - start))
    RESULT[$name]=ok
    CURRENT=""
}

step brokers "brokers answer on loopback (starts missing ones)" \
    scripts/brokers.sh
# Some tests start NATS servers of their own besides the shared broker (tests/broker_death.rs and
# hamok-testkit's nats_cluster: a 3-server cluster on free loopback ports, killed when the test ends), so
# the binary must be here even when the broker on 4222 runs elsewhere. Same lookup as the tests.
need_nats_server() {
    local bin=${HAMOK_NATS_SERVER:-} p
    if [[ -z $bin ]]; then
        bin=$(command -v nats-server 2>/dev/null || true)
    fi
    if [[ -z $bin ]]; then
        for p in /usr/sbin/nats-server /usr/bin/nats-server; do
            if [[ -x $p ]]; then
                bin=$p
                break
            fi
        done
    fi
    if [[ -z $bin || ! -x $bin ]]; then
        echo "test.sh: nats-server not found (HAMOK_NATS_SERVER='${HAMOK_NATS_SERVER:-}', PATH, /usr/sbin," \
            "/usr/bin): install Debian's package nats-server or set HAMOK_NATS_SERVER to the binary" >&2
        return 1
    fi
    echo "    $("$bin" --version) at $bin"
}
step nats-server "the nats-server binary (tests start NATS clusters of their own)" \
    need_nats_server
step fmt "formatting" \
    cargo fmt --all -- --check
step clippy "lints, warnings denied" \
    cargo clippy --workspace --all-targets --all-features -- -D warnings
# Every doc comment renders: broken intra-doc links, unclosed HTML tags and bare brackets are errors
# (private items included: the codemap in ARCHITECTURE.md points at them).
step docs "rustdoc, warnings denied, private items included" \
    env RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --document-private-items
# A service embedding the library picks its transports (Cargo.toml, [features]): each choice alone must
# build, warnings denied (the workspace steps build everything at once, which hides a module gated on
# the wrong feature).
each_feature_alone() {
    local features
    for features in "" nats rabbitmq; do
        echo "    hamok --no-default-features ${features:+--features $features}"
        cargo clippy -p hamok --no-default-features ${features:+--features "$features"} -- -D warnings
    done
}
step features "the library with no transport, with NATS alone, with RabbitMQ alone" \
    each_feature_alone
step test "unit, doc and integration tests (debug)" \
    cargo test --workspace --all-features
step simulation "simulation, release build (HAMOK_SIM_SEEDS=${HAMOK_SIM_SEEDS:-<default>})" \
    cargo test --release -p hamok-runtime --test simulation
step peer-simulation "whole-peer simulation, release build (HAMOK_PEER_SIM_SEEDS=${HAMOK_PEER_SIM_SEEDS:-<default>})" \
    cargo test --release -p hamok-testkit --test peer_simulation
