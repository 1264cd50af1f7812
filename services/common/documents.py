"""Reading asset YAML safely: size limits, no aliases, one asset per document."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.common.assetspec import AssetSpec
from services.common.errors import FieldProblem, InvalidSpec
from services.common.routespec import RouteSpec, parse_document
from services.common.upstreams import DEFAULT_UPSTREAM_RULES, UpstreamRules

MAX_FILE_BYTES = 1024 * 1024
MAX_DOCUMENTS = 1000
YAML_SUFFIXES = (".yaml", ".yml")


class _NoAliasLoader(yaml.SafeLoader):
    """A safe loader that refuses anchors and aliases (they enable 'billion laughs' bombs)."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(
                "while composing a node", None, "aliases are not allowed", event.start_mark
            )
        return super().compose_node(parent, index)


@dataclass(frozen=True)
class LoadedSpec:
    """An asset spec (a model's or a route's) and where it came from (`file#n`), for error
    messages."""

    origin: str
    spec: AssetSpec | RouteSpec


def parse_yaml(
    text: str, origin: str, *, source_roots: list[Path] | None = None,
    upstreams: UpstreamRules = DEFAULT_UPSTREAM_RULES,
) -> list[LoadedSpec]:
    """Parse a YAML stream of asset documents; collects problems from every document."""
    if len(text.encode()) > MAX_FILE_BYTES:
        raise InvalidSpec.from_problems(
            [FieldProblem(origin, f"document is larger than {MAX_FILE_BYTES // 1024} KiB")]
        )
    try:
        documents = [d for d in yaml.load_all(text, Loader=_NoAliasLoader) if d is not None]
    except yaml.YAMLError as exc:
        raise InvalidSpec.from_problems([FieldProblem(origin, f"invalid YAML: {exc}")]) from None
    except RecursionError:
        raise InvalidSpec.from_problems([FieldProblem(origin, "invalid YAML: nested too deeply")]) from None
    if len(documents) > MAX_DOCUMENTS:
        raise InvalidSpec.from_problems(
            [FieldProblem(origin, f"more than {MAX_DOCUMENTS} documents")]
        )
    loaded, problems = [], []
    for n, document in enumerate(documents, start=1):
        where = f"{origin}#{n}" if len(documents) > 1 else origin
        try:
            loaded.append(LoadedSpec(where, parse_document(document, source_roots=source_roots,
                                                                upstreams=upstreams)))
        except InvalidSpec as exc:
            problems += [FieldProblem(f"{where}: {p.path}".rstrip(": "), p.reason) for p in exc.problems]
    if problems:
        raise InvalidSpec.from_problems(problems)
    return loaded


def load_path(
    path: Path, *, source_roots: list[Path] | None = None,
    upstreams: UpstreamRules = DEFAULT_UPSTREAM_RULES,
) -> list[LoadedSpec]:
    """Load a YAML file, or every `*.yaml`/`*.yml` file of a folder (sorted), all or nothing.

    Rejects duplicate asset ids across the whole set.
    """
    files = sorted(p for p in path.iterdir() if p.suffix in YAML_SUFFIXES) if path.is_dir() else [path]
    loaded, problems = [], []
    for file in files:
        if file.stat().st_size > MAX_FILE_BYTES:
            problems.append(FieldProblem(str(file), f"file is larger than {MAX_FILE_BYTES // 1024} KiB"))
            continue
        try:
            loaded += parse_yaml(file.read_text(), str(file), source_roots=source_roots,
                                 upstreams=upstreams)
        except InvalidSpec as exc:
            problems += exc.problems
        except UnicodeDecodeError:
            problems.append(FieldProblem(str(file), "not UTF-8 text"))
    problems += duplicate_problems([(item.origin, item.spec.asset_id) for item in loaded])
    if problems:
        raise InvalidSpec.from_problems(problems)
    return loaded


def duplicate_problems(ids: list[tuple[str, str]]) -> list[FieldProblem]:
    """One problem for each asset id that appears more than once."""
    seen: dict[str, str] = {}
    problems = []
    for origin, asset_id in ids:
        if asset_id in seen:
            problems.append(
                FieldProblem(f"{origin}: asset_id", f"duplicate id {asset_id!r} (also in {seen[asset_id]})")
            )
        else:
            seen[asset_id] = origin
    return problems
