"""Leaderboard gaps within seed noise (routelab.lab.seed_noise), against hand computations."""

from __future__ import annotations

import math

import pytest

from routelab.lab.seed_noise import gap_label, noise_band, pooled_std


def agg(name: str, mean: float, std: float | None, seeds: int) -> dict:
    return {"router": name, "val_loss_mean": mean, "val_loss_std": std, "seeds": seeds}


def test_pooled_std_and_band_by_hand():
    rows = [agg("a", 5.0, 0.03, 3), agg("b", 5.05, 0.04, 3)]
    sigma, dof = pooled_std(rows)
    assert dof == 4 and sigma == pytest.approx(math.sqrt((2 * 0.03**2 + 2 * 0.04**2) / 4))
    band = noise_band(rows)
    assert band.band == pytest.approx(2 * sigma * math.sqrt(2 / 3))
    assert gap_label(rows[0], rows[0], band) == "-"
    assert gap_label(rows[1], rows[0], band) == "+0.0500 ≈"  # 0.05 < 2 * 0.0354 * 0.816 = 0.0577


def test_one_seed_uses_the_reference_or_marks_nothing():
    rows = [agg("a", 5.0, None, 1), agg("b", 5.2, None, 1), agg("c", 5.01, None, 1)]
    assert noise_band(rows) is None
    assert gap_label(rows[2], rows[0], None) == "+0.0100"
    band = noise_band(rows, reference_sigma=0.01)
    assert band.band == pytest.approx(2 * 0.01 * math.sqrt(2))
    assert gap_label(rows[2], rows[0], band).endswith("≈")
    assert not gap_label(rows[1], rows[0], band).endswith("≈")


def test_the_demo_marks_gaps_with_its_measured_seed_noise():
    from routelab.lab.demo import DEMO_SEED_NOISE_STD, demo_settings
    from routelab.lab.experiment import load_experiment

    config = load_experiment(demo_settings())
    assert config.seeds == [0] and config.seed_noise_std == DEMO_SEED_NOISE_STD > 0
    rows = [agg("mixtral", 5.03, None, 1), agg("expert-choice", 5.03 + DEMO_SEED_NOISE_STD, None, 1)]
    assert gap_label(rows[1], rows[0], noise_band(rows, config.seed_noise_std)).endswith("≈")
