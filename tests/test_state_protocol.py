"""The state protocol (``recurrent_modules={name: spec}``): other kinds of state, each against a hand-written loop.

Every kind of :mod:`tests.state_kinds` (an ``LSTMCell`` loop, a minGRU layer taking ``initial_state=``, a
Transformer-XL-style memory that is time-first and longer than nothing in particular, a dataclass output) is trained
through the callback and by a plain loop that passes the state itself, with :func:`tests.state_kinds.call`.
"""

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lightning_tbptt import ConfigurationError, ModelError, TBPTTCallback
from lightning_tbptt.protocol import StateSpec
from lightning_tbptt.state import detach_state
from tests.helpers import LR, MOMENTUM, loader_of, make_loader, make_trainer, parameters_equal, twin
from tests.state_kinds import KINDS, KindRegressor, call, recurrent_modules
from tests.test_streaming import SEGMENT, lane_batches

KIND_NAMES = list(KINDS)


def kind_model(kind: str) -> KindRegressor:
    torch.manual_seed(0)
    return KindRegressor(kind).double()


def zero_rows(kind: str, state: Any, rows: torch.Tensor) -> Any:
    """The state with the rows of the boolean mask ``rows`` zeroed (the hand-written loop's reset)."""
    dim = KINDS[kind]["batch_dim"]

    def zero(tensor: torch.Tensor) -> torch.Tensor:
        shape = [1] * tensor.dim()
        shape[dim] = rows.numel()
        return torch.where(rows.view(shape), torch.zeros((), dtype=tensor.dtype), tensor)

    if isinstance(state, torch.Tensor):
        return zero(state)
    return type(state)(zero(t) for t in state)


def reference(
    kind: str, model: KindRegressor, batches: list[Any], segment_length: int, *, step_per: str = "segment"
) -> int:
    """The oracle: TBPTT by hand, the state passed explicitly; a reset splits the call and zeroes the rows."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    steps = 0
    state = None
    for batch in batches:
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        starts = batch.get("starts") if isinstance(batch, dict) else None
        if starts is None:
            state = None  # not streaming: every batch from zeros
        length = x.shape[1]
        for start in range(0, length, segment_length):
            stop = min(start + segment_length, length)
            cuts = [] if starts is None else [s for s in range(start, stop) if bool(starts[:, s].any())]
            pieces, begin = [], start
            for cut in [*cuts, stop]:
                if cut > begin:
                    out, state = call(kind, model.rnn, x[:, begin:cut], state)
                    pieces.append(out)
                if cut < stop and state is not None:
                    state = zero_rows(kind, state, starts[:, cut])
                begin = cut
            loss = F.mse_loss(model.head(torch.cat(pieces, dim=1)), y[:, start:stop])
            loss.backward()
            state = detach_state(state)
            if step_per == "segment" or stop == length:
                optimizer.step()
                optimizer.zero_grad()
                steps += 1
    return steps


@pytest.mark.parametrize("step_per", ["segment", "batch"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_each_kind_equals_the_loop_that_passes_the_state_by_hand(tmp_path, kind, step_per):
    model = kind_model(kind)
    expected = twin(model)
    batches = list(make_loader(4, num_sequences=8, length=20))
    callback = TBPTTCallback(6, step_per=step_per, recurrent_modules=recurrent_modules(kind))
    trainer = make_trainer(tmp_path, [callback])
    trainer.fit(model, loader_of(batches))
    steps = reference(kind, expected, batches, 6, step_per=step_per)
    assert trainer.global_step == steps == (8 if step_per == "segment" else 2)
    assert parameters_equal(model, expected)
    # the state was carried: without it, the same fit differs
    cut = kind_model(kind)
    make_trainer(tmp_path, [TBPTTCallback(6, step_per=step_per, exclude_modules=["rnn"])]).fit(cut, loader_of(batches))
    assert not parameters_equal(cut, expected)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_streaming_with_resets_inside_segments_equals_the_hand_written_loop(tmp_path, kind):
    model = kind_model(kind)
    expected = twin(model)
    batches = lane_batches()
    callback = TBPTTCallback(SEGMENT, streaming=True, resets="starts", recurrent_modules=recurrent_modules(kind))

    class Dicts(KindRegressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.mse_loss(self(batch["x"]), batch["y"])

    dicts = Dicts(kind).double()
    dicts.load_state_dict(model.state_dict())
    trainer = make_trainer(tmp_path, [callback])
    trainer.fit(dicts, loader_of(batches))
    assert trainer.global_step == reference(kind, expected, batches, SEGMENT) == 9
    assert parameters_equal(dicts, expected)


def reference_exact(kind: str, model: KindRegressor, batches: list[Any], segment_length: int) -> int:
    """The oracle of ``exact=True``: the same segments, the state passed on with its graph, one backward per batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for x, y in batches:
        state, total = None, 0.0
        for start in range(0, x.shape[1], segment_length):
            piece = slice(start, start + segment_length)
            out, state = call(kind, model.rnn, x[:, piece], state)
            total = total + F.mse_loss(model.head(out), y[:, piece])
        total.backward()
        optimizer.step()
        optimizer.zero_grad()
    return len(batches)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_exact_gradients_through_each_kind_equal_the_loop_that_keeps_the_graph(tmp_path, kind):
    model = kind_model(kind)
    expected, truncated = twin(model), twin(model)
    batches = list(make_loader(4, num_sequences=8, length=20))
    trainer = make_trainer(tmp_path, [TBPTTCallback(6, exact=True, recurrent_modules=recurrent_modules(kind))])
    trainer.fit(model, loader_of(batches))
    assert trainer.global_step == reference_exact(kind, expected, batches, 6) == 2
    assert parameters_equal(model, expected)
    reference(kind, truncated, batches, 6, step_per="batch")
    assert not parameters_equal(model, truncated)  # (the gradient through the state matters)


