"""The checked-in `roundhouse.v1` stubs match the protos."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from roundhouse.v1 import inference_pb2
from services.worker.converters import embed_response
from services.worker.models import EmbedResult

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "proto" / "roundhouse" / "v1"


def test_checked_in_stubs_match_protos(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(ROOT / "proto" / "generate.sh"), str(tmp_path)],
        check=True, env=env, capture_output=True,
    )
    fresh = tmp_path / "roundhouse" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names, "generation produced nothing"
    checked_in = sorted(p.name for p in GENERATED.iterdir() if "_pb2" in p.name)
    assert checked_in == names, "stub files differ; run proto/generate.sh"
    stale = [n for n in names if not filecmp.cmp(fresh / n, GENERATED / n, shallow=False)]
    assert not stale, f"stubs drifted from the protos, run proto/generate.sh: {stale}"


def test_stubs_import_as_roundhouse_v1() -> None:
    from roundhouse.v1 import inference_pb2_grpc, registry_pb2

    assert registry_pb2.DESCRIPTOR.package == "roundhouse.v1"
    assert hasattr(inference_pb2_grpc, "InferenceStub")


def test_embedding_values_travel_as_little_endian_float32_bytes() -> None:
    """What `Embedding.values` promises readers: the row's float32 bytes behind a tag and a
    length, as a worker writes them and as a reader may take them."""
    rows = np.array([[0.5, -1.25, 3.0e-8], [1.0, 2.0, -0.0]], dtype=np.float32)
    reply = embed_response(EmbedResult(vectors=rows, prompt_tokens=4, dimensions=3), "m")
    parsed = inference_pb2.EmbedResponse.FromString(reply.SerializeToString())
    for row, embedding in zip(rows, parsed.embeddings, strict=True):
        assert embedding.SerializeToString() == b"\x0a\x0c" + row.astype("<f4").tobytes()
        assert np.asarray(embedding.values, dtype="<f4").tobytes() == row.tobytes()
    built = inference_pb2.Embedding(values=rows[0].tolist()).SerializeToString()
    assert built == parsed.embeddings[0].SerializeToString()
