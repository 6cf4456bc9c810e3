"""A view-routed dashboard query over the PostgreSQL wire (psycopg) vs
JSON over HTTP (/v1/query), against a running `fleetgate up` that
wire_vs_http.py has filled. Usage:

    python3 api/bench/dashboard_wire_vs_http.py [DATA_DIR] [HTTP_PORT] [PG_PORT]

Declares an hourly per-device view of `benchwire` (once), checks that the
router answers the dashboard query (the fleet-wide hourly average) from
it, then times each door 300 times, alternating, and prints p50 and p99
of each and their difference. Needs psycopg.
"""
import json, time
import psycopg

from doors import admin, call, pg_port


status, body = call("POST", "/v1/devices/bench-reader/token", admin, {})
assert status == 200, body
reader = json.loads(body)["token"]
call("POST", "/v1/views", admin, b"""
[views.benchwire_hourly]
source = "benchwire"
group_by = ["device_id"]
bucket = { column = "taken_at", width = "1h" }
aggregates = { readings = "count(*)", mean = "avg(celsius)" }
refresh = "realtime"
""", "text/plain")
sql = ("SELECT (taken_at / 3600000) * 3600000 AS hour, avg(celsius) AS mean, count(*) AS readings "
       "FROM benchwire GROUP BY (taken_at / 3600000) * 3600000 ORDER BY 1")
status, body = call("POST", "/v1/query", reader, {"sql": sql})
answer = json.loads(body)
assert status == 200 and answer["view"] == "benchwire_hourly", body[:300]

conn = psycopg.connect(host="127.0.0.1", port=pg_port, user="bench-reader", password=reader,
                       dbname="fleetgate", autocommit=True)
wire_rows = conn.execute(sql).fetchall()
assert len(wire_rows) == len(answer["rows"]), (len(wire_rows), len(answer["rows"]))

wire, over_http = [], []
for _ in range(300):
    t = time.perf_counter()
    conn.execute(sql).fetchall()
    wire.append(time.perf_counter() - t)
    t = time.perf_counter()
    status, body = call("POST", "/v1/query", reader, {"sql": sql})
    json.loads(body)
    over_http.append(time.perf_counter() - t)


def p(values, q):
    return sorted(values)[int(q * (len(values) - 1))] * 1000


print(f"{len(wire_rows)} rows through view benchwire_hourly: "
      f"wire p50 {p(wire, .5):.2f} ms p99 {p(wire, .99):.2f} ms; "
      f"HTTP p50 {p(over_http, .5):.2f} ms p99 {p(over_http, .99):.2f} ms; "
      f"wire - HTTP p50 {p(wire, .5) - p(over_http, .5):+.2f} ms")
