"""Overlapping windows TBPTT(k1, k2) and burn-in, against hand-written reference loops of each semantics."""

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics import MeanSquaredError

from lightning_tbptt import BatchError, ConfigurationError, MaskedMetric, TBPTTCallback, current_segment, masked_mean
from lightning_tbptt.state import detach_state
from lightning_tbptt.windows import windows
from tests.helpers import LR, MOMENTUM, SequenceRegressor, make_loader, make_trainer, parameters_equal, reference_tbptt

K2, K1 = 7, 3  # windows of 7 steps every 3 steps; sequences of 23 steps: windows start at 0, 3, ..., 15, 18 (7 of them)


class WindowRegressor(SequenceRegressor):
    """Per-step regression with the library's masked loss; records the state carried into every window."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(log=False, **kwargs)
        self.window_states: list[Any] = []
        self.error = MaskedMetric(MeanSquaredError())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        segment = current_segment()
        if not segment.burn_in:
            stream = self.trainer.callbacks[0]._fit.streams["train"]  # the state this window starts from
            self.window_states.append(detach_state(stream.state.carried.get("rnn")))
        prediction = self(x)
        self.error.update(prediction.squeeze(-1), y.squeeze(-1))
        loss = masked_mean((prediction - y).pow(2).squeeze(-1))
        self.log("loss", loss, on_step=False, on_epoch=True)
        return loss


def reference_windows(
    model: SequenceRegressor,
    loader: Any,
    k2: int,
    k1: int,
    *,
    loss_on: str = "new",
    burn_in: int = 0,
    step_per: str = "segment",
    lengths: list[torch.Tensor] | None = None,
    streaming: bool = False,
) -> dict[str, Any]:
    """The oracle, written out: a burn-in prefix under no_grad, then windows of k2 steps every k1 steps; the state
    carried into a window is the previous window's state after k1 steps (its call split there); the loss is the mean
    squared error over the window's new steps, or over all of them."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    states, steps, seen = [], 0, 0
    state = None
    for b, (x, y) in enumerate(loader):
        length = x.shape[1] if lengths is None else int(lengths[b].max())
        valid = torch.ones(x.shape[:2], dtype=torch.bool)
        if lengths is not None:
            valid = torch.arange(x.shape[1]).unsqueeze(0) < lengths[b].unsqueeze(1)
        fresh = not streaming or b == 0
        state = None if fresh else state
        warm = burn_in if fresh else 0
        if warm:
            with torch.no_grad():
                _, state = model.rnn(x[:, :warm])
            state = detach_state(state)
        start, covered = warm, warm
        while covered < length:
            stop = min(start + k2, length)
            states.append(state)
            xw, yw = x[:, start:stop], y[:, start:stop]
            if stop < length and k1 < stop - start:
                first, carried = model.rnn(xw[:, :k1], state)
                rest, _ = model.rnn(xw[:, k1:], carried)
                out = torch.cat([first, rest], dim=1)
            else:
                out, carried = model.rnn(xw, state)
            seen += stop - start
            counts = valid[:, start:stop].clone()
            if loss_on == "new":
                counts[:, : covered - start] = False
            errors = (model.head(out) - yw).pow(2).squeeze(-1)
            loss = errors[counts].sum() / counts.sum().clamp(min=1)
            loss.backward()
            state = detach_state(carried)
            covered, start = stop, start + k1
            if step_per == "segment" or covered >= length:
                optimizer.step()
                optimizer.zero_grad()
                steps += 1
    return {"steps": steps, "states": states, "seen": seen}


def fit_windows(tmp_path: Any, callback: TBPTTCallback, loader: Any = None, **kwargs: Any) -> tuple[Any, Any, Any]:
    torch.manual_seed(0)
    model = WindowRegressor().double()
    reference = WindowRegressor().double()
    reference.load_state_dict(model.state_dict())
    trainer = make_trainer(tmp_path, [callback], **kwargs)
    trainer.fit(model, make_loader() if loader is None else loader)
    return model, reference, trainer


