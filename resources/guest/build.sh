#!/usr/bin/env bash
# Build ringvm's test guest from Debian packages:
#
#   resources/guest/build.sh [OUT]      (OUT: first argument, else $OUT,
#                                        else <repo>/target/guest)
#
# Output in $OUT:
#   vmlinux            ELF kernel with a PVH entry note (boot this on
#                      PVM-native KVM)
#   bzImage            the same kernel, LZ4-compressed (for real KVM)
#   rootfs.ext4        32 MiB ext4: busybox-static, applet links, /init
#   initramfs.cpio.gz  the same root as a gzip'd newc cpio (for real KVM)
#   config             the kernel .config
#   build-info.txt     versions, hashes, build times
#
# Inputs: Debian's linux-source-6.1 (tinyconfig + kernel.config + patches/),
# busybox-static, and init (this directory). Results are cached in
# ${RINGVM_CACHE:-~/.cache/ringvm}/guest/<sha256 of all inputs>/; a cache
# hit only copies files. The kernel is also cached on its own, keyed by the
# kernel inputs alone, so editing `init` rebuilds only the root (seconds),
# not the kernel (minutes).
#
# Env: JOBS (make -j, default nproc), RINGVM_CACHE.
# Needs Debian/Ubuntu; missing packages are installed with apt-get (as root,
# or through `sudo -n`).
set -euo pipefail

# The whole script is one { ... } block: bash parses it completely before
# running it, so editing this file during a build cannot break that build.
{
T_START=$(date +%s)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-${OUT:-$REPO/target/guest}}
CACHE=${RINGVM_CACHE:-$HOME/.cache/ringvm}/guest
JOBS=${JOBS:-$(nproc)}
ROOTFS_MIB=32
LINUX_PKG=linux-source-6.1
TARBALL=/usr/src/$LINUX_PKG.tar.xz
OUTPUTS=(vmlinux bzImage rootfs.ext4 initramfs.cpio.gz config build-info.txt)

log() { printf '[guest] %s\n' "$*" >&2; }
die() { printf '[guest] ERROR: %s\n' "$*" >&2; exit 1; }

# Temporary state removed on any exit. Cache-side temp dirs are only ours to
# delete once we hold the cache lock (LOCKED=1).
SNAP=
LOCKED=0
cleanup() {
  [ -z "$SNAP" ] || rm -rf "$SNAP"
  if [ "$LOCKED" = 1 ]; then
    rm -rf "$CACHE/work" "$CACHE"/.tmp.* "$CACHE"/kernel/.tmp.* "$CACHE"/src/.tmp.*
  fi
}
trap cleanup EXIT

