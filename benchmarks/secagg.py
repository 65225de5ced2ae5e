"""SecAgg+ cost: per-round time and bytes with and without secure aggregation, embedded.

Digits MLP, K devices, no dropouts (the cost of the protocol itself), 1 local epoch; the
first round is a warm-up and not counted. "Time" is one process playing every part in
turn (simulation/secagg_sim.py), so it is the sum of all devices' work plus the server's,
not a deployment's wall clock. Bytes are the JSON messages and blobs as sent.

    PYTHONPATH=. python benchmarks/secagg.py [--clients 10 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _report import publish

from simulation.secagg_sim import SecAggFederation, SecAggSimOptions


def measure(clients: int, rounds: int, secure: bool) -> dict[str, float]:
    fed = SecAggFederation(SecAggSimOptions(clients=clients, secure=secure, drop_after=0.0))
    fed.round(1)  # warm-up
    outs = [fed.round(n) for n in range(2, rounds + 2)]
    assert all(o.failure is None for o in outs)
    return {
        "seconds": statistics.median(o.seconds for o in outs),
        "bytes_up": statistics.median(o.bytes_up for o in outs),
        "bytes_down": statistics.median(o.bytes_down for o in outs),
        "accuracy": outs[-1].accuracy,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    started = time.perf_counter()
    rows = []
    for k in args.clients:
        plain, secure = measure(k, args.rounds, False), measure(k, args.rounds, True)
        rows.append({"clients": k, "plain": plain, "secagg": secure})
    lines = [
        "| K | time plain (s) | time SecAgg+ (s) | up plain (KiB) | up SecAgg+ (KiB) | "
        "down plain (KiB) | down SecAgg+ (KiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, s = r["plain"], r["secagg"]
        lines.append(
            f"| {r['clients']} | {p['seconds']:.2f} | {s['seconds']:.2f} | "
            f"{p['bytes_up'] / 1024:.0f} | {s['bytes_up'] / 1024:.0f} | "
            f"{p['bytes_down'] / 1024:.0f} | {s['bytes_down'] / 1024:.0f} |"
        )
    lines += [
        "",
        "Per round, median of the measured rounds, one process for every party. Up: the "
        "masked vector is 4 bytes a parameter and incompressible (uniform in Z_2^32), where "
        "the plain fp32 delta compresses a little; keys, share boxes and reveals add "
        "O(K·degree) small messages. Down: the roster goes to every device (O(K²) in all).",
    ]
    text = "\n".join(lines)
    print(text)
    publish(
        "secagg",
        "## SecAgg+: cost per round (digits MLP, embedded, no dropouts)\n\n" + text,
        {"rounds": args.rounds, "rows": rows, "seconds": round(time.perf_counter() - started, 1)},
    )


if __name__ == "__main__":
    main()
