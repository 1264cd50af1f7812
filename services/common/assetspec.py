"""The asset spec: the declared model, validated strictly.

One `AssetSpec` mirrors one YAML document of `roundhouse apply`. Validation collects every
problem with its field path; an invalid spec is rejected whole. Its field types are in
`assetspec_fields`, its `source` in `assetspec_source`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from services.common.assetspec_fields import (
    INT32_MAX,
    AssetRef,
    Count,
    Name,
    Number,
    SpecModel,
    Text,
    asset_id_value,
    check_label_keys,
)
from services.common.assetspec_source import Source
from services.common.errors import FieldProblem, InvalidSpec
from services.common.upstreams import DEFAULT_UPSTREAM_RULES, UpstreamRules

_NAMED_FIELD_RE = re.compile(r"^(?P<field>[a-z_][a-z_.]*): (?P<reason>.+)$", re.DOTALL)
_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")

Interface = Literal["llm-runtime", "embedding-runtime"]
RuntimeName = Literal["transformers", "openai", "anthropic"]
REMOTE_RUNTIMES = ("openai", "anthropic")
"""Runtimes served by a remote upstream (`source.kind: url`): OpenAI-compatible APIs, and
Anthropic's Messages API."""
Desired = Literal["on-demand", "running", "disabled"]

DEFAULT_LLM_AUTO_SLEEP_MIN = 15
DEFAULT_MIN_RESIDENT_S = 30
"""Seconds a loaded model is kept before it may be evicted for another, unless its spec says."""


class Resources(SpecModel):
    """What the asset needs to run."""

    gpu_required: bool = False
    min_vram_gb: Annotated[Number, Field(ge=0)] = 0
    memory_mb: Count | None = None
    disk_gb: Annotated[Number, Field(gt=0)] | None = None


class Lifecycle(SpecModel):
    """How the asset is kept loaded. Defaults depend on the interface (see AssetSpec)."""

    desired: Desired | None = None
    auto_sleep_min: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    min_resident_s: Annotated[int, Field(ge=0, le=86_400)] = DEFAULT_MIN_RESIDENT_S
    """Seconds a loaded model stays before it may be evicted for another (hysteresis: two
    on-demand models that do not fit together are not reloaded on every request)."""


class Policy(SpecModel):
    """Admission limits the router enforces for the asset."""

    max_concurrency: Annotated[int, Field(ge=1, le=10_000)] = 4
    max_queue: Annotated[int, Field(ge=0, le=1_000_000)] = 64
    queue_timeout_s: Annotated[Number, Field(gt=0, le=86_400)] = 30.0


class Generation(SpecModel):
    """Defaults for chat requests that leave these unset (a model card's recommendation)."""

    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    max_tokens: Count | None = None


class Pricing(SpecModel):
    """What the model costs, in US dollars per million tokens; API keys' dollar budgets are
    charged from it (an asset without pricing costs nothing)."""

    input_per_1m: Annotated[Number, Field(ge=0, le=1_000_000)] = 0.0
    """Per million prompt tokens."""
    output_per_1m: Annotated[Number, Field(ge=0, le=1_000_000)] = 0.0
    """Per million completion tokens."""


class Metadata(SpecModel):
    """Descriptive facts; values detected at load fill the gaps."""

    context_length: Count | None = None
    embedding_dim: Count | None = None
    precision: Name = ""
    quantization: Name = ""
    family: Name = ""
    license: Name = ""
    description: Text = ""


