"""Render the files of a cloud-init NoCloud seed: user-data, meta-data, network-config.

Everything here is pure and deterministic: equal inputs give byte-identical
files (mapping keys are sorted, lists keep their order, one YAML dumper).

The guest facts this relies on (see docs/HOST.md): Debian's ifupdown renderer
only brings the NIC up with a v2 network-config that matches the MAC address,
renames it ``eth0`` and asks for DHCPv4.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

#: Top-level cloud-config keys whose lists are concatenated by :func:`deep_merge`.
CONCAT_KEYS = frozenset({"runcmd", "write_files", "packages", "users"})

_MAC_RE = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")
_HOST_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^{_HOST_LABEL}(?:\.{_HOST_LABEL})*$", re.IGNORECASE)
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged over it; neither input is modified.

    Rules:

    - a key present in both whose values are both mappings is merged recursively;
    - at the top level (the cloud-config module keys), the lists of ``runcmd``,
      ``write_files``, ``packages`` and ``users`` are concatenated, base first,
      so an override adds commands, files, packages or users instead of
      dropping the defaults;
    - any other value in ``override``, lists included, replaces the base value.
    """
    return _merge(base, override, top=True)


def _merge(base: Mapping[str, Any], override: Mapping[str, Any], *, top: bool) -> dict[str, Any]:
    merged: dict[str, Any] = copy.deepcopy(dict(base))
    for key, value in override.items():
        old = merged.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            merged[key] = _merge(old, value, top=False)
        elif top and key in CONCAT_KEYS and isinstance(old, list) and isinstance(value, list):
            merged[key] = old + copy.deepcopy(value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _yaml_error_line(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"{path}"
    if mark is not None:
        where += f" line {mark.line + 1}, column {mark.column + 1}"
    return f"{where}: {problem}; fix the YAML"


def load_yaml_mapping(path: Path, what: str = "file") -> dict[str, Any]:
    """Load a YAML file that must hold a mapping (an empty file is ``{}``).

    Every failure is a one-line :class:`ConfigError` naming the file, and for
    bad syntax the line and column.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error_line(path, exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: {what} must be a YAML mapping (key: value), got a {type(data).__name__}"
        )
    return data


def load_user_data(path: Path) -> dict[str, Any]:
    """Load a user-data override file (YAML mapping; a ``#cloud-config`` header is fine)."""
    return load_yaml_mapping(path, "user-data")


@dataclass(frozen=True, kw_only=True)
class SeedSpec:
    """What one VM's seed says.

    ``user_data`` holds overrides merged in order over the defaults with
    :func:`deep_merge`; later ones win. The caller orders them (e.g. the
    flightctl fragment, then the fixture, the marker, the hook).
    """

    instance_id: str
    hostname: str
    mac: str
    username: str = "flightvm"
    ssh_public_key: str
    user_data: tuple[Mapping[str, Any], ...] = ()
    vendor_data: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.instance_id or any(c.isspace() for c in self.instance_id):
            raise ConfigError(f"instance-id {self.instance_id!r} must be non-empty, without spaces")
        if not _HOSTNAME_RE.match(self.hostname) or len(self.hostname) > 253:
            raise ConfigError(
                f"hostname {self.hostname!r} is not a valid host name; use letters, digits and '-'"
            )
        if not _MAC_RE.match(self.mac.lower()):
            raise ConfigError(f"MAC address {self.mac!r} is malformed; use 52:54:00:xx:xx:xx")
        if not _USER_RE.match(self.username):
            raise ConfigError(f"user name {self.username!r} is not a valid Linux user name")
        key = self.ssh_public_key.strip()
        if not key or "\n" in key:
            raise ConfigError("ssh_public_key must be one non-empty line (an OpenSSH public key)")
        for i, item in enumerate(self.user_data):
            if not isinstance(item, Mapping):
                raise ConfigError(
                    f"user_data override #{i + 1} must be a mapping, got {type(item).__name__}"
                )
        if self.vendor_data is not None and not isinstance(self.vendor_data, Mapping):
            raise ConfigError("vendor_data must be a mapping")


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings as literal blocks (readable scripts)."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(data: Any) -> bytes:
    """The one stable YAML dump used for every seed file (sorted keys, UTF-8)."""
    text = yaml.dump(
        data,
        Dumper=_Dumper,
        sort_keys=True,
        default_flow_style=False,
        allow_unicode=True,
        width=4096,
    )
    return text.encode("utf-8")


def dump_cloud_config(data: Mapping[str, Any]) -> bytes:
    """``#cloud-config`` header plus the stable YAML dump."""
    return b"#cloud-config\n" + dump_yaml(dict(data))


def default_user_data(username: str, ssh_public_key: str) -> dict[str, Any]:
    """The defaults every VM gets: one passwordless-sudo user reachable by SSH key only."""
    return {
        "users": [
            {
                "name": username,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "shell": "/bin/bash",
                "lock_passwd": True,
                "ssh_authorized_keys": [ssh_public_key.strip()],
            }
        ],
        "ssh_pwauth": False,
        "disable_root": True,
    }


def build_user_data(spec: SeedSpec) -> dict[str, Any]:
    """The final user-data mapping: defaults with every override merged in order."""
    data = default_user_data(spec.username, spec.ssh_public_key)
    for override in spec.user_data:
        data = deep_merge(data, override)
    return data


def meta_data(spec: SeedSpec) -> dict[str, Any]:
    return {"instance-id": spec.instance_id, "local-hostname": spec.hostname}


def network_config(mac: str) -> dict[str, Any]:
    """network-config v2 that works with Debian's ifupdown renderer."""
    return {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": mac.lower()},
                "set-name": "eth0",
                "dhcp4": True,
            }
        },
    }


def render(spec: SeedSpec) -> dict[str, bytes]:
    """The NoCloud files for ``spec``: name -> bytes, ready for :func:`seed.iso.write_iso`."""
    files = {
        "meta-data": dump_yaml(meta_data(spec)),
        "network-config": dump_yaml(network_config(spec.mac)),
        "user-data": dump_cloud_config(build_user_data(spec)),
    }
    if spec.vendor_data is not None:
        files["vendor-data"] = dump_cloud_config(spec.vendor_data)
    return files


def load_cloud_init_dir(path: Path) -> dict[str, bytes]:
    """Read a prepared NoCloud dir as-is: every file, subdirs included, keyed by
    its POSIX path relative to ``path``. ``user-data`` and ``meta-data`` must exist."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"cloud-init dir {root} is not a directory; pass a prepared NoCloud dir")
    for required in ("user-data", "meta-data"):
        if not (root / required).is_file():
            raise ConfigError(
                f"cloud-init dir {root} has no {required}: expected {root / required}"
            )
    files: dict[str, bytes] = {}
    for item in sorted(root.rglob("*")):
        rel = item.relative_to(root).as_posix()
        if item.is_dir():
            continue
        try:
            files[rel] = item.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read {item} from the cloud-init dir: {exc.strerror}"
            ) from None
    if files["user-data"].lstrip().startswith(b"#cloud-config"):
        # cloud-init would reject bad YAML only inside the guest, after a whole boot.
        load_yaml_mapping(root / "user-data", "user-data")
    return files


def _parse_cloud_init_dir(files: Mapping[str, bytes], source: Path | str
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dir's user-data and meta-data as mappings; one-line ConfigError if they cannot merge."""
    user_text = files["user-data"].decode("utf-8", errors="replace")
    if not user_text.lstrip().startswith("#cloud-config"):
        first = (user_text.strip().splitlines() or ["(empty)"])[0][:40]
        raise ConfigError(
            f"{source}/user-data starts with {first!r}, not #cloud-config: flightvm merges the "
            "run's SSH key, instance-id and payload into it, so write it as #cloud-config")
    try:
        user = yaml.safe_load(user_text)
        meta = yaml.safe_load(files["meta-data"].decode("utf-8", errors="replace"))
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error_line(Path(source), exc)) from None
    for name, value in (("user-data", user), ("meta-data", meta)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{source}/{name} must be a YAML mapping, "
                              f"got a {type(value).__name__}")
    return user or {}, meta or {}


