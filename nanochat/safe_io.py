"""
Reading files that may come from anyone (a downloaded checkpoint, a published tokenizer): bounded in time and memory.

Every loader goes through here so that the same rules hold everywhere:
- only a regular file of bounded size is read: a FIFO, a device (a symlink to /dev/zero) or a socket is refused
  without ever blocking on it (opened O_NONBLOCK, checked with fstat on the opened descriptor, so a file swapped
  after the check is not read either);
- a .pt is a zip of *stored* records (what torch.save writes): a compressed record could inflate 1000x, so it is
  refused, as are a pickle record over MAX_PICKLE_BYTES and tensors that are not plain contiguous views of the
  bytes in the file (a zero-stride or overlapping tensor turns a few bytes into gigabytes when copied);
- an error message formats what it quotes through `short`, never a full repr (a 200-byte pickle can build an
  object whose repr takes gigabytes).
"""

from __future__ import annotations

import os
import reprlib
import stat
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

MAX_JSON_BYTES = 64 << 20  # meta_*.json, tokenizer.json, manifests: a 2M-token tokenizer.json is ~40 MB
# The pickle record inside a .pt: a d32 state dict's is ~20 KB (~150 bytes a tensor). torch's weights-only
# unpickler is pure Python: a MiB of one-byte opcodes (EMPTY_LIST, MARK) takes ~2 s on an idle core.
MAX_PICKLE_BYTES = 2 << 20
TENSOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32)

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple, _repr.maxset = 3, 6, 6, 6, 6
_repr.maxstring, _repr.maxlong, _repr.maxother = 60, 40, 60


def short(value: object, limit: int = 120) -> str:
    """A repr for an error message: bounded in size and in the work it does, whatever the object is."""
    try:
        text = _repr.repr(value)
    except BaseException:  # noqa: BLE001 - a repr of hostile data may raise anything, even a Rust panic
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 300) -> str:
    """A message (an exception's text) cut to `limit` characters, for quoting inside another message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_panic(e: BaseException) -> bool:
    """A Rust panic inside a pyo3 extension (tiktoken, tokenizers): pyo3_runtime.PanicException derives from
    BaseException, not Exception, so `except Exception` lets it through. Each extension has its own class."""
    return type(e).__name__ == "PanicException"


def memory_limit_bytes() -> int:
    """How much memory a model may take: $NANOCHAT_MAX_MODEL_BYTES, else physical memory, else RLIMIT_AS."""
    if os.environ.get("NANOCHAT_MAX_MODEL_BYTES"):
        return int(os.environ["NANOCHAT_MAX_MODEL_BYTES"])
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limit = min(limit, soft)
    except (ImportError, OSError, ValueError):
        pass
    return limit


def _kind(mode: int) -> str:
    for check, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                        (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if check(mode):
            return name
    return "special file"


@contextmanager
def open_regular(path: str | os.PathLike, max_bytes: int, error: Callable[[str], Exception],
                 what: str = "file") -> Iterator[tuple[IO[bytes], int]]:
    """(binary file, size) of a regular file no larger than max_bytes; `error(message)` is raised otherwise."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading blocks until a writer appears; this way it returns at once.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as e:
        raise error(f"cannot open {what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path} is a {_kind(st.st_mode)}, not a regular file; refusing to read it")
        if st.st_size > max_bytes:
            raise error(f"{what} {path} is {st.st_size:,} bytes, over the {max_bytes:,}-byte limit for this file "
                        "(raise NANOCHAT_MAX_MODEL_BYTES if the model really is that large)")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f, st.st_size


def read_bounded(path: str | os.PathLike, max_bytes: int, error: Callable[[str], Exception],
                 what: str = "file") -> bytes:
    with open_regular(path, max_bytes, error, what) as (f, _):
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew after the check
        raise error(f"{what} {path} is over the {max_bytes:,}-byte limit for this file")
    return data


