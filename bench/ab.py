"""Alternated A/B runs of ``bench/throughput.py``: two revisions, or two environments, side by side.

    python bench/ab.py --rev HEAD~1 --rev HEAD [--rounds 3] -- --signals 3000 --broker kafka
    python bench/ab.py --env EXECUTION_AGENT_BATCH_WITHIN=0.002 --env EXECUTION_AGENT_BATCH_WITHIN=0.01

This machine's figures move by a quarter from one run to the next (other work, the load the
previous run left), so a change is judged by runs alternated A, B, A, B, ... on the same
hour, never by one run against an old figure.  Each run is a fresh ``throughput.py``
process (its own stack) with the arguments after ``--``; with ``--rev`` it runs the code of
that revision, checked out into a temporary git worktree and put first on ``PYTHONPATH``
(the services it starts import the same tree).  Prints each run's figures (end-to-end
signals/s, the worker's and the whole stack's CPU ms per signal, the load average) as it
ends, then the median of each side and the ratio B / A.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The figures read from throughput.py's output: name -> (pattern, unit).
FIGURES = {
    "signals/s": (re.compile(r"end to end NATS -> FILLED order \+ position:\s+([\d.]+) signals/s"), "signals/s"),
    "worker ms/signal": (re.compile(r"^\s+worker-1\s+([\d.]+) ms/signal", re.M), "ms"),
    "bridge ms/signal": (re.compile(r"^\s+bridge\s+([\d.]+) ms/signal", re.M), "ms"),
    "broker ms/signal": (re.compile(r"^\s+(?:kafka|tansu)\s+([\d.]+) ms/signal", re.M), "ms"),
    "stack ms/signal": (re.compile(r"^\s+all\s+([\d.]+) ms/signal", re.M), "ms"),
}
LOAD = re.compile(r"load average \(1 min\) ([\d.]+) at the start, ([\d.]+) at the end")


@dataclass
class Side:
    """One side of the comparison: a label, the tree it runs from, the environment it adds."""

    label: str
    tree: Path
    env: dict[str, str] = field(default_factory=dict)
    runs: list[dict[str, float]] = field(default_factory=list)


def parse(output: str) -> dict[str, float]:
    """The figures of one throughput.py run (a missing one is left out)."""
    out = {}
    for name, (pattern, _) in FIGURES.items():
        m = pattern.search(output)
        if m:
            out[name] = float(m.group(1))
    m = LOAD.search(output)
    if m:
        out["load at start"] = float(m.group(1))
    return out


def run_once(side: Side, args: list[str]) -> dict[str, float]:
    env = {**os.environ, **side.env, "PYTHONPATH": os.pathsep.join(
        [str(side.tree), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, str(side.tree / "bench" / "throughput.py"), *args], env=env,
                          cwd=side.tree, capture_output=True, text=True)
    figures = parse(proc.stdout)
    if proc.returncode != 0 or "signals/s" not in figures:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise RuntimeError(f"{side.label}: throughput.py failed (exit {proc.returncode}):\n{tail}")
    return figures


def summary(a: Side, b: Side) -> list[str]:
    """The median of each side's runs, and the ratio B / A."""
    lines = [f"  {'figure':<18} {'A median':>10} {'B median':>10} {'B / A':>7}"]
    for name in FIGURES:
        va = [r[name] for r in a.runs if name in r]
        vb = [r[name] for r in b.runs if name in r]
        if va and vb:
            ma, mb = statistics.median(va), statistics.median(vb)
            lines.append(f"  {name:<18} {ma:10.2f} {mb:10.2f} {mb / ma:7.2f}")
    return lines


def sides(args: argparse.Namespace, workdir: Path) -> tuple[Side, Side]:
    if args.rev:
        made = []
        for rev in args.rev:
            tree = workdir / f"tree-{len(made)}"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
            made.append(Side(f"{rev}", tree))
        return made[0], made[1]
    if not all("=" in e for e in args.env):
        raise SystemExit("--env takes NAME=VALUE")
    a, b = (dict([e.split("=", 1)]) for e in args.env)
    return Side(args.env[0], ROOT, a), Side(args.env[1], ROOT, b)


def main(argv: list[str] | None = None) -> tuple[Side, Side]:
    argv = sys.argv[1:] if argv is None else argv
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--rev", action="append", help="a git revision: give two (A, then B)")
    group.add_argument("--env", action="append", help="NAME=VALUE for one side's runs: give two (A, then B)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of A then B")
    args = ap.parse_args(ours)
    given = args.rev or args.env
    if len(given) != 2:
        ap.error("give --rev or --env exactly twice (A, then B)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    a, b = sides(args, workdir)
    try:
        print(f"A: {a.label}   B: {b.label}   throughput.py {' '.join(theirs)}; {args.rounds} rounds, alternated", flush=True)
        for n in range(1, args.rounds + 1):
            for side, name in ((a, "A"), (b, "B")):
                r = run_once(side, theirs)
                side.runs.append(r)
                print(f"  round {n} {name}: " + ", ".join(f"{k} {v:g}" for k, v in r.items()), flush=True)
        print("\n".join(summary(a, b)))
        print(f"machine: {os.cpu_count()} CPUs (figures move with the load; judge by the medians and each round's pair)")
        return a, b
    finally:
        for side in (a, b):
            if side.tree != ROOT:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(side.tree)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
