#!/usr/bin/env bash
# Install the external tools the fast test tier needs, when they are missing:
#   promtool, prometheus   Debian's `prometheus` package (tests/prometheus.rs
#                          checks the exposition with `promtool check metrics`
#                          and scrapes the proxy with a real Prometheus).
#
# Idempotent: does nothing when every tool is on PATH. Installs with apt-get
# (as root, or through sudo), without recommended packages (the package
# recommends prometheus-node-exporter, another daemon the tests do not need).
# The tests start their own Prometheus on a free loopback port; the package's
# system service is not wanted, so if installing started it (a machine with
# systemd or a permissive policy-rc.d), it is stopped and disabled again.
set -euo pipefail

missing=()
for tool in promtool prometheus; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-test-tools: promtool and prometheus present ($(prometheus --version 2>&1 | head -n 1)); nothing to do."
    exit 0
fi

echo "install-test-tools: missing: ${missing[*]}; installing Debian's prometheus package."
if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "install-test-tools: not root and no sudo; install Debian's prometheus package by hand." >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-tools: no apt-get; install promtool and prometheus (https://prometheus.io/download/) on PATH." >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
echo "install-test-tools: installed $(prometheus --version 2>&1 | head -n 1)"

# The package's postinst enables and starts prometheus.service (systemd) or
# /etc/init.d/prometheus (sysvinit) unless policy-rc.d forbids it. Stop it
# through the same service manager, so that nothing holds port 9090.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    if systemctl is-active --quiet prometheus 2>/dev/null; then
        "${sudo[@]}" systemctl disable --now prometheus
        echo "install-test-tools: the package started prometheus.service; stopped and disabled it."
    else
        echo "install-test-tools: prometheus.service is not running."
    fi
elif [ -x /etc/init.d/prometheus ]; then
    if "${sudo[@]}" /etc/init.d/prometheus status >/dev/null 2>&1; then
        "${sudo[@]}" /etc/init.d/prometheus stop
        command -v update-rc.d >/dev/null 2>&1 && "${sudo[@]}" update-rc.d prometheus disable >/dev/null 2>&1 || true
        echo "install-test-tools: the package started /etc/init.d/prometheus; stopped and disabled it."
    else
        echo "install-test-tools: no init system started prometheus (no systemd; init.d service not running)."
    fi
else
    echo "install-test-tools: no systemd and no init.d script; no prometheus service to stop."
fi