def _check_zip(f: IO[bytes], size: int, path: Path, error: Callable[[str], Exception]) -> None:
    """A torch.save file is a zip of stored records; refuse compression, oversized pickles and impossible sizes."""
    try:
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise error(f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive): {clip(str(e))}; "
                    "it is truncated or corrupt, or was written with the legacy format: re-save it with torch.save"
                    ) from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise error(f"{path}: record {short(info.filename, 80)} is compressed; torch.save never compresses, and "
                        "a compressed record can inflate far beyond the file's size. Re-save it with torch.save")
        if info.filename.endswith(".pkl") and info.file_size > MAX_PICKLE_BYTES:
            raise error(f"{path}: record {short(info.filename, 80)} is {info.file_size:,} bytes, over the "
                        f"{MAX_PICKLE_BYTES:,}-byte limit for a checkpoint's pickle")
    if sum(i.file_size for i in infos) > size:
        raise error(f"{path}: its records claim more bytes than the file holds; it is corrupt")


def _tensors(obj: Any, where: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a loaded checkpoint object, with where it sits (for the error message)."""
    if depth > 16:
        raise ValueError(f"{where} nests deeper than 16 levels")
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{where}[{short(k, 60)}]", depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{where}[{i}]", depth + 1)


def check_tensor(t: torch.Tensor, where: str) -> str | None:
    """Why a tensor is not a plain view of the bytes stored for it (None when it is)."""
    if t.layout != torch.strided or t.is_quantized or t.is_meta:
        return f"{where} has layout {t.layout}, only dense tensors are allowed"
    if t.dtype not in TENSOR_DTYPES:
        return f"{where} has dtype {t.dtype}, expected one of {[str(d) for d in TENSOR_DTYPES]}"
    if not t.is_contiguous():
        return (f"{where} of shape {tuple(t.shape)} has strides {t.stride()}: a zero-stride or overlapping view "
                "(torch.save writes contiguous tensors)")
    if (t.storage_offset() + t.numel()) * t.element_size() > t.untyped_storage().nbytes():
        return f"{where} of shape {tuple(t.shape)} needs more bytes than its storage holds"
    return None


def load_torch_file(path: str | os.PathLike, max_bytes: int, error: Callable[[str], Exception],
                    what: str = "checkpoint file") -> Any:
    """
    torch.load(weights_only=True) of a .pt after the checks above, memory-mapped (nothing is allocated for the
    tensors while they are checked). Returns the object with every tensor checked and copied off the mapping.
    """
    path = Path(path)
    with open_regular(path, max_bytes, error, what) as (f, size):
        _check_zip(f, size, path, error)
        f.seek(0)
        # /proc/self/fd/N reopens the very file that was checked (a path could be swapped for a FIFO meanwhile).
        proc = Path(f"/proc/self/fd/{f.fileno()}")
        source = proc if proc.exists() else path
        try:
            obj = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        except BaseException as e:
            if not isinstance(e, Exception) and not is_panic(e):
                raise
            raise error(f"cannot read {what} {path} ({size:,} bytes): {type(e).__name__}: "
                        f"{clip(str(e).splitlines()[0] if str(e) else '', 200)}. The file is truncated, corrupt, or "
                        "not a weights-only PyTorch checkpoint; re-save it or load an earlier step") from None
        total = 0
        try:
            tensors = list(_tensors(obj, "checkpoint"))
        except (ValueError, RecursionError) as e:
            raise error(f"{path}: {clip(str(e), 200)}") from None
        for where, t in tensors:
            problem = check_tensor(t, where)
            if problem:
                raise error(f"{path}: {problem}; refusing to load it")
            total += t.numel() * t.element_size()
        if total > size:
            raise error(f"{path}: its tensors add up to {total:,} bytes but the file holds {size:,}: tensors share "
                        "storage, which torch.save of a state dict never produces")
        return _copy_off_mapping(obj)


def _copy_off_mapping(obj: Any) -> Any:
    # A tensor left on the mapping would fault (SIGBUS) if the file were truncated while the model is in use.
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _copy_off_mapping(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy_off_mapping(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_copy_off_mapping(v) for v in obj)
    return obj


def nonfinite_count(t: torch.Tensor, chunk: int = 1 << 22) -> int:
    """How many NaN/inf values a float tensor holds, in chunks so no full-size temporary is made."""
    if not t.is_floating_point():
        return 0
    flat, count = t.reshape(-1), 0
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk]
        # Fast path (~40x faster than counting): a NaN or inf anywhere makes the sum non-finite; only then (or on
        # an overflow, which needs weights near 1e32) are they counted.
        if not torch.isfinite(part.sum(dtype=torch.float32)):
            count += int((~torch.isfinite(part)).sum())
    return count
