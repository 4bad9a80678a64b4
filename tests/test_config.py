"""The settings and the refusal table, checked directly (no fit): every refused combination, every invalid value."""

import re
from typing import Any

import pytest

from lightning_tbptt import TBPTTCallback
from lightning_tbptt.config import REFUSALS, FitFacts, Settings, refuse
from lightning_tbptt.errors import ConfigurationError, ModelError

# one case per refusal: the callback's arguments, the fit's facts, the error and what its message must say
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], type[Exception], str]] = {
    "stride beyond segment_length": (
        {"stride": 9},
        {},
        ConfigurationError,
        r"`stride` to be at most `segment_length=8` but got 9: windows would leave steps between them untrained",
    ),
    "drop_finished without lengths": ({"drop_finished": True}, {}, ConfigurationError, r"`lengths` .* got None"),
    "drop_finished with streaming": (
        {"drop_finished": True, "lengths": "n", "streaming": True},
        {},
        ConfigurationError,
        r"drop_finished=True\)` cannot be combined with `streaming=True`",
    ),
    "exact with step_per='segment'": (
        {"exact": True, "step_per": "segment"},
        {},
        ConfigurationError,
        r"exact=True\)` takes one optimizer step per batch.*but got `step_per='segment'`",
    ),
    "exact with stride": (
        {"exact": True, "stride": 4},
        {},
        ConfigurationError,
        r"exact=True\)` cannot be combined with `stride=4`: overlapping windows are a truncation scheme",
    ),
    "exact with burn_in": (
        {"exact": True, "burn_in": 3},
        {},
        ConfigurationError,
        r"exact=True\)` cannot be combined with `burn_in=3`: burn-in steps run without gradient",
    ),
    "exact with nonfinite_state='reset'": (
        {"exact": True, "nonfinite_state": "reset"},
        {},
        ConfigurationError,
        r"exact=True\)` cannot be combined with `nonfinite_state='reset'`",
    ),
    "exact with hiddens": (
        {"exact": True},
        {"hiddens_position": 2, "module": "Net"},
        ConfigurationError,
        r"exact=True\)` cannot work with Lightning 1.x `hiddens`.*`Net.training_step`",
    ),
    "exact with manual optimization": (
        {"exact": True},
        {"automatic": False, "module": "Net"},
        ConfigurationError,
        r"exact=True\)` cannot work with manual optimization.*`Net.training_step` makes its own backward",
    ),
    "probe with stride": (
        {"probe_every": 5, "stride": 4},
        {},
        ConfigurationError,
        r"probe_every=5\)` cannot be combined with `stride=4`: the probe measures the bias of consecutive segments",
    ),
    "probe with burn_in": (
        {"segment_length": "auto", "burn_in": 3},
        {},
        ConfigurationError,
        r"segment_length='auto'\)` cannot be combined with `burn_in=3`",
    ),
    "auto with exact": (
        {"segment_length": "auto", "exact": True},
        {},
        ConfigurationError,
        r"segment_length='auto'\)` cannot be combined with `exact=True`: the exact gradient has no truncation bias",
    ),
    "probe with a custom split": (
        {"probe_every": 2},
        {"callback_splits": True},
        ConfigurationError,
        r"probe_every=2\)` cannot be combined with a custom `split_batch`: the probe cuts the batch into bands",
    ),
    "probe with hiddens": (
        {"probe_every": 2},
        {"hiddens_position": 2, "module": "Net"},
        ConfigurationError,
        r"probe_every=2\)` cannot work with Lightning 1.x `hiddens`.*`Net.training_step`",
    ),
    "probe with manual optimization": (
        {"segment_length": "auto"},
        {"automatic": False, "module": "Net"},
        ConfigurationError,
        r"segment_length='auto'\)` cannot work with manual optimization: the probe runs `Net.training_step`",
    ),
    "several callbacks": ({}, {"callbacks": 2}, ConfigurationError, r"one `TBPTTCallback` .* but got 2"),
    "stride beyond the module's segment length": (
        {"segment_length": None, "stride": 8},
        {"segment_length": 4, "segment_length_from_module": True, "module": "Net"},
        ConfigurationError,
        r"`stride` to be at most the segment length 4 \(the `truncated_bptt_steps` of Net\) but got 8",
    ),
    "two custom splits": (
        {},
        {"module_splits": True, "callback_splits": True, "callback": "MySplit", "module": "Net"},
        ConfigurationError,
        r"Both `MySplit.split_batch` and `Net.tbptt_split_batch`",
    ),
    "lengths with a custom split": (
        {"lengths": "n"},
        {"callback_splits": True},
        ConfigurationError,
        r"TBPTTCallback\(lengths='n'\)` cannot be combined with a custom `split_batch`",
    ),
    "resets with a custom split": (
        {"resets": "r"},
        {"module_splits": True},
        ConfigurationError,
        r"TBPTTCallback\(resets='r'\)` cannot be combined with a custom `tbptt_split_batch`",
    ),
    "stride with a custom split": (
        {"stride": 2},
        {"callback_splits": True},
        ConfigurationError,
        r"TBPTTCallback\(stride=2\)` cannot be combined",
    ),
    "burn_in with a custom split": (
        {"burn_in": 3},
        {"callback_splits": True},
        ConfigurationError,
        r"TBPTTCallback\(burn_in=3\)` cannot be combined",
    ),
    "random_lengths with a probe": (
        {"probe_every": 5, "random_lengths": {"seed": 1}},
        {},
        ConfigurationError,
        r"`TBPTTCallback\(probe_every=5\)` cannot be combined with `random_lengths`",
    ),
    "random_lengths scale_lr with step_per='batch'": (
        {"exact": True, "random_lengths": {"scale_lr": True}},
        {},
        ConfigurationError,
        r"but `TBPTTCallback\(step_per='batch', exact=True\)` takes one step per batch",
    ),
    "random_lengths scale_lr with stride": (
        {"stride": 4, "random_lengths": {"scale_lr": True}},
        {},
        ConfigurationError,
        r"`RandomLengths\(scale_lr=True\)` cannot be combined with `stride=4`",
    ),
    "dynamic_eval with evaluate=False": (
        {"evaluate": False, "dynamic_eval": {"lr": 0.1}},
        {},
        ConfigurationError,
        r"but `evaluate=False` leaves evaluation to Lightning",
    ),
    "dynamic_eval rule='rms' with manual optimization": (
        {"dynamic_eval": {"lr": 0.1, "rule": "rms", "statistics": []}},
        {"automatic": False, "module": "Net"},
        ConfigurationError,
        r"`DynamicEvaluation\(rule='rms'\)` takes the gradients of `Net.training_step`'s loss",
    ),
    "random_lengths with a custom split": (
        {"random_lengths": {}},
        {"callback_splits": True},
        ConfigurationError,
        r"`TBPTTCallback\(random_lengths=...\)` cannot be combined with a custom `split_batch`",
    ),
    "training_step(dataloader_iter)": (
        {},
        {"fetches_batches": True, "module": "Net"},
        ModelError,
        r"`Net.training_step\(dataloader_iter\)` fetches its own batches",
    ),
    "hiddens out of place": (
        {},
        {"hiddens_position": 1, "expected_hiddens_position": 2, "step_signature": "(batch, hiddens, batch_idx)"},
        ModelError,
        r"got `training_step\(batch, hiddens, batch_idx\)`",
    ),
    "drop_finished with hiddens": (
        {"drop_finished": True, "lengths": "n"},
        {"hiddens_position": 2},
        ConfigurationError,
        r"TBPTTCallback\(drop_finished=True\)` cannot work with `hiddens`",
    ),
    "streaming with hiddens": (
        {"streaming": True},
        {"hiddens_position": 2},
        ConfigurationError,
        r"TBPTTCallback\(streaming=True\)` cannot work with `hiddens`",
    ),
    "resets with hiddens": (
        {"resets": "r"},
        {"hiddens_position": 2},
        ConfigurationError,
        r"TBPTTCallback\(resets='r'\)` cannot work",
    ),
    "stride with hiddens": ({"stride": 2}, {"hiddens_position": 2}, ConfigurationError, r"\(stride=2\)` cannot work"),
    "burn_in with hiddens": ({"burn_in": 1}, {"hiddens_position": 2}, ConfigurationError, r"\(burn_in=1\)` cannot"),
    "burn_in with manual optimization": (
        {"burn_in": 2},
        {"automatic": False},
        ConfigurationError,
        r"burn_in=2\)` cannot work with manual optimization",
    ),
    "step_per='batch' with a strategy that accumulates": (
        {"step_per": "batch"},
        {"strategy_accumulates": True, "strategy": "DeepSpeedStrategy"},
        ConfigurationError,
        r"cannot work with the strategy DeepSpeedStrategy",
    ),
}


