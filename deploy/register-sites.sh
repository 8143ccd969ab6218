#!/usr/bin/env bash
# Register the sites' public keys with the deployment's running SuperLink (started with
# --enable-supernode-auth): only registered SuperNodes can join.
#
#   deploy/register-sites.sh DEPLOY_DIR/superlink [--connection NAME] [site ...]
#
# Always talks to the deployment's own connection, DEPLOY_DIR/superlink/flwr-home/config.toml
# (written by 'fedimaging deploy init'): an FLWR_HOME set in the shell is ignored, so a
# registration can never go to another (or a local, automatically started) SuperLink. Without
# site names, registers every key in site-keys/. A key that is already registered is reported and
# skipped; afterwards the SuperLink's node list is checked to hold every key. Exit status 2 (bad
# folder, connection or key) or 1 (the SuperLink did not answer or register) with the reason on
# stderr if anything is not registered.
set -euo pipefail
export PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
exec python -m deploy.sites register "$@"
