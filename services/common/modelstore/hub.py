"""`hf` sources: a Hugging Face hub repository, fetched with `huggingface_hub.snapshot_download`.

Machines without access to the hub must install from a local source instead; here that
fails at once with a message that says so, rather than hanging or surfacing a library error.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from services.common.assetspec_source import Source
from services.common.modelstore.model import InstallError, Reporter
from services.common.modelstore.sources import Fetched

DEFAULT_HUB_TIMEOUT_S = 10.0
_TRUE = {"1", "on", "yes", "true"}
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_offline() -> bool:
    """True when the environment forbids hub access (`HF_HUB_OFFLINE`, `TRANSFORMERS_OFFLINE`).

    Read at each call: huggingface_hub reads these once, at import.
    """
    return any(os.environ.get(n, "").strip().lower() in _TRUE for n in _OFFLINE_VARIABLES)


def _unreachable(repo: str, why: str) -> InstallError:
    return InstallError(
        f"cannot reach the Hugging Face hub to fetch {repo} ({why}); the model must be "
        "installed from a local source (kind path, gguf or pypi) on offline machines"
    )


def fetch_hf(
    source: Source,
    workdir: Path,
    reporter: Reporter,
    timeout_s: float = DEFAULT_HUB_TIMEOUT_S,
    endpoint: str | None = None,
) -> Fetched:
    """Download `source.repo` at `source.revision` (default branch when empty) into `workdir`.

    `endpoint` is the hub URL (default: huggingface_hub's, i.e. `HF_ENDPOINT` or the public hub);
    `timeout_s` bounds each request to it.

    `source.file` narrows the download: a .gguf file, or a glob or folder of the repository.
    """
    repo = source.repo
    if hub_offline():
        raise _unreachable(repo, "offline mode is on: HF_HUB_OFFLINE")
    from httpx import TransportError
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    wanted = source.file
    allow = [wanted] if wanted.endswith(".gguf") else [wanted, f"{wanted}/*"] if wanted else None
    target = workdir / "hub"
    revision = source.revision or None
    reporter.start("download", 0, f"{repo}@{revision or 'default branch'}")
    try:
        snapshot_download(
            repo,
            revision=revision,
            local_dir=target,
            allow_patterns=allow,
            etag_timeout=timeout_s,
            endpoint=endpoint,
        )
    except GatedRepoError:
        raise InstallError(f"{repo} is gated; accept its terms on the hub, set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise InstallError(f"no repository {repo} on the hub (or it is private)") from None
    except RevisionNotFoundError:
        raise InstallError(f"{repo} has no revision {source.revision!r}") from None
    except (LocalEntryNotFoundError, ConnectionError, TimeoutError, TransportError) as exc:
        raise _unreachable(repo, _short(exc)) from None
    except HfHubHTTPError as exc:
        raise InstallError(f"the hub refused {repo}: {_short(exc)}") from None
    # snapshot_download keeps its own bookkeeping there; it is no part of the model.
    shutil.rmtree(target / ".cache", ignore_errors=True)
    reporter.finish()
    origin = {"repo": repo, "revision": source.revision}
    if wanted.endswith(".gguf"):
        gguf = target / wanted
        if not gguf.is_file():
            raise InstallError(f"{repo} holds no {wanted}")
        return Fetched(gguf, is_gguf=True, owned=True, origin=origin)
    folder = target / wanted if wanted and (target / wanted).is_dir() else target
    return Fetched(folder, is_gguf=False, owned=True, origin=origin)


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
