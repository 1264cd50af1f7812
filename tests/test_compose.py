"""deploy/: the compose file, its Prometheus and its Grafana dashboard, proven.

No Docker engine runs on our machines. The quick tests read the files: each Roundhouse
service's command against the real CLI parser, its environment against the real settings
classes, Prometheus's targets against the metrics ports the file declares, the dashboard's
queries against the metrics the services export. The slow one starts every Roundhouse service
of the file as a real process, with its command and its environment (compose host names and
ports mapped onto the loopback and free ports, nothing else changed), in the file's
`depends_on` order, against the test's Postgres and NATS; then drives a chat and an embedding
through the router and scrapes every target Prometheus would.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import openai
import pytest
import yaml
from polling import wait_until
from process_harness import roundhouse_process
from prometheus_client.parser import text_string_to_metric_families

from services.cli.main import build_parser
from services.common.embedded import free_port
from services.common.settings import CommonSettings
from services.jobs.settings import JobsSettings
from services.registry.settings import RegistrySettings
from services.router.settings import RouterSettings
from services.worker.settings import WorkerSettings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SERVICES: dict[str, dict] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
SETTINGS: dict[str, type[CommonSettings]] = {
    "registry": RegistrySettings, "router": RouterSettings, "worker": WorkerSettings, "jobs": JobsSettings}
OURS = {name: spec for name, spec in SERVICES.items() if spec.get("image") == "roundhouse:latest"}
LONG_RUNNING = sorted(name for name, spec in OURS.items() if spec["command"][0] in SETTINGS)
OPERATOR_SHELL = {"ROUNDHOUSE_ADMIN_KEY": "rh-" + "k" * 43, "ROUNDHOUSE_INTERNAL_TOKEN": "t" * 43}
"""What the operator's shell holds when it runs compose (variables the file interpolates)."""
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::?(?P<op>[-?])(?P<arg>[^}]*))?\}")
ADDRESS = re.compile(r"\b(?P<host>[a-z][a-z0-9-]*|0\.0\.0\.0):(?P<port>\d+)\b")
DEPOT = DEPLOY.parent
"""What the image's /app holds: the repository."""

M = ("asset_id", "interface", "model_type")
CONTRACT: dict[str, tuple[str, tuple[str, ...]]] = {
    # Router
    "roundhouse_requests_total": ("counter", (*M, "route", "status")),
    "roundhouse_request_duration_seconds": ("histogram", (*M, "route")),
    "roundhouse_time_to_first_token_seconds": ("histogram", (*M, "route")),
    "roundhouse_time_per_output_token_seconds": ("histogram", (*M, "route")),
    "roundhouse_queue_wait_seconds": ("histogram", M),
    "roundhouse_prompt_tokens_total": ("counter", (*M, "route")),
    "roundhouse_generated_tokens_total": ("counter", (*M, "route")),
    "roundhouse_requests_in_flight": ("gauge", M),
    "roundhouse_requests_queued": ("gauge", M),
    "roundhouse_embedding_inputs_total": ("counter", (*M, "route")),
    "roundhouse_wakes_total": ("counter", M),
    "roundhouse_wake_delay_seconds": ("histogram", M),
    "roundhouse_route_attempts_total": ("counter", ("route", "target", "outcome")),
    "roundhouse_response_cache_lookups_total": ("counter", ("route", "result")),
    "roundhouse_shadow_agreement": ("gauge", ("route", "shadow")),
    "roundhouse_model_thrashing_total": ("counter", ("asset_id",)),
    # Workers
    "roundhouse_worker_requests_total": ("counter", (*M, "status")),
    "roundhouse_worker_request_duration_seconds": ("histogram", M),
    "roundhouse_worker_time_to_first_token_seconds": ("histogram", M),
    "roundhouse_worker_time_per_output_token_seconds": ("histogram", M),
    "roundhouse_worker_queue_wait_seconds": ("histogram", M),
    "roundhouse_worker_prompt_tokens_total": ("counter", M),
    "roundhouse_worker_generated_tokens_total": ("counter", M),
    "roundhouse_worker_requests_in_flight": ("gauge", M),
    "roundhouse_worker_requests_queued": ("gauge", M),
    "roundhouse_worker_embedding_inputs_total": ("counter", M),
    "roundhouse_embedding_batch_size": ("histogram", M),
    "roundhouse_models_loaded": ("gauge", ("interface", "model_type")),
    "roundhouse_model_memory_bytes": ("gauge", M),
    "roundhouse_worker_memory_used_bytes": ("gauge", ("worker_id",)),
    "roundhouse_worker_memory_budget_bytes": ("gauge", ("worker_id",)),
    "roundhouse_model_load_duration_seconds": ("histogram", (*M, "outcome")),
    "roundhouse_evictions_total": ("counter", (*M, "reason")),
    "roundhouse_eviction_idle_age_seconds": ("histogram", ("reason",)),
    # Jobs
    "roundhouse_operations_total": ("counter", ("type", "status")),
    "roundhouse_operation_duration_seconds": ("histogram", ("type", "status")),
    "roundhouse_operations_in_progress": ("gauge", ("type",)),
    "roundhouse_outbox_backlog": ("gauge", ()),
    "roundhouse_events_published_total": ("counter", ("type",)),
}
"""The metrics the dashboard charts, as exported (kind, labels); Prometheus adds job, instance."""


