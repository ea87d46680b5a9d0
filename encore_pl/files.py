"""Atomic writes: a file the project writes (cache, checkpoint, patch, results) is complete or absent."""

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends, sync it and rename it to `path`.

    A failure in the block (or a kill) leaves `path` as it was; the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # some writers (safetensors) create private files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
