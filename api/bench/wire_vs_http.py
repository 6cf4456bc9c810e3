"""100,000 rows over the PostgreSQL wire (psycopg) vs JSON over HTTP
(/v1/query), against a running `fleetgate up`. Usage:

    python3 api/bench/wire_vs_http.py [DATA_DIR] [HTTP_PORT] [PG_PORT]

Registers bench devices, ingests 100,000 rows (once, 2,000 a request), then times each
door 5 times reading them all (client decoding included) and prints the
median of each. Needs psycopg.
"""
import json, os, statistics, time
import psycopg

from doors import admin, call, pg_port


def token(device, role):
    status, body = call("POST", "/v1/devices", admin, {"id": device, "role": role})
    if status == 201:
        return json.loads(body)["token"]
    status, body = call("POST", f"/v1/devices/{device}/token", admin, {})
    return json.loads(body)["token"]


call("POST", "/v1/streams", admin, b"""
[streams.benchwire]
key = ["device_id", "seq"]
fields.seq = { type = "int", required = true }
fields.celsius = { type = "float" }
fields.ok = { type = "bool" }
fields.label = { type = "string" }
fields.taken_at = { type = "timestamp" }
""", "text/plain")
writer = token("bench-writer", "ingest")
reader = token("bench-reader", "extract")
ROWS = 100_000
sql = os.environ.get("BENCH_SQL", "SELECT device_id, received_at, seq, celsius, ok, label, taken_at FROM benchwire")
status, body = call("POST", "/v1/query", reader, {"sql": "SELECT count(*) FROM benchwire"})
have = json.loads(body)["rows"][0][0]
for start in range(have, ROWS, 2_000):
    records = [{"seq": i, "celsius": i / 10, "ok": i % 2 == 0, "label": f"reading {i}",
                "taken_at": 1_767_225_600_000 + i} for i in range(start, min(start + 2_000, ROWS))]
    status, body = call("POST", "/v1/ingest/benchwire", writer, records)
    assert status == 200, body


def over_http():
    status, body = call("POST", "/v1/query", reader, {"sql": sql})
    assert status == 200, body[:200]
    return len(json.loads(body)["rows"])


conn = psycopg.connect(host="127.0.0.1", port=pg_port, user="bench-reader", password=reader,
                       dbname="fleetgate", autocommit=True)


def over_wire():
    return len(conn.execute(sql).fetchall())


def timed(f):
    times = []
    for _ in range(5):
        t = time.perf_counter()
        n = f()
        times.append(time.perf_counter() - t)
        assert n == ROWS, n
    return statistics.median(times)


h, w = timed(over_http), timed(over_wire)
print(f"{ROWS} rows: HTTP JSON {h:.3f} s, PostgreSQL wire {w:.3f} s, wire/HTTP speed-up {h / w:.2f}x")
