"""Ratios against the targets of issue 4, the Markdown table, and the JSON file."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import RESULTS


def _get(results: dict[str, Any], *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _med(results: dict[str, Any], *path: str) -> float | None:
    value = _get(results, *path)
    if isinstance(value, dict):
        value = value.get("median")
    return float(value) if isinstance(value, int | float) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _db_stalls(ontime: dict[str, Any]) -> str:
    """What MariaDB's commit probe saw in the on-time minute, when it held commits."""
    probe = ontime.get("db_commit") or {}
    if not probe.get("stalls"):
        return ""
    return (
        f"MariaDB held commits up to {_fmt(probe.get('max_ms'))} ms meanwhile; "
        f"{ontime.get('late_over_50ms_in_db_stall')} of the {ontime.get('late_over_50ms')} "
        "emails over 50 ms late were due then"
    )


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:  # noqa: PLR0915
    """Every target row: figure, measured value, target, met (None = not measured)."""
    rows: list[dict[str, Any]] = []

    def add(figure: str, value: float | None, target: str, ok: bool | None, detail: str) -> None:
        rows.append(
            {"figure": figure, "value": value, "target": target, "met": ok, "detail": detail}
        )

    def at_least(figure: str, value: float | None, bound: float, detail: str) -> None:
        add(figure, value, f">= {bound:g}", None if value is None else value >= bound, detail)

    def at_most(figure: str, value: float | None, bound: float, detail: str) -> None:
        add(figure, value, f"<= {bound:g}", None if value is None else value <= bound, detail)

    for c in (1, 8):
        api = _med(results, "api", f"create_c{c}", "req_per_s")
        raw = _med(results, "raw", f"mysql_tx_{c}")
        at_least(
            f"API create / raw insert tx, {c} client(s)",
            _ratio(api, raw),
            0.7,
            f"{_fmt(api)} req/s / {_fmt(raw)} tx/s",
        )
    batch = _med(results, "api", "batch100_c8", "emails_per_s")
    raw100 = _med(results, "raw", "mysql_100_8")
    at_least(
        "batch emails/s / raw 100-per-tx emails/s (8 clients)",
        _ratio(batch, raw100),
        0.7,
        f"{_fmt(batch)} / {_fmt(raw100)}",
    )
    windowed = _med(results, "raw", "rabbit_windowed")
    each = _med(results, "raw", "rabbit_confirm_each")
    for n in (1, 2):
        relay = _med(results, "relay", f"relays_{n}", "rows_per_s")
        at_least(
            f"relay rows/s ({n} relay) / raw windowed-confirm publishes/s",
            _ratio(relay, windowed),
            0.5,
            f"{_fmt(relay)} / {_fmt(windowed)}",
        )
        at_least(
            f"relay rows/s ({n} relay) / confirm-one-at-a-time publishes/s",
            _ratio(relay, each),
            5,
            f"{_fmt(relay)} / {_fmt(each)}",
        )
    for n in (1, 2):
        worker = _med(results, "worker", f"workers_{n}", "deliveries_per_s")
        smtp = _med(results, "raw", f"smtp_{n}conn")
        at_least(
            f"worker deliveries/s ({n} proc) / raw SMTP msgs/s ({n} conn)",
            _ratio(worker, smtp),
            0.7,
            f"{_fmt(worker)} / {_fmt(smtp)}",
        )
    ours = _get(results, "pipeline", "ontime") or {}
    peer = _get(results, "celery", "ontime") or {}
    stalls = _db_stalls(ours)
    at_most("on-time 100/s: lateness p99 (ms)", ours.get("p99_ms"), 100, stalls)
    at_most("on-time 100/s: lateness max (ms)", ours.get("max_ms"), 1000, stalls)
    early = ours.get("early")
    add(
        "on-time 100/s: early deliveries",
        early,
        "== 0",
        None if early is None else early == 0,
        f"missing {ours.get('missing')}",
    )
    at_most(
        "on-time p99 / Celery p99",
        _ratio(ours.get("p99_ms"), peer.get("p99_ms")),
        1.0,
        f"{_fmt(ours.get('p99_ms'))} ms vs Celery {_fmt(peer.get('p99_ms'))} ms"
        + (f"; {stalls}" if stalls else ""),
    )
    bursts = sorted(
        int(k.split("_")[1]) for k in (_get(results, "pipeline") or {}) if k.startswith("burst_")
    )
    for n in bursts:
        ours_b = _get(results, "pipeline", f"burst_{n}") or {}
        peer_b = _get(results, "celery", f"burst_{n}") or {}
        last, peer_last = ours_b.get("last_after_send_at_s"), peer_b.get("last_after_send_at_s")
        bound = 3.0 if n <= 5000 else 15.0
        at_most(
            f"burst {n}: last arrival after send_at (s)",
            last,
            bound,
            f"{_cut(ours_b)}Celery {_cut(peer_b)}{_fmt(peer_last, 1)} s",
        )
        if ours_b.get("cut_off") and peer_b.get("cut_off"):
            # both cut off: compare how many had arrived by the cut-off instead
            got, peer_got = ours_b.get("arrived") or 0, peer_b.get("arrived") or 0
            ratio = _ratio(float(peer_got), float(got)) if got else None
            at_most(
                f"burst {n}: ours / Celery's (both cut off: Celery arrived / ours arrived)",
                ratio if got else float("inf"),
                1.0,
                f"{got} vs Celery {peer_got} by the cut-off",
            )
        elif ours_b.get("cut_off") and peer_last is not None:
            add(
                f"burst {n}: ours / Celery's last arrival",
                None,
                "<= 1",
                False,
                f"ours cut off, Celery done in {_fmt(peer_last, 1)} s",
            )
        else:
            at_most(f"burst {n}: ours / Celery's last arrival", _ratio(last, peer_last), 1.0, "")
    none = _med(results, "scale", "poll_none", "median_ms")
    future = _med(results, "scale", "poll_future", "median_ms")
    trap = _med(results, "scale", "poll_future_open_tx", "median_ms")
    at_most(
        "empty poll: 1M future rows / none",
        _ratio(future, none),
        2.0,
        f"{_fmt(future, 3)} ms / {_fmt(none, 3)} ms",
    )
    at_most(
        "empty poll: 1M future + drain under open snapshot / none",
        _ratio(trap, none),
        2.0,
        f"{_fmt(trap, 3)} ms / {_fmt(none, 3)} ms",
    )
    rss = _get(results, "scale", "rss") or {}
    before, after = rss.get("none_kib") or {}, rss.get("scheduled_kib") or {}
    b = (before.get("relay") or 0) + (before.get("worker") or 0)
    a = (after.get("relay") or 0) + (after.get("worker") or 0)
    at_most(
        f"relay+worker RSS, {rss.get('scheduled')} scheduled / none",
        _ratio(a or None, b or None),
        1.1,
        f"{a} KiB / {b} KiB",
    )
    return rows


