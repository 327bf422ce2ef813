"""The ceiling for intake: a bare waitress app that checks the HMAC, parses the
JSON and answers 202, with the same waitress settings as `dockrune serve`.

    python3 bench/ceiling.py PORT        (the secret comes from BENCH_SECRET)
"""

import hashlib
import hmac
import json
import os
import sys

import waitress

SECRET = os.environ.get("BENCH_SECRET", "").encode()


def app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    given = environ.get("HTTP_X_HUB_SIGNATURE_256", "")
    if not hmac.compare_digest(expected, given):
        start_response("401 Unauthorized", [("Content-Length", "0")])
        return [b""]
    payload = json.loads(body)
    answer = json.dumps({"sha": payload.get("after")}).encode()
    start_response("202 Accepted", [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(answer)))])
    return [answer]


if __name__ == "__main__":
    waitress.serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=8,
                   ident="ceiling", channel_timeout=30, _quiet=True)
