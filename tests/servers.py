"""TLS servers on 127.0.0.1 that demand a client certificate from the CA of a
:class:`tests.pki.PKI`.

:class:`MTLSServer` is Python's ``ssl`` in a background thread and answers with
the verified client's CN; :class:`NginxServer` runs a real ``nginx``. Both are
context managers and expose ``url`` once started.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, final

from cryptography import x509
from cryptography.x509.oid import NameOID

from .pki import PKI

HOST = "127.0.0.1"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._answer(None)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            posted = json.loads(body) if body else None
        except ValueError:
            self._reply(400, {"error": "body is not JSON"})
            return
        self._answer(posted)

    def _answer(self, posted: object) -> None:
        assert isinstance(self.connection, ssl.SSLSocket)
        der = self.connection.getpeercert(binary_form=True)
        cn = None  # never the case with CERT_REQUIRED; None would show a bug
        if der is not None:
            subject = x509.load_der_x509_certificate(der).subject
            cn = subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self._reply(
            200,
            {
                "client_cn": cn,
                "method": self.command,
                "path": self.path,
                "json": posted,
            },
        )

    def _reply(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


class _TLSHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        super().__init__((HOST, 0), _Handler)  # binds and listens now

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs here, in the connection's own thread, so a slow
        # or failing client never blocks the accept loop.
        request.settimeout(10)
        with self.context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # refused handshakes are the point of this server


@final
class MTLSServer:
    """HTTPS on 127.0.0.1 (free port) requiring a client cert from the CA.

    GET and POST answer JSON ``{"client_cn", "method", "path", "json"}`` where
    ``json`` echoes the posted JSON body.
    """

    def __init__(self, pki: PKI) -> None:
        context = ssl.create_default_context(
            ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_cert)
        )  # with cafile, the CA is the only trust anchor
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(pki.server_cert, pki.server_key)
        self._context = context
        self._server: _TLSHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}/"

    def start(self) -> None:
        # The socket listens once the server object exists: connections queue
        # in the backlog until the thread accepts them, so no wait is needed.
        self._server = _TLSHTTPServer(self._context)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # how fast shutdown() returns
            name="MTLSServer",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._server.server_close()
        self._server = self._thread = None

    def __enter__(self) -> MTLSServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def find_nginx(name: str = "nginx") -> str:
    """Return the path of ``name``, also searching the sbin directories."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=path)
    if found is None:
        raise FileNotFoundError(
            f"{name!r} not found on PATH or in /usr/sbin: install nginx "
            "(Debian: apt-get install nginx-light or nginx)"
        )
    return found


_NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}pid "{d}/nginx.pid";
error_log "{d}/error.log" info;
events {{ worker_connections 64; }}
http {{
    access_log "{d}/access.log";
    client_body_temp_path "{d}/client_body";
    proxy_temp_path "{d}/proxy";
    fastcgi_temp_path "{d}/fastcgi";
    uwsgi_temp_path "{d}/uwsgi";
    scgi_temp_path "{d}/scgi";
    server {{
        listen {host}:{port} ssl;
        server_name localhost;
        ssl_certificate "{server_cert}";
        ssl_certificate_key "{server_key}";
        ssl_client_certificate "{ca_cert}";
        ssl_verify_client on;
{fresh}        default_type application/json;
        location / {{
            return 200 '{{"client": "$ssl_client_s_dn"}}\\n';
        }}
    }}
}}
"""

_FRESH = """\
        ssl_session_cache off;
        ssl_session_tickets off;
        keepalive_timeout 0;
"""


@final
class NginxServer:
    """A real nginx on 127.0.0.1 (free port) requiring a client cert.

    Every request with a valid client certificate gets ``200`` and
    ``{"client": "<subject DN, e.g. CN=alice>"}``, whatever the method; nginx
    answers a request without one with ``400``. Config, pid, logs and temp
    files live in a temporary directory removed by :meth:`stop`.
    ``fresh_handshakes``: no session cache, no tickets, no keep-alive, so
    every request is a full handshake whatever the client offers.
    """

    def __init__(
        self,
        pki: PKI,
        *,
        nginx: str = "nginx",
        startup_timeout: float = 10.0,
        fresh_handshakes: bool = False,
    ) -> None:
        self._nginx = find_nginx(nginx)
        self._fresh = fresh_handshakes
        self._pki = pki
        self._timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}/"

    @property
    def error_log(self) -> Path:
        assert self._dir is not None, "not started"
        return Path(self._dir.name) / "error.log"

    def start(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="keychain_ext-nginx-")
        d = self._dir.name
        with socket.socket() as s:  # nginx cannot bind port 0: pick a free one
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        user = ""
        if os.geteuid() == 0:  # else workers would drop to "nobody"
            name = pwd.getpwuid(os.geteuid()).pw_name
            group = grp.getgrgid(os.getegid()).gr_name
            user = f"user {name} {group};\n"
        conf = Path(d) / "nginx.conf"
        conf.write_text(
            _NGINX_CONF.format(
                d=d,
                user=user,
                host=HOST,
                port=self.port,
                server_cert=self._pki.server_cert.resolve(),
                server_key=self._pki.server_key.resolve(),
                ca_cert=self._pki.ca_cert.resolve(),
                fresh=_FRESH if self._fresh else "",
            )
        )
        self._proc = subprocess.Popen(
            [self._nginx, "-p", d, "-c", str(conf), "-e", f"{d}/error.log"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nginx not listening on port {self.port} after "
                    f"{self._timeout} s:\n{self._log_text()}"
                )
            try:  # wait a little, returning at once if nginx died
                code = self._proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"nginx exited with status {code}:\n{self._log_text()}")

    def _log_text(self) -> str:
        log = self.error_log
        return log.read_text(errors="replace") if log.exists() else ""

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGQUIT)  # graceful shutdown
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> NginxServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
