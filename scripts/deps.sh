#!/usr/bin/env bash
# Install what building and testing the UVM needs on Debian 12, as root,
# from Debian's archive and rustup only. Safe to run again: it installs only
# what is missing.
set -euo pipefail

packages=(
  # QEMU to boot the UVM (TCG here, KVM/SNP on real hosts).
  qemu-system-x86
  # Kernel build.
  bc bison flex libelf-dev libssl-dev make gcc xz-utils
  # The Debian 13 archive keys, to fetch the pinned kernel source.
  debian-archive-keyring
  # Static glibc for the guest binaries.
  libc6-dev
  # Independent checkers the layer tests compare against: veritysetup, e2fsck, debugfs.
  cryptsetup-bin e2fsprogs
  # sha256sum and friends (the policy hash is checked against it).
  coreutils
  # Fragment issuer keys and signatures, as docs/policy.md makes them.
  openssl
  # Debian's OVMF.fd (launch digests without a kernel) and venvs for the
  # launch-digest oracle from PyPI.
  ovmf python3-venv
  # The test container image's shell tools (a static /bin/busybox).
  busybox-static
  # protoc: the gRPC bindings of containerd's snapshot and content services are generated at build.
  protobuf-compiler
  # The Kubernetes tests start their own containerd (CRI, runc for nothing but its presence), a
  # registry filled by skopeo, and CNI's bridge, all in a temporary directory and network namespace.
  containerd runc containernetworking-plugins docker-registry skopeo
  # An independent JOSE implementation the KBS crate's JWE is checked against.
  python3-jwcrypto
)

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps: missing ${missing[*]}; run as root (or install them) first" >&2
    exit 1
  fi
  echo "deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "deps: cargo not found; install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi
# rust-vmm's vhost-user vsock backend: the tests reach the agent's vsock
# listener through it, since this kind of host has no /dev/vhost-vsock.
if ! command -v vhost-device-vsock >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/vhost-device-vsock" ]; then
  echo "deps: installing vhost-device-vsock 0.3.0 (cargo install)"
  cargo install --locked --quiet vhost-device-vsock --version 0.3.0
fi
if command -v rustup >/dev/null; then
  for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
  done
fi
