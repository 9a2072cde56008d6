"""Time to accuracy per algorithm on an emulated slow cluster (network namespaces + tbf).

    python -m benchmarks.cluster --nodes 2 --rates 100            # all algorithms, 10 epochs
    python -m benchmarks.cluster --nodes 2,4 --rates 100,1000 --rounds 3
    python -m benchmarks.cluster --quick                          # smoke run, well under a minute

For every node count and link rate, :class:`benchmarks.netns.Cluster` makes N "nodes" (network
namespaces on one bridge, each node's link shaped to the rate by ``tbf``, both directions). On
them one ``python -m launch`` agent per node (c10d rendezvous on node 0) runs the same training
for every algorithm — ``recipes.mnist --dataset digits`` (LeNet), same seed, same epochs, the
recipe's defaults — and the benchmark reads the recipe's ``--results`` JSON (final accuracy,
training time, ``comm_bytes``, syncs, and the accuracy after every epoch against training time)
and the nodes' link counters (bytes actually sent). A ``local`` run (CPSGD with a period longer
than the run: no exchange but the evaluations' averages) gives the compute time per step that
``benchmarks.costmodel --check`` needs.

Rounds are interleaved (every configuration once per round) and medians are reported, so a
drift of the machine's load hits every algorithm alike. Output: a ``rich`` table, and under
``--out``: ``results.json`` (written after every run), ``results.md`` and ``accuracy.png``.
Needs root, ``ip`` and ``tc``; refuses with one line (exit status 2) otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import commhooks

from .netns import EXIT_UNAVAILABLE, Cluster, NetnsUnavailable, check_available

REPO = Path(__file__).resolve().parents[1]
LOCAL = "local"  # the no-exchange baseline's label
_LOCAL_ARGS = ["--algo", "cpsgd", "--period", str(10**9)]
_BASE_PORT = 29600


@dataclass(kw_only=True)
class Spec:
    """One training configuration: a label and the recipe arguments after the common ones."""

    label: str
    recipe_args: list[str]

    @property
    def algo(self) -> str:
        return self.recipe_args[self.recipe_args.index("--algo") + 1]


@dataclass(kw_only=True)
class RunResult:
    """What one training run on the emulated cluster gave (``error`` set when it failed)."""

    label: str
    algo: str
    nodes: int
    ranks_per_node: int
    rate_mbit: float
    round: int
    command: str
    wall_s: float = 0.0  # agents' start to their end (start-up and rendezvous included)
    train_s: float | None = None  # the recipe's training time (first step to the end)
    val_acc: float | None = None
    steps: int | None = None
    syncs: float | None = None
    comm_bytes: float | None = None  # the recipe's: bytes rank 0 handed to collectives / sends
    wire_tx_bytes_per_node: float | None = None  # the links' counters: frames each node sent
    time_to_target_s: float | None = None
    evals: list[dict[str, float]] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# The command line


def _float_list(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=_int_list, default=[2, 4], help="node counts (2,4)")
    p.add_argument("--ranks-per-node", type=int, default=1, help="(1)")
    p.add_argument("--rates", type=_float_list, default=[100.0, 1000.0],
                   help="tbf rate of each node's link, Mbit/s (100,1000)")
    p.add_argument("--algos", default=",".join(commhooks.ALGORITHMS),
                   help="comma-separated (default: every algorithm)")
    p.add_argument("--variant", action="append", default=[], metavar='"ALGO --flag value ..."',
                   help='an extra run with recipe flags, e.g. "dpsgd --log-every 0" (repeatable)')
    p.add_argument("--no-local", dest="local", action="store_false",
                   help="skip the no-exchange baseline run (compute time per step)")
    p.add_argument("--epochs", type=int, default=10, help="(10)")
    p.add_argument("--max-steps", type=int, default=None, help="stop every run early (smoke runs)")
    p.add_argument("--seed", type=int, default=0, help="(0)")
    p.add_argument("--target", type=float, default=0.98, help="validation accuracy to reach (0.98)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians reported (1)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP threads per rank (default: the CPU count over all ranks, at least 1)")
    p.add_argument("--run-timeout", type=float, default=900.0, help="seconds per training run (900)")
    p.add_argument("--out", default="benchmarks-out/cluster", help="results folder")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 nodes, 1000 Mbit/s, ssgd and cpsgd, 12 steps, no baseline")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.rates, args.algos, args.variant = [2], [1000.0], "ssgd,cpsgd", []
        args.epochs, args.max_steps, args.local, args.rounds = 1, 12, False, 1
    for name in ("nodes", "rates"):
        values = getattr(args, name)
        if not values or min(values) <= 0:
            parser.error(f"--{name} must be positive numbers, got {values}")
    if max(args.nodes) * args.ranks_per_node > 64 or args.ranks_per_node < 1:
        parser.error("--ranks-per-node must be >= 1 and nodes x ranks at most 64")
    if args.rounds < 1 or args.epochs < 1:
        parser.error("--rounds and --epochs must be >= 1")
    if not 0 < args.target <= 1:
        parser.error(f"--target must be an accuracy in (0, 1], got {args.target}")
    unknown = [a for a in args.algos.split(",") if a and a not in commhooks.ALGORITHMS]
    if unknown:
        parser.error(f"--algos: unknown {unknown}; choose from {list(commhooks.ALGORITHMS)}")
    for v in args.variant:
        words = shlex.split(v)
        if not words or words[0] not in commhooks.ALGORITHMS:
            parser.error(f"--variant {v!r} must start with an algorithm from {list(commhooks.ALGORITHMS)}")
    return args


def specs(args: argparse.Namespace) -> list[Spec]:
    """Every configuration each round runs, the baseline first."""
    out = [Spec(label=LOCAL, recipe_args=list(_LOCAL_ARGS))] if args.local else []
    out += [Spec(label=a, recipe_args=["--algo", a]) for a in args.algos.split(",") if a]
    for v in args.variant:
        algo, *flags = shlex.split(v)
        out.append(Spec(label=" ".join([algo, *flags]), recipe_args=["--algo", algo, *flags]))
    return out


# ---------------------------------------------------------------------------------------------
# One training run


def _agent_env(net: Cluster, threads: int) -> dict[str, str]:
    # A parent torchrun's variables would make the agents join the wrong job.
    drop = ("PET_", "MASTER_", "TORCHELASTIC_")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(drop) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["GLOO_SOCKET_IFNAME"] = net.ifname  # else gloo takes the shared hostname's loopback
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = "5"
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def agent_command(net: Cluster, node: int, *, port: int, run_id: str, ranks_per_node: int,
                  program: list[str]) -> list[str]:
    """The ``python -m launch`` command of node ``node`` (c10d rendezvous on node 0).

    ``program`` is what torchrun runs, e.g. ``["-m", "recipes.mnist", "--algo", "ssgd"]``.
    """
    n = net.n
    return [
        sys.executable, "-m", "launch", "--nnodes", f"{n}:{n}", "--nproc-per-node", str(ranks_per_node),
        "--max-restarts", "0", "--rdzv-endpoint", f"{net.addrs[0]}:{port}", "--rdzv-id", run_id,
        # The rendezvous host's detection compares host-level addresses and misses a namespace's.
        *(["--rdzv-conf", "is_host=1"] if node == 0 else []),
        # Every namespace shares one hostname: each agent announces its own address.
        "--local-addr", net.addrs[node],
        *program,
    ]


@dataclass(kw_only=True)
class Job:
    """How one multi-node job ended: its wall time, the last node's command, an error or None."""

    wall_s: float
    command: str
    error: str | None


