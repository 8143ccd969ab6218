"""``deploy/start-site.sh`` checks before it starts a SuperNode (no SuperLink needed here).

What it says about an unregistered key is checked against a real SuperLink in
``tests/integration/test_deploy.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from deploy.init import init_main
from deploy.loopback import DEPLOY_DIR


def test_a_runtime_port_in_use_is_refused_with_what_to_set(tmp_path: Path) -> None:
    """Two SuperNodes on one host with the default port: the second one is told to pick another."""
    assert init_main([str(tmp_path / "dep"), "--sites", "site-a", "--dp-epsilon", "0"]) == 0
    site = tmp_path / "dep" / "sites" / "site-a"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "FEDIMAGING_SKIP_PREFLIGHT": "1", "SUPERNODE_RUNTIME_PORT": str(port),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        out = subprocess.run([str(DEPLOY_DIR / "start-site.sh"), str(site)], env=env, capture_output=True,
                             text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"port {port} on 127.0.0.1" in out.stderr and "SUPERNODE_RUNTIME_PORT=" in out.stderr
    assert "Starting Flower SuperNode" not in out.stdout + out.stderr
