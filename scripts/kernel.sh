#!/usr/bin/env bash
# Build the UVM kernel: Debian 13's linux-source-6.12 (pinned in
# kernel-config/source.env), tinyconfig + kernel-config/*.config merged with
# olddefconfig, every requested option checked, cached by a hash of the inputs.
#
#   scripts/kernel.sh OUT_DIR       writes OUT_DIR/vmlinuz and OUT_DIR/kernel.config
#   scripts/kernel.sh --latest      prints the versions the archive serves now
#
# Environment: PARMA_IMAGE (the parma-image binary, for the config check),
# PARMA_CACHE (default ~/.cache/parma), JOBS (default nproc).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../kernel-config/source.env
source "$root/kernel-config/source.env"
cache=${PARMA_CACHE:-$HOME/.cache/parma}
jobs=${JOBS:-$(nproc)}

# A private apt configuration for Debian 13: the machine's own sources and
# lists are never touched.
apt_dir="$cache/apt-trixie"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
  -o Dir::State::status=/dev/null -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
keys=/usr/share/keyrings/debian-archive-trixie-stable.gpg,/usr/share/keyrings/debian-archive-trixie-automatic.gpg,/usr/share/keyrings/debian-archive-trixie-security-automatic.gpg

apt_update() {
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  : >"$apt_dir/sources.list"
  for suite in $LINUX_SOURCE_SUITES; do
    case $suite in
      *-security) url=http://deb.debian.org/debian-security ;;
      *) url=http://deb.debian.org/debian ;;
    esac
    echo "deb [signed-by=$keys] $url $suite main" >>"$apt_dir/sources.list"
  done
  apt-get "${apt_opts[@]}" -qq update
}

if [ "${1:-}" = --latest ]; then
  apt_update
  apt-cache "${apt_opts[@]}" policy "$LINUX_SOURCE_PACKAGE"
  exit 0
fi
out=${1:?usage: scripts/kernel.sh OUT_DIR | --latest}
: "${PARMA_IMAGE:?set PARMA_IMAGE to the parma-image binary (make image does)}"

fragments=("$root"/kernel-config/*.config)
key=$(cat "$root/kernel-config/source.env" "${fragments[@]}" "$0" <(gcc --version | head -1) |
  sha256sum | cut -c1-16)
build="$cache/kernel/$key"
mkdir -p "$out"

if [ -f "$build/bzImage" ] && [ -f "$build/kernel.config" ]; then
  echo "kernel: cached build $key ($LINUX_SOURCE_PACKAGE $LINUX_SOURCE_VERSION)"
else
  deb="$cache/dl/${LINUX_SOURCE_PACKAGE}_${LINUX_SOURCE_VERSION}_all.deb"
  if [ ! -f "$deb" ] || ! echo "$LINUX_SOURCE_SHA256  $deb" | sha256sum -c --quiet - 2>/dev/null; then
    apt_update
    mkdir -p "$cache/dl"
    rm -f "$deb"
    if ! (cd "$cache/dl" && apt-get "${apt_opts[@]}" -qq download \
      "$LINUX_SOURCE_PACKAGE=$LINUX_SOURCE_VERSION"); then
      candidate=$(apt-cache "${apt_opts[@]}" policy "$LINUX_SOURCE_PACKAGE" |
        awk '/Candidate:/ {print $2}')
      echo "kernel: the archive no longer serves $LINUX_SOURCE_PACKAGE=$LINUX_SOURCE_VERSION;" \
        "move kernel-config/source.env to $candidate (version and sha256 together)" >&2
      exit 1
    fi
    if ! echo "$LINUX_SOURCE_SHA256  $deb" | sha256sum -c --quiet -; then
      echo "kernel: $deb does not have the sha256 pinned in kernel-config/source.env" >&2
      exit 1
    fi
  fi

  work="$cache/kernel/$key.work"
  rm -rf "$work"
  mkdir -p "$work"
  echo "kernel: unpacking $LINUX_SOURCE_PACKAGE $LINUX_SOURCE_VERSION"
  dpkg -x "$deb" "$work/deb"
  tar -C "$work" -xf "$work/deb/usr/src/$LINUX_SOURCE_PACKAGE.tar.xz"
  rm -rf "$work/deb"
  src="$work/$LINUX_SOURCE_PACKAGE"

  # Fixed build identity, so the same inputs give the same bzImage.
  export KBUILD_BUILD_TIMESTAMP="1970-01-01" KBUILD_BUILD_USER=parma \
    KBUILD_BUILD_HOST=parma KBUILD_BUILD_VERSION=1
  make -C "$src" -s tinyconfig
  "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "${fragments[@]}" >/dev/null
  make -C "$src" -s olddefconfig
  "$PARMA_IMAGE" kconfig-check --config "$src/.config" "${fragments[@]}"
  echo "kernel: building bzImage with $jobs jobs (about 7 minutes on 2 cores)"
  make -C "$src" -s -j"$jobs" bzImage
  cp "$src/arch/x86/boot/bzImage" "$work/bzImage"
  cp "$src/.config" "$work/kernel.config"
  make -C "$src" -s kernelrelease >"$work/kernel.release"
  echo "$LINUX_SOURCE_PACKAGE $LINUX_SOURCE_VERSION" >"$work/source.version"
  rm -rf "$build" "$src"
  mv "$work" "$build"
fi

cp "$build/bzImage" "$out/vmlinuz"
cp "$build/kernel.config" "$out/kernel.config"
cp "$build/kernel.release" "$out/kernel.release"
cp "$build/source.version" "$out/kernel.source"
