"""b-bit packing round trips, the bit order, and the packed model file's integrity checks."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from sub8.emulator import packing as P


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 13, 1001])
def test_unpack_inverts_pack(bits, count):
    codes = np.random.default_rng(bits * count).integers(0, 2**bits, count)
    packed = P.pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == P.packed_nbytes(count, bits) == -(-count * bits // 8)
    np.testing.assert_array_equal(P.unpack_bits(packed, bits, count), codes)


def test_bit_order_is_little_endian():
    assert P.pack_bits(np.array([0x3, 0xA]), 4).tolist() == [0xA3]  # code 0 in the low nibble
    assert P.pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0x01, 0x01]
    assert P.pack_bits(np.array([0b101, 0b110, 0b011]), 3).tolist() == [0b11110101, 0]  # stream 101 011 110, LSB first


def test_pack_rejects_out_of_range_codes_and_bits():
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        P.pack_bits(np.array([8]), 3)
    with pytest.raises(ValueError, match="bits must be"):
        P.pack_bits(np.array([0]), 9)


def make_model(rng: np.random.Generator) -> dict[str, P.PackedTensor]:
    """Tensors at several widths, per-tensor and per-channel scales and tables, a table smaller than 2^b."""
    tensors = {}
    for name, shape, bits, table_size, per_channel in [
        ("encoder.lstm.weight_ih_l0", (12, 5), 5, 32, True),
        ("joiner.out.weight", (7, 3, 3), 3, 6, False),
        ("predictor.embedding.weight", (9,), 8, 256, False),
        ("ctc_head.weight", (4, 4), 1, 2, True),
    ]:
        lut_shape = (shape[0], table_size) if per_channel else (table_size,)
        lut = np.sort(rng.integers(-128, 128, lut_shape), axis=-1).astype(np.int8)
        scale = rng.uniform(1e-3, 1e-1, shape[0] if per_channel else ()).astype(np.float32)
        tensors[name] = P.PackedTensor.from_codes(rng.integers(0, table_size, shape), bits, lut, scale)
    return tensors


@pytest.fixture
def saved(tmp_path):
    tensors = make_model(np.random.default_rng(0))
    path = tmp_path / "model.sub8pack"
    P.save_packed_model(path, tensors, {"method": "gq", "plan": "5bit"})
    return path, tensors


def test_model_file_round_trip(saved):
    path, tensors = saved
    loaded, metadata = P.load_packed_model(path)
    assert metadata == {"method": "gq", "plan": "5bit"} and list(loaded) == list(tensors)
    for name, tensor in tensors.items():
        got = loaded[name]
        assert got.shape == tensor.shape and got.bits == tensor.bits
        np.testing.assert_array_equal(got.codes(), tensor.codes())
        np.testing.assert_array_equal(got.int8_weight(), tensor.int8_weight())
        np.testing.assert_array_equal(got.scale, tensor.scale)
        np.testing.assert_array_equal(got.lut, tensor.lut)


def test_packed_size_equals_payload_bytes(saved):
    path, tensors = saved
    data = path.read_bytes()
    magic, version, header_len = struct.unpack_from("<8sIQ", data)
    payload = len(data) - struct.calcsize("<8sIQ") - header_len - 32
    expected = sum(P.packed_nbytes(int(np.prod(t.shape)), t.bits) + t.lut.size + 4 * t.scale.size
                   for t in tensors.values())
    assert P.packed_size_bytes(tensors) == payload == expected


def test_int8_weight_goes_through_the_table():
    tensor = P.PackedTensor.from_codes(np.array([[0, 2], [1, 2]]), 2, np.array([-100, 5, 77], np.int8))
    np.testing.assert_array_equal(tensor.int8_weight(), [[-100, 77], [5, 77]])
    per_channel = P.PackedTensor.from_codes(np.array([[0, 1], [1, 1]]), 1, np.array([[-1, 1], [-2, 2]], np.int8))
    np.testing.assert_array_equal(per_channel.int8_weight(), [[-1, 1], [2, 2]])
    with pytest.raises(ValueError, match="no entry"):
        P.PackedTensor.from_codes(np.array([3]), 2, np.array([1, 2, 3], np.int8))


def rewrite(path, edit) -> None:
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(edit(data)))


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda d: d[:-1], "truncated"),
        (lambda d: d[:10], "truncated"),
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: d[:-40] + bytes([d[-40] ^ 0x01]) + d[-39:], "checksum mismatch"),
        (lambda d: b"NOTSUB8!" + d[8:], "not a packed sub8 model"),
        (lambda d: d[:8] + struct.pack("<I", 99) + d[12:], "unknown format version 99"),
    ],
    ids=["last-byte", "preamble", "half", "altered-byte", "magic", "version"],
)
def test_damaged_files_are_clear_errors(saved, edit, problem):
    path, _ = saved
    rewrite(path, edit)
    with pytest.raises(P.PackedFormatError, match=problem) as err:
        P.load_packed_model(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("per_channel", [False, True])
def test_packed_bytes_match_the_quantizers_export(per_channel):
    import torch

    from sub8.quant import QuantizedTensor

    rng = np.random.default_rng(7)
    codes = rng.integers(0, 16, (6, 11))
    lut = rng.integers(-128, 128, (6, 16) if per_channel else (16,)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, 6 if per_channel else ()).astype(np.float32)
    exported = QuantizedTensor(torch.from_numpy(codes), torch.from_numpy(lut), torch.from_numpy(scale), 4)
    assert P.PackedTensor.from_codes(codes, 4, lut, scale).nbytes == exported.packed_bytes()