def series_metric(series: str) -> str | None:
    """The metric a series name belongs to (a histogram's `_bucket`, `_sum`, `_count` too)."""
    base = re.sub(r"_(bucket|sum|count)$", "", series)
    if series in CONTRACT:
        return series
    return base if CONTRACT.get(base, ("",))[0] == "histogram" else None


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, its variables' too."""
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    return queries + [(v["name"], v["definition"]) for v in dashboard["templating"]["list"] if v["type"] == "query"]


def interpolated(value: object) -> str:
    """`value` as compose would pass it: `${NAME...}` replaced from `OPERATOR_SHELL`."""
    def one(match: re.Match[str]) -> str:
        if match["name"] in OPERATOR_SHELL or match["op"] != "-":
            return OPERATOR_SHELL[match["name"]]
        return match["arg"]

    return INTERPOLATION.sub(one, str(value))


def metrics_targets() -> set[str]:
    """`host:port` of every metrics endpoint the compose file declares: the router's HTTP port
    and each `ROUNDHOUSE_*_METRICS_PORT`."""
    targets = set()
    for name in LONG_RUNNING:
        env = OURS[name]["environment"]
        ports = [v for k, v in env.items() if k.endswith("_METRICS_PORT")]
        ports += [env["ROUNDHOUSE_HTTP_PORT"]] if OURS[name]["command"] == ["router"] else []
        targets |= {f"{name}:{port}" for port in ports}
    return targets


def prometheus_targets() -> set[str]:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    return {target for job in config["scrape_configs"] for static in job["static_configs"]
            for target in static["targets"]}


def test_every_service_of_ours_runs_a_real_command() -> None:
    assert set(SETTINGS) == {OURS[name]["command"][0] for name in LONG_RUNNING}
    assert sum(OURS[name]["command"] == ["worker"] for name in LONG_RUNNING) == 2, "two workers"
    for name, spec in OURS.items():
        args = build_parser().parse_args(spec["command"])
        assert callable(args.func), name


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_environment_names_real_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The services share one environment block, so a variable must exist in some service.
    known = set().union(*(cls.model_fields for cls in SETTINGS.values()))
    env = OURS[name]["environment"]
    unknown = [key for key in env if key.removeprefix("ROUNDHOUSE_").lower() not in known]
    assert not unknown, f"{name}: settings that do not exist: {unknown}"
    for key, value in env.items():
        monkeypatch.setenv(key, interpolated(value))
    settings = SETTINGS[OURS[name]["command"][0]]()  # parsed exactly as the service would
    assert settings.resolved_database_url().startswith("postgresql://")
    assert settings.resolved_nats_url().startswith("nats://")
    assert settings.resolved_internal_token() == OPERATOR_SHELL["ROUNDHOUSE_INTERNAL_TOKEN"]
    assert settings.metrics_host == "0.0.0.0"


def test_secrets_come_from_the_operator_never_from_the_file() -> None:
    router = OURS["router"]["environment"]
    assert router["ROUNDHOUSE_ADMIN_KEY"].startswith("${ROUNDHOUSE_ADMIN_KEY:?")
    assert router.get("ROUNDHOUSE_AUTH", "enabled") == "enabled"
    for name in LONG_RUNNING:
        assert OURS[name]["environment"]["ROUNDHOUSE_INTERNAL_TOKEN"].startswith("${ROUNDHOUSE_INTERNAL_TOKEN:?")


def test_each_worker_has_its_own_address_and_metrics_port_and_all_know_both() -> None:
    workers = [OURS[name]["environment"] for name in LONG_RUNNING if OURS[name]["command"] == ["worker"]]
    advertised = [env["ROUNDHOUSE_WORKER_ADVERTISE_ADDRESS"] for env in workers]
    assert len(set(advertised)) == 2 and len({env["ROUNDHOUSE_WORKER_METRICS_PORT"] for env in workers}) == 2
    for name in LONG_RUNNING:
        assert sorted(json.loads(OURS[name]["environment"]["ROUNDHOUSE_WORKER_ADDRESSES"])) == sorted(advertised)


