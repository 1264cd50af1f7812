"""The field types an asset spec is built from, and the id check other services share.

Strings refuse NUL, counts fit the wire, numbers take a YAML integer, and every section of a
spec is a `SpecModel`: strict, frozen, no unknown fields, no NaN nor infinity.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from services.common.errors import InvalidArgument
from services.common.request_text import NUL_REASON, shown

ASSET_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,62}[A-Za-z0-9])?$")

INT32_MAX = 2**31 - 1
"""The largest count a spec may hold: its integers travel as `int32` (asset.proto)."""


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError(NUL_REASON)
    return value


MAX_NAME_CHARS = 256
"""Longest name, label value, model name or user a document or request may carry."""
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS), AfterValidator(_no_nul)]
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
"""A float field that takes a YAML integer too; never NaN nor infinite (see `SpecModel`)."""


class SpecModel(BaseModel):
    """The base of the spec and each of its sections: strict, frozen, unknown fields refused."""

    # No NaN nor infinity: JSON has neither, so a spec holding one could not be written back.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True,
                              allow_inf_nan=False)


ASSET_ID_RULE = "must match ^[a-z0-9][a-z0-9._-]{0,127}$ (lower-case letters, digits, '.', '_', '-')"


def asset_id_value(value: str) -> str:
    """`value` when it is a possible asset id or alias; `ValueError` saying the rule otherwise
    (for a pydantic validator)."""
    if not ASSET_ID_RE.match(value):
        raise ValueError(ASSET_ID_RULE)
    return value


AssetRef = Annotated[Name, AfterValidator(asset_id_value)]
"""An asset id or alias in a document."""


def check_asset_id(value: str, field: str = "asset_id") -> str:
    """`value` when it is a possible asset id (or alias); `InvalidArgument` naming `field`
    otherwise, so that an impossible id is refused before it is looked up."""
    if not value:
        raise InvalidArgument(f"{field}: required")
    if not ASSET_ID_RE.match(value):
        raise InvalidArgument(f"{field}: {shown(value)} is not an asset id: lower-case letters, digits, "
                              "'.', '_' and '-', at most 128, starting with a letter or digit")
    return value


def check_label_keys(labels: dict[str, str]) -> dict[str, str]:
    """`labels` when every key is a possible label key; `ValueError` naming the first that is not
    (for a pydantic field validator)."""
    for key in labels:
        if not LABEL_KEY_RE.match(key):
            raise ValueError(f"label key {key!r} must be 1-64 letters, digits, '.', '_', '/', '-'")
    return labels
