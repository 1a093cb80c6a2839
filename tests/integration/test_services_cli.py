"""`streamrec services` stopped by a supervisor (SIGTERM) stops the broker and Redis it
started: none is left running."""

import os
import signal
import socket
import subprocess
import sys
import time

from tests.conftest import ROOT, wait_for


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_stops_the_embedded_services():
    proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "services"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={k: v for k, v in os.environ.items()
                                 if not k.startswith("STREAMREC_")})
    try:
        exports = {}
        deadline = time.monotonic() + 60
        while "STREAMREC_REDIS_URL" not in exports and time.monotonic() < deadline:
            name, _, value = proc.stdout.readline().removeprefix("export ").strip().partition("=")
            exports[name] = value
        ports = [int(exports["STREAMREC_KAFKA_BOOTSTRAP"].rsplit(":", 1)[1]),
                 int(exports["STREAMREC_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])]
        assert all(port_open(port) for port in ports)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        wait_for(lambda: not any(port_open(port) for port in ports), 15,
                 "the broker and Redis to stop with the command")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