def test_every_refusal_has_a_case_and_every_case_a_refusal():
    names = [refusal.name for refusal in REFUSALS]
    assert len(names) == len(set(names))
    assert set(names) == set(CASES)


def _settings(arguments: dict[str, Any]) -> Settings:
    arguments = {"segment_length": 8, **arguments}
    return Settings.from_arguments(arguments.pop("segment_length"), **arguments)


@pytest.mark.parametrize("name", list(CASES))
def test_each_refusal_raises_its_error_where_a_plain_callback_passes(name):
    arguments, facts, error, message = CASES[name]
    refusal = next(r for r in REFUSALS if r.name == name)
    with pytest.raises(error, match=message):
        settings = _settings(arguments)
        fit = FitFacts(**{"segment_length": 8, **facts})
        refuse(refusal.stage, settings.for_fit(fit.segment_length), fit)
    # a plain callback in a plain fit passes every stage
    plain = Settings.from_arguments(8)
    for stage in ("init", "setup", "training"):
        refuse(stage, plain, FitFacts(segment_length=8))


def test_the_settings_of_a_plain_callback_are_refused_nowhere():
    settings = TBPTTCallback(16, stride=8, burn_in=4, lengths="n", resets="r", streaming=True).settings
    for stage in ("init", "setup", "training"):
        refuse(stage, settings, FitFacts(segment_length=16, module="Net"))


