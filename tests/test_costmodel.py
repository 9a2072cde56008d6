"""benchmarks.costmodel: every closed form against values computed by hand.

The link below makes the arithmetic easy: 1 Gbit/s with no header overhead is 125e6 bytes/s, so
a model of S = 125e6 bytes takes S/B = 1 s; alpha = 1 ms.
"""

from __future__ import annotations

import pytest

from benchmarks import costmodel as cm

S = 125e6


def link(nodes: int = 4, ranks_per_node: int = 1) -> cm.Link:
    return cm.Link(nodes=nodes, ranks_per_node=ranks_per_node, gbit=1.0, alpha_s=1e-3, efficiency=1.0)


def test_allreduce_ring() -> None:
    # 2 (n-1)/n S/B + 2 (n-1) alpha = 2*3/4*1 + 6 ms
    assert cm.allreduce_s(S, link(4)) == pytest.approx(1.506)
    assert cm.allreduce_s(S, link(2)) == pytest.approx(1.0 + 0.002)
    # 2 nodes x 2 ranks: a ring of 4 ranks, each node link carries one hop's traffic
    assert cm.allreduce_s(S, link(2, 2)) == pytest.approx(1.506)
    assert cm.allreduce_s(S, link(1)) == 0.0


def test_pairwise_exchange() -> None:
    assert cm.pairwise_s(S, link(4)) == pytest.approx(1.001)  # one model each way, at once
    # 2 nodes x 2 ranks: a rank's partner is on the other node with probability 2/3, and two
    # ranks share the link: 2 * 2/3 models through it
    assert cm.pairwise_s(S, link(2, 2)) == pytest.approx(4 / 3 + 0.001)
    assert cm.pairwise_s(S, link(1, 2)) == 0.0  # one node: nothing crosses a link
    assert cm.pairwise_s(S, link(1)) == 0.0


def test_efficiency_scales_the_bandwidth() -> None:
    slow = cm.Link(nodes=2, gbit=1.0, alpha_s=0.0, efficiency=0.5)
    assert cm.allreduce_s(S, slow) == pytest.approx(2.0)


@pytest.mark.parametrize("algo, hparams, expected", [
    ("local", None, 0.4),
    ("ssgd", None, 0.2 + 1.506),                      # c(1-h) + max(ch, AR)
    ("ssgd-noise", None, 0.2 + 1.506),
    ("entropysgd", {"L": 5}, 0.2 + 1.506),
    ("cpsgd", {"period": 4}, 0.4 + 1.506 / 4),        # c + AR/p
    ("cpsgd", {"period": 4, "delay": 2}, 0.4 + (1.506 - 0.8) / 4),  # c + (AR - d c)/p
    ("diloco", {"period": 8, "delay": 4}, 0.4),       # AR < d c: hidden entirely
    ("slowmo", {"period": 4}, 0.4 + 1.506 / 4),
    ("dpsgd", {"log_every": 0}, 0.2 + 1.001),         # c(1-h) + max(ch, X)
    ("dpsgd", {"log_every": 2}, 0.2 + 1.001),          # the estimate moves kilobytes: no term
    ("easgd", {"period": 1}, 1.506),                  # max(c, AR/t)
    ("easgd", {"period": 10}, 0.4),
    ("parle", {"L": 5}, 0.4),                         # max(c, AR/L): 0.3012 hidden
    ("parle", {"L": 2}, 0.753),
])
def test_step_times(algo: str, hparams: dict | None, expected: float) -> None:
    got = cm.step_s(algo, compute_s=0.4, model_bytes=S, link=link(4), hparams=hparams, hide=0.5)
    assert got == pytest.approx(expected)


def test_ssgd_hides_a_short_allreduce() -> None:
    # AR = 1.506 s, c = 4 s, h = 0.5: the all-reduce fits in the 2 s after the first bucket
    assert cm.step_s("ssgd", compute_s=4.0, model_bytes=S, link=link(4), hide=0.5) == pytest.approx(4.0)
    assert cm.step_s("ssgd", compute_s=4.0, model_bytes=S, link=link(4), hide=0.0) == pytest.approx(5.506)


