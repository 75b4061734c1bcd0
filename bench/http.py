"""The out-of-process half of ``make bench``: real uvicorn servers, driven over HTTP/1.1 from this process.

Every variant of ``bench.requests`` gets its own uvicorn process on 127.0.0.1
(``bench.serve``), started once and kept warm for the whole run; ``load`` drives
them over keep-alive connections with a raw asyncio client, cheap enough to share
the machine with the servers.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent  # the project root: uvicorn imports bench.serve from here
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class LoadError(RuntimeError):
    """A response that was not 2xx, or a connection the server dropped mid-exchange."""


# -- the load generator -------------------------------------------------------------------


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """Status, Content-Length and whether the server will close the connection, from a response head."""
    lines = head.lower().split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, closing = -1, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            closing = b"close" in value
    if length < 0:
        # The bench apps always send Content-Length; anything else (chunked) would need a real parser.
        raise LoadError(f"response without Content-Length: {head!r}")
    return status, length, closing


class Connection:
    """A keep-alive HTTP/1.1 connection that POSTs an empty body to one path; reopened only if the server closes it."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.address = f"{host}:{port}"
        self.host, self.port, self.path = host, port, path
        self.request = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        """Connect (again)."""
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self) -> None:
        """Send the request and read exactly its response; raise ``LoadError`` unless it is 2xx."""
        assert self.reader is not None and self.writer is not None, "open() first"
        try:
            self.writer.write(self.request)
            await self.writer.drain()
            head = await self.reader.readuntil(b"\r\n\r\n")
            status, length, closing = _parse_head(head)
            body = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise LoadError(f"POST {self.path} to {self.address}: the server dropped the connection ({exc!r})") from exc
        if not 200 <= status < 300:
            raise LoadError(f"POST {self.path} to {self.address}: status {status}: {body[:500]!r}")
        if closing:
            await self.close()
            await self.open()

    async def close(self) -> None:
        """Close the connection, if open."""
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except ConnectionError:
                pass  # already reset by the server: closed either way
            self.reader = self.writer = None


async def _all(coroutines: Iterable[Awaitable[None]]) -> None:
    """Run *coroutines* concurrently; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def load(host: str, port: int, path: str, *, requests: int, connections: int, deadline: float) -> float:
    """Seconds per request served: POST to *path* *requests* times on *connections* connections, within *deadline* s."""
    pool = [Connection(host, port, path) for _ in range(connections)]
    sent = 0
    try:
        await _all(connection.open() for connection in pool)
        # The clock starts once every connection is open: the figure is per request, not per connect.
        started = time.perf_counter()
        stop_at = started + deadline

        async def drive(connection: Connection) -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() < stop_at:
                sent += 1
                await connection.post()

        await _all(drive(connection) for connection in pool)
        elapsed = time.perf_counter() - started
    finally:
        await _all(connection.close() for connection in pool)
    if not sent:
        raise LoadError(f"no request to {host}:{port}{path} was served within {deadline} s")
    return elapsed / sent


# -- the servers --------------------------------------------------------------------------


@dataclass
class Server:
    """One uvicorn process serving one variant, its output going to *log*."""

    variant: str
    port: int
    process: subprocess.Popen[bytes]
    log: IO[bytes]

    def output(self) -> str:
        """Everything the process has written to stdout and stderr so far."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_up(self, timeout: float) -> None:
        """Return once the port accepts connections; raise with the server's output if it exits or *timeout* passes."""
        give_up = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"uvicorn for {self.variant!r} exited ({self.process.returncode}):\n{self.output()}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > give_up:
                    message = f"uvicorn for {self.variant!r} not up after {timeout} s:\n{self.output()}"
                    raise RuntimeError(message) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if the process has not exited after ``STOP_TIMEOUT`` seconds."""
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _spawn(variant: str, kind: str, url: str) -> Server:
    """Start uvicorn serving *variant* without waiting for it."""
    port = _free_port()
    env = {**os.environ, "BENCH_VARIANT": variant, "BENCH_KIND": kind, "BENCH_URL": url}
    command = [sys.executable, "-m", "uvicorn", "bench.serve:app", "--factory", "--host", HOST, "--port", str(port)]
    command += ["--no-access-log", "--log-level", "warning"]
    # A file, not a pipe: nobody reads the output while the server runs, and a full pipe would stall it.
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    return Server(variant, port, process, log)


@contextmanager
def servers(kind: str, url: str, variants: Iterable[str]) -> Iterator[dict[str, Server]]:
    """One uvicorn process per variant, started together and all accepting connections; stopped on exit."""
    running: dict[str, Server] = {}
    try:
        for variant in variants:
            running[variant] = _spawn(variant, kind, url)
        for server in running.values():
            server.wait_up(STARTUP_TIMEOUT)
        yield running
    finally:
        # Signal every server before waiting for any, so that they shut down together.
        for server in running.values():
            server.process.terminate()
        for server in running.values():
            server.stop()


# -- measuring ----------------------------------------------------------------------------


async def _timed(server: Server, path: str, count: int, connections: int, deadline: float) -> float:
    """``load`` against *server*, with the server's output attached to any ``LoadError``."""
    gc.collect()  # the client's own garbage: collected here rather than inside some variant's timing
    try:
        return await load(HOST, server.port, path, requests=count, connections=connections, deadline=deadline)
    except LoadError as exc:
        raise LoadError(f"{exc}\n-- output of the {server.variant!r} server --\n{server.output()}") from exc


async def _rounds(
    running: dict[str, Server], path: str, rounds: int, count: int, connections: int, deadline: float
) -> dict[str, list[float]]:
    """Warm every server up on *path*, then time each once per round, in order A B C ... and reversed on odd rounds."""
    for server in running.values():
        await _timed(server, path, max(count // 5, connections), connections, deadline)
    times: dict[str, list[float]] = {name: [] for name in running}
    for round_ in range(rounds):
        names = list(running) if round_ % 2 == 0 else list(reversed(running))
        for name in names:
            times[name].append(await _timed(running[name], path, count, connections, deadline))
    return times


async def out_of_process(
    kind: str,
    url: str,
    rounds: int,
    count: int,
    connections: int,
    *,
    variants: Iterable[str],
    workloads: Iterable[str],
    deadline: float,
) -> dict[str, dict[str, list[float]]]:
    """Seconds per request as ``times[workload][variant]``, one per round; a load stops at *count* or *deadline* s."""
    # The servers start here and block the event loop while they do, which is harmless: nothing is timed yet.
    with servers(kind, url, variants) as running:
        return {
            workload: await _rounds(running, f"/{workload}", rounds, count, connections, deadline)
            for workload in workloads
        }
