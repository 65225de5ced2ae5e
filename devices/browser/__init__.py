"""The browser device: the page, its script and the routes the gateway serves for it.

``browser_router`` (``devices.browser.routes``) is mounted by ``fedmq gateway``; the page
(``device.html``, ``device.js``) runs ``devices/wasm/kernels.wasm`` in the browser.
"""

from devices.browser.routes import TENSORS_HEADER, browser_router

__all__ = ["TENSORS_HEADER", "browser_router"]
