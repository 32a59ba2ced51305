#!/usr/bin/env bash
# Install the independent launch-digest oracle, AMD's / Virtee's Python tool
# `sev-snp-measure`, pinned, into a venv under out/ (from PyPI).
#   scripts/oracle.sh     prints the path of the sev-snp-measure binary
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/out/venv-oracle"
version=0.0.13
if ! "$venv/bin/sev-snp-measure" --version 2>/dev/null | grep -q "$version"; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "sev-snp-measure==$version" >&2
fi
echo "$venv/bin/sev-snp-measure"
