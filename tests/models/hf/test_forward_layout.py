"""Reading a transformers base-model forward by role, whatever the installed release calls its arguments."""

from __future__ import annotations

import pytest
import torch

from routelab.core.errors import ConfigError, InputError
from routelab.models.hf.context import ForwardLayout, SequenceCounter, forward_tokens_from_call

from tests.hf_tiny import tiny_batch, tiny_model


class FakeCache:
    """Stands in for a transformers ``Cache``: only its length is read."""

    def __init__(self, length: int) -> None:
        self.length = length

    def get_seq_length(self) -> int:
        return self.length


def forward_before_rename(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                          inputs_embeds=None, use_cache=None, **kwargs):
    """The base-model forward of transformers <= 5.23."""


def forward_after_rename(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                         inputs_embeds=None, use_cache=None, **kwargs):
    """The base-model forward of transformers 5.24 (``past_key_values`` still accepted through ``**kwargs``)."""


def forward_without_cache(self, input_ids=None, attention_mask=None, kv_state=None, inputs_embeds=None, **kwargs):
    """A forward whose cache argument routelab does not know."""


def layout_of(function) -> ForwardLayout:
    return ForwardLayout.of(function.__get__(object()))


def decode_step(layout: ForwardLayout, counter: SequenceCounter, **call):
    ids = torch.tensor([[5], [6]])
    mask = torch.ones(2, 4, dtype=torch.long)
    return forward_tokens_from_call(layout, (), {"input_ids": ids, "attention_mask": mask} | call, counter)


@pytest.mark.parametrize("forward", [forward_before_rename, forward_after_rename])
@pytest.mark.parametrize("spelling", ["past_key_values", "cache"])
def test_a_decoding_step_continues_its_sequences_whatever_the_cache_is_called(forward, spelling):
    layout = layout_of(forward)
    counter = SequenceCounter()
    prefill = forward_tokens_from_call(
        layout, (torch.tensor([[1, 2, 3], [4, 5, 6]]),), {spelling: FakeCache(0)}, counter
    )
    step = decode_step(layout, counter, **{spelling: FakeCache(3)})
    assert prefill.seq_ids_B.tolist() == [0, 1]
    assert step.seq_ids_B.tolist() == [0, 1]  # continued, not a new batch 2, 3
    assert step.positions_BS.tolist() == [[3], [3]]


def test_the_cache_is_read_when_passed_by_position():
    layout = layout_of(forward_after_rename)
    counter = SequenceCounter()
    forward_tokens_from_call(layout, (torch.tensor([[1, 2, 3]]),), {}, counter)
    step = forward_tokens_from_call(layout, (torch.tensor([[7]]), None, None, FakeCache(3)), {}, counter)
    assert step.seq_ids_B.tolist() == [0] and step.positions_BS.tolist() == [[3]]


def test_a_forward_whose_cache_argument_is_unknown_is_refused_at_attach():
    with pytest.raises(ConfigError, match=r"no parameter for cache \(one of cache, past_key_values, cache_params\)"):
        layout_of(forward_without_cache)


def test_a_cache_under_an_unknown_name_raises_instead_of_mislabelling():
    layout = layout_of(forward_after_rename)
    with pytest.raises(InputError, match="KV cache as 'kv_state'"):
        decode_step(layout, SequenceCounter(), kv_state=FakeCache(3))


def test_two_spellings_of_the_cache_at_once_are_refused():
    layout = layout_of(forward_after_rename)
    with pytest.raises(InputError, match="both 'cache' and 'past_key_values'"):
        decode_step(layout, SequenceCounter(), cache=FakeCache(3), past_key_values=FakeCache(3))


def test_a_cache_without_a_length_is_refused():
    layout = layout_of(forward_before_rename)
    with pytest.raises(InputError, match="without get_seq_length"):
        decode_step(layout, SequenceCounter(), past_key_values=((torch.zeros(1),),))


def test_a_call_without_inputs_is_refused():
    layout = layout_of(forward_after_rename)
    with pytest.raises(InputError, match="needs input_ids"):
        forward_tokens_from_call(layout, (), {"attention_mask": torch.ones(1, 2)}, SequenceCounter())


def test_the_installed_transformers_forward_is_readable_and_continues_sequences_in_generate():
    from routelab.hf import attach

    model = tiny_model("mixtral")
    ids, mask = tiny_batch(padded=True)
    seen = []
    with attach(model) as handle:
        hook = model.model.register_forward_hook(lambda *_: seen.append(handle._state.tokens.seq_ids_B.tolist()))
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        hook.remove()
    assert seen == [[0, 1]] * 3
