#!/usr/bin/env bash
# Start one site's SuperNode: verifies the SuperLink with the deployment CA, authenticates with
# the site's private key, reads data-path/site-name/state-dir/DP settings from node-config.toml.
#
#   deploy/start-site.sh DEPLOY_DIR/sites/<site> [extra flower-supernode options]
#
# Environment: SUPERLINK_ADDRESS (default: from <dir>/site.env), SUPERNODE_RUNTIME_PORT (local
# port of the SuperNode's ClientApp runtime API, default 9094; give each SuperNode on one host
# its own; a port in use is refused), FEDIMAGING_SKIP_PREFLIGHT=1 to skip the dataset check.
# When the SuperLink refuses the site's key, says so after Flower's exit message (which reads
# like a network error) and what to send to the coordinator.
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

deploy_code="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$deploy_code${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${FEDIMAGING_SKIP_PREFLIGHT:-0}" != 1 ]]; then
    python -m deploy.preflight "$site_dir/node-config.toml" --auth-key "$site_dir/auth.key"
fi

runtime_port=${SUPERNODE_RUNTIME_PORT:-9094}
[[ "$runtime_port" =~ ^[0-9]{1,5}$ ]] || { echo "$0: SUPERNODE_RUNTIME_PORT=$runtime_port is not a port number" >&2; exit 2; }
if ! python -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1])))' \
        "$runtime_port" 2>/dev/null; then
    echo "$0: port $runtime_port on 127.0.0.1 (the SuperNode's local runtime API) is in use, e.g. by another" \
         "SuperNode on this host: give each one its own, e.g. SUPERNODE_RUNTIME_PORT=9095 $0 $site_dir" >&2
    exit 2
fi

# The SuperNode's output passes through unchanged; a flag file records whether the SuperLink
# refused to activate it (Flower then says only "could not establish a connection", which reads
# like a network problem) so that we can say what to do.
flag=$(mktemp "${TMPDIR:-/tmp}/fedimaging-supernode.XXXXXX")
trap 'rm -f "$flag"' EXIT
watch() {  # copy stdin to stdout line by line (unbuffered); note the activation failure in $flag
    python -u -c '
import sys
flag, seen = sys.argv[1], False
for line in iter(sys.stdin.buffer.readline, b""):
    sys.stdout.buffer.write(line)
    sys.stdout.buffer.flush()
    if not seen and b"Failed to activate SuperNode" in line:
        seen = True
        with open(flag, "w") as fh:
            fh.write("refused")
' "$flag"
}

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}"  # Flower's default: 1 s
flower-supernode \
    --superlink "$SUPERLINK_ADDRESS" \
    --root-certificates "$site_dir/ca.crt" \
    --auth-supernode-private-key "$site_dir/auth.key" \
    --node-config "$site_dir/node-config.toml" \
    --port "$runtime_port" \
    "$@" > >(watch) 2> >(watch >&2) &
supernode=$!
trap 'kill -TERM "$supernode" 2>/dev/null' TERM INT HUP
status=0
wait "$supernode" || status=$?
while kill -0 "$supernode" 2>/dev/null; do  # a trapped signal interrupted wait: wait for the exit
    status=0
    wait "$supernode" || status=$?
done
wait  # the output filters
if [[ $status -ne 0 && -s "$flag" ]]; then
    pub="$site_dir/auth.key.pub"
    cat >&2 <<MSG

$0: the SuperLink at $SUPERLINK_ADDRESS answered, over TLS, that it does not
know this site's key ("Failed to activate SuperNode"): this is not a network problem.
Send the site's PUBLIC key (never auth.key) to the coordinator:
    $pub
The coordinator saves it as superlink/site-keys/<site>.pub and runs deploy/register-sites.sh;
then start this site again. (The SuperLink also refuses a key that is already online, e.g. this
site started twice.)
MSG
fi
exit "$status"