def test_every_service_has_a_health_check_and_prometheus_scrapes_every_metrics_port() -> None:
    one_shot = {name for name, spec in OURS.items() if spec["command"][0] not in SETTINGS}
    assert all("healthcheck" in spec for name, spec in SERVICES.items() if name not in one_shot)
    assert prometheus_targets() == metrics_targets()
    exporting = {name for name in LONG_RUNNING if OURS[name]["command"][0] != "registry"}
    assert {t.split(":")[0] for t in metrics_targets()} == exporting, "router, workers, jobs export"


def test_dashboard_queries_name_only_metrics_and_labels_of_the_contract() -> None:
    used: set[str] = set()
    for title, expr in dashboard_queries(json.loads((DEPLOY / "grafana/roundhouse-dashboard.json").read_text())):
        names = {series_metric(series) for series in re.findall(r"\broundhouse_[a-z0-9_]+", expr)}
        assert names and None not in names, f"{title}: {expr}"
        used |= {n for n in names if n}
        labels = set().union(*(CONTRACT[n][1] for n in used & names)) | {"le"}
        grouped = {label.strip() for by in re.findall(r"by \(([^)]*)\)", expr) for label in by.split(",")}
        matched = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        assert grouped | matched <= labels, f"{title}: labels {(grouped | matched) - labels} in {expr}"
    assert not set(CONTRACT) - used, "the dashboard shows every metric"


def _with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


@pytest.fixture
async def empty_database(pg_dsn: str) -> object:
    """A new, empty database on the test's Postgres server: the compose file's `migrate` fills it."""
    name = f"roundhouse_compose_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        yield _with_database(pg_dsn, name)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


