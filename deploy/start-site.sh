#!/usr/bin/env bash
# Start one site's SuperNode: verifies the SuperLink with the deployment CA, authenticates with
# the site's private key, reads data-path/site-name/state-dir/DP settings from node-config.toml.
#
#   deploy/start-site.sh DEPLOY_DIR/sites/<site> [extra flower-supernode options]
#
# Environment: SUPERLINK_ADDRESS (default: from <dir>/site.env), SUPERNODE_RUNTIME_PORT (local
# port of the SuperNode's ClientApp runtime API, default 9094; give each SuperNode on one host
# its own), FEDIMAGING_SKIP_PREFLIGHT=1 to skip the dataset check.
# flower-supernode installs no dependencies at run time unless
# --allow-runtime-dependency-installation is given (Flower 1.41 default); we never give it.
set -euo pipefail

if [[ $# -lt 1 || ! -d "$1" ]]; then
    echo "usage: $0 DEPLOY_DIR/sites/<site> [flower-supernode options]" >&2
    exit 2
fi
site_dir=$(cd "$1" && pwd)
shift
for f in ca.crt auth.key node-config.toml; do
    [[ -f "$site_dir/$f" ]] || { echo "$0: $site_dir/$f is missing (run 'fedimaging deploy init')" >&2; exit 2; }
done
if [[ -z "${SUPERLINK_ADDRESS:-}" && -f "$site_dir/site.env" ]]; then
    SUPERLINK_ADDRESS=$(sed -n 's/^SUPERLINK_ADDRESS=//p' "$site_dir/site.env" | tail -n 1)
fi
[[ -n "${SUPERLINK_ADDRESS:-}" ]] || { echo "$0: set SUPERLINK_ADDRESS=host:port" >&2; exit 2; }

if [[ "${FEDIMAGING_SKIP_PREFLIGHT:-0}" != 1 ]]; then
    python -m deploy.preflight "$site_dir/node-config.toml" --auth-key "$site_dir/auth.key"
fi

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}"  # Flower's default: 1 s
exec flower-supernode \
    --superlink "$SUPERLINK_ADDRESS" \
    --root-certificates "$site_dir/ca.crt" \
    --auth-supernode-private-key "$site_dir/auth.key" \
    --node-config "$site_dir/node-config.toml" \
    --port "${SUPERNODE_RUNTIME_PORT:-9094}" \
    "$@"
