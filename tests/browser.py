"""Drive a headless Chromium through the DevTools protocol, stdlib only.

Just enough of RFC 6455 (WebSocket) to speak to one page target: text frames,
masked from the client as the RFC requires, fragmented replies joined, pings
answered.  Used by the browser tests; not part of dockrune.
"""

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

# RFC 6455 section 1.3: the fixed GUID of the handshake.
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocket:
    """A blocking WebSocket client for ws:// URLs on this machine."""

    def __init__(self, url, timeout=30):
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port),
                                             timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = ("GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n"
                   % (parts.path, parts.netloc, key))
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the browser closed the WebSocket handshake")
            head += chunk
        head, self._buffer = head.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0]
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest())
        if b" 101 " not in status + b" " or accept not in head:
            raise ConnectionError("no WebSocket upgrade: %r" % head[:200])

    def send(self, text):
        payload = text.encode("utf-8")
        mask = os.urandom(4)
        header = bytes([0x81])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        elif len(payload) < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", len(payload))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def recv(self):
        """Return the next text message (fragments joined)."""
        parts = []
        while True:
            first, second = self._read(2)
            opcode, length = first & 0x0F, second & 0x7F
            if length == 126:
                length = struct.unpack("!H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else None
            data = self._read(length)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            if opcode == 0x8:
                raise ConnectionError("the browser closed the WebSocket")
            if opcode == 0x9:
                self._pong(data)
                continue
            if opcode in (0x0, 0x1, 0x2):
                parts.append(data)
                if first & 0x80:
                    return b"".join(parts).decode("utf-8")

    def _pong(self, data):
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data[:125]))
        self.sock.sendall(bytes([0x8A, 0x80 | len(masked)]) + mask + masked)

    def _read(self, count):
        while len(self._buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the browser closed the WebSocket")
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Browser:
    """One headless Chromium with one page, driven over the DevTools protocol.

    events keeps every event seen so far (method, params), so a test can ask
    afterwards whether, say, a JavaScript dialog ever opened.
    """

    def __init__(self, executable, timeout=30, size=(1280, 900)):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="dockrune-chromium-")
        self.stderr = open(os.path.join(self.profile, "stderr.log"), "wb")
        argv = [executable, "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--user-data-dir=" + self.profile, "--remote-debugging-port=0",
                "--window-size=%d,%d" % size, "about:blank"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=self.stderr, stderr=self.stderr,
                                     start_new_session=True)
        self.events = []
        self._next_id = 0
        self.ws = None
        try:
            self.ws = WebSocket(self._page_url(), timeout=timeout)
        except BaseException:
            self.close()
            raise

    def _page_url(self):
        """Wait for DevToolsActivePort, then return the page target's WebSocket."""
        marker = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("chromium exited %d:\n%s" % (
                    self.proc.returncode, self.log()[-2000:]))
            try:
                with open(marker) as f:
                    port = int(f.read().split()[0])
                with urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port,
                                            timeout=5) as response:
                    targets = json.load(response)
                page = next(t for t in targets if t.get("type") == "page")
                return page["webSocketDebuggerUrl"]
            except (OSError, ValueError, IndexError, StopIteration):
                time.sleep(0.2)
        raise RuntimeError("chromium gave no DevTools port in %ds:\n%s" % (
            self.timeout, self.log()[-2000:]))

    def log(self):
        try:
            with open(os.path.join(self.profile, "stderr.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def call(self, method, **params):
        """Send one command; return its result, or raise on a protocol error."""
        self._next_id += 1
        wanted = self._next_id
        self.ws.send(json.dumps({"id": wanted, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError("%s failed: %s" % (method, message["error"]))
                return message.get("result", {})
            if "method" in message:
                self.events.append((message["method"], message.get("params", {})))
        raise TimeoutError("no answer to %s" % method)

    def wait_event(self, method, timeout=None, after=0):
        """Return the params of the first event named method past index after."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            for name, params in self.events[after:]:
                if name == method:
                    return params
            after = len(self.events)
            self.ws.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                message = json.loads(self.ws.recv())
            except socket.timeout:
                break
            finally:
                self.ws.sock.settimeout(self.timeout)
            if "method" in message:
                self.events.append((message["method"], message.get("params", {})))
        raise TimeoutError("no %s event within %ss" % (method, timeout or self.timeout))

    def navigate(self, url):
        """Load url and wait for its load event."""
        mark = len(self.events)
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired", after=mark)

    def evaluate(self, expression):
        """Return the JSON value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError("script failed: %s" % result["exceptionDetails"])
        return result["result"].get("value")

    def click(self, selector):
        """Click the middle of the element matching selector, like a mouse would."""
        box = self.evaluate(
            "(function () { var e = document.querySelector(%s);"
            " if (!e) { return null; } e.scrollIntoView({block: 'center'});"
            " var r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
            % json.dumps(selector))
        if box is None:
            raise LookupError("nothing matches %s" % selector)
        x, y = box
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y,
                      button="left", clickCount=1)

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def close(self):
        if self.ws is not None:
            self.ws.close()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)
