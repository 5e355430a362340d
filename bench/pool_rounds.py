#!/usr/bin/env python3
"""Pools the rounds of several bench/proxy.sh runs (issue 3).

Each file is one run's output with a first line `# columns: sidecar=LABEL alt1=LABEL …` naming
what ran in each column after nginx (the same label in several files is the same setting).
Each round's requests/s and p99 are taken against nginx's run of the same round; the ratios of
every round with a label are pooled, per sidecar role (runs with other roles are kept apart),
and their median is given with a 95 % bootstrap interval (`interval`, which bench/proxy.sh
uses too). Pairs of labels that ran in the same rounds are also compared head to head.

    python3 bench/pool_rounds.py bench/results/2026-12-08-yield/*.log
"""
import random
import re
import statistics
import sys

ROUND = re.compile(r"([\d.]+) req/s p99 ([\d.]+) ms")


def interval(xs):
    """The median of `xs` and a 95 % bootstrap interval of it (also bench/proxy.sh's)."""
    random.seed(7)
    meds = sorted(statistics.median(random.choices(xs, k=len(xs))) for _ in range(4000))
    return statistics.median(xs), meds[100], meds[3899]


def main(paths):
    vs_nginx, head_to_head = {}, {}
    for path in paths:
        lines = open(path).read().splitlines()
        if not lines or not lines[0].startswith("# columns:"):
            sys.exit(f"{path}: the first line must be '# columns: sidecar=LABEL …'")
        labels = [c.split("=", 1)[1] for c in lines[0].split(":", 1)[1].split() if "=" in c]
        role = next((m.group(1) for l in lines if (m := re.search(r"sidecar role (\w+)", l))), "?")
        for line in lines:
            if not line.strip().startswith("run "):
                continue
            cols = [(float(r), float(p)) for r, p in ROUND.findall(line)]
            if len(cols) != 1 + len(labels):
                sys.exit(f"{path}: a round has {len(cols)} columns, the header names {1 + len(labels)}")
            (nr, np_), runs = cols[0], dict(zip(labels, cols[1:]))
            for label, (r, p) in runs.items():
                vs_nginx.setdefault((role, label), []).append((r / nr, p / np_, path))
            for a in sorted(runs):
                for b in sorted(runs):
                    if a < b:
                        head_to_head.setdefault((role, a, b), []).append(runs[a][0] / runs[b][0])
    print("role       setting                 rounds (files)  requests/s vs nginx        ahead  p99 vs nginx               at or below")
    for (role, label), xs in sorted(vs_nginx.items()):
        r, p = interval([x[0] for x in xs]), interval([x[1] for x in xs])
        ahead = sum(x[0] >= 1 for x in xs)
        below = sum(x[1] <= 1 for x in xs)
        files = len({x[2] for x in xs})
        print(f"{role:10} {label:23} {len(xs):6} ({files})      {r[0]:.3f}x ({r[1]:.3f}-{r[2]:.3f})   "
              f"{ahead:5}  {p[0]:.3f}x ({p[1]:.3f}-{p[2]:.3f})   {below:5}")
    print("head to head, requests/s in the same rounds:")
    for (role, a, b), xs in sorted(head_to_head.items()):
        m, lo, hi = interval(xs)
        print(f"  {role:10} {a} / {b}: {m:.3f}x ({lo:.3f}-{hi:.3f}), {len(xs)} rounds")


if __name__ == "__main__":
    main(sys.argv[1:])
