#!/usr/bin/env bash
# The image, built and run (issue 22): docker/Dockerfile is built on a private Docker
# engine and its containers run against the machine's real PostgreSQL and Redis.
#
#  1. Engine: installs Debian's docker.io and debootstrap if missing (root, apt-get),
#     starts a private dockerd (own data root, exec root, socket and pidfile in a temp
#     dir; no iptables, no bridge, so the host network is left alone) and stops it at
#     exit, by its PID.
#  2. Base: python:3.11-slim-bookworm when Docker Hub answers; otherwise a stand-in
#     from Debian packages (debootstrap → docker import → docker/base-debian.Dockerfile),
#     its root file system cached per day under /var/cache/scanqueue-docker/.
#  3. Build: docker/Dockerfile with BASE_IMAGE set to that base, host networking for
#     the downloads, and the host's CA bundle as a build secret (PyPI is reached
#     through a TLS-inspecting proxy here); then checks the image: size, no compiler,
#     no secret in `docker history`, OCI labels, non-root user, nothing writable
#     outside /data.
#  4. Run, all on host networking and loopback only, in a throwaway database and a
#     Redis db number of its own: `release` (scanqueue db upgrade), a worker and web;
#     a scan posted to the API completes; the worker's HEALTHCHECK turns healthy;
#     `docker stop` of the worker while it holds a slow scan exits 0 within the
#     30 s grace and the scan is back to `queued`; a second worker picks it up.
#  5. Compose: docker/compose.yaml is validated (`docker-compose config`, with a
#     structural check in Python for the keys that Debian's Compose v1 predates).
#
# Without CI=true a machine that cannot run an engine skips with a reason (and
# SCANQUEUE_SKIP_DOCKER=1 skips on purpose); with CI=true both fail the run.
# Knobs: SCANQUEUE_BASE_IMAGE (skip the base step), SCANQUEUE_DOCKER_CACHE,
# SCANQUEUE_DEBIAN_MIRROR and SCANQUEUE_DEBIAN_SECURITY_MIRROR, SCANQUEUE_DOCKER_KEEP=1 (keep the temp dir for a look).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
START=$SECONDS

say() { printf '[test-docker +%3ds] %s\n' "$((SECONDS - START))" "$*"; }
unavailable() {
  if [ "${CI:-}" = true ]; then
    say "FAIL (CI=true): $*"
    exit 1
  fi
  say "SKIP: $*"
  exit 0
}
CHECKS=0
ok() {
  CHECKS=$((CHECKS + 1))
  say "ok: $*"
}
fail() {
  say "FAIL: $*"
  exit 1
}

if [ "${SCANQUEUE_SKIP_DOCKER:-}" = 1 ]; then
  [ "${CI:-}" = true ] && fail "SCANQUEUE_SKIP_DOCKER=1 is not honoured with CI=true"
  say "SKIP: SCANQUEUE_SKIP_DOCKER=1"
  exit 0
fi

# -- 1. the engine -------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || unavailable "a private dockerd needs root (this is uid $(id -u))"
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null \
  || [ ! -x /usr/bin/docker ]; then
  command -v apt-get >/dev/null || unavailable "no dockerd/debootstrap and no apt-get to install them"
  say "installing docker.io and debootstrap (apt-get)"
  {
    apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        docker.io debootstrap
  } >/tmp/scanqueue-docker-apt.log 2>&1 ||
    { tail -20 /tmp/scanqueue-docker-apt.log; unavailable "apt-get could not install docker.io"; }
fi
# Debian's client: it matches the engine and has BuildKit built in (a newer client
# elsewhere on PATH may want a buildx plugin that is not installed).
DOCKER_CLI=${DOCKER_CLI:-/usr/bin/docker}
export DOCKER_BUILDKIT=1

WORK=$(mktemp -d /tmp/scanqueue-docker.XXXXXX)
SOCK=$WORK/docker.sock
export DOCKER_HOST=unix://$SOCK
d() { "$DOCKER_CLI" "$@"; }

