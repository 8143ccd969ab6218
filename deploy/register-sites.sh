#!/usr/bin/env bash
# Register the sites' public keys with a running SuperLink (started with
# --enable-supernode-auth): only registered SuperNodes can join.
#
#   deploy/register-sites.sh DEPLOY_DIR/superlink [CONNECTION] [site ...]
#
# Uses FLWR_HOME (default: <dir>/flwr-home, written by 'fedimaging deploy init') to find the
# connection (default: the one marked default there). Without site names, registers every key
# in <dir>/site-keys/. A key that is already registered is reported and skipped.
set -euo pipefail

if [[ $# -lt 1 || ! -d "$1" ]]; then
    echo "usage: $0 DEPLOY_DIR/superlink [CONNECTION] [site ...]" >&2
    exit 2
fi
link_dir=$(cd "$1" && pwd)
shift
export FLWR_HOME=${FLWR_HOME:-$link_dir/flwr-home}
connection=${1:-}
[[ $# -gt 0 ]] && shift
if [[ $# -gt 0 ]]; then
    keys=()
    for site in "$@"; do keys+=("$link_dir/site-keys/$site.pub"); done
else
    shopt -s nullglob
    keys=("$link_dir"/site-keys/*.pub)
fi
[[ ${#keys[@]} -gt 0 ]] || { echo "$0: no public keys in $link_dir/site-keys" >&2; exit 2; }

status=0
for key in "${keys[@]}"; do
    site=$(basename "$key" .pub)
    [[ -f "$key" ]] || { echo "$0: $key is missing" >&2; status=1; continue; }
    if out=$(flwr supernode register "$key" ${connection:+"$connection"} --name "$site" 2>&1); then
        echo "registered $site: $out"
    elif grep -qi "already" <<<"$out"; then
        echo "already registered: $site"
    else
        echo "$0: registering $site failed:" >&2
        echo "$out" >&2
        status=1
    fi
done
exit $status
