"""A small HTTP client for the collector API, with errors a person can act on."""
from __future__ import annotations

import json
from typing import Iterator

import httpx


class ClientError(Exception):
    """Something the user must fix; the message says what."""


class CollectorClient:
    def __init__(self, base_url: str, token: str | None, *, verify: bool | str = True, timeout: float = 30.0):
        if not base_url:
            raise ClientError("no collector URL: pass --collector URL or set WARDEN_COLLECTOR")
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, verify=verify, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        try:
            detail = response.json().get("detail")
        except (ValueError, AttributeError):
            detail = response.text.strip()[:300]
        if isinstance(detail, list):  # FastAPI validation errors
            detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
        hint = {401: " (check --token / WARDEN_TOKEN; mint one with `warden-collector token create`)",
                403: " (your token's role does not allow this)"}.get(response.status_code, "")
        raise ClientError(f"collector answered {response.status_code}: {detail}{hint}")

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return self._check(self._http.request(method, path, **kwargs))
        except httpx.ConnectError as exc:
            raise ClientError(f"cannot reach the collector at {self.base_url}: {exc}") from None
        except httpx.TimeoutException:
            raise ClientError(f"the collector at {self.base_url} did not answer in time") from None

    def get(self, path: str, **params) -> dict:
        clean = {k: v for k, v in params.items() if v is not None}
        return self._request("GET", path, params=clean).json()

    def post(self, path: str, body: dict) -> dict:
        return self._request("POST", path, json=body).json()

    def paginate(self, path: str, max_items: int | None = None, **params) -> Iterator[dict]:
        cursor, seen = None, 0
        while True:
            page = self.get(path, cursor=cursor, **params)
            for item in page["items"]:
                yield item
                seen += 1
                if max_items is not None and seen >= max_items:
                    return
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def stream_lines(self, path: str, **params) -> Iterator[dict]:
        clean = {k: v for k, v in params.items() if v is not None}
        try:
            with self._http.stream("GET", path, params=clean, timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                for line in response.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.ConnectError as exc:
            raise ClientError(f"cannot reach the collector at {self.base_url}: {exc}") from None
