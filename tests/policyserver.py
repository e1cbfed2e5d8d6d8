"""An MTA-STS policy host for tests: HTTPS on 127.0.0.1 with a certificate from a test CA."""

from __future__ import annotations

import http.server
import ssl
import threading

POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx.example.test\r\nmax_age: 86400\r\n"


class PolicyServer:
    """An HTTPS server on 127.0.0.1 answering every GET with what `reply` says."""

    def __init__(self, ca, name="mta-sts.example.test"):
        self.reply = (200, "text/plain; charset=utf-8", POLICY, {})
        self.paths: list[str] = []
        self.posts: list[tuple[str, str, bytes]] = []  # (path, Content-Type, body) of each POST
        self.post_status = 200
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.paths.append(self.path)
                status, media_type, body, headers = outer.reply
                self.send_response(status)
                if media_type:
                    self.send_header("Content-Type", media_type)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.posts.append((self.path, self.headers.get("Content-Type") or "", body))
                self.send_response(outer.post_status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(context)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