def test_adpsgd_mixes_warmup_and_mean_period() -> None:
    got = cm.step_s("adpsgd", compute_s=0.4, model_bytes=S, link=link(4), hide=0.5,
                    mean_period=5, warmup_fraction=0.1)
    assert got == pytest.approx(0.1 * 1.706 + 0.9 * (0.4 + 1.506 / 5))


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="mean_period"):
        cm.step_s("adpsgd", compute_s=0.4, model_bytes=S, link=link(4))
    with pytest.raises(ValueError, match="algo"):
        cm.step_s("nope", compute_s=0.4, model_bytes=S, link=link(4))
    with pytest.raises(ValueError, match="nodes"):
        cm.Link(nodes=0, gbit=1.0)
    with pytest.raises(ValueError, match="gbit"):
        cm.Link(nodes=2, gbit=0.0)


def test_check_against_a_measured_table() -> None:
    # 2 nodes at 1000 Mbit/s (efficiency 1, alpha 1 ms): AR of S = 1.002 s. The local run: 100
    # steps, 2 evaluations (each one all-reduce) in 42.004 s -> compute 0.4 s per step.
    evals = [{"seconds": 0.0, "val_acc": 0.5}] * 2
    common = {"nodes": 2, "ranks_per_node": 1, "rate_mbit": 1000.0, "steps": 100, "evals": evals}
    doc = {"meta": {"model_bytes": S}, "summary": [
        {**common, "label": "local", "algo": "cpsgd", "train_s": 42.004, "hparams": {"period": 10**9}},
        {**common, "label": "cpsgd", "algo": "cpsgd", "train_s": 60.0, "hparams": {"period": 4}},
        {**common, "label": "ssgd", "algo": "ssgd", "train_s": 120.0, "hparams": {}},
        {**common, "label": "adpsgd", "algo": "adpsgd", "train_s": 50.0, "syncs": 9,
         "hparams": {"warmup_steps": 10}},
    ]}
    rows = {r["label"]: r for r in cm.check(doc, hide=0.5, alpha_s=1e-3, efficiency=1.0)}
    ar = 1.002
    assert rows["local"]["compute_ms"] == pytest.approx(400.0)
    assert rows["local"]["predicted_s"] == pytest.approx(42.004)
    assert rows["cpsgd"]["predicted_s"] == pytest.approx(100 * (0.4 + ar / 4) + 2 * ar)
    assert rows["ssgd"]["predicted_s"] == pytest.approx(100 * (0.2 + ar))  # no average at eval
    # ADPSGD: 10 warm-up steps as SSGD, then 90 steps with 9 averages (mean period 10)
    adpsgd = 10 * (0.2 + ar) + 90 * (0.4 + ar / 10) + 2 * ar
    assert rows["adpsgd"]["predicted_s"] == pytest.approx(adpsgd)
    assert rows["cpsgd"]["error"] == pytest.approx(rows["cpsgd"]["predicted_s"] / 60.0 - 1)


def test_predictions_cover_the_grid() -> None:
    rows = cm.predictions(nodes=[16, 64], gbits=[10, 100], ranks_per_node=1, tflops=12.0,
                          alpha_s=5e-5, hide=0.5, adpsgd_period=8.0)
    assert len(rows) == len(cm.WORKLOADS) * 2 * 2
    for r in rows:
        for a in cm.SCALE_ALGOS:
            assert r[a] > 0
    # a slower link never makes skipping communication less worth it
    for w in cm.WORKLOADS:
        by = {(r["gbit"], r["nodes"]): r for r in rows if r["workload"] == w.name}
        assert by[(10, 16)]["cpsgd"] >= by[(100, 16)]["cpsgd"]