def assert_states_equal(recorded: list[Any], expected: list[Any]) -> None:
    assert len(recorded) == len(expected)
    for got, want in zip(recorded, expected, strict=True):
        if want is None:
            assert got is None
        else:
            assert all(torch.allclose(g, w, rtol=0, atol=1e-12) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("loss_on", ["new", "window"])
@pytest.mark.parametrize("step_per", ["segment", "batch"])
def test_overlapping_windows_equal_the_reference(tmp_path, loss_on, step_per):
    callback = TBPTTCallback(K2, stride=K1, loss_on=loss_on, step_per=step_per)
    model, reference, trainer = fit_windows(tmp_path, callback)
    expected = reference_windows(reference, make_loader(), K2, K1, loss_on=loss_on, step_per=step_per)
    assert trainer.global_step == expected["steps"] == (3 * 7 if step_per == "segment" else 3)
    assert parameters_equal(model, reference, rtol=0, atol=1e-12)
    assert_states_equal(model.window_states, expected["states"])
    assert model.window_states[1] is not None  # carried from the previous window


def test_loss_on_new_steps_and_on_the_window_differ(tmp_path):
    new, _, _ = fit_windows(tmp_path / "new", TBPTTCallback(K2, stride=K1, loss_on="new"))
    window, _, _ = fit_windows(tmp_path / "window", TBPTTCallback(K2, stride=K1, loss_on="window"))
    assert not parameters_equal(new, window, rtol=0, atol=1e-6)


def test_carrying_the_end_of_the_previous_window_would_differ(tmp_path):
    # the seed blog's bug: the state from the end of a window fed into a window that starts earlier
    model, reference, _ = fit_windows(tmp_path, TBPTTCallback(K2, stride=K1))
    expected = reference_windows(reference, make_loader(), K2, K1)
    wrong = WindowRegressor().double()
    torch.manual_seed(0)
    wrong.load_state_dict(WindowRegressor().double().state_dict())
    optimizer = torch.optim.SGD(wrong.parameters(), lr=LR, momentum=MOMENTUM)
    for x, y in make_loader():
        state = None
        for start in range(0, 23 - K2 + K1, K1):
            out, state = wrong.rnn(x[:, start : start + K2], state)
            mask = torch.zeros(out.shape[1], dtype=torch.bool)
            mask[(0 if start == 0 else K2 - K1) :] = True
            F.mse_loss(wrong.head(out)[:, mask], y[:, start : start + K2][:, mask]).backward()
            optimizer.step()
            optimizer.zero_grad()
            state = detach_state(state)
    assert parameters_equal(model, reference, rtol=0, atol=1e-12)
    assert not parameters_equal(model, wrong, rtol=0, atol=1e-6)
    assert expected["steps"] == 21


def test_a_stride_equal_to_the_segment_length_is_plain_tbptt(tmp_path):
    torch.manual_seed(0)
    model = SequenceRegressor(log=False).double()
    reference = SequenceRegressor(log=False).double()
    reference.load_state_dict(model.state_dict())
    trainer = make_trainer(tmp_path, [TBPTTCallback(5, stride=5)])
    trainer.fit(model, make_loader())
    result = reference_tbptt(reference, make_loader(), segment_length=5)
    assert trainer.global_step == result["steps"] == 15
    assert parameters_equal(model, reference, rtol=0, atol=1e-12)


def test_each_step_is_computed_in_about_k2_over_k1_windows_and_no_more(tmp_path):
    model, _, _ = fit_windows(tmp_path, TBPTTCallback(K2, stride=K1))
    seen = []
    forward = model.rnn.forward

    def counting(input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:  # every computation, split calls included
        seen.append(input.shape[1])
        return forward(input, *args, **kwargs)

    model.rnn.forward = counting
    trainer = make_trainer(tmp_path, [TBPTTCallback(K2, stride=K1)], limit_train_batches=1)
    trainer.fit(model, make_loader())
    # each window's call runs once (split at the next window's start: two calls of its steps), nothing re-run
    assert sum(seen) == sum(w.stop - w.start for w in windows(23, K2, K1)) == 47  # vs 23 without overlap
    assert sum(seen) / 23 <= K2 / K1


def test_metrics_over_an_overlapped_epoch_count_every_step_once_and_equal_the_plain_sequence(tmp_path):
    # with a learning rate of 0 the predictions of every window are those of one pass over the whole sequence
    class Frozen(WindowRegressor):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    torch.manual_seed(0)
    model = Frozen().double()
    trainer = make_trainer(tmp_path, [TBPTTCallback(K2, stride=K1)])
    trainer.fit(model, make_loader())
    assert int(model.error.metric.total) == 12 * 23  # every step of every sequence, once
    x, y = next(iter(DataLoader(make_loader().dataset, batch_size=12)))
    with torch.no_grad():
        full = F.mse_loss(model(x), y)
    assert float(model.error.compute()) == pytest.approx(float(full), rel=1e-6)  # float32 metric state
    assert float(trainer.callback_metrics["loss"]) == pytest.approx(float(full), rel=1e-12)  # token-weighted


def test_burn_in_equals_the_reference_and_counts_nothing(tmp_path):
    model, reference, trainer = fit_windows(tmp_path, TBPTTCallback(K2, stride=K1, burn_in=4))
    expected = reference_windows(reference, make_loader(), K2, K1, burn_in=4)
    assert trainer.global_step == expected["steps"]
    assert parameters_equal(model, reference, rtol=0, atol=1e-12)
    assert_states_equal(model.window_states, expected["states"])
    assert model.window_states[0] is not None  # the first window starts from the burn-in state
    assert int(model.error.metric.total) == 12 * (23 - 4)


def padded_batches(lengths: list[torch.Tensor]) -> list[Any]:
    """The 3 batches of 4 sequences of ``make_loader``, with these lengths (batches of ``(x, y, lengths)``)."""
    x, y = make_loader().dataset.tensors
    return [(x[4 * b : 4 * b + 4], y[4 * b : 4 * b + 4], lengths[b]) for b in range(3)]


class Padded(WindowRegressor):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch[:2], batch_idx)


def test_burn_in_before_plain_segments_with_lengths(tmp_path):
    lengths = [torch.tensor([23, 9, 14, 6]), torch.tensor([20, 23, 8, 11]), torch.tensor([5, 12, 23, 17])]
    batches = padded_batches(lengths)

    torch.manual_seed(0)
    model = Padded().double()
    reference = WindowRegressor().double()
    reference.load_state_dict(model.state_dict())
    trainer = make_trainer(tmp_path, [TBPTTCallback(6, burn_in=3, lengths=2)])
    trainer.fit(model, DataLoader(batches, batch_size=None))
    expected = reference_windows(reference, [b[:2] for b in batches], 6, 6, burn_in=3, lengths=lengths)
    assert trainer.global_step == expected["steps"] == 4 + 4 + 4  # 20 steps after burn-in: segments of 6
    assert parameters_equal(model, reference, rtol=0, atol=1e-12)
    assert int(model.error.metric.total) == sum(int((length - 3).clamp(min=0).sum()) for length in lengths)


def test_burn_in_in_evaluation_is_run_but_not_counted(tmp_path):
    class Evaluated(WindowRegressor):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.error.update(self(x).squeeze(-1), y.squeeze(-1))

    torch.manual_seed(0)
    model = Evaluated().double()
    trainer = make_trainer(tmp_path, [TBPTTCallback(K2, stride=K1, burn_in=4)])
    trainer.validate(model, make_loader())
    assert int(model.error.metric.total) == 12 * (23 - 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stride": 0}, "`stride` to be a positive integer but got 0"),
        ({"stride": 8}, "`stride` to be at most `segment_length=7` but got 8"),
        ({"burn_in": -1}, "`burn_in` to be a non-negative integer but got -1"),
        ({"loss_on": "all"}, "`loss_on` to be one of"),
    ],
)
def test_bad_window_arguments(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        TBPTTCallback(K2, **kwargs)


def test_a_burn_in_as_long_as_the_sequence_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, [TBPTTCallback(K2, burn_in=23)])
    with pytest.raises(
        BatchError, match="`burn_in` to be shorter than the batch's sequences \\(23 steps\\) but got 23"
    ):
        trainer.fit(WindowRegressor().double(), make_loader())


