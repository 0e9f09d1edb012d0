"""A lean asyncio HTTP/1.1 client for load-testing `moon3 serve` from the same machine.

A load test on one box shares its cores between the client, the server and the engine, so every
cycle the client spends is taken from what is measured. This client does only what a load
generator needs: one keep-alive connection per `Connection`, a request written in one call, the
response's head read in one call and its body by Content-Length, and no task per request (the
timeout is a deadline on the running task, not `asyncio.wait_for`). It never retries, so each
request is answered at most once and a lost one shows up as an exception. Use a full client
(httpx, the `openai` package) for anything else.

    async with Connection("127.0.0.1", 8000) as c:
        status, headers, body = await c.post("/v1/embeddings", b'{"input": "red shoe"}')
"""

from __future__ import annotations

import asyncio
import sys

__all__ = ["Connection"]

_HEAD_END = b"\r\n\r\n"


class Connection:
    """One keep-alive HTTP/1.1 connection to host:port; requests on it run one at a time."""

    def __init__(self, host: str, port: int, timeout: float = 60.0):
        self.host, self.port, self.timeout = host, port, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> "Connection":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        self._reader = self._writer = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      content_type: str = "application/json") -> tuple[int, dict[str, str], bytes]:
        """Send one request -> (status, headers with lower-case names, body).

        Raises:
            ConnectionError: the server closed the connection before answering (never retried).
            asyncio.TimeoutError: no complete answer within `timeout` seconds.
        """
        if sys.version_info >= (3, 11):
            async with asyncio.timeout(self.timeout):
                return await self._request(method, path, body, content_type)
        return await asyncio.wait_for(self._request(method, path, body, content_type), self.timeout)

    async def post(self, path: str, body: bytes, content_type: str = "application/json"):
        return await self.request("POST", path, body, content_type)

    async def get(self, path: str):
        return await self.request("GET", path)

    async def _request(self, method: str, path: str, body: bytes, content_type: str):
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                + (f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n" if method != "GET" else "")
                + "\r\n").encode("latin-1")
        self._writer.write(head + body)
        try:
            raw = await self._reader.readuntil(_HEAD_END)
        except asyncio.IncompleteReadError:
            await self.close()
            raise ConnectionError(f"{self.host}:{self.port} closed the connection without answering "
                                  f"{method} {path}") from None
        status_line, *lines = raw[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        data = await self._reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, data
