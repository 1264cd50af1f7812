"""Asset spec validation: what an operator sees when a YAML document is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.asset_proto import spec_from_proto, spec_to_proto
from services.common.assetspec import parse_spec
from services.common.documents import load_path, parse_yaml
from services.common.errors import InvalidSpec

CATALOG = Path(__file__).resolve().parents[1] / "deploy" / "catalog"


def valid(**changes: object) -> dict:
    doc = {
        "asset_id": "tiny-chat",
        "interface": "llm-runtime",
        "source": {"kind": "pypi", "package": "some-model"},
    }
    doc.update(changes)
    return doc


def problems(doc: object, roots: list[Path] | None = None) -> list[str]:
    with pytest.raises(InvalidSpec) as info:
        parse_spec(doc, source_roots=roots)
    return [str(p) for p in info.value.problems]


def test_catalog_is_valid_and_defaults_follow_interface() -> None:
    specs = {s.spec.asset_id: s.spec for s in load_path(CATALOG)}
    assert set(specs) == {"smollm2-135m-instruct", "all-minilm-l6-v2"}
    assert specs["smollm2-135m-instruct"].desired == "on-demand"
    assert specs["all-minilm-l6-v2"].desired == "running"
    assert parse_spec(valid()).auto_sleep_min == 15


def test_proto_roundtrip_keeps_every_field() -> None:
    for loaded in load_path(CATALOG):
        back = spec_from_proto(spec_to_proto(loaded.spec))
        assert back.to_document() == loaded.spec.to_document()


def test_pricing_takes_yaml_integers_and_travels_over_grpc() -> None:
    spec = parse_spec(valid(pricing={"input_per_1m": 2, "output_per_1m": 0.5}))
    assert spec.pricing is not None and spec.pricing.input_per_1m == 2.0
    back = spec_from_proto(spec_to_proto(spec))
    assert back.pricing == spec.pricing
    assert spec_from_proto(spec_to_proto(parse_spec(valid()))).pricing is None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"asset_id": "Bad ID"}, "asset_id: must match"),
        ({"interface": "speech"}, "interface[0]: Input should be 'llm-runtime'"),
        ({"policy": {"max_concurrency": 0}}, "policy.max_concurrency: Input should be greater"),
        ({"policy": {"max_queue": -1}}, "policy.max_queue: Input should be greater"),
        ({"policy": {"queue_timeout_s": 0}}, "policy.queue_timeout_s: Input should be greater"),
        ({"resources": {"memory_mb": -5}}, "resources.memory_mb: Input should be greater"),
        ({"policy": {"max_concurrency": "4"}}, "policy.max_concurrency: Input should be a valid"),
        ({"lifecycle": {"desired": "running", "auto_sleep_min": 5}},
         "lifecycle.auto_sleep_min: applies to on-demand assets only"),
        ({"source": {"kind": "path", "path": "models/../../etc"}}, "source.path: path must not"),
        ({"source": {"kind": "path", "path": "/etc/passwd"}}, "source.path: absolute path is outside"),
        ({"source": {"kind": "pypi"}}, "source: source kind 'pypi' needs 'package'"),
        ({"runtime": "openai"}, "runtime: 'openai' goes with source kind 'url'"),
        ({"colour": "red"}, "colour: unknown field"),
        ({"metadata": {"description": "x" * 5000}}, "metadata.description: String should have"),
        ({"pricing": {"input_per_1m": -1}}, "pricing.input_per_1m: Input should be greater"),
        ({"pricing": {"per_token": 1}}, "pricing.per_token: unknown field"),
    ],
)
def test_bad_field_is_named_with_reason(change: dict, expected: str) -> None:
    assert any(p.startswith(expected) for p in problems(valid(**change))), problems(valid(**change))


def test_every_problem_is_reported_at_once() -> None:
    found = problems(valid(asset_id="UPPER", policy={"max_concurrency": -1}, extra=1))
    assert len(found) == 3


def test_absolute_path_inside_allowed_root_is_accepted(tmp_path: Path) -> None:
    doc = valid(source={"kind": "path", "path": str(tmp_path / "m")})
    assert parse_spec(doc, source_roots=[tmp_path]).source.path.endswith("/m")
    assert problems(doc, roots=[tmp_path / "elsewhere"])


def test_yaml_alias_bomb_is_refused_without_expanding() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9)
    )
    with pytest.raises(InvalidSpec, match="aliases are not allowed"):
        parse_yaml(bomb, "bomb.yaml")


def test_oversized_document_is_refused() -> None:
    text = "asset_id: big\ndescription: " + "x" * (50 * 1024 * 1024) + "\n"
    with pytest.raises(InvalidSpec, match="larger than"):
        parse_yaml(text, "big.yaml")


def test_duplicate_ids_across_files_are_refused(tmp_path: Path) -> None:
    doc = "asset_id: same\ninterface: llm-runtime\nsource: {kind: pypi, package: p}\n"
    (tmp_path / "a.yaml").write_text(doc)
    (tmp_path / "b.yaml").write_text(doc)
    with pytest.raises(InvalidSpec, match="duplicate id 'same'"):
        load_path(tmp_path)


def test_problems_name_file_and_document(tmp_path: Path) -> None:
    (tmp_path / "two.yaml").write_text(
        "asset_id: ok\ninterface: llm-runtime\nsource: {kind: pypi, package: p}\n---\n"
        "asset_id: bad\ninterface: llm-runtime\nsource: {kind: pypi, package: p}\n"
        "policy: {max_concurrency: 0}\n"
    )
    with pytest.raises(InvalidSpec) as info:
        load_path(tmp_path)
    assert [str(p) for p in info.value.problems] == [
        f"{tmp_path / 'two.yaml'}#2: policy.max_concurrency: Input should be greater than or equal to 1"
    ]
