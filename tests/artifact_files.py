"""Files for the artifact store's tests: random bytes of a given size, and a small tree of odd names."""

from __future__ import annotations

import os
from pathlib import Path

MB = 1 << 20


def write_random(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"n_layer": 4}\n',
        "sub/model.bin": os.urandom(300_000),
        "sub/deeper/notes with space.txt": "ünïcode\n".encode(),
        ".hidden": b"x",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files