DOCKERD_PID=
DB_NAME=
REDIS_DB=${SCANQUEUE_DOCKER_REDIS_DB:-13}
QUEUE=docker-test-$$
CONTAINERS=()
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ "$rc" != 0 ] && [ -n "$DOCKERD_PID" ]; then
    for c in "${CONTAINERS[@]}"; do
      say "--- last log lines of $c"
      d logs --tail 25 "$c" 2>&1 | sed 's/^/    /'
    done
  fi
  for c in "${CONTAINERS[@]}"; do d rm -f -v "$c" >/dev/null 2>&1; done
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    kill -TERM "$DOCKERD_PID"
    for _ in $(seq 1 40); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && { say "dockerd did not stop: SIGKILL"; kill -KILL "$DOCKERD_PID"; }
    wait "$DOCKERD_PID" 2>/dev/null
  fi
  if [ -n "$DB_NAME" ]; then
    psql -q -h 127.0.0.1 -U postgres -d postgres \
      -c "DROP DATABASE IF EXISTS \"$DB_NAME\" WITH (FORCE)" >/dev/null 2>&1
    { redis-cli -h 127.0.0.1 -n "$REDIS_DB" --scan --pattern "*$QUEUE*"; echo _kombu.binding_deadlines; } 2>/dev/null |
      xargs -r redis-cli -h 127.0.0.1 -n "$REDIS_DB" del >/dev/null 2>&1
  fi
  # Whatever dockerd left mounted under the temp dir goes before the dir does.
  findmnt -rn -o TARGET | grep "^$WORK/" | sort -r | xargs -r -n1 umount -l 2>/dev/null
  if [ "${SCANQUEUE_DOCKER_KEEP:-}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
  say "done in $((SECONDS - START)) s (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting a private dockerd in $WORK"
dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
  --host "unix://$SOCK" --iptables=false --ip6tables=false --ip-masq=false --bridge=none \
  --log-level=warn >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 1 60); do
  d version >/dev/null 2>&1 && break
  kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$WORK/dockerd.log"; unavailable "dockerd exited at start"; }
  sleep 0.5
done
d version >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; unavailable "dockerd did not answer in 30 s"; }
say "engine $(d version -f '{{.Server.Version}}'), storage $(d info -f '{{.Driver}}')"

