"""Ed25519 signatures on registry versions: who published a version, not only that it is intact.

SHA256SUMS and version.json's sha256 map prove integrity against accidents: whoever can write the
registry can rewrite the files and the hashes together. With `registry publish --sign KEY` the
publisher adds a signature over version.json (which holds the sha256 of every file); readers that
pass `--trust PUBKEY` refuse versions that are unsigned or not signed by that key.

Keys are PEM files (`megaclass registry keygen OUT` writes OUT, the private key, mode 0600, and
OUT.pub). The signed bytes are version.json without its "signature" member, as canonical JSON
(sorted keys, no spaces, ASCII), so the check does not depend on how the file was indented.

    info["signature"] = sign(info, load_private_key("publisher.pem"))
    check_signature(info, [load_public_key("publisher.pem.pub")], "registry://m/3")   # or RegistryError
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "ed25519"
SIGNATURE_KEY = "signature"


class SignatureError(ValueError):
    """An unreadable key, or a version that is unsigned or not signed by a trusted key."""


def canonical_bytes(info: dict[str, Any]) -> bytes:
    body = {k: v for k, v in info.items() if k != SIGNATURE_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_private_key(path: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"--sign {path}: not a readable unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"--sign {path}: an {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"--trust {path}: not a readable PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"--trust {path}: an {type(key).__name__}, not an Ed25519 public key")
    return key


def generate_key_pair(path: str) -> tuple[str, str]:
    """Write a new private key at `path` (0600, never overwritten) and its public key at `path`.pub."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SignatureError(f"{path}: exists; not overwriting a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    Path(f"{path}.pub").write_bytes(public)
    return path, f"{path}.pub"


def sign(info: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, str]:
    """The "signature" member for version.json `info`."""
    return {"algorithm": ALGORITHM, "public_key": _raw_public(key.public_key()).hex(),
            "value": base64.b64encode(key.sign(canonical_bytes(info))).decode()}


def check_signature(info: dict[str, Any], trusted: list[Ed25519PublicKey], where: str) -> None:
    """Raise SignatureError unless `info` carries a valid signature by one of the `trusted` keys."""
    signature = info.get(SIGNATURE_KEY)
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        raise SignatureError(f"{where}: unsigned (a trusted key is required)")
    try:
        value = base64.b64decode(str(signature.get("value")), validate=True)
        body = canonical_bytes(info)
    except ValueError as exc:
        raise SignatureError(f"{where}: malformed signature ({exc})") from None
    for key in trusted:
        try:
            key.verify(value, body)
            return
        except InvalidSignature:
            continue
    raise SignatureError(f"{where}: signature does not verify with any trusted key "
                         f"(signed by {str(signature.get('public_key'))[:16]}...)")