def test_overlapping_windows_with_lengths_and_dropped_rows(tmp_path):
    lengths = [torch.tensor([23, 9, 14, 6]), torch.tensor([20, 23, 8, 11]), torch.tensor([5, 12, 21, 17])]
    batches = padded_batches(lengths)

    fitted = []
    for drop in (False, True):
        torch.manual_seed(0)
        model = Padded().double()
        trainer = make_trainer(tmp_path, [TBPTTCallback(K2, stride=K1, lengths=2, drop_finished=drop)])
        trainer.fit(model, DataLoader(batches, batch_size=None))
        fitted.append((model, trainer.global_step))
    torch.manual_seed(0)
    reference = WindowRegressor().double()
    expected = reference_windows(reference, [b[:2] for b in batches], K2, K1, lengths=lengths)
    assert (
        fitted[0][1] == fitted[1][1] == expected["steps"] == 7 + 7 + 6
    )  # windows up to each longest sequence (23, 23, 21)
    assert parameters_equal(fitted[0][0], reference, rtol=0, atol=1e-12)
    assert parameters_equal(fitted[1][0], reference, rtol=0, atol=1e-12)


def test_streaming_windows_carry_each_batch_end_and_burn_in_only_where_the_stream_starts(tmp_path):
    model, reference, trainer = fit_windows(tmp_path, TBPTTCallback(K2, stride=K1, burn_in=4, streaming=True))
    expected = reference_windows(reference, make_loader(), K2, K1, burn_in=4, streaming=True)
    assert trainer.global_step == expected["steps"] == 5 + 7 + 7  # burn-in only before the first batch
    assert parameters_equal(model, reference, rtol=0, atol=1e-12)
    assert_states_equal(model.window_states, expected["states"])
    assert int(model.error.metric.total) == 12 * 23 - 4 * 4


def test_resuming_streamed_windows_mid_epoch_equals_the_uninterrupted_run(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from tests.test_resume import StreamRegressor, stream_data

    def fit(ckpt_path: Any = None) -> Any:
        torch.manual_seed(0)
        model = StreamRegressor().double()
        callbacks: list[Any] = [TBPTTCallback(5, stride=2, burn_in=3, streaming=True, resets="starts")]
        if ckpt_path is None:
            callbacks.append(ModelCheckpoint(tmp_path, "{epoch}-{step}", every_n_train_steps=8, save_top_k=-1))
        trainer = make_trainer(tmp_path, callbacks, max_epochs=2, enable_checkpointing=ckpt_path is None)
        trainer.fit(model, datamodule=stream_data(), ckpt_path=ckpt_path)
        return model, trainer

    uninterrupted, trainer = fit()
    # batches of 12 steps: 3 windows after the epoch's burn-in, then 5 (windows of 5 steps every 2)
    resumed, resumed_trainer = fit(tmp_path / "epoch=0-step=8.ckpt")  # after the second batch of the first epoch
    assert resumed_trainer.global_step == trainer.global_step
    assert parameters_equal(uninterrupted, resumed, rtol=0, atol=1e-12)


class Splitting(TBPTTCallback):
    def split_batch(self, batch: Any, segment_length: int) -> Any:
        return super().split_batch(batch, segment_length)


class WithHiddens(SequenceRegressor):
    def training_step(self, batch: Any, batch_idx: int, hiddens: Any) -> Any:
        out, hiddens = self.rnn(batch[0], hiddens)
        return {"loss": F.mse_loss(self.head(out), batch[1]), "hiddens": hiddens}


class Manual(WindowRegressor):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


@pytest.mark.parametrize(
    ("callback", "model", "match"),
    [
        (Splitting(K2, stride=K1), WindowRegressor, "`TBPTTCallback\\(stride=3\\)` cannot be combined with a custom"),
        (Splitting(K2, burn_in=2), WindowRegressor, "`TBPTTCallback\\(burn_in=2\\)` cannot be combined with a custom"),
        (TBPTTCallback(K2, stride=K1), WithHiddens, "`TBPTTCallback\\(stride=3\\)` cannot work with `hiddens`"),
        (TBPTTCallback(K2, burn_in=2), WithHiddens, "`TBPTTCallback\\(burn_in=2\\)` cannot work with `hiddens`"),
        (TBPTTCallback(K2, burn_in=2), Manual, "`TBPTTCallback\\(burn_in=2\\)` cannot work with manual optimization"),
    ],
)
def test_combinations_that_cannot_be_honoured(tmp_path, callback, model, match):
    trainer = make_trainer(tmp_path, [callback])
    with pytest.raises(ConfigurationError, match=match):
        trainer.fit(model().double(), make_loader())


def test_a_stride_longer_than_the_modules_truncated_bptt_steps(tmp_path):
    model = WindowRegressor().double()
    model.truncated_bptt_steps = 4
    trainer = make_trainer(tmp_path, [TBPTTCallback(stride=5)])
    with pytest.raises(ConfigurationError, match="`stride` to be at most the segment length 4"):
        trainer.fit(model, make_loader())


class Recording(WindowRegressor):
    """Frozen (learning rate 0): records every window's outputs, to compare with one pass over the whole stream."""

    def __init__(self) -> None:
        super().__init__()
        self.windows: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        self.grad_in_burn_in: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        segment = current_segment()
        out = self(batch[0])
        if segment.burn_in:
            self.grad_in_burn_in.append(torch.is_grad_enabled() or out.requires_grad)
        else:
            self.windows.append((segment, out.detach(), batch_idx))
        valid = segment.mask
        # NaN over a burn-in segment (no valid step): must reach no log
        self.log("plain_mse", F.mse_loss(out.squeeze(-1)[valid], batch[1].squeeze(-1)[valid]), on_epoch=True)
        return masked_mean((out - batch[1]).pow(2).squeeze(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def stepwise(model: Any, batches: list[Any], streaming: bool) -> list[torch.Tensor]:
    """Every batch's outputs, one step at a time, zeroing a row's state where its marker is set."""
    outputs, state = [], None
    for x, _, starts in batches:
        state = state if streaming else None
        steps = []
        for t in range(x.shape[1]):
            if state is not None:
                keep = (~starts[:, t]).to(x.dtype).view(1, -1, 1)
                state = tuple(s * keep for s in state)
            out, state = model.rnn(x[:, t : t + 1], state)
            steps.append(model.head(out))
        outputs.append(torch.cat(steps, dim=1))
    return outputs


@pytest.mark.parametrize("streaming", [True, False])
def test_every_window_sees_the_exact_state_around_resets_at_and_near_the_cut(tmp_path, streaming):
    # windows of 6 steps every 3 over 17 steps; markers on cuts, next to them and at a batch start
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        x = torch.randn(3, 17, 3, generator=generator, dtype=torch.float64)
        starts = torch.zeros(3, 17, dtype=torch.bool)
        starts[0, 6] = starts[1, 10] = starts[2, 8] = starts[1, 0] = True
        batches.append((x, torch.randn(3, 17, 1, generator=generator, dtype=torch.float64), starts))
    torch.manual_seed(0)
    model = Recording().double()
    callback = TBPTTCallback(6, stride=3, burn_in=2, resets=2, streaming=streaming)
    trainer = make_trainer(tmp_path, [callback])
    trainer.fit(model, DataLoader(batches, batch_size=None))
    with torch.no_grad():
        expected = stepwise(model, batches, streaming)
    # after a burn-in of 2: windows at 2, 5, 8, 11 (cuts at 5, 8, 11, 14); else at 0, 3, 6, 9, 12
    assert len(model.windows) == (4 + 5 if streaming else 4 + 4)
    for segment, out, batch_idx in model.windows:
        whole = expected[batch_idx]
        assert torch.allclose(out, whole[:, segment.start : segment.stop], rtol=0, atol=1e-10), segment.start
    assert model.grad_in_burn_in == ([False] if streaming else [False, False])  # burn-in builds no graph
    assert torch.isfinite(trainer.callback_metrics["plain_mse"])  # the burn-in's NaN reached no log


def test_every_window_sees_the_exact_state_with_lengths_and_dropped_rows(tmp_path):
    x, y = make_loader().dataset.tensors
    lengths = torch.tensor([23, 9, 14, 6])
    batches = [(x[:4], y[:4], lengths)]

    class Padded(Recording):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            segment = current_segment()
            out = self(batch[0])
            self.windows.append((segment, out.detach(), batch_idx))
            return masked_mean((out - batch[1]).pow(2).squeeze(-1))

    torch.manual_seed(0)
    model = Padded().double()
    make_trainer(tmp_path, [TBPTTCallback(K2, stride=K1, lengths=2, drop_finished=True)]).fit(
        model, DataLoader(batches, batch_size=None)
    )
    with torch.no_grad():
        (expected,) = stepwise(model, [(x[:4], y[:4], torch.zeros(4, 23, dtype=torch.bool))], streaming=False)
    for segment, out, _ in model.windows:
        rows = torch.arange(4) if segment.rows is None else segment.rows
        valid = segment.valid_mask
        want = expected[rows, segment.start : segment.stop]
        assert torch.allclose(out[valid], want[valid], rtol=0, atol=1e-10), segment.start
    assert any(segment.rows is not None for segment, _, _ in model.windows)  # rows were dropped


def test_an_evaluation_batch_shorter_than_the_burn_in_is_run_but_not_counted(tmp_path):
    class Evaluated(WindowRegressor):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.error.update(self(x).squeeze(-1), y.squeeze(-1))

    model = Evaluated().double()
    make_trainer(tmp_path, [TBPTTCallback(K2, burn_in=30)]).validate(model, make_loader())
    assert int(model.error.metric.total) == 0