class LocalCompose:
    """The compose file's Roundhouse services as local processes, started as compose would:
    a service once what it `depends_on` is started, healthy (its own health check passes) or
    completed successfully. Host names and ports become the loopback and free ports; the
    Postgres and NATS URLs and the volumes become the test's; everything else is the file's."""

    def __init__(self, exits: AsyncExitStack, root: Path, dsn: str, nats_url: str, volumes: dict[str, Path]):
        self._exits, self._root, self._dsn, self._nats = exits, root, dsn, nats_url
        self._volumes = volumes
        env_values = [str(v) for spec in OURS.values() for v in spec.get("environment", {}).values()]
        found = {m["port"] for value in env_values for m in ADDRESS.finditer(value)}
        found |= {v for spec in OURS.values() for k, v in spec.get("environment", {}).items()
                  if k.endswith("_PORT")}
        self.ports = {port: str(free_port()) for port in found}
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}

    def address(self, value: str) -> str:
        """`host:port` of the file (a service's name or 0.0.0.0) as it is reached here."""
        def local(match: re.Match[str]) -> str:
            assert match["host"] in SERVICES or match["host"] == "0.0.0.0", f"no such host: {value}"
            return f"127.0.0.1:{self.ports[match['port']]}"

        return ADDRESS.sub(local, value)

    def environment(self, name: str) -> dict[str, str]:
        """What the service's process gets: the image's ENV, then the file's `environment`."""
        image_env = re.search(r"^ENV (.+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
        assert image_env is not None
        env = dict(pair.split("=", 1) for pair in image_env[1].split())
        env |= {k: interpolated(v) for k, v in OURS[name].get("environment", {}).items()}
        mounts = {target: source for source, target in (m.split(":")[:2] for m in OURS[name].get("volumes", []))}
        for key, value in env.items():
            if key == "ROUNDHOUSE_DATABASE_URL":
                env[key] = self._dsn
            elif key == "ROUNDHOUSE_NATS_URL":
                env[key] = self._nats
            elif value.startswith("/"):  # a volume, or the container's own disk
                env[key] = str(self._volumes[mounts[value]] if value in mounts else self._root / name / value[1:])
            elif key.endswith("_PORT"):
                env[key] = self.ports[value]
            else:
                env[key] = "127.0.0.1" if value == "0.0.0.0" else self.address(value)
        return env

    def reached(self, name: str, condition: str) -> asyncio.Task[None]:
        """Wait (once, shared) until service `name` meets a `depends_on` condition."""
        if (name, condition) not in self._tasks:
            self._tasks[name, condition] = asyncio.create_task(self._reach(name, condition))
        return self._tasks[name, condition]

    async def _reach(self, name: str, condition: str) -> None:
        if name not in OURS:
            return  # postgres and nats: the test's own, up already
        if condition != "service_started":
            await self.reached(name, "service_started")
        if condition == "service_healthy":
            try:
                await wait_until(lambda: self.probe(name), timeout=240, interval=0.5)
            except AssertionError:
                raise AssertionError(f"{name} never healthy:\n{self.log(name).read_text()[-3000:]}") from None
        elif condition == "service_completed_successfully":
            code = await self.processes[name].wait()
            assert code == 0, f"{name} exited with {code}:\n{self.log(name).read_text()}"
        elif condition == "service_started":
            spec = OURS[name]
            await asyncio.gather(*(self.reached(dep, c["condition"]) for dep, c in spec.get("depends_on", {}).items()))
            command = [arg.replace("/app/", f"{DEPOT}/") for arg in spec["command"]]
            self.processes[name] = await self._exits.enter_async_context(
                roundhouse_process(command[0], self.environment(name), self.log(name), command[1:]))

    def log(self, name: str) -> Path:
        return self._root / f"{name}.log"

    async def probe(self, name: str, env: dict[str, str] | None = None) -> bool:
        """Run the service's health check command once (as Docker would, in its environment)."""
        if env is None and self.processes[name].returncode is not None:
            raise AssertionError(f"{name} exited:\n{self.log(name).read_text()}")
        kind, *argv = OURS[name]["healthcheck"]["test"]
        argv = [sys.executable if arg == "python" else arg for arg in argv]
        argv = argv if kind == "CMD" else ["sh", "-c", argv[0]]
        check = await asyncio.create_subprocess_exec(
            *argv, env=env or self.environment(name), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        return await asyncio.wait_for(check.wait(), 30) == 0


@pytest.mark.catalog
@pytest.mark.timeout(600)
async def test_the_compose_stack_serves_a_chat_and_an_embedding_and_every_target_exports_metrics(
    empty_database: str, nats_factory, catalog_store, tmp_path: Path,
) -> None:
    nats = nats_factory()
    async with AsyncExitStack() as exits:
        # The models volume as a previous run left it: the catalog models installed.
        compose = LocalCompose(exits, tmp_path, empty_database, nats.url, {"models": catalog_store.root})
        for name in ("registry", "router"):  # a probe of nothing serving must fail
            assert not await compose.probe(name, compose.environment(name))
        await asyncio.gather(*(compose.reached(name, "service_healthy" if "healthcheck" in spec
                                               else "service_completed_successfully")
                               for name, spec in OURS.items()))
        router = OURS["router"]["environment"]
        base_url = f"http://127.0.0.1:{compose.ports[router['ROUNDHOUSE_HTTP_PORT']]}"
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=OPERATOR_SHELL["ROUNDHOUSE_ADMIN_KEY"],
                                      max_retries=0, timeout=180) as client:
            reply = await client.chat.completions.create(
                model="smollm2-135m-instruct", max_tokens=20, temperature=0,
                messages=[{"role": "user", "content": "What is the capital of France?"}])
            assert "paris" in (reply.choices[0].message.content or "").lower()
            vectors = await client.embeddings.create(model="all-minilm-l6-v2", input=["hello", "world"])
            assert [len(d.embedding) for d in vectors.data] == [384, 384]
        await check_scrapes(compose)


async def check_scrapes(compose: LocalCompose) -> None:
    """Every target of deploy/prometheus.yml answers with roundhouse_ metrics, and the
    requests just made are counted by the router, the workers and the jobs service."""
    families: dict[str, dict[str, list]] = {}
    async with httpx.AsyncClient(timeout=10) as http:
        async def scrape_all() -> bool:
            for target in prometheus_targets():
                reply = await http.get(f"http://{compose.address(target)}/metrics")
                assert reply.status_code == 200, f"{target}: {reply.status_code}"
                families[target] = {f.name: f.samples for f in text_string_to_metric_families(reply.text)}
                assert any(n.startswith("roundhouse_") for n in families[target]), f"{target}: no roundhouse_ metric"
            return all(served(families, asset) for asset in ("smollm2-135m-instruct", "all-minilm-l6-v2"))

        await wait_until(scrape_all, timeout=30, interval=0.5)


def served(families: dict[str, dict[str, list]], asset_id: str) -> bool:
    """Whether the router, one of the workers and the jobs service saw `asset_id` served."""
    def counted(service: str, family: str, **labels: str) -> bool:
        return any(sample.value > 0 and labels.items() <= sample.labels.items()
                   for target, fams in families.items() if target.startswith(service)
                   for sample in fams.get(family, []))

    return (counted("router", "roundhouse_requests", asset_id=asset_id, status="ok")
            and counted("worker", "roundhouse_worker_requests", asset_id=asset_id, status="ok")
            and counted("jobs", "roundhouse_operations", type="load", status="succeeded"))
