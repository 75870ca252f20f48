"""A TCP proxy on 127.0.0.1 in front of the moto S3 server that counts the bytes the server sends.

s3fs talks to it exactly as to the server (AWS_ENDPOINT_URL points at the proxy), so what it
counts is what a node really downloaded, whichever process (a test, a subprocess, a Ray worker)
made the request. `seconds_per_block` slows the server's answers down, so that a download takes
long enough for a second process to start while it runs."""

import socket
import threading
import time

from tests.tcp_proxy import close_listener

BLOCK = 64 * 1024


class CountingProxy:
    def __init__(self, target_port: int, seconds_per_block: float = 0.0):
        self.target_port = target_port
        self.seconds_per_block = seconds_per_block
        self._lock = threading.Lock()
        self._bytes_down = 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def bytes_down(self) -> int:
        """Bytes the server sent to clients so far."""
        with self._lock:
            return self._bytes_down

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src, dst, downstream: bool):
        try:
            while data := src.recv(BLOCK):
                if downstream:
                    with self._lock:
                        self._bytes_down += len(data)
                    if self.seconds_per_block:
                        time.sleep(self.seconds_per_block)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self._closed = True
        close_listener(self._listener)
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass
