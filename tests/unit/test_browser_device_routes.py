"""The browser device's routes on a bare FastAPI app: the page, the module, a partition as
raw bytes, and the codec conversions the page relies on (a blob to raw float32 and a raw
delta back to an update blob that decodes to it), and their bodies' cap."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from devices.browser import TENSORS_HEADER, browser_router
from devices.wasm import MODULE_PATH
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


class _Upload:
    """Drives the app as a server would (raw ASGI), handing it the body one part at a time
    and counting the parts it pulls: what ``TestClient`` cannot show."""

    def __init__(self, parts: int, size: int) -> None:
        self.parts, self.size, self.pulled = parts, size, 0
        self.status = 0
        self.body = b""

    async def receive(self) -> dict[str, Any]:
        if self.pulled >= self.parts:
            return {"type": "http.disconnect"}
        self.pulled += 1
        more = self.pulled < self.parts
        return {"type": "http.request", "body": b"\0" * self.size, "more_body": more}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    def post(self, app: FastAPI, path: str, headers: dict[str, str]) -> _Upload:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"base_version=0",
            "root_path": "",
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        asyncio.run(app(scope, self.receive, self.send))
        return self


CODEC_ROUTES = ["/device/codec/decode", "/device/codec/encode"]
LIMIT = 1 << 20


@pytest.fixture
def app() -> FastAPI:
    app = FastAPI()
    app.include_router(browser_router(DecodeLimits(), max_body_bytes=LIMIT))
    return app


@pytest.mark.parametrize("path", CODEC_ROUTES)
def test_a_bad_content_length_is_a_400_with_its_reason(app: FastAPI, path: str) -> None:
    up = _Upload(parts=1, size=16).post(app, path, {"content-length": "sixteen"})
    assert up.status == 400
    assert "'sixteen' is not a byte count" in json.loads(up.body)["detail"]
    assert up.pulled == 0


@pytest.mark.parametrize("path", CODEC_ROUTES)
def test_a_declared_body_over_the_limit_is_a_413_without_reading(app: FastAPI, path: str) -> None:
    up = _Upload(parts=64, size=1 << 16).post(app, path, {"content-length": str(LIMIT + 1)})
    assert up.status == 413 and "limit" in json.loads(up.body)["detail"]
    assert up.pulled == 0


@pytest.mark.parametrize("path", CODEC_ROUTES)
def test_a_chunked_body_over_the_limit_is_a_413_read_no_further(app: FastAPI, path: str) -> None:
    # 4 MiB in 64 KiB parts and no Content-Length: 16 parts fill the 1 MiB limit and the
    # 17th is refused, so at most the limit is ever held; the other 47 are never pulled.
    up = _Upload(parts=64, size=1 << 16).post(app, path, {"transfer-encoding": "chunked"})
    assert up.status == 413 and "limit" in json.loads(up.body)["detail"]
    assert up.pulled == 17
