"""Secret hygiene: assets cannot aim a worker's credentials elsewhere, and no secret is shown.

An asset may name only an allowed upstream key variable (never a `ROUNDHOUSE_*` setting) and no
link-local or cloud metadata upstream; the registry, `roundhouse apply` and the worker each
refuse. A whole `roundhouse up` run with a password in its DSN, a NATS token and an upstream
key prints none of them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import openai
import pytest
import yaml
from polling import wait_until
from process_harness import roundhouse_process
from registry_harness import running_registry
from stack_harness import REPO, running_worker
from upstream_harness import KEY, serving_upstream

from roundhouse.v1 import asset_pb2, registry_pb2, worker_pb2
from services.common.asset_proto import spec_to_proto
from services.common.assetspec import parse_spec
from services.common.embedded import EmbeddedNats, free_port
from services.common.errors import InvalidSpec
from services.common.modelstore.store import ModelStore
from services.common.secrets import SecretFilter, mask_key, mask_url, redact
from services.registry.settings import RegistrySettings
from services.worker.models import load_model

READY_LINE = "Ctrl-C stops everything"
DB_PASSWORD = "pg-Secret-5f3a9c"
ADMIN_KEY = "rh-AdminKeyOfTheTest_0123456789abcdefghijkl"
NATS_TOKEN = "natsTok3n-77b1e0d4"


def remote_asset(asset_id: str = "remote-chat", *, key_env: str = "OPENAI_API_KEY",
                 url: str = "http://127.0.0.1:9/v1") -> dict:
    """An `openai`-runtime asset document."""
    return {"asset_id": asset_id, "interface": "llm-runtime", "runtime": "openai",
            "source": {"kind": "url", "url": url, "api_key_env": key_env, "upstream_model": "up-7b"}}


def apply_request(*documents: dict) -> registry_pb2.ApplyAssetsRequest:
    """An ApplyAssets request for documents validated without upstream rules (as a client
    that skips the CLI's checks would send them)."""
    specs = [parse_spec(d, upstreams=None) for d in documents]
    return registry_pb2.ApplyAssetsRequest(
        assets=[registry_pb2.AssetApply(spec=spec_to_proto(s)) for s in specs])


@pytest.fixture
def upstream() -> Iterator[str]:
    """A loopback OpenAI-compatible server that accepts only `KEY`; yields its /v1 URL."""
    with serving_upstream([]) as url:
        yield url


# --- apply time: the registry ---------------------------------------------------------------

@pytest.mark.parametrize("key_env", ["ROUNDHOUSE_DATABASE_URL", "roundhouse_nats_url", "HOME"])
async def test_registry_refuses_key_variables_outside_the_allow_list(registry, key_env: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await registry.stub.ApplyAssets(apply_request(remote_asset("remote-refused", key_env=key_env)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"assets[0].spec.source.api_key_env: {key_env}" in refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await registry.stub.GetAsset(registry_pb2.GetAssetRequest(asset_id="remote-refused"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_registry_accepts_an_allowed_key_variable(registry) -> None:
    reply = await registry.stub.ApplyAssets(apply_request(remote_asset("remote-allowed", key_env="GROQ_API_KEY")))
    assert reply.results[0].asset.spec.source.api_key_env == "GROQ_API_KEY"


async def test_roundhouse_settings_stay_refused_even_when_listed(
    db_dsn: str, nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUNDHOUSE_UPSTREAM_KEY_ENVS", '["MY_UPSTREAM_KEY", "ROUNDHOUSE_DATABASE_URL"]')
    rules = RegistrySettings().upstream_rules()
    async with running_registry(db_dsn, nats_url, [tmp_path], rules) as listed:
        reply = await listed.stub.ApplyAssets(apply_request(remote_asset("remote-mine", key_env="MY_UPSTREAM_KEY")))
        assert reply.results[0].outcome == registry_pb2.APPLY_OUTCOME_CREATED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await listed.stub.ApplyAssets(apply_request(remote_asset(key_env="ROUNDHOUSE_DATABASE_URL")))
        assert "source.api_key_env" in refused.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as unlisted:
            await listed.stub.ApplyAssets(apply_request(remote_asset(key_env="OPENAI_API_KEY")))
        assert "ROUNDHOUSE_UPSTREAM_KEY_ENVS" in unlisted.value.details()


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data", "http://169.254.10.1:8080/v1", "http://[fe80::1]/v1",
    "http://[fd00:ec2::254]/v1", "http://metadata.google.internal/computeMetadata/v1",
    "http://METADATA.google.internal./v1", "http://2852039166/v1", "http://[::ffff:169.254.169.254]/v1",
])
async def test_registry_refuses_link_local_and_metadata_upstreams(registry, url: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await registry.stub.ApplyAssets(apply_request(remote_asset(url=url)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "assets[0].spec.source.url:" in refused.value.details()
    assert "ROUNDHOUSE_ALLOW_LINK_LOCAL_UPSTREAMS" in refused.value.details()


async def test_link_local_upstreams_allowed_by_the_setting(
    db_dsn: str, nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUNDHOUSE_ALLOW_LINK_LOCAL_UPSTREAMS", "true")
    async with running_registry(db_dsn, nats_url, [tmp_path], RegistrySettings().upstream_rules()) as allowing:
        reply = await allowing.stub.ApplyAssets(apply_request(
            remote_asset("remote-link-local", url="http://169.254.169.254/v1")))
    assert reply.results[0].asset.spec.source.url == "http://169.254.169.254/v1"


async def test_loopback_and_private_upstreams_stay_allowed(registry) -> None:
    reply = await registry.stub.ApplyAssets(apply_request(
        remote_asset("remote-loopback", url="http://127.0.0.1:11434/v1"),
        remote_asset("remote-private", url="http://10.1.2.3:8000/v1"),
        remote_asset("remote-named", url="http://localhost:8000/v1"),
    ))
    assert len(reply.results) == 3


# --- apply time: the CLI --------------------------------------------------------------------

def test_roundhouse_apply_refuses_before_calling_the_registry(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump_all([remote_asset(key_env="ROUNDHOUSE_DATABASE_URL"),
                                        remote_asset("metadata", url="http://169.254.169.254/v1")]))
    env = {**os.environ, "ROUNDHOUSE_HOME": str(tmp_path / "home"),
           "ROUNDHOUSE_REGISTRY_ADDRESS": f"127.0.0.1:{free_port()}"}
    done = subprocess.run([sys.executable, "-m", "services.cli.main", "apply", "-f", str(spec)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "source.api_key_env: ROUNDHOUSE_DATABASE_URL is a Roundhouse setting" in done.stderr
    assert "source.url: 169.254.169.254 is a link-local or cloud metadata address" in done.stderr
    assert "cannot reach the registry" not in done.stderr


# --- the worker, whatever the registry let through --------------------------------------------

async def test_worker_refuses_a_roundhouse_variable_before_reading_it(
    tmp_path: Path, upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUNDHOUSE_DATABASE_URL", f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1/x")
    smuggled = parse_spec(remote_asset(key_env="ROUNDHOUSE_DATABASE_URL", url=upstream), upstreams=None)
    with pytest.raises(InvalidSpec, match=r"source\.api_key_env"):
        load_model(smuggled, None)
    async with running_worker(ModelStore(tmp_path / "store", [tmp_path])) as worker:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await worker.control.LoadModel(worker_pb2.LoadModelRequest(
                asset=asset_pb2.Asset(spec=spec_to_proto(smuggled), revision=1)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "source.api_key_env" in refused.value.details()
        assert DB_PASSWORD not in refused.value.details()
        info = await worker.control.GetWorkerInfo(worker_pb2.GetWorkerInfoRequest())
        assert not info.models


def test_worker_refuses_a_metadata_upstream() -> None:
    smuggled = parse_spec(remote_asset(url="http://169.254.169.254/v1"), upstreams=None)
    with pytest.raises(InvalidSpec, match=r"source\.url"):
        load_model(smuggled, None)


# --- masking --------------------------------------------------------------------------------

def test_mask_url_hides_passwords_and_tokens_only() -> None:
    assert mask_url("postgresql://user:s3cret@db.example:5432/rh") == "postgresql://user:***@db.example:5432/rh"
    assert mask_url("nats://user:pw@nats.example:4222") == "nats://user:***@nats.example:4222"
    assert mask_url("nats://tok3n@127.0.0.1:4222") == "nats://***@127.0.0.1:4222"
    assert mask_url("postgresql://postgres@127.0.0.1/db") == "postgresql://postgres@127.0.0.1/db"
    assert mask_url("postgresql:///db?host=/run/pg&password=x1") == "postgresql:///db?host=/run/pg&password=***"
    assert mask_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_mask_key_shows_four_characters_of_a_roundhouse_key() -> None:
    assert mask_key("rh-AbC_-123456789xyzXYZ") == "rh-AbC_…"
    assert mask_key("sk-live-123456") == "***"


def test_redact_scrubs_free_text(monkeypatch: pytest.MonkeyPatch) -> None:
    text = ("calling with Authorization: Bearer sk-upstream-0042 as rh-Q1w2E3r4T5y6U7i8 "
            "on nats://tok3n@h:4222 and postgresql://u:pw@h/db")
    clean = redact(text, ["sk-upstream-0042"])
    for secret in ("sk-upstream-0042", "Q1w2E3r4T5y6U7i8", "tok3n", "u:pw"):
        assert secret not in clean
    assert "rh-Q1w2…" in clean and "postgresql://u:***@h/db" in clean


def test_log_filter_scrubs_arguments_tracebacks_and_upstream_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MISTRAL_API_KEY", "mistral-key-9f8e7d")
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.addFilter(SecretFilter())
    logger = logging.getLogger("test_secret_hygiene.filter")
    logger.addHandler(handler)
    try:
        logger.warning("connecting to %s with %s", "postgresql://pg:hunter22@db/rh", "mistral-key-9f8e7d")
        try:
            raise RuntimeError("refused Bearer rh-ZZZZ00001111222233")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = "\n".join(lines)
    assert "postgresql://pg:***@db/rh" in text and "failed" in text and "rh-ZZZZ…" in text
    for secret in ("hunter22", "mistral-key-9f8e7d", "00001111222233"):
        assert secret not in text


# --- a whole run ----------------------------------------------------------------------------

def _with_password(dsn: str, password: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{password}@{host}"))


@pytest.fixture
def token_nats(tmp_path: Path) -> Iterator[str]:
    """A JetStream nats-server that requires `NATS_TOKEN`; yields its URL with the token."""
    port = free_port()
    log = tmp_path / "nats-server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(EmbeddedNats.binary()), "-js", "-sd", str(tmp_path / "nats"), "-a", "127.0.0.1",
             "-p", str(port), "--auth", NATS_TOKEN], stdout=out, stderr=subprocess.STDOUT)
    try:
        asyncio.run(wait_until(lambda: b"Server is ready" in log.read_bytes(), timeout=30))
        yield f"nats://{NATS_TOKEN}@127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


async def test_a_whole_run_prints_no_secret(
    own_db: str, token_nats: str, upstream: str, tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "remote.yaml").write_text(yaml.safe_dump(remote_asset(url=upstream)))
    home = tmp_path / "home"
    ports = {name: free_port() for name in ("registry", "router", "worker", "http", "jobs")}
    settings = {
        "ROUNDHOUSE_HOME": str(home), "ROUNDHOUSE_MODEL_STORE": str(tmp_path / "store"),
        "ROUNDHOUSE_DATABASE_URL": _with_password(own_db, DB_PASSWORD), "ROUNDHOUSE_NATS_URL": token_nats,
        "ROUNDHOUSE_REGISTRY_ADDRESS": f"127.0.0.1:{ports['registry']}",
        "ROUNDHOUSE_ROUTER_ADDRESS": f"127.0.0.1:{ports['router']}",
        "ROUNDHOUSE_WORKER_ADDRESS": f"127.0.0.1:{ports['worker']}",
        "ROUNDHOUSE_WORKER_ADDRESSES": f'["127.0.0.1:{ports["worker"]}"]',
        "ROUNDHOUSE_HTTP_PORT": str(ports["http"]), "ROUNDHOUSE_JOBS_ADDRESS": f"127.0.0.1:{ports['jobs']}",
        "ROUNDHOUSE_LOG_LEVEL": "DEBUG", "OPENAI_API_KEY": KEY, "ROUNDHOUSE_ADMIN_KEY": ADMIN_KEY,
    }
    secrets = [DB_PASSWORD, NATS_TOKEN, KEY, ADMIN_KEY]
    log = tmp_path / "up.log"
    cli_output: list[str] = []
    async with roundhouse_process("up", settings, log, args=["--catalog", str(catalog)]) as up:
        await wait_until(lambda: READY_LINE in log.read_text(errors="replace") or up.returncode is not None,
                         timeout=240, interval=0.2)
        assert up.returncode is None, log.read_text(errors="replace")[-4000:]
        admin_key = home / "admin.key"  # written by `roundhouse up` when ROUNDHOUSE_ADMIN_KEY is unset
        if admin_key.exists():
            secrets.append(admin_key.read_text().strip())
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{ports['http']}/v1", api_key=ADMIN_KEY,
                                    max_retries=0, timeout=120)
        reply = await client.chat.completions.create(
            model="remote-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.choices[0].message.content == "Hello there"
        stream = await client.chat.completions.create(
            model="remote-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "Hello there"
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(
                model="remote-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
        cli_output.append(str(failed.value.body))
        env = {**os.environ, **settings}
        for argv in (["models", "ls"], ["apply", "-f", str(catalog)]):
            done = subprocess.run([sys.executable, "-m", "services.cli.main", *argv], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            cli_output += [done.stdout, done.stderr]
        recorded = home / "run" / "database_url"
        assert recorded.stat().st_mode & 0o077 == 0
    text = log.read_text(errors="replace")
    assert "remote-chat" in text and "postgresql://" in text and "nats://***@" in text
    for secret in secrets:
        assert secret not in text, f"a secret appears in the output of `roundhouse up`:\n{text}"
        for output in cli_output:
            assert secret not in output
