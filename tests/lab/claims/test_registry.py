"""The claims registry: every check is well formed, runs are shared and keyed by their settings."""

from __future__ import annotations

import pytest

from routelab.core.errors import ConfigError
from routelab.lab.claims import BUDGETS, CLAIMS, get_budget, get_claims, planned_runs
from routelab.lab.claims.reproduce import claim_order
from routelab.lab.claims.runs import ARMS, RunSpec, resolved_settings, run_hash
from routelab.lab.claims.verdict import KINDS
from routelab.lab.run_metrics import RUN_METRICS
from routelab import list_routers

EXTRA_METRICS = {"max_vio_first10", "cache_knee", "llep_measured_speedup"}
COMPARE_COLUMNS = {"val_loss", "val_ppl", "max_vio_avg", "max_vio_final", "cv_final", "active_experts_per_token",
                   "sch_2k", "lru_hit_2k", "llep_speedup", "ep_max_mean"}


def test_claims_are_well_formed():
    assert [c.id for c in CLAIMS] == [str(i) for i in range(1, 11)]
    assert len({c.name for c in CLAIMS}) == len(CLAIMS)
    registered = {r["name"] for r in list_routers()}
    assert set(RUN_METRICS.names()) >= {"quality", "balance", "serving"}
    for claim in CLAIMS:
        for check in claim.checks:
            assert check.kind in KINDS
            assert check.metric in COMPARE_COLUMNS | EXTRA_METRICS, check.label
            assert all(arm in ARMS for arm in check.arms), check.label
            assert (check.baseline is None) == (check.kind in ("below", "above")), check.label
            assert (check.threshold is not None) == (check.kind in ("below", "above")), check.label
            assert (check.margin is not None) == (check.kind in ("noninferior", "equivalent")), check.label
            assert check.paper, check.label
    assert all(arm.router in registered for arm in ARMS.values())
    llep = next(c for c in CLAIMS if c.name == "llep")  # LLEP: the cost model's prediction and a real-EP measurement
    assert [c.metric for c in llep.checks] == ["llep_speedup", "llep_measured_speedup"]
    assert "prediction" in llep.checks[0].statement and "measured" in llep.checks[1].statement


def test_runs_are_shared_between_claims_and_the_sweep():
    budget = get_budget("default")
    specs = planned_runs(list(CLAIMS), budget)
    assert len(specs) == len(set(specs))
    aux_main = [s for s in specs if s.arm == "aux" and s.steps == budget.steps]
    assert len(aux_main) == len(budget.seeds)  # used by claims 1, 3, 4, 5, 6, 8, 9: trained once per seed
    sweep_steps = {s.steps for s in specs if s.steps != budget.steps}
    assert sweep_steps == set(budget.sweep_steps) - {budget.steps}
    main = planned_runs(list(CLAIMS), budget, sweep=False)
    assert specs[: len(main)] == main  # every claim's main runs come before the sweep
    order = claim_order(list(CLAIMS))
    # 7, 9 and 10 need one arm each; 9's (aux) serves 7 other claims; then 1 and 4 reuse it
    assert [c.id for c in order[:3]] == ["9", "1", "4"]
    first_claim = planned_runs([order[0]], budget, sweep=False)
    assert main[: len(first_claim)] == first_claim  # whole claims first
    done: set = set()
    for claim in order:  # each claim is complete before the runs of any later claim start
        needed = {(a, s) for a in claim.arms for s in budget.seeds}
        last = max(i for i, spec in enumerate(main) if (spec.arm, spec.seed) in needed)
        assert all((spec.arm, spec.seed) in needed | done for spec in main[: last + 1])
        done |= needed


def test_run_hash_covers_every_setting():
    budget = get_budget("default")
    base = resolved_settings(RunSpec("aux", 250, 0), budget)
    assert run_hash(base, "abc") == run_hash(resolved_settings(RunSpec("aux", 250, 0), budget), "abc")
    others = [
        resolved_settings(RunSpec("aux", 250, 1), budget),
        resolved_settings(RunSpec("aux", 100, 0), budget),
        resolved_settings(RunSpec("aux-shared", 250, 0), budget),
        resolved_settings(RunSpec("dlm-aux", 250, 0), budget),
        resolved_settings(RunSpec("aux", 250, 0), BUDGETS["long"]),
    ]
    hashes = {run_hash(base, "abc"), run_hash(base, "abd")} | {run_hash(o, "abc") for o in others}
    assert len(hashes) == 7
    assert base["model"]["objective"] == "causal"
    assert resolved_settings(RunSpec("dlm-ec", 250, 0), budget)["model"]["objective"] == "masked-diffusion"


def test_selection_errors_name_the_fix():
    assert [c.id for c in get_claims("equifinality")] == ["3"]
    assert [c.id for c in get_claims("10")] == ["10"]
    with pytest.raises(ConfigError, match="loss-free"):
        get_claims("loss-fre")
    with pytest.raises(ConfigError, match="default"):
        get_budget("defualt")