INVALID = [
    ({"segment_length": 0}, r"`segment_length` to be a positive integer but got 0"),
    ({"segment_length": True}, r"`segment_length` to be a positive integer but got True"),
    ({"stride": -1}, r"`stride` to be a positive integer but got -1"),
    ({"loss_on": "all"}, r"`loss_on` to be one of \('new', 'window'\) but got 'all'"),
    ({"burn_in": -2}, r"`burn_in` to be a non-negative integer but got -2"),
    ({"time_dim": 1.0}, r"`time_dim` to be a non-negative integer but got 1.0"),
    ({"step_per": "epoch"}, r"`step_per` to be one of \('segment', 'batch'\) but got 'epoch'"),
    ({"log_every": "epoch"}, r"`log_every` to be one of \('step', 'batch'\) but got 'epoch'"),
    ({"nonfinite_state": "zero"}, r"`nonfinite_state` to be one of \('keep', 'reset'\) but got 'zero'"),
    ({"transfer": "device"}, r"`transfer` to be one of \('segment', 'batch'\) but got 'device'"),
    ({"recurrent_modules": "rnn"}, r"`recurrent_modules` to be a list of submodule names or a mapping of names to"),
    ({"recurrent_modules": {1: "x -> 1"}}, r"the keys of `recurrent_modules` to be submodule names but got \[1\]"),
    ({"exclude_modules": [1]}, r"`exclude_modules` to be a list of submodule names but got \[1\]"),
    ({"drop_finished": 1}, r"`drop_finished` to be a bool but got 1"),
    ({"streaming": "yes"}, r"`streaming` to be a bool but got 'yes'"),
    ({"evaluate": None}, r"`evaluate` to be a bool but got None"),
    ({"exact": "yes"}, r"`exact` to be a bool but got 'yes'"),
    ({"segment_length": "longest"}, r"`segment_length` to be 'auto' or a positive integer but got 'longest'"),
    ({"probe_every": 0}, r"`probe_every` to be a positive integer but got 0"),
    ({"probe_every": 2, "probe_tolerance": 0}, r"`probe_tolerance` to be a number between 0 and 1 .* got 0"),
    ({"probe_every": 2, "probe_tolerance": 1.5}, r"`probe_tolerance` to be a number between 0 and 1 .* got 1.5"),
    ({"probe_every": 2, "probe_tolerance": True}, r"`probe_tolerance` to be a number between 0 and 1 .* got True"),
    ({"probe_every": 2, "probe_horizon": 8}, r"`probe_horizon` to be longer than `segment_length` \(8\) but got 8"),
    (
        {"segment_length": "auto", "probe_horizon": 8},
        r"`probe_horizon` to be longer than `min_segment_length` \(8\) but got 8: .* `probe_horizon=32`",
    ),
    (
        {"probe_every": 0},
        r"Pass the training batches between probes, e.g. `TBPTTCallback\(segment_length=64, probe_every=50\)`",
    ),
    ({"probe_tolerance": 0.2}, r"`probe_tolerance` to be set only with a probe but got 0.2 without `probe_every`"),
    ({"probe_horizon": 64}, r"`probe_horizon` to be set only with a probe"),
    ({"min_segment_length": 4}, r"`min_segment_length` to be set only with `segment_length='auto'` but got 4"),
    ({"max_segment_length": 64}, r"`max_segment_length` to be set only with `segment_length='auto'`"),
    (
        {"segment_length": "auto", "min_segment_length": 32, "max_segment_length": 16},
        r"`max_segment_length` to be at least `min_segment_length=32` but got 16",
    ),
    ({"segment_length": "auto", "min_segment_length": 0}, r"`min_segment_length` to be a positive integer but got 0"),
    ({"lengths": 1.5}, r"`lengths`"),
    ({"resets": 1.5}, r"`resets`"),
]


