#!/usr/bin/env bash
# Unpack ONNX Runtime's C/C++ API headers into DEST/onnxruntime (usage: fetch_headers.sh DEST).
# grains-edge's kernels (grains_edge/kernels) need them to compile and the onnxruntime wheel ships none, so
# they come from Debian's libonnxruntime-dev (trixie), downloaded with a private apt state and unpacked:
# nothing is installed on the system. The C API is backward compatible: these 1.21 headers serve the
# newer onnxruntime that pip installs.
set -euo pipefail
dest=$1
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || { echo "needs apt-get and dpkg-deb" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo "deb http://deb.debian.org/debian trixie main" >"$work/sources.list"
apt=(-o "Dir::Etc::sourcelist=$work/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$work/lists"
  -o "Dir::Cache=$work/cache" -o "APT::Sandbox::User=$(id -un)")
apt-get "${apt[@]}" -qq update
(cd "$work" && apt-get "${apt[@]}" -qq download libonnxruntime-dev)
dpkg-deb -x "$work"/libonnxruntime-dev_*.deb "$work/root"
mkdir -p "$dest"
rm -rf "$dest/onnxruntime"
cp -r "$work/root/usr/include/onnxruntime" "$dest/"
