"""`megaclass registry`: publish checkpoints as immutable versions, move aliases, resolve URIs.

    megaclass registry publish runs/r1/final --name resnet-web --alias candidate
    megaclass registry list
    megaclass registry show resnet-web/3            (or resnet-web@production, or resnet-web)
    megaclass registry alias resnet-web production 3 --expect 2
    megaclass registry resolve registry://resnet-web@production
    megaclass registry verify resnet-web
    megaclass registry export registry://resnet-web@production --hf hub/resnet-web [--push you/resnet-web]
    megaclass registry gc --older-than 24h [--dry-run]   (what dead publishers left behind)

    megaclass registry keygen ~/.megaclass/publisher.pem        (writes publisher.pem and publisher.pem.pub)
    megaclass registry publish runs/r1/final --name resnet-web --sign ~/.megaclass/publisher.pem
    megaclass registry resolve registry://resnet-web@production --trust publisher.pem.pub

Without --trust, resolve/verify check integrity (every file matches the sha256 in version.json);
with --trust they also require version.json to be signed by one of the trusted Ed25519 keys
(see docs/registry.md for what each mode guarantees). The root is `--registry URL`, else $MEGACLASS_REGISTRY, else ~/.local/share/megaclass/registry.
Registry errors (bad name, missing version, failed checksum) print one line naming the field or
file and exit 1; a lost alias compare-and-swap exits 3; `verify` exits 1 when a version fails.
"""

from __future__ import annotations

import argparse
import json
import sys

from cluster.registry import AliasConflict, Registry, RegistryError, parse_ref
from cluster.signing import SignatureError, generate_key_pair, load_private_key, load_public_key

NAME = "registry"
HELP = "publish checkpoints to the model registry; list, show, alias, resolve, verify versions"


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust", action="append", default=[], metavar="PUBKEY",
                        help="PEM Ed25519 public key (repeatable): refuse registry versions not signed by one of them")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="URL", default=None,
                        help="registry root (fsspec URL; default $MEGACLASS_REGISTRY or "
                             "~/.local/share/megaclass/registry)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = actions.add_parser("publish", parents=[common], help="copy a checkpoint into a new version")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder (contract 2), any fsspec URL")
    p.add_argument("--name", required=True, help="model name")
    p.add_argument("--alias", default=None, help="also point this alias at the new version")
    p.add_argument("--sign", default=None, metavar="KEY", help="PEM Ed25519 private key that signs version.json")

    actions.add_parser("list", parents=[common], help="models, versions and aliases")

    p = actions.add_parser("show", parents=[common], help="lineage of one version")
    p.add_argument("ref", metavar="NAME[/VERSION|@ALIAS]")

    p = actions.add_parser("alias", parents=[common], help="point an alias at a version (compare-and-swap)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("alias", metavar="ALIAS")
    p.add_argument("version", metavar="VERSION", type=int)
    p.add_argument("--expect", metavar="V", default=None,
                   help="only if the alias now points at version V ('none': only if it is unset)")

    p = actions.add_parser("resolve", parents=[common], help="print a verified local folder for a URI")
    p.add_argument("uri", metavar="URI", help="registry://NAME@ALIAS or registry://NAME/VERSION")
    add_trust_argument(p)

    p = actions.add_parser("verify", parents=[common], help="recompute every sha256 (and check signatures)")
    p.add_argument("ref", metavar="NAME[/VERSION|@ALIAS]")
    add_trust_argument(p)

    p = actions.add_parser("keygen", help="write a new Ed25519 key pair for --sign / --trust")
    p.add_argument("path", metavar="KEY", help="private key file to create (mode 0600); the public key is KEY.pub")

    p = actions.add_parser("export", parents=[common],
                           help="write a version as a Hugging Face Hub model folder (timm loads it), optionally push it")
    p.add_argument("uri", metavar="URI", help="registry://NAME@ALIAS or registry://NAME/VERSION")
    p.add_argument("--hf", metavar="DIR", required=True, help="new or empty local folder to write")
    p.add_argument("--push", metavar="REPO_ID", default=None,
                   help="then upload DIR to this Hub model repo (needs a token: `hf auth login` or $HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private (with --push)")

    p = actions.add_parser("gc", parents=[common], help="remove staging folders and unfinished versions of dead publishes")
    p.add_argument("--older-than", metavar="AGE", required=True, type=_duration_s,
                   help="only what has not changed for this long: 90s, 30m, 24h, 7d (a running publish keeps writing)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")


def _duration_s(text: str) -> float:
    from cluster.registry_gc import parse_duration_s

    try:
        return parse_duration_s(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _print(args: argparse.Namespace, payload, text: str) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True) if args.json else text)


