"""The download's only way out: a forward HTTP(S) proxy in the data stage's process, with an address policy, a
total deadline and a size cap for every request.

img2dataset fetches with urllib in worker processes it spawns, and follows redirects itself. urllib sends every
request, each redirect hop included, to the proxy that `http_proxy`/`https_proxy` name, and spawned workers inherit
the environment; so one place sees every connection the download makes, and img2dataset stays as released.

The proxy resolves a host once, refuses it unless every address it resolves to is global (not private, loopback,
link-local, shared, reserved or multicast, also when embedded in IPv6) or listed in `data.allow`, and connects to
the address it checked, so a second DNS answer cannot slip past the check.
- Plain HTTP: the proxy makes the request itself and answers with the whole response, or with an error status whose
  reason says what happened: 403 refused by the policy, 504 past the deadline, 502 too large or unreachable.
  img2dataset records that reason as the URL's error.
- HTTPS arrives as CONNECT: the host is checked (a refusal is a 403 the same way), then bytes are relayed
  (TLS stays end to end). At the deadline, after `data.timeout` of silence, or past the size cap the tunnel is
  cut; the download then fails as a short read, and the cut is counted.

A proxied request costs about 1-1.5 ms of CPU (bench/egress.py), so one Python process would cap a download near
1,000 requests/s; the proxy runs in as many processes as img2dataset (`data.processes`), on one listening socket.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import multiprocessing
import os
import re
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

log = logging.getLogger(__name__)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te",
              "trailer", "transfer-encoding", "upgrade"}
NAT64 = ipaddress.ip_network("64:ff9b::/96")
ENTRY = re.compile(r"\[(?P<v6>[^\]]+)\](?::(?P<port6>\d+))?|(?P<v4>[^:\[\]]+)(?::(?P<port4>\d+))?|(?P<bare>[^\[\]]+)")


class Refused(Exception):
    """A host the policy does not let the download reach."""


@dataclass(frozen=True)
class AddressPolicy:
    """Global addresses are reachable; any other only if an `allow` entry (network, optional port) covers it."""

    allow: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None], ...] = ()

    @classmethod
    def parse(cls, entries: list[str]) -> AddressPolicy:
        """Entries as in `data.allow`: `10.0.0.0/8`, `127.0.0.1:8765`, `[::1]:8080`, `fd00::/8`."""
        allow = []
        for entry in entries:
            match = ENTRY.fullmatch(entry.strip())
            try:
                network = ipaddress.ip_network(match["v6"] or match["v4"] or match["bare"], strict=False)
            except (TypeError, ValueError) as err:
                raise ValueError(f"data.allow: {entry!r} is not an address or network with an optional port "
                                 "(10.0.0.0/8, 127.0.0.1:8765, [::1]:8080)") from err
            port = match["port6"] or match["port4"]
            allow.append((network, int(port) if port else None))
        return cls(tuple(allow))

    def refusal(self, address: str, port: int) -> str | None:
        """What kind of address `address` is if `address`:`port` may not be reached (e.g. 'loopback'), or None."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip in network and allowed in (None, port) for network, allowed in self.allow):
            return None
        for candidate in (ip, *embedded_ipv4(ip)):
            if candidate.is_multicast or not candidate.is_global:
                return address_kind(candidate)
        return None


def embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo, NAT64), which is where it may lead."""
    if ip.version == 4:
        return []
    found = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if ip in NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [a for a in found if a is not None]


def address_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    for kind in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return "non-global"


def _reason(text: str) -> str:
    """A status line reason phrase: one line of printable ASCII."""
    return re.sub(r"[^\x20-\x7e]", "?", text)[:300]


class _Handler(BaseHTTPRequestHandler):
    server: ProxyServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("egress proxy: " + format, *args)

    def fail(self, code: int, counter: str, message: str) -> None:
        self.server.count(counter)
        log.debug("egress proxy: %s %s -> %d %s", self.command, self.path, code, message)
        self.send_error(code, _reason(message))

    def resolve(self, host: str, port: int) -> str | None:
        """The checked address to connect to, or None once the client has been answered."""
        try:
            return self.server.resolve(host, port)
        except Refused as err:
            self.fail(403, "refused", f"refused: {err}")
        except OSError as err:
            self.fail(502, "unreachable", f"cannot resolve {host}: {err.strerror or err}")
        return None

    def do_CONNECT(self) -> None:  # noqa: N802 - the method name http.server dispatches to
        host, _, port = self.path.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        self.server.count("https")
        if not host or not port.isdigit():
            return self.fail(400, "unreachable", f"CONNECT needs host:port, not {self.path!r}")
        deadline = time.monotonic() + self.server.deadline
        address = self.resolve(host, int(port))
        if address is None:
            return None
        try:
            upstream = socket.create_connection((address, int(port)), timeout=self.server.timeout)
        except OSError as err:
            return self.fail(502, "unreachable", f"cannot connect to {self.path}: {err.strerror or err}")
        with upstream:
            self.connection.settimeout(self.server.timeout)
            self.send_response_only(200, "Connection established")
            self.end_headers()
            cut = relay(self.connection, upstream, deadline, self.server.timeout, self.server.max_bytes)
        if cut:
            self.server.count(cut)
            log.debug("egress proxy: tunnel to %s cut: %s", self.path, cut)
        self.close_connection = True
        return None

    def do_GET(self) -> None:  # noqa: N802
        self.forward()

    def do_HEAD(self) -> None:  # noqa: N802
        self.forward()

    def forward(self) -> None:
        """Make a plain HTTP request for the client and answer with the complete response or an error status."""
        self.server.count("http")
        url = urlsplit(self.path)
        if url.scheme != "http" or not url.hostname:
            return self.fail(403, "refused", f"refused: {url.scheme or 'relative'} URL; only http and https are "
                                             "fetched")
        deadline = time.monotonic() + self.server.deadline
        try:
            port = url.port or 80
        except ValueError:
            return self.fail(400, "unreachable", f"bad port in {self.path!r}")
        address = self.resolve(url.hostname, port)
        if address is None:
            return None
        upstream = http.client.HTTPConnection(address, port, timeout=self.server.timeout)
        expired, connected = threading.Event(), []

        def expire() -> None:  # a read blocked on the connection returns at once
            expired.set()
            for sock in connected:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
        timer.start()
        try:
            upstream.connect()
            connected.append(upstream.sock)  # http.client lets go of it once a response says it will close
            if expired.is_set():
                raise TimeoutError
            response, body = self.fetch(upstream, url)
            if expired.is_set():  # the cut may read as the end of a body without a length
                raise TimeoutError
        except ResponseTooLarge as err:
            return self.fail(502, "too_large", f"response from {url.netloc} {err} data.max_bytes = "
                                               f"{self.server.max_bytes}")
        except (OSError, http.client.HTTPException) as err:
            if expired.is_set():
                return self.fail(504, "deadline", f"no complete response from {url.netloc} within data.deadline "
                                                  f"= {self.server.deadline:g} s")
            detail = err.strerror if isinstance(err, OSError) and err.strerror else repr(err)
            return self.fail(502, "unreachable", f"{url.netloc}: {detail}")
        finally:
            timer.cancel()
            upstream.close()
        self.send_response_only(response.status, _reason(response.reason))
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP | {"content-length"}:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True
        return None

    def fetch(self, upstream: http.client.HTTPConnection, url) -> tuple[http.client.HTTPResponse, bytes]:
        """The upstream response and its whole body; raises if the body ends early or passes the size cap."""
        upstream.putrequest(self.command, (url.path or "/") + (f"?{url.query}" if url.query else ""),
                            skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in HOP_BY_HOP:
                upstream.putheader(name, value)
        if "Host" not in self.headers:
            upstream.putheader("Host", url.netloc)
        upstream.putheader("Connection", "close")
        upstream.endheaders()
        response = upstream.getresponse()
        limit = self.server.max_bytes
        if response.length is not None and response.length > limit:
            raise ResponseTooLarge(f"announces {response.length} bytes, over")
        chunks, size = [], 0
        while chunk := response.read1(1 << 16):
            size += len(chunk)
            if size > limit:
                raise ResponseTooLarge("passed")
            chunks.append(chunk)
        if response.length:  # the server closed before sending what it announced
            raise http.client.IncompleteRead(b"".join(chunks), response.length)
        return response, b"".join(chunks)


class ResponseTooLarge(Exception):
    pass


def relay(client: socket.socket, upstream: socket.socket, deadline: float, idle: float, max_bytes: int) -> str | None:
    """Copy bytes both ways until one side closes; return why the tunnel was cut instead, if it was."""
    peers = {client: upstream, upstream: client}
    received = 0
    with selectors.DefaultSelector() as selector:
        for sock in peers:
            selector.register(sock, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "deadline"
            events = selector.select(min(remaining, idle))
            if not events:
                return "deadline" if time.monotonic() >= deadline else "idle"
            for key, _ in events:
                try:
                    data = key.fileobj.recv(1 << 16)
                    if not data:
                        return None
                    peers[key.fileobj].sendall(data)
                except OSError:
                    return None
                if key.fileobj is upstream:
                    received += len(data)
                    if received > max_bytes:
                        return "too_large"


COUNTS = ("http", "https", "refused", "unreachable", "deadline", "idle", "too_large")


@dataclass(frozen=True)
class Limits:
    deadline: float  # seconds a request may take in all
    timeout: float  # seconds a connection may stay silent
    max_bytes: int  # largest response


class ProxyServer(socketserver.ThreadingTCPServer):
    """One proxy process: accepts on the shared listening socket, one thread per connection, and tallies what it
    did in `shared` (counts of all processes, in COUNTS order)."""

    daemon_threads = True

    def __init__(self, listener: socket.socket, policy: AddressPolicy, limits: Limits, shared) -> None:
        super().__init__(listener.getsockname(), _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.policy, self.shared = policy, shared
        self.deadline, self.timeout, self.max_bytes = limits.deadline, limits.timeout, limits.max_bytes

    def count(self, what: str) -> None:
        with self.shared.get_lock():
            self.shared[COUNTS.index(what)] += 1

    def resolve(self, host: str, port: int) -> str:
        """The first address `host` resolves to, if the policy lets the download reach every one of them."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        for address in addresses:
            if kind := self.policy.refusal(address, port):
                where = f"{address} is" if address == host else f"{host} resolves to {address}, which is"
                raise Refused(f"{where} {kind}, not a public address (data.allow lists exceptions)")
        return addresses[0]


