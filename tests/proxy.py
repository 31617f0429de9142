"""A TCP proxy on loopback for fault tests: cut every connection, refuse new ones, hold replies, or retarget."""

import contextlib
import socket
import threading
from collections.abc import Iterator


class TcpProxy:
    """Forwards connections on 127.0.0.1:`port` to `target` ("host:port"), one thread per direction."""

    def __init__(self, target: str):
        self.target = target
        self.cuts = 0
        self.refused = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._accepting = True
        self._closed = False
        self._replies = threading.Event()  # set: what the target sends is forwarded
        self._replies.set()
        threading.Thread(target=self._accept_forever, name="proxy-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Drops every open connection at once, as a network failure would."""
        with self._lock:
            sockets, self._open = list(self._open), set()
            self.cuts += 1
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def refuse(self) -> None:
        """Cuts every connection and closes new ones at once, as while a server restarts."""
        self._accepting = False
        self.cut()

    def hold_replies(self) -> None:
        """Stops forwarding what the target sends (requests still reach it) until `release_replies`."""
        self._replies.clear()

    def release_replies(self) -> None:
        self._replies.set()

    def accept(self, target: str | None = None) -> None:
        """Forwards new connections again, to `target` when given."""
        self.target = target or self.target
        self._accepting = True

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._replies.set()
        self.cut()

    def _accept_forever(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._accepting:
                self.refused += 1
                client.close()
                continue
            host, port = self.target.rsplit(":", 1)
            try:
                upstream = socket.create_connection((host, int(port)))
            except OSError:
                self.refused += 1
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for source, sink, gate in ((client, upstream, None), (upstream, client, self._replies)):
                threading.Thread(target=_pump, args=(source, sink, gate), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket, gate: threading.Event | None) -> None:
    try:
        while data := source.recv(65536):
            if gate:
                gate.wait()
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        source.close()  # the other direction's thread closes `sink`


@contextlib.contextmanager
def tcp_proxy(target: str) -> Iterator[TcpProxy]:
    proxy = TcpProxy(target)
    try:
        yield proxy
    finally:
        proxy.close()
