"""The ``flightvm`` command: cache verbs, seed rendering, gc and doctor.

It reads the same settings as the plugin (env vars, the pytest ini of the
current directory) plus its own flags. Exit status: 0 success, 1 operation
failed, 2 usage error or bad input (one line on stderr). Only the verb's
result goes to stdout; progress goes to stderr. Messages name this command's
flags (``--offline``), not the plugin's (``--flightvm-offline``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import OPTIONS, Settings, cli_terms, option_help, read_ini, resolve
from .errors import ConfigError, FlightVMError

DESCRIPTION = "The flightvm command: cache verbs, seed rendering, gc and doctor."
EPILOG = ("Exit status: 0 success, 1 the operation failed, 2 usage error or bad input "
          "(one line on stderr). Settings not given as flags come from the pytest ini of "
          "the current directory, then the env vars named in each flag's help.")


def _err(line: str) -> None:
    """One line on stderr, in this command's terms (``--offline``, not ``--flightvm-offline``)."""
    sys.stderr.write(cli_terms(line.rstrip()) + "\n")
    sys.stderr.flush()


class _Version(argparse.Action):
    """``--version``: the installed distribution's version (read only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("pytest-flightvm")
        except PackageNotFoundError:  # pragma: no cover - run from a bare source tree
            text = "unknown"
        print(f"flightvm (pytest-flightvm) {text}")
        raise SystemExit(0)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        _err(f"flightvm: {message} (see flightvm --help)")
        raise SystemExit(2)


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    for opt in OPTIONS:
        if not opt.cli_short:
            continue
        text = option_help(opt, cli=True)
        if opt.kind == "bool":
            p.add_argument(opt.cli_short, dest=opt.name, action="store_const", const=True,
                           default=None, help=text)
        else:
            p.add_argument(opt.cli_short, dest=opt.name, default=None, help=text,
                           choices=list(opt.choices) or None, metavar=opt.metavar or None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flightvm", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action=_Version)
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    cache = verbs.add_parser("cache", help="base image cache")
    cverbs = cache.add_subparsers(dest="cache_verb", required=True, parser_class=_Parser)
    get = cverbs.add_parser("get", help="resolve local -> registry -> build(+push); print the path")
    get.add_argument("--force", action="store_true", help="ignore caches and build")
    pull = cverbs.add_parser("pull", help="pull a tag (default <prefix>-latest)")
    pull.add_argument("tag", nargs="?", metavar="TAG",
                      help="a tag or sha256:DIGEST of --registry (default <prefix>-latest)")
    pull.add_argument("-o", "--output", type=Path, help="also copy the qcow2 here")
    push = cverbs.add_parser("push", help="push a qcow2 as an OCI artifact")
    push.add_argument("file", type=Path, metavar="FILE", help="the qcow2 to push")
    push.add_argument("tags", nargs="*", metavar="TAG",
                      help="tags to push it under (default <prefix>-latest)")
    cc = cverbs.add_parser("cache", help="push under <prefix>-<key> (+ -latest from a clean tree)")
    cc.add_argument("file", nargs="?", type=Path, metavar="FILE",
                    help="the qcow2 to push (default: resolve the base first, as cache get)")
    cverbs.add_parser("ls", help="local store entries and registry tags")
    cverbs.add_parser("verify", help="re-hash every local blob")
    for sub in (get, pull, push, cc, *cverbs.choices.values()):
        if not any(a.dest == "registry" for a in sub._actions):
            _add_settings_flags(sub)

    seed = verbs.add_parser("seed", help="cloud-init seed ISOs")
    sverbs = seed.add_subparsers(dest="seed_verb", required=True, parser_class=_Parser)
    render = sverbs.add_parser("render", help="write a NoCloud ISO")
    render.add_argument("--user-data", type=Path, help="YAML merged over the defaults")
    render.add_argument("--vm-config", type=Path, help="flightctl VM config dir")
    render.add_argument("--cloud-init-dir", type=Path,
                        help="a prepared NoCloud dir, merged as the plugin merges it")
    render.add_argument("--instance-id", default=None)
    render.add_argument("--ssh-key", type=Path, help="public key for the default user")
    render.add_argument("--mac", default="52:54:00:00:00:01", help="MAC the network-config matches")
    render.add_argument("-o", "--output", type=Path, required=True)

    gc = verbs.add_parser("gc", help="reap VMs, overlays and locks of dead runs")
    gc.add_argument("--dry-run", action="store_true", help="list what would go")
    gc.add_argument("--name", action="append", default=[], help="remove this (kept) VM")
    _add_settings_flags(gc)

    doctor = verbs.add_parser("doctor", help="check the host")
    _add_settings_flags(doctor)
    return parser


# The settings each verb uses: the env vars of the others are not read (several names are
# shared with other tools), while a flag or ini key given for any of them is still checked.
_CACHE = ("registry", "image", "cache_dir", "build_cmd", "build_timeout", "build_inputs",
          "tag_prefix",
          "rebuild", "push", "offline", "plain_http", "compress")
VERB_NEEDS: dict[str, tuple[str, ...]] = {
    "cache": _CACHE,
    "gc": ("cache_dir", "libvirt_uri"),
    "doctor": ("cache_dir", "libvirt_uri", "accel", "registry", "offline", "plain_http",
               "firmware", "tpm", "build_cmd"),
}


def settings_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    ini, rootdir = read_ini(Path.cwd())
    cli = {o.name: getattr(args, o.name, None) for o in OPTIONS}
    return resolve(cli, ini, os.environ if env is None else env, rootdir=rootdir,
                   needed=VERB_NEEDS.get(args.verb))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except FlightVMError as exc:
        _err(f"flightvm: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _err("flightvm: interrupted")
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.verb == "seed":
        return _seed_render(args)
    settings = settings_from_args(args)
    if args.verb in ("cache", "gc"):
        from .statedir import ensure_cache_dir

        ensure_cache_dir(settings.cache_dir)  # another user's cache dir: one line, exit 2
    if args.verb == "cache":
        return _cache(args, settings)
    if args.verb == "gc":
        from .vm.reaper import reap

        hosts = settings.host_list
        done = reap(tuple(h.uri for h in hosts), settings.runs_dir, dry_run=args.dry_run,
                    pools=tuple(h.pool for h in hosts if not h.local),
                    names=tuple(n if n.startswith("flightvm-") else f"flightvm-{n}"
                                for n in args.name), log=_err)
        for item in done:
            print(f"{'would remove' if args.dry_run else 'removed'} {item.kind} {item.name}")
        states = _states(settings)
        for item in states.gc(dry_run=args.dry_run) if states is not None else ():
            what = "state" if item.startswith("state/") else "state blob"
            print(f"{'would remove' if args.dry_run else 'removed'} {what} "
                  f"{item.removeprefix('state/')}")
        if args.name and not done:
            _err(f"flightvm: no removable flightvm domain named {', '.join(args.name)} "
                 "(owner still running, or no such domain)")
            return 1
        return 0
    if args.verb == "doctor":
        from .doctor import run_doctor

        return run_doctor(settings, out=sys.stdout)
    raise ConfigError(f"unknown verb {args.verb}")  # pragma: no cover


def _states(settings: Settings) -> Any:
    """The booted-state store, when this cache dir has one."""
    if not settings.states_dir.is_dir():
        return None
    from .vm.statecache import StateCache

    return StateCache(settings.states_dir, notice=_err)


def _cache(args: argparse.Namespace, settings: Settings) -> int:
    from .cache import resolve as r

    verb = args.cache_verb
    if verb == "get":
        image = r.resolve_image(settings.replace(rebuild=args.force or settings.rebuild), log=_err)
        _err(f"flightvm: source={image.source} bytes={image.bytes_moved} "
             f"seconds={image.seconds:.2f}")
        print(image.path)
        return 0
    if verb == "pull":
        image = r.pull_tag(settings, args.tag, log=_err)
        if args.output:
            import shutil

            shutil.copyfile(image.path, args.output)
            print(args.output)
        else:
            print(image.path)
        return 0
    if verb == "push":
        if not args.file.is_file():
            raise ConfigError(f"{args.file} does not exist; pass the path of a qcow2 file")
        result = r.push_file(settings, args.file, args.tags, log=_err)
        print(result.manifest_digest if hasattr(result, "manifest_digest") else result)
        return 0
    if verb == "cache":
        if args.file is not None and not args.file.is_file():
            raise ConfigError(f"{args.file} does not exist; pass the path of a qcow2 file")
        image, result = r.cache_image(settings, args.file, log=_err)
        for tag in getattr(result, "tags", ()):
            print(tag)
        return 0
    if verb == "ls":
        import json

        from .cache.store import Store

        key = r.current_key(settings)
        print(f"current key: {key.digest}")
        print(f"  made from: {json.dumps(key.parts, sort_keys=True)}")
        entries, tags = r.list_images(settings)
        store = Store(settings.store_dir)
        print(f"\n{'DIGEST':<20} {'SIZE':>10}  REFS")
        for e in entries:
            print(f"{e.digest[:19]:<20} {e.size:>10}  {', '.join(e.refs)}")
            for ref in e.refs:
                parts = (store.ref_info(ref) or {}).get("parts")
                if parts:
                    print(f"{'':<32}{ref[:16]}… made from: {json.dumps(parts, sort_keys=True)}")
        states = _states(settings)
        if states is not None:
            print(f"\nbooted states ({settings.states_dir}):")
            print(f"{'KEY':<14} {'STATE MiB':>9} {'DISK MiB':>9} {'AGE h':>6}  SAVED FROM")
            for st in states.entries():
                sizes = st.get("sizes") or {}
                age = (time.time() - st["created"]) / 3600 if st.get("created") else 0.0
                print(f"{st['key'][:12]:<14} {sizes.get('state', 0) / 2**20:>9.1f} "
                      f"{sizes.get('disk', 0) / 2**20:>9.1f} {age:>6.1f}  {st.get('origin')}")
        if tags is not None:
            print(f"\nregistry {settings.registry} tags:")
            for t in tags:
                print(f"  {t}")
        return 0
    if verb == "verify":
        from .cache.store import Store

        store = Store(settings.store_dir)
        bad = 0
        for e in store.ls():
            ok = store.verify(e.digest, full=True)
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} {e.digest}")
        states = _states(settings)
        for key, ok in states.verify() if states is not None else ():
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} state {key}{'' if ok else ' (evicted)'}")
        return 1 if bad else 0
    raise ConfigError(f"unknown cache verb {verb}")  # pragma: no cover


def _seed_render(args: argparse.Namespace) -> int:
    """The seed the plugin would give a VM: defaults, a cloud-init dir merged the same way
    (``merge_cloud_init_dir``), then --user-data and the flightctl fragment and payload."""
    import uuid

    from .seed.iso import write_iso
    from .seed.render import (
        SeedSpec,
        check_cloud_init_dir,
        load_user_data,
        merge_cloud_init_dir,
        render,
    )

    if not (args.user_data or args.vm_config or args.cloud_init_dir):
        raise ConfigError("seed render needs --user-data FILE, --vm-config DIR or "
                          "--cloud-init-dir DIR (any of them together)")
    # checked before a key is generated next to -o
    given = check_cloud_init_dir(args.cloud_init_dir) if args.cloud_init_dir else None
    payload: dict[str, bytes] = {}
    overrides: list[dict[str, Any]] = []
    if args.user_data:
        overrides.append(load_user_data(args.user_data))
    if args.vm_config:
        from . import flightctl

        fragment, payload = flightctl.flightctl_seed(flightctl.load_vm_config(args.vm_config))
        overrides.append(fragment)
    if args.ssh_key:
        try:
            key = args.ssh_key.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --ssh-key {args.ssh_key}: {exc.strerror}") from None
    else:
        from .vm.ssh import generate_keypair

        try:  # the key goes beside the ISO
            args.output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {args.output.parent} for -o: "
                              f"{exc.strerror}; pass another -o") from None
        # never reuse a key found there (someone may have planted it): a new one or none
        private, key = generate_keypair(args.output.parent, args.output.name + ".id_ed25519",
                                        reuse=False)
        _err(f"flightvm: no --ssh-key given; generated {private} (0600) for user flightvm")
    instance = args.instance_id or f"flightvm-{uuid.uuid4().hex[:12]}"
    spec = SeedSpec(instance_id=instance, hostname=instance[:63], mac=args.mac,
                    ssh_public_key=key, user_data=tuple(overrides))
    if given is not None:
        files, warnings = merge_cloud_init_dir(given, spec, payload, source=args.cloud_init_dir)
        for line in warnings:
            _err(f"flightvm: {line}")
    else:
        files = render(spec)
        files.update(payload)
    out = write_iso(files, args.output)
    print(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
