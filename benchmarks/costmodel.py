"""Per-step time of each algorithm from compute time, model size, link bandwidth and latency.

    python -m benchmarks.costmodel                                   # predictions at scale
    python -m benchmarks.costmodel --check benchmarks-out/cluster/results.json

The closed forms (S model bytes, B payload bandwidth of a node's link in bytes/s, alpha the
latency of one message, N = nodes x ranks per node ranks in a ring, c compute seconds per step):

  all-reduce (ring)      AR = 2 (N-1)/N * S/B + 2 (N-1) alpha       (Patarasuk and Yuan, "Bandwidth
                         optimal all-reduce algorithms for clusters of workstations", JPDC 2009)
  pairwise exchange      X  = r * S/B + alpha: one model each way, both directions at once; r the
                         expected number of a node's ranks whose partner is on another node
  SSGD (DDP)             c (1-h) + max(c h, AR): the gradient all-reduce overlaps the share h of
                         the step that follows the first gradient bucket (the backward pass)
  CPSGD, period p        c + AR / p (the average waits for the step); with delay d (overlapped
                         averaging) c + max(0, AR - d c) / p: the average hides behind d steps.
                         DiLoCo and SlowMo as CPSGD (their outer step is local arithmetic)
  ADPSGD                 warm-up steps as SSGD, then c + AR / p_mean, p_mean its measured period
                         (Jiang and Agrawal, "Adaptive Periodic Averaging", arXiv:2007.06134);
                         with delay d, AR - d c in place of AR as for CPSGD
  DPSGD (random pairs)   c (1-h) + max(c h, X): the exchange starts at the first gradient bucket
                         (Lian et al., arXiv:1705.09056); the consensus estimate every log_every
                         steps moves kilobytes and is left out
  Elastic-SGD, period t  max(c, AR / t): the reference average overlaps the next steps
                         (Zhang, Choromanska and LeCun, arXiv:1412.6651)
  Parle, L inner steps   max(c, AR / L): one average per outer step, overlapped (Chaudhari et al.,
                         arXiv:1707.00424)
  Entropy-SGD, SSGD with noise: as SSGD (one replica: a gradient all-reduce every step)

Links are full duplex, so a ring's or a pair's two directions do not share the bandwidth. The
``--check`` mode takes ``benchmarks.cluster``'s results: c from its no-exchange ``local`` run,
the evaluations' averages (one all-reduce each, in every run whose replicas differ) added, and
prints predicted against measured training time (aim: within 15%).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# TCP/IPv4 with timestamps over Ethernet at MTU 1500: 1448 payload bytes per 1514-byte frame.
TCP_EFFICIENCY = 1448 / 1514
DEFAULT_HIDE = 0.5  # share of a step a communication started at the first gradient bucket can hide behind
DEFAULT_ALPHA_S = 50e-6
SYNCHRONOUS = ("ssgd", "ssgd-noise", "entropysgd")  # every replica identical: no average at eval
CHECK_TOLERANCE = 0.15


@dataclass(kw_only=True)
class Link:
    """A cluster's network as the cost model sees it.

    Args:
        nodes: number of nodes.
        ranks_per_node: ranks (GPUs) per node; intra-node links are taken as free.
        gbit: each node's link rate in Gbit/s (line rate).
        alpha_s: latency of one message, seconds.
        efficiency: share of the line rate carrying payload (headers).
    """

    nodes: int
    ranks_per_node: int = 1
    gbit: float
    alpha_s: float = DEFAULT_ALPHA_S
    efficiency: float = TCP_EFFICIENCY

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.ranks_per_node < 1:
            raise ValueError(f"nodes and ranks_per_node must be >= 1, got {self.nodes}, {self.ranks_per_node}")
        if not self.gbit > 0 or self.alpha_s < 0 or not 0 < self.efficiency <= 1:
            raise ValueError(f"gbit must be > 0, alpha_s >= 0, efficiency in (0, 1]; got "
                             f"{self.gbit}, {self.alpha_s}, {self.efficiency}")

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def bytes_per_s(self) -> float:
        return self.gbit * 1e9 / 8 * self.efficiency


def allreduce_s(model_bytes: float, link: Link) -> float:
    """Ring all-reduce: ``2(N-1)/N * S/B + 2(N-1) alpha``; 0 for one rank.

    With several ranks per node the ring enters and leaves each node once, so every node's link
    carries the ring's per-hop traffic; the N ranks set the ring's length.
    """
    n = link.ranks
    if n == 1:
        return 0.0
    return 2 * (n - 1) / n * model_bytes / link.bytes_per_s + 2 * (n - 1) * link.alpha_s


def pairwise_s(model_bytes: float, link: Link) -> float:
    """One gossip exchange with a random partner: ``r * S/B + alpha``.

    ``r = k (N-k)/(N-1)`` is the expected number of a node's k ranks whose partner lives on
    another node (1 with one rank per node); each sends one model out and takes one in.
    """
    n, k = link.ranks, link.ranks_per_node
    if n == 1:
        return 0.0
    crossing = k * (n - k) / (n - 1)
    return crossing * model_bytes / link.bytes_per_s + (link.alpha_s if crossing else 0.0)


def step_s(algo: str, *, compute_s: float, model_bytes: float, link: Link,
           hparams: dict[str, Any] | None = None, hide: float = DEFAULT_HIDE,
           mean_period: float | None = None, warmup_fraction: float = 0.0) -> float:
    """Mean seconds per training step of ``algo`` (see the module's docstring for each form).

    Args:
        algo: a name from ``commhooks.ALGORITHMS``, or ``local`` (no exchange at all).
        compute_s: forward + backward + optimizer seconds of one step, no communication.
        model_bytes: S, the bytes of the weights (= of the gradients).
        link: the network.
        hparams: the algorithm's (period, L); the library's defaults otherwise.
        hide: share of the step after the first gradient bucket (overlap for SSGD and DPSGD).
        mean_period: ADPSGD's mean period after warm-up (required for adpsgd).
        warmup_fraction: ADPSGD's share of the steps run as SSGD.
    """
    if compute_s < 0 or model_bytes < 0 or not 0 <= hide <= 1:
        raise ValueError(f"compute_s and model_bytes must be >= 0 and hide in [0, 1]; got "
                         f"{compute_s}, {model_bytes}, {hide}")
    hp = hparams or {}
    c = compute_s
    ar = allreduce_s(model_bytes, link)
    ssgd = c * (1 - hide) + max(c * hide, ar)
    if algo == "local":
        return c
    if algo in SYNCHRONOUS:
        return ssgd
    exposed = max(0.0, ar - int(hp.get("delay", 0)) * c)  # what d overlapped steps leave of the average
    if algo in ("cpsgd", "diloco", "slowmo"):
        return c + exposed / int(hp.get("period", 1))
    if algo == "adpsgd":
        if mean_period is None or not mean_period > 0:
            raise ValueError(f"mean_period must be > 0 for adpsgd, got {mean_period}")
        if not 0 <= warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}")
        return warmup_fraction * ssgd + (1 - warmup_fraction) * (c + exposed / mean_period)
    if algo == "dpsgd":
        return c * (1 - hide) + max(c * hide, pairwise_s(model_bytes, link))
    if algo == "easgd":
        return max(c, ar / int(hp.get("period", 1)))
    if algo == "parle":
        return max(c, ar / int(hp.get("L", 25)))
    raise ValueError(f"algo must be an algorithm name or 'local', got {algo!r}")


# ---------------------------------------------------------------------------------------------
# --check: against benchmarks.cluster's measurements


def _adpsgd_terms(row: dict[str, Any]) -> tuple[float, float]:
    """(mean period after warm-up, warm-up share of the steps) of a measured ADPSGD run."""
    steps = row["steps"]
    warmup = min(int(row.get("hparams", {}).get("warmup_steps", 0)), steps)
    syncs = row.get("syncs") or 0
    period = (steps - warmup) / syncs if syncs else math.inf
    return period, warmup / steps


def check(doc: dict[str, Any], *, hide: float, alpha_s: float, efficiency: float) -> list[dict[str, Any]]:
    """Predicted and measured training seconds for every summary row with a ``local`` baseline."""
    S = doc["meta"]["model_bytes"]
    rows = [r for r in doc["summary"] if r.get("train_s")]
    out = []
    for row in rows:
        base = next((b for b in rows if b["label"] == "local" and b["nodes"] == row["nodes"]
                     and b["ranks_per_node"] == row["ranks_per_node"]
                     and b["rate_mbit"] == row["rate_mbit"]), None)
        if base is None:
            continue
        link = Link(nodes=row["nodes"], ranks_per_node=row["ranks_per_node"],
                    gbit=row["rate_mbit"] / 1000, alpha_s=alpha_s, efficiency=efficiency)
        ar = allreduce_s(S, link)
        # An evaluation averages the replicas once (one all-reduce) unless they are identical.
        base_evals = len(base.get("evals", []))
        compute = (base["train_s"] - base_evals * ar) / base["steps"]
        algo = row["algo"]
        kw: dict[str, Any] = {}
        if algo == "adpsgd":
            kw["mean_period"], kw["warmup_fraction"] = _adpsgd_terms(row)
        per_step = step_s(algo, compute_s=compute, model_bytes=S, link=link,
                          hparams=row.get("hparams"), hide=hide, **kw)
        evals = 0 if algo in SYNCHRONOUS else len(row.get("evals", []))
        predicted = row["steps"] * per_step + evals * ar
        out.append({"nodes": row["nodes"], "rate_mbit": row["rate_mbit"], "label": row["label"],
                    "compute_ms": compute * 1e3, "allreduce_ms": ar * 1e3,
                    "predicted_s": predicted, "measured_s": row["train_s"],
                    "error": predicted / row["train_s"] - 1})
    return out


# ---------------------------------------------------------------------------------------------
# Predictions at scale


@dataclass(kw_only=True)
class Workload:
    """A model at its usual training setting; compute time from FLOPs (an assumption, see --tflops)."""

    name: str
    params: float
    gflops_per_image: float  # forward pass, multiply-adds counted as 2
    batch_per_gpu: int

    def compute_s(self, tflops: float) -> float:
        return 3 * self.gflops_per_image * 1e9 * self.batch_per_gpu / (tflops * 1e12)  # fwd + bwd = 3 fwd


WORKLOADS = (
    Workload(name="ResNet-50 (ImageNet, batch 32)", params=25.6e6, gflops_per_image=8.2, batch_per_gpu=32),
    Workload(name="VGG-16 (CIFAR-10, batch 128)", params=138e6, gflops_per_image=0.63, batch_per_gpu=128),
    Workload(name="WRN-28-10 (CIFAR-10, batch 128)", params=36.5e6, gflops_per_image=10.5, batch_per_gpu=128),
)
PAPER = {10: "1.46-1.95x", 100: "1.14-1.27x"}  # ADPSGD over full-communication SGD, 16 GPUs
SCALE_ALGOS = ("cpsgd", "adpsgd", "dpsgd", "easgd", "parle")
SCALE_HPARAMS = {"cpsgd": {"period": 8}, "easgd": {"period": 1}, "parle": {"L": 25}}


def predictions(*, nodes: list[int], gbits: list[float], ranks_per_node: int, tflops: float,
                alpha_s: float, hide: float, adpsgd_period: float) -> list[dict[str, Any]]:
    """Speed-up per step over SSGD of each algorithm, for every workload, node count and rate."""
    rows = []
    for w in WORKLOADS:
        c, S = w.compute_s(tflops), w.params * 4
        for g in gbits:
            for n in nodes:
                link = Link(nodes=n, ranks_per_node=ranks_per_node, gbit=g, alpha_s=alpha_s)
                ssgd = step_s("ssgd", compute_s=c, model_bytes=S, link=link, hide=hide)
                row = {"workload": w.name, "gbit": g, "nodes": n, "compute_ms": c * 1e3,
                       "ssgd_ms": ssgd * 1e3}
                for a in SCALE_ALGOS:
                    kw = {"mean_period": adpsgd_period} if a == "adpsgd" else {}
                    t = step_s(a, compute_s=c, model_bytes=S, link=link, hide=hide,
                               hparams=SCALE_HPARAMS.get(a), **kw)
                    row[a] = ssgd / t
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Main


def _print(title: str, headers: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*r)
    console = Console() if sys.stdout.isatty() else Console(width=180)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.costmodel", description=__doc__.splitlines()[0])
    p.add_argument("--check", metavar="RESULTS.json", help="compare with benchmarks.cluster's results")
    p.add_argument("--alpha-us", type=float, default=DEFAULT_ALPHA_S * 1e6, help="latency, microseconds (50)")
    p.add_argument("--hide", type=float, default=DEFAULT_HIDE,
                   help=f"share of a step after the first gradient bucket ({DEFAULT_HIDE})")
    p.add_argument("--efficiency", type=float, default=TCP_EFFICIENCY,
                   help=f"payload share of the line rate ({TCP_EFFICIENCY:.3f}: TCP over Ethernet, MTU 1500)")
    p.add_argument("--nodes", default="16,64,256", help="predictions: node counts (16,64,256)")
    p.add_argument("--gbits", default="10,100", help="predictions: link rates, Gbit/s (10,100)")
    p.add_argument("--ranks-per-node", type=int, default=1, help="predictions: GPUs per node (1)")
    p.add_argument("--tflops", type=float, default=12.0,
                   help="predictions: sustained TFLOP/s of one GPU, sets compute time (12)")
    p.add_argument("--adpsgd-period", type=float, default=8.0,
                   help="predictions: ADPSGD's mean period (8)")
    p.add_argument("--json", metavar="FILE", help="also write the table(s) as JSON")
    args = p.parse_args(argv)
    alpha = args.alpha_us * 1e-6
    doc_out: dict[str, Any] = {}
    if args.check:
        doc = json.loads(Path(args.check).read_text())
        rows = check(doc, hide=args.hide, alpha_s=alpha, efficiency=args.efficiency)
        if not rows:
            print(f"{args.check}: no run with a `local` baseline to take the compute time from "
                  "(run benchmarks.cluster without --no-local)", file=sys.stderr)
            return 1
        _print(f"cost model against {args.check} (aim: within {CHECK_TOLERANCE:.0%})",
               ["nodes", "Mbit/s", "algorithm", "compute ms/step", "all-reduce ms", "predicted s",
                "measured s", "error", ""],
               [[f"{r['nodes']}", f"{r['rate_mbit']:g}", r["label"], f"{r['compute_ms']:.1f}",
                 f"{r['allreduce_ms']:.1f}", f"{r['predicted_s']:.1f}", f"{r['measured_s']:.1f}",
                 f"{r['error']:+.0%}", "ok" if abs(r["error"]) <= CHECK_TOLERANCE else "OFF"]
                for r in rows])
        doc_out["check"] = rows
    else:
        nodes = [int(x) for x in args.nodes.split(",")]
        gbits = [float(x) for x in args.gbits.split(",")]
        rows = predictions(nodes=nodes, gbits=gbits, ranks_per_node=args.ranks_per_node,
                           tflops=args.tflops, alpha_s=alpha, hide=args.hide,
                           adpsgd_period=args.adpsgd_period)
        _print(f"predicted speed-up per step over SSGD ({args.ranks_per_node} GPU(s) per node at "
               f"{args.tflops:g} TFLOP/s, alpha {args.alpha_us:g} us, CPSGD p=8, ADPSGD mean p="
               f"{args.adpsgd_period:g}, DPSGD random pairs, EASGD t=1, Parle L=25); ADPSGD paper, "
               "measured on 16 GPUs: 1.46-1.95x at 10 Gbit/s, 1.14-1.27x at 100 Gbit/s",
               ["workload", "Gbit/s", "nodes", "compute ms", "SSGD ms", *SCALE_ALGOS, "paper (ADPSGD)"],
               [[r["workload"], f"{r['gbit']:g}", f"{r['nodes']}", f"{r['compute_ms']:.0f}",
                 f"{r['ssgd_ms']:.0f}", *(f"{r[a]:.2f}" for a in SCALE_ALGOS),
                 PAPER.get(int(r["gbit"]), "") if r["nodes"] == 16 else ""] for r in rows])
        doc_out["predictions"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(doc_out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
