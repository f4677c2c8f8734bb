#!/usr/bin/env bash
# Generate the gRPC stubs from proto/*.proto into services/proto_gen/ (git-ignored, never edited by hand).
# The virtual import path makes the generated modules import each other as services.proto_gen.X_pb2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p services/proto_gen
touch services/proto_gen/__init__.py
"$PY" -m grpc_tools.protoc -Iservices/proto_gen=proto \
  --python_out=. --grpc_python_out=. --pyi_out=. \
  $(ls proto/*.proto | sed 's#^proto/#services/proto_gen/#')
