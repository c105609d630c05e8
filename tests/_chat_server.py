"""A tiny OpenAI-compatible chat endpoint on 127.0.0.1, served from a thread, for tests."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ChatServer:
    """Answers ``POST /v1/chat/completions`` with ``respond(body)``: a reply text, an int HTTP
    status, or a dict sent as the whole JSON response.

    ``delay`` seconds of sleep before answering simulate a slow model; ``requests`` records every
    request body and ``headers`` every request's headers.
    """

    def __init__(self, respond: Callable[[dict[str, Any]], Any], delay: float = 0.0) -> None:
        self.respond = respond
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                time.sleep(server.delay)
                if self.path != "/v1/chat/completions":
                    answer: Any = 404
                else:
                    answer = server.respond(body)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # client timed out
                    self._reply(answer, body)

            def _reply(self, answer: Any, body: dict[str, Any]) -> None:
                if isinstance(answer, int):
                    self.send_response(answer)
                    self.end_headers()
                    return
                payload = json.dumps(answer if isinstance(answer, dict) else {
                    "id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model", "stub"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": answer}}],
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @contextmanager
    def running(self) -> Iterator[ChatServer]:
        thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._httpd.shutdown()
            self._httpd.server_close()
            thread.join()
