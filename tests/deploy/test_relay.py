"""The byte-counting relay of ``bench.deploy`` counts exactly what crosses it, each way."""

from __future__ import annotations

import socket
import threading
import time

from bench.deploy import CountingRelay


def test_relay_counts_both_directions() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve() -> None:  # reply with twice what was received
        conn, _ = server.accept()
        got = b""
        while len(got) < 100_000:
            got += conn.recv(65536)
        conn.sendall(got + got)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    relay = CountingRelay(server.getsockname())
    try:
        with socket.create_connection(("127.0.0.1", relay.port)) as client:
            client.sendall(b"x" * 100_000)
            received = b""
            while len(received) < 200_000:
                chunk = client.recv(65536)
                if not chunk:
                    break
                received += chunk
        deadline = time.monotonic() + 5
        while (relay.up, relay.down) != (100_000, 200_000) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert received == b"x" * 200_000
        assert (relay.up, relay.down) == (100_000, 200_000)
    finally:
        relay.close()
        server.close()
