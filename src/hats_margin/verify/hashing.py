"""Row identity for the comparison: a 64-bit hash of every column of a row.

The hash covers the exact bits of fixed-width values and the full content of strings and
nested values; rows are matched by ``(pixel, spatial index, hash)``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_NULL = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 values (wraps mod 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def column_hash(column) -> np.ndarray:
    """A uint64 hash per value of an Arrow column (exact bits for fixed-width values, content for
    strings, binary and nested values; nulls hash to one constant).
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    kind = array.type
    n = len(array)
    try:
        width = kind.bit_width
    except ValueError:
        width = 0
    if pa.types.is_boolean(kind):
        values = array.fill_null(False).to_numpy(zero_copy_only=False).astype(np.uint64)
    elif width in (8, 16, 32, 64) and len(array.buffers()) == 2:
        raw = np.frombuffer(array.buffers()[1], dtype=f"u{width // 8}", count=array.offset + n)
        values = raw[array.offset :].astype(np.uint64)
    elif (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or (pa.types.is_large_binary(kind))
    ):
        values = _bytes_hash(array)
    else:  # nested, decimal, ...: the exact python value (repr of floats round-trips)
        import pandas as pd  # only for such columns: importing pandas costs workers ~0.5 s

        values = pd.util.hash_array(np.array([repr(v) for v in array.to_pylist()], dtype=object))
    values = _mix(values.astype(np.uint64, copy=False))
    if array.null_count:
        valid = array.is_valid().to_numpy(zero_copy_only=False)
        values = np.where(valid, values, _NULL)
    return values


def _bytes_hash(array: pa.Array) -> np.ndarray:
    """Polynomial hash (mod 2**64) of each value's bytes, and its length; vectorised."""
    n = len(array)
    offsets_dtype = (
        np.int64
        if pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type)
        else (np.int32)
    )
    offsets = np.frombuffer(array.buffers()[1], dtype=offsets_dtype, count=array.offset + n + 1)[
        array.offset :
    ]
    offsets = offsets.astype(np.int64)
    data = array.buffers()[2]
    lengths = np.diff(offsets)
    first, total = int(offsets[0]), int(offsets[-1] - offsets[0])
    if total == 0:
        return lengths.astype(np.uint64)
    raw = np.frombuffer(data, dtype=np.uint8, count=first + total)[first:].astype(np.uint64)
    longest = int(lengths.max())
    powers = np.cumprod(np.full(longest, np.uint64(1099511628211), dtype=np.uint64))  # wraps mod 2**64
    position = np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1] - first, lengths)
    weighted = (raw + np.uint64(1)) * powers[position]
    sums = np.zeros(n, dtype=np.uint64)
    nonempty = np.flatnonzero(lengths > 0)
    sums[nonempty] = np.add.reduceat(weighted, (offsets[:-1] - first)[nonempty])
    return sums ^ (lengths.astype(np.uint64) << np.uint64(40))


def row_hashes(table: pa.Table) -> np.ndarray:
    """A uint64 hash per row over every column, in column order."""
    result = np.zeros(table.num_rows, dtype=np.uint64)
    for i, column in enumerate(table.columns):
        result = _mix(result * np.uint64(31) + column_hash(column) + np.uint64(i + 1))
    return result
