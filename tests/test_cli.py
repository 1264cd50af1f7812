"""`roundhouse apply` and `roundhouse models ls` as an operator uses them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from registry_harness import RunningRegistry, running_registry

GOOD = """\
asset_id: cli-chat
interface: llm-runtime
source: {kind: pypi, package: some-model}
aliases: [cli-default]
---
asset_id: cli-embed
interface: embedding-runtime
source: {kind: pypi, package: other-model}
"""

BAD = """\
asset_id: Bad Id
interface: speech
source: {kind: path, path: ../../etc}
lifecycle: {desired: running, auto_sleep_min: 5}
policy: {max_concurrency: 0}
"""


@pytest.fixture
async def registry(db_dsn: str, nats_url: str, tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    async with running_registry(db_dsn, nats_url, [tmp_path]) as running:
        yield running


async def roundhouse(*args: str, address: str = "127.0.0.1:9") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ROUNDHOUSE_REGISTRY_ADDRESS": address}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "services.cli.main", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )


async def test_invalid_file_gives_one_line_per_problem_and_fails(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD)
    done = await roundhouse("apply", "-f", str(tmp_path / "bad.yaml"))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 4, done.stderr
    assert all(line.startswith(f"error: {tmp_path / 'bad.yaml'}: ") for line in lines)
    for field in ("asset_id", "interface[0]", "source.path", "policy.max_concurrency"):
        assert any(f": {field}: " in line for line in lines), (field, lines)


async def test_apply_then_reapply_then_list(registry: RunningRegistry, tmp_path: Path) -> None:
    (tmp_path / "assets.yaml").write_text(GOOD)
    first = await roundhouse("apply", "-f", str(tmp_path), address=registry.address)
    assert first.returncode == 0, first.stderr
    assert "asset/cli-chat created (revision 1)" in first.stdout
    again = await roundhouse("apply", "-f", str(tmp_path), address=registry.address)
    assert "asset/cli-embed unchanged (revision 1)" in again.stdout
    listing = await roundhouse("models", "ls", address=registry.address)
    assert listing.returncode == 0
    language, embedding = listing.stdout.split("Embedding models")
    assert "cli-chat" in language and "cli-default" in language and "cli-embed" not in language
    assert "cli-embed" in embedding


async def test_unreachable_registry_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "assets.yaml").write_text(GOOD)
    done = await roundhouse("apply", "-f", str(tmp_path / "assets.yaml"))
    assert done.returncode == 1
    assert done.stderr.startswith("error: cannot reach the registry at 127.0.0.1:9")
