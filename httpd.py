"""
The HTTP/1.1 plumbing under serve.py, on the standard library: a thread per connection up to a limit, a watchdog for
slow and idle clients, bounded bodies, the Host/Origin/key checks a hostile web page meets, error objects in the
OpenAI or Anthropic shape, SSE streams, and noticing a client that has left. serve.py's Handler adds the routes.
"""
import hmac
import ipaddress
import json
import math
import queue
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from api import ApiError

CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), *range(127, 160)]}  # escaped in the log: no terminal tricks

class ClientGone(Exception):
    pass


def dumps(obj):
    return json.dumps(obj, allow_nan=False).encode()  # NaN/Infinity are not JSON: fail here, not in a client


def host_name(host):
    """A Host header or address -> its name: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    host = host.strip().lower()
    return (host[1:host.find("]")] if host.startswith("[") else host.partition(":")[0]).rstrip(".")


def is_loopback(name):
    if name == "localhost" or name.endswith(".localhost"):  # browsers resolve these to loopback themselves
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False



class Connection(BaseHTTPRequestHandler):
    """HTTP/1.1 on one connection: its deadlines, the body, the Host/Origin/key checks, replies and error objects
    in either API's shape, and noticing a client that has left."""
    protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections
    server_version = "astrai-serve"
    disable_nagle_algorithm = True  # else headers then body (or SSE events) wait on the client's delayed ACK: 40 ms
    cors, anthropic = None, False  # the Origin allowed by --allowed_origins; the API whose error shape to use

    def deadline(self, seconds):
        """The server's watchdog ends this connection's reading in `seconds` (inf: never)."""
        self.server.deadlines[self.connection] = time.monotonic() + seconds

    def handle_one_request(self):
        self.deadline(self.server.idle_timeout)  # waiting for a request (keep-alive)
        super().handle_one_request()

    def parse_request(self):
        self.deadline(self.server.timeout)  # the request line has come: its headers and body get `timeout` seconds
        return super().parse_request()

    # --- reading and checking --------------------------------------------------------------------------------

    def read_body(self):
        """The body by its Content-Length, whatever the method: a GET's body left unread would be read as the next
        request (request smuggling behind a proxy)."""
        lengths = self.headers.get_all("Content-Length") or ["0"]
        chunked = self.headers.get("Transfer-Encoding") is not None
        if chunked or len(lengths) > 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
            self.close_connection = True
            raise ApiError(411 if chunked else 400, "send the body with one Content-Length header of digits "
                           f"(got {', '.join(lengths)!r}; chunked bodies are not supported)")
        length, limit = int(lengths[0]), self.server.max_body_bytes
        if length > limit:
            self.close_connection = length > 4 * limit
            if not self.close_connection:  # read and drop it, so that the client sees the 413 rather than a reset
                self.rfile.read(length)
            raise ApiError(413, f"the request body is {length} bytes; the limit is {limit} bytes",
                           code="body_too_large")
        try:
            body = self.rfile.read(length)
        except OSError:  # the socket's timeout
            body = b""
        if len(body) < length:
            self.close_connection = True
            raise ApiError(408, f"the body ended after {len(body)} of its {length} bytes, or took longer than "
                                f"{self.server.timeout:g} s", code="timeout")
        return body

    def check_origin(self):
        """Refuse what a hostile web page could send: a Host that is not ours (a DNS-rebinding page names its own),
        a foreign Origin (a cross-site request)."""
        server, host, origin = self.server, self.headers.get("Host", ""), self.headers.get("Origin")
        name = host_name(host)
        if server.loopback and not (is_loopback(name) or name in server.allowed_hosts or "*" in server.allowed_hosts):
            raise ApiError(403, f"Host {host!r} is not allowed: bound to loopback, this server answers localhost, "
                                "127.0.0.1 and ::1; name others with --allowed_hosts", code="host_not_allowed")
        if origin is not None and urlsplit(origin).netloc.lower() != host.strip().lower():
            if origin not in server.allowed_origins and "*" not in server.allowed_origins:
                raise ApiError(403, f"Origin {origin!r} is not allowed: only pages served from here may call, or "
                                    "those named with --allowed_origins", code="origin_not_allowed")
            self.cors = origin

    def check_key(self):
        key = self.server.api_key
        scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else self.headers.get("x-api-key", "")
        if key and not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, ("no API key given" if not given else "wrong API key") + ": send the header "
                           "'Authorization: Bearer KEY' or 'x-api-key: KEY' with the server's --api_key",
                           code="invalid_api_key")

    # --- writing -----------------------------------------------------------------------------------------------

    def end_headers(self):
        if self.cors:
            self.send_header("Access-Control-Allow-Origin", self.cors)
            self.send_header("Vary", "Origin")
        if self.close_connection:
            self.send_header("Connection", "close")
        super().end_headers()

    def send_bytes(self, status, data, content_type, headers=None):
        self.send_response(status, "Overloaded" if status == 529 else None)
        for k, v in {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.write(data)

    def write(self, data):
        try:
            self.wfile.write(data)
        except OSError:  # a reset, or a client that stopped reading for `timeout` seconds
            raise ClientGone from None

    def send_json(self, status, obj, headers=None):
        self.send_bytes(status, dumps(obj), "application/json", headers)

    def send_error_object(self, e):
        """An ApiError in the shape of the API asked (Anthropic's overloaded status is 529)."""
        headers = {503: {"Retry-After": "1"}, 401: {"WWW-Authenticate": "Bearer"}}.get(e.status, {})
        try:
            self.send_json(529 if self.anthropic and e.status == 503 else e.status, e.body(self.anthropic),
                           {**headers, **e.headers})
        except ClientGone:
            pass

    def send_error(self, code, message=None, explain=None):
        """The standard library's own errors (a malformed request line, headers too long, ...): an error object."""
        self.close_connection = True
        self.server.count(code)
        self.send_error_object(ApiError(code, message or self.responses.get(code, ("error",))[0]))

    def start_stream(self):
        self.streaming, self.close_connection = True, True  # the stream ends when the connection does
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def log_request(self, code="-", size="-"):
        pass  # dispatch logs one line per request, with its token counts

    def log_message(self, format, *args):  # dispatch's lines, and the standard library's (malformed requests)
        if self.server.log_requests:
            print(f"{self.client_address[0]} {format % args}".translate(CONTROL), file=sys.stderr, flush=True)

    # --- while the engine generates ----------------------------------------------------------------------------

    def client_gone(self):
        """Whether the client has left. A reset says so. The end of its input alone does not: a client may
        half-close (shutdown(SHUT_WR)) and still read. So when that is first seen, a probe goes out that a closed
        socket answers with a reset: an interim "100 Continue" (clients skip 1xx responses), or an SSE comment."""
        sock = self.connection
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return True
            if not self.probed and (self.streaming or self.request_version == "HTTP/1.1") and \
                    select.select([sock], [], [], 0)[0] and sock.recv(1, socket.MSG_PEEK) == b"":
                self.probed = True
                sock.sendall(b": ping\n\n" if self.streaming else b"HTTP/1.1 100 Continue\r\n\r\n")
            return False
        except OSError:
            return True

    def events(self, events, count):
        """Yield engine events until `count` sequences have finished; every 0.2 s, whatever the flow of tokens,
        ClientGone if the client has left."""
        check = time.monotonic() + 0.2
        while count:
            try:
                event = events.get(timeout=max(0.0, check - time.monotonic()))
            except queue.Empty:
                event = None
            if time.monotonic() >= check:
                if self.client_gone():
                    raise ClientGone
                check = time.monotonic() + 0.2
            if event is not None:
                count -= event[3] is not None
                yield event



class Server(ThreadingHTTPServer):
    """A thread per connection up to max_connections (a 503 beyond, without a thread); a watchdog that ends the
    reading of connections past their deadline; the request counts /metrics reports."""
    request_queue_size = 128  # the listen backlog: many clients connecting at once must not be refused
    daemon_threads = True

    def process_request(self, request, client_address):
        if len(self.deadlines) < self.max_connections:
            request.settimeout(self.timeout)  # each read and write: a client that stops reading is cut off
            self.deadlines[request] = time.monotonic() + self.idle_timeout
            return super().process_request(request, client_address)
        body = dumps(ApiError(503, f"too many connections (the limit is {self.max_connections}); retry shortly",
                              code="overloaded", kind="server_error").body())
        try:
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1"
                            b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            request.setblocking(False)
            request.recv(1 << 16)  # what has come of the request: closing on unread bytes would reset the 503
        except OSError:
            pass
        self.count(503)
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.deadlines.pop(request, None)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # a reset or a timeout is the client's business, not a bug
            super().handle_error(request, client_address)

    def service_actions(self):  # serve_forever calls this about twice a second: the watchdog
        self.expire(lambda deadline: deadline < time.monotonic())

    def expire(self, due):
        """End the reading of connections whose deadline is due: the thread moves on; a reply can still go out."""
        for sock, deadline in list(self.deadlines.items()):
            if due(deadline):
                self.deadlines[sock] = -math.inf
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    def count(self, status):
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1


def make_server(handler, host="127.0.0.1", port=8000, api_key="", max_body_bytes=1 << 20, log_requests=True,
                max_connections=128, timeout=30.0, idle_timeout=15.0, allowed_hosts=(), allowed_origins=()):
    """A Server for a Connection subclass (not yet serving); port 0 picks a free port."""
    server = Server((host, port), handler)
    server.api_key, server.max_body_bytes, server.log_requests = api_key, max_body_bytes, log_requests
    server.max_connections, server.timeout, server.idle_timeout = max_connections, timeout, idle_timeout
    server.loopback = is_loopback(host_name(host))
    server.allowed_hosts, server.allowed_origins = {host_name(h) for h in allowed_hosts}, set(allowed_origins)
    server.deadlines, server.statuses, server.lock, server.closing = {}, {}, threading.Lock(), False  # socket: when
    return server
