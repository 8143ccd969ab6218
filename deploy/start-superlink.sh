#!/usr/bin/env bash
# Start the fedimaging SuperLink (coordinator): TLS on, only registered SuperNodes may join,
# state kept in a SQLite database (survives restarts), no dependency installs at run time.
#
#   deploy/start-superlink.sh DEPLOY_DIR/superlink [extra flower-superlink options]
#
# Environment: SUPERLINK_BIND_HOST (default 0.0.0.0), SUPERLINK_PORT (default 8000),
# SUPERLINK_DATABASE (default <dir>/state/superlink.db).
# Flower 1.41 serves the Fleet API (sites), Control API (flwr run / register) and the
# ServerApp runtime API on this one HTTPS port: firewall it to the sites and the coordinator.
set -euo pipefail

if [[ $# -lt 1 || ! -d "$1" ]]; then
    echo "usage: $0 DEPLOY_DIR/superlink [flower-superlink options]" >&2
    exit 2
fi
link_dir=$(cd "$1" && pwd)
shift
for f in ca.crt superlink.crt superlink.key; do
    [[ -f "$link_dir/$f" ]] || { echo "$0: $link_dir/$f is missing (run 'fedimaging deploy init')" >&2; exit 2; }
done

database=${SUPERLINK_DATABASE:-$link_dir/state/superlink.db}
mkdir -p "$(dirname "$database")"
chmod 700 "$(dirname "$database")"

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec flower-superlink \
    --ssl-ca-certfile "$link_dir/ca.crt" \
    --ssl-certfile "$link_dir/superlink.crt" \
    --ssl-keyfile "$link_dir/superlink.key" \
    --enable-supernode-auth \
    --database "$database" \
    --disable-runtime-dependency-installation \
    --host "${SUPERLINK_BIND_HOST:-0.0.0.0}" \
    --port "${SUPERLINK_PORT:-8000}" \
    "$@"