# Snapshot the inputs first: the cache key and the build must see the same
# bytes even if someone edits init or a patch while the kernel compiles.
SNAP=$(mktemp -d "${TMPDIR:-/tmp}/ringvm-guest.XXXXXX")
mkdir "$SNAP/patches"
cp "$HERE/build.sh" "$HERE/kernel.config" "$HERE/init" "$SNAP/"
cp "$HERE"/patches/*.patch "$SNAP/patches/" 2>/dev/null || die "no patches in $HERE/patches"

# ---------------------------------------------------------------- packages
# CI machines start empty, so install what is missing. lz4 compresses the
# bzImage; libelf-dev is for objtool; busybox-static is the whole user space.
PKGS=(linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev
      busybox-static e2fsprogs cpio lz4 xz-utils gzip patch binutils)
command -v dpkg-query >/dev/null || die "needs a Debian-based system (dpkg-query, apt-get)"
missing=()
for p in "${PKGS[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo -n)
    else die "missing packages: ${missing[*]} (run as root: apt-get install -y ${missing[*]})"; fi
  fi
  log "installing: ${missing[*]}"
  # Lock::Timeout: wait for another apt run (e.g. CI image setup) to finish
  # instead of failing on its lock.
  APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600)
  "${APT[@]}" update >&2
  "${APT[@]}" install --no-install-recommends "${missing[@]}" >&2
fi
[ -f "$TARBALL" ] || die "$TARBALL not found (package $LINUX_PKG)"
BUSYBOX=/bin/busybox
"$BUSYBOX" --list >/dev/null || die "$BUSYBOX does not run (package busybox-static)"
# It is copied into a root with no libraries: it must be the static one.
bbhdr=$(readelf -l "$BUSYBOX")
! grep -q INTERP <<<"$bbhdr" || die "$BUSYBOX is dynamically linked (install busybox-static)"
# Fail fast on a broken init, before minutes of kernel build.
"$BUSYBOX" sh -n "$SNAP/init" || die "$HERE/init does not parse (busybox sh -n)"

# ---------------------------------------------------------------- cache keys
LINUX_VER=$(dpkg-query -W -f='${Version}' "$LINUX_PKG")
BUSYBOX_VER=$(dpkg-query -W -f='${Version}' busybox-static)
PATCHES=("$SNAP"/patches/*.patch)      # applied in name order

# Hash file names with contents, so renaming or reordering patches counts.
hash_files() { local f; for f in "$@"; do printf '== %s\n' "${f#"$SNAP"/}"; cat "$f"; done; }
KHASH=$({ echo "$LINUX_PKG $LINUX_VER"
          hash_files "$SNAP/build.sh" "$SNAP/kernel.config" "${PATCHES[@]}"; } | sha256sum | cut -d' ' -f1)
HASH=$({ echo "$LINUX_PKG $LINUX_VER"; echo "busybox-static $BUSYBOX_VER"
         hash_files "$SNAP/build.sh" "$SNAP/kernel.config" "${PATCHES[@]}" "$SNAP/init"; } | sha256sum | cut -d' ' -f1)
ENTRY=$CACHE/$HASH

entry_complete() { local f; for f in "${OUTPUTS[@]}"; do [ -f "$ENTRY/$f" ] || return 1; done; }

# Copy (never hardlink) into $OUT: a VMM may open rootfs.ext4 read-write,
# and writing through a hardlink would change the cache entry. Each file is
# renamed into place, so a reader never sees half a file.
install_outputs() {
  mkdir -p "$OUT"
  local f
  for f in "${OUTPUTS[@]}"; do
    cp --reflink=auto "$ENTRY/$f" "$OUT/.$f.tmp"
    chmod 644 "$OUT/.$f.tmp"
    mv -f "$OUT/.$f.tmp" "$OUT/$f"
  done
  log "outputs in $OUT ($1, $(( $(date +%s) - T_START ))s):"
  ls -l "${OUTPUTS[@]/#/$OUT/}" >&2
}

if entry_complete; then
  install_outputs "cache hit ${HASH:0:12}"
  exit 0
fi

# ---------------------------------------------------------------- lock
# One build at a time per cache: a second `make guest` waits and then takes
# the first one's result instead of building the same thing again.
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
  log "another guest build holds $CACHE/.lock, waiting"
  flock 9
fi
LOCKED=1
if entry_complete; then
  install_outputs "cache hit ${HASH:0:12} (built by another run)"
  exit 0
fi
# Under the lock, anything in work/ is left over from an interrupted build.
WORK=$CACHE/work
rm -rf "$WORK" "$CACHE"/.tmp.* "$CACHE"/kernel/.tmp.* "$CACHE"/src/.tmp.*
mkdir -p "$WORK" "$CACHE/kernel" "$CACHE/src"

# ---------------------------------------------------------------- kernel source
# The pristine tree is extracted once per package version (about a minute)
# and never written to afterwards: each build works on a hardlinked copy.
PRISTINE=$CACHE/src/$LINUX_PKG-$(printf '%s' "$LINUX_VER" | tr -c 'A-Za-z0-9.+~-' '_')
T_EXTRACT=0
extract_source() {
  [ ! -f "$PRISTINE/Makefile" ] || return 0
  log "extracting $TARBALL ($LINUX_VER)"
  local t tmp
  t=$(date +%s)
  # Only one version is kept: each is about 1.3 GB.
  rm -rf "$CACHE/src/$LINUX_PKG"-*
  tmp=$(mktemp -d "$CACHE/src/.tmp.XXXXXX")
  tar -C "$tmp" -xJf "$TARBALL"
  [ -f "$tmp/$LINUX_PKG/Makefile" ] || die "unexpected layout in $TARBALL"
  mv -T "$tmp/$LINUX_PKG" "$PRISTINE"
  rmdir "$tmp"
  T_EXTRACT=$(( $(date +%s) - t ))
}

# ---------------------------------------------------------------- kernel build
KENTRY=$CACHE/kernel/$KHASH
if [ -f "$KENTRY/vmlinux" ] && [ -f "$KENTRY/bzImage" ] && [ -f "$KENTRY/config" ] && [ -f "$KENTRY/kernel-info.txt" ]; then
  log "kernel cache hit ${KHASH:0:12}"
  KERNEL_FROM_CACHE=yes
else
  KERNEL_FROM_CACHE=no
  SRC=$WORK/src
  OBJ=$WORK/obj
  extract_source
  log "copying source tree (hardlinks)"
  cp -al "$PRISTINE" "$SRC" 2>/dev/null || { rm -rf "$SRC"; cp -a "$PRISTINE" "$SRC"; }

  # Patches. A file a patch touches is first replaced by a real copy, so the
  # hardlinked pristine tree can never be modified through it. --fuzz=0:
  # a patch that no longer applies exactly fails the build.
  for p in "${PATCHES[@]}"; do
    while IFS= read -r f; do
      if [ -f "$PRISTINE/$f" ]; then cp --remove-destination "$PRISTINE/$f" "$SRC/$f"; fi
    done < <(sed -n 's|^+++ b/\([^[:space:]]*\).*|\1|p' "$p")
    log "patch $(basename "$p")"
    patch -d "$SRC" -p1 --batch --forward --fuzz=0 --no-backup-if-mismatch < "$p" >&2 \
      || die "$(basename "$p") does not apply to $LINUX_PKG $LINUX_VER"
  done

  # Config: tinyconfig (allnoconfig + tiny.config), then our fragment, then
  # olddefconfig to resolve dependencies. ARCH=x86_64 forces 64BIT (plain
  # ARCH=x86 with tinyconfig gives an i386 kernel). O=: objects go to a
  # separate dir, the source tree stays untouched.
  # KBUILD_BUILD_USER/HOST: do not put the builder's names into the kernel.
  KMAKE=(make -s -C "$SRC" O="$OBJ" ARCH=x86_64 KBUILD_BUILD_USER=ringvm KBUILD_BUILD_HOST=ringvm)
  t=$(date +%s)
  mkdir -p "$OBJ"
  # Their chatter (tinyconfig's own overrides) goes to a log, shown on error.
  log "configuring: tinyconfig + kernel.config"
  { "${KMAKE[@]}" tinyconfig &&
    "$SRC/scripts/kconfig/merge_config.sh" -m -O "$OBJ" "$OBJ/.config" "$SNAP/kernel.config" &&
    "${KMAKE[@]}" olddefconfig; } >"$WORK/config.log" 2>&1 \
    || { cat "$WORK/config.log" >&2; die "kernel configuration failed"; }

  # Every requested option must have survived dependency resolution: a
  # silently dropped option gives a kernel that boots but misses a device.
  bad=0
  while IFS= read -r line; do
    case "$line" in
      CONFIG_*=*)
        grep -qxF -- "$line" "$OBJ/.config" && continue
        sym=${line%%=*} ;;
      "# CONFIG_"*" is not set")
        sym=${line#\# }; sym=${sym%% *}
        grep -qE "^$sym=[ym]\$" "$OBJ/.config" || continue ;;
      *) continue ;;
    esac
    log "config: requested '$line', got '$(grep -E "^(# )?$sym[= ]" "$OBJ/.config" || echo absent)'"
    bad=1
  done < "$SNAP/kernel.config"
  [ $bad = 0 ] || die "kernel.config options did not survive olddefconfig (see above)"
  T_CONFIG=$(( $(date +%s) - t ))

  log "building kernel with -j$JOBS (a few minutes)"
  t=$(date +%s)
  # bzImage depends on vmlinux: one build gives both.
  "${KMAKE[@]}" -j"$JOBS" bzImage >&2
  T_KBUILD=$(( $(date +%s) - t ))

  # PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY, owner "Xen"): without it a
  # VMM cannot boot the ELF vmlinux directly in 32-bit protected mode.
  # (Captured first: `readelf | grep -q` can die of SIGPIPE under pipefail.)
  notes=$(readelf -n "$OBJ/vmlinux")
  grep -q 'Xen' <<<"$notes" || die "vmlinux has no PVH (Xen) ELF note"

  tmp=$(mktemp -d "$CACHE/kernel/.tmp.XXXXXX")
  cp "$OBJ/vmlinux" "$tmp/vmlinux"
  cp "$OBJ/arch/x86/boot/bzImage" "$tmp/bzImage"
  cp "$OBJ/.config" "$tmp/config"
  {
    echo "kernel_release=$("${KMAKE[@]}" kernelrelease)"
    echo "kernel_hash=$KHASH"
    echo "linux_source=$LINUX_PKG $LINUX_VER"
    echo "patches=$(for p in "${PATCHES[@]}"; do printf '%s ' "$(basename "$p")"; done)"
    echo "compiler=$(gcc --version | sed -n 1p)"
    echo "kernel_build_jobs=$JOBS"
    echo "kernel_build_nproc=$(nproc)"
    echo "kernel_extract_seconds=$T_EXTRACT"
    echo "kernel_config_seconds=$T_CONFIG"
    echo "kernel_build_seconds=$T_KBUILD"
    echo "kernel_built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  } > "$tmp/kernel-info.txt"
  chmod a-w "$tmp"/*
  chmod 755 "$tmp"
  rm -rf "$KENTRY"          # an incomplete entry from an older layout, if any
  mv -T "$tmp" "$KENTRY"
  rm -rf "$SRC" "$OBJ"
  log "kernel built in ${T_KBUILD}s"
fi

# ---------------------------------------------------------------- root file system
t=$(date +%s)
ROOT=$WORK/root
rm -rf "$ROOT"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,mnt,root,etc}
chmod 1777 "$ROOT/tmp"
chmod 700 "$ROOT/root"
cp "$BUSYBOX" "$ROOT/bin/busybox"
install -m 755 "$SNAP/init" "$ROOT/init"
# An ext4 root is started through the kernel's default /sbin/init (no
# init= needed); an initramfs through /init. Both are our script.
ln -s /init "$ROOT/sbin/init"
# Applet links made here, not with `busybox --install` at boot: in the guest
# every instruction is emulated. linuxrc is left out (old-initrd only).
while IFS= read -r a; do
  case "$a" in linuxrc|"") continue ;; esac
  [ -e "$ROOT/$a" ] || [ -L "$ROOT/$a" ] || ln -s /bin/busybox "$ROOT/$a"
done < <("$BUSYBOX" --list-full)
[ -L "$ROOT/bin/sh" ] || die "busybox has no sh applet"
echo 'root:x:0:0:root:/root:/bin/sh' > "$ROOT/etc/passwd"
echo 'root:x:0:' > "$ROOT/etc/group"
# init mounts all of these with a single `mount -a`.
cat > "$ROOT/etc/fstab" <<'EOF'
proc      /proc  proc      nosuid,nodev,noexec  0 0
sysfs     /sys   sysfs     nosuid,nodev,noexec  0 0
devtmpfs  /dev   devtmpfs  nosuid               0 0
tmpfs     /tmp   tmpfs     nosuid,nodev         0 0
EOF
# No device nodes are needed in the image: the kernel opens /dev/console
# before it mounts the root (its built-in initramfs has one), and /dev is
# devtmpfs.

tmp=$(mktemp -d "$CACHE/.tmp.XXXXXX")
# mkfs.ext4 -d copies the tree into the new file system (no loop mount, no
# root needed). Files keep the builder's uid: run as root for 0:0 owners.
mkfs.ext4 -q -F -L ringvm-root -d "$ROOT" "$tmp/rootfs.ext4" "${ROOTFS_MIB}M" >/dev/null
# newc cpio with names relative to the root ("init", not "./init"), owned by
# root, in a stable order; gzip -n keeps timestamps out of the archive.
( cd "$ROOT" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --quiet ) | gzip -9 -n > "$tmp/initramfs.cpio.gz"
T_ROOTFS=$(( $(date +%s) - t ))

# ---------------------------------------------------------------- cache entry
# Hardlinks inside the cache are safe: both sides are read-only entries.
for f in vmlinux bzImage config; do ln "$KENTRY/$f" "$tmp/$f" 2>/dev/null || cp "$KENTRY/$f" "$tmp/$f"; done
{
  echo "# ringvm test guest, built by resources/guest/build.sh"
  echo "hash=$HASH"
  cat "$KENTRY/kernel-info.txt"
  echo "kernel_from_cache=$KERNEL_FROM_CACHE"
  echo "busybox_static=$BUSYBOX_VER"
  echo "rootfs_mib=$ROOTFS_MIB"
  echo "rootfs_seconds=$T_ROOTFS"
  echo "total_seconds=$(( $(date +%s) - T_START ))"
  echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$tmp/build-info.txt"
chmod a-w "$tmp"/*
chmod 755 "$tmp"      # mktemp made it 0700
# The entry appears in one rename, complete: an interrupted build leaves only
# a .tmp.* directory, which the next build deletes.
rm -rf "$ENTRY"
mv -T "$tmp" "$ENTRY"
rm -rf "$WORK"

install_outputs "built ${HASH:0:12}"
exit 0
}
