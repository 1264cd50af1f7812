"""Long install steps (pip, GGUF conversion) run as child processes, so a cancel can stop them."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import services
from services.common.modelstore.model import InstallError, Reporter

# How often a running child is checked for a cancel request while it prints nothing.
_CANCEL_POLL_S = 0.2
_TAIL_LINES = 3
_TAIL_CHARS = 1000
# Lines the conversion child prints to report how far it got: "progress PERCENT MESSAGE".
PROGRESS_PREFIX = "progress "


def run_child(
    command: Sequence[str],
    *,
    what: str,
    reporter: Reporter,
    log_path: Path,
    env: dict[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Run `command`, passing each stdout line to `on_line`; stderr goes to `log_path`.

    A cancel request terminates the child and raises `Cancelled`; a non-zero exit raises
    `InstallError` naming `what` and ending with the tail of the child's stderr.
    """
    reporter.check()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command), stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env
        )
        try:
            _pump(process, reporter, on_line)
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()
    if process.returncode != 0:
        # The last lines carry the reason (pip's ERROR line, a traceback's exception).
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()]
        tail = " | ".join([line for line in lines if line][-_TAIL_LINES:])[-_TAIL_CHARS:]
        raise InstallError(f"{what} failed (exit {process.returncode}): {tail}")


def _pump(
    process: subprocess.Popen[bytes],
    reporter: Reporter,
    on_line: Callable[[str], None] | None,
) -> None:
    assert process.stdout is not None
    fd = process.stdout.fileno()
    pending = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            reporter.check()
            if not selector.select(timeout=_CANCEL_POLL_S):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if on_line is not None:
                    on_line(line.decode(errors="replace").strip())
    process.wait()


def convert_gguf(gguf_file: Path, out_dir: Path, reporter: Reporter, log_path: Path) -> None:
    """Convert `gguf_file` into a transformers folder `out_dir` (stage `convert`).

    The folder holds float32 safetensors weights, config, generation config and the tokenizer
    with its chat template. Raises `InstallError` when transformers cannot read the file.
    """
    reporter.start("convert", 0, f"converting {gguf_file.name} to safetensors")
    project_root = str(Path(services.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p)
    # The conversion reads only the local file; it must never reach out to a hub.
    env["HF_HUB_OFFLINE"] = "1"

    def on_line(line: str) -> None:
        if line.startswith(PROGRESS_PREFIX):
            percent, _, message = line[len(PROGRESS_PREFIX) :].partition(" ")
            reporter.percent(float(percent), message)

    run_child(
        [sys.executable, "-m", "services.common.modelstore.gguf", str(gguf_file), str(out_dir)],
        what=f"converting {gguf_file.name}",
        reporter=reporter,
        log_path=log_path,
        env=env,
        on_line=on_line,
    )
    reporter.finish()
