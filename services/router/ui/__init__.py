"""The admin UI at `/ui`: server-rendered pages (jinja2), kept live by server-sent events and a
vendored htmx; signed in with an admin key (see `session`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from roundhouse.v1 import jobs_pb2_grpc, registry_pb2_grpc
from services.common.drain import Drain
from services.router.keys import KeyAuthenticator
from services.router.ui.actions import ModelActions
from services.router.ui.feed import EventFeed
from services.router.ui.freshness import PictureRefresh
from services.router.ui.pages import AdminUi, install_ui
from services.router.ui.session import UiSessions
from services.router.ui.views import template_environment

__all__ = ["AdminUi", "admin_ui", "install_ui"]


def admin_ui(
    *, authenticator: KeyAuthenticator | None, jobs: jobs_pb2_grpc.JobsStub,
    registry: Callable[[], registry_pb2_grpc.RegistryStub], drain: Drain,
    shadow: Callable[[str], list[dict[str, Any]]],
) -> AdminUi:
    """The UI over these parts: keys checked by `authenticator` (None: not at all), operations
    through `jobs`, disabling through `registry()`, routes' shadow summaries from `shadow`; the
    figures and live events come from the app's `stats` and `bus` (see `create_app`), and the
    feed ends when `drain` begins."""
    templates = template_environment()
    pictures = PictureRefresh()
    return AdminUi(sessions=UiSessions(authenticator), actions=ModelActions(jobs, registry),
                   feed=EventFeed(templates, drain, pictures), pictures=pictures, shadow=shadow,
                   templates=templates)
