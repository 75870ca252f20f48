"""A TCP proxy on 127.0.0.1 that tests put between a client and a real server (moto's S3), to
take the server away and bring it back intact: moto keeps its objects in memory, so stopping
it would lose them, which would look like data loss the code under test did not cause.

Modes: "pass" forwards; "down" resets every open connection and every new one; "stall" accepts
and never answers. `cut_when(marker)` goes down by itself as soon as a client sends bytes that
contain `marker` (for example the key of an object being uploaded), after forwarding them.
"""

import select
import socket
import struct
import threading
import time


def close_listener(sock: socket.socket) -> None:
    """Closes a listening socket so that a thread blocked in its accept() returns: on Linux
    close() alone does not wake it, shutdown() does."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.mode = "pass"
        self.marker: bytes | None = None
        self.cut_at: float | None = None  # time.monotonic() of the automatic cut
        self.bytes_up = 0
        # (time.monotonic(), request line) of every HTTP request that passed from client to server
        self.requests = []
        self._pairs: list = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_mode(self, mode: str) -> None:
        assert mode in ("pass", "down", "stall")
        self.mode = mode
        if mode != "pass":
            self._reset_all()

    def cut_when(self, marker: bytes) -> None:
        self.marker = marker

    def close(self) -> None:
        self._closed = True
        close_listener(self.listener)
        self._reset_all()

    @staticmethod
    def _reset(sock) -> None:
        try:  # SO_LINGER 0: close sends a reset, as a crashed server or a dropped link would
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        except OSError:
            pass

    def _reset_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, server in pairs:
            self._reset(client)
            if server is not None:
                self._reset(server)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "down":
                self._reset(client)
                continue
            if self.mode == "stall":
                with self._lock:
                    self._pairs.append((client, None))
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._reset(client)
                continue
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client, server) -> None:
        socks = [client, server]
        try:
            while self.mode == "pass":
                ready, _, _ = select.select(socks, [], [], 0.5)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    other = server if s is client else client
                    other.sendall(data)
                    if s is client:
                        self.bytes_up += len(data)
                        if data[:7].split(b" ", 1)[0] in (
                            b"GET",
                            b"PUT",
                            b"POST",
                            b"HEAD",
                            b"DELETE",
                        ):
                            self.requests.append((time.monotonic(), data.split(b"\r\n", 1)[0]))
                        if self.marker is not None and self.marker in data:
                            self.marker = None
                            self.cut_at = time.monotonic()
                            threading.Thread(
                                target=self.set_mode, args=("down",), daemon=True
                            ).start()
                            return
        except OSError:
            return
        finally:
            self._reset(client)
            self._reset(server)