class Predicting(KindRegressor):
    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_segmented_prediction_carries_each_kind_as_the_hand_written_loop(tmp_path, kind):
    torch.manual_seed(0)
    model = Predicting(kind).double()
    batches = list(make_loader(4, num_sequences=8, length=20))
    callback = TBPTTCallback(6, recurrent_modules=recurrent_modules(kind))
    predicted = make_trainer(tmp_path, [callback]).predict(model, loader_of(batches))
    with torch.no_grad():
        for (x, _), got in zip(batches, predicted, strict=True):
            state, pieces = None, []
            for start in range(0, 20, 6):
                out, state = call(kind, model.rnn, x[:, start : start + 6], state)
                pieces.append(model.head(out))
            assert torch.allclose(got, torch.cat(pieces, dim=1), rtol=0, atol=1e-12)


class Streamed(KindRegressor):
    """Reads the scalar streams of ``LaneDataModule`` (lifted to the kinds' 3 inputs by a fixed map)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        lift = torch.tensor([1.0, -0.5, 0.25], dtype=batch["input"].dtype)
        prediction = self(batch["input"].unsqueeze(-1) * lift).squeeze(-1)
        return F.mse_loss(prediction, batch["target"])


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_resuming_each_kind_mid_epoch_equals_the_uninterrupted_run(tmp_path, kind):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from tests.test_resume import stream_data

    def fit(ckpt_path: Any = None) -> Any:
        torch.manual_seed(0)
        model = Streamed(kind).double()
        callbacks: list[Any] = [
            TBPTTCallback(5, streaming=True, resets="starts", recurrent_modules=recurrent_modules(kind)),
            ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=9, save_top_k=-1),
        ]
        trainer = make_trainer(tmp_path, callbacks, max_epochs=1, enable_checkpointing=True, gradient_clip_val=0.5)
        trainer.fit(model, datamodule=stream_data(), ckpt_path=ckpt_path)
        return model

    whole = fit()
    checkpoint = torch.load(tmp_path / "step=9.ckpt", weights_only=True)
    (entry,) = [v for k, v in checkpoint["callbacks"].items() if "TBPTTCallback" in k]
    assert "rnn" in entry["carried"]  # the state of the kind, in the checkpoint
    (tmp_path / "step=18.ckpt").unlink()
    resumed = fit(tmp_path / "step=9.ckpt")
    assert parameters_equal(resumed, whole, rtol=0, atol=1e-12)


def test_dropping_finished_rows_slices_a_state_along_its_declared_batch_dimension(tmp_path):
    # the time-first memory (batch along dimension 1 of each tensor): dropping rows must not change the result
    from lightning_tbptt import masked_mean
    from tests.helpers import LENGTHS, padded_batches

    class Masked(KindRegressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return masked_mean((self(batch["x"]) - batch["y"]).pow(2).squeeze(-1))

    models = []
    for drop in (False, True):
        torch.manual_seed(0)
        model = Masked("memory-attention").double()
        callback = TBPTTCallback(
            4, lengths="lengths", drop_finished=drop, recurrent_modules=recurrent_modules("memory-attention")
        )
        # (clipped: the attention diverges on these batches without it, and both runs with it)
        make_trainer(tmp_path, [callback], gradient_clip_val=0.5).fit(model, loader_of(padded_batches(LENGTHS)))
        models.append(model)
    assert parameters_equal(*models, rtol=0, atol=1e-12)


def test_windows_carry_a_named_output_state_from_the_stride_as_the_gru_inside_it(tmp_path):
    # the dataclass output, split at the next window's start: the same as its GRU carried directly
    from tests.helpers import SequenceRegressor

    batches = list(make_loader(4, num_sequences=8, length=20))
    named = kind_model("named-output")
    plain = SequenceRegressor(cell="gru", input_size=3, hidden_size=6, log=False).double()
    plain.rnn.load_state_dict(named.rnn.gru.state_dict())
    plain.head.load_state_dict(named.head.state_dict())
    for model, modules in ((named, recurrent_modules("named-output")), (plain, ())):
        make_trainer(tmp_path, [TBPTTCallback(6, stride=4, recurrent_modules=modules)]).fit(model, loader_of(batches))
    assert torch.allclose(named.rnn.gru.weight_hh_l0, plain.rnn.weight_hh_l0, rtol=0, atol=1e-12)
    assert torch.allclose(named.head.weight, plain.head.weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("initial_state", r"Expected `recurrent_modules\['rnn'\]` to be a string 'IN -> OUT' .* got 'initial_state'"),
        ({"state_in": True}, r"Expected `state_in` of `recurrent_modules\['rnn'\]` to be an argument's index or name"),
        ({"bogus": 1}, r"Expected the keys of `recurrent_modules\['rnn'\]` to be among .* but got \['bogus'\]"),
        ({"state_out": 1.5}, r"Expected `state_out` of `recurrent_modules\['rnn'\]` to be an index, a name, a dotted"),
        ({"batch_dim": "1"}, r"Expected `batch_dim` of `recurrent_modules\['rnn'\]` to be an integer but got '1'"),
        ({"zero_rows": 3}, r"Expected `zero_rows` of `recurrent_modules\['rnn'\]` to be a function but got 3"),
        (3.5, r"Expected `recurrent_modules\['rnn'\]` to be a StateSpec, a string 'IN -> OUT' or a mapping"),
    ],
)
def test_a_bad_spec_is_refused_when_the_callback_is_made(value, message):
    with pytest.raises(ConfigurationError, match=message):
        TBPTTCallback(6, recurrent_modules={"rnn": value})


def fit_kind(tmp_path: Any, kind: str, spec: Any, batches: Any = None, **kwargs: Any) -> KindRegressor:
    model = kind_model(kind)
    callback = TBPTTCallback(SEGMENT, recurrent_modules={"rnn": spec}, **kwargs)
    make_trainer(tmp_path, [callback]).fit(
        model, loader_of(batches or list(make_loader(4, num_sequences=8, length=20)))
    )
    return model


def test_a_spec_naming_a_keyword_forward_does_not_take_is_refused_at_fit_start(tmp_path):
    model = kind_model("min-gru")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match=r"Expected the forward of `rnn` \(MinGRU\) to take the keyword `state` its"):
        fit_kind(tmp_path, "min-gru", "state -> 1")
    assert all(torch.equal(before[k], v) for k, v in kind_model("min-gru").state_dict().items())


def test_an_output_path_not_in_what_the_module_returns_is_refused_with_what_it_returns(tmp_path):
    message = (
        r"Expected what `rnn` returns to hold `state_out=mems.2` but mems is a tuple of 2, which has no 2\. Give the"
        r" spec the path of its new state"
    )
    with pytest.raises(ModelError, match=message):
        fit_kind(tmp_path, "memory-attention", {"state_in": "mems", "state_out": "mems.2", "output": "hidden"})
    with pytest.raises(ModelError, match=r"`output=sequence` but the returned value is a tuple of 2"):
        fit_kind(tmp_path, "min-gru", {"state_in": "initial_state", "output": "sequence"})


def test_a_state_whose_batch_axis_cannot_be_found_says_how_to_declare_it(tmp_path):
    # a memory of 4 steps of 4 lanes: (4, 4, 6), two dimensions of the batch's size; found at the first reset
    spec = {"state_in": "mems", "state_out": "mems", "output": "hidden"}

    class Dicts(KindRegressor):
        def __init__(self) -> None:
            super().__init__("memory-attention")
            self.rnn.memory = 4

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.mse_loss(self(batch["x"]), batch["y"])

    callback = TBPTTCallback(SEGMENT, streaming=True, resets="starts", recurrent_modules={"rnn": spec})
    with pytest.raises(ModelError, match=r"Declare the dimension that holds the rows in the module's state spec"):
        make_trainer(tmp_path, [callback]).fit(Dicts().double(), loader_of(lane_batches()))
    spec_with_dim = {**spec, "batch_dim": 1}
    callback = TBPTTCallback(SEGMENT, streaming=True, resets="starts", recurrent_modules={"rnn": spec_with_dim})
    make_trainer(tmp_path, [callback]).fit(Dicts().double(), loader_of(lane_batches()))


def test_a_spec_for_a_module_that_does_not_exist_is_refused(tmp_path):
    callback = TBPTTCallback(6, recurrent_modules={"encoder": "initial_state -> 1"})
    with pytest.raises(ModelError, match=r"Expected every name in `recurrent_modules` to be a submodule of"):
        make_trainer(tmp_path, [callback]).fit(kind_model("min-gru"), make_loader(4, num_sequences=8, length=20))


def test_spec_parse_forms():
    assert StateSpec.parse("initial_state -> 1") == StateSpec(state_in="initial_state", state_out=(1,))
    assert StateSpec.parse("2 -> cache.0") == StateSpec(state_in=2, state_out=("cache", 0))
    spec = StateSpec(state_in="mems", state_out=("mems",), batch_dim=1)
    assert StateSpec.parse(spec) is spec
    assert TBPTTCallback(6, recurrent_modules={"rnn": "initial_state -> 1"}).recurrent_modules == {
        "rnn": StateSpec(state_in="initial_state", state_out=(1,))
    }
    assert TBPTTCallback(6, recurrent_modules=["rnn"]).recurrent_modules == ("rnn",)


class SecondHalf(KindRegressor):
    """Scores only the second half of the batch (what the probe scores when it spans the batch)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        from lightning_tbptt import current_segment

        x, y = batch
        start = current_segment().start
        assert start is not None
        return F.mse_loss(self(x), y) * float(start >= 10)


@pytest.mark.parametrize("kind", ["min-gru", "memory-attention"])
def test_the_probe_measures_the_bias_through_a_spec(tmp_path, kind):
    from lightning_tbptt.probe import relative_difference
    from tests.test_probe import first_gradient

    torch.manual_seed(0)
    model = SecondHalf(kind).double()
    loader = make_loader(4, num_sequences=4, length=20)
    specs = recurrent_modules(kind)
    callback = TBPTTCallback(5, probe_every=1, probe_horizon=20, recurrent_modules=specs)
    make_trainer(tmp_path, [callback], limit_train_batches=1).fit(twin(model), loader)
    result = callback.probe_result
    assert result is not None and result.bias is not None and result.bias > 0.001
    exact = first_gradient(tmp_path, twin(model), TBPTTCallback(5, exact=True, recurrent_modules=specs), loader)
    truncated = first_gradient(
        tmp_path, twin(model), TBPTTCallback(5, step_per="batch", recurrent_modules=specs), loader
    )
    assert abs(result.bias - relative_difference(exact, truncated)) < 1e-8


def test_a_namedtuple_output_named_by_field_is_split_and_joined(tmp_path):
    from collections import namedtuple

    Returned = namedtuple("Returned", ["seq", "last"])

    class Named(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = torch.nn.GRU(3, 6, batch_first=True)

        def forward(self, x: torch.Tensor, h0: Any = None) -> Any:
            return Returned(*self.gru(x, h0))

    spec = {"state_in": "h0", "state_out": "last", "output": "seq", "batch_dim": 1}
    model = kind_model("named-output")
    plain = twin(model)
    model.rnn = Named()
    model.rnn.gru.load_state_dict(plain.rnn.gru.state_dict())
    model.kind = "tuple"  # (called as a tuple: output first)
    batches = lane_batches()

    class Dicts(KindRegressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.mse_loss(self(batch["x"]), batch["y"])

    results = []
    for rnn, modules in ((model.rnn, {"rnn": spec}), (plain.rnn, recurrent_modules("named-output"))):
        fitted = Dicts("named-output").double()
        fitted.rnn = rnn.double()
        fitted.head.load_state_dict(plain.head.state_dict())
        fitted.kind = "tuple" if rnn is model.rnn else "named-output"
        callback = TBPTTCallback(SEGMENT, streaming=True, resets="starts", recurrent_modules=modules)
        make_trainer(tmp_path, [callback]).fit(fitted, loader_of(batches))
        results.append(fitted)
    assert torch.allclose(results[0].head.weight, results[1].head.weight, rtol=0, atol=1e-12)


def test_a_given_spec_reads_a_longer_tuple(tmp_path):
    class Triple(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = torch.nn.GRU(3, 6, batch_first=True)

        def forward(self, x: torch.Tensor, state: Any = None) -> Any:
            out, h = self.gru(x, state)
            return out, h, out.norm()

    model = kind_model("named-output")
    model.rnn = Triple().double()
    model.kind = "tuple"
    make_trainer(tmp_path, [TBPTTCallback(6, recurrent_modules={"rnn": "1 -> 1"})]).fit(
        model, make_loader(4, num_sequences=8, length=20)
    )
    with pytest.raises(ModelError, match=r"to return `\(output, new_state\)` but got tuple"):
        make_trainer(tmp_path, [TBPTTCallback(6, recurrent_modules=["rnn"])]).fit(
            model, make_loader(4, num_sequences=8, length=20)
        )


def test_a_state_spec_made_directly_is_checked_and_normalised():
    assert StateSpec(state_in="h0", state_out="last").state_out == ("last",)
    assert StateSpec(state_out=1).state_out == (1,)
    with pytest.raises(ConfigurationError, match=r"Expected `batch_dim` of a `StateSpec` to be an integer"):
        StateSpec(batch_dim="1")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"dotted path but got '1..h'"):
        StateSpec.parse("hidden -> 1..h")
