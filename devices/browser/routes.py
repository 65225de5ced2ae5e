"""The browser device: a page the gateway serves that trains in WebAssembly (issue 8).

``browser_router`` adds to the gateway's FastAPI app:

- ``GET /device``: the page (``devices/browser/device.html`` + ``device.js``); its query says
  which run and partition it is (``?run=<id>&index=<k>&clients=<K>``, optional
  ``dataset``, ``partition``, ``seed``, ``name``);
- ``GET /device/kernels.wasm``: ``devices/wasm/kernels.wasm``, the module the Python
  ``--runtime wasm`` device runs in wasmtime;
- ``GET /device/data``: the device's partition of the training set, as a Python device
  loads it (``learning.data``), raw: float32 rows then int32 labels;
- ``POST /device/codec/decode`` and ``/device/codec/encode``: the codec (zstd, bf16 ...)
  for a page that has no zstd: a blob to raw float32 tensors, and a raw float32 delta to an
  update blob against a base version, exactly as ``LocalTrainer.encode_delta`` makes it.

Everything else the page does through ``/api/v1`` like any HTTP device: register, signal
join and ready, heartbeat, long-poll its messages, fetch the announced model, upload.
The conversion routes hold no state and need no token; their bodies are read with the
gateway's cap (``protocol.http_body``): a bad Content-Length is a 400, and a body over the
cap a 413 before more than the cap is read.

A device feature, so it lives in ``devices`` (it imports only ``protocol`` and ``learning``
of ours, and fastapi); the gateway command mounts it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse

from devices.wasm import MODULE_PATH
from protocol.codec import CodecError, DecodeLimits, Encoding, decode, encode
from protocol.http_body import BodyRefused, read_limited

PAGE_DIR = Path(__file__).parent
TENSORS_HEADER = "x-fedmq-tensors"  # JSON [[name, [shape...]], ...], in body order


@lru_cache(maxsize=8)
def _partition(
    dataset: str, clients: int, index: int, partition: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    from learning.data import load_dataset  # torch only where it is used
    from learning.data import partition as cut

    data = load_dataset(dataset)
    idx = cut(partition, data.y_train, clients, seed=seed)[index]
    x = np.ascontiguousarray(data.x_train[idx], dtype=np.float32).reshape(len(idx), -1)
    return x, np.asarray(data.y_train[idx], dtype=np.int32)


async def _body(request: Request, limit: int) -> bytes:
    try:
        return await read_limited(request.headers.get("content-length"), request.stream(), limit)
    except BodyRefused as e:
        raise HTTPException(e.status, e.reason) from None


def _tensors(raw: np.ndarray, layout: Any) -> dict[str, np.ndarray]:
    """``raw`` float32 cut into the tensors ``layout`` (``[[name, shape], ...]``) names."""
    tensors: dict[str, np.ndarray] = {}
    at = 0
    for name, shape in layout:
        size = int(np.prod(shape, dtype=np.int64))
        if at + size > raw.size:
            raise ValueError("body shorter than the layout")
        tensors[str(name)] = raw[at : at + size].reshape([int(s) for s in shape])
        at += size
    if at != raw.size or not tensors:
        raise ValueError("body and layout disagree")
    return tensors


def browser_router(limits: DecodeLimits, max_body_bytes: int) -> APIRouter:
    router = APIRouter(prefix="/device", tags=["browser device"])

    @router.get("", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE_DIR / "device.html", media_type="text/html")

    @router.get("/device.js", include_in_schema=False)
    def script() -> FileResponse:
        return FileResponse(PAGE_DIR / "device.js", media_type="text/javascript")

    @router.get("/kernels.wasm", include_in_schema=False)
    def module() -> FileResponse:
        return FileResponse(MODULE_PATH, media_type="application/wasm")

    @router.get("/data", response_class=Response)
    def data(
        clients: Annotated[int, Query(ge=1, le=10_000)],
        index: Annotated[int, Query(ge=0)],
        dataset: Annotated[str, Query(pattern=r"^[a-z0-9_-]{1,32}$")] = "digits",
        partition: Annotated[str, Query(pattern=r"^[a-z0-9_-]{1,32}$")] = "iid",
        seed: int = 0,
    ) -> Response:
        """Partition ``index`` of ``clients``: float32 (rows, features) then int32 labels."""
        if index >= clients:
            raise HTTPException(422, f"index {index} must be below clients {clients}")
        try:
            x, y = _partition(dataset, clients, index, partition, seed)
        except (KeyError, ValueError) as e:
            raise HTTPException(422, str(e)) from None
        headers = {"x-fedmq-rows": str(x.shape[0]), "x-fedmq-features": str(x.shape[1])}
        return Response(
            x.tobytes() + y.tobytes(), media_type="application/octet-stream", headers=headers
        )

    @router.post("/codec/decode", response_class=Response)
    async def decode_blob(request: Request) -> Response:
        """A codec blob to its float tensors, raw float32 in the order of the header."""
        try:
            decoded = decode(await _body(request, max_body_bytes), limits=limits)
        except CodecError as e:
            raise HTTPException(422, f"blob refused: {e}") from None
        tensors = {n: np.asarray(v, dtype=np.float32) for n, v in decoded.tensors.items()}
        layout = [[n, list(v.shape)] for n, v in tensors.items()]
        raw = b"".join(np.ascontiguousarray(v).tobytes() for v in tensors.values())
        return Response(
            raw,
            media_type="application/octet-stream",
            headers={TENSORS_HEADER: json.dumps(layout, separators=(",", ":"))},
        )

    @router.post("/codec/encode", response_class=Response)
    async def encode_delta(
        request: Request,
        base_version: Annotated[int, Query(ge=0, le=10**9)],
        encoding: Annotated[str, Query()] = Encoding.BF16.value,
    ) -> Response:
        """Raw float32 tensors (laid out as ``x-fedmq-tensors`` says) to an update blob:
        a delta against ``base_version`` (the device computed trained - global)."""
        body = await _body(request, max_body_bytes)
        try:
            enc = Encoding(encoding)
            raw = np.frombuffer(body, dtype=np.float32)
            tensors = _tensors(raw, json.loads(request.headers.get(TENSORS_HEADER, "[]")))
            zeros = {n: np.zeros_like(v) for n, v in tensors.items()}
            blob = encode(tensors, enc, base=zeros, base_version=str(base_version))
        except (ValueError, TypeError, CodecError) as e:
            raise HTTPException(422, f"cannot encode: {e}") from None
        return Response(blob, media_type="application/octet-stream")

    return router
