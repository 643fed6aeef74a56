"""GGUF files: read one with the ``gguf`` package's own reader and check it is complete, or say why not (08).

A GGUF file is a header (metadata key/values: architecture, tokenizer, chat template, ...), a tensor table (name,
shape, ggml type, offset) and the tensor data. :func:`check_gguf` reads the header and table with
``gguf.GGUFReader`` (the reader llama.cpp's Python tools use) and turns every way a file can be broken — missing,
empty, not GGUF, cut short — into a :class:`GGUFFileError` that names the file and the fix.
"""

from __future__ import annotations

import functools
from pathlib import Path

GGUF_MAGIC = b"GGUF"
REMAKE_HINT = "Convert or quantize it again (or download it again)."


class GGUFFileError(ValueError):
    """A GGUF file is missing, truncated or not GGUF at all; the message names the file."""


@functools.lru_cache(maxsize=32)
def _summary(path: str, size: int, mtime_ns: int) -> dict:
    """check_gguf's result for one version of a file (the reader parses every vocabulary entry: ~1 s, so once)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:  # the reader's own complaint, e.g. a reshape past the end
        raise GGUFFileError(f"{path}: truncated or corrupt GGUF ({size:,} bytes; gguf.GGUFReader: {e}). {REMAKE_HINT}") from e
    tensors = reader.tensors
    end = max((t.data_offset + int(t.n_bytes) for t in tensors), default=0)  # vocab-only files have no tensor data
    if end > size:
        raise GGUFFileError(f"{path}: truncated GGUF: its tensors need {end:,} bytes, the file has {size:,}. {REMAKE_HINT}")
    types: dict[str, int] = {}
    for t in tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"path": path, "bytes": size, "tensors": len(tensors), "parameters": sum(int(t.n_elements) for t in tensors),
            "tensor_bytes": sum(int(t.n_bytes) for t in tensors), "tensor_types": dict(sorted(types.items())),
            "metadata_keys": [k for k in reader.fields if not k.startswith("GGUF.")]}


def check_gguf(path: str | Path) -> dict:
    """Read a GGUF file's header and tensor table (``gguf.GGUFReader``); raise GGUFFileError naming the file if broken.

    Returns {"path", "bytes", "tensors", "parameters", "tensor_bytes", "tensor_types", "metadata_keys"}.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFFileError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFFileError(f"{path}: not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r}). {REMAKE_HINT}")
    stat = path.stat()
    return dict(_summary(str(path), stat.st_size, stat.st_mtime_ns))


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF holds (k-quants fall back to other types for some shapes)."""
    return check_gguf(path)["tensor_types"]
