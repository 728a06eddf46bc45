"""VM figures: P5 fixture request -> ready VM vs a hand-run `virsh` boot (and per firmware),
and P6 per-test reset per firmware and mechanism vs a reboot reset, from real pytest runs
side by side in one bench run."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

from pytest_flightvm.config import default_vcpus

from .common import VENV_BIN, Ctx, log, run_child, stat
from .figure import Bar, Figure, Panel, verdict

URI = "qemu:///system"
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "-o", "LogLevel=ERROR"]

# The same devices the plugin gives a guest (docs/HOST.md): q35, TCG, the plugin's default
# vCPU count, virtio disk on an
# overlay, seed on a virtio-scsi cdrom, serial console to a file, user-mode NIC with an
# ssh forward on 127.0.0.1, QEMU as root through a static DAC label.
HAND_XML = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <clock offset='utc'/>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{overlay}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='scsi' model='virtio-scsi'/>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='{seed}'/>
      <target dev='sda' bus='scsi'/>
      <readonly/>
    </disk>
    <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=n0,mac={mac},bus=pcie.0,addr=0x10'/>
  </qemu:commandline>
</domain>
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise RuntimeError(f"virsh {args[0]} failed: {res.stderr.strip()}")
    return res


def hand_boot(ctx: Ctx, index: int, timeout: float = 900) -> float:
    """What a person's script does: render a seed with the CLI, make an overlay, `virsh
    define` + `virsh start`, then poll `ssh ... cloud-init status` until it says done.
    Returns the seconds from the first command to done."""
    vm_dir = ctx.scratch(f"hand-{index}")
    vm_dir.chmod(0o755)
    key = vm_dir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    name = f"fvmbench-hand-{ctx.run_id}-{index}"
    port, mac = _free_port(), f"52:54:00:be:{index % 256:02x}:01"
    seed, overlay = vm_dir / "seed.iso", vm_dir / "overlay.qcow2"
    console = vm_dir / "console.log"
    xml, user_data = vm_dir / "domain.xml", vm_dir / "user-data.yaml"
    user_data.write_text("{}\n")  # nothing over the defaults, like a plain `flightvm` fixture
    xml.write_text(HAND_XML.format(name=name, overlay=overlay, seed=seed, console=console,
                                   port=port, mac=mac, vcpus=default_vcpus()))
    start = time.monotonic()
    try:
        run_child([str(VENV_BIN / "flightvm"), "seed", "render", "--user-data", str(user_data),
                   "--ssh-key", f"{key}.pub",
                   "--mac", mac, "--instance-id", f"{name}-{index}", "-o", str(seed)])
        run_child(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                   str(ctx.base.path), str(overlay)])
        _virsh("define", str(xml))
        _virsh("start", name)
        ssh = ["ssh", *SSH_OPTS, "-i", str(key), "-p", str(port), "flightvm@127.0.0.1",
               "cloud-init status"]
        while True:
            try:  # the forward accepts TCP before sshd is up: a banner wait can hang
                res = subprocess.run(ssh, capture_output=True, text=True, timeout=20)
            except subprocess.TimeoutExpired:
                res = subprocess.CompletedProcess(ssh, 255, "", "timeout")
            if "done" in res.stdout:
                break
            if "error" in res.stdout:
                raise RuntimeError(f"hand-run guest: cloud-init {res.stdout.strip()}")
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"hand-run guest not ready after {timeout:.0f} s")
            time.sleep(1)
        return time.monotonic() - start
    finally:
        _virsh("destroy", name, check=False)
        _virsh("undefine", name, "--snapshots-metadata", check=False)
        shutil.rmtree(vm_dir, ignore_errors=True)


RESET_SUITE = textwrap.dedent("""
    import json, os, time

    import pytest

    RECORD = os.environ["FLIGHTVM_BENCH_RECORD"]


    @pytest.mark.parametrize("i", range(int(os.environ["FLIGHTVM_BENCH_TESTS"])))
    def test_dirty_the_guest(request, i):
        t = time.monotonic()
        vm = request.getfixturevalue("flightvm")
        ready = time.monotonic() - t
        state = vm.run("test -e /var/tmp/bench-dirty && echo dirty || echo clean").stdout.strip()
        # dirty disk, memory and a config file
        vm.run("sudo sh -c 'head -c 20M /dev/urandom > /var/tmp/bench-dirty; "
               "echo dirty >> /etc/motd; mkdir -p /dev/shm/x && head -c 20M /dev/zero > /dev/shm/x/f'")
        with open(RECORD, "a") as f:
            f.write(json.dumps({"i": i, "ready_s": ready, "state": state, "vm": vm.name}) + "\\n")
        assert state == "clean"
""")


# The P6 suites: label -> plugin options. "restore" and "internal" are the two pristine-point
# mechanisms on the BIOS guest (the default `snapshot` picks one of them); the firmware rows
# use the default; "bios+cpu" prices the CPU model under TCG against "restore" (both BIOS).
CPU_MODEL = "Haswell-noTSX-IBRS"
SUITES: dict[str, tuple[str, ...]] = {
    "restore": ("--flightvm-reset=restore",),
    "internal": ("--flightvm-reset=internal",),
    "reboot": ("--flightvm-reset=reboot",),
    "uefi-secure": ("--flightvm-firmware=uefi-secure",),
    "uefi-secure+tpm": ("--flightvm-firmware=uefi-secure", "--flightvm-tpm"),
    "bios+cpu": (f"--flightvm-cpu={CPU_MODEL}",),
}
FIRMWARE_ROWS = ("restore", "uefi-secure", "uefi-secure+tpm")  # P6 rows; restore = bios


# P5/P6 price boots and per-test resets; the state cache (priced by P8) would restore the
# first VM of a suite from a state an earlier bench run left in the warm cache dir.
NO_STATE_CACHE = "--flightvm-state-cache=off"


def reset_suite(ctx: Ctx, label: str) -> dict[str, Any]:
    """Run the 'dirty the guest' suite with SUITES[label]; return its figures."""
    suite = ctx.scratch(f"reset-{label}")
    suite.chmod(0o755)
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / "test_reset.py").write_text(RESET_SUITE)
    record, metrics = suite / "record.jsonl", suite / "metrics.json"
    env = {"FLIGHTVM_BENCH_RECORD": str(record), "FLIGHTVM_BENCH_TESTS": str(ctx.reset_tests)}
    log(f"P6: {ctx.reset_tests} tests with {' '.join(SUITES[label])}")
    res = run_child([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                     *ctx.plugin_args(), NO_STATE_CACHE, *SUITES[label],
                     f"--flightvm-metrics={metrics}"],
                    cwd=suite, env=env, check=False, timeout=3600)
    try:
        rows = [json.loads(line) for line in record.read_text().splitlines()]
        data = json.loads(metrics.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"reset suite ({label}) left no record ({exc}):\n"
                           f"{res.stdout[-2000:]}") from None
    finally:
        shutil.rmtree(suite, ignore_errors=True)
    if res.returncode != 0:
        raise RuntimeError(f"reset suite ({label}) failed:\n{res.stdout[-2000:]}")
    vms = data.get("vms", [])
    return {"label": label, "suite_s": res.seconds, "rows": rows,
            "revert_seconds": data.get("revert_seconds", []),
            "reset_modes": sorted({r["mode"] for r in data.get("resets", [])}),
            "boot_seconds": [vm.get("boot_seconds") for vm in vms],
            "pristine_seconds": [vm.get("pristine_seconds") for vm in vms],
            "accel": sorted({vm.get("accel") for vm in vms}),
            "clean": all(r["state"] == "clean" for r in rows)}


def vm_figures(ctx: Ctx, want: set[str]) -> list[Figure]:
    """P5 and P6 share boots: hand-run boots alternate with the reset suites."""
    hands: list[float] = []
    suites: dict[str, dict[str, Any]] = {}
    n_hand = ctx.vm_reps if "P5" in want else 0
    labels = list(SUITES) if "P6" in want else ["reboot"]
    # hand, suite, hand, suite, hand: the references interleave with the figures
    steps: list[tuple[str, Any]] = []
    for i in range(max(n_hand, len(labels))):
        if i < n_hand:
            steps.append(("hand", i))
        if i < len(labels):
            steps.append(("suite", labels[i]))
    errors: list[str] = []
    started = time.monotonic()
    for kind, arg in steps:
        ctx.sample_load()  # none of ours is running between steps
        try:
            if kind == "hand":
                log(f"P5: hand-run virsh boot {arg + 1}/{n_hand}")
                hands.append(hand_boot(ctx, arg))
                log(f"P5: hand-run boot ready in {hands[-1]:.1f} s")
            else:
                suites[arg] = reset_suite(ctx, arg)
                log(f"P6: {arg} suite {suites[arg]['suite_s']:.0f} s")
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{kind} {arg}: {exc}"[:400])
            log(f"VM step {kind} {arg} failed: {exc}")
    elapsed = time.monotonic() - started
    figs: list[Figure] = []
    if "P5" in want:
        figs.append(_guard("P5", "`flightvm` fixture request → ready VM", errors,
                           lambda: _p5(hands, suites)))
    if "P6" in want:
        figs.append(_guard("P6", "per-test reset", errors, lambda: _p6(ctx, suites)))
    for f in figs:
        f.seconds, f.phase = elapsed, "+".join(x.id for x in figs)
    return figs


def _guard(fid: str, title: str, errors: list[str], make: Any) -> Figure:
    try:
        fig: Figure = make()
    except (KeyError, IndexError, ValueError, ZeroDivisionError, TypeError) as exc:
        fig = Figure(fid, title, value=f"failed: missing data ({exc!r})", verdict="failed")
    fig.notes.extend(f"step failed: {e}" for e in errors)
    return fig


def _p5(hands: list[float], suites: dict[str, dict[str, Any]]) -> Figure:
    fig = Figure("P5", "`flightvm` fixture request → ready VM (fresh overlay + boot, TCG)",
                 target="none set: the overhead over a hand-run boot is reported")
    reboot = suites["reboot"]
    fixture = stat([r["ready_s"] for r in reboot["rows"]])
    hand = stat(hands)
    fig.value = f"{fixture.fmt()}"
    fig.reference = f"hand-run virsh define/start + ssh poll {hand.fmt()}"
    fig.ratio = f"{fixture.median / hand.median:.2f}× hand-run ({fixture.median - hand.median:+.1f} s)"
    fig.verdict = "info"
    fig.data = {"fixture_ready_s": fixture.as_dict(), "hand_ready_s": hand.as_dict(),
                "boot_seconds_from_metrics": reboot["boot_seconds"], "accel": reboot["accel"]}
    per_firmware = {label: suites[label]["boot_seconds"][0] for label in
                    ("restore", "uefi-secure", "uefi-secure+tpm", "bios+cpu")
                    if label in suites and suites[label]["boot_seconds"]}
    if per_firmware:
        names = {"restore": "bios", "bios+cpu": f"bios, --flightvm-cpu {CPU_MODEL}"}
        fig.notes.append("boot → ready per guest kind (metrics boot_seconds, one boot each): "
                         + "; ".join(f"{names.get(k, k)} {v:.1f} s" for k, v in per_firmware.items()))
        fig.data["boot_s_per_kind"] = per_firmware
        if "restore" in per_firmware and "bios+cpu" in per_firmware:
            fig.notes.append(f"CPU model {CPU_MODEL} under TCG: "
                             f"{per_firmware['bios+cpu'] / per_firmware['restore']:.2f}× the "
                             "default model's boot (one boot each; noisy)")
    if "restore" in suites:
        first = suites["restore"]["rows"][0]["ready_s"]
        pristine = suites["restore"]["pristine_seconds"][0]
        fig.notes.append(f"with the default reset the first request also saves the pristine "
                         f"point: {first:.1f} s, of which the save+first restore {pristine:.1f} s")
        fig.data["pristine_mode_first_ready_s"] = first
    where = ("hand-run boots are interleaved with the suites" if len(hands) > 1
             else "the hand-run boot runs just before the suites")
    fig.notes.append("fixture samples: every test of the reboot-reset suite of P6 (each one "
                     f"destroys the previous VM, renders a seed, makes an overlay and boots); "
                     f"{where}")
    fig.bars = [Bar("flightvm fixture", fixture), Bar("hand-run virsh", hand, True)]
    return fig


def _p6(ctx: Ctx, suites: dict[str, dict[str, Any]]) -> Figure:
    reboot = suites["reboot"]
    fig = Figure("P6", f"per-test reset, {ctx.reset_tests} tests that dirty the guest",
                 target="median reset ≤5 s (aim ≤2 s) for bios, uefi-secure and uefi-secure + "
                        "TPM; suite time ratio ≤0.25")
    reboot_reset = stat([r["ready_s"] for r in reboot["rows"][1:]])
    resets = {label: stat(suites[label]["revert_seconds"])
              for label in ("restore", "internal", *FIRMWARE_ROWS) if label in suites}
    rows = [label for label in FIRMWARE_ROWS if label in suites]
    name = {"restore": "bios (restore)", "internal": "bios (internal snapshot)"}
    fig.value = "; ".join(f"{name.get(k, k)} {resets[k].fmt()}" for k in resets)
    fig.reference = f"reboot reset {reboot_reset.fmt()}; suite {reboot['suite_s']:.0f} s"
    ratios = {k: suites[k]["suite_s"] / reboot["suite_s"] for k in rows}
    fig.ratio = "suite time ratio " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
    clean = all(s["clean"] for s in suites.values())
    ok = (set(rows) == set(FIRMWARE_ROWS) and clean
          and all(resets[k].n > 0 and resets[k].median <= 5 for k in rows)
          and all(v <= 0.25 for v in ratios.values()))
    fig.verdict = verdict(ok)
    if not clean:
        fig.notes.append("a test saw the previous test's dirt: the reset did not reset")
    if "internal" in resets and "restore" in resets:
        faster = "restore" if resets["restore"].median <= resets["internal"].median else "internal"
        fig.notes.append(f"BIOS, side by side: save/restore {resets['restore'].fmt()} vs internal "
                         f"snapshot {resets['internal'].fmt()}; {faster} is faster here "
                         "(the default `snapshot` uses restore)")
    for label in rows:
        s = suites[label]
        fig.notes.append(f"{name.get(label, label)}: request → clean VM "
                         f"{stat([r['ready_s'] for r in s['rows'][1:]]).fmt()}; pristine point "
                         f"(save + first restore) {s['pristine_seconds'][0]:.1f} s; "
                         f"modes {s['reset_modes']}")
    fig.data = {"suites": suites, "reset_s": {k: v.as_dict() for k, v in resets.items()},
                "reboot_reset_s": reboot_reset.as_dict(), "suite_ratio": ratios}
    fig.target_line = 5.0
    fig.bars = [Bar(f"{name.get(k, k)} reset (metrics)", v) for k, v in resets.items()]
    fig.bars.append(Bar("reboot reset (request → fresh VM)", reboot_reset, True))
    fig.extra_panels = [Panel(f"P6: suite time, {ctx.reset_tests} tests",
                              [Bar(name.get(k, k), stat([suites[k]["suite_s"]])) for k in rows]
                              + [Bar("--flightvm-reset reboot", stat([reboot["suite_s"]]), True)],
                              "s", 0.25 * reboot["suite_s"])]
    return fig


def leftover_domains(ctx: Ctx) -> list[str]:
    out = _virsh("list", "--all", "--name", check=False).stdout.split()
    return [d for d in out if d.startswith(f"fvmbench-hand-{ctx.run_id}")]

