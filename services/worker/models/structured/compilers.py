"""The grammar compilers of the models this process holds, shared by the models of one folder.

A compiler holds a model's tokenizer info and its compiled grammars (megabytes each for a large
vocabulary). Models loaded from the same folder (with the same logits width and end-of-sequence
ids) share one; it is dropped when the last model that used it closes, so a worker that loads
and unloads many models holds only the compilers of the models it holds now.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NamedTuple

from services.worker.models.structured.grammar import GrammarCompiler


class CompilerKey(NamedTuple):
    """What a grammar compiler depends on: the model folder (its tokenizer), the width of the
    model's logits, its end-of-sequence ids."""

    folder: str
    vocab_size: int
    stop_ids: tuple[int, ...]


class _Entry:
    def __init__(self) -> None:
        self.users = 0
        self.compiler: GrammarCompiler | None = None
        self.built = threading.Lock()


class SharedCompilers:
    """Grammar compilers by `CompilerKey`, each counted by the models using it. Thread-safe."""

    def __init__(self) -> None:
        self._entries: dict[CompilerKey, _Entry] = {}
        self._lock = threading.Lock()

    def acquire(self, key: CompilerKey, build: Callable[[], GrammarCompiler]) -> GrammarCompiler:
        """The compiler of `key`, built with `build()` if no model holds one (blocking: call from
        a thread); counts one more user until its `release`."""
        with self._lock:
            entry = self._entries.setdefault(key, _Entry())
            entry.users += 1
        try:
            with entry.built:  # one build per key; other keys are not held up
                if entry.compiler is None:
                    entry.compiler = build()
                return entry.compiler
        except BaseException:
            self.release(key)
            raise

    def release(self, key: CompilerKey) -> None:
        """One user of `key` is done with it; the last one drops the compiler."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry.users -= 1
            if entry.users <= 0:
                del self._entries[key]

    def folders(self) -> set[str]:
        """The model folders whose compilers are held now."""
        with self._lock:
            return {key.folder for key in self._entries}


SHARED_COMPILERS = SharedCompilers()
"""This process's grammar compilers."""
