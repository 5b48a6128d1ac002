"""What an HTTP exchange looks like in the record: secrets in headers and query strings redacted."""
from __future__ import annotations

from typing import Iterable
from urllib.parse import quote, unquote

REDACTED = "[redacted]"
DEFAULT_REDACTED_HEADERS = frozenset({"authorization", "cookie", "set-cookie", "x-api-key",
                                      "proxy-authorization"})
# query parameters that commonly carry credentials; targets can add their own
DEFAULT_REDACTED_QUERY = frozenset({"access_token", "token", "api_key", "apikey", "key", "password",
                                    "secret", "signature", "sig", "client_secret", "code"})


class Redactor:
    """Per target: which header and query parameter names are recorded as "[redacted]"."""

    __slots__ = ("headers", "query_params")

    def __init__(self, headers: Iterable[str] = (), query_params: Iterable[str] = ()):
        self.headers = DEFAULT_REDACTED_HEADERS | {h.lower() for h in headers}
        self.query_params = DEFAULT_REDACTED_QUERY | {q.lower() for q in query_params}

    def headers_for_record(self, headers: list[tuple[str, str]]) -> dict[str, str]:
        """Lower-case names to values; repeated fields joined with ", " (Set-Cookie too: redacted anyway)."""
        record: dict[str, str] = {}
        redacted = self.headers
        for name, value in headers:
            lname = name.lower()
            if lname in redacted:
                value = REDACTED
            previous = record.get(lname)
            record[lname] = value if previous is None else (
                REDACTED if value is REDACTED else f"{previous}, {value}")
        return record

    def query_for_record(self, query: str) -> str:
        if not query:
            return ""
        parts = []
        for part in query.split("&"):
            name, eq, _ = part.partition("=")
            if eq and unquote(name).lower() in self.query_params:
                parts.append(f"{name}={quote(REDACTED)}")
            else:
                parts.append(part)
        return "&".join(parts)