@pytest.mark.parametrize(("arguments", "message"), INVALID, ids=["-".join(a) for a, _ in INVALID])
def test_each_invalid_value_is_refused_by_name(arguments, message):
    arguments = {"segment_length": 8, **arguments}
    with pytest.raises(ConfigurationError, match=message):
        TBPTTCallback(**arguments)


def test_the_callback_reads_its_settings_and_does_not_let_them_change():
    callback = TBPTTCallback(8, stride=4, burn_in=2, step_per="batch", lengths="n")
    assert (callback.segment_length, callback.stride, callback.burn_in, callback.step_per) == (8, 4, 2, "batch")
    assert callback.lengths == "n" and callback.settings.layout.lengths is not None
    with pytest.raises(AttributeError):
        callback.stride = 8  # type: ignore[misc]
    assert callback.settings.saved() == {
        "segment_length": 8,
        "stride": 4,
        "burn_in": 2,
        "step_per": "batch",
        "exact": False,
        "time_dim": 1,
        "loss_on": "new",
        "random_lengths": None,
    }
    assert re.fullmatch(r"TBPTTCallback\(segment_length=8, time_dim=1, step_per='batch'\)", repr(callback))
    exact = TBPTTCallback(8, exact=True)
    assert (exact.exact, exact.step_per, callback.exact) == (True, "batch", False)
    assert repr(exact) == "TBPTTCallback(segment_length=8, time_dim=1, step_per='batch', exact=True)"
    assert TBPTTCallback(8, exact=True, step_per="batch").step_per == "batch"


def test_auto_and_the_probe_read_their_settings():
    auto = TBPTTCallback("auto", min_segment_length=16, max_segment_length=100)
    assert (auto.segment_length, auto.current_segment_length, auto.probe_every) == ("auto", 64, 20)
    probe = auto.settings.probe
    assert probe is not None and (probe.auto, probe.tolerance, probe.longest, probe.span(64)) == (True, 0.1, 64, 128)
    assert auto.settings.saved()["segment_length"] == "auto"
    assert repr(auto) == "TBPTTCallback(segment_length='auto', time_dim=1, step_per='segment', probe_every=20)"
    fixed = TBPTTCallback(32, probe_every=7, probe_tolerance=0.05)
    probe = fixed.settings.probe
    assert probe is not None and (probe.auto, probe.every, probe.tolerance, probe.span(32)) == (False, 7, 0.05, 128)
    assert TBPTTCallback(32).probe_every is None and TBPTTCallback(32).probe_result is None
