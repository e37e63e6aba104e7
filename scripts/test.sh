#!/usr/bin/env bash
# The one test command: brokers, formatting, lints, every test, and the release simulation run.
#
#   scripts/test.sh
#
# Environment (all optional):
#   HAMOK_NATS_URL, HAMOK_AMQP_URL, HAMOK_REDIS_URL  where the brokers are (see scripts/brokers.sh); they are
#       exported with their defaults so the tests and scripts/brokers.sh agree
#   HAMOK_BROKER_DIR   logs and data of brokers that scripts/brokers.sh starts
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

STEPS=(brokers fmt clippy test simulation peer-simulation)
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
step fmt "formatting" \
    cargo fmt --all -- --check
step clippy "lints, warnings denied" \
    cargo clippy --workspace --all-targets --all-features -- -D warnings
step test "unit, doc and integration tests (debug)" \
    cargo test --workspace --all-features
step simulation "simulation, release build (HAMOK_SIM_SEEDS=${HAMOK_SIM_SEEDS:-<default>})" \
    cargo test --release -p hamok-runtime --test simulation
step peer-simulation "whole-peer simulation, release build (HAMOK_PEER_SIM_SEEDS=${HAMOK_PEER_SIM_SEEDS:-<default>})" \
    cargo test --release -p hamok-testkit --test peer_simulation
