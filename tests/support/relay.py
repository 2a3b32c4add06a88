"""A TCP relay in front of the test PostgreSQL server that a test can cut and restore.

Cut, every open connection through it is reset and new ones are closed as soon as they are
accepted: the database lost, as a gateway sees it when the network or the server goes away,
without stopping the server other tests share. Restored, connections pass again on the same
port, so a client reconnecting with the same DSN finds the database back.

    relay = PgRelay(pg_fresh_dsn)      # relay.dsn: the same database, through the relay
    relay.cut(); ...; relay.restore(); ...; relay.close()
"""

from __future__ import annotations

import contextlib
import socket
import threading

from psycopg import conninfo


class PgRelay:
    """See the module docstring."""

    def __init__(self, dsn: str) -> None:
        params = conninfo.conninfo_to_dict(dsn)
        self.upstream = (str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        #: ``dsn`` with its host and port replaced by the relay's.
        self.dsn = conninfo.make_conninfo(dsn, host="127.0.0.1", port=str(self.port))
        self._up = threading.Event()
        self._up.set()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._up.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """The database unreachable: open connections reset, new ones closed at once."""
        self._up.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        """The database reachable again, on the same port."""
        self._up.set()

    def close(self) -> None:
        self.cut()
        with contextlib.suppress(OSError):  # wakes the accepting thread
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
