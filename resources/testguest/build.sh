#!/usr/bin/env bash
# Builds vtest, the freestanding virtio test kernel, and copies it to
# <out>/vtest.elf (default: <repo>/target/testguest/vtest.elf).
#
#   bash resources/testguest/build.sh [OUT_DIR]
#
# It is its own cargo workspace (target x86_64-unknown-none, its own
# linker script and Cargo.lock, no dependencies) with its own target dir.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$root/target/testguest}
target=x86_64-unknown-none

if command -v rustup >/dev/null 2>&1; then
    rustup target list --installed 2>/dev/null | grep -qx "$target" ||
        rustup target add "$target"
fi

cd "$here"
# The outer environment must not leak host flags or target dirs in.
env -u RUSTFLAGS -u CARGO_BUILD_TARGET -u CARGO_TARGET_DIR \
    cargo build --release --locked --target-dir "$here/target"
elf="$here/target/$target/release/vtest"

# KVM's instruction emulator (PVM-native KVM) cannot run SIMD: refuse an
# ELF whose generated code uses xmm/ymm/zmm registers. Only the probe
# functions (vtest.probe=sse_*) use them on purpose.
if command -v objdump >/dev/null 2>&1; then
    bad=$(objdump -d --no-show-raw-insn "$elf" | awk '
        /^[0-9a-f]+ <.*>:$/ { fn = $2 }
        /%?[xyz]mm[0-9]/ && fn !~ /probe/ { print fn ": " $0 }' | head -5)
    if [ -n "$bad" ]; then
        echo "vtest: SIMD instructions outside the probes:" >&2
        echo "$bad" >&2
        exit 1
    fi
fi

mkdir -p "$out"
cp "$elf" "$out/vtest.elf"
echo "$out/vtest.elf"
