# Sluice — the two commands a newcomer needs are `just bench` and `just test`.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Where the real vLLM (venv + tiny model) is cached, outside the repository.
export SLUICE_CACHE := env_var_or_default("SLUICE_CACHE", env_var("HOME") + "/.cache/sluice")
vllm_port := env_var_or_default("SLUICE_VLLM_PORT", "8000")

default:
    @just --list

# The main job: the client habits (waves, semaphore), naive clients and Sluice with each policy in the same scenarios — batch job, live traffic, mixed, the frontier (bench compare) — on the simulated vLLM (profile rtx4080), under 2 min; e.g. `just bench --upstream http://127.0.0.1:8000` for a real one.
bench *ARGS: plugins build
    target/release/bench compare {{ARGS}}

# The same scenarios against the real CPU vLLM (`just vllm`), scaled down: a batch of 300, 8 s per live load (under 10 min).
bench-vllm *ARGS: plugins build vllm
    target/release/bench compare --upstream http://127.0.0.1:{{vllm_port}} --batch 300 --live-seconds 8 --warmup 10 {{ARGS}}

# Sluice's routing over 4 simulated vLLM replicas (profile vllm-cpu-tiny, each its own prefix cache holding ~1.5 × K/N rubrics), all at the same load: one replica alone, --route round-robin, least-loaded and prefix, and the one-rubric hit-rate ceiling, on 16 interleaved rubrics, with PASS/FAIL targets (about a minute); e.g. `just bench-replicas --replicas 2 --rubrics 8`.
bench-replicas *ARGS: build
    target/release/bench compare {{ if ARGS =~ '--replicas|--upstream' { "" } else { "--replicas 4" } }} {{ARGS}}

# The same against two real CPU vLLMs (`SLUICE_VLLM_REPLICAS=2 just vllm`: ports 8000 and 8001), scaled down; their caches are their own, so size them to hold ~1.5 × K/N rubrics, e.g. SLUICE_VLLM_ARGS='--num-gpu-blocks-override 600' before they start.
bench-replicas-vllm *ARGS: build
    SLUICE_VLLM_REPLICAS=2 scripts/vllm.sh start
    target/release/bench compare --upstream http://127.0.0.1:{{vllm_port}} --upstream http://127.0.0.1:$(({{vllm_port}} + 1)) --requests 200 --warmup 40 {{ARGS}}

# The benchmark suite: batching, cache resume and memory (with a 10-minute soak), each against its target, on the simulated vLLM (rtx4080); e.g. `just bench-suite --soak 1m`.
bench-suite *ARGS: build
    target/release/bench suite {{ARGS}}

# The proxy's memory at steady load: RSS at the start, every 5 minutes and at the end, failing past 10% growth; 2 minutes by default, e.g. `just soak --duration 1h` (add `--scrape-interval 15s` for a Prometheus-like scraper).
soak *ARGS: build
    target/release/bench soak {{ARGS}}

# Small requests' latency beside 16 clients sending 15 MiB token-id prompts, and the proxy's peak RSS (about 30 s).
bench-bodies *ARGS: build
    target/release/bench bodies {{ARGS}}

# Batching and cache resume against the real CPU vLLM (`just vllm`); under a minute.
bench-suite-vllm *ARGS: build vllm
    target/release/bench suite --upstream http://127.0.0.1:{{vllm_port}} --only batching,cache-resume {{ARGS}}

# The simulator against the real CPU vLLM (`just vllm`): fits vllm-cpu-tiny at concurrency 1 and 50 and predicts concurrency 10 and a shared prefix, side by side (~1.5 min); e.g. `just sim-vs-real --repeats 5`.
sim-vs-real *ARGS: build vllm
    target/release/bench sim-vs-real --upstream http://127.0.0.1:{{vllm_port}} {{ARGS}}

# Added latency and max throughput: direct vs Sluice (with and without a policy) vs hyper-floor (hyper with no proxy logic) vs nginx when installed; measures the deployable `dist` build of the proxy, and of hyper-floor beside it.
bench-overhead: plugins build
    cargo build --profile dist -p sluice-proxy -p sluice-hyper-floor --bins
    SLUICE_PROXY_BIN=target/dist/proxy target/release/bench overhead --policy plugins/dist/concurrency.wasm --policy-config limit=100000

# Cost of one policy event including the wasm call (the three bundled plugins; pinned to one core when taskset exists).
bench-policy: plugins build
    $(command -v taskset >/dev/null && echo taskset -c 1) target/release/bench policy-cost --policy plugins/dist/concurrency.wasm
    $(command -v taskset >/dev/null && echo taskset -c 1) target/release/bench policy-cost --policy plugins/dist/batched.wasm --policy-config max_batch=1 --policy-config window_ms=0
    $(command -v taskset >/dev/null && echo taskset -c 1) target/release/bench policy-cost --policy plugins/dist/adaptive.wasm --policy-config max_limit=4096

# Build the proxy, bench and hyper-floor binaries (release).
build:
    cargo build --release --bins

# Build every policy plugin into plugins/dist/ (rustup's wasm target, or Debian's rustc-web).
plugins:
    scripts/build-plugins.sh

# The fast tiers: unit, service and end-to-end tests against in-test upstreams.
test: plugins tools
    cargo test --workspace

# External tools the fast tests use (promtool, prometheus), installed when missing.
tools:
    scripts/install-test-tools.sh

# The real-vLLM tier: starts two engines with KV-cache events (8000 and 8001; events on 5557 and 5558) when needed, then runs the tests that use them.
e2e: plugins
    SLUICE_VLLM_REPLICAS=2 SLUICE_VLLM_KV_EVENTS=1 scripts/vllm.sh start
    SLUICE_VLLM_URL=http://127.0.0.1:{{vllm_port}} SLUICE_VLLM_URLS=http://127.0.0.1:{{vllm_port}},http://127.0.0.1:$(({{vllm_port}} + 1)) SLUICE_VLLM_KV_ENDPOINT=tcp://127.0.0.1:5557 SLUICE_VLLM_TOKENIZER=$SLUICE_CACHE/tiny-llama/tokenizer.json cargo test --workspace -- --ignored --test-threads 1

# Install (first time, ~5 min) and start a real CPU vLLM with a tiny local model; waits for /health. SLUICE_VLLM_REPLICAS=2 starts two (ports 8000, 8001, …), SLUICE_VLLM_KV_EVENTS=1 has each publish its KV-cache events over ZMQ (tcp://*:5557 + i, topic "kv").
vllm:
    scripts/vllm.sh start

# Stop every vLLM `just vllm` started (all of its replicas).
vllm-stop:
    scripts/vllm.sh stop

# Formatting and lints, as CI runs them.
fmt-check:
    cargo fmt --all -- --check

clippy:
    cargo clippy --workspace --all-targets -- -D warnings
