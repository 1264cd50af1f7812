#!/usr/bin/env bash
# Regenerates the Python stubs (messages, gRPC, type stubs) beside the protos.
# Usage: proto/generate.sh [OUT_DIR]   (default: proto/, i.e. in place)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
py="${PYTHON:-python}"
bindir="$(dirname "$(command -v "$py")")"
export PATH="$bindir:$PATH"
mkdir -p "$out"
"$py" -m grpc_tools.protoc -I"$here" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  "$here"/roundhouse/v1/*.proto
