"""One source of the TinyLM shape: ``TinyLMConfig``'s fields give the lab's ``ModelSettings``
and the shape flags of ``routelab train`` and ``routelab compare``; these tests fail when the
three disagree on a field, a default, a bound or a help text."""

from __future__ import annotations

import dataclasses

import pytest
import typer
from typer.testing import CliRunner

import routelab.commands.lab as lab_commands
from routelab.cli import app
from routelab.core.errors import ConfigError
from routelab.lab.config import ModelSettings, validated
from routelab.models.tinylm import TinyLMConfig, shape_fields

SHAPE = {field.name: field for field in shape_fields()}


def test_model_settings_have_the_shape_fields_of_tinylm_with_their_defaults() -> None:
    assert list(ModelSettings.model_fields) == list(SHAPE)
    for name, field in ModelSettings.model_fields.items():
        assert field.default == SHAPE[name].default, name
        assert field.description == SHAPE[name].metadata["help"], name
    # the fields no experiment sets stay TinyLM's own (the run fills in vocab, length and router)
    assert set(SHAPE).isdisjoint({"vocab_size", "max_seq_len", "ffn", "router", "router_options", "rope_base",
                                  "init_std"})


def test_default_settings_build_the_default_tinylm() -> None:
    built = ModelSettings().tinylm(vocab_size=300, max_seq_len=64, router="mixtral", router_options={})
    assert built == TinyLMConfig(vocab_size=300, max_seq_len=64)


@pytest.mark.parametrize("name", ["d_model", "n_layers", "num_experts", "num_shared_experts", "shared_d_hidden"])
def test_settings_refuse_what_tinylm_refuses(name: str) -> None:
    below = (SHAPE[name].metadata["minimum"]) - 1
    with pytest.raises(ConfigError, match=name):
        validated(ModelSettings, {name: below}, "model options")
    with pytest.raises(ConfigError, match=name):
        TinyLMConfig(vocab_size=300, **{name: below})


def test_activation_choices_are_tinylms() -> None:
    with pytest.raises(ConfigError, match="activation"):
        validated(ModelSettings, {"activation": "tanh"}, "model options")
    for choice in SHAPE["activation"].metadata["choices"]:
        assert TinyLMConfig(vocab_size=300, **validated(ModelSettings, {"activation": choice}, "m").model_dump())


@pytest.mark.parametrize("command", ["train", "compare"])
def test_train_and_compare_have_one_flag_per_shape_field(command: str) -> None:
    click_command = typer.main.get_command(app).commands[command]
    options = {param.name: param for param in click_command.params}
    for name, field in SHAPE.items():
        assert name in options, f"{command} has no flag for {name}"
        assert options[name].opts == [field.metadata["flag"]]
        assert options[name].default is None  # unset flags leave ModelSettings' default
        assert options[name].help == field.metadata["help"]


def test_compare_passes_the_shape_flags_into_the_experiment(monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(lab_commands, "run_and_print", lambda config, **kw: seen.setdefault("config", config))
    result = CliRunner().invoke(app, ["compare", "--routers", "mixtral", "--d-model", "64", "--top-k", "1",
                                      "--shared-experts", "1", "--activation", "gelu", "--d-ff", "96"])
    assert result.exit_code == 0, result.output
    model = seen["config"].model
    expected = {**ModelSettings().model_dump(), "d_model": 64, "top_k": 1, "num_shared_experts": 1,
                "activation": "gelu", "d_ff": 96}
    assert model.model_dump() == expected
    assert dataclasses.asdict(model.tinylm(vocab_size=300, max_seq_len=16, router="mixtral", router_options={})) == {
        **dataclasses.asdict(TinyLMConfig(vocab_size=300, max_seq_len=16)), **expected}


def test_adapter_lab_base_model_fields_are_tinylm_shape_fields() -> None:
    from routelab.lab.adapter_lab import BaseModelSettings
    from routelab.models.tinylm import shape_fields

    shapes = {field.name: field for field in shape_fields()}
    for name, info in BaseModelSettings.model_fields.items():
        assert name in shapes, f"{name} is not a TinyLMConfig shape field"
        assert info.description == shapes[name].metadata["help"]
    assert BaseModelSettings().d_model == 64  # its own, smaller default
