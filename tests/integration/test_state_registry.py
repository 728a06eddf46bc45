"""Booted states through the real local registry: pushed by one run, pulled into an empty store by the next.

One boot and one restore, in one test, on a repository of its own (the base is copied
into it first, so both runs pull the base too, as a CI runner with an empty cache does):

1. run 1 (empty cache dir A, ``--flightvm-state-cache registry --flightvm-push``): the VM
   boots, its state is published and pushed as ``<prefix>-state-<key[:40]>``; what went
   out is the save file and the frozen overlay and a config of the whitelisted fields,
   with no private key in it;
2. run 2 (empty cache dir B): the state is pulled, vetted and **restored**: the run's own
   key works and run 1's does not, the hostname is the VM's own, the clock is the host's;
   the stored state came from the registry, its save file carries our rebuilt domain XML
   and its overlay is backed by B's own base blob;
3. no VM: the same tag in a second repository, re-pushed with an overlay whose backing file
   is /etc/shadow, is refused by a pull with one warning line, and leaves no state and no
   blob behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_flightvm.cache.registry import FlightRegistry
from pytest_flightvm.cache.registry.bundle import BundleFile, push_bundle
from pytest_flightvm.cache.resolve import push_file
from pytest_flightvm.cache.store import Store
from pytest_flightvm.vm.savefile import read_header
from pytest_flightvm.vm.statecache import StateCache
from pytest_flightvm.vm.stateshare import (
    CONFIG_MEDIA_TYPE,
    DISK_TITLE,
    OVERLAY_MEDIA_TYPE,
    SAVE_MEDIA_TYPE,
    SAVE_TITLE,
    StateShare,
    StateVetting,
)
from tests.support import ensure_base_in_registry

pytestmark = pytest.mark.vm

SUITE = r'''
import json, os, shutil, subprocess, time
from pathlib import Path

OUT = Path(os.environ["STATE_TEST_DIR"])


def test_facts(flightvm):
    before = time.time()
    guest = float(flightvm.run("date +%s.%N").stdout)
    after = time.time()
    facts = {"name": flightvm.name, "started": flightvm.started,
             "clock_low": guest - before, "clock_high": after - guest,
             "hostname": flightvm.run("hostname").stdout.strip()}
    old = OUT / "old_key"
    if old.exists():  # the previous run's private key, against this run's VM
        res = subprocess.run(
            ["ssh", "-i", str(old), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "ConnectTimeout=10", "-p", str(flightvm.ssh_port), "flightvm@127.0.0.1",
             "true"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        facts["old_key_rc"], facts["old_key_err"] = res.returncode, res.stderr[-300:]
    shutil.copyfile(flightvm.ssh.login.key, OUT / "this_key")
    os.chmod(OUT / "this_key", 0o600)
    (OUT / "facts.json").write_text(json.dumps(facts))
'''


def _run(cache: Path, repo: str, out: Path, *extra: str) -> tuple[str, dict[str, Any],
                                                                   dict[str, Any]]:
    metrics = cache / "metrics.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", "-v",
         f"--flightvm-cache-dir={cache}", f"--flightvm-registry={repo}",
         f"--flightvm-metrics={metrics}", "--flightvm-state-cache=registry", *extra,
         "test_state_registry_suite.py"],
        env={**os.environ, "STATE_TEST_DIR": str(out)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-4000:]
    facts = json.loads((out / "facts.json").read_text())
    assert facts["clock_low"] > -2 and facts["clock_high"] > -2, facts
    return proc.stdout, json.loads(metrics.read_text()), facts


def _state_tag(repo: str) -> str:
    tags = [t for t in FlightRegistry(repo).tags() if "-state-" in t]
    assert len(tags) == 1, tags
    return tags[0]


def _qemu_img_info(path: Path) -> dict[str, Any]:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)],
                                     capture_output=True, text=True, check=True).stdout)


def test_state_pushed_then_pulled_into_an_empty_store(
        local_registry: str, registry_repo: str, pytester: pytest.Pytester,
        tmp_path: Path) -> None:
    settings, image = ensure_base_in_registry(local_registry)
    # the base in this test's own repository, under its usual tags
    push_file(settings.replace(registry=registry_repo, compress="none"), image.path,
              list(image.tags), key=image.key)
    Path("test_state_registry_suite.py").write_text(SUITE)
    root = (Path(os.environ.get("FLIGHTVM_TEST_TMP", "/var/tmp"))
            / f"fvm-statereg-{os.getpid()}-{id(tmp_path)}")
    shutil.rmtree(root, ignore_errors=True)
    cache_a, cache_b, out = root / "a", root / "b", tmp_path / "out"
    for d in (cache_a, cache_b, out):
        d.mkdir(parents=True)
    try:
        # 1. booted, published, pushed
        output, metrics, facts = _run(cache_a, registry_repo, out, "--flightvm-push")
        assert metrics["vms"][0]["start"] == "booted" and facts["started"] == "booted"
        assert "pushed the booted state" in output, output[-3000:]
        tag = _state_tag(registry_repo)
        key = next(iter(Store(cache_a / "states").refs())).removeprefix("state/")
        assert tag.endswith("-state-" + key[:40])
        reg = FlightRegistry(registry_repo)
        manifest, _ = reg.get_manifest_raw(tag)
        titles = sorted(la["annotations"]["org.opencontainers.image.title"]
                        for la in manifest["layers"])
        assert titles == ["disk.qcow2", "state.sav"], titles  # BIOS: no NVRAM
        body = reg.client.body(reg.client.get_blob(manifest["config"]["digest"]), "config")
        config = json.loads(body)
        assert sorted(config) == ["accel", "format", "has_cloud_init", "host_keys", "key",
                                  "mac", "origin"], config
        assert b"PRIVATE" not in body and config["key"] == key
        # what went out is the state's two store blobs, and nothing else (the run's private
        # key, a VM's host key file are no layer)
        layer_digests = {la["annotations"]["dev.flightvm.disk.digest"]
                         for la in manifest["layers"]}
        local_a = StateCache(cache_a / "states", notice=print).manifest(key)
        assert local_a is not None and layer_digests == {local_a["state"], local_a["disk"]}
        run_key = "sha256:" + hashlib.sha256((out / "this_key").read_bytes()).hexdigest()
        assert run_key not in layer_digests
        shutil.move(out / "this_key", out / "old_key")

        # 2. an empty store: base and state pulled, the VM restored
        output, metrics, facts = _run(cache_b, registry_repo, out, "--flightvm-no-push")
        vm = metrics["vms"][0]
        assert vm["start"] == "restored" and facts["started"] == "restored", output[-3000:]
        assert "pulled the booted state" in output, output[-3000:]
        assert facts["old_key_rc"] == 255 and "Permission denied" in facts["old_key_err"], facts
        assert facts["hostname"] == facts["name"] == vm["name"]
        pulled_line = [line for line in output.splitlines() if "pulled the booted state" in line]
        print(f"state from registry: request->ready {vm['ready_seconds']:.1f}s; "
              f"{pulled_line[0].strip()}")
        states_b = StateCache(cache_b / "states", notice=print)
        local = states_b.manifest(key)
        assert local is not None and local["source"] == "registry", local
        header = read_header(states_b.store.blob_path(local["state"]))
        print(f"save cookie: {header.cookie!r}")
        assert "<emulator>/usr/bin/qemu-system-x86_64</emulator>" in header.xml
        assert f"<name>{config['origin']}</name>" in header.xml
        info = _qemu_img_info(states_b.store.blob_path(local["disk"]))
        base_b = next((cache_b / "store" / "blobs" / "sha256").glob(image.digest[7:]))
        assert info["backing-filename"] == str(base_b), info

        # 3. a hostile overlay under the same tag in another repository: refused, nothing kept
        hostile_repo = registry_repo + "-hostile"
        hostile = tmp_path / "hostile.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b",
                        "/etc/shadow", str(hostile), str(info["virtual-size"])], check=True)
        save = states_b.store.blob_path(local["state"])
        push_bundle(FlightRegistry(hostile_repo).client,
                    [BundleFile(save, SAVE_TITLE, SAVE_MEDIA_TYPE),
                     BundleFile(hostile, DISK_TITLE, OVERLAY_MEDIA_TYPE)],
                    config, config_media_type=CONFIG_MEDIA_TYPE, tag=tag,
                    arch=settings.arch, key=key)
        notices: list[str] = []
        empty = StateCache(root / "c" / "states", notice=notices.append)
        share = StateShare(lambda: FlightRegistry(hostile_repo), prefix=settings.tag_prefix,
                           arch=settings.arch, compress="none", push=False,
                           notice=notices.append)
        vetting = StateVetting(base_b, None, lambda meta: header.xml)
        assert share.pull(empty, key, vetting) is None
        assert len(notices) == 1 and "/etc/shadow" in notices[0], notices
        assert empty.lookup(key) is None and empty.store.ls() == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
