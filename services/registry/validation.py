"""What a registry request must be before it reaches the database.

Label filters and reported status are checked here (asset ids and names by
`assetspec_fields.check_asset_id`), each refusal an `InvalidArgument` naming its field: nothing
Postgres would refuse reaches a query, and no error message echoes a huge input (a gRPC
status message must fit in the trailers, 16 KiB by default). An apply's problems are listed
up to `MAX_LISTED_PROBLEMS` for the same reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from google.protobuf.message import Message

from services.common.assetspec_fields import LABEL_KEY_RE, MAX_NAME_CHARS
from services.common.errors import FieldProblem, InvalidArgument
from services.common.request_text import shown

MAX_LISTED_PROBLEMS = 20
"""Problems one refusal lists; the rest are counted."""
MAX_TEXT_CHARS = 64 * 1024
"""Longest reported status message (longer is cut) or store path (longer is refused)."""
MAX_WORKER_IDS = 1024
"""Most workers one report may say hold an asset."""


def label_filter(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels to filter by, each a possible label (key and value as a spec allows)."""
    for key, value in labels.items():
        if not LABEL_KEY_RE.match(key):
            raise InvalidArgument(f"labels: {shown(key)} is not a label key (1-64 letters, digits, "
                                  "'.', '_', '/', '-')")
        if len(value) > MAX_NAME_CHARS:
            raise InvalidArgument(f"labels.{key}: at most {MAX_NAME_CHARS} characters")
    return dict(labels)


def status_message(message: str) -> str:
    """A reported message as it is kept: cut to `MAX_TEXT_CHARS` (it is for operators to read,
    and a failure must be recorded however long its reason)."""
    return message if len(message) <= MAX_TEXT_CHARS else message[:MAX_TEXT_CHARS - 1] + "…"


def reported_status(store_path: str, worker_ids: Sequence[str]) -> None:
    """Refuse a status report whose store path or worker list is beyond what is kept."""
    if len(store_path) > MAX_TEXT_CHARS:
        raise InvalidArgument(f"status.store_path: at most {MAX_TEXT_CHARS} characters")
    if len(worker_ids) > MAX_WORKER_IDS:
        raise InvalidArgument(f"status.worker_ids: {len(worker_ids)} workers; at most {MAX_WORKER_IDS}")
    for n, worker in enumerate(worker_ids):
        if not worker or len(worker) > MAX_NAME_CHARS:
            raise InvalidArgument(f"status.worker_ids[{n}]: 1 to {MAX_NAME_CHARS} characters")


def timestamp_text(stamp: Message, field: str) -> str:
    """A `google.protobuf.Timestamp` as RFC 3339 text; one outside years 1-9999 is refused."""
    try:
        text: str = stamp.ToJsonString()  # type: ignore[attr-defined]  # a well-known type
    except ValueError:
        raise InvalidArgument(f"{field}: not a time between the years 1 and 9999") from None
    return text


def listed(problems: list[FieldProblem]) -> list[FieldProblem]:
    """At most `MAX_LISTED_PROBLEMS` problems, the last saying how many more there were."""
    if len(problems) <= MAX_LISTED_PROBLEMS:
        return problems
    rest = len(problems) - MAX_LISTED_PROBLEMS + 1
    return [*problems[:MAX_LISTED_PROBLEMS - 1], FieldProblem("assets", f"and {rest} more problems")]
