"""`roundhouse keys create|ls|revoke` as an operator uses them, against a stack that checks keys,
and the admin key `roundhouse up` makes (its file, never its secret on screen)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from pydantic import ValidationError
from stack_harness import TINY_CHAT, Stack, build_sources, running_stack, tiny_documents

from services.cli.bootstrap import admin_key_line, bootstrap_admin_key
from services.common.db import make_engine, make_sessionmaker
from services.common.keys import KeyStore, hash_secret
from services.router.settings import RouterSettings


@pytest.fixture(scope="module")
async def stack(
    db_dsn: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    sources = build_sources(tmp_path_factory.mktemp("tiny-sources"))
    async with running_stack(db_dsn, nats_url, sources, tmp_path_factory.mktemp("store"),
                             auth=True) as running:
        await running.apply(*tiny_documents(sources))
        yield running


def cli_env(stack: Stack, home: Path, *, admin_key: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUNDHOUSE_")}
    env.update({"ROUNDHOUSE_ROUTER_URL": stack.http_url, "ROUNDHOUSE_HOME": str(home)})
    if admin_key is not None:
        env["ROUNDHOUSE_ADMIN_KEY"] = admin_key
    return env


async def roundhouse(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "services.cli.main", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )


async def test_create_list_use_and_revoke_a_key(stack: Stack, tmp_path: Path) -> None:
    env = cli_env(stack, tmp_path, admin_key=stack.admin_key)
    created = await roundhouse(env, "keys", "create", "cli-app", "--models", f"{TINY_CHAT},tiny-alias",
                               "--rpm", "60", "--budget-usd", "5", "--budget-period", "30d", "--expires", "90d")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("rh-") and "shown only this once" in created.stderr
    async with openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key=secret, max_retries=0) as api:
        assert [m.id for m in (await api.models.list()).data] == [TINY_CHAT]

        listing = await roundhouse(env, "keys", "ls")
        assert listing.returncode == 0, listing.stderr
        [row] = [line for line in listing.stdout.splitlines() if line.startswith("cli-app ")]
        assert f" {secret[:7]}… " in row and secret[:8] not in listing.stdout
        assert "rpm=60" in row and "usd=5" in row and "per=30d" in row and " - " in row
        assert "NAME" in listing.stdout and "USAGE" in listing.stdout

        revoked = await roundhouse(env, "keys", "revoke", "cli-app")
        assert revoked.returncode == 0 and "revoked" in revoked.stdout
        with pytest.raises(openai.AuthenticationError):
            await api.models.list()
    assert "cli-app " not in (await roundhouse(env, "keys", "ls")).stdout


async def test_refusals_are_clear_and_change_nothing(stack: Stack, tmp_path: Path) -> None:
    env = cli_env(stack, tmp_path, admin_key=stack.admin_key)
    before = (await roundhouse(env, "keys", "ls")).stdout
    bad = await roundhouse(env, "keys", "create", "cli-bad", "--rpm", "-5", "--expires", "soon")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("error: Invalid value for 'rpm'") and "'expires_in'" in bad.stderr
    unknown = await roundhouse(env, "keys", "revoke", "no-such-key")
    assert unknown.returncode == 1 and "no key named 'no-such-key'" in unknown.stderr
    assert (await roundhouse(env, "keys", "ls")).stdout == before


async def test_the_admin_key_comes_from_the_home_file_or_nowhere(stack: Stack, tmp_path: Path) -> None:
    assert stack.admin_key is not None
    nothing = await roundhouse(cli_env(stack, tmp_path, admin_key=None), "keys", "ls")
    assert nothing.returncode == 1 and "no admin key" in nothing.stderr and "admin.key" in nothing.stderr
    (tmp_path / "admin.key").write_text(stack.admin_key + "\n")
    from_file = await roundhouse(cli_env(stack, tmp_path, admin_key=None), "keys", "ls")
    assert from_file.returncode == 0, from_file.stderr
    wrong = await roundhouse(cli_env(stack, tmp_path, admin_key="rh-wrong"), "keys", "ls")
    assert wrong.returncode == 1 and "Incorrect API key" in wrong.stderr


async def test_up_bootstrap_writes_a_private_key_file_once(db_dsn: str, tmp_path: Path) -> None:
    settings = RouterSettings(home=tmp_path / "home")
    path = await asyncio.to_thread(bootstrap_admin_key, db_dsn, settings)
    assert path == tmp_path / "home" / "admin.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_text().strip()
    line = admin_key_line(path)
    assert str(path) in line and secret not in line
    assert await asyncio.to_thread(bootstrap_admin_key, db_dsn, settings) == path
    assert path.read_text().strip() == secret  # kept across restarts
    engine = make_engine(db_dsn)
    try:
        found = await KeyStore(make_sessionmaker(engine)).find(hash_secret(secret))
    finally:
        await engine.dispose()
    assert found is not None and found.admin and found.revoked_at is None


async def test_an_explicit_admin_key_is_ensured_and_no_file_written(db_dsn: str, tmp_path: Path) -> None:
    secret = "rh-explicit-admin-key-for-compose-0123456789"
    settings = RouterSettings(home=tmp_path / "home", admin_key=secret)
    assert await asyncio.to_thread(bootstrap_admin_key, db_dsn, settings) is None
    assert not (tmp_path / "home" / "admin.key").exists()
    assert secret not in admin_key_line(None)
    engine = make_engine(db_dsn)
    try:
        found = await KeyStore(make_sessionmaker(engine)).find(hash_secret(secret))
    finally:
        await engine.dispose()
    assert found is not None and found.admin


async def test_an_admin_key_mounted_from_a_file_works_in_router_and_cli(stack: Stack, tmp_path: Path) -> None:
    """A Kubernetes secret read from a file ends in a newline: the router and the CLI both strip it."""
    assert stack.admin_key is not None
    mounted = stack.admin_key + "\n"
    assert RouterSettings(admin_key=mounted).admin_key.get_secret_value() == stack.admin_key  # type: ignore[union-attr]
    listing = await roundhouse(cli_env(stack, tmp_path, admin_key=mounted), "keys", "ls")
    assert listing.returncode == 0, listing.stderr
    (tmp_path / "admin.key").write_text(f"  {stack.admin_key}\r\n")
    from_file = await roundhouse(cli_env(stack, tmp_path, admin_key=None), "keys", "ls")
    assert from_file.returncode == 0, from_file.stderr


@pytest.mark.parametrize("value", ["sk-not-ours-0123456789", "rh-two words", "   ", "ключ-rh-"])
async def test_an_admin_key_that_is_no_roundhouse_key_fails_clearly_and_is_never_echoed(
    stack: Stack, tmp_path: Path, value: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        RouterSettings(admin_key=value)
    assert "ROUNDHOUSE_ADMIN_KEY is not a Roundhouse key" in str(refused.value)
    shown = value.strip() or "<nothing>"
    assert shown not in str(refused.value)
    cli = await roundhouse(cli_env(stack, tmp_path, admin_key=value), "keys", "ls")
    assert cli.returncode == 1 and cli.stdout == ""
    assert cli.stderr.startswith("error: ROUNDHOUSE_ADMIN_KEY is not a Roundhouse key"), cli.stderr
    assert shown not in cli.stderr and "Traceback" not in cli.stderr


async def test_cli_errors_never_show_the_router_url_password(stack: Stack, tmp_path: Path) -> None:
    env = cli_env(stack, tmp_path, admin_key=stack.admin_key)
    env["ROUNDHOUSE_ROUTER_URL"] = "http://operator:hunter2-password@127.0.0.1:9"
    for args in (("keys", "ls"), ("usage",)):
        failed = await roundhouse(env, *args)
        assert failed.returncode == 1 and "cannot reach the router at http://operator:***@127.0.0.1:9" in failed.stderr
        assert "hunter2" not in failed.stderr
