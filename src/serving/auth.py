"""API keys: `serve.api_keys_file` and/or the SWIFTBRUSH_API_KEYS environment variable.

The file holds one key per line, or `sha256:<64 hex digits>`, the SHA-256 of a key (so the file need not
hold the secret itself); blank lines and lines starting with `#` are skipped. The variable holds keys
(or `sha256:` entries) separated by commas. Only the SHA-256 of each key is kept in memory.

A request presents its key as `Authorization: Bearer KEY` (the OpenAI clients' header) or, for the
AUTOMATIC1111 routes, HTTP Basic with the key as the password (webuiapi's `set_auth(user, key)`). The
presented key is hashed and compared with every known hash in constant time (`hmac.compare_digest`), so
the time taken does not tell how much of a key was right. A key is never logged; metrics count requests
per key id, the first 8 hex digits of its SHA-256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from pathlib import Path

from ..core.errors import UserError

ENV = "SWIFTBRUSH_API_KEYS"
HASH = re.compile(r"sha256:([0-9a-fA-F]{64})")
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(hex_digest: str) -> str:
    """What metrics and logs may show of a key: the first 8 hex digits of its SHA-256."""
    return hex_digest[:8]


def parse_entry(entry: str, where: str) -> str:
    """One key or `sha256:<hex>` -> the key's SHA-256 (hex)."""
    m = HASH.fullmatch(entry)
    if m:
        return m.group(1).lower()
    if entry.startswith("sha256:"):
        raise UserError(f"{where}: 'sha256:' must be followed by the 64 hex digits of a SHA-256")
    if any(c.isspace() for c in entry):
        raise UserError(f"{where}: a key must not contain whitespace")
    return digest(entry)


def load_keys(keys_file: str | None, environ: dict | None = None) -> list[str]:
    """The SHA-256 (hex) of every key the server accepts; empty when neither source is set."""
    environ = os.environ if environ is None else environ
    hashes = []
    if keys_file:
        path = Path(keys_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"serve.api_keys_file: cannot read {path} ({err})") from None
        for i, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                hashes.append(parse_entry(line, f"serve.api_keys_file {path}, line {i}"))
        if not hashes:
            raise UserError(f"serve.api_keys_file: {path} holds no key (one per line, or sha256:<hex>)")
    if environ.get(ENV, "").strip():
        for i, entry in enumerate(environ[ENV].split(","), 1):
            if entry.strip():
                hashes.append(parse_entry(entry.strip(), f"{ENV}, entry {i}"))
    return hashes


def presented_key(authorization: str | None, basic: bool) -> str | None:
    """The key in an Authorization header: `Bearer KEY`, or with `basic` also HTTP Basic's password."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if basic and scheme.lower() == "basic":
        try:
            _, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password if sep and password else None
    return None


def match(key: str, hashes: list[str]) -> str | None:
    """The matching key's SHA-256, compared against every entry in constant time; None if none matches."""
    h = digest(key).encode()
    found = None
    for known in hashes:
        if hmac.compare_digest(h, known.encode()):
            found = known
    return found


def check_bind(host: str, has_keys: bool, allow_unauthenticated: bool) -> None:
    """Refuse to listen beyond this machine with no key unless the user says so."""
    if host not in LOOPBACK and not has_keys and not allow_unauthenticated:
        raise UserError(f"--host {host}: the server would be reachable from other machines with no API key; "
                        f"set serve.api_keys_file or {ENV} (docs/serving.md, 'API keys'), or pass "
                        "--allow-unauthenticated to serve without keys")
