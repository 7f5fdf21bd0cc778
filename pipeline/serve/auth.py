"""API keys of the online front: where they come from, what travels, how a request is checked.

Keys come from ``serve.api_keys_file`` (one a line; blank lines and ``#`` comments skipped)
or from the environment variable that ``serve.api_keys_env`` names (keys separated by
commas or whitespace). The spec only ever names where the keys are, so manifests, the
Serve config and the spec's fingerprint never hold one.

Keys are read once, where the app is built (``imagegen serve``'s process, or the Serve
build task of ``serve deploy`` / a RayService), and only their SHA-256 digests travel to the
replicas: a replica's arguments are pickled into Ray's control store, and a digest there
gives nobody a key. A presented key is hashed and compared with every digest by
:func:`hmac.compare_digest` (constant time, no early exit), so timing tells nothing about
how much of a key was right. No message, log line or error body ever includes a key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from typing import Mapping, Optional

from pipeline.errors import SpecError
from pipeline.spec.serve_config import ServeConfig

_SEPARATORS = re.compile(r"[\s,]+")


def load_key_digests(serve: ServeConfig, environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The SHA-256 hex digests of the keys ``serve`` names; empty when it names none.

    Raises :class:`~pipeline.errors.SpecError` (saying what to fix, never a key) when the
    file cannot be read, the variable is unset, or either holds no key.
    """
    if serve.api_keys_file is not None:
        try:
            with open(serve.api_keys_file, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise SpecError(
                f"serve.api_keys_file: cannot read {serve.api_keys_file}: {exc.strerror or exc}; "
                "point it at a readable file with one API key per line"
            ) from None
        keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        where = f"serve.api_keys_file ({serve.api_keys_file})"
    elif serve.api_keys_env is not None:
        value = environ.get(serve.api_keys_env)
        if value is None:
            raise SpecError(
                f"serve.api_keys_env names the environment variable {serve.api_keys_env}, which is not set; "
                "set it to the API keys (comma or whitespace separated) where the app is built"
            )
        keys = [key for key in _SEPARATORS.split(value) if key]
        where = f"the environment variable {serve.api_keys_env} (serve.api_keys_env)"
    else:
        return ()
    if not keys:
        raise SpecError(f"{where} holds no API key; add at least one, or remove the setting to serve without keys")
    return tuple(sorted({digest(key) for key in keys}))


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_exposure(host: Optional[str], serve: ServeConfig, digests: tuple[str, ...]) -> None:
    """Refuse to serve without keys on an address other machines reach, unless the spec
    says ``serve.allow_unauthenticated: true``. ``host`` None means unknown (treated as
    reachable)."""
    if digests or serve.allow_unauthenticated or (host is not None and is_loopback(host)):
        return
    raise SpecError(
        f"the front would listen on {host or 'an address other machines may reach'} without API keys, so anyone who "
        "reaches it could generate; set serve.api_keys_file or serve.api_keys_env, or set "
        "serve.allow_unauthenticated: true if that is what you want (or listen on 127.0.0.1)"
    )


class KeyCheck:
    """The replica's side: is this ``Authorization`` header one of the keys?"""

    def __init__(self, digests: tuple[str, ...]):
        self._digests = tuple(bytes.fromhex(d) for d in digests)

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def allows(self, authorization: Optional[str]) -> bool:
        """True when no keys are configured, or the header is ``Bearer <one of the keys>``."""
        return not self._digests or self.identify(authorization) is not None

    def identify(self, authorization: Optional[str]) -> Optional[str]:
        """The digest (hex) of the key in a ``Bearer <key>`` header, if it is one of the keys;
        else None (always None without keys). The digest names the key in per-key limits."""
        scheme, _, key = (authorization or "").strip().partition(" ")
        presented = hashlib.sha256(key.strip().encode("utf-8")).digest()
        # Compare with every digest, without stopping at a match: constant time overall.
        found: Optional[bytes] = None
        for known in self._digests:
            if hmac.compare_digest(presented, known):
                found = known
        return found.hex() if found is not None and scheme.lower() == "bearer" else None
