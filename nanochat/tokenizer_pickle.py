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
MAX_TOKENIZER_BYTES = 64 << 20  # a 65k-token tokenizer.pkl is ~0.8 MB (a 4M-token one ~60 MB), tokenizer.json ~3 MB
MAX_PICKLE_OBJECTS_BYTES = 1 << 30  # what unpickling may build, estimated before it runs (65k tokens: ~10 MB)
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
    check_pickle_opcodes(data, path)
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


# --- the opcode scan: what the C unpickler will do, bounded before it runs -------------------------------------
# The C unpickler trusts the numbers in the stream: LONG_BINPUT 0x3FFFFFFF grows its memo array to 2**31 slots
# and zeroes them (16 GiB touched by an 11-byte file), BINBYTES8 allocates its declared size before reading, and
# every one-byte EMPTY_LIST or MARK is an allocation (a 64 MB file of them is gigabytes). A pickled Encoding uses
# only the opcodes below; this walk admits only those, with memo indices that are dense (as every pickler writes
# them), at most a few marks open, a bounded stack and a bounded estimate of what the objects take.
# opcode -> (argument bytes: int, or "u1"/"u4" for a length-prefixed argument of that width, or "line2" for
# GLOBAL's two text lines; stack effect; kind). Kinds: "item" makes a new object, "put"/"get" use the memo.
_OPS: dict[int, tuple[object, int, str]] = {
    0x80: (1, 0, ""),  # PROTO
    0x95: (8, 0, ""),  # FRAME
    0x2E: (0, 0, "stop"),  # STOP
    0x28: (0, 0, "mark"),  # MARK
    0x7D: (0, 1, "item"),  # EMPTY_DICT
    0x29: (0, 1, "item"),  # EMPTY_TUPLE
    0x85: (0, 0, "item"),  # TUPLE1
    0x86: (0, -1, "item"),  # TUPLE2
    0x87: (0, -2, "item"),  # TUPLE3
    0x74: (0, 0, "tomark+1"),  # TUPLE
    0x73: (0, -2, ""),  # SETITEM
    0x75: (0, 0, "tomark"),  # SETITEMS
    0x62: (0, -1, ""),  # BUILD
    0x81: (0, -1, "item"),  # NEWOBJ
    0x93: (0, -1, ""),  # STACK_GLOBAL (find_class admits one class)
    0x52: (0, -1, "item"),  # REDUCE: allocates nothing itself; find_class has refused any other callable
    0x63: ("line2", 1, ""),  # GLOBAL
    0x8C: ("u1", 1, "item"),  # SHORT_BINUNICODE
    0x58: ("u4", 1, "item"),  # BINUNICODE
    0x43: ("u1", 1, "item"),  # SHORT_BINBYTES
    0x42: ("u4", 1, "item"),  # BINBYTES
    0x4B: (1, 1, "item"),  # BININT1
    0x4D: (2, 1, "item"),  # BININT2
    0x4A: (4, 1, "item"),  # BININT
    0x8A: ("u1", 1, "item"),  # LONG1 (ids are < 2**24: at most a few bytes, checked below)
    0x4E: (0, 1, ""),  # NONE
    0x88: (0, 1, ""),  # NEWTRUE
    0x89: (0, 1, ""),  # NEWFALSE
    0x94: (0, 0, "memoize"),  # MEMOIZE
    0x71: (1, 0, "put"),  # BINPUT
    0x72: (4, 0, "put"),  # LONG_BINPUT
    0x68: (1, 1, "get"),  # BINGET
    0x6A: (4, 1, "get"),  # LONG_BINGET
}
_MAX_STACK = 1 << 14  # pickle batches dict items 1000 at a time: ~2000 on the stack
_MAX_OPEN_MARKS = 8


def check_pickle_opcodes(data: bytes, path: Path) -> None:
    """Refuse a tokenizer.pkl whose opcodes would make the unpickler allocate beyond what its data needs."""
    ops, n, pos = _OPS, len(data), 0
    stack, marks, memo, estimate = 0, [], 0, 0

    def refuse(why: str) -> CorruptTokenizerFile:
        return CorruptTokenizerFile(f"{path} is truncated or corrupt, or not a pickled tiktoken Encoding: {why} at "
                                    f"byte {pos}; {HOW_TO_CREATE}")

    while pos < n:
        code = data[pos]
        # Fast paths for the bulk of a tokenizer (SHORT_BINBYTES, MEMOIZE, BININT2 per token): same rules.
        if code == 0x43:
            length = data[pos + 1] if pos + 1 < n else 0
            pos, stack, estimate = pos + 2 + length, stack + 1, estimate + 64 + length
            if stack > _MAX_STACK or pos > n:
                raise refuse("a stack this deep, or an argument past the end of the file")
            continue
        if code == 0x94:
            pos, memo = pos + 1, memo + 1
            continue
        if code == 0x4D:
            pos, stack, estimate = pos + 3, stack + 1, estimate + 64
            if stack > _MAX_STACK:
                raise refuse("a stack this deep")
            continue
        spec = ops.get(code)
        if spec is None:
            raise refuse(f"opcode {bytes([code])!r} is not one a pickled Encoding uses")
        size, effect, kind = spec
        start = pos + 1
        if size == "u1" or size == "u4":
            width = 1 if size == "u1" else 4
            length = int.from_bytes(data[start : start + width], "little")
            if kind == "item" and code == 0x8A and length > 8:
                raise refuse(f"an integer of {length} bytes")
            end = start + width + length
            estimate += 64 + length
        elif size == "line2":
            end = data.find(b"\n", data.find(b"\n", start, start + 256) + 1, start + 512) + 1
            if end <= 0:
                raise refuse("a GLOBAL without its two lines")
        else:
            end = start + size
            if kind == "item":
                estimate += 64
        if end > n:
            raise refuse("an argument past the end of the file")
        if kind == "put" or kind == "get":
            index = int.from_bytes(data[start:end], "little")
            if index > memo or (kind == "get" and index == memo):
                raise refuse(f"memo index {index} with {memo} objects memoized (an index this large would make "
                             "the unpickler allocate a memo that size)")  # fmt: skip
            memo = max(memo, index + 1) if kind == "put" else memo
        elif kind == "memoize":
            memo += 1
        elif kind == "mark":
            marks.append(stack)
            if len(marks) > _MAX_OPEN_MARKS:
                raise refuse(f"more than {_MAX_OPEN_MARKS} marks open")
        elif kind.startswith("tomark"):
            if not marks:
                raise refuse("no mark to pop to")
            stack = marks.pop() + (1 if kind == "tomark+1" else 0)
        elif kind == "stop":
            return
        stack += effect
        if not 0 <= stack <= _MAX_STACK:
            raise refuse("a stack this deep (or popped below empty)")
        if estimate > MAX_PICKLE_OBJECTS_BYTES:
            raise refuse(f"objects over {MAX_PICKLE_OBJECTS_BYTES >> 20} MiB")
        pos = end
    raise refuse("no STOP")
