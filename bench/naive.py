"""The naive passthrough: Flask + requests + gunicorn/gevent as a tutorial writes it.

The baseline the benchmark measures shim against; no features, ~50 lines.
Run (from bench/): NAIVE_UPSTREAM=http://127.0.0.1:PORT NAIVE_SECRET=... \
    gunicorn -k gevent -w 2 -b 127.0.0.1:PORT naive:app
"""

import os

import requests
from flask import Flask, Response, request, stream_with_context

UPSTREAM = os.environ["NAIVE_UPSTREAM"]
SECRET = os.environ["NAIVE_SECRET"]
API_KEY = os.environ.get("NAIVE_API_KEY", "sk-ant-bench")
HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "host",
    "content-length",
    "content-encoding",
}

app = Flask(__name__)
session = requests.Session()


@app.route("/<path:path>", methods=["GET", "POST"])
def proxy(path):
    presented = request.headers.get("x-api-key") or request.headers.get("x-goog-api-key")
    if presented != SECRET:
        return Response('{"type":"error"}', status=401, mimetype="application/json")
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    headers.pop("X-Api-Key", None)
    headers["x-api-key"] = API_KEY
    upstream = session.request(
        request.method,
        f"{UPSTREAM}/{path}",
        params=request.args,
        headers=headers,
        data=request.get_data(),
        stream=True,
        timeout=(10, 600),
    )

    def generate():
        try:
            yield from upstream.iter_content(chunk_size=None)
        finally:
            upstream.close()

    out = [(k, v) for k, v in upstream.headers.items() if k.lower() not in HOP]
    return Response(stream_with_context(generate()), status=upstream.status_code, headers=out)
