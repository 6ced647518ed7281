#!/usr/bin/env python3
"""cpushare.py: CPU time per transaction, by process kind, while a load runs.

  cpushare.py --postmaster PID --broker PID --seconds S --count-cmd CMD

Samples utime+stime (/proc/PID/stat) of the postmaster's children, the broker
and the pgbench processes twice, S seconds apart, runs CMD (a shell command
that prints a row count) at both points, and prints one line per process kind
with microseconds of CPU per counted row, plus the total.  Only processes
alive at both samples count (pgbench's backends live for the whole run).
"""
import argparse
import os
import subprocess
import time

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def children(ppid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == ppid:
                out.append(int(d))
        except OSError:
            pass
    return out


def by_name(name):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() == name:
                        out.append(int(d))
            except OSError:
                pass
    return out


def ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return None


def kind(pid, broker):
    if pid == broker:
        return "mosquitto"
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        with open(f"/proc/{pid}/cmdline") as f:
            cmd = f.read().replace("\0", " ").strip()
    except OSError:
        return None
    if comm == "pgbench":
        return "pgbench_client"
    if "pg_mqtt_emit worker" in cmd:
        return "mqtt_emit_worker"
    if cmd.startswith("postgres: ") and "[local]" in cmd:
        return "backends"
    if cmd.startswith("postgres: "):
        return cmd[len("postgres: "):].split()[0]
    return comm


def count(cmd):
    return int(subprocess.run(cmd, shell=True, check=True, capture_output=True,
                              text=True).stdout.strip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--postmaster", type=int, required=True)
    ap.add_argument("--broker", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--count-cmd", required=True)
    a = ap.parse_args()

    pids = children(a.postmaster) + [a.broker] + by_name("pgbench")
    kinds = {p: kind(p, a.broker) for p in pids}
    t0 = {p: ticks(p) for p in pids}
    c0 = count(a.count_cmd)
    time.sleep(a.seconds)
    t1 = {p: ticks(p) for p in pids}
    c1 = count(a.count_cmd)
    n = max(c1 - c0, 1)
    per = {}
    for p in pids:
        if kinds[p] and t0[p] is not None and t1[p] is not None:
            per[kinds[p]] = per.get(kinds[p], 0) + (t1[p] - t0[p]) * TICK_US
    total = sum(per.values())
    print(f"rows {n} in {a.seconds:.0f}s")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
        if v > 0:
            print(f"{k}: {v / n:.0f} us/row")
    print(f"total: {total / n:.0f} us/row")


if __name__ == "__main__":
    main()
