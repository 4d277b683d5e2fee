"""A fake Kaggle API on loopback that serves dataset downloads for the fetch tests.

The kaggle client (kaggle 2.2.5, kagglesdk 0.1.38) downloads a dataset in two requests:

1. ``POST <endpoint>/api/v1/datasets.DatasetApiService/DownloadDataset`` with the JSON body
   ``{"ownerSlug": ..., "datasetSlug": ...}`` and HTTP basic auth (username, key). The
   response is a redirect to the archive. Errors are JSON ``{"code": ..., "message": ...}``.
2. ``GET`` of the redirect target, which returns the zip bytes.

With ``KAGGLE_API_TOKEN`` the client first checks the token with
``POST <endpoint>/api/v1/security.OAuthService/IntrospectToken`` (body ``{"token": ...}``,
response ``{"active": ..., "username": ...}``) and then sends it as a bearer token.

The fake serves all three. Its behavior for each DownloadDataset request comes from ``plan``.
"""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

DOWNLOAD_PATH = "/api/v1/datasets.DatasetApiService/DownloadDataset"
INTROSPECT_PATH = "/api/v1/security.OAuthService/IntrospectToken"

# Behaviors of one DownloadDataset request:
#   ok        redirect to the archive
#   drop      close the connection without a response
#   stall     send nothing until the server stops (the client must time out)
#   truncate  redirect to a response that sends half of the archive, then closes
#   corrupt   redirect to bytes that are not a zip archive
#   500, 403  respond with that HTTP status
BEHAVIORS = ("ok", "drop", "stall", "truncate", "corrupt", "500", "403")


class FakeKaggleServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, datasets: dict[str, bytes], username: str, key: str, token: str):
        super().__init__(("127.0.0.1", 0), FakeKaggleHandler)
        self.datasets = datasets
        self.username = username
        self.key = key
        self.token = token
        self.plan: list[str] = ["ok"]
        self.download_requests: list[dict] = []
        self.released = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def next_behavior(self) -> str:
        """Return the next planned behavior. The last one repeats."""
        if len(self.plan) > 1:
            return self.plan.pop(0)
        return self.plan[0]


class FakeKaggleHandler(BaseHTTPRequestHandler):
    server: FakeKaggleServer

    def log_message(self, format, *args):
        pass

    def send_json(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def has_valid_auth(self) -> bool:
        basic = base64.b64encode(f"{self.server.username}:{self.server.key}".encode()).decode()
        return self.headers.get("Authorization") in (f"Basic {basic}", f"Bearer {self.server.token}")

    def do_POST(self):
        # Through the proxy seam the request line carries an absolute URL.
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if path == INTROSPECT_PATH:
            if body.get("token") == self.server.token:
                self.send_json(200, {"active": True, "username": self.server.username})
            else:
                self.send_json(200, {"active": False})
            return
        if path != DOWNLOAD_PATH:
            self.send_json(404, {"code": 404, "message": f"no fake for {path}"})
            return

        self.server.download_requests.append(body)
        behavior = self.server.next_behavior()
        slug = f"{body.get('ownerSlug')}/{body.get('datasetSlug')}"

        if behavior == "drop":
            self.close_connection = True
            return
        if behavior == "stall":
            self.server.released.wait(timeout=10)
            self.close_connection = True
            return
        if behavior in ("500", "403"):
            self.send_json(int(behavior), {"code": int(behavior), "message": f"fake {behavior}"})
            return
        if not self.has_valid_auth():
            self.send_json(401, {"code": 401, "message": "Unauthenticated"})
            return
        if slug not in self.server.datasets:
            self.send_json(404, {"code": 404, "message": f"Dataset {slug} not found"})
            return

        self.send_response(302)
        self.send_header("Location", f"http://localhost/blobs/{behavior}/{slug}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        parts = urlsplit(self.path).path.split("/")
        if len(parts) != 5 or parts[1] != "blobs":
            self.send_json(404, {"code": 404, "message": "not found"})
            return
        behavior, slug = parts[2], f"{parts[3]}/{parts[4]}"
        data = self.server.datasets[slug]
        if behavior == "corrupt":
            data = b"<html>this is not a zip archive</html>"

        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if behavior == "truncate":
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        self.wfile.write(data)


def start_fake_kaggle(
    datasets: dict[str, bytes], username: str, key: str, token: str
) -> FakeKaggleServer:
    """Start the fake on a free loopback port in a daemon thread."""
    server = FakeKaggleServer(datasets, username, key, token)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def stop_fake_kaggle(server: FakeKaggleServer) -> None:
    server.released.set()
    server.shutdown()
    server.server_close()
