"""
Loading tokenizer.pkl safely. The original nanochat pickles its tiktoken Encoding, and a pickle can run arbitrary
code, so the unpickler admits only what an Encoding needs (one class, plain data), checks that data (ids dense,
every byte a token, bounded sizes) and only then builds the Encoding. Whatever a hostile file makes a library raise,
a Rust panic included, becomes a TokenizerFileError naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import tiktoken

from nanochat.safe_io import clip, is_panic, read_bounded, short

HOW_TO_CREATE = "create it with `python -m nanochat.tok_train`"
MAX_TOKENIZER_BYTES = 256 << 20  # a 65k-token tokenizer.pkl is ~1 MB, its tokenizer.json ~3 MB
MAX_VOCAB = 1 << 24  # as checkpoint_checks.CONFIG_LIMITS["vocab_size"]
MAX_PATTERN_CHARS = 4096


class TokenizerFileError(ValueError):
    """A tokenizer file cannot be loaded (the message names the file and what is wrong)."""


class UnsafeTokenizerPickle(pickle.UnpicklingError, TokenizerFileError):
    """tokenizer.pkl references something other than a tiktoken Encoding built from plain data."""


class CorruptTokenizerFile(pickle.UnpicklingError, TokenizerFileError):
    """tokenizer.pkl is truncated, corrupt, or not a tiktoken Encoding."""


@contextmanager
def as_tokenizer_error(path: Path, what: str) -> Iterator[None]:
    """Whatever a hostile file makes the library raise (TypeError, RecursionError, ... or a Rust panic, which is
    not an Exception) becomes one TokenizerFileError naming the file."""
    try:
        yield
    except TokenizerFileError:
        raise
    except BaseException as e:
        if not isinstance(e, Exception) and not is_panic(e):
            raise  # KeyboardInterrupt, SystemExit
        raise CorruptTokenizerFile(f"{path} {what} ({type(e).__name__}: {clip(str(e), 200)}); {HOW_TO_CREATE}"
                                   ) from None


class _EncodingState:
    """Stand-in for tiktoken.core.Encoding while unpickling: it only records the pickled state (a dict of
    plain data) so we can check it before constructing the real Encoding ourselves."""

    state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        # pickle.dumps(Encoding) references exactly one global, tiktoken.core.Encoding (NEWOBJ + BUILD); every
        # other object in it is a str/bytes/int/dict literal that needs no lookup.
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise UnsafeTokenizerPickle(
            f"{self.path} references {module}.{name}; refusing to load it: a tokenizer.pkl may only "
            f"contain a tiktoken Encoding. Do not load files from untrusted sources; {HOW_TO_CREATE}"
        )


def load_encoding_pickle(path: str | os.PathLike) -> tiktoken.Encoding:
    """Load a pickled tiktoken Encoding (tokenizer.pkl) without executing code from the file."""
    path = Path(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no tokenizer at {path}; {HOW_TO_CREATE}")
    data = read_bounded(path, MAX_TOKENIZER_BYTES, CorruptTokenizerFile, "tokenizer file")
    # A damaged pickle can fail in many ways (EOFError, KeyError, ValueError, RecursionError, MemoryError, ...).
    with as_tokenizer_error(path, "is truncated or corrupt"):
        loaded = _RestrictedUnpickler(io.BytesIO(data), path).load()
    if not isinstance(loaded, _EncodingState):
        raise CorruptTokenizerFile(f"{path} holds a {type(loaded).__name__}, not a tiktoken Encoding")
    return _encoding_from_state(loaded.state, path)


def _encoding_from_state(state: object, path: Path) -> tiktoken.Encoding:
    # A str state means "the registered encoding of that name", which tiktoken would download: refuse.
    if type(state) is not dict or set(state) != {"name", "pat_str", "mergeable_ranks", "special_tokens"}:
        raise CorruptTokenizerFile(f"{path} does not hold a self-contained tiktoken Encoding (state: {short(state)})")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    fields = {
        "name": type(state["name"]) is str and len(state["name"]) <= 256,
        "pat_str": type(state["pat_str"]) is str and 0 < len(state["pat_str"]) <= MAX_PATTERN_CHARS,
        "mergeable_ranks": type(ranks) is dict and 256 <= len(ranks) <= MAX_VOCAB
        and all(type(k) is bytes and type(v) is int for k, v in ranks.items()),
        "special_tokens": type(specials) is dict and len(specials) <= 1024
        and all(type(k) is str and type(v) is int for k, v in specials.items()),
    }
    bad = [name for name, ok in fields.items() if not ok]
    if bad:
        raise CorruptTokenizerFile(f"{path} holds a tiktoken Encoding with malformed fields {bad}")
    # Ids must be dense (0..n-1 for the merges, then the specials) and every byte must have a token: tiktoken
    # panics on a byte it has no token for, and on decoding an id it does not know.
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)) or any(bytes([b]) not in ranks for b in range(256)):
        raise CorruptTokenizerFile(f"{path}: field mergeable_ranks must give every single byte a token and use the "
                                   f"ids 0..{n - 1} once each")
    if sorted(specials.values()) != list(range(n, n + len(specials))):
        raise CorruptTokenizerFile(f"{path}: field special_tokens must use the ids {n}..{n + len(specials) - 1} "
                                   f"(right after the merges), got {short(sorted(specials.values()))}")
    with as_tokenizer_error(path, "holds a tiktoken Encoding that cannot be built"):
        return tiktoken.Encoding(state["name"], pat_str=state["pat_str"], mergeable_ranks=ranks,
                                 special_tokens=specials)
