"""Decision-log write throughput: rows/s into SQLite and PostgreSQL (targets: >= 30,000 rows/s into
SQLite, >= 15,000 into PostgreSQL).

Rows are realistic decisions: 16 candidates (5 modules, tilt, value, 6 exposure entries, score), a
numpy pmf, a 5-module served layout with 8 items each, context and versions. Measured per backend:

* ``reference_0004``: the write path before the columnar encoding, in the same run: the SQLAlchemy
  table's executemany (bind processing per value), candidates as one object per candidate, into a
  schema at revision 0004 (every JSON column ``jsonb`` on PostgreSQL), batches of 1000;
* ``insert_batches``: ``policy_api.log.insert_decisions`` in batches of 1000 (rows encoded once,
  candidates columnar; executemany on SQLite, COPY on PostgreSQL; one commit each);
* ``insert_batches_columnar_input``: the same with the candidates handed over already columnar (as
  an engine could build them), so the writer does not convert them;
* ``logwriter``: ``LogWriter.submit_decision`` for every row, then ``flush()``; end-to-end rows/s
  and the caller's submit latency (p50 / p99 / max, microseconds).
* ``logwriter_durable``: the same with the journal (``durable=True``, as the server runs it), rows
  submitted from 1 and from 8 threads (request threads): each submit returns once its row is
  fsync'd (``journal_sync=fsync``) or written to the page cache (``write``); rows/s, submit latency,
  and rows per commit (one write, and with ``fsync`` one fsync, per commit: the group commit).

``--durable-only`` runs only the journaled measurement (SQLite, ``--rows`` rows).

PostgreSQL URL: env ``HOMEPAGE_BENCH_POSTGRES_URL``, else ``HOMEPAGE_TEST_POSTGRES_URL``; the bench
works in a scratch schema it drops afterwards. Prints one JSON line per measurement.

    .venv/bin/python bench/log_write.py [--rows 20000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from policy_api.log import LogWriter, encode_candidates, insert_decisions, json_dumps, make_engine, upgrade


def make_rows(n: int, seed: int, prefix: str, shape: str = "engine") -> list[dict]:
    """Decision rows shaped like the engine's (``policy_api.engine.Decision.row``): string module ids, candidate
    floats rounded to 1e-6 as the engine logs them (the pmf at full precision), per-slot engagement, a served layout of 5 modules x 8 items. ``shape="brief"`` keeps only
    the five documented candidate fields (modules, tilt, value, exposure, score)."""
    rng = np.random.default_rng(seed)
    t0 = datetime(2024, 5, 1, tzinfo=UTC)
    n_cand, n_slots, n_items = 16, 5, 8
    cats = ["songs", "videos", "audio", "live"]
    mod = rng.integers(0, 24, size=(n, n_cand, n_slots))
    tilt = rng.choice([0.0, 0.5, 1.0], size=(n, n_cand))
    value = rng.gamma(2.0, size=(n, n_cand)).round(6)
    exposure = rng.random((n, n_cand, 6)).round(6)
    score = rng.normal(size=(n, n_cand)).round(6)
    engagement = rng.random((n, n_cand, n_slots)).round(6)
    tail = rng.random((n, n_cand)).round(6)
    pmf = rng.dirichlet(np.ones(n_cand), size=n)
    chosen = rng.integers(0, n_cand, size=n)
    rows = []
    for i in range(n):  # building the fixture rows is not timed
        cands = [
            {"modules": [f"{cats[m % 4]}_{m}" for m in mod[i, c].tolist()],
             "categories": [cats[m % 4] for m in mod[i, c].tolist()],
             "tilt": float(tilt[i, c]), "value": float(value[i, c]), "exposure": exposure[i, c].tolist(),
             "score": float(score[i, c]), "engagement": engagement[i, c].tolist(), "tail": float(tail[i, c])}
            for c in range(n_cand)
        ]  # fmt: skip
        if shape == "brief":
            cands = [{f: c[f] for f in ("modules", "tilt", "value", "exposure", "score")} for c in cands]
        k = int(chosen[i])
        layout = [
            {"slot": s, "module_id": f"{cats[m % 4]}_{m}", "category": cats[m % 4], "tilt": float(tilt[i, k]),
             "items": [{"item_id": f"i{(i * 7 + m * 13 + j) % 3000:05d}", "long_tail": bool((i + j) % 3 == 0)}
                       for j in range(n_items)]}
            for s, m in enumerate(mod[i, k].tolist())
        ]  # fmt: skip
        rows.append({
            "request_id": f"{prefix}-{i:08d}",
            "ts": t0 + timedelta(milliseconds=i),
            "user_id": f"u{i % 5000:05d}",
            "context": {"country": "SE", "platform": "ios", "known_user": True,
                        "shared": rng.random(5).tolist(), "greedy": 3},
            "versions": {"config": 3, "plan": 7, "ranker": 2, "bandit": 5},
            "policy": "bandit",
            "candidates": cands,
            "pmf": pmf[i].tolist(),
            "chosen": k,
            "propensity": float(pmf[i, k]),
            "layout": layout,
            "fallback_reason": None,
        })  # fmt: skip
    return rows


def count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT COUNT(*) FROM decisions")).scalar_one())


def _json_us_per_row(rows: list[dict]) -> float:
    start = time.process_time()
    for r in rows:
        for c in ("context", "versions", "candidates", "pmf", "layout"):
            json_dumps(r[c])
    return (time.process_time() - start) / len(rows) * 1e6


def _worker(url: str, spill: str, n: int, seed: int, shape: str, barrier, out) -> None:  # spawned process
    rows = make_rows(n, seed, f"p{seed}", shape)
    engine = make_engine(url)
    writer = LogWriter(engine, spill, max_queue=n + 1)
    barrier.wait()
    start = time.time()
    for row in rows:
        writer.submit_decision(row)
    ok = writer.flush(timeout=300)
    out.put((start, time.time(), ok, writer.stats()["written"]))
    writer.close()
    engine.dispose()


def bench_durable(url: str, rows: list[dict], tmp: Path) -> None:
    """Journaled submits from 1 and 8 threads, returning after the fsync (``sync``) or after the write
    into the page cache (``write``, the fsync following off the caller's time)."""
    import threading

    engine = make_engine(url)
    upgrade(engine)
    quarter = len(rows) // 4
    for k, (sync, threads) in enumerate([(True, 1), (True, 8), (False, 1), (False, 8)]):
        part = rows[k * quarter : (k + 1) * quarter]
        lat = np.empty(len(part))
        writer = LogWriter(engine, tmp / f"journal-{k}", max_queue=len(part) + 1, durable=True,
                           journal_sync=sync)

        def run(t: int, writer: LogWriter = writer, part: list[dict] = part, lat: np.ndarray = lat,
                threads: int = threads) -> None:
            for i in range(t, len(part), threads):
                t0 = time.perf_counter_ns()
                writer.submit_decision(part[i])
                lat[i] = time.perf_counter_ns() - t0

        start = time.perf_counter()
        ths = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        submitted = time.perf_counter() - start
        ok = writer.flush(timeout=300)
        secs = time.perf_counter() - start
        stats = writer.stats()
        commits = stats["journal_commits"]
        writer.close()
        assert ok and stats["journaled"] == len(part) and stats["spilled"] == 0
        print(json.dumps({"bench": "log_write", "backend": engine.dialect.name, "mode": "logwriter_durable",
                          "journal_sync": "fsync" if sync else "write", "submit_threads": threads, "rows": len(part), "seconds": round(secs, 3),
                          "rows_per_s": round(len(part) / secs), "submit_seconds": round(submitted, 3),
                          "submit_us_p50": round(float(np.percentile(lat, 50)) / 1e3, 1),
                          "submit_us_p99": round(float(np.percentile(lat, 99)) / 1e3, 1),
                          "rows_per_commit": round(len(part) / max(commits, 1), 2)}), flush=True)  # fmt: skip
    engine.dispose()


def reference_0004(backend: str, url: str, rows: list[dict]) -> None:
    """The write path before the columnar encoding and migration 0005, measured beside the new one."""
    from sqlalchemy.dialects import postgresql, sqlite

    from policy_api.log import DECISION_COLUMNS, decisions, downgrade

    engine = make_engine(url)
    upgrade(engine, "0004")
    jsonb = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
    old = sa.Table("decisions", sa.MetaData(), *[
        sa.Column(c.name, jsonb if isinstance(c.type, sa.JSON) else c.type, primary_key=c.primary_key)
        for c in decisions.columns])  # fmt: skip
    insert = (sqlite.insert(old) if backend == "sqlite" else postgresql.insert(old)).on_conflict_do_nothing(
        index_elements=["request_id"])
    batch = 1000
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(rows), batch):
        with engine.begin() as conn:
            conn.execute(insert, [{c: r.get(c) for c in DECISION_COLUMNS} for r in rows[i : i + batch]])
    secs, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert count(engine) == len(rows)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM decisions"))
    downgrade(engine, "base")
    engine.dispose()
    print(json.dumps({"bench": "log_write", "backend": backend, "mode": "reference_0004", "procs": 1,
                      "batch_size": batch, "rows": len(rows), "seconds": round(secs, 3),
                      "rows_per_s": round(len(rows) / secs), "client_cpu_us_per_row": round(cpu / len(rows) * 1e6, 1),
                      "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)  # fmt: skip


def bench_backend(backend: str, url: str, rows_a: list[dict], rows_b: list[dict], tmp: Path, procs: int,
                  shape: str) -> None:
    engine = make_engine(url)
    reference_0004(backend, url, rows_a)
    upgrade(engine)
    sample = rows_a[:500]
    bytes_per_row = float(np.mean([sum(len(json_dumps(r[c])) for c in ("context", "versions", "candidates", "pmf", "layout")) for r in sample]))
    stored_bytes = float(np.mean([sum(len(json_dumps(encode_candidates(r[c]) if c == "candidates" else r[c]))
                                      for c in ("context", "versions", "candidates", "pmf", "layout")) for r in sample]))
    base = {"bench": "log_write", "backend": backend, "shape": shape, "n_candidates": 16, "json_bytes_per_row": round(bytes_per_row),
            "stored_json_bytes_per_row": round(stored_bytes),
            "json_encode_cpu_us_per_row": round(_json_us_per_row(sample), 1),
            "load_avg_1m": round(os.getloadavg()[0], 2)}  # fmt: skip

    batch = 1000
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(rows_a), batch):
        insert_decisions(engine, rows_a[i : i + batch])
    secs, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert count(engine) == len(rows_a)
    print(json.dumps({**base, "mode": "insert_batches", "procs": 1, "batch_size": batch, "rows": len(rows_a),
                      "seconds": round(secs, 3), "rows_per_s": round(len(rows_a) / secs),
                      "client_cpu_us_per_row": round(cpu / len(rows_a) * 1e6, 1)}), flush=True)  # fmt: skip

    # the same rows with their candidates already columnar, as an engine could hand them over (the
    # writer then only checks the form): what the columnar conversion costs the writer thread
    rows_c = [{**r, "request_id": "c" + r["request_id"], "candidates": encode_candidates(r["candidates"])}
              for r in rows_a]
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(rows_c), batch):
        insert_decisions(engine, rows_c[i : i + batch])
    secs, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert count(engine) == 2 * len(rows_a)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM decisions WHERE request_id LIKE 'c%'"))
    print(json.dumps({**base, "mode": "insert_batches_columnar_input", "procs": 1, "batch_size": batch,
                      "rows": len(rows_c), "seconds": round(secs, 3), "rows_per_s": round(len(rows_c) / secs),
                      "client_cpu_us_per_row": round(cpu / len(rows_c) * 1e6, 1)}), flush=True)  # fmt: skip

    lat = np.empty(len(rows_b))
    writer = LogWriter(engine, tmp / f"spill-{backend}", max_queue=len(rows_b) + 1, batch_size=batch)
    start, cpu = time.perf_counter(), time.process_time()
    for i, row in enumerate(rows_b):
        t = time.perf_counter_ns()
        writer.submit_decision(row)
        lat[i] = time.perf_counter_ns() - t
    submitted = time.perf_counter() - start
    ok = writer.flush(timeout=300)
    secs, cpu = time.perf_counter() - start, time.process_time() - cpu
    stats = writer.stats()
    writer.close()
    assert ok and count(engine) == len(rows_a) + len(rows_b) and stats["spilled"] == 0, (ok, count(engine), stats)
    print(json.dumps({**base, "mode": "logwriter", "procs": 1, "batch_size": batch, "rows": len(rows_b),
                      "seconds": round(secs, 3), "rows_per_s": round(len(rows_b) / secs),
                      "client_cpu_us_per_row": round(cpu / len(rows_b) * 1e6, 1),
                      "submit_seconds": round(submitted, 3),
                      "submit_us_p50": round(float(np.percentile(lat, 50)) / 1e3, 2),
                      "submit_us_p99": round(float(np.percentile(lat, 99)) / 1e3, 2),
                      "submit_us_max": round(float(lat.max()) / 1e3, 1)}), flush=True)  # fmt: skip

    if procs > 1:
        ctx = mp.get_context("spawn")
        barrier, out = ctx.Barrier(procs), ctx.Queue()
        n = len(rows_b)
        ps = [ctx.Process(target=_worker, args=(url, str(tmp / f"spill-{backend}-mp"), n, 100 + k, shape, barrier, out))
              for k in range(procs)]  # fmt: skip
        for p in ps:
            p.start()
        res = [out.get(timeout=600) for _ in ps]
        for p in ps:
            p.join()
        secs = max(r[1] for r in res) - min(r[0] for r in res)
        assert all(r[2] for r in res) and count(engine) == len(rows_a) + len(rows_b) + procs * n
        print(json.dumps({**base, "mode": "logwriter", "procs": procs, "batch_size": batch, "rows": procs * n,
                          "seconds": round(secs, 3), "rows_per_s": round(procs * n / secs)}), flush=True)  # fmt: skip
    engine.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000, help="rows per measurement (and per process)")
    ap.add_argument("--procs", type=int, default=2, help="writer processes in the scale-out measurement")
    ap.add_argument("--shape", choices=["engine", "brief"], default="engine", help="candidate fields logged")
    ap.add_argument("--durable-only", action="store_true", help="only the journaled (fsync) measurement")
    args = ap.parse_args()
    if args.durable_only:
        print(json.dumps({"bench": "log_write", "load_avg_1m": round(os.getloadavg()[0], 2)}))
        with tempfile.TemporaryDirectory() as d:
            bench_durable(f"sqlite:///{Path(d) / 'log.sqlite'}", make_rows(args.rows, 2, "d", args.shape), Path(d))
        print(json.dumps({"bench": "log_write", "load_avg_1m_end": round(os.getloadavg()[0], 2)}))
        return 0
    rows_a = make_rows(args.rows, 0, "a", args.shape)
    rows_b = make_rows(args.rows, 1, "b", args.shape)
    print(json.dumps({"bench": "log_write", "load_avg_1m": round(os.getloadavg()[0], 2),
                      "cpus": os.cpu_count(), "python": sys.version.split()[0], "sqlalchemy": sa.__version__}))  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bench_backend("sqlite", f"sqlite:///{tmp / 'log.sqlite'}", rows_a, rows_b, tmp, args.procs, args.shape)
        bench_durable(f"sqlite:///{tmp / 'durable.sqlite'}", make_rows(min(args.rows, 4000), 2, "d", args.shape), tmp)
        pg = os.environ.get("HOMEPAGE_BENCH_POSTGRES_URL") or os.environ.get("HOMEPAGE_TEST_POSTGRES_URL")
        if not pg:
            print(json.dumps({"bench": "log_write", "backend": "postgresql", "skipped": "no postgres url in env"}))
            return 0
        admin = make_engine(pg)
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        try:
            url = admin.url.update_query_dict({"options": f"-csearch_path={schema}"})
            bench_backend("postgresql", url.render_as_string(hide_password=False), rows_a, rows_b, tmp, args.procs, args.shape)
        finally:
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()
    print(json.dumps({"bench": "log_write", "load_avg_1m_end": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
