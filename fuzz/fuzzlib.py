"""Shared harness of the loader fuzzers: atheris (coverage-guided, libFuzzer in-process).

What it is: the contract every fuzz target checks, and the plumbing around it. A target
turns one fuzz input into files on disk, calls a loader, and then uses what loaded (runs
the engine, encodes text). The contract: every input either loads and works, or raises
one of the exceptions the loader documents (:data:`LOADER_ERRORS`). Anything else is a
finding: another exception (re-raised, so libFuzzer stops and saves the input), a crash
of the process, a hang (libFuzzer's ``-timeout``), or memory growth past ``-rss_limit_mb``
(an allocation sized by what a file claims), or a warning (the library prints nothing).

Multi-file inputs (a checkpoint directory) are the files' bytes joined by :data:`SEP`; a
missing part means a missing file, so the loaders' missing-file paths are fuzzed too.

What it is not: a fuzzer of the native ops on their own (``tests/test_properties.py``
drives those with hypothesis) or of chat-template rendering (a template is a program; it
is compiled, and so syntax-checked, at load, but rendering is the caller's business).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

#: Separates the files of a multi-file input.
SEP = b"\x00\x00--dovetail-file--\x00\x00"

#: libFuzzer options the targets use unless the command line gives them: a hang is an
#: input that takes over 20 s; a process over 3 GB resident is an unbounded allocation.
DEFAULT_FLAGS = ("-timeout=20", "-rss_limit_mb=3072", "-max_len=65536")


def loader_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a loader may raise on a bad file (see ``dovetail_ext.errors``):
    :class:`FormatError` for a malformed, truncated or unsupported file, and
    :class:`FileNotFoundError` for a missing one (a directory without a required file)."""
    from dovetail_ext.errors import FormatError
    return (FormatError, FileNotFoundError)


def split_files(data: bytes, count: int) -> list[bytes | None]:
    """``data`` cut at :data:`SEP` into ``count`` file contents (None: the file is absent)."""
    parts: list[bytes | None] = list(data.split(SEP, count - 1))
    return parts + [None] * (count - len(parts))


def join_files(*contents: bytes | None) -> bytes:
    """The inverse of :func:`split_files` for seeds (trailing absent files dropped)."""
    parts = list(contents)
    while parts and parts[-1] is None:
        parts.pop()
    return SEP.join(b"" if p is None else p for p in parts)


class Scratch:
    """A private directory where each input's files are written (removed at exit)."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.path = Path(tempfile.mkdtemp(prefix="dovetail-fuzz-", dir=base))
        import atexit
        atexit.register(shutil.rmtree, self.path, True)

    def write(self, files: dict[str, bytes | None]) -> Path:
        """Writes (or removes, for None) each named file; returns the directory."""
        for name, content in files.items():
            p = self.path / name
            if content is None:
                p.unlink(missing_ok=True)
            else:
                p.write_bytes(content)
        return self.path


def run(test_one_input: Callable[[bytes], None], argv: Sequence[str] | None = None) -> None:
    """Runs ``test_one_input`` under atheris' bundled libFuzzer with ``argv`` (default
    ``sys.argv``) plus :data:`DEFAULT_FLAGS` not given there. Exits when libFuzzer does."""
    import warnings

    import atheris

    # The library prints nothing: a warning it lets numpy (or anyone) show is a finding.
    # Deprecation warnings are hidden from users by default, so they are not.
    warnings.simplefilter("error")
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", PendingDeprecationWarning)
    argv = list(sys.argv if argv is None else argv)
    given = {a.split("=", 1)[0] for a in argv[1:] if a.startswith("-")}
    argv[1:1] = [f for f in DEFAULT_FLAGS if f.split("=", 1)[0] not in given]
    atheris.Setup(argv, test_one_input, internal_libfuzzer=True)
    atheris.Fuzz()


def engine_smoke(source) -> None:
    """A loaded model must work: build a tiny engine over it and run one token.

    A loader that accepts what the engine then refuses is a finding, so nothing is caught
    here. Weights may hold any bit pattern (NaN scales...); only the run is checked.
    """
    from dovetail_ext.target import TargetEngine

    engine = TargetEngine(source, context=4, threads=1, max_batch=2)
    logits, feats = engine.forward([source.config.vocab_size - 1, 0], logit_rows=[1], feature_rows=[0])
    assert logits.shape == (1, source.config.vocab_size) and feats.shape == (1, source.config.hidden_size)
    engine.commit([1])
    assert engine.n_past == 1


def tokenizer_smoke(tok) -> None:
    """A loaded tokenizer must encode and decode (all at once and streamed) without error."""
    text = "Hello, world! 123 \u00e9\u4e16 <|im_end|><s>\n\t  end"
    ids = tok.encode(text, add_bos=False)
    assert all(0 <= i < tok.vocab_size for i in ids), ids
    whole = tok.decode(ids)
    stream = tok.stream_decoder()
    streamed = "".join(stream.push(i) for i in ids) + stream.flush()
    assert streamed == whole, (streamed, whole)
    tok.decode(range(min(tok.vocab_size, 64)), skip_special=True)
