#!/usr/bin/env bash
# Set thyrocad up on a fresh Debian/Ubuntu machine: DICOM peers, Prometheus and chromium
# for the tests, a virtual environment with the package. With --services it
# also installs (if missing) and starts PostgreSQL and Redis on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

with_services=0
[ "${1:-}" = "--services" ] && with_services=1

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: please install: ${missing[*]} (needs root)" >&2; return 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

if command -v apt-get >/dev/null 2>&1; then
  apt_install dcmtk orthanc prometheus openssl chromium iproute2  # iproute2: ip netns, for test_multihost
  [ $with_services -eq 1 ] && apt_install postgresql redis-server
fi

if [ $with_services -eq 1 ]; then
  if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
    for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
  fi
  if ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
    for _ in $(seq 30); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 0.5; done
  fi
  # The tests create throwaway databases; the 'test' database is their template of access.
  psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" \
    | grep -q 1 || psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE test"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
# pynetdicom installs its own storescu, findscu, echoscu… into .venv/bin: with the venv
# activated they shadow dcmtk's tools of the same names, which take other options.
if command -v /usr/bin/storescu >/dev/null 2>&1; then
  echo "setup: note: .venv/bin/storescu (and findscu, echoscu…) are pynetdicom's; dcmtk's are /usr/bin/storescu…"
fi
echo "setup: ready (.venv)"
