"""The Node load generator (``bench/node/loadgen.js``), driven one JSON line at a time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from typing import Any

from bench.procs import NODE_DIR, BenchError, stop_process

Reply = dict[str, Any]


class LoadGen:
    """One load generator process: socket.io-client connections plus HTTP publishers."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        return self._process.pid

    @classmethod
    async def start(cls) -> LoadGen:
        node = shutil.which("node") or "node"
        process = await asyncio.create_subprocess_exec(
            node,
            str(NODE_DIR / "loadgen.js"),
            cwd=NODE_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=16 * 1024 * 1024,
        )
        return cls(process)

    async def call(self, command: dict[str, Any], timeout: float) -> Reply:
        """Send one command and wait (at most ``timeout`` seconds) for its answer."""
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None and stdout is not None
        async with self._lock:
            stdin.write(json.dumps(command).encode() + b"\n")
            await stdin.drain()
            try:
                line = await asyncio.wait_for(stdout.readline(), timeout)
            except TimeoutError:
                raise BenchError(f"load generator: no answer to {command['cmd']}") from None
        if not line:
            raise BenchError(f"load generator exited ({self._process.returncode})")
        reply: Reply = json.loads(line)
        if not reply.get("ok", False) and "error" in reply:
            raise BenchError(f"load generator: {reply['error']}")
        return reply

    async def connect(
        self,
        url: str,
        auths: list[dict[str, str]],
        count: int,
        *,
        parallel: int = 50,
        timeout: float = 60.0,
        deflate: bool = True,
        max_seconds: float | None = None,
    ) -> Reply:
        """``count`` more connections, each ready once it got its ``snapshot``; ``deflate``:
        offer permessage-deflate, as browsers do; ``max_seconds``: start none after that."""
        command: dict[str, Any] = {
            "cmd": "connect",
            "url": url,
            "auths": auths,
            "count": count,
            "ready": "snapshot",
            "parallel": parallel,
            "timeout": timeout,
            "deflate": deflate,
        }
        wait = timeout * max(1, count // parallel + 1) + 30
        if max_seconds is not None:
            command["max_seconds"] = max_seconds
            wait = min(wait, max_seconds + timeout + 30)
        return await self.call(command, timeout=wait)

    async def publish(
        self,
        *,
        mode: str,
        senders: list[dict[str, Any]],
        duration: float,
        warmup: float,
        expect: int,
        rate: float | None = None,
        window: int | None = None,
        drain: float = 15.0,
    ) -> Reply:
        command: dict[str, Any] = {
            "cmd": "publish",
            "mode": mode,
            "senders": senders,
            "duration": duration,
            "warmup": warmup,
            "expect": expect,
            "drain": drain,
        }
        if rate is not None:
            command["rate"] = rate
        if window is not None:
            command["window"] = window
        return await self.call(command, timeout=warmup + duration + drain + 60)

    async def disconnect(self, keep: int = 0) -> Reply:
        """Close every connection but the first ``keep``."""
        return await self.call({"cmd": "disconnect", "keep": keep}, timeout=60)

    async def close(self) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(BenchError, ConnectionError):
                await self.call({"cmd": "exit"}, timeout=30)
            await stop_process(self._process, timeout=10)