class AssetSpec(SpecModel):
    """A declared model asset. Build with `parse_spec` to get every problem at once."""

    asset_id: AssetRef
    display_name: Name = ""
    version: Name = ""
    asset_class: Literal["model"] = Field("model", alias="class")
    interface: list[Interface]
    interface_version: Annotated[Name, Field(min_length=1)] = "v1"
    runtime: RuntimeName = "transformers"
    source: Source
    resources: Resources = Resources()
    lifecycle: Lifecycle = Lifecycle()
    policy: Policy = Policy()
    generation: Generation = Generation()
    metadata: Metadata = Metadata()
    pricing: Pricing | None = None
    aliases: Annotated[list[Name], Field(max_length=64)] = []
    labels: Annotated[dict[Name, Name], Field(max_length=64)] = {}

    @field_validator("interface", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("interface")
    @classmethod
    def _interfaces(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one interface is required")
        if len(set(value)) != len(value):
            raise ValueError("interfaces must not repeat")
        return value

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, value: list[str]) -> list[str]:
        for alias in value:
            try:
                asset_id_value(alias)
            except ValueError as exc:
                raise ValueError(f"alias {alias!r} {exc}") from None
        if len(set(value)) != len(value):
            raise ValueError("aliases must not repeat")
        return value

    _labels = field_validator("labels")(check_label_keys)

    @model_validator(mode="after")
    def _coherent(self) -> AssetSpec:
        if self.asset_id in self.aliases:
            raise ValueError("aliases: an alias must differ from the asset id")
        remote = self.runtime in REMOTE_RUNTIMES
        if remote != (self.source.kind == "url"):
            named = f"'{self.runtime}'" if remote else "'openai' or 'anthropic'"
            raise ValueError(f"runtime: {named} goes with source kind 'url', and only with it")
        if self.runtime == "anthropic":
            _check_anthropic(self)
        if self.lifecycle.auto_sleep_min and self.lifecycle.desired in ("running", "disabled"):
            raise ValueError(
                f"lifecycle.auto_sleep_min: applies to on-demand assets only, "
                f"not to '{self.lifecycle.desired}' ones"
            )
        return self

    @property
    def desired(self) -> Desired:
        """The desired state, defaulted: LLMs on-demand, embedding-only models running."""
        if self.lifecycle.desired:
            return self.lifecycle.desired
        return "on-demand" if "llm-runtime" in self.interface else "running"

    @property
    def auto_sleep_min(self) -> int:
        """Minutes idle before sleep; 0 for never (always 0 unless on-demand)."""
        if self.desired != "on-demand":
            return 0
        if self.lifecycle.auto_sleep_min is not None:
            return self.lifecycle.auto_sleep_min
        return DEFAULT_LLM_AUTO_SLEEP_MIN

    def to_document(self) -> dict[str, Any]:
        """The spec as a plain JSON-able dict, YAML field names, defaults filled in."""
        doc = self.model_dump(mode="json", by_alias=True)
        doc["lifecycle"] = {"desired": self.desired, "auto_sleep_min": self.auto_sleep_min,
                            "min_resident_s": self.lifecycle.min_resident_s}
        if self.pricing is None:
            del doc["pricing"]
        return doc


def _check_anthropic(spec: AssetSpec) -> None:
    """An Anthropic Messages API asset chats only, at temperatures Anthropic takes (0 to 1)."""
    if spec.interface != ["llm-runtime"]:
        raise ValueError("interface: runtime 'anthropic' serves llm-runtime only")
    temperature = spec.generation.temperature
    if temperature is not None and temperature > 1:
        raise ValueError("generation.temperature: runtime 'anthropic' takes 0 to 1")


def parse_spec(
    document: Any, *, source_roots: Sequence[str | Path] | None = None,
    upstreams: UpstreamRules | None = DEFAULT_UPSTREAM_RULES,
) -> AssetSpec:
    """Validate one document (a dict) into an `AssetSpec`.

    `upstreams` bounds the key variable and URL of `url` sources (the settings' rules when
    applying; None only for a spec already checked when it was applied).
    Raises `InvalidSpec` listing every problem with its field path.
    """
    if not isinstance(document, dict):
        raise InvalidSpec.from_problems(
            [FieldProblem("", f"expected a mapping, got {type(document).__name__}")]
        )
    context = {"source_roots": [str(r) for r in source_roots or []], "upstreams": upstreams}
    try:
        return AssetSpec.model_validate(document, context=context)
    except ValidationError as exc:
        raise InvalidSpec.from_problems(problems_from(exc)) from None


def problems_from(exc: ValidationError) -> list[FieldProblem]:
    """Turn pydantic errors into field problems with dotted paths and plain reasons."""
    problems = []
    for err in exc.errors(include_url=False):
        path = _path(err["loc"])
        reason = err["msg"].removeprefix("Value error, ")
        # Cross-field checks name their field at the start of the message.
        named = _NAMED_FIELD_RE.match(reason)
        if named:
            path = ".".join(p for p in (path, named["field"]) if p)
            reason = named["reason"]
        if err["type"] == "extra_forbidden":
            reason = "unknown field"
        elif err["type"] == "missing":
            reason = "required field is missing"
        problems.append(FieldProblem(path, reason))
    return problems


def _path(loc: Sequence[int | str]) -> str:
    """`source.path`, `interface[0]`, `labels['a b']`: a pydantic location as a field path.
    A key that is no plain name is quoted, so an empty or odd one is still shown."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]" or part.startswith("function-"):
            continue  # pydantic's markers (a mapping's key, a validator), not fields
        elif _PLAIN_KEY_RE.match(part):
            path += f".{part}" if path else part
        else:
            path += f"[{part!r}]"
    return path
