"""Every encoding round-trips within its stated error bound; deltas rebuild the weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from learning.models import resnet18
from protocol.codec import (
    CodecError,
    Encoding,
    apply_delta,
    bf16_to_f32,
    decode,
    encode,
    f32_to_bf16,
    peek_header,
    spec_of,
)

FLOAT_DTYPES = [np.float32, np.float16, np.float64]
INT_DTYPES = [np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16, np.uint64, np.bool_]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7)


def _elements(dtype: type, encoding: Encoding) -> st.SearchStrategy:
    if np.dtype(dtype).kind != "f":
        return hnp.from_dtype(np.dtype(dtype))
    # Normal numbers only: subnormals lose all relative precision in any 16-bit format.
    bound = 2.0**15 if encoding == Encoding.FP16 or dtype == np.float16 else 2.0**100
    width = 16 if dtype == np.float16 else 32
    return st.floats(-bound, bound, width=width, allow_subnormal=False)


@st.composite
def tensor_dicts(draw: st.DrawFn, encoding: Encoding) -> dict[str, np.ndarray]:
    names = draw(st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=4, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(FLOAT_DTYPES + INT_DTYPES))
        out[name] = draw(hnp.arrays(dtype, SHAPES, elements=_elements(dtype, encoding)))
    return out


def _assert_within_bound(encoding: Encoding, x: np.ndarray, y: np.ndarray, frac: float) -> None:
    if encoding == Encoding.FP32:
        np.testing.assert_array_equal(y, x)
    elif encoding == Encoding.BF16:
        assert np.all(np.abs(y - x) <= np.abs(x) * 2.0**-8)
    elif encoding == Encoding.FP16:
        # Relative 2^-11 in fp16's normal range, half a subnormal step (2^-25) below it.
        assert np.all(np.abs(y - x) <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25))
    elif encoding == Encoding.INT8:
        ch = x.shape[0] if x.ndim >= 2 else 1
        rows_x = x.reshape(ch, x.size // ch if ch else 0).astype(np.float64)
        rows_y = y.reshape(rows_x.shape)
        scale = np.abs(rows_x).max(axis=1, keepdims=True, initial=0) / 127
        assert np.all(np.abs(rows_y - rows_x) <= scale / 2 * (1 + 1e-5) + 1e-38)
    else:
        _assert_topk(x.reshape(-1), y.reshape(-1), frac)


def _assert_topk(x: np.ndarray, y: np.ndarray, frac: float) -> None:
    if x.size == 0:
        return
    kept = y != 0
    # bf16 never rounds a normal nonzero number to zero, so kept == nonzero (x may be 0).
    k = min(x.size, max(1, math.ceil(frac * x.size)))
    assert kept.sum() <= k
    if kept.any() and (~kept).any():
        assert np.abs(x[kept]).min() >= np.abs(x[~kept]).max()
    assert np.all(np.abs(y[kept] - x[kept]) <= np.abs(x[kept]) * 2.0**-8)


@pytest.mark.parametrize("encoding", list(Encoding))
@settings(max_examples=40, deadline=None)
@given(data=st.data(), shuffle=st.sampled_from(["auto", True, False]))
def test_every_encoding_round_trips_within_its_error_bound(
    encoding: Encoding, data: st.DataObject, shuffle: bool | str
) -> None:
    tensors = data.draw(tensor_dicts(encoding))
    frac = data.draw(st.sampled_from([0.01, 0.3, 1.0]))
    blob = encode(tensors, encoding, shuffle=shuffle, topk_fraction=frac)
    out = decode(blob, expected=spec_of(tensors))
    assert list(out.tensors) == list(tensors)
    for name, x in tensors.items():
        y = out.tensors[name]
        assert y.shape == x.shape
        if x.dtype.kind != "f":
            assert y.dtype == x.dtype
            np.testing.assert_array_equal(y, x)  # integers travel raw, exactly
        else:
            assert y.dtype == np.float32
            _assert_within_bound(encoding, x.astype(np.float32), y, frac)


def test_bf16_rounds_to_nearest_even_like_torch() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    ties = np.array([0x3F808000, 0x3F818000, 0x7F7F8000, 0x7F7F7FFF, 0x00008000], np.uint32)
    x = np.concatenate([bits, ties]).view(np.float32)
    ours = f32_to_bf16(x)
    theirs = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], theirs.view(np.uint16)[~nan])
    assert np.isnan(bf16_to_f32(ours[nan])).all()


def test_bf16_keeps_nan_of_either_sign_as_nan() -> None:
    x = np.array([0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0xFF800001], np.uint32).view(np.float32)
    back = bf16_to_f32(f32_to_bf16(x))
    assert np.isnan(back).all()
    assert list(np.signbit(back)) == [False, False, True, True]


@pytest.mark.parametrize("encoding", list(Encoding))
def test_resnet_state_dict_with_int64_counters_round_trips(encoding: Encoding) -> None:
    sd = resnet18(num_classes=10, cifar_stem=True).state_dict()
    out = decode(encode(sd, encoding), expected=spec_of(sd))
    counter = out.tensors["bn1.num_batches_tracked"]
    assert counter.dtype == np.int64 and counter.shape == ()
    assert out.tensors["conv1.weight"].dtype == np.float32


def test_delta_round_trips_through_apply_delta() -> None:
    rng = np.random.default_rng(1)
    old = {"w": rng.standard_normal((8, 5)).astype(np.float32), "n": np.array(3, np.int64)}
    new = {
        "w": old["w"] + 0.01 * rng.standard_normal((8, 5)).astype(np.float32),
        "n": np.array(7, np.int64),
    }
    out = decode(encode(new, Encoding.FP32, base=old, base_version="v3"))
    assert out.delta and out.base_version == "v3"
    np.testing.assert_allclose(out.tensors["w"], new["w"] - old["w"], rtol=1e-6)
    rebuilt = apply_delta(old, out, base_version="v3")
    np.testing.assert_allclose(rebuilt["w"], new["w"], rtol=0, atol=1e-6)
    assert rebuilt["n"] == 7  # counters are sent as values, not differences


@pytest.mark.parametrize("encoding", [Encoding.BF16, Encoding.INT8, Encoding.TOPK])
def test_lossy_delta_of_torch_tensors_rebuilds_close_to_the_new_weights(
    encoding: Encoding,
) -> None:
    torch.manual_seed(0)
    old = resnet18(num_classes=10, cifar_stem=True).state_dict()
    new = {
        k: v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v + 1
        for k, v in old.items()
    }
    out = decode(encode(new, encoding, base=old, base_version="g7", topk_fraction=1.0))
    rebuilt = apply_delta(old, out)
    for name, v in new.items():
        # 1e-3 noise: max |delta| ~ 6e-3, so int8 (max/254) and bf16 (2^-8 rel) err < 3e-5.
        np.testing.assert_allclose(rebuilt[name], v.numpy(), rtol=0, atol=5e-5)


def test_apply_delta_refuses_a_full_blob_a_wrong_version_and_other_names() -> None:
    w = {"w": np.ones(3, np.float32)}
    with pytest.raises(CodecError, match="not a delta"):
        apply_delta(w, decode(encode(w)))
    delta = decode(encode(w, base=w, base_version="v1"))
    with pytest.raises(CodecError, match="against 'v1'"):
        apply_delta(w, delta, base_version="v2")
    with pytest.raises(CodecError, match="different tensors"):
        apply_delta({"x": np.ones(3, np.float32)}, delta)


def test_encode_refuses_a_delta_without_a_base_version_or_with_other_shapes() -> None:
    w = {"w": np.ones(3, np.float32)}
    with pytest.raises(CodecError, match="base_version"):
        encode(w, base=w)
    with pytest.raises(CodecError, match="base_version given without base"):
        encode(w, base_version="v1")
    with pytest.raises(CodecError, match="base shape"):
        encode(w, base={"w": np.ones(4, np.float32)}, base_version="v1")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("encoding", list(Encoding))
def test_encode_refuses_nan_and_inf(encoding: Encoding, bad: float) -> None:
    with pytest.raises(CodecError, match=r"NaN|Inf"):
        encode({"w": np.array([1.0, bad], np.float32)}, encoding)


def test_encode_refuses_values_beyond_fp16_range_instead_of_making_inf() -> None:
    with pytest.raises(CodecError, match="fp16 range"):
        encode({"w": np.array([7e4], np.float32)}, Encoding.FP16)


def test_encode_refuses_bad_arguments_with_codec_error() -> None:
    w = {"w": np.ones(3, np.float32)}
    for kwargs in [
        {"shuffle": "yes"},
        {"level": 99},
        {"topk_fraction": 0.0},
        {"metadata": {"a": 1}},
    ]:
        with pytest.raises(CodecError):
            encode(w, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="unknown encoding"):
        encode(w, "fp8")
    with pytest.raises(CodecError, match="unsupported dtype"):
        encode({"s": np.array(["a"])})
    with pytest.raises(CodecError, match="names"):
        encode({"": np.ones(1)})


def test_peek_header_reads_metadata_and_specs_without_decoding() -> None:
    sd = {"w": np.ones((4, 3), np.float32), "n": np.array(5, np.int64)}
    blob = encode(sd, Encoding.INT8, metadata={"run": "r1", "round": "4"})
    head = peek_header(blob)
    assert head.encoding == Encoding.INT8 and not head.delta
    assert head.metadata == {"run": "r1", "round": "4"}
    assert head.tensors == spec_of(sd)
    assert decode(blob).metadata == {"run": "r1", "round": "4"}


def test_shuffle_choice_is_recorded_and_skipped_for_single_byte_data() -> None:
    sd = {"w": np.linspace(-1, 1, 50_000, dtype=np.float32)}
    assert all(r.shuffle for r in peek_header(encode(sd, shuffle=True)).records)
    assert not any(r.shuffle for r in peek_header(encode(sd, shuffle=False)).records)
    assert not peek_header(encode(sd, Encoding.INT8)).records[0].shuffle
    blob = encode(sd, shuffle="auto")
    np.testing.assert_array_equal(decode(blob).tensors["w"], bf16_to_f32(f32_to_bf16(sd["w"])))


def test_topk_keeps_at_least_one_element_per_tensor() -> None:
    sd = {"a": np.array([0.1, -5.0, 2.0], np.float32), "s": np.array(3.0, np.float32)}
    out = decode(encode(sd, Encoding.TOPK, topk_fraction=0.01)).tensors
    np.testing.assert_array_equal(out["a"], [0.0, -5.0, 0.0])
    assert out["s"] == 3.0


def test_empty_model_and_empty_tensors_round_trip() -> None:
    assert decode(encode({})).tensors == {}
    out = decode(encode({"e": np.zeros((0, 3), np.float32)}, Encoding.INT8)).tensors
    assert out["e"].shape == (0, 3)


def test_decoded_tensors_are_writeable_for_torch() -> None:
    out = decode(encode({"w": np.ones(4, np.float32), "n": np.arange(3)}, Encoding.FP32))
    assert all(t.flags.writeable for t in out.tensors.values())
