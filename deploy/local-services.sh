#!/usr/bin/env bash
# Make sure the local PostgreSQL, Redis and RabbitMQ that the test suite talks to are up; start them if not.
set -euo pipefail

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  echo "starting PostgreSQL"
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  else
    echo "PostgreSQL is not running on 127.0.0.1:5432 and pg_ctlcluster is not available" >&2
    exit 1
  fi
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done
fi

rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! rabbit_up; then
  if command -v rabbitmq-server >/dev/null; then
    echo "starting RabbitMQ"
    rabbitmq-server -detached >/dev/null 2>&1 || true
    for _ in $(seq 60); do rabbit_up && break; sleep 1; done
  fi
  rabbit_up || echo "RabbitMQ is not reachable on 127.0.0.1:5672; the RabbitMQ broker test will fail" >&2
fi

# The deploy tests (tests/deploy) run promtool and the Prometheus server, and validate the compose file with
# `docker compose config` or, where that plugin is missing, Debian's docker-compose. Install what is missing.
missing=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || missing+=(docker-compose)
if ((${#missing[@]})); then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing Debian package(s) for the deploy tests: ${missing[*]}"
    # Keep the packages' init scripts from starting a Prometheus daemon during the install.
    added_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && added_policy=1
    fi
    apt_install() {
      DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    }
    apt_install || { apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null && apt_install; } || status=$?
    [ -n "$added_policy" ] && rm -f /usr/sbin/policy-rc.d
    if [ "${status:-0}" != 0 ]; then
      echo "could not install ${missing[*]}; the deploy tests that need them will fail" >&2
    fi
  else
    echo "missing ${missing[*]} (Debian packages) and cannot install them here; the deploy tests need them" >&2
  fi
fi

pg_isready -h 127.0.0.1 -p 5432
redis-cli -h 127.0.0.1 -p 6379 ping