def ceilings(results: dict[str, Any]) -> list[dict[str, Any]]:
    """What the guarantees and the parts themselves leave of the targets, from the same
    run: the least a correct implementation must do, measured or added up, as a ratio of
    the raw limit the target divides by, and ours as a ratio of that floor. No targets of
    their own: they say what holds one.

    - worker: raw SMTP with each send recorded before the next (FAULTS' one extra copy
      per crash); the bursts: their size at that rate on two connections;
    - API create: a transaction and an HTTP exchange (``GET /healthz``, the same
      server's floor) - in series from one client, their CPU on the machine's cores from
      eight;
    - relay: the plainest correct outbox relay (``raw.outbox_floor_client``)."""
    rows: list[dict[str, Any]] = []

    def add(figure: str, value: float | None, detail: str) -> None:
        rows.append({"figure": figure, "value": value, "detail": detail})

    for n in (1, 2):
        floor = _med(results, "raw", f"smtp_recorded_{n}conn")
        smtp = _med(results, "raw", f"smtp_{n}conn")
        worker = _med(results, "worker", f"workers_{n}", "deliveries_per_s")
        add(
            f"raw SMTP + record / raw SMTP msgs/s ({n} conn)",
            _ratio(floor, smtp),
            f"{_fmt(floor)} / {_fmt(smtp)}; the worker target is 0.7",
        )
        add(
            f"worker deliveries/s ({n} proc) / raw SMTP + record msgs/s",
            _ratio(worker, floor),
            f"{_fmt(worker)} / {_fmt(floor)}",
        )
    floor2 = _med(results, "raw", "smtp_recorded_2conn")
    bursts = (_get(results, "pipeline") or {}).keys()
    for n in sorted(int(k.split("_")[1]) for k in bursts if k.startswith("burst_")):
        add(
            f"burst {n}: least drain time at the raw SMTP + record rate (s)",
            n / floor2 if floor2 else None,
            f"{n} / {_fmt(floor2)} msgs/s (2 conn); target {3 if n <= 5000 else 15} s",
        )
    raw1 = _med(results, "raw", "mysql_tx_1")
    healthz1 = _med(results, "api", "healthz_c1", "req_per_s")
    series = 1 / (1 / raw1 + 1 / healthz1) if raw1 and healthz1 else None
    add(
        "API create floor (1 client): raw insert tx then GET /healthz / raw tx",
        _ratio(series, raw1),
        f"{_fmt(series)} / {_fmt(raw1)}; the target is 0.7",
    )
    api1 = _med(results, "api", "create_c1", "req_per_s")
    add(
        "API create req/s (1 client) / that floor",
        _ratio(api1, series),
        f"{_fmt(api1)} / {_fmt(series)}",
    )
    cores = _get(results, "machine", "cpus")
    tx_cpu = _get(results, "raw", "mysql_tx_8", "cpu", "total")
    http_cpu = _get(results, "api", "healthz_c8", "cpu", "total")
    cpu_floor = cores * 1e6 / (tx_cpu + http_cpu) if cores and tx_cpu and http_cpu else None
    raw8 = _med(results, "raw", "mysql_tx_8")
    add(
        "API create floor (8 clients): cores / CPU of a raw tx + GET /healthz, over raw tx",
        _ratio(cpu_floor, raw8),
        f"{_fmt(cpu_floor)} / {_fmt(raw8)}; the target is 0.7",
    )
    api8 = _med(results, "api", "create_c8", "req_per_s")
    add(
        "API create req/s (8 clients) / that floor",
        _ratio(api8, cpu_floor),
        f"{_fmt(api8)} / {_fmt(cpu_floor)}",
    )
    plain = _med(results, "relay", "floor", "rows_per_s")
    windowed = _med(results, "raw", "rabbit_windowed")
    add(
        "plain relay rows/s / raw windowed-confirm publishes/s",
        _ratio(plain, windowed),
        f"{_fmt(plain)} / {_fmt(windowed)}; the relay target is 0.5",
    )
    for n in (1, 2):
        relay = _med(results, "relay", f"relays_{n}", "rows_per_s")
        add(
            f"relay rows/s ({n} relay) / plain relay rows/s",
            _ratio(relay, plain),
            f"{_fmt(relay)} / {_fmt(plain)}",
        )
    return rows


