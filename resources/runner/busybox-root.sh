#!/usr/bin/env bash
# A minimal root directory for `ringvm --root-share DIR -- CMD` tests:
# Debian's busybox-static and its applet links, nothing else.
#
#   resources/runner/busybox-root.sh OUT
#
# The runner tests boot with it instead of the host's / because guest user
# space may run in KVM's instruction emulator (PVM-native KVM, ~1.6 us per
# instruction), where the dynamic loader of a host binary costs seconds;
# a static busybox starts at once. Rebuilt only when busybox changes.
set -euo pipefail
OUT=${1:?usage: busybox-root.sh OUT}
BUSYBOX=/bin/busybox
"$BUSYBOX" --list >/dev/null || { echo "busybox-root: $BUSYBOX does not run (package busybox-static)" >&2; exit 1; }
if readelf -l "$BUSYBOX" | grep -q INTERP; then
  echo "busybox-root: $BUSYBOX is dynamically linked (install busybox-static)" >&2
  exit 1
fi
STAMP=$OUT/.busybox-version
VERSION=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || sha256sum "$BUSYBOX" | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$VERSION" ]; then
  exit 0
fi
rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,root}
chmod 1777 "$OUT.tmp/tmp"
cp "$BUSYBOX" "$OUT.tmp/bin/busybox"
while IFS= read -r a; do
  case "$a" in linuxrc|"") continue ;; esac
  [ -e "$OUT.tmp/$a" ] || [ -L "$OUT.tmp/$a" ] || ln -s /bin/busybox "$OUT.tmp/$a"
done < <("$BUSYBOX" --list-full)
echo 'root:x:0:0:root:/root:/bin/sh' > "$OUT.tmp/etc/passwd"
echo 'root:x:0:' > "$OUT.tmp/etc/group"
echo "$VERSION" > "$OUT.tmp/.busybox-version"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
echo "busybox-root: $OUT ready" >&2