def check_cloud_init_dir(path: Path) -> None:
    """Load and parse a prepared NoCloud dir up front (bad input stops the run early)."""
    _parse_cloud_init_dir(load_cloud_init_dir(path), path)


def _names(users: Any) -> list[str]:
    out = []
    for entry in users if isinstance(users, list) else []:
        name = entry.get("name") if isinstance(entry, Mapping) else entry
        out.append(str(name))
    return out


def merge_cloud_init_dir(given: Mapping[str, bytes], spec: SeedSpec,
                         payload: Mapping[str, bytes] | None = None, *,
                         source: Path | str = "cloud-init dir"
                         ) -> tuple[dict[str, bytes], list[str]]:
    """Merge a prepared NoCloud dir (``CLOUD_INIT_DIR``) with what flightvm must set.

    Returns the seed files and warning lines. Rules:

    - user-data: our defaults (the run's user and key), then the dir's user-data,
      then ``spec.user_data`` (the flightctl fragment, fixture, marker, hook), all
      with :func:`deep_merge` (``users``/``runcmd``/``write_files`` concatenate). A
      ``users`` entry of the dir with our user's name is dropped (warning): ours
      carries the run's key.
    - meta-data: the dir's keys, but ``instance-id`` is always ours (unique per VM;
      warning if the dir set another). ``local-hostname`` defaults to the VM name.
    - network-config: the dir's if it has one, else ours (matches the VM's MAC).
    - every other file is kept; ``payload`` files are added, and win over the dir's
      files of the same name (warning).
    """
    theirs, meta = _parse_cloud_init_dir(given, source)
    warnings: list[str] = []
    users = theirs.get("users")
    if isinstance(users, list) and spec.username in _names(users):
        theirs = dict(theirs)
        theirs["users"] = [u for u in users
                           if (u.get("name") if isinstance(u, Mapping) else u) != spec.username]
        warnings.append(f"{source}/user-data: its users entry {spec.username!r} is replaced by "
                        "flightvm's own (it carries this run's SSH key)")
    data = deep_merge(default_user_data(spec.username, spec.ssh_public_key), theirs)
    for override in spec.user_data:
        data = deep_merge(data, override)
    if "instance-id" in meta and str(meta["instance-id"]) != spec.instance_id:
        warnings.append(f"{source}/meta-data: instance-id {meta['instance-id']!r} is ignored; "
                        "every VM gets its own")
    merged_meta = {"local-hostname": spec.hostname, **meta, "instance-id": spec.instance_id}
    files = dict(given)
    files["user-data"] = dump_cloud_config(data)
    files["meta-data"] = dump_yaml(merged_meta)
    files.setdefault("network-config", dump_yaml(network_config(spec.mac)))
    clashes = sorted(set(payload or {}) & set(given))
    if clashes:
        warnings.append(f"{source}: {', '.join(clashes[:3])} replaced by flightvm's payload")
    files.update(payload or {})
    return dict(sorted(files.items())), warnings
