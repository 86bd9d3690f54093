"""A stand-in for api.openai.com in CI's compose jobs: chat completions, whole or streamed.

Usage: python3 mock_openai.py PORT

Answers POST /v1/chat/completions with one fixed reply, as JSON or, when the request asks
for "stream": true, as server-sent events in chunked transfer coding. Standard library only,
so it runs on a bare python image.
"""
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPLY = "Hello from the CI upstream"


def completion(model: str) -> dict:
    return {
        "id": "chatcmpl-ci",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": REPLY},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }


def chunk(model: str, delta: dict, finish: str | None) -> bytes:
    event = {
        "id": "chatcmpl-ci",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path != "/v1/chat/completions":
            self.answer(404, {"error": {"message": f"no {self.path} here", "type": "invalid_request_error", "param": None, "code": None}})
            return
        request = json.loads(body)
        model = request.get("model", "gpt-4o-mini")
        if not request.get("stream"):
            self.answer(200, completion(model))
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        events = [chunk(model, {"role": "assistant"}, None)]
        words = REPLY.split(" ")
        pieces = [word + " " for word in words[:-1]] + words[-1:]
        events += [chunk(model, {"content": piece}, None) for piece in pieces]
        events += [chunk(model, {}, "stop"), b"data: [DONE]\n\n"]
        for event in events:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def answer(self, status: int, document: dict) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    # As a container's PID 1, SIGTERM is ignored unless handled: `docker compose down` would
    # wait out its timeout.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Upstream).serve_forever()
