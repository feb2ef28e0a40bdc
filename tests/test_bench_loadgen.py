"""The benchmark's load generator counts what a server gets wrong: a message lost, delivered
twice, or delivered after one with a higher seq (issue 14: "the benchmark counts it")."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.loadgen import LoadGen
from bench.procs import NODE_DIR, ensure_node_modules, stop_process
from tests.conftest import require_binary

FAULTY_SERVER = Path(__file__).parent / "bench" / "faulty-server.js"
CLIENTS = 3


async def _publish_through(mode: str) -> dict[str, Any]:
    node = require_binary("node", "nodejs")
    await asyncio.to_thread(ensure_node_modules, sys.stderr)
    env = {**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")}
    server = await asyncio.create_subprocess_exec(
        node,
        str(FAULTY_SERVER),
        mode,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    loadgen: LoadGen | None = None
    try:
        assert server.stdout is not None
        port = json.loads(await asyncio.wait_for(server.stdout.readline(), 30))["port"]
        url = f"http://127.0.0.1:{port}"
        loadgen = await LoadGen.start()
        connected = await loadgen.connect(url, [{"token": "t", "room": "chat"}], CLIENTS)
        assert connected["connected"] == CLIENTS
        return await loadgen.publish(
            mode="rate",
            senders=[{"url": f"{url}/publish", "body": {"room": "chat"}}],
            rate=40,
            duration=1.0,
            warmup=0.0,
            expect=CLIENTS,
            drain=2.0,
        )
    finally:
        if loadgen is not None:
            await loadgen.close()
        await stop_process(server, timeout=10)


@pytest.mark.timeout(120)
async def test_a_clean_server_has_nothing_lost_doubled_or_out_of_order() -> None:
    reply = await _publish_through("clean")
    assert reply["messages"] >= 20
    assert (reply["lost"], reply["doubled"], reply["out_of_order"]) == (0, 0, 0)
    assert reply["failed_messages"] == 0


@pytest.mark.timeout(120)
async def test_every_doubled_delivery_is_counted() -> None:
    reply = await _publish_through("double")
    assert reply["doubled"] == reply["messages"] * CLIENTS
    assert (reply["lost"], reply["out_of_order"]) == (0, 0)


@pytest.mark.timeout(120)
async def test_every_delivery_after_a_higher_seq_is_counted() -> None:
    reply = await _publish_through("reorder")
    assert reply["out_of_order"] == (reply["messages"] // 2) * CLIENTS
    assert (reply["lost"], reply["doubled"]) == (0, 0)


@pytest.mark.timeout(120)
async def test_every_lost_delivery_is_counted() -> None:
    reply = await _publish_through("drop")
    assert reply["lost"] == (reply["messages"] // 4) * CLIENTS
    assert (reply["doubled"], reply["out_of_order"]) == (0, 0)
