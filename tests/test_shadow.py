"""Shadow traffic bookkeeping: sampling, the bound on copies in flight, background copies that
never touch the caller, pairing with the primary, agreement, metrics and the admin endpoint.

Plain coroutine functions stand in for the two sides; the copies run as real asyncio tasks.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from polling import wait_until
from prometheus_client import CollectorRegistry

from services.common.routespec import Shadow
from services.router.http.errors import install_error_handlers
from services.router.http.shadow import shadow_router
from services.router.routes.shadow import (
    COMPARE_STEP_VALUES,
    LATENCY_WINDOW,
    ShadowTraffic,
    SideOutcome,
    compare,
)

ROUTE, CANDIDATE = "chat", "candidate"


def resolved(outcome: SideOutcome) -> asyncio.Future[SideOutcome]:
    future: asyncio.Future[SideOutcome] = asyncio.get_running_loop().create_future()
    future.set_result(outcome)
    return future


def pending() -> asyncio.Future[SideOutcome]:
    return asyncio.get_running_loop().create_future()


def answering(outcome: SideOutcome) -> Callable[[], Awaitable[SideOutcome]]:
    async def run() -> SideOutcome:
        return outcome
    return run


def held(release: asyncio.Event, outcome: SideOutcome,
         started: asyncio.Event | None = None) -> Callable[[], Awaitable[SideOutcome]]:
    """A copy that answers `outcome` once `release` is set."""
    async def run() -> SideOutcome:
        if started is not None:
            started.set()
        await release.wait()
        return outcome
    return run


def target(traffic: ShadowTraffic, asset: str = CANDIDATE, route: str = ROUTE) -> dict[str, Any]:
    [found] = [t for t in traffic.summary(route) if t["asset"] == asset]
    return found


async def copies_reach(traffic: ShadowTraffic, n: int, asset: str = CANDIDATE) -> dict[str, Any]:
    await wait_until(lambda: traffic.summary(ROUTE) and target(traffic, asset)["copies"] >= n)
    return target(traffic, asset)


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def traffic(registry: CollectorRegistry) -> AsyncIterator[ShadowTraffic]:
    shadow = ShadowTraffic(max_in_flight=2, rng=random.Random(20261130), registry=registry)
    yield shadow
    await shadow.close()


def test_the_sample_share_is_copied() -> None:
    traffic = ShadowTraffic(rng=random.Random(3))
    n = 2000
    drawn = sum(traffic.sampled(Shadow(asset=CANDIDATE, sample=0.2)) for _ in range(n))
    assert abs(drawn - n * 0.2) <= 4 * math.sqrt(n * 0.2 * 0.8)
    assert not any(traffic.sampled(Shadow(asset=CANDIDATE, sample=0)) for _ in range(500))
    assert all(traffic.sampled(Shadow(asset=CANDIDATE, sample=1)) for _ in range(500))


async def test_a_copy_runs_in_the_background_and_is_recorded_when_both_sides_end(
        traffic: ShadowTraffic) -> None:
    release, started = asyncio.Event(), asyncio.Event()
    primary = pending()
    assert traffic.submit(ROUTE, CANDIDATE, primary,
                          held(release, SideOutcome(0.2, 5, 3, text="hi"), started))
    await started.wait()
    assert target(traffic)["running"] == 1 and target(traffic)["copies"] == 0

    release.set()  # the shadow answers while the primary is still streaming
    await wait_until(lambda: target(traffic)["running"] == 0)
    assert target(traffic)["copies"] == 0

    primary.set_result(SideOutcome(0.1, 5, 3, text="hi"))
    summary = await copies_reach(traffic, 1)
    assert summary["shadow"] == {"latency_ms": {"p50": 200.0, "p95": 200.0},
                                 "prompt_tokens": 5, "completion_tokens": 3}
    assert summary["primary"]["latency_ms"] == {"p50": 100.0, "p95": 100.0}
    assert summary["agreement"] == {"kind": "exact_match", "compared": 1, "not_compared": 0,
                                    "value": 1.0}


async def test_copies_beyond_the_bound_are_dropped_and_counted(
        traffic: ShadowTraffic, registry: CollectorRegistry) -> None:
    release = asyncio.Event()
    answer = SideOutcome(0.01, text="x")
    accepted = [traffic.submit(ROUTE, CANDIDATE, resolved(answer), held(release, answer))
                for _ in range(3)]
    assert accepted == [True, True, False]
    # The bound is per shadow asset: another one of the same route still takes copies.
    assert traffic.submit(ROUTE, "other", resolved(answer), held(release, answer))
    assert target(traffic)["dropped"] == {"saturated": 1}
    assert metric(registry, "roundhouse_shadow_requests_total", route=ROUTE, shadow=CANDIDATE,
                  result="dropped_saturated") == 1

    release.set()
    await copies_reach(traffic, 2)
    await wait_until(lambda: target(traffic)["running"] == 0)
    assert traffic.submit(ROUTE, CANDIDATE, resolved(answer), answering(answer))
    summary = await copies_reach(traffic, 3)
    assert summary["dropped"] == {"saturated": 1} and summary["errors"] == 0
    assert metric(registry, "roundhouse_shadow_requests_total", route=ROUTE, shadow=CANDIDATE,
                  result="ok") == 3


async def test_skipped_copies_are_counted_by_reason(
        traffic: ShadowTraffic, registry: CollectorRegistry) -> None:
    traffic.skipped(ROUTE, CANDIDATE, "asleep")
    traffic.skipped(ROUTE, CANDIDATE, "asleep")
    summary = target(traffic)
    assert summary["dropped"] == {"asleep": 2} and summary["copies"] == 0
    assert metric(registry, "roundhouse_shadow_requests_total", route=ROUTE, shadow=CANDIDATE,
                  result="dropped_asleep") == 2


async def test_greedy_chat_agreement_is_the_exact_match_rate(
        traffic: ShadowTraffic, registry: CollectorRegistry) -> None:
    pairs = [("Paris", "Paris"), ("Paris", "Paris."), ("4", "4"), ("yes", "yes")]
    for done, (primary, shadow) in enumerate(pairs, start=1):
        traffic.submit(ROUTE, CANDIDATE, resolved(SideOutcome(0.1, text=primary)),
                       answering(SideOutcome(0.1, text=shadow)))
        await copies_reach(traffic, done)
    # A sampled answer says nothing by matching or not.
    traffic.submit(ROUTE, CANDIDATE, resolved(SideOutcome(0.1, text="a", greedy=False)),
                   answering(SideOutcome(0.1, text="b", greedy=False)))
    summary = await copies_reach(traffic, 5)
    assert summary["agreement"] == {"kind": "exact_match", "compared": 4, "not_compared": 1,
                                    "value": 0.75}
    assert metric(registry, "roundhouse_shadow_agreement", route=ROUTE, shadow=CANDIDATE) == 0.75


async def test_embedding_agreement_is_the_mean_cosine_over_inputs(traffic: ShadowTraffic) -> None:
    async def pair(primary: list[list[float]], shadow: list[list[float]]) -> dict[str, Any]:
        before = target(traffic)["copies"] if traffic.summary(ROUTE) else 0
        traffic.submit(ROUTE, CANDIDATE, resolved(SideOutcome(0.01, 4, vectors=primary)),
                       answering(SideOutcome(0.02, 4, vectors=shadow)))
        return await copies_reach(traffic, before + 1)

    # One input the same direction (1), one orthogonal (0): the pair agrees 0.5.
    summary = await pair([[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [1.0, 0.0]])
    assert summary["agreement"]["kind"] == "cosine"
    assert summary["agreement"]["value"] == pytest.approx(0.5)
    summary = await pair([[0.6, 0.8]], [[0.6, 0.8]])
    assert summary["agreement"]["value"] == pytest.approx(0.75)
    # A shadow with another vector size cannot be compared, nor can a zero vector.
    await pair([[1.0, 0.0]], [[1.0, 0.0, 0.0]])
    summary = await pair([[1.0, 0.0]], [[0.0, 0.0]])
    assert summary["agreement"]["compared"] == 2 and summary["agreement"]["not_compared"] == 2
    assert summary["shadow"]["prompt_tokens"] == 16


async def test_large_batches_are_compared_exactly_in_steps() -> None:
    n = 3 * COMPARE_STEP_VALUES  # rows of two: six steps
    primary = [[1.0, float(i)] for i in range(n)]
    shadow = primary[:-1] + [[-1.0, -1.0]]
    compared = await compare(SideOutcome(0.1, vectors=primary), SideOutcome(0.1, vectors=shadow))
    last = -(1.0 + (n - 1)) / (math.sqrt(2) * math.hypot(1, n - 1))
    assert compared == ("cosine", pytest.approx((n - 1 + last) / n))
    # A step of another width than the first is a shape mismatch too.
    wider = primary[:COMPARE_STEP_VALUES // 2] + [[1.0, 2.0, 3.0]] * (COMPARE_STEP_VALUES // 3)
    assert await compare(SideOutcome(0.1, vectors=wider), SideOutcome(0.1, vectors=wider)) == ("cosine", None)


async def test_compare_names_no_kind_without_answers() -> None:
    assert await compare(SideOutcome(0.1), SideOutcome(0.1)) is None


async def test_a_failed_primary_leaves_a_shadow_only_record(traffic: ShadowTraffic) -> None:
    abandoned = pending()
    traffic.submit(ROUTE, CANDIDATE, abandoned, answering(SideOutcome(0.3, 7, 2, text="ok")))
    abandoned.cancel()
    failed = pending()
    failed.set_exception(RuntimeError("worker gone"))
    traffic.submit(ROUTE, CANDIDATE, failed, answering(SideOutcome(0.3, 7, 2, text="ok")))
    summary = await copies_reach(traffic, 2)
    assert summary["primary"] == {"latency_ms": {"p50": None, "p95": None},
                                  "prompt_tokens": 0, "completion_tokens": 0}
    assert summary["shadow"]["completion_tokens"] == 4
    assert summary["agreement"] == {"kind": None, "compared": 0, "not_compared": 0, "value": None}


async def test_a_failing_copy_is_recorded_and_never_raises(
        traffic: ShadowTraffic, registry: CollectorRegistry) -> None:
    async def broken() -> SideOutcome:
        raise ConnectionResetError("shadow worker went away")

    def not_even_a_coroutine() -> Awaitable[SideOutcome]:
        raise ValueError("bad request")

    ok = SideOutcome(0.1, 3, 1, text="fine")
    assert traffic.submit(ROUTE, CANDIDATE, resolved(ok), broken)
    assert traffic.submit(ROUTE, CANDIDATE, resolved(ok), not_even_a_coroutine)
    summary = await copies_reach(traffic, 2)
    assert summary["errors"] == 2
    assert summary["shadow"]["latency_ms"]["p50"] is None
    assert summary["primary"]["prompt_tokens"] == 6
    assert summary["agreement"]["compared"] == 0
    assert metric(registry, "roundhouse_shadow_requests_total", route=ROUTE, shadow=CANDIDATE,
                  result="error") == 2


async def test_latency_percentiles_cover_a_bounded_window_of_recent_copies(
        registry: CollectorRegistry) -> None:
    traffic = ShadowTraffic(max_in_flight=4 * LATENCY_WINDOW, registry=registry)
    try:
        old = [SideOutcome(5.0)] * LATENCY_WINDOW
        recent = [SideOutcome((i + 1) / 1000) for i in range(100)] * (LATENCY_WINDOW // 100)
        for outcome in old + recent:
            assert traffic.submit(ROUTE, CANDIDATE, resolved(SideOutcome(0.5)), answering(outcome))
        summary = await copies_reach(traffic, 2 * LATENCY_WINDOW)
    finally:
        await traffic.close()
    # Only the most recent window counts: 1..100 ms, ten times over.
    assert summary["shadow"]["latency_ms"]["p50"] == pytest.approx(50.5, abs=0.5)
    assert summary["shadow"]["latency_ms"]["p95"] == pytest.approx(95.0, abs=0.5)
    assert summary["primary"]["latency_ms"] == {"p50": 500.0, "p95": 500.0}
    count = metric(registry, "roundhouse_shadow_latency_seconds_count", route=ROUTE,
                   shadow=CANDIDATE, side="shadow")
    assert count == 2 * LATENCY_WINDOW


async def test_token_counters_per_side(traffic: ShadowTraffic, registry: CollectorRegistry) -> None:
    traffic.submit(ROUTE, CANDIDATE, resolved(SideOutcome(0.1, 10, 20, text="a")),
                   answering(SideOutcome(0.1, 10, 35, text="b")))
    await copies_reach(traffic, 1)
    tokens = "roundhouse_shadow_tokens_total"
    assert metric(registry, tokens, route=ROUTE, shadow=CANDIDATE, side="primary", type="completion") == 20
    assert metric(registry, tokens, route=ROUTE, shadow=CANDIDATE, side="shadow", type="completion") == 35
    assert metric(registry, tokens, route=ROUTE, shadow=CANDIDATE, side="shadow", type="prompt") == 10


async def test_close_cancels_running_copies_and_refuses_new_ones(registry: CollectorRegistry) -> None:
    traffic = ShadowTraffic(registry=registry)
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def endless() -> SideOutcome:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    # The primaries have answered: a copy cut short by the shutdown would be recorded at once.
    assert traffic.submit(ROUTE, CANDIDATE, resolved(SideOutcome(0.1)), endless)
    await started.wait()
    assert traffic.submit(ROUTE, CANDIDATE, resolved(SideOutcome(0.1)), endless)
    await traffic.close()  # before the second copy has had a step: it never starts
    assert cancelled.is_set()
    assert not traffic.submit(ROUTE, CANDIDATE, pending(), endless)
    summary = target(traffic)
    assert summary["running"] == 0
    assert summary["copies"] == 0 and summary["errors"] == 0
    assert summary["dropped"] == {"shutting_down": 1}


async def test_submit_without_an_event_loop_returns_false() -> None:
    traffic = ShadowTraffic()
    answer = SideOutcome(0.1)
    loop_future = pending()
    result = await asyncio.to_thread(traffic.submit, ROUTE, CANDIDATE, loop_future, answering(answer))
    assert result is False


class Routes:
    """Which route ids exist, as the app would say from the registry."""

    def __init__(self, *ids: str) -> None:
        self.ids, self.asked = set(ids), 0

    async def known(self, route_id: str) -> bool:
        self.asked += 1
        return route_id in self.ids


@pytest.fixture
async def admin(traffic: ShadowTraffic) -> AsyncIterator[tuple[httpx.AsyncClient, Routes]]:
    routes = Routes(ROUTE, "quiet")
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(shadow_router(traffic, routes.known))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://router") as client:
        yield client, routes


async def test_admin_endpoint_shows_a_summary_per_shadow_asset(
        traffic: ShadowTraffic, admin: tuple[httpx.AsyncClient, Routes]) -> None:
    client, _ = admin
    traffic.submit(ROUTE, CANDIDATE, resolved(SideOutcome(0.1, 2, 1, text="a")),
                   answering(SideOutcome(0.2, 2, 1, text="a")))
    traffic.skipped(ROUTE, "sleepy", "asleep")
    await copies_reach(traffic, 1)
    response = await client.get(f"/admin/v1/routes/{ROUTE}/shadow")
    assert response.status_code == 200
    body = response.json()
    assert body["route"] == ROUTE
    assert [t["asset"] for t in body["shadow"]] == [CANDIDATE, "sleepy"]
    candidate, sleepy = body["shadow"]
    assert candidate["copies"] == 1 and candidate["agreement"]["value"] == 1.0
    assert candidate["shadow"]["latency_ms"]["p50"] == 200.0
    assert sleepy["dropped"] == {"asleep": 1} and sleepy["copies"] == 0


async def test_admin_endpoint_empty_for_a_quiet_route_and_404_for_an_unknown_one(
        admin: tuple[httpx.AsyncClient, Routes]) -> None:
    client, routes = admin
    quiet = await client.get("/admin/v1/routes/quiet/shadow")
    assert quiet.status_code == 200 and quiet.json() == {"route": "quiet", "shadow": []}
    unknown = await client.get("/admin/v1/routes/no-such-route/shadow")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "not_found"
    assert "no-such-route" in unknown.json()["error"]["message"]
    invalid = await client.get("/admin/v1/routes/Not%20An%20Id/shadow")
    assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "route_id"


async def test_admin_endpoint_answers_from_data_without_asking_the_registry(
        traffic: ShadowTraffic, admin: tuple[httpx.AsyncClient, Routes]) -> None:
    client, routes = admin
    traffic.skipped("deleted-route", CANDIDATE, "asleep")
    response = await client.get("/admin/v1/routes/deleted-route/shadow")
    assert response.status_code == 200 and response.json()["shadow"][0]["dropped"] == {"asleep": 1}
    assert routes.asked == 0


async def test_admin_endpoint_is_documented_with_its_errors(
        admin: tuple[httpx.AsyncClient, Routes]) -> None:
    client, _ = admin
    document = (await client.get("/openapi.json")).json()
    operation = document["paths"]["/admin/v1/routes/{route_id}/shadow"]["get"]
    assert {"200", "400", "404", "503"} <= set(operation["responses"])
