"""The browser device's routes on a bare FastAPI app: the page, the module, a partition as
raw bytes, and the codec conversions the page relies on (a blob to raw float32 and a raw
delta back to an update blob that decodes to it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from devices.wasm import MODULE_PATH
from fedmq.browser_device import TENSORS_HEADER, browser_router
from learning.data import load_dataset, partition
from protocol.codec import DecodeLimits, Encoding, decode, encode


@pytest.fixture
def http() -> TestClient:
    app = FastAPI()
    app.include_router(browser_router(DecodeLimits(), max_body_bytes=1 << 20))
    return TestClient(app)


def test_page_script_and_module_are_served(http: TestClient) -> None:
    page = http.get("/device")
    assert page.status_code == 200 and '<script type="module" src="/device/device.js">' in page.text
    assert "instantiateStreaming" in http.get("/device/device.js").text
    wasm = http.get("/device/kernels.wasm")
    assert wasm.headers["content-type"] == "application/wasm"
    assert wasm.content == MODULE_PATH.read_bytes()


def test_a_partition_comes_as_float32_rows_then_int32_labels(http: TestClient) -> None:
    res = http.get("/device/data", params={"clients": 4, "index": 2})
    assert res.status_code == 200
    rows, features = int(res.headers["x-fedmq-rows"]), int(res.headers["x-fedmq-features"])
    data = load_dataset("digits")
    idx = partition("iid", data.y_train, 4, seed=0)[2]
    assert (rows, features) == (len(idx), 64)
    x = np.frombuffer(res.content[: rows * features * 4], dtype=np.float32)
    y = np.frombuffer(res.content[rows * features * 4 :], dtype=np.int32)
    np.testing.assert_array_equal(x.reshape(rows, features), data.x_train[idx].reshape(rows, -1))
    np.testing.assert_array_equal(y, data.y_train[idx])
    assert http.get("/device/data", params={"clients": 4, "index": 4}).status_code == 422


def test_decode_then_encode_round_trips_a_delta(http: TestClient) -> None:
    rng = np.random.default_rng(0)
    weights = {
        "net.0.weight": rng.normal(size=(8, 4)).astype(np.float32),
        "net.0.bias": rng.normal(size=8).astype(np.float32),
    }
    res = http.post("/device/codec/decode", content=encode(weights, Encoding.BF16))
    assert res.status_code == 200
    layout = json.loads(res.headers[TENSORS_HEADER])
    assert layout == [["net.0.weight", [8, 4]], ["net.0.bias", [8]]]
    raw = np.frombuffer(res.content, dtype=np.float32)
    assert raw.size == 40
    delta = (raw * 0.01).astype(np.float32)
    blob = http.post(
        "/device/codec/encode",
        params={"base_version": 3, "encoding": "fp32"},
        content=delta.tobytes(),
        headers={TENSORS_HEADER: json.dumps(layout)},
    )
    assert blob.status_code == 200
    out = decode(blob.content)
    assert out.delta and out.base_version == "3"
    np.testing.assert_array_equal(out.tensors["net.0.weight"].ravel(), delta[:32])
    np.testing.assert_array_equal(out.tensors["net.0.bias"], delta[32:])


def test_bad_bodies_are_refused(http: TestClient) -> None:
    assert http.post("/device/codec/decode", content=b"not a blob").status_code == 422
    layout = json.dumps([["w", [4]]])
    short = http.post(
        "/device/codec/encode",
        params={"base_version": 0},
        content=np.zeros(3, np.float32).tobytes(),
        headers={TENSORS_HEADER: layout},
    )
    assert short.status_code == 422
    big = http.post("/device/codec/decode", content=b"\0" * ((1 << 20) + 1))
    assert big.status_code == 413
