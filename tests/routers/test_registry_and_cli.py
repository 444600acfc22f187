"""The public API surface: registry listing, preset options, end_of_step, and the CLI."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

import routelab
from routelab.cli import app
from routelab.routers.registry import PRESETS

FOUNDATION = {"switch", "gshard", "mixtral", "topk", "noisy-topk", "deepseek-v3", "loss-free", "expert-choice", "hash",
              "random-fixed"}


def test_list_routers_names_every_foundation_preset_with_a_paper() -> None:
    listed = routelab.list_routers()
    names = [r["name"] for r in listed]
    assert FOUNDATION <= set(names)
    assert len(names) == len(set(names))
    for row in listed:
        assert set(row) == {"name", "description", "paper"}
        assert row["description"] and row["paper"]


def test_every_preset_builds_with_defaults_and_documents_its_options() -> None:
    for info in PRESETS:
        router = routelab.create_router(info.name, d_model=8, num_experts=8)
        assert router.top_k == min(info.default_top_k, 8)
        assert router.name == info.name
        options = info.options()
        assert "capacity_factor" in options and "z_loss_coef" in options
        assert info.builder.__doc__, f"{info.name} builder needs a docstring naming its method"


def test_overrides_reach_the_parts() -> None:
    router = routelab.create_router("mixtral", d_model=8, num_experts=4, top_k=2, z_loss_coef=1e-3,
                                    capacity_factor=1.25, drop_policy="position", aux_loss_coef=0.0)
    assert [loss.name for loss in router.losses] == ["z"]
    assert router.capacity.capacity_factor == 1.25 and router.capacity.drop_policy == "position"


def test_end_of_step_updates_each_stateful_part_once() -> None:
    model = torch.nn.ModuleList([
        routelab.MoE(d_model=8, d_hidden=8, num_experts=4, router="loss-free"),
        routelab.MoE(d_model=8, d_hidden=8, num_experts=4, router="mixtral"),
        routelab.MoE(d_model=8, d_hidden=8, num_experts=4, router="deepseek-v3"),
    ])
    for m in model:
        m(torch.randn(1, 6, 8))
    assert routelab.end_of_step(model) == 2
    assert int(model[0].router.balancer.num_updates) == 1 and int(model[2].router.balancer.num_updates) == 1


def test_cli_list_shows_every_preset() -> None:
    result = CliRunner().invoke(app, ["list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in FOUNDATION:
        assert name in result.output


def test_cli_bench_runs_a_tiny_configuration() -> None:
    result = CliRunner().invoke(
        app, ["bench", "--quick", "--shapes", "coarse", "--dtypes", "float32", "--tokens", "64", "--repeats", "1"],
        env={"COLUMNS": "250"},
    )
    assert result.exit_code == 0, result.output
    assert "layer/ideal" in result.output


def test_cli_bench_router_cost_table() -> None:
    result = CliRunner().invoke(
        app, ["bench", "--routers", "mixtral,hash", "--shapes", "coarse", "--tokens", "64", "--repeats", "1"],
        env={"COLUMNS": "250"},
    )
    assert result.exit_code == 0, result.output
    assert "coarse share" in result.output and "hash" in result.output


def run_main(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """The installed ``routelab`` entry point (``routelab.cli.main``) with ``argv``."""
    import pytest

    from routelab.cli import main

    monkeypatch.setattr("sys.argv", ["routelab", *argv])
    monkeypatch.setenv("ROUTELAB_CPU_ALLOCATOR", "system")  # keep the test process's malloc as it is
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


def test_cli_bench_unknown_shape_is_one_error_line_not_a_traceback(monkeypatch, capsys) -> None:
    code, err = run_main(monkeypatch, capsys, "bench", "--shapes", "huge", "--tokens", "64")
    assert code == 2
    assert err.startswith("error: --shapes='huge' is not a known shape. Known shapes: coarse, fine.")
    assert "Traceback" not in err


def test_cli_bench_router_cost_needs_whole_sequences(monkeypatch, capsys) -> None:
    code, err = run_main(monkeypatch, capsys, "bench", "--routers", "all", "--tokens", "1000", "--seq-len", "300")
    assert code == 2
    assert "use --tokens 900" in err


def test_docs_preset_table_is_up_to_date() -> None:
    """docs/routers.md carries the generated table; regenerate with
    ``python -m routelab.routers.describe docs/routers.md``."""
    from pathlib import Path

    from routelab.routers.describe import BEGIN_MARK, END_MARK, presets_markdown

    text = (Path(__file__).parents[2] / "docs" / "routers.md").read_text()
    block = text[text.index(BEGIN_MARK) + len(BEGIN_MARK): text.index(END_MARK)]
    assert block.strip() == presets_markdown().strip()


def test_docs_family_table_names_the_module_of_every_preset() -> None:
    """docs/routers.md lists each family file with its presets; each preset's builder lives there."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "routers.md").read_text()
    section = text[text.index("## Where the code lives"): text.index("## Per-method pages")]
    documented = {}
    for module, presets in re.findall(r"^\| `(\w+)\.py` \| (.+) \|$", section, flags=re.MULTILINE):
        for name in re.findall(r"`([\w-]+)`", presets):
            documented[name] = module
    actual = {r["name"]: routelab.preset_info(r["name"]).builder.__module__ for r in routelab.list_routers()}
    assert documented == {name: module.rsplit(".", 1)[1] for name, module in actual.items()}
    assert all(module.startswith("routelab.routers.families.") for module in actual.values())
