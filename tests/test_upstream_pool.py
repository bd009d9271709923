"""The upstream pool's responses read through a small buffer (issue #19: memory per open stream)."""

import sys

import requests

from shim import upstream_pool
from tests.fake_upstream import FAKE_API_KEY, FakeUpstream


def test_an_upstream_response_reads_through_a_one_kib_buffer_not_eight():
    fake = FakeUpstream().start()
    try:
        session = requests.Session()
        session.trust_env = False
        session.mount("http://", upstream_pool.adapter(pool_maxsize=4))
        answer = session.get(
            f"http://127.0.0.1:{fake.port}/v1/models",
            headers={"x-api-key": FAKE_API_KEY},
            stream=True,
        )
        reader = answer.raw._fp.fp  # http.client's buffered reader over the socket
        # A BufferedReader's size includes its buffer: ~8.3 KiB with the default.
        assert sys.getsizeof(reader) < 2048
        assert answer.status_code == 200
        assert answer.json()["data"]  # and the whole body still arrives
    finally:
        fake.stop()
