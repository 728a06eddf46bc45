"""Build a stand-in flightctl agent and a complete VM config dir for it.

The real flightctl agent is an RPM for CentOS/RHEL; our guest is Debian. This
module builds a tiny ``flightctl-agent`` .deb that behaves the way the E2E
suite needs an agent to behave, so the whole flightctl path (seed payload,
setup script, package install, config, certs, CA trust, registry config,
service start) runs for real in the guest:

- ``/usr/bin/flightctl-agent`` reads ``/etc/flightctl/config.yaml``, lists
  ``/etc/flightctl/certs/`` and writes ``/var/lib/flightctl-agent/status``
  (``config_sha256=<hex>``, ``certs=<names>``, ``identity=<hex>``), then sleeps forever;
- like the real agent, it keeps its identity in ``/var/lib/flightctl``: a random
  ``identity`` made on its first start (kept across restarts), and a fresh
  ``certs/agent.csr`` on every start, so a test can tell one reset from another;
- ``flightctl-agent.service`` (``Type=simple``) runs it.

Used from Python (``build_agent_deb``, ``make_vm_config``) or from a shell::

    python tests/integration/agent_pkg.py DIR     # writes DIR, prints the facts as JSON

Needs ``dpkg-deb`` and ``openssl`` on the host.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PACKAGE = "flightctl-agent"
VERSION = "0.0.0+flightvm1"
UNIT = "flightctl-agent.service"
STATUS_FILE = "/var/lib/flightctl-agent/status"
CERT_NAMES = ("client.crt", "client.key")
REGISTRY = "127.0.0.1:5000"

AGENT_SCRIPT = """\
#!/bin/sh
# flightctl-agent stand-in (pytest-flightvm): prove the provisioned files are usable.
set -eu
config=/etc/flightctl/config.yaml
certs=/etc/flightctl/certs
state=/var/lib/flightctl-agent
lib=/var/lib/flightctl
mkdir -p "$state" "$lib/certs"
if [ ! -s "$lib/identity" ]; then
    od -An -N16 -tx1 /dev/urandom | tr -d ' \\n' >"$lib/identity"
fi
identity=$(cat "$lib/identity")
printf 'csr of %s\\n' "$identity" >"$lib/certs/agent.csr"
sum=$(sha256sum "$config" | cut -d' ' -f1)
names=$(ls -1 "$certs" 2>/dev/null | tr '\\n' ' ' | sed 's/ $//')
printf 'config_sha256=%s\\ncerts=%s\\nidentity=%s\\n' "$sum" "$names" "$identity" \
    >"$state/status.tmp"
mv "$state/status.tmp" "$state/status"
echo "flightctl-agent: config sha256 $sum, certs: $names"
exec sleep infinity
"""

UNIT_FILE = """\
[Unit]
Description=flightctl agent (pytest-flightvm stand-in)
After=network.target

[Service]
Type=simple
ExecStart=/usr/bin/flightctl-agent
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""

CONTROL = f"""\
Package: {PACKAGE}
Version: {VERSION}
Architecture: all
Maintainer: pytest-flightvm <flightvm@localhost>
Section: admin
Priority: optional
Description: flightctl agent stand-in for pytest-flightvm integration tests
 Reads /etc/flightctl/config.yaml and /etc/flightctl/certs and records what it
 saw in {STATUS_FILE}.
"""

CONFIG_YAML = f"""\
# flightctl agent configuration (pytest-flightvm integration test)
enrollment-service:
  authentication:
    client-certificate: /etc/flightctl/certs/client.crt
    client-key: /etc/flightctl/certs/client.key
  enrollment-ui-endpoint: https://{REGISTRY.split(':')[0]}:8443
  service:
    certificate-authority: /etc/flightctl/certs/ca.crt
    server: https://{REGISTRY.split(':')[0]}:7443
spec-fetch-interval: 0m10s
status-update-interval: 0m10s
"""

REGISTRY_CONF = f"""\
# pytest-flightvm: the test registry, plain HTTP on loopback
[[registry]]
location = "{REGISTRY}"
insecure = true
"""


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} is not installed; run `make host` (it installs it)")
    return path


