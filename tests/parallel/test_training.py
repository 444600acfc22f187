"""EP x DP TinyLM training equals one process; exact resume; DCP checkpoints across EP sizes;
mismatched settings and dead or hung ranks end the job with a clear error."""

from __future__ import annotations

import time

import pytest
import torch

from routelab.models.tinylm import TinyLM
from routelab.parallel.checkpoint import load_checkpoint, save_checkpoint
from routelab.parallel.spawn import WorkerError, run_workers
from tests.parallel import train_cases as tc

STEPS = 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("ep-train")
    results = run_workers(tc.train_and_resume, 2, 2, "deepseek-v3", STEPS, str(folder), timeout_s=300)
    ref_losses, ref_state, model, optimizer = tc.reference_training("deepseek-v3", STEPS)
    return {"folder": folder, "results": results, "ref_losses": ref_losses, "ref_state": ref_state,
            "ref_model": model, "ref_optimizer": optimizer}


def test_twenty_steps_with_ep2_equal_one_process(trained: dict) -> None:
    losses = trained["results"][0]["losses"]
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, trained["ref_losses"])) < 1e-5
    state, ref = trained["results"][0]["state"], trained["ref_state"]
    assert set(state) == set(ref)
    for name in ref:
        torch.testing.assert_close(state[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
    # the loss-free bias moved, identically
    bias = [k for k in ref if k.endswith("balancer.bias")]
    assert bias and any(float(ref[k].abs().sum()) > 0 for k in bias)


def test_ep2_times_dp2_on_four_processes_equals_one_process(trained: dict) -> None:
    """W=4, EP=2: two copies of every expert, averaged over the expert-data-parallel group."""
    results = run_workers(tc.train_only, 4, 2, "deepseek-v3", 10, timeout_s=300)
    assert results[0]["dp_size"] == 2
    assert max(abs(a - b) for a, b in zip(results[0]["losses"], trained["ref_losses"][:10])) < 1e-5
    ref_losses, ref_state, _, _ = tc.reference_training("deepseek-v3", 10)
    for name in ref_state:
        torch.testing.assert_close(results[0]["state"][name], ref_state[name], rtol=1e-4, atol=1e-5, msg=name)


def test_stateful_random_and_hash_routers_train_as_in_one_process() -> None:
    """Online k-means (scorer state), noisy top-k (random noise), BIP (dual prices), hash
    (token ids) and ProMoE (prototype loss): 3 EP=2 steps follow one process."""
    routers = ["kmeans", "noisy-topk", "bip", "hash", "promoe"]
    losses = run_workers(tc.train_routers, 2, routers, 3, timeout_s=300)[0]
    for router in routers:
        reference = tc.reference_training(router, 3)[0]
        assert max(abs(a - b) for a, b in zip(losses[router], reference)) < 1e-5, router


def test_resume_under_ep_is_exact(trained: dict) -> None:
    assert [r["resume_error"] for r in trained["results"]] == [0.0, 0.0]


def test_ep_checkpoint_loads_into_one_process(trained: dict) -> None:
    model = TinyLM(tc.tiny_config())
    optimizer = tc.optimizer_of(model)
    extra = load_checkpoint(trained["folder"] / "final", model, optimizer)
    assert extra == {"step": STEPS}
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained["results"][0]["state"][name], rtol=0, atol=0, msg=name)
    # AdamW moments came back too (close to those of the single-process run)
    ref_opt = trained["ref_optimizer"].state_dict()["state"]
    for index, (_, state) in enumerate(optimizer.state_dict()["state"].items()):
        torch.testing.assert_close(state["exp_avg"], ref_opt[index]["exp_avg"], rtol=1e-3, atol=1e-6)


def test_single_process_checkpoint_loads_under_ep_and_ep2_loads_under_ep4(trained: dict, tmp_path) -> None:
    ref_model, ref_optimizer = trained["ref_model"], trained["ref_optimizer"]
    save_checkpoint(tmp_path / "single", ref_model, ref_optimizer, extra={"step": STEPS})
    loaded = run_workers(tc.load_into_ep, 2, 2, "deepseek-v3", str(tmp_path / "single"), timeout_s=120)
    for name, value in ref_model.state_dict().items():
        torch.testing.assert_close(loaded[0]["state"][name], value, rtol=0, atol=0, msg=name)
    # EP=2 checkpoint, EP=4 job: each rank gets its one expert of four, moments included
    loaded4 = run_workers(tc.load_into_ep, 4, 4, "deepseek-v3", str(trained["folder"] / "final"), timeout_s=120)
    ep2_state = trained["results"][0]["state"]
    for result in loaded4:
        for name in ep2_state:
            torch.testing.assert_close(result["state"][name], ep2_state[name], rtol=0, atol=0, msg=name)
    full_moments = {}
    for result in loaded4:
        for name, moment in result["moments"].items():
            full_moments.setdefault(name, []).append((result["local_experts"], moment))
    params = dict(ref_model.named_parameters())
    for name, parts in full_moments.items():
        stacked = torch.cat([m for _, m in sorted(parts, key=lambda p: p[0])])
        reference = ref_optimizer.state[params[name]]["exp_avg"]
        torch.testing.assert_close(stacked, reference, rtol=1e-3, atol=1e-6)


def test_mismatched_settings_are_refused() -> None:
    messages = run_workers(tc.mismatched_config, 2, timeout_s=60)
    assert all(m.startswith("ConfigError") and "ranks [1]" in m and "router" in m for m in messages), messages


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_dead_or_hung_rank_ends_the_job_with_an_error_naming_it(mode: str) -> None:
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        run_workers(tc.dies_or_hangs, 2, mode, timeout_s=90, collective_timeout_s=4)
    message = str(info.value)
    if mode == "die":  # the dead rank leaves no result; the survivor names it
        assert "ranks [1] exited without a result" in message or "rank(s) [1]" in message, message
    else:
        assert "RankFailure" in message and "rank(s) [1]" in message and "step 1" in message, message
    assert time.monotonic() - start < 60