def _show_text(info: dict) -> str:
    lines = [f"{info['name']}/{info['version']}  ({', '.join(info['aliases']) or 'no aliases'})"]
    for key in ("created", "run", "architecture", "num_classes", "step", "epoch",
                "dataset_manifest_sha256", "code_revision", "source_url"):
        lines.append(f"  {key:24s} {info.get(key)}")
    for key, value in sorted((info.get("metrics") or {}).items()):
        lines.append(f"  metric {key:17s} {value}")
    for rel, entry in sorted(info["files"].items()):
        lines.append(f"  file {rel:19s} {entry['bytes']:>12d} B  sha256 {entry['sha256'][:16]}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if args.action == "keygen":
        private, public = generate_key_pair(args.path)
        print(f"private key {private} (keep it secret)\npublic key  {public} (give it to readers: --trust)")
        return 0
    reg = Registry(args.registry, trust=[load_public_key(path) for path in getattr(args, "trust", [])])
    if args.action == "publish":
        key = load_private_key(args.sign) if args.sign else None
        version = reg.publish(args.checkpoint, args.name, alias=args.alias, sign_key=key)
        _print(args, {"name": args.name, "version": version, "uri": f"registry://{args.name}/{version}"},
               f"published registry://{args.name}/{version}" + (f" (alias {args.alias})" if args.alias else ""))
    elif args.action == "list":
        models = reg.list()
        text = "\n".join(f"{m['name']}: versions {','.join(map(str, m['versions'])) or '-'}; latest {m['latest']}; "
                         + ", ".join(f"{a}={v}" for a, v in sorted(m["aliases"].items())) for m in models)
        _print(args, models, text or f"no models in {reg.root_url}")
    elif args.action == "show":
        info = reg.show(*parse_ref(args.ref))
        _print(args, info, _show_text(info))
    elif args.action == "alias":
        expected = None
        if args.expect is not None:
            if args.expect.lower() in ("none", "unset", "0"):
                expected = 0
            elif args.expect.isdigit():
                expected = int(args.expect)
            else:
                raise RegistryError(f"--expect: {args.expect!r} is not a version number or 'none'")
        aliases = reg.set_alias(args.name, args.alias, args.version, expected=expected)
        _print(args, aliases, f"{args.name}@{args.alias} -> {args.version}")
    elif args.action == "resolve":
        path = reg.resolve(args.uri)
        _print(args, {"uri": args.uri, "path": path}, path)
    elif args.action == "verify":
        name, version, alias = parse_ref(args.ref)
        if alias is not None:
            version = reg.lookup(name, alias=alias)
        report = reg.verify(name, version)
        _print(args, {str(v): p for v, p in report.items()},
               "\n".join(f"{name}/{v}: " + ("OK" if not p else "FAILED: " + "; ".join(p)) for v, p in report.items()))
        return 1 if any(report.values()) else 0
    elif args.action == "export":
        return _export(args, reg)
    elif args.action == "gc":
        from cluster.registry_gc import collect_garbage

        report = collect_garbage(reg, args.older_than, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        _print(args, {"removed": report.removed, "kept_recent": report.kept_recent, "bytes_freed": report.bytes_freed,
                      "dry_run": args.dry_run},
               "\n".join([f"{verb} {path}" for path in report.removed]
                         + [f"{verb} {len(report.removed)} folder(s), {report.bytes_freed} B; "
                            f"{len(report.kept_recent)} changed in the last {args.older_than:.0f} s kept"]))
    return 0


def _export(args: argparse.Namespace, reg: Registry) -> int:
    from cluster.hub_export import check_push, export_for_hub, push_to_hub

    if args.push:
        check_push(args.push)  # token and repo id before any work
    folder = export_for_hub(reg, args.uri, args.hf, repo_id=args.push)
    payload = {"uri": args.uri, "path": str(folder)}
    if args.push:
        try:
            payload["pushed"] = push_to_hub(folder, args.push, private=args.private, message=f"megaclass export of {args.uri}")
        except Exception as exc:  # the HTTP client's error classes are not part of huggingface_hub's API
            print(f"megaclass registry: error: --push {args.push}: {type(exc).__name__}: {str(exc)[:200]} "
                  f"(the folder is complete at {folder}; push it again or upload it by hand)", file=sys.stderr)
            return 1
    _print(args, payload, str(folder) + (f"\npushed: {payload['pushed']}" if args.push else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except AliasConflict as exc:
        print(f"megaclass registry: conflict: {exc}", file=sys.stderr)
        return 3
    except (RegistryError, SignatureError) as exc:
        print(f"megaclass registry: error: {exc}", file=sys.stderr)
        return 1
