"""Brokered credentials: the enforcer, not the workload, holds the secret for a target.

Target option `credentials: {header: Authorization, value_file: /run/secrets/api, scheme: Bearer}`.
The client's own header of that name is always removed; the file's content (stripped) is
injected, prefixed with the scheme when one is given. The file is re-read when its mtime or
size changes, checked at most once per `recheck_s`, so rotating the secret needs no restart.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional


class CredentialError(Exception):
    """The secret cannot be read; the request is refused rather than sent without it."""


class BrokeredCredential:
    def __init__(self, header: str, value_file: str, scheme: str = "", recheck_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        if not header or not value_file:
            raise CredentialError("credentials need both 'header' and 'value_file'")
        self.header = header
        self.header_lower = header.lower()
        self.value_file = value_file
        self.scheme = scheme or ""
        self.recheck_s = recheck_s
        self._clock = clock
        self._checked_at = float("-inf")
        self._stamp: Optional[tuple[int, int]] = None
        self._value: Optional[str] = None

    def value(self) -> str:
        now = self._clock()
        if self._value is not None and now - self._checked_at < self.recheck_s:
            return self._value
        self._checked_at = now
        try:
            st = os.stat(self.value_file)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp or self._value is None:
                with open(self.value_file, "rb") as f:
                    secret = f.read().strip().decode("latin-1")
                self._check(secret)
                self._value = f"{self.scheme} {secret}" if self.scheme else secret
                self._stamp = stamp
        except OSError as exc:
            self._value = None
            raise CredentialError(f"cannot read the credential file {self.value_file!r} "
                                  f"({exc.strerror}); create it readable by the agent") from None
        return self._value

    def _check(self, secret: str) -> None:
        if not secret:
            raise CredentialError(f"the credential file {self.value_file!r} is empty")
        if any(c in secret for c in "\r\n\0") or any(ord(c) < 32 and c != "\t" for c in secret):
            raise CredentialError(f"the credential file {self.value_file!r} holds control characters; "
                                  f"it must contain the secret on one line")


_shared: dict[tuple[str, str, str], BrokeredCredential] = {}
CREDENTIAL_KEYS = frozenset({"header", "value_file", "scheme"})


def credential_for(options: dict) -> Optional[BrokeredCredential]:
    """The target's brokered credential, shared across connections (one stat per second)."""
    spec = options.get("credentials") if options else None
    if not spec:
        return None
    if not isinstance(spec, dict):
        raise CredentialError("target option 'credentials' must be a mapping with header, value_file, scheme")
    unknown = sorted(set(spec) - CREDENTIAL_KEYS)
    if unknown:     # a misspelt 'scheme' would inject the secret without it
        raise CredentialError(f"unknown key {unknown[0]!r} in credentials (known: {', '.join(sorted(CREDENTIAL_KEYS))})")
    key = (str(spec.get("header", "Authorization")), str(spec.get("value_file", "")), str(spec.get("scheme", "")))
    found = _shared.get(key)
    if found is None:
        found = _shared[key] = BrokeredCredential(*key)
    return found
