#!/usr/bin/env bash
# Installs the csvfs binaries under the names mount(8), mkfs(8) and fsck(8) look for:
# mkfs.csvfs, fsck.csvfs and mount.csvfs (cargo cannot name a binary with a dot).
# Usage: bash tools/install.sh [PREFIX]   (default PREFIX: /usr/local; helpers go to PREFIX/sbin)
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:-/usr/local}"
cargo build --release -p csvfs -p csvfs-tools -p hv-runner
install -d "$prefix/sbin" "$prefix/bin"
install -m 0755 target/release/mkfs-csvfs "$prefix/sbin/mkfs.csvfs"
install -m 0755 target/release/fsck-csvfs "$prefix/sbin/fsck.csvfs"
install -m 0755 target/release/csvfs "$prefix/bin/csvfs"
install -m 0755 target/release/hv-runner "$prefix/bin/hv-runner"
# mount -t csvfs runs mount.csvfs, which is the csvfs binary called by that name.
ln -sf "$prefix/bin/csvfs" "$prefix/sbin/mount.csvfs"
echo "installed mkfs.csvfs, fsck.csvfs, mount.csvfs in $prefix/sbin; csvfs, hv-runner in $prefix/bin" >&2