def run_job(net: Cluster, program: list[str], *, ranks_per_node: int, threads: int | None,
            timeout: float, index: int, log_dir: Path) -> Job:
    """Run ``program`` under one launcher agent per node and wait (at most ``timeout`` seconds).

    The nodes' output goes to ``log_dir/node<i>.log``; on a failure the error carries their tails.
    ``index`` makes the rendezvous id and port unique among the jobs of this process.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, (os.cpu_count() or 1) // (net.n * ranks_per_node))
    env = _agent_env(net, threads)
    run_id = f"bench{os.getpid()}r{index}"
    port = _BASE_PORT + index % 1000  # a fresh port per job: no wait on the last job's sockets
    commands = [agent_command(net, i, port=port, run_id=run_id, ranks_per_node=ranks_per_node,
                              program=program) for i in range(net.n)]
    logs = [log_dir / f"node{i}.log" for i in range(net.n)]
    start = time.perf_counter()
    agents = []
    for i, cmd in enumerate(commands):
        with logs[i].open("w") as log:  # the child keeps its own descriptor
            agents.append(net.popen(i, cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    error = None
    try:
        for agent in agents:
            agent.wait(timeout=max(1.0, start + timeout - time.perf_counter()))
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout:.0f} s"
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)  # the agent's own session (net.popen)
                agent.wait(timeout=10)
    wall = time.perf_counter() - start
    codes = [a.returncode for a in agents]
    if error is None and any(codes):
        error = f"agents exited with {codes}"
    if error is not None:
        tail = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs)
        error += f" (logs in {log_dir})\n{tail}"
    return Job(wall_s=wall, command=shlex.join(commands[-1]), error=error)


def _total_tx(net: Cluster) -> int:
    return sum(net.counters(i)["tx_bytes"] for i in range(net.n))


def time_to_target(evals: list[dict[str, float]], target: float) -> float | None:
    """Training seconds at the first evaluation whose accuracy reaches ``target`` (None: never)."""
    for e in evals:
        if e["val_acc"] >= target:
            return e["seconds"]
    return None


def run_once(net: Cluster, spec: Spec, *, args: argparse.Namespace, rnd: int, index: int,
             run_dir: Path) -> RunResult:
    """Train ``spec`` once on ``net``; a failure is recorded (with the logs' tails), not raised."""
    run_dir.mkdir(parents=True, exist_ok=True)
    results = run_dir / "results.json"
    results.unlink(missing_ok=True)
    program = ["-m", "recipes.mnist", *spec.recipe_args, "--dataset", "digits",
               "--epochs", str(args.epochs), "--seed", str(args.seed), "--results", str(results),
               "--logdir", str(run_dir / "tb"),
               *(["--max-steps", str(args.max_steps)] if args.max_steps else [])]
    tx_before = _total_tx(net)
    job = run_job(net, program, ranks_per_node=args.ranks_per_node, threads=args.threads,
                  timeout=args.run_timeout, index=index, log_dir=run_dir)
    out = RunResult(label=spec.label, algo=spec.algo, nodes=net.n, ranks_per_node=args.ranks_per_node,
                    rate_mbit=net.rate_mbit or 0.0, round=rnd, command=job.command, wall_s=job.wall_s,
                    wire_tx_bytes_per_node=(_total_tx(net) - tx_before) / net.n, error=job.error)
    if out.error is None and not results.exists():
        out.error = f"the recipe wrote no results file (logs in {run_dir})"
    if out.error is not None:
        return out
    r = json.loads(results.read_text())
    out.train_s, out.val_acc, out.steps = r["train_seconds"], r["val_acc"], r["steps"]
    out.syncs, out.comm_bytes = r.get("syncs"), r.get("comm_bytes")
    out.evals, out.hparams = r.get("evals", []), r.get("hparams", {})
    out.time_to_target_s = time_to_target(out.evals, args.target)
    return out


# ---------------------------------------------------------------------------------------------
# Summaries


def _median(values: list[float | None]) -> float | None:
    """Median of the values, None if any is None (e.g. a round that never reached the target)."""
    present = [v for v in values if v is not None]
    if not values or len(present) < len(values):
        return None
    return float(statistics.median(present))


def summarize(runs: list[RunResult]) -> list[dict[str, Any]]:
    """One row per (nodes, rate, label): medians over rounds, speed-ups over SSGD's medians."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.nodes, r.ranks_per_node, r.rate_mbit, r.label), []).append(r)
    rows = []
    for (nodes, rpn, rate, label), rs in groups.items():
        ok = [r for r in rs if r.error is None]
        row: dict[str, Any] = {
            "nodes": nodes, "ranks_per_node": rpn, "rate_mbit": rate, "label": label,
            "algo": rs[0].algo, "rounds": len(ok), "failed": len(rs) - len(ok)}
        for key in ("train_s", "val_acc", "time_to_target_s", "steps", "syncs", "comm_bytes",
                    "wire_tx_bytes_per_node", "wall_s"):
            row[key] = _median([getattr(r, key) for r in ok])
        if ok:  # the accuracy curve of the round with the median training time
            mid = sorted(ok, key=lambda r: r.train_s or 0.0)[(len(ok) - 1) // 2]
            row["evals"], row["hparams"] = mid.evals, mid.hparams
        rows.append(row)
    for row in rows:
        ssgd = next((s for s in rows if s["label"] == "ssgd" and s["nodes"] == row["nodes"]
                     and s["ranks_per_node"] == row["ranks_per_node"]
                     and s["rate_mbit"] == row["rate_mbit"]), None)
        row["speedup_same_epochs"] = _ratio(ssgd["train_s"] if ssgd else None, row["train_s"])
        row["speedup_to_target"] = _ratio(ssgd["time_to_target_s"] if ssgd else None, row["time_to_target_s"])
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


COLUMNS = [  # (header, row key, format)
    ("nodes", "nodes", "{:.0f}"), ("Mbit/s", "rate_mbit", "{:g}"), ("algorithm", "label", "{}"),
    ("val acc", "val_acc", "{:.4f}"), ("train s", "train_s", "{:.1f}"),
    ("to target s", "time_to_target_s", "{:.1f}"),
    ("vs SSGD same epochs", "speedup_same_epochs", "{:.2f}"),
    ("vs SSGD to target", "speedup_to_target", "{:.2f}"),
    ("wire MB/node", "wire_tx_bytes_per_node", "{:.1f}"), ("comm MB", "comm_bytes", "{:.1f}"),
    ("syncs", "syncs", "{:.0f}"), ("steps", "steps", "{:.0f}"),
]
_MB_KEYS = ("wire_tx_bytes_per_node", "comm_bytes")


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "failed" if key == "train_s" and row.get("failed") else "-"
    return fmt.format(v / 1e6 if key in _MB_KEYS else v)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = [c[0] for c in COLUMNS]
    title = (f"Emulated cluster, {meta['workload']}; target {meta['target']:.0%}; medians of "
             f"{meta['rounds']} round(s); {meta['date']}; `{meta['command']}`")
    lines = [title, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, k, f) for _, k, f in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{meta['workload']}, target {meta['target']:.0%}, medians of {meta['rounds']} round(s)")
    for header, key, _ in COLUMNS:
        table.add_column(header, justify="left" if key == "label" else "right")
    for row in rows:
        table.add_row(*(_cell(row, k, f) for _, k, f in COLUMNS))
    console = Console()
    if not console.is_terminal:  # a log file: do not squeeze the columns into 80 characters
        console = Console(width=200)
    console.print(table)


def plot(rows: list[dict[str, Any]], target: float, path: Path) -> str | None:
    """Validation accuracy against training time, one line per algorithm, one panel per
    (nodes, rate). Returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no PNG: matplotlib is not installed (pip install 'commhooks[bench]')"
    panels = sorted({(r["nodes"], r["rate_mbit"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (nodes, rate) in zip(axes[0], panels, strict=True):
        mine = [r for r in rows if (r["nodes"], r["rate_mbit"]) == (nodes, rate) and r.get("evals")
                and r["label"] != LOCAL]  # the baseline's replicas never agree: not a training
        for i, row in enumerate(mine):
            ax.plot([e["seconds"] for e in row["evals"]], [e["val_acc"] for e in row["evals"]],
                    marker=".", linestyle="-" if i < 10 else "--", label=row["label"])
        ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylim(bottom=max(0.0, target - 0.1), top=1.005)  # zoom on the approach to the target
        ax.set_title(f"{nodes} nodes, {rate:g} Mbit/s")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def model_bytes() -> int:
    """Bytes of the benchmark's model (LeNet on 1-channel 28x28 digits, 10 classes), float32."""
    from recipes.models import build_model

    return sum(p.numel() * p.element_size() for p in build_model("lenet", 1, 10, 1.0).parameters())


# ---------------------------------------------------------------------------------------------
# Main


def _write(out: Path, runs: list[RunResult], meta: dict[str, Any], final: bool) -> list[dict[str, Any]]:
    rows = summarize(runs)
    doc = {"meta": meta, "summary": rows, "runs": [asdict(r) for r in runs]}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, out / "results.json")
    if final:
        (out / "results.md").write_text(markdown(rows, meta))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refused = check_available("benchmarks.cluster")
    if refused is not None:
        return refused
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = specs(args)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks.cluster", *(sys.argv[1:] if argv is None else argv)]),
        "workload": (f"recipes.mnist --dataset digits (LeNet), {args.epochs} epochs"
                     + (f" (max {args.max_steps} steps)" if args.max_steps else "")
                     + f", seed {args.seed}, {args.ranks_per_node} rank(s) per node"),
        "target": args.target, "rounds": args.rounds, "epochs": args.epochs,
        "model_bytes": model_bytes(), "cpu_count": os.cpu_count(), "host_load": os.getloadavg(),
        "labels": [s.label for s in todo],
    }
    runs: list[RunResult] = []
    index = 0
    try:
        for rnd in range(args.rounds):
            for nodes in args.nodes:
                for rate in args.rates:
                    with Cluster(nodes, rate_mbit=rate, prefix="chb") as net:
                        for spec in todo:
                            tag = f"n{nodes}-{rate:g}mbit/{spec.label.replace(' ', '_')}/round{rnd}"
                            print(f"[cluster] round {rnd + 1}/{args.rounds}, {nodes} nodes at "
                                  f"{rate:g} Mbit/s: {spec.label}", file=sys.stderr, flush=True)
                            r = run_once(net, spec, args=args, rnd=rnd, index=index, run_dir=out / "runs" / tag)
                            index += 1
                            if r.error:
                                print(f"[cluster]   FAILED: {r.error}", file=sys.stderr, flush=True)
                            else:
                                wire = r.wire_tx_bytes_per_node
                                print(f"[cluster]   val acc {r.val_acc:.4f}, train {r.train_s:.1f} s, "
                                      f"wire {'?' if wire is None else f'{wire / 1e6:.1f}'} MB/node",
                                      file=sys.stderr, flush=True)
                            runs.append(r)
                            _write(out, runs, meta, final=False)
    except NetnsUnavailable as err:
        print(f"benchmarks.cluster: cannot run: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        print(f"benchmarks.cluster: interrupted; namespaces removed; {len(runs)} finished run(s) "
              f"in {out / 'results.json'}", file=sys.stderr)
        return 130
    rows = _write(out, runs, meta, final=True)
    print_table(rows, meta)
    why_no_png = plot(rows, args.target, out / "accuracy.png")
    print(why_no_png or f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'accuracy.png'}")
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
