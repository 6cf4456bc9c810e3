"""What the wire-vs-HTTP benchmarks share: the server they run against
(`[DATA_DIR] [HTTP_PORT] [PG_PORT]` on the command line) and a JSON call
to its HTTP API."""
import json, os, sys, urllib.error, urllib.request

data = sys.argv[1] if len(sys.argv) > 1 else "fleetgate-data"
http = f"http://127.0.0.1:{sys.argv[2] if len(sys.argv) > 2 else 8080}"
pg_port = int(sys.argv[3]) if len(sys.argv) > 3 else 5433
admin = open(os.path.join(data, "admin.token")).read().strip()


def call(method, path, token, body=None, content_type="application/json"):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(http + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
