#!/usr/bin/env bash
# Fetch Debian's own cloud kernel as a test subject for ringvm:
#
#   resources/debian/build.sh [OUT]     (OUT: first argument, else $OUT,
#                                        else <repo>/target/debian-kernel)
#
# Output in $OUT:
#   vmlinuz            Debian's linux-image-<abi>-cloud-amd64 bzImage, as
#                      shipped (LZ4; virtio, virtio_mmio, virtio_blk and
#                      virtio_net are modules; no MP-table parser; no
#                      virtio_mmio.device= parameter: ACPI is the only way
#                      it finds ringvm's devices and CPUs)
#   vmlinux            the same kernel as the bzImage's decompressor would
#                      unpack it (the ELF inside, with its PVH note): where
#                      guest code runs in KVM's instruction emulator the
#                      in-guest LZ4 decompression alone takes minutes
#   initramfs.cpio     uncompressed newc cpio: Debian's busybox-static, the
#                      virtio modules from the same package with their
#                      dependencies, and `init` (this directory)
#   config             the kernel configuration from the package
#   version.txt        package name and version
#
# The initramfs is our own, not initramfs-tools': it needs only insmod and
# a shell, it stays small and uncompressed (unpacking is a copy, which
# matters where the guest runs in KVM's instruction emulator), and it
# builds without installing the kernel package on the host.
#
# Cached in ${RINGVM_CACHE:-~/.cache/ringvm}/debian-kernel/<package>_<version>-<inputs hash>/,
# so a second run only copies files; a new Debian kernel version or an
# edit of this script or `init` makes a new entry.
set -euo pipefail
{
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-${OUT:-$REPO/target/debian-kernel}}
CACHE=${RINGVM_CACHE:-$HOME/.cache/ringvm}/debian-kernel
META=linux-image-cloud-amd64
# Modules the init loads, in this order (each after what it depends on).
MODULES=(virtio virtio_ring virtio_mmio virtio_blk failover net_failover virtio_net)

log() { printf '[debian-kernel] %s\n' "$*" >&2; }
die() { printf '[debian-kernel] ERROR: %s\n' "$*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb cpio sha256sum lz4 grep; do
  command -v "$tool" >/dev/null || die "needs $tool (a Debian system)"
done
[ "$(dpkg-query -W -f='${db:Status-Status}' busybox-static 2>/dev/null)" = installed ] \
  || { log "installing busybox-static"; apt-get install -y -qq busybox-static >/dev/null; }

# The metapackage names the ABI package of the current kernel.
apt_depends() { apt-cache depends "$1" 2>/dev/null | sed -n 's/^ *Depends: //p' | head -n1; }
PKG=$(apt_depends "$META")
if [ -z "$PKG" ]; then
  log "apt lists do not know $META; running apt-get update"
  apt-get update -qq
  PKG=$(apt_depends "$META")
fi
[ -n "$PKG" ] || die "cannot resolve $META to a kernel package"
VERSION=$(apt-cache show --no-all-versions "$PKG" | sed -n 's/^Version: //p' | head -n1)
[ -n "$VERSION" ] || die "no version for $PKG"
INPUTS=$(cat "$HERE/build.sh" "$HERE/init" | sha256sum | cut -c1-16)
ENTRY=$CACHE/${PKG}_${VERSION}-$INPUTS
OUTPUTS=(vmlinuz vmlinux initramfs.cpio config version.txt)

if [ ! -f "$ENTRY/version.txt" ]; then
  log "building $PKG $VERSION"
  mkdir -p "$CACHE"
  TMP=$(mktemp -d "$CACHE/.tmp.XXXXXX")
  trap 'rm -rf "$TMP"' EXIT
  (cd "$TMP" && apt-get download -q "$PKG=$VERSION" >/dev/null 2>"$TMP/apt.err") \
    || { cat "$TMP/apt.err" >&2; die "apt-get download $PKG=$VERSION failed"; }
  dpkg-deb -x "$TMP"/*.deb "$TMP/pkg"
  ABI=${PKG#linux-image-}
  KO=$TMP/pkg/lib/modules/$ABI/kernel
  cp "$TMP/pkg/boot/vmlinuz-$ABI" "$TMP/vmlinuz"
  cp "$TMP/pkg/boot/config-$ABI" "$TMP/config"
  # The payload is an LZ4 legacy frame (magic 02 21 4c 18) after the setup
  # code and decompressor; lz4 stops at its end (and warns about the
  # bytes that follow, which are not ours to parse).
  at=$(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$TMP/vmlinuz" | head -n1 | cut -d: -f1)
  [ -n "$at" ] || die "no LZ4 payload in vmlinuz-$ABI (not an LZ4 bzImage?)"
  tail -c +$((at + 1)) "$TMP/vmlinuz" | lz4 -dc > "$TMP/vmlinux" 2>/dev/null || true
  [ "$(head -c4 "$TMP/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] \
    || die "the LZ4 payload of vmlinuz-$ABI is not an ELF kernel"

  ROOT=$TMP/root
  mkdir -p "$ROOT"/{bin,dev,proc,sys,mnt,lib/modules}
  cp /bin/busybox "$ROOT/bin/busybox"
  ln -s busybox "$ROOT/bin/sh"
  install -m 0755 "$HERE/init" "$ROOT/init"
  for m in "${MODULES[@]}"; do
    f=$(find "$KO" -name "$m.ko" -print -quit)
    [ -n "$f" ] || die "$m.ko is not in $PKG (compressed modules are not handled)"
    cp "$f" "$ROOT/lib/modules/"
  done
  printf '%s\n' "${MODULES[@]}" > "$ROOT/lib/modules/order"
  # Every dependency must be in the list before the module that needs it.
  for m in "${MODULES[@]}"; do
    for dep in $(/sbin/modinfo -F depends "$ROOT/lib/modules/$m.ko" | tr , ' '); do
      before=$(sed -n "1,/^$m\$/p" "$ROOT/lib/modules/order")
      grep -qx "$dep" <<<"$before" || die "$m needs $dep loaded first"
    done
  done
  (cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) \
    > "$TMP/initramfs.cpio"
  printf '%s %s\nmodules: %s\n' "$PKG" "$VERSION" "${MODULES[*]}" > "$TMP/version.txt"
  rm -rf "$TMP/pkg" "$TMP/root" "$TMP"/*.deb "$TMP/apt.err"
  rm -rf "$ENTRY"
  mv "$TMP" "$ENTRY"
  trap - EXIT
fi
mkdir -p "$OUT"
for f in "${OUTPUTS[@]}"; do cp "$ENTRY/$f" "$OUT/$f"; done
log "$PKG $VERSION in $OUT"
}
