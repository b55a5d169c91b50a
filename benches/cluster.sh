#!/usr/bin/env bash
# Cluster benchmark (BENCHMARKS.md, "Cluster"): three release nodes on this machine sharing one
# Redis (127.0.0.1:6379, its own key prefix) and one PostgreSQL database, driven by
# presenced-load. Usage: benches/cluster.sh <scenario and options for presenced-load…>
# e.g.   benches/cluster.sh churn --sessions 3000 --rooms 150 --changes 500/s --duration 30s
# ONE=1 runs the same against a single node (the same-node baseline).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins >/dev/null
PASS=load-pass-123
PREFIX="bench-$$"
DB="bench_cluster_$$"
psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $DB" test
PIDS=()
cleanup() {
  kill "${PIDS[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB" test || true
  redis-cli --scan --pattern "$PREFIX:*" | xargs -r redis-cli del >/dev/null || true
}
trap cleanup EXIT
NODES=(4101 4102 4103)
[ "${ONE:-}" = 1 ] && NODES=(4101)
URLS=()
for port in "${NODES[@]}"; do
  RUST_LOG=warn,presenced::cluster=info \
  PRESENCED__LIMITS__CONNECTS_PER_IP_PER_S=100000 PRESENCED__LIMITS__JOINS_PER_IP_PER_S=100000 \
  PRESENCED__LIMITS__JOINS_PER_ACCOUNT_PER_S=100000 PRESENCED__LIMITS__CONNECTS_PER_ACCOUNT_PER_S=100000 \
  PRESENCED__PLANS__ENTERPRISE__MAX_CONNECTIONS=1000000 \
  PRESENCED__BOOTSTRAP__ADMIN_PASSWORD=$PASS \
  DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB REDIS_URL=redis://127.0.0.1:6379/ \
  PRESENCED__REDIS__PREFIX=$PREFIX PRESENCED__CLUSTER__NODE_ID=n$port \
  PRESENCED__SERVER__BIND=127.0.0.1:$port ./target/release/presenced 2>"/tmp/$PREFIX-$port.log" &
  PIDS+=($!)
  URLS+=("http://127.0.0.1:$port")
  # One at a time: the first creates the schema and the admin.
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
done
IFS=, ; URL_LIST="${URLS[*]}" ; unset IFS
before=$(redis-cli info stats | awk -F: '/total_commands_processed/{print $2}' | tr -d '\r')
./target/release/presenced-load "$@" --url "$URL_LIST" --password $PASS
after=$(redis-cli info stats | awk -F: '/total_commands_processed/{print $2}' | tr -d '\r')
echo
echo "Redis commands processed during the run (all clients of this Redis): $((after - before))"
for port in "${NODES[@]}"; do
  m=$(curl -s "http://127.0.0.1:$port/metrics")
  rss=$(ps -o rss= -p "${PIDS[$(( port - 4101 ))]}")
  echo "node $port: RSS ${rss} KB · $(echo "$m" | grep -E '^presenced_cluster_(redis_commands_total|changes_published_total|deltas_published_total|changes_received_total|nodes) ' | tr '\n' ' ')"
done
