"""R14: a real guest tries the host's loopback services it was not given: refused.

One guest, booted through ``VMFactory`` on the real base with the default (closed)
network, tries:
- an unnamed host port: a loopback listener of this test on a free port, through
  slirp's gateway ``10.0.2.2`` and at ``vm.host_address``; the listener must accept
  nothing;
- the CI registry the image cache pushes to (``127.0.0.1:5000``, which the host itself
  reaches in the same trial): through ``10.0.2.2:5000`` and at ``vm.host_address``;
- the same unnamed port and the registry again while another port *is* named, and
  that named port answers (so the refusals are the network's, not a broken guest).
"""

from __future__ import annotations

import http.server
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from faultkit import StalledListener, Tally, domains_referencing

from pytest_flightvm.config import Settings
from pytest_flightvm.startup import new_run_id
from pytest_flightvm.vm.factory import RunContext, VMFactory
from pytest_flightvm.vm.machine import Machine

pytestmark = pytest.mark.vm

REGISTRY_PORT = 5000

# Prints OPEN <first bytes> when something answered, else CLOSED <why>; exit 0 either way.
PROBE = ("python3 - {host} {port} <<'EOF'\n"
         "import socket, sys\n"
         "h, p = sys.argv[1], int(sys.argv[2])\n"
         "try:\n"
         "    s = socket.create_connection((h, p), timeout=5)\n"
         "    s.settimeout(5)\n"
         "    s.sendall(b'GET /v2/ HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n')\n"
         "    data = s.recv(64)\n"
         "    print('OPEN' if data else 'CLOSED eof', data[:40])\n"
         "except Exception as e:\n"
         "    print('CLOSED', type(e).__name__, e)\n"
         "EOF")


def probe(vm: Machine, host: str, port: int) -> str:
    return vm.run(PROBE.format(host=host, port=port), timeout=60).stdout.strip()


def host_registry_answers() -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{REGISTRY_PORT}/v2/", timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


class _Named:
    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"named-ok\n")

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_guest_reaches_no_unnamed_host_port(real_base: dict[str, Any], tally: Tally,
                                             scratch: Path) -> None:
    settings = Settings(cache_dir=scratch / "cache", accel="tcg")
    run = RunContext.create(settings, new_run_id(), "r14")
    factory = VMFactory(settings, Path(real_base["path"]), run)
    unnamed = StalledListener()
    named = _Named()
    try:
        vm = factory.create()
        gw = "10.0.2.2"
        with tally.trial("R14", "unnamed host port: not through 10.0.2.2, not at host_address",
                         port=unnamed.port) as rec:
            rec["gateway"] = probe(vm, gw, unnamed.port)
            rec["host_address"] = probe(vm, vm.host_address, unnamed.port)
            assert rec["gateway"].startswith("CLOSED"), rec
            assert rec["host_address"].startswith("CLOSED"), rec
            assert unnamed.accepted == [], "the guest reached the host's listener"

        with tally.trial("R14", "CI registry 127.0.0.1:5000: not reachable from the guest") as rec:
            assert host_registry_answers(), "the registry is not up on the host: no check"
            rec["gateway"] = probe(vm, gw, REGISTRY_PORT)
            rec["host_address"] = probe(vm, vm.host_address, REGISTRY_PORT)
            assert rec["gateway"].startswith("CLOSED"), rec
            assert rec["host_address"].startswith("CLOSED"), rec

        with tally.trial("R14", "with one port named: it answers, the rest stay closed",
                         port=named.port) as rec:
            vm.set_host_ports([named.port])
            rec["named"] = vm.run(f"python3 -c \"import urllib.request as u; print(u.urlopen("
                                  f"'http://{vm.host_address}:{named.port}/', timeout=10)"
                                  f".read().decode().strip())\"", timeout=60).stdout.strip()
            rec["named_via_gateway"] = probe(vm, gw, named.port)
            rec["unnamed"] = probe(vm, vm.host_address, unnamed.port)
            rec["registry"] = probe(vm, gw, REGISTRY_PORT)
            rec["route"] = vm.run("ip route show default", check=False).stdout.strip()
            assert rec["named"] == "named-ok", rec
            assert rec["named_via_gateway"].startswith("CLOSED"), rec  # only the forward
            assert rec["unnamed"].startswith("CLOSED"), rec
            assert rec["registry"].startswith("CLOSED"), rec
            assert unnamed.accepted == []
    finally:
        factory.close()
        unnamed.close()
        named.close()
    assert domains_referencing(str(scratch)) == []