def build_agent_deb(outdir: Path) -> Path:
    """Build the stand-in ``flightctl-agent`` package into ``outdir``; return the .deb path."""
    dpkg_deb = _need("dpkg-deb")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flightctl-agent-deb.") as tmp:
        root = Path(tmp) / "pkg"
        (root / "DEBIAN").mkdir(parents=True)
        (root / "DEBIAN" / "control").write_text(CONTROL)
        agent = root / "usr" / "bin" / "flightctl-agent"
        agent.parent.mkdir(parents=True)
        agent.write_text(AGENT_SCRIPT)
        agent.chmod(0o755)
        unit = root / "lib" / "systemd" / "system" / UNIT
        unit.parent.mkdir(parents=True)
        unit.write_text(UNIT_FILE)
        unit.chmod(0o644)
        for path in [root, *root.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        deb = outdir / f"{PACKAGE}_{VERSION}_all.deb"
        subprocess.run(
            [dpkg_deb, "--root-owner-group", "--build", str(root), str(deb)],
            check=True,
            capture_output=True,
            text=True,
        )
    return deb


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(
        [_need("openssl"), *args], cwd=cwd, check=True, capture_output=True, text=True
    )


def make_test_pki(directory: Path) -> dict[str, Path]:
    """A test CA and a client cert signed by it (EC P-256), written with openssl."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca.ext").write_text(
        "basicConstraints=critical,CA:TRUE\n"
        "keyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\n"
    )
    (d / "client.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=clientAuth\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=d)
    _openssl("req", "-new", "-key", "ca.key", "-subj", "/CN=flightvm-test-ca", "-out", "ca.csr",
             cwd=d)
    _openssl("x509", "-req", "-in", "ca.csr", "-signkey", "ca.key", "-days", "30",
             "-extfile", "ca.ext", "-out", "ca.pem", cwd=d)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "client.key", cwd=d)
    _openssl("req", "-new", "-key", "client.key", "-subj", "/CN=flightvm-test-client",
             "-out", "client.csr", cwd=d)
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "30", "-extfile", "client.ext", "-out", "client.crt",
             cwd=d)
    _openssl("verify", "-CAfile", "ca.pem", "client.crt", cwd=d)
    return {"ca": d / "ca.pem", "client_crt": d / "client.crt", "client_key": d / "client.key"}


def make_vm_config(directory: Path) -> dict[str, Any]:
    """Write a complete VM config dir for the stand-in agent; return what a test asserts.

    Layout: ``config.yaml``, ``certs/client.crt``, ``certs/client.key``,
    ``ca.pem``, ``registry.conf``, ``rpms/flightctl-agent_*.deb``.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(CONFIG_YAML)
    with tempfile.TemporaryDirectory(prefix="flightvm-pki.") as tmp:
        pki = make_test_pki(Path(tmp))
        certs = root / "certs"
        certs.mkdir(exist_ok=True)
        shutil.copyfile(pki["client_crt"], certs / "client.crt")
        shutil.copyfile(pki["client_key"], certs / "client.key")
        (certs / "client.key").chmod(0o600)
        shutil.copyfile(pki["ca"], root / "ca.pem")
    (root / "registry.conf").write_text(REGISTRY_CONF)
    deb = build_agent_deb(root / "rpms")
    return facts_for(root) | {"deb": str(deb)}


def facts_for(directory: Path) -> dict[str, Any]:
    """What a guest provisioned from ``directory`` must show (also for a dir made elsewhere)."""
    root = Path(directory)
    config = (root / "config.yaml").read_bytes()
    certs_dir = root / "certs"
    cert_names = sorted(p.name for p in certs_dir.iterdir()) if certs_dir.is_dir() else []
    return {
        "dir": str(root),
        "package": PACKAGE,
        "unit": UNIT,
        "status_file": STATUS_FILE,
        "config_text": config.decode(),
        "config_sha256": hashlib.sha256(config).hexdigest(),
        "cert_names": cert_names,
        "ca_pem": (root / "ca.pem").read_text() if (root / "ca.pem").is_file() else None,
        "registry_conf": (
            (root / "registry.conf").read_text() if (root / "registry.conf").is_file() else None
        ),
        "registry_conf_path": "/etc/containers/registries.conf.d/flightctl-e2e.conf",
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: agent_pkg.py DIR  (writes a VM config dir, prints its facts as JSON)",
              file=sys.stderr)
        return 2
    print(json.dumps(make_vm_config(Path(argv[0])), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
