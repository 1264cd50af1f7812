"""deploy/docker-compose.yml names commands and settings that exist.

No Docker engine runs on our machines, so this reads the file and checks each Roundhouse
service's command against the real CLI parser and its environment against the real
settings classes: a typo in either would only show up at deploy time otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from services.cli.main import build_parser
from services.jobs.settings import JobsSettings
from services.registry.settings import RegistrySettings
from services.router.settings import RouterSettings
from services.worker.settings import WorkerSettings

COMPOSE = Path(__file__).resolve().parents[1] / "deploy" / "docker-compose.yml"
SETTINGS = {"registry": RegistrySettings, "router": RouterSettings, "worker": WorkerSettings,
            "jobs": JobsSettings}
OPERATOR_SHELL = {"ROUNDHOUSE_ADMIN_KEY": "rh-" + "k" * 43}
"""What the operator's shell holds when it runs compose (variables the file interpolates)."""
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::?[-?][^}]*)?\}")


def interpolated(value: object) -> str:
    """`value` as compose would pass it: `${NAME...}` replaced from `OPERATOR_SHELL`."""
    return INTERPOLATION.sub(lambda m: OPERATOR_SHELL[m["name"]], str(value))


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_every_service_of_ours_runs_a_real_command(services: dict[str, dict]) -> None:
    ours = {name: spec for name, spec in services.items() if spec.get("image") == "roundhouse:latest"}
    assert set(SETTINGS) <= set(ours), "every service has a compose entry"
    for name, spec in ours.items():
        args = build_parser().parse_args(spec["command"])
        assert callable(args.func), name


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_environment_names_real_settings(
    services: dict[str, dict], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The services share one environment block, so a variable must exist in some service.
    known = set().union(*(cls.model_fields for cls in SETTINGS.values()))
    env = services[name]["environment"]
    unknown = [key for key in env if key.removeprefix("ROUNDHOUSE_").lower() not in known]
    assert not unknown, f"{name}: settings that do not exist: {unknown}"
    for key, value in env.items():
        monkeypatch.setenv(key, interpolated(value))
    settings = SETTINGS[name]()  # parsed exactly as the service would parse its environment
    assert settings.resolved_database_url().startswith("postgresql://")
    assert settings.resolved_nats_url().startswith("nats://")


def test_the_router_takes_its_admin_key_from_the_operator_never_from_the_file(
    services: dict[str, dict],
) -> None:
    router = services["router"]["environment"]
    assert router["ROUNDHOUSE_ADMIN_KEY"].startswith("${ROUNDHOUSE_ADMIN_KEY:?")
    assert router.get("ROUNDHOUSE_AUTH", "enabled") == "enabled"