def _cut(burst: dict[str, Any]) -> str:
    if not burst.get("cut_off"):
        return ""
    return (
        f"cut off with {burst.get('arrived')}/{burst.get('n', 0) + burst.get('missing', 0)} in: >= "
    )


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if digits or abs(value) >= 10 else f"{value:,.2f}"
    return str(value)


def _spread(node: Any, digits: int = 0) -> str:
    if isinstance(node, dict) and "median" in node:
        return (
            f"{_fmt(node['median'], digits)} "
            f"({_fmt(node['min'], digits)}-{_fmt(node['max'], digits)})"
        )
    return _fmt(node, digits)


def markdown(results: dict[str, Any]) -> str:  # noqa: PLR0912
    lines = [
        "## Measurements (median (min-max) of the runs)",
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    raw = results.get("raw", {})
    for key, node in raw.items():
        lines.append(f"| raw {key} ({node.get('unit', '')}) | {_spread(node)} |")
    for key, node in results.get("api", {}).items():
        if not isinstance(node, dict):
            lines.append(f"| api {key} | {_fmt(node)} |")
            continue
        parts = [
            f"{k} {_spread(v, 1 if 'ms' in k else 0)}"
            for k, v in node.items()
            if isinstance(v, dict) and k != "cpu"
        ]
        lines.append(f"| api {key} | {'; '.join(parts)} |")
    for section in ("relay", "worker"):
        for key, node in results.get(section, {}).items():
            if isinstance(node, dict):
                parts = [f"{k} {_spread(v)}" for k, v in node.items() if k != "cpu"]
                lines.append(f"| {section} {key} | {'; '.join(parts)} |")
    for who in ("pipeline", "celery"):
        for key, node in results.get(who, {}).items():
            if isinstance(node, dict) and ("p99_ms" in node):
                lines.append(
                    f"| {who} {key} | n {node.get('n')}, p50 {_fmt(node.get('p50_ms'), 1)} ms, "
                    f"p99 {_fmt(node.get('p99_ms'), 1)} ms, max {_fmt(node.get('max_ms'), 1)} ms"
                    f", early {node.get('early')}, missing {node.get('missing')}"
                    + (
                        f", last {_fmt(node.get('last_after_send_at_s'), 2)} s"
                        if "last_after_send_at_s" in node
                        else ""
                    )
                    + (
                        f"; MariaDB commit probe p99 {_fmt(node['db_commit'].get('p99_ms'), 1)} ms,"
                        f" max {_fmt(node['db_commit'].get('max_ms'), 1)} ms,"
                        f" {len(node['db_commit']['stalls'])} held over 50 ms"
                        f" ({_fmt(node['db_commit'].get('stalled_s'), 2)} s in all)"
                        if "db_commit" in node
                        else ""
                    )
                    + " |"
                )
        if who == "celery" and "rss" in results.get(who, {}):
            rss = results[who]["rss"]
            lines.append(
                f"| celery worker RSS, none / {rss['scheduled']} ETA tasks published "
                f"({rss.get('held_by_worker', '?')} taken in by the worker) | "
                f"{rss['none']} / {rss['scheduled_kib']} KiB (apply_async "
                f"{_fmt(rss['apply_async_per_s'])}/s) |"
            )
    scale = results.get("scale", {})
    for key in ("poll_none", "poll_future", "poll_future_open_tx", "poll_future_after_purge"):
        if key in scale:
            full = scale[key].get("full_scan_median_ms")
            lines.append(
                f"| empty poll {key} (ms) | median {_spread(scale[key]['median_ms'], 3)}; "
                f"p99 {_spread(scale[key]['p99_ms'], 3)}"
                + (f"; full scan (every 5 s) {_spread(full, 3)}" if full else "")
                + " |"
            )
    if "rss" in scale:
        lines.append(
            f"| RSS KiB, none / {scale['rss']['scheduled']} scheduled | "
            f"{scale['rss']['none_kib']} / {scale['rss']['scheduled_kib']} |"
        )
    lines += cpu_table(results)
    lines += [
        "",
        "## Targets (ratios from this run)",
        "",
        "| figure | measured | target | |",
        "| --- | --- | --- | --- |",
    ]
    for row in results.get("targets", []):
        mark = {True: "met", False: "NOT met", None: "not measured"}[row["met"]]
        detail = f" ({row['detail']})" if row["detail"] else ""
        lines.append(
            f"| {row['figure']} | {_fmt(row['value'], 2)}{detail} | {row['target']} | {mark} |"
        )
    floors = [row for row in results.get("ceilings", []) if row["value"] is not None]
    if floors:
        lines += [
            "",
            "## What the guarantees and the parts leave (floors from the same run)",
            "",
            "| figure | measured |",
            "| --- | --- |",
        ]
        lines += [f"| {r['figure']} | {_fmt(r['value'], 2)} ({r['detail']}) |" for r in floors]
    return "\n".join(lines)


# (section, key, rate field, what an item is) of every measurement with a CPU account
_CPU_ROWS = (
    ("raw", "mysql_tx_1", None, "transaction"),
    ("raw", "mysql_tx_8", None, "transaction"),
    ("raw", "mysql_100_8", None, "email"),
    ("raw", "rabbit_windowed", None, "message"),
    ("raw", "smtp_1conn", None, "message"),
    ("raw", "smtp_2conn", None, "message"),
    ("raw", "smtp_recorded_1conn", None, "message"),
    ("raw", "smtp_recorded_2conn", None, "message"),
    ("api", "healthz_c1", "req_per_s", "request"),
    ("api", "healthz_c8", "req_per_s", "request"),
    ("api", "create_c1", "req_per_s", "create"),
    ("api", "create_c8", "req_per_s", "create"),
    ("api", "batch100_c8", "emails_per_s", "email"),
    ("relay", "floor", "rows_per_s", "row"),
    ("relay", "relays_1", "rows_per_s", "row"),
    ("relay", "relays_2", "rows_per_s", "row"),
    ("worker", "workers_1", "deliveries_per_s", "email"),
    ("worker", "workers_2", "deliveries_per_s", "email"),
)
_OURS = ("client", "api", "relay", "worker")  # whichever the measurement ran
_OTHERS = ("mariadb", "broker", "sink", "bench")


def cpu_table(results: dict[str, Any]) -> list[str]:
    """Where the CPU went, per item: the measured process (the raw client, or ours),
    MariaDB, RabbitMQ, the sink's thread and the rest of the bench process; and how many
    cores' worth that was at the measured rate (on 2 cores, near 2 means CPU-bound)."""
    lines = [
        "",
        "## Where the CPU went (us per item, median of the runs)",
        "",
        "| measurement | measured process | mariadb | broker | sink | bench | total | cores busy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for section, key, field, item in _CPU_ROWS:
        node = _get(results, section, key)
        cpu = node.get("cpu") if isinstance(node, dict) else None
        if not isinstance(cpu, dict):
            continue
        rate = _med(results, section, key, field) if field else _med(results, section, key)
        ours = next((name for name in _OURS if name in cpu), None)
        cells = [f"{ours} {_fmt(cpu[ours]['median'])}" if ours else "-"]
        cells += [_fmt(cpu[name]["median"]) if name in cpu else "-" for name in _OTHERS]
        total = cpu.get("total")
        busy = rate * total / 1e6 if rate is not None and total else None
        lines.append(
            f"| {section} {key} (per {item}) | {' | '.join(cells)} | {_fmt(total)} "
            f"| {_fmt(busy, 2)} |"
        )
    return lines if len(lines) > 5 else []


def write(results: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    return path
