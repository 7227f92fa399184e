#!/usr/bin/env bash
# Unpack ONNX Runtime's C/C++ API headers into DEST/onnxruntime (usage: fetch_headers.sh DEST).
# grains-edge's kernels (grains_edge/kernels) need them to compile and the onnxruntime wheel ships none, so
# they come from Debian's libonnxruntime-dev (trixie), downloaded with a private apt state and unpacked:
# nothing is installed on the system. The sources are this machine's own Debian mirrors (with their signing
# options) at suite trixie (apt_sources.py); without one, or without the package there, it fails and `make`
# falls back to the stock kernels. The C API is backward compatible: these 1.21 headers serve the newer
# onnxruntime that pip installs.
set -euo pipefail
dest=$1
here=$(cd "$(dirname "$0")" && pwd)
marker=.unpacked-by-grains-edge  # DEST/onnxruntime is replaced only when it holds this (this script made it)
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || { echo "needs apt-get and dpkg-deb" >&2; exit 1; }
if [ -e "$dest/onnxruntime" ] && [ ! -f "$dest/onnxruntime/$marker" ]; then
  echo "$dest/onnxruntime was not unpacked by this script; fix: remove it yourself or pass another DEST" >&2
  exit 1
fi
work=$(mktemp -d)
staged="$dest/.onnxruntime.partial-$$"
trap 'rm -rf "$work" "$staged"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
"${PYTHON:-python3}" "$here/apt_sources.py" /etc/apt >"$work/trixie.sources"
[ -s "$work/trixie.sources" ] || { echo "no configured apt source is a Debian archive" >&2; exit 1; }
apt=(-o "Dir::Etc::sourcelist=$work/trixie.sources" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$work/lists"
  -o "Dir::Cache=$work/cache" -o "APT::Sandbox::User=$(id -un)")
apt-get "${apt[@]}" -qq update
(cd "$work" && apt-get "${apt[@]}" -qq download libonnxruntime-dev)
dpkg-deb -x "$work"/libonnxruntime-dev_*.deb "$work/root"
touch "$work/root/usr/include/onnxruntime/$marker"
mkdir -p "$dest"
cp -r "$work/root/usr/include/onnxruntime" "$staged"
rm -rf "$dest/onnxruntime"
mv "$staged" "$dest/onnxruntime"
