#!/usr/bin/env python3
"""The tables of a bench/all.sh run (docs/benchmarks.md quotes them).

    bench/tables.py bench-results-<date>

Reads the JSON lines of each scenario's report in that folder (a1.txt,
a2.txt, a2-pushpin.txt, b.txt, c.txt, d.txt, e.txt; missing ones are
skipped) and prints one Markdown table per scenario, pushgate and each peer
side by side. A rate is "kept" when every message arrived (ratio >= 0.999)
and publishing took at most 5 % longer than asked, the same rule as
bench/broadcast.sh's SEARCH=1.
"""

import json
import sys
from pathlib import Path

NAMES = {
    "pushgate": "pushgate",
    "nchan": "Nchan",
    "pushpin": "Pushpin",
    "floor": "floor",
    "nginx": "nginx",
    "direct": "direct",
}
TRANSPORTS = {"sse": "SSE", "ws": "WebSocket", "poll": "long-poll", "pusher": "Pusher protocol"}
BARS_MS = (50, 250, 500, 1000)


def runs(folder, name):
    """The JSON lines of one report, or [] when it is not there."""
    path = folder / f"{name}.txt"
    if not path.exists():
        return []
    found = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.startswith("{"):
            continue
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError as err:
            sys.exit(f"{path}:{number}: not a JSON line of a run ({err})")
    return found


def name(table, key):
    """A server's or transport's name as the docs write it; any other as given
    (TARGETS=baseline, say)."""
    return table.get(key, key)


def kept(run):
    return run["delivery_ratio"] >= 0.999 and run["publish_secs"] <= run["duration"] * 1.05


def n(value, digits=0):
    return f"{value:,.{digits}f}"


def table(head, rows):
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print()


def by(runs_, *keys):
    groups = {}
    for run in runs_:
        groups.setdefault(tuple(run[key] for key in keys), []).append(run)
    return groups


def highest(runs_, bar_ms):
    """The run at the highest rate kept under the bar, or None."""
    good = [r for r in runs_ if kept(r) and r["latency_ms"]["p99"] <= bar_ms]
    return max(good, key=lambda r: r["rate"], default=None)


def broadcast_rates(runs_):
    """Every run of a rising-rate scenario, one row each."""
    rows = []
    for run in sorted(runs_, key=lambda r: (r["transport"], r["rate"], r["target"])):
        lat = run["latency_ms"]
        rows.append([
            name(TRANSPORTS, run["transport"]),
            name(NAMES, run["target"]),
            n(run["rate"]),
            n(run["deliveries_per_sec"]),
            f"{run['delivery_ratio']:.4f}",
            n(lat["p50"], 1),
            n(lat["p99"], 1),
            "yes" if kept(run) else f"no ({run['publish_secs']:.1f} s)",
            f"{run['server_cpu_us_per_delivery']:.1f}",
            f"{run['server_rss_idle_mib']:.1f} → {run['server_rss_load_mib']:.1f}",
        ])
    table(["transport", "server", "pub/s", "deliveries/s", "ratio", "p50 ms", "p99 ms",
           "rate kept", "CPU µs/delivery", "RSS MiB idle → load"], rows)


def broadcast_bars(runs_, bars):
    """Highest rate kept under each p99 bar, per transport and server."""
    rows = []
    for (transport, target), group in sorted(by(runs_, "transport", "target").items()):
        cells = []
        for bar in bars:
            best = highest(group, bar)
            cells.append("none" if best is None else
                         f"{n(best['rate'])}/s ({n(best['deliveries_per_sec'])})")
        rows.append([name(TRANSPORTS, transport), name(NAMES, target), *cells])
    table(["transport", "server", *[f"p99 ≤ {bar} ms: rate (deliveries/s)" for bar in bars]],
          rows)


def idle_memory(runs_):
    """RSS at each connection count and, given two counts, the slope between
    them: what one more connection costs, the server's own footprint left
    out (a peer's RSS over its connections flatters no one that way)."""
    rows = []
    for (transport, target), group in sorted(by(runs_, "transport", "target").items()):
        group.sort(key=lambda r: r["connected"])
        low, high = group[0], group[-1]
        slope = "-"
        if high["connected"] > low["connected"]:
            grown = high["server_rss_idle_mib"] - low["server_rss_idle_mib"]
            slope = f"{grown * 1024 / (high['connected'] - low['connected']):.1f}"
        rows.append([
            name(TRANSPORTS, transport),
            name(NAMES, target),
            " / ".join(f"{r['server_rss_idle_mib']:.1f}" for r in group),
            " / ".join(n(r["connected"]) for r in group),
            f"{high['server_rss_idle_mib'] * 1024 / high['connected']:.1f}",
            slope,
            " / ".join(f"{r['delivery_ratio']:.4f}" for r in group),
        ])
    table(["transport", "server", "RSS idle MiB", "at connections",
           "KiB per connection (RSS / connections)", "KiB per added connection (slope)",
           "ratio"], rows)


def connects(runs_):
    rows = []
    for run in sorted(runs_, key=lambda r: (r["transport"], r["concurrency"], r["users"],
                                            r["label"] or "", r["target"])):
        lat = run["latency_ms"]
        rows.append([
            name(TRANSPORTS, run["transport"]),
            name(NAMES, run["target"]),
            run["label"] or "-",
            run["users"],
            n(run["concurrency"]),
            n(run["connects_per_sec"]),
            n(lat["p50"], 1),
            n(lat["p99"], 1),
            n(run["failed"]),
        ])
    table(["transport", "server", "auth answers", "users", "concurrency", "connects/s", "p50 ms", "p99 ms",
           "failed"], rows)


def passthrough(folder):
    """The medians block bench/passthrough.sh prints at the end."""
    path = folder / "e.txt"
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("median of")), None)
    if start is None:
        return
    rows = []
    for line in lines[start + 1:]:
        fields = line.split()
        if len(fields) != 6 or not fields[0].isdigit():
            continue
        conns, target, rps, p50, p99, cpu = fields
        rows.append([conns, name(NAMES, target), n(float(rps)), p50, p99, cpu])
    print("### Scenario e: pass-through\n")
    print(lines[start] + "\n")
    table(["connections", "target", "req/s", "p50 ms", "p99 ms", "CPU µs/request"], rows)


def main():
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    a1 = runs(folder, "a1")
    if a1:
        print("### Scenario a: 1,000 subscribers on one channel, rising rates\n")
        # The search stops a server at its first failure: only its own bar.
        broadcast_bars(a1, BARS_MS[:1])
        broadcast_rates(a1)
    a2 = runs(folder, "a2") + runs(folder, "a2-pushpin")
    if a2:
        print("### Scenario a: 9,900 subscribers on one channel\n")
        broadcast_bars(a2, BARS_MS)
        broadcast_rates(a2)
    b = runs(folder, "b")
    if b:
        print("### Scenario b: 10,000 subscribers on 10,000 channels\n")
        broadcast_rates(b)
    c = runs(folder, "c")
    if c:
        print("### Scenario c: idle connections\n")
        idle_memory(c)
    d = runs(folder, "d")
    if d:
        print("### Scenario d: connects per second\n")
        connects(d)
    passthrough(folder)


if __name__ == "__main__":
    main()