# -- 2. the base ---------------------------------------------------------------------------
OFFICIAL_BASE=python:3.11-slim-bookworm
BASE_IMAGE=${SCANQUEUE_BASE_IMAGE:-}
if [ -z "$BASE_IMAGE" ]; then
  if timeout 60 "$DOCKER_CLI" pull -q "$OFFICIAL_BASE" >"$WORK/pull.log" 2>&1; then
    BASE_IMAGE=$OFFICIAL_BASE
    say "base: $OFFICIAL_BASE pulled"
  else
    say "base: $OFFICIAL_BASE cannot be pulled ($(tail -c 160 "$WORK/pull.log" | tr '\n' ' ')); building it from Debian packages"
    CACHE=${SCANQUEUE_DOCKER_CACHE:-/var/cache/scanqueue-docker}
    MIRROR=${SCANQUEUE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
    SECURITY_MIRROR=${SCANQUEUE_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
    INCLUDE=python3,python3-venv,ca-certificates
    KEY=$(printf '%s %s %s v3' "$INCLUDE" "$MIRROR" "$SECURITY_MIRROR" | sha256sum | cut -c1-8)
    TARBALL=$CACHE/rootfs-bookworm-$KEY-$(date -u +%Y%m%d).tar
    mkdir -p "$CACHE"
    if [ -s "$TARBALL" ]; then
      say "root file system from the cache: $TARBALL"
    else
      say "debootstrap bookworm (minbase + $INCLUDE) from $MIRROR"
      ROOTFS=$WORK/rootfs
      debootstrap --variant=minbase --include="$INCLUDE" bookworm "$ROOTFS" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap failed"; }
      # Security and stable updates, as the official image has them (debootstrap takes
      # the release alone).
      printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
        "$MIRROR" "$MIRROR" "$SECURITY_MIRROR" >"$ROOTFS/etc/apt/sources.list"
      if { chroot "$ROOTFS" apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive chroot "$ROOTFS" apt-get -y -q upgrade; } >"$WORK/upgrade.log" 2>&1; then
        say "updates: $(grep -c '^Setting up' "$WORK/upgrade.log") packages upgraded"
      else
        tail -5 "$WORK/upgrade.log"
        say "WARNING: apt-get upgrade failed in the new root file system: the base has no updates"
      fi
      # What an image needs no copy of; the builder stage's apt-get update refetches lists.
      rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/lib/apt/lists/* \
        "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
      tar -C "$ROOTFS" --numeric-owner -cf "$TARBALL.part" . && mv "$TARBALL.part" "$TARBALL"
      rm -rf "$ROOTFS"
      find "$CACHE" -maxdepth 1 -name 'rootfs-*.tar' ! -path "$TARBALL" -delete
      say "cached $TARBALL ($(du -m "$TARBALL" | cut -f1) MB)"
    fi
    d import "$TARBALL" scanqueue-rootfs:bookworm >/dev/null
    d build -q --network none -t scanqueue-base:bookworm \
      --build-arg ROOTFS_IMAGE=scanqueue-rootfs:bookworm - <docker/base-debian.Dockerfile >/dev/null
    BASE_IMAGE=scanqueue-base:bookworm
    say "base: $BASE_IMAGE, Debian's $(d run --rm --network none "$BASE_IMAGE" python --version)"
  fi
fi

# -- 3. the image --------------------------------------------------------------------------
IMAGE=scanqueue:test
BUILD_ARGS=(--network host -f docker/Dockerfile -t "$IMAGE" --progress plain
  --build-arg "BASE_IMAGE=$BASE_IMAGE"
  --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
  --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
CA_BUNDLE=${SCANQUEUE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
[ -s "$CA_BUNDLE" ] && BUILD_ARGS+=(--secret "id=ca-bundle,src=$CA_BUNDLE")
say "building $IMAGE from $BASE_IMAGE"
T0=$SECONDS
d build "${BUILD_ARGS[@]}" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; fail "docker build failed"; }
grep -E '^#[0-9]+ (\[|DONE)' "$WORK/build.log" | grep -v '^#[0-9]* DONE 0\.0s' | sed 's/^/    /' | tail -40
BUILD_S=$((SECONDS - T0))
SIZE_MB=$(($(d image inspect -f '{{.Size}}' "$IMAGE") / 1000000))
BASE_MB=$(($(d image inspect -f '{{.Size}}' "$BASE_IMAGE") / 1000000))
ok "built in $BUILD_S s: $IMAGE is $SIZE_MB MB ($BASE_MB MB of it the base, $((SIZE_MB - BASE_MB)) MB scanqueue and its dependencies)"

# A container for one-off checks: the image as it is, no network.
inimage() { d run --rm --network none "$IMAGE" sh -c "$1"; }

[ "$(inimage 'command -v gcc cc c++ make || true')" = "" ] || fail "a compiler is in the final image"
# (BuildKit 20.10 leaves the bind mount's target, /wheels, as an empty directory.)
leftovers=$(inimage 'ls -d /wheels/* /src /run/secrets/* 2>/dev/null || true')
[ -z "$leftovers" ] || fail "in the final image: $leftovers"
ok "no compiler, no wheels, sources or build secret in the final image"

d history --no-trunc --format '{{.CreatedBy}}' "$IMAGE" >"$WORK/history.txt"
if grep -Eiq 'BEGIN CERTIFICATE|PRIVATE KEY|(PASSWORD|TOKEN|SECRET)=[^ $]' "$WORK/history.txt"; then
  grep -Ei 'BEGIN CERTIFICATE|PRIVATE KEY|(PASSWORD|TOKEN|SECRET)=' "$WORK/history.txt"
  fail "docker history shows a secret"
fi
d image inspect -f '{{json .Config.Env}}' "$IMAGE" >"$WORK/env.json"
grep -Eiq 'PASSWORD|TOKEN|SECRET|PIP_CERT|ca-bundle' "$WORK/env.json" &&
  fail "the image's environment holds a secret or the build's CA setting: $(cat "$WORK/env.json")"
ok "no secret in docker history ($(wc -l <"$WORK/history.txt") layers) or in the image's environment"

for label in title version revision created licenses base.name; do
  value=$(d image inspect -f "{{index .Config.Labels \"org.opencontainers.image.$label\"}}" "$IMAGE")
  [ -n "$value" ] && [ "$value" != unknown ] || fail "label org.opencontainers.image.$label is '$value'"
done
ok "OCI labels: $(d image inspect -f '{{range $k, $v := .Config.Labels}}{{$k}} {{end}}' "$IMAGE")"

[ "$(d image inspect -f '{{.Config.User}}' "$IMAGE")" = 10001:10001 ] || fail "USER is not 10001:10001"
[ "$(inimage 'id -u'):$(inimage 'id -g')" = 10001:10001 ] || fail "the container does not run as 10001:10001"
# Writable by the image's user: /data, and (as in every Debian image) the world-writable
# /tmp and /var/tmp; nothing else. With --read-only and a volume on /data, as the
# containers below run: /data alone.
WRITES='for p in / /etc /app /usr/local/bin /usr/local/lib/python3.11/site-packages /usr/local/lib/python3.11/site-packages/scanqueue /var /tmp /var/tmp /data; do
  if touch "$p/.w" 2>/dev/null; then rm -f "$p/.w"; echo "$p"; fi; done'
writable=$(inimage "$WRITES" | tr '\n' ' ')
[ "$writable" = "/tmp /var/tmp /data " ] || fail "writable by uid 10001: $writable"
writable=$(d run --rm --network none --read-only -v "sqd-probe-$$:/data" "$IMAGE" sh -c "$WRITES" | tr '\n' ' ')
d volume rm "sqd-probe-$$" >/dev/null
[ "$writable" = "/data " ] || fail "writable with --read-only: $writable"
ok "runs as uid:gid 10001:10001; writable: /data, /tmp, /var/tmp (world-writable); with --read-only only /data"

# -- 4. release, worker, web against PostgreSQL and Redis ----------------------------------
pg_isready -q -h 127.0.0.1 || fail "PostgreSQL does not answer on 127.0.0.1:5432"
redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 || fail "Redis does not answer on 127.0.0.1:6379"
DB_NAME=scanqueue_docker_$$
psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE \"$DB_NAME\"" >/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
WEB_PORT=$(free_port)
TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
API=http://127.0.0.1:$WEB_PORT/api/v1

# The test's runner, mounted read-only (the image ships only the stub): scans of user
# "slow" wait 600 s (until the run is stopped); the others take 1 s.
mkdir -p "$WORK/runner"
cat >"$WORK/runner/sq_docker_runner.py" <<'EOF'
from scanqueue import ScanResult


def run(job, ctx):
    ctx.wait(600.0 if job.triggered_by_user == "slow" else 1.0)
    return ScanResult(findings_count=len(job.providers_scanned))
EOF
chmod -R a+rX "$WORK/runner"

COMMON=(--network host --read-only
  -e "DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB_NAME"
  -e "REDIS_URL=redis://127.0.0.1:6379/$REDIS_DB"
  -e "SCANQUEUE_QUEUE=$QUEUE"
  -e SCANQUEUE_CONNECT_TIMEOUT=30)

say "release: scanqueue db upgrade"
d run --rm "${COMMON[@]}" "$IMAGE" scanqueue db upgrade >"$WORK/release.log" 2>&1 ||
  { cat "$WORK/release.log"; fail "release (scanqueue db upgrade) failed"; }
ok "release: scanqueue db upgrade exited 0"

start_worker() { # name [docker run options]: the image's own CMD, HEALTHCHECK and stop behaviour
  CONTAINERS+=("$1")
  d run -d --name "$1" --init "${COMMON[@]}" -v "$1-data:/data" "${@:2}" \
    -v "$WORK/runner:/opt/sqd-runner:ro" -e PYTHONPATH=/app:/opt/sqd-runner \
    -e SCANQUEUE_RUNNER=sq_docker_runner:run \
    -e SCANQUEUE_CONCURRENCY=1 -e SCANQUEUE_MAX_CONCURRENCY=2 \
    -e "SCANQUEUE_METRICS_PORT=$(free_port)" -e SCANQUEUE_METRICS_ADDR=127.0.0.1 \
    "$IMAGE" >/dev/null
}
start_worker sqd-worker-1-$$
WORKER1=sqd-worker-1-$$
CONTAINERS+=("sqd-web-$$")
# web as compose runs it (its health check is compose's), bound to loopback here since
# it shares the host's network.
d run -d --name "sqd-web-$$" --init "${COMMON[@]}" -v "sqd-web-$$-data:/data" \
  -e "PORT=$WEB_PORT" -e "SCANQUEUE_API_TOKEN=$TOKEN" \
  --health-cmd "python -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:$WEB_PORT/healthz', timeout=4).read(1)\"" \
  --health-interval 2s --health-timeout 5s --health-retries 3 \
  "$IMAGE" scanqueue serve --host 127.0.0.1 >/dev/null

health() { d inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$1"; }
wait_healthy() { # container seconds
  local until=$((SECONDS + $2))
  while [ $SECONDS -lt $until ]; do
    [ "$(health "$1")" = healthy ] && return 0
    [ "$(d inspect -f '{{.State.Running}}' "$1")" = true ] || fail "$1 exited: $(d inspect -f '{{.State.ExitCode}}' "$1")"
    sleep 1
  done
  fail "$1 is $(health "$1") after $2 s"
}
api() { # method path [json] → body; the HTTP status in $WORK/status
  curl -sS -o "$WORK/body" -w '%{http_code}' -X "$1" -H "Authorization: Bearer $TOKEN" \
    ${3:+-H 'Content-Type: application/json' --data "$3"} "$API$2" >"$WORK/status"
  cat "$WORK/body"
}
field() { python3 -c "import json, sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }
wait_status() { # id status seconds
  local until=$((SECONDS + $3)) st=
  while [ $SECONDS -lt $until ]; do
    st=$(api GET "/scans/$1" | field status)
    [ "$st" = "$2" ] && return 0
    sleep 0.5
  done
  fail "scan $1 is '$st', not '$2', after $3 s"
}

wait_healthy "sqd-web-$$" 60
ok "web is healthy (/healthz)"
code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
  --data '{"providers": ["aws"]}' "$API/scans")
[ "$code" = 401 ] || fail "POST /api/v1/scans without the token answered $code, not 401"
SCAN=$(api POST /scans '{"providers": ["aws", "gcp"], "frameworks": ["soc2"], "user": "docker-test"}' | field id)
[ "$(cat "$WORK/status")" = 201 ] || fail "POST /api/v1/scans answered $(cat "$WORK/status")"
T0=$SECONDS
wait_status "$SCAN" completed 90
[ "$(api GET "/scans/$SCAN" | field findings_count)" = 2 ] || fail "scan $SCAN: findings_count is not 2"
ok "a scan POSTed to the API (401 without the token, 201 with it) completed in $((SECONDS - T0)) s"

wait_healthy "$WORKER1" 120
# Read-only root: Python's tempfile falls back to the working directory, /data.
metrics_dir=$(d exec "$WORKER1" sh -c 'ls -d /data/scanqueue-metrics-* 2>/dev/null' || true)
[ -n "$metrics_dir" ] || fail "the worker's metrics files are not in /data"
ok "the worker's HEALTHCHECK (the image's own: /metrics) turned healthy; its metrics files are in $metrics_dir"

SLOW=$(api POST /scans '{"providers": ["aws"], "user": "slow"}' | field id)
wait_status "$SLOW" running 60
sleep 1
say "docker stop -t 30 $WORKER1 (the grace of compose's stop_grace_period) with scan $SLOW running"
T0=$SECONDS
d stop -t 30 "$WORKER1" >/dev/null
STOP_S=$((SECONDS - T0))
EXIT=$(d inspect -f '{{.State.ExitCode}}' "$WORKER1")
[ "$EXIT" = 0 ] || fail "the worker exited $EXIT after docker stop (137 = SIGKILLed at the end of the grace)"
[ "$STOP_S" -lt 30 ] || fail "docker stop took $STOP_S s"
st=$(api GET "/scans/$SLOW" | field status)
[ "$st" = queued ] || fail "after the stop, scan $SLOW is '$st', not 'queued'"
d logs "$WORKER1" 2>&1 | grep -q "re-queued" || fail "the worker's log does not say it re-queued the scan"
ok "docker stop of a worker running a slow scan: exit 0 after $STOP_S s (< 30 s), the scan handed back (queued)"

# (Its soft shutdown is short: it only has to pick the handed-back scan up again.)
start_worker sqd-worker-2-$$ -e CELERY_SOFT_SHUTDOWN_TIMEOUT=2
WORKER2=sqd-worker-2-$$
wait_status "$SLOW" running 90
ATTEMPTS=$(api GET "/scans/$SLOW" | field attempts)
api POST "/scans/$SLOW/cancel" >/dev/null
wait_status "$SLOW" canceled 60
T0=$SECONDS
d stop -t 30 "$WORKER2" >/dev/null
[ "$(d inspect -f '{{.State.ExitCode}}' "$WORKER2")" = 0 ] || fail "the second worker did not exit 0"
d stop -t 10 "sqd-web-$$" >/dev/null
[ "$(d inspect -f '{{.State.ExitCode}}' "sqd-web-$$")" = 0 ] || fail "web did not exit 0 on docker stop"
ok "a second worker ran the handed-back scan again (attempts $ATTEMPTS), cancel over the API worked, worker and web stopped with exit 0 ($((SECONDS - T0)) s)"

# -- 5. compose ----------------------------------------------------------------------------
# Compose v2 (`docker compose`) is not in Debian bookworm; its docker-compose package is
# Compose v1 (1.29), whose schema predates two keys compose.yaml uses: top-level `name`
# and inline `configs: content` (v2.23.1). Those two are checked here in Python; v1
# checks the rest of the file (schema, interpolation, paths) with them left out. Every
# variable the file requires gets a dummy value. (tests/e2e/test_deploy.py checks content.)
COMPOSE_ENV=()
for var in $(grep -v '^ *#' docker/compose.yaml | grep -oE '\$\{[A-Z_]+:\?' | tr -d '${:?' | sort -u); do
  COMPOSE_ENV+=("$var=dummy")
done
if "$DOCKER_CLI" compose version >/dev/null 2>&1; then
  env "${COMPOSE_ENV[@]}" "$DOCKER_CLI" compose -f docker/compose.yaml config -q ||
    fail "docker compose config rejects docker/compose.yaml"
  ok "docker compose config: docker/compose.yaml is valid"
else
  if ! command -v docker-compose >/dev/null && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose \
      >"$WORK/apt-compose.log" 2>&1 || say "docker-compose (v1) did not install: $(tail -1 "$WORK/apt-compose.log")"
  fi
  python3 - "$WORK/compose-v1.yaml" <<'PY' || fail "docker/compose.yaml: name or configs malformed"
import sys

import yaml

doc = yaml.safe_load(open("docker/compose.yaml"))
name = doc.pop("name")
assert isinstance(name, str) and name.islower(), f"top-level name: {name!r}"
for key, config in doc["configs"].items():
    assert ("content" in config) != ("file" in config), f"configs.{key}: content or file, one"
    if "content" in config:
        content = config.pop("content")
        assert isinstance(yaml.safe_load(content), dict), f"configs.{key}.content: not YAML"
        config["file"] = "/dev/null"
yaml.safe_dump(doc, open(sys.argv[1], "w"), sort_keys=False)
PY
  if command -v docker-compose >/dev/null; then
    env "${COMPOSE_ENV[@]}" docker-compose --project-directory "$REPO/docker" \
      -f "$WORK/compose-v1.yaml" config -q 2>"$WORK/compose.err" ||
      { cat "$WORK/compose.err"; fail "docker-compose config rejects docker/compose.yaml"; }
    ok "docker/compose.yaml: docker-compose $(docker-compose version --short 2>/dev/null) config passes (name and configs.content checked in Python)"
  else
    ok "docker/compose.yaml: structure checked in Python only (no compose implementation installed)"
  fi
fi

say "image $IMAGE: $SIZE_MB MB, built in $BUILD_S s from $BASE_IMAGE"
echo "docker: $CHECKS passed, 0 failed"