def _serve(listener: socket.socket, policy: AddressPolicy, limits: Limits, shared) -> None:
    ProxyServer(listener, policy, limits, shared).serve_forever()


@dataclass
class EgressProxy:
    """A running proxy: where it listens, and what its processes did so far."""

    address: tuple[str, int]
    shared: object

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    @property
    def counts(self) -> dict[str, int]:
        return dict(zip(COUNTS, self.shared[:], strict=True))


@contextlib.contextmanager
def egress_proxy(policy: AddressPolicy, limits: Limits, processes: int = 1) -> Iterator[EgressProxy]:
    """Run the proxy on 127.0.0.1 (an ephemeral port) for the duration of the block, in `processes` processes
    sharing one listening socket (the kernel spreads the connections), so it is not held to one core's worth of
    Python under one GIL. A process that died during the block is an error: its connections were lost."""
    context = multiprocessing.get_context("spawn")
    shared = context.Array("q", len(COUNTS))
    with socket.create_server(("127.0.0.1", 0), backlog=1024) as listener:  # processes x threads connect at once
        workers = [context.Process(target=_serve, args=(listener, policy, limits, shared), daemon=True,
                                   name=f"egress-proxy-{i}") for i in range(processes)]
        for worker in workers:
            worker.start()
        try:
            yield EgressProxy(listener.getsockname(), shared)
        finally:
            dead = [worker.exitcode for worker in workers if not worker.is_alive()]
            for worker in workers:
                worker.terminate()
                worker.join()
        if dead:
            raise RuntimeError(f"{len(dead)} of {processes} egress proxy processes died (exit codes {dead}); "
                               "the downloads they held failed")


@contextlib.contextmanager
def routed_through(proxy_url: str) -> Iterator[None]:
    """Send every urllib request of this process and of the processes it starts (http, https, and ftp, which a
    redirect may lead to) through `proxy_url`, with no host exempt (`no_proxy` is cleared)."""
    saved = {name: value for name, value in os.environ.items() if name.lower().endswith("_proxy")}
    for name in saved:
        del os.environ[name]
    os.environ.update(http_proxy=proxy_url, https_proxy=proxy_url, ftp_proxy=proxy_url)
    try:
        yield
    finally:
        for name in ("http_proxy", "https_proxy", "ftp_proxy"):
            os.environ.pop(name, None)
        os.environ.update(saved)
