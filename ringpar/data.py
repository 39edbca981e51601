"""A byte-level training corpus built from the Python standard library's own source files.

No download: the corpus is the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (test
suites and ``site-packages`` skipped), read in sorted relative-path order and concatenated, each
file followed by a NUL byte, truncated to ``max_bytes``. The tokens are the bytes (vocabulary
256). The same interpreter gives the same corpus; :attr:`Corpus.digest` names it (it goes into the
training log and the checkpoints).

Batches are drawn with a seeded ``numpy.random.Generator`` (PCG64): each row is a random window of
``seq_len + 1`` bytes, the inputs its first ``seq_len`` bytes and the targets the last
``seq_len``. The generator's state is JSON data (:meth:`BatchSampler.get_state`), saved in
checkpoints so a resumed run draws the same batches as an uninterrupted one.

Example:
    >>> corpus = load_corpus(max_bytes=4096)
    >>> len(corpus.tokens), corpus.vocab_size
    (4096, 256)
    >>> sampler = BatchSampler(corpus, batch_size=2, seq_len=8, seed=0)
    >>> tokens, targets = sampler.next_batch()
    >>> tokens.shape, bool((tokens[:, 1:] == targets[:, :-1]).all())
    ((2, 8), True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import sysconfig

import numpy as np

from .validation import positive_int

__all__ = ["VOCAB_SIZE", "Corpus", "stdlib_files", "load_corpus", "BatchSampler"]

VOCAB_SIZE = 256
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The token stream (uint8 bytes), the number of files read and a sha256 digest prefix."""

    tokens: np.ndarray
    num_files: int
    digest: str
    vocab_size: int = VOCAB_SIZE


def stdlib_files(root: str | pathlib.Path | None = None) -> list[pathlib.Path]:
    """The standard library's ``.py`` files under ``root`` (default: this interpreter's stdlib),
    in sorted relative-path order, test suites and installed packages skipped."""
    root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"root={str(root)!r}: not a directory")
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS]  # prune: never walked
        files += [pathlib.Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(max_bytes: int = 8 * 2**20, root: str | pathlib.Path | None = None) -> Corpus:
    """Concatenate :func:`stdlib_files` (each followed by a NUL byte) up to ``max_bytes``."""
    positive_int("max_bytes", max_bytes)
    chunks, size, count = [], 0, 0
    for path in stdlib_files(root):
        if size >= max_bytes:
            break
        data = path.read_bytes() + b"\0"
        chunks.append(data)
        size += len(data)
        count += 1
    blob = b"".join(chunks)[:max_bytes]
    if len(blob) < 2:
        raise ValueError(f"root={root!r}: found no Python source to build a corpus from")
    tokens = np.frombuffer(blob, np.uint8).copy()
    return Corpus(tokens=tokens, num_files=count, digest=hashlib.sha256(blob).hexdigest()[:16])


class BatchSampler:
    """Seeded random windows of a :class:`Corpus` (module docstring).

    Args:
        corpus: The token stream.
        batch_size, seq_len: Rows per batch and tokens per row.
        seed: Seed of the PCG64 generator.
    """

    def __init__(self, corpus: Corpus, batch_size: int, seq_len: int, seed: int) -> None:
        positive_int("batch_size", batch_size)
        positive_int("seq_len", seq_len)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r}: expected an int >= 0")
        if seq_len + 1 > len(corpus.tokens):
            raise ValueError(f"seq_len={seq_len}: expected < the corpus length "
                             f"{len(corpus.tokens)}")
        self.corpus, self.batch_size, self.seq_len = corpus, batch_size, seq_len
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens, targets)``: int32 ``[batch_size, seq_len]`` each, targets shifted by one."""
        starts = self._rng.integers(0, len(self.corpus.tokens) - self.seq_len,
                                    size=self.batch_size)
        rows = self.corpus.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        rows = rows.astype(np.int32)
        return rows[:, :-1], rows[:, 1:]

    def get_state(self) -> dict:
        """The generator's state as JSON-serialisable data."""
        return self._rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        """Restore a state from :meth:`get_state` (ValueError if it is not a PCG64 state)."""
        if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
            raise ValueError(f"state={state!r}: expected a PCG64 generator state")
        self._rng.bit_generator.state = state
