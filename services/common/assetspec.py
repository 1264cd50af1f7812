"""The asset spec: the declared model, validated strictly.

One `AssetSpec` mirrors one YAML document of `roundhouse apply` (design.md §3). Validation
collects every problem with its field path; an invalid spec is rejected whole.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from services.common.errors import FieldProblem, InvalidArgument, InvalidSpec
from services.common.request_text import NUL_REASON, shown
from services.common.upstreams import DEFAULT_UPSTREAM_RULES, UpstreamRules

ASSET_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
PACKAGE_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAMED_FIELD_RE = re.compile(r"^(?P<field>[a-z_][a-z_.]*): (?P<reason>.+)$", re.DOTALL)
_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,62}[A-Za-z0-9])?$")

Interface = Literal["llm-runtime", "embedding-runtime"]
RuntimeName = Literal["transformers", "openai"]
SourceKindName = Literal["path", "gguf", "pypi", "hf", "url"]
Desired = Literal["on-demand", "running", "disabled"]

DEFAULT_LLM_AUTO_SLEEP_MIN = 15
DEFAULT_MIN_RESIDENT_S = 30
"""Seconds a loaded model is kept before it may be evicted for another, unless its spec says."""
INT32_MAX = 2**31 - 1
"""The largest count a spec may hold: its integers travel as `int32` (asset.proto)."""


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError(NUL_REASON)
    return value


Name = Annotated[str, Field(max_length=256), AfterValidator(_no_nul)]
Text = Annotated[str, Field(max_length=4096), AfterValidator(_no_nul)]
Count = Annotated[int, Field(gt=0, le=INT32_MAX)]
"""A positive integer that fits the wire."""


def _int_is_number(value: Any) -> Any:
    # YAML writes `1` for one GiB; strict mode would refuse an int for a float field.
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return value  # beyond any float: refused as not a valid number
    return value


Number = Annotated[float, BeforeValidator(_int_is_number)]
"""A float field that takes a YAML integer too; never NaN nor infinite (see `_Strict`)."""


class _Strict(BaseModel):
    # No NaN nor infinity: JSON has neither, so a spec holding one could not be written back.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True,
                              allow_inf_nan=False)


def _safe_relative(value: str, what: str) -> str:
    parts = PurePosixPath(value).parts
    if ".." in parts:
        raise ValueError(f"{what} must not contain '..'")
    return value


class Source(_Strict):
    """Where install fetches the model; which fields apply depends on `kind`."""

    kind: SourceKindName
    path: Text = ""
    package: Name = ""
    file: Name = ""
    repo: Name = ""
    revision: Name = ""
    url: Text = ""
    api_key_env: Name = ""
    upstream_model: Name = ""

    @field_validator("path")
    @classmethod
    def _path_inside_roots(cls, value: str, info: ValidationInfo) -> str:
        if not value:
            return value
        _safe_relative(value, "path")
        roots = [Path(r) for r in (info.context or {}).get("source_roots", [])]
        if Path(value).is_absolute() and not any(_is_within(Path(value), r) for r in roots):
            allowed = ", ".join(str(r) for r in roots) or "none configured"
            raise ValueError(
                f"absolute path is outside the allowed source roots ({allowed}); "
                "set ROUNDHOUSE_SOURCE_ROOTS to allow it"
            )
        return value

    @field_validator("file")
    @classmethod
    def _file_relative(cls, value: str) -> str:
        if value and PurePosixPath(value).is_absolute():
            raise ValueError("file must be relative to the package or repository")
        return _safe_relative(value, "file")

    @field_validator("package")
    @classmethod
    def _package_name(cls, value: str) -> str:
        if value and not PACKAGE_RE.match(value):
            raise ValueError("not a valid PyPI distribution name")
        return value

    @field_validator("repo")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if value and not HF_REPO_RE.match(value):
            raise ValueError("expected a Hugging Face repository id 'org/name'")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str, info: ValidationInfo) -> str:
        if value and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("expected an http:// or https:// URL")
        rules = _upstream_rules(info)
        problem = rules.url_problem(value) if rules else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str, info: ValidationInfo) -> str:
        if value and not ENV_NAME_RE.match(value):
            raise ValueError("expected an environment variable name, not a key")
        rules = _upstream_rules(info)
        problem = rules.key_env_problem(value) if rules else None
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _fields_for_kind(self) -> Source:
        required = {"path": "path", "gguf": "path", "pypi": "package", "hf": "repo", "url": "url"}
        needed = required[self.kind]
        if not getattr(self, needed):
            raise ValueError(f"source kind '{self.kind}' needs '{needed}'")
        if self.kind == "gguf" and not self.path.endswith(".gguf"):
            raise ValueError("source kind 'gguf' needs a path to a .gguf file")
        return self


def _upstream_rules(info: ValidationInfo) -> UpstreamRules | None:
    """The rules to check upstreams against; None for a spec that was checked when applied."""
    return (info.context or {}).get("upstreams")


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


class Resources(_Strict):
    """What the asset needs to run."""

    gpu_required: bool = False
    min_vram_gb: Annotated[Number, Field(ge=0)] = 0
    memory_mb: Count | None = None
    disk_gb: Annotated[Number, Field(gt=0)] | None = None


class Lifecycle(_Strict):
    """How the asset is kept loaded. Defaults depend on the interface (see AssetSpec)."""

    desired: Desired | None = None
    auto_sleep_min: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    min_resident_s: Annotated[int, Field(ge=0, le=86_400)] = DEFAULT_MIN_RESIDENT_S
    """Seconds a loaded model stays before it may be evicted for another (hysteresis: two
    on-demand models that do not fit together are not reloaded on every request)."""


class Policy(_Strict):
    """Admission limits the router enforces for the asset."""

    max_concurrency: Annotated[int, Field(ge=1, le=10_000)] = 4
    max_queue: Annotated[int, Field(ge=0, le=1_000_000)] = 64
    queue_timeout_s: Annotated[Number, Field(gt=0, le=86_400)] = 30.0


class Generation(_Strict):
    """Defaults for chat requests that leave these unset (a model card's recommendation)."""

    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    max_tokens: Count | None = None


class Pricing(_Strict):
    """What the model costs, in US dollars per million tokens; API keys' dollar budgets are
    charged from it (an asset without pricing costs nothing)."""

    input_per_1m: Annotated[Number, Field(ge=0, le=1_000_000)] = 0.0
    """Per million prompt tokens."""
    output_per_1m: Annotated[Number, Field(ge=0, le=1_000_000)] = 0.0
    """Per million completion tokens."""


class Metadata(_Strict):
    """Descriptive facts; values detected at load fill the gaps."""

    context_length: Count | None = None
    embedding_dim: Count | None = None
    precision: Name = ""
    quantization: Name = ""
    family: Name = ""
    license: Name = ""
    description: Text = ""


class AssetSpec(_Strict):
    """A declared model asset. Build with `parse_spec` to get every problem at once."""

    asset_id: Name
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

    @field_validator("asset_id")
    @classmethod
    def _asset_id(cls, value: str) -> str:
        if not ASSET_ID_RE.match(value):
            raise ValueError(
                "must match ^[a-z0-9][a-z0-9._-]{0,127}$ (lower-case letters, digits, '.', '_', '-')"
            )
        return value

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
            if not ASSET_ID_RE.match(alias):
                raise ValueError(f"alias {alias!r} must match ^[a-z0-9][a-z0-9._-]{{0,127}}$")
        if len(set(value)) != len(value):
            raise ValueError("aliases must not repeat")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not LABEL_KEY_RE.match(key):
                raise ValueError(f"label key {key!r} must be 1-64 letters, digits, '.', '_', '/', '-'")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> AssetSpec:
        if self.asset_id in self.aliases:
            raise ValueError("aliases: an alias must differ from the asset id")
        if (self.runtime == "openai") != (self.source.kind == "url"):
            raise ValueError("runtime: 'openai' goes with source kind 'url', and only with it")
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


def check_asset_id(value: str, field: str = "asset_id") -> str:
    """`value` when it is a possible asset id (or alias); `InvalidArgument` naming `field`
    otherwise, so that an impossible id is refused before it is looked up."""
    if not value:
        raise InvalidArgument(f"{field}: required")
    if not ASSET_ID_RE.match(value):
        raise InvalidArgument(f"{field}: {shown(value)} is not an asset id: lower-case letters, digits, "
                              "'.', '_' and '-', at most 128, starting with a letter or digit")
    return value


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
