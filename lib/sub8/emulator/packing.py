"""b-bit weight packing and the packed model file.

Bit order (little-endian): the codes form one bit stream, code ``i`` occupying stream bits ``[i·b, (i+1)·b)`` with
its least significant bit first, and stream bit ``j`` is bit ``j % 8`` (LSB = 0) of byte ``j // 8``. The last byte
is zero-padded. For b = 4 this puts code 0 in the low nibble of byte 0 and code 1 in its high nibble.

A packed tensor is the codes (``ceil(N·b / 8)`` bytes), an int8 lookup table of ``K ≤ 2^b`` entries that the
accelerator's decompressor expands codes through (uniform quantizers: the table of their levels; GQ/S8BQAT: their
learned levels), shared (K,) or one per output channel (C, K), and float32 scale(s), () or (C,). This is
``sub8.quant.QuantizedTensor`` in bytes, and :attr:`PackedTensor.nbytes` equals its ``packed_bytes()``.

File layout (all integers little-endian)::

    magic       8 bytes   b"SUB8PACK"
    version     uint32    FORMAT_VERSION
    header_len  uint64    length of the header in bytes
    header      JSON, UTF-8: {"payload_bytes": P, "metadata": {...}, "tensors": [{"name", "shape", "bits",
                "codes": [offset, nbytes], "lut": [offset, nbytes], "scale": [offset, nbytes], "lut_shape",
                "scale_shape"}]}
                offsets are relative to the payload's start
    payload     P bytes   per tensor: packed codes, int8 table, float32 scales
    sha256      32 bytes  of everything before it
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sub8.io import atomic_path

MAGIC = b"SUB8PACK"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIQ")  # magic, version, header_len
_DIGEST_BYTES = 32


class PackedFormatError(ValueError):
    """A packed model file that cannot be read; the message names the file and the problem."""


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy packed: ``ceil(count · bits / 8)``."""
    _check_bits(bits)
    return (count * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes (any shape, integers in [0, 2^bits)) densely, flattened in C order. Returns (nbytes,) uint8."""
    _check_bits(bits)
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits}-bit packing, got [{flat.min()}, {flat.max()}]")
    bit_planes = (flat.astype(np.uint8)[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # (N, bits), LSB first
    return np.packbits(bit_planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as (count,) uint8."""
    _check_bits(bits)
    if packed.size != packed_nbytes(count, bits):
        raise ValueError(f"{count} codes of {bits} bits need {packed_nbytes(count, bits)} bytes, got {packed.size}")
    bit_planes = np.unpackbits(packed.astype(np.uint8), count=count * bits, bitorder="little").reshape(count, bits)
    return (bit_planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


@dataclass(frozen=True)
class PackedTensor:
    """One weight tensor as the accelerator stores it.

    Attributes:
        shape: the weight's shape.
        bits: code width b (1..8).
        packed: (ceil(N·b/8),) uint8 packed codes.
        lut: int8 table, (K,) shared or (C, K) per output channel (C = shape[0]), K ≤ 2^b.
        scale: float32 scale, shape () per tensor or (C,) per output channel.
    """

    shape: tuple[int, ...]
    bits: int
    packed: np.ndarray
    lut: np.ndarray
    scale: np.ndarray

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if not self.shape:
            raise ValueError("a packed tensor needs at least one dimension")
        count = int(np.prod(self.shape))
        if self.packed.dtype != np.uint8 or self.packed.shape != (packed_nbytes(count, self.bits),):
            raise ValueError(f"packed codes must be ({packed_nbytes(count, self.bits)},) uint8, "
                             f"got {self.packed.shape} {self.packed.dtype}")
        lut_ok = self.lut.ndim == 1 or (self.lut.ndim == 2 and self.lut.shape[0] == self.shape[0])
        if self.lut.dtype != np.int8 or not lut_ok or not 1 <= self.lut.shape[-1] <= 2**self.bits:
            raise ValueError(f"lut must be int8 (K,) or ({self.shape[0]}, K) with K in 1..{2**self.bits}, "
                             f"got {self.lut.shape} {self.lut.dtype}")
        if self.scale.dtype != np.float32 or self.scale.shape not in ((), (self.shape[0],)):
            raise ValueError(f"scale must be float32 of shape () or ({self.shape[0]},), "
                             f"got {self.scale.shape} {self.scale.dtype}")

    @classmethod
    def from_codes(cls, codes: np.ndarray, bits: int, lut: np.ndarray, scale: np.ndarray | float = 1.0) -> PackedTensor:
        """Pack integer ``codes`` (the weight's shape) with their int8 ``lut`` and float32 ``scale``."""
        codes = np.asarray(codes)
        lut = np.asarray(lut)
        if codes.size and codes.max() >= lut.shape[-1]:
            raise ValueError(f"code {codes.max()} has no entry in a {lut.shape[-1]}-entry lookup table")
        return cls(tuple(codes.shape), bits, pack_bits(codes, bits), lut.astype(np.int8), np.asarray(scale, np.float32))

    def codes(self) -> np.ndarray:
        """The codes, unpacked to the weight's shape (uint8)."""
        return unpack_bits(self.packed, self.bits, int(np.prod(self.shape))).reshape(self.shape)

    def int8_weight(self) -> np.ndarray:
        """The int8 weight the MAC array sees: ``lut[codes]``, or ``lut[c, codes[c]]`` for per-channel tables."""
        codes = self.codes()
        if self.lut.ndim == 1:
            return self.lut[codes]
        return np.take_along_axis(self.lut, codes.reshape(self.shape[0], -1), axis=1).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed codes + table + scales."""
        return self.packed.nbytes + self.lut.nbytes + self.scale.nbytes


def packed_size_bytes(tensors: dict[str, PackedTensor]) -> int:
    """Payload bytes of a packed model: Σ (packed codes + int8 table + float32 scales) over its tensors."""
    return sum(t.nbytes for t in tensors.values())


def save_packed_model(
    path: str | os.PathLike, tensors: dict[str, PackedTensor], metadata: dict[str, Any] | None = None
) -> None:
    """Write ``tensors`` (name → PackedTensor) and JSON-serialisable ``metadata`` atomically in the format above."""
    entries, chunks, offset = [], [], 0
    for name, tensor in tensors.items():
        entry: dict[str, Any] = {"name": name, "shape": list(tensor.shape), "bits": tensor.bits,
                                 "lut_shape": list(tensor.lut.shape), "scale_shape": list(tensor.scale.shape)}
        for part, data in (("codes", tensor.packed.tobytes()), ("lut", tensor.lut.tobytes()),
                           ("scale", tensor.scale.astype("<f4").tobytes())):
            entry[part] = [offset, len(data)]
            chunks.append(data)
            offset += len(data)
        entries.append(entry)
    header = json.dumps({"payload_bytes": offset, "metadata": metadata or {}, "tensors": entries},
                        sort_keys=True).encode("utf-8")
    body = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header)) + header + b"".join(chunks)
    with atomic_path(path) as tmp:
        tmp.write_bytes(body + hashlib.sha256(body).digest())


def load_packed_model(path: str | os.PathLike) -> tuple[dict[str, PackedTensor], dict[str, Any]]:
    """Read a file written by :func:`save_packed_model`; returns (tensors, metadata).

    Raises:
        PackedFormatError: wrong magic, unknown version, truncated file, checksum mismatch or a malformed header;
            the message names the file and which of these it is.
    """
    path = Path(path)
    data = path.read_bytes()

    def fail(problem: str) -> PackedFormatError:
        return PackedFormatError(f"{path}: {problem}")

    if len(data) < _PREAMBLE.size:
        raise fail(f"truncated: {len(data)} bytes, shorter than the {_PREAMBLE.size}-byte preamble")
    magic, version, header_len = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise fail(f"not a packed sub8 model (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise fail(f"unknown format version {version} (this reader knows version {FORMAT_VERSION})")
    header_end = _PREAMBLE.size + header_len
    if len(data) < header_end + _DIGEST_BYTES:
        raise fail(f"truncated: {len(data)} bytes, header alone claims {header_len}")
    try:
        header = json.loads(data[_PREAMBLE.size:header_end].decode("utf-8"))
        payload_bytes = int(header["payload_bytes"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise fail(f"corrupt header ({err})") from None
    expected_size = header_end + payload_bytes + _DIGEST_BYTES
    if len(data) != expected_size:
        raise fail(f"truncated or extended: {len(data)} bytes, header says {expected_size}")
    body, digest = data[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise fail("checksum mismatch: the file was altered or corrupted")
    payload = data[header_end:header_end + payload_bytes]
    tensors = {}
    try:
        for entry in header["tensors"]:
            parts = {}
            for part, dtype in (("codes", np.uint8), ("lut", np.int8), ("scale", "<f4")):
                start, nbytes = entry[part]
                parts[part] = np.frombuffer(payload[start:start + nbytes], dtype=dtype)
            tensors[entry["name"]] = PackedTensor(
                tuple(entry["shape"]), entry["bits"], parts["codes"], parts["lut"].reshape(entry["lut_shape"]),
                parts["scale"].astype(np.float32).reshape(entry["scale_shape"]),
            )
    except (KeyError, TypeError, ValueError) as err:
        raise fail(f"inconsistent header ({err})") from None
    return tensors, header["metadata"]
