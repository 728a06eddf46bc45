"""The ``flightvm`` command: cache verbs, seed rendering, gc and doctor.

It reads the same settings as the plugin (env vars, the pytest ini of the
current directory) plus its own flags. Exit status: 0 success, 1 operation
failed, 2 usage error or bad input (one line on stderr). Only the verb's
result goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import OPTIONS, Settings, read_ini, resolve
from .errors import ConfigError, FlightVMError


def _err(line: str) -> None:
    sys.stderr.write(line.rstrip() + "\n")
    sys.stderr.flush()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        _err(f"flightvm: {message} (see flightvm --help)")
        raise SystemExit(2)


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    for opt in OPTIONS:
        if not opt.cli_short:
            continue
        if opt.kind == "bool":
            p.add_argument(opt.cli_short, dest=opt.name, action="store_const", const=True,
                           default=None, help=opt.help)
        else:
            p.add_argument(opt.cli_short, dest=opt.name, default=None, help=opt.help,
                           choices=list(opt.choices) or None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flightvm", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    cache = verbs.add_parser("cache", help="base image cache")
    cverbs = cache.add_subparsers(dest="cache_verb", required=True, parser_class=_Parser)
    get = cverbs.add_parser("get", help="resolve local -> registry -> build(+push); print the path")
    get.add_argument("--force", action="store_true", help="ignore caches and build")
    pull = cverbs.add_parser("pull", help="pull a tag (default <prefix>-latest)")
    pull.add_argument("tag", nargs="?")
    pull.add_argument("-o", "--output", type=Path, help="also copy the qcow2 here")
    push = cverbs.add_parser("push", help="push a qcow2 as an OCI artifact")
    push.add_argument("file", type=Path)
    push.add_argument("tags", nargs="*")
    cc = cverbs.add_parser("cache", help="push under <prefix>-<key> (+ -latest from a clean tree)")
    cc.add_argument("file", nargs="?", type=Path)
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


def settings_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    ini, rootdir = read_ini(Path.cwd())
    cli = {o.name: getattr(args, o.name, None) for o in OPTIONS}
    return resolve(cli, ini, os.environ if env is None else env, rootdir=rootdir)


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
        if args.name and not done:
            _err(f"flightvm: no removable flightvm domain named {', '.join(args.name)} "
                 "(owner still running, or no such domain)")
            return 1
        return 0
    if args.verb == "doctor":
        from .doctor import run_doctor

        return run_doctor(settings, out=sys.stdout)
    raise ConfigError(f"unknown verb {args.verb}")  # pragma: no cover


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
        load_cloud_init_dir,
        load_user_data,
        merge_cloud_init_dir,
        render,
    )

    if not (args.user_data or args.vm_config or args.cloud_init_dir):
        raise ConfigError("seed render needs --user-data FILE, --vm-config DIR or "
                          "--cloud-init-dir DIR (any of them together)")
    given = None
    if args.cloud_init_dir:
        check_cloud_init_dir(args.cloud_init_dir)  # before a key is generated next to -o
        given = load_cloud_init_dir(args.cloud_init_dir)
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
