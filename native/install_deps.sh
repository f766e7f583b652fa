#!/usr/bin/env bash
# Installs what building the native gate needs (g++, pkg-config, protoc, gRPC C++ and protobuf
# headers) with the system's package manager, when they are missing and it can. Debian and Ubuntu
# (apt-get) only; elsewhere it says what to install and fails.
set -u
have() {
  command -v g++ >/dev/null && command -v protoc >/dev/null && command -v pkg-config >/dev/null \
    && pkg-config --exists grpc++ protobuf
}
have && exit 0
pkgs="g++ make pkg-config protobuf-compiler libprotobuf-dev libgrpc++-dev"
if ! command -v apt-get >/dev/null; then
  echo "native gate: install g++, pkg-config, protoc and gRPC C++ (packages like: $pkgs)" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    echo "native gate: as root, run: apt-get install -y $pkgs" >&2
    exit 1
  fi
fi
echo "native gate: installing $pkgs" >&2
$sudo apt-get update -q >/dev/null || true
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends $pkgs >/dev/null && have
