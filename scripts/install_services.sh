#!/usr/bin/env bash
# Installs the real services the tests start on 127.0.0.1 (redis-server, prometheus, promtool).
# Idempotent; runs apt-get only when something is missing.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install_services: the integration tests need ${missing[*]}; install them as root with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    echo "(or run 'make test-unit': the unit tests need no service, no root and no model file)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The Debian packages start system services; the tests run their own on random ports.
  (service redis-server stop || true) >/dev/null 2>&1
  (service prometheus stop || true) >/dev/null 2>&1
fi
