"""A headless Chromium driven over the DevTools protocol (CDP) with the standard library only.

``--remote-debugging-pipe`` makes Chromium read CDP commands from its file descriptor 3 and write replies and
events to descriptor 4, each message one JSON object followed by a NUL byte. The browser runs with a fresh profile
in a temporary folder, no sandbox (containers), no network features, in a process session of its own that
`HeadlessChromium.close` kills (zygote and renderers included). One page, attached in "flat" mode: page-level
commands carry its ``sessionId``.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--mute-audio",
    "--no-proxy-server",  # the pages are on 127.0.0.1; never through an http_proxy from the environment
)
COMMAND_TIMEOUT_S = 60


def find_chromium() -> str | None:
    """A Chromium (or Chrome) binary on PATH, else /usr/bin/chromium if present, else None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def require_chromium(purpose: str) -> str:
    """The Chromium binary, or skip the calling test naming the Debian package to install and what it is for."""
    import pytest

    binary = find_chromium()
    if binary is None:
        pytest.skip(
            "no Chromium binary (chromium, chromium-browser, google-chrome) on PATH; install the Debian package "
            f"`chromium` (apt-get install -y chromium) to {purpose}"
        )
    return binary


class BrowserError(RuntimeError):
    """A CDP command failed, the browser died, or it did not answer in time."""


class HeadlessChromium:
    """One headless Chromium with one page of ``width`` x ``height`` CSS pixels.

    Args:
        binary: the Chromium executable.
        profile: an empty folder for the profile (and HOME: crash reports and caches stay there).
        width: viewport width in CSS pixels.
        height: viewport height in CSS pixels.
    """

    def __init__(self, binary: str, profile: Path, width: int = 1600, height: int = 1000):
        profile.mkdir(parents=True, exist_ok=True)
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        # The pipes arrive as stdin and stdout; the shell moves them to descriptors 3 and 4 and execs Chromium
        # (no preexec_fn: the test process may have threads).
        with open(profile / "chromium.log", "wb") as log:
            self.process = subprocess.Popen(
                [
                    "/bin/sh",
                    "-c",
                    'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null',
                    binary,
                    *FLAGS,
                    "--remote-debugging-pipe",
                    f"--user-data-dir={profile}",
                    "about:blank",
                ],
                env={**os.environ, "HOME": str(profile)},
                stdin=commands_read,
                stdout=replies_write,
                stderr=log,
                start_new_session=True,
            )
        os.close(commands_read)
        os.close(replies_write)
        self.log = profile / "chromium.log"
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"}, page=False)["targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, page=False)[
                "sessionId"
            ]
            self.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            )
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the browser's whole process session and close the pipes (idempotent)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        for descriptor in (self._commands, self._replies):
            try:
                os.close(descriptor)
            except OSError:
                pass
        self._commands = self._replies = -1

    def call(self, method: str, params: dict[str, Any] | None = None, page: bool = True) -> dict[str, Any]:
        """Send one CDP command (to the page unless ``page`` is False) and return its result; events are dropped."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if page:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise BrowserError(f"Chromium did not answer in {COMMAND_TIMEOUT_S} s")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium exited (status {self.process.poll()}); see {self.log}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> None:
        """Navigate the page to ``url`` (returns once navigation started; wait for content with `wait_for`)."""
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:200]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
        """Evaluate ``expression`` until it is truthy and return that value; after ``timeout_s`` raise an
        AssertionError naming ``what``, with the last value and the start of the page's text."""
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval_s)  # polling the page; the condition, not the sleep, decides
        text = self.evaluate("document.body ? document.body.innerText.slice(0, 1500) : ''")
        raise AssertionError(f"{what}: not seen within {timeout_s} s (last value {value!r}); page text:\n{text}")

    def screenshot(self, path: Path) -> Path:
        """Save the viewport as a PNG at ``path``."""
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
