"""Randomised segment lengths: equal to a hand-written loop with the same draws, in every mode that cuts training."""

import copy
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_tbptt import RandomLengths, TBPTTCallback, current_segment, masked_mean
from lightning_tbptt.errors import ConfigurationError
from lightning_tbptt.state import detach_state
from tests.helpers import LR, MOMENTUM, SequenceRegressor, loader_of, make_loader, make_trainer, padded_batches
from tests.test_resume import SavesEveryBatch, StreamRegressor, stream_data

K = 8
OPTIONS = {"seed": 7, "std": 2.0, "minimum": 2}
LENGTH = 40


def awd(seed: int, epoch: int, batch: int, base: int, p: float = 0.95, std: float = 2.0, minimum: int = 2) -> Any:
    """AWD-LSTM's draws, as its paper and the documentation state them, from the documented generator."""
    generator = random.Random(f"{seed}:{epoch}:{batch}")
    while True:
        centre = base if generator.random() < p else base / 2
        yield max(minimum, int(generator.gauss(centre, std)))


def offset(seed: int, epoch: int, batch: int, base: int) -> Iterator[int]:
    generator = random.Random(f"{seed}:{epoch}:{batch}")
    yield generator.randint(1, base)
    while True:
        yield base


class Recorded(SequenceRegressor):
    """Records every training segment's (start, length) and the learning rate its step uses."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.segments: list[tuple[int, int]] = []
        self.rates: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        segment = current_segment()
        self.segments.append((segment.start or 0, segment.length))
        return super().training_step(batch, batch_idx)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        self.rates.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        super().optimizer_step(*args, **kwargs)


def reference(
    model: SequenceRegressor,
    batches: list[Any],
    draws: Any,
    *,
    epochs: int = 1,
    scale_lr: bool = False,
    streaming: bool = False,
    exact: bool = False,
) -> dict[str, Any]:
    """The oracle: plain TBPTT by hand, each batch cut at the drawn lengths; one step per segment (or per batch)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    lengths: list[list[int]] = []
    steps = 0
    for epoch in range(epochs):
        state = None
        for b, (x, y) in enumerate(batches):
            if not streaming:
                state = None
            drawn, cut, start = draws(epoch, b), [], 0
            total = torch.zeros((), dtype=torch.float64)
            while start < x.shape[1]:
                d = next(drawn)
                size = min(d, x.shape[1] - start)
                out, new_state = model.rnn(x[:, start : start + size], state)
                loss = F.mse_loss(model.head(out), y[:, start : start + size])
                cut.append(size)
                if exact:
                    total = total + loss
                    state = new_state
                else:
                    loss.backward()
                    if scale_lr:
                        optimizer.param_groups[0]["lr"] = LR * d / K
                    optimizer.step()
                    optimizer.zero_grad()
                    steps += 1
                    state = detach_state(new_state)
                start += size
            if exact:
                total.backward()
                optimizer.step()
                optimizer.zero_grad()
                steps += 1
                state = detach_state(state)
            lengths.append(cut)
    return {"steps": steps, "lengths": lengths}


def fit(tmp_path: Path, callback: TBPTTCallback, epochs: int = 1, **data: Any) -> tuple[Recorded, Any, pl.Trainer]:
    torch.manual_seed(0)
    model = Recorded(log=False).double()
    reference_model = Recorded(log=False).double()
    reference_model.load_state_dict(model.state_dict())
    loader = make_loader(length=LENGTH, **data)
    trainer = make_trainer(tmp_path, [callback], max_epochs=epochs)
    trainer.fit(model, loader)
    return model, (reference_model, list(loader)), trainer


def equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.allclose(p, q, rtol=0, atol=1e-10) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def cuts(model: Recorded) -> list[list[int]]:
    """The recorded segments' lengths, batch by batch (a batch starts where a segment starts at 0)."""
    found: list[list[int]] = []
    for start, length in model.segments:
        if start == 0:
            found.append([])
        found[-1].append(length)
    return found


def test_awd_lengths_equal_the_hand_loop_over_two_epochs(tmp_path: Path) -> None:
    model, (reference_model, batches), trainer = fit(tmp_path, TBPTTCallback(K, random_lengths=OPTIONS), epochs=2)
    expected = reference(reference_model, batches, lambda e, b: awd(7, e, b, K), epochs=2)
    assert cuts(model) == expected["lengths"]
    assert trainer.global_step == expected["steps"] == sum(map(len, expected["lengths"]))
    assert equal(model, reference_model)
    assert len({tuple(lengths) for lengths in expected["lengths"]}) == len(expected["lengths"])  # the cuts move
    assert model.rates == [LR] * trainer.global_step


def test_a_random_first_cut_equals_the_hand_loop(tmp_path: Path) -> None:
    callback = TBPTTCallback(K, random_lengths=RandomLengths("offset", seed=3))
    model, (reference_model, batches), trainer = fit(tmp_path, callback)
    expected = reference(reference_model, batches, lambda e, b: offset(3, e, b, K))
    assert cuts(model) == expected["lengths"]
    assert {lengths[1] for lengths in expected["lengths"]} == {K}
    assert len({lengths[0] for lengths in expected["lengths"]}) > 1
    assert trainer.global_step == expected["steps"]
    assert equal(model, reference_model)


def test_the_learning_rate_scales_with_the_drawn_length_and_comes_back(tmp_path: Path) -> None:
    callback = TBPTTCallback(K, random_lengths={**OPTIONS, "scale_lr": True})
    model, (reference_model, batches), trainer = fit(tmp_path, callback)
    expected = reference(reference_model, batches, lambda e, b: awd(7, e, b, K), scale_lr=True)
    assert equal(model, reference_model)
    drawn = [d for b in range(3) for d, _ in zip(awd(7, 0, b, K), range(len(expected["lengths"][b])), strict=False)]
    assert model.rates == pytest.approx([LR * d / K for d in drawn])
    assert len(set(model.rates)) > 1
    assert trainer.optimizers[0].param_groups[0]["lr"] == LR


def test_buckets_round_every_drawn_length(tmp_path: Path) -> None:
    buckets = (4, 8, 12)
    callback = TBPTTCallback(K, random_lengths=RandomLengths(seed=7, std=3.0, minimum=2, buckets=buckets))
    model, (reference_model, batches), _ = fit(tmp_path, callback)

    def bucketed(e: int, b: int) -> Iterator[int]:
        for d in awd(7, e, b, K, std=3.0):
            yield min(buckets, key=lambda bucket: (abs(bucket - d), bucket))

    expected = reference(reference_model, batches, bucketed)
    assert cuts(model) == expected["lengths"]
    assert {n for lengths in expected["lengths"] for n in lengths[:-1]} <= set(buckets)
    assert equal(model, reference_model)


def test_streaming_carries_the_state_across_moving_cuts(tmp_path: Path) -> None:
    callback = TBPTTCallback(K, streaming=True, random_lengths=OPTIONS)
    model, (reference_model, batches), _ = fit(tmp_path, callback, batch_size=4, num_sequences=12)
    # 3 batches of 4 rows: row j of each batch continues lane j, its state carried from the batch before
    control = copy.deepcopy(reference_model)
    expected = reference(reference_model, batches, lambda e, b: awd(7, e, b, K), streaming=True)
    assert len(batches) == 3 and cuts(model) == expected["lengths"]
    assert equal(model, reference_model)
    reference(control, batches, lambda e, b: awd(7, e, b, K), streaming=False)
    assert not equal(model, control)  # the carry across batches matters here


def test_exact_gradients_over_drawn_segments_equal_backpropagating_their_summed_losses(tmp_path: Path) -> None:
    callback = TBPTTCallback(K, exact=True, random_lengths=OPTIONS)
    model, (reference_model, batches), trainer = fit(tmp_path, callback)
    expected = reference(reference_model, batches, lambda e, b: awd(7, e, b, K), exact=True)
    assert trainer.global_step == expected["steps"] == 3
    assert equal(model, reference_model)


def test_overlapping_windows_draw_their_new_steps(tmp_path: Path) -> None:
    stride, overlap = 4, 4  # windows of 8 steps every 4: each window is its drawn new steps plus 4 before them
    callback = TBPTTCallback(K, stride=stride, random_lengths=OPTIONS)
    model, (reference_model, batches), trainer = fit(tmp_path, callback)
    optimizer = torch.optim.SGD(reference_model.parameters(), lr=LR, momentum=MOMENTUM)
    windows: list[tuple[int, int]] = []
    for b, (x, y) in enumerate(batches):
        drawn, state, covered = awd(7, 0, b, stride), None, 0
        while covered < LENGTH:
            start = max(0, covered - overlap)
            stop = min(start + overlap + next(drawn), LENGTH)
            windows.append((start, stop - start))
            if stop < LENGTH:  # the next window starts inside this one: its state is taken from there
                carry = stop - overlap - start
                first, carried = reference_model.rnn(x[:, start : start + carry], state)
                rest, _ = reference_model.rnn(x[:, start + carry : stop], carried)
                out = torch.cat([first, rest], dim=1)
            else:
                out, carried = reference_model.rnn(x[:, start:stop], state)
            F.mse_loss(reference_model.head(out), y[:, start:stop]).backward()
            optimizer.step()
            optimizer.zero_grad()
            state = detach_state(carried)
            covered = stop
    assert model.segments == windows
    assert trainer.global_step == len(windows)
    assert equal(model, reference_model)


class MaskedRecorded(Recorded):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        segment = current_segment()
        self.segments.append((segment.start or 0, segment.length))
        return masked_mean((self(batch["x"]) - batch["y"]).pow(2).squeeze(-1))


def test_padded_batches_cut_at_drawn_lengths_up_to_the_longest_sequence(tmp_path: Path) -> None:
    lengths = [[23, 7, 12, 1], [9, 9, 3, 16], [5, 20, 11, 2]]
    batches = padded_batches(lengths, pad_to=30)
    torch.manual_seed(0)
    model = MaskedRecorded(log=False).double()
    reference_model = MaskedRecorded(log=False).double()
    reference_model.load_state_dict(model.state_dict())
    callback = TBPTTCallback(K, lengths="lengths", random_lengths=OPTIONS)
    trainer = make_trainer(tmp_path, [callback])
    trainer.fit(model, loader_of(batches))
    optimizer = torch.optim.SGD(reference_model.parameters(), lr=LR, momentum=MOMENTUM)
    steps = 0
    for b, batch in enumerate(batches):
        longest, drawn, state, start = int(batch["lengths"].max()), awd(7, 0, b, K), None, 0
        while start < longest:
            size = min(next(drawn), longest - start)
            out, new_state = reference_model.rnn(batch["x"][:, start : start + size], state)
            errors = (reference_model.head(out) - batch["y"][:, start : start + size]).pow(2).squeeze(-1)
            valid = torch.arange(start, start + size).unsqueeze(0) < batch["lengths"].unsqueeze(1)
            (errors[valid].sum() / valid.sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
            state, start = detach_state(new_state), start + size
    assert trainer.global_step == steps
    assert max(start + n for start, n in model.segments) == 23  # the longest sequence of any batch
    assert equal(model, reference_model)


def test_evaluation_keeps_fixed_segments(tmp_path: Path) -> None:
    class Evaluated(Recorded):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.segments.append((current_segment().start or 0, current_segment().length))

    torch.manual_seed(0)
    model = Evaluated(log=False).double()
    make_trainer(tmp_path, [TBPTTCallback(K, random_lengths=OPTIONS)]).validate(model, make_loader(length=LENGTH))
    assert {n for _, n in model.segments} == {K}


def resumed_fit(tmp_path: Path, ckpt_path: Path | None = None) -> tuple[Any, pl.Trainer]:
    torch.manual_seed(0)
    model = StreamRegressor().double()
    callback = TBPTTCallback(5, streaming=True, resets="starts", random_lengths=RandomLengths(seed=2, std=2, minimum=1))
    saver = SavesEveryBatch(tmp_path)
    trainer = make_trainer(tmp_path, [callback, saver], max_epochs=2)
    trainer.fit(model, datamodule=stream_data(), ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize("batch", [2, 9])
def test_resuming_mid_epoch_draws_what_the_uninterrupted_run_drew(tmp_path: Path, batch: int) -> None:
    model, trainer = resumed_fit(tmp_path / "whole")
    resumed, resumed_trainer = resumed_fit(tmp_path / "resumed", tmp_path / "whole" / f"batch={batch}.ckpt")
    assert resumed_trainer.global_step == trainer.global_step
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters(), strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "awd2"}, r"`rule` of `RandomLengths` to be one of \('awd', 'offset'\) but got 'awd2'"),
        ({"seed": -1}, r"`seed` of `RandomLengths` to be an integer ≥ 0 but got -1"),
        ({"minimum": 0}, r"`minimum` .* ≥ 1 but got 0"),
        ({"p": 1.5}, r"`p` of `RandomLengths` to be a probability in \[0, 1\] but got 1.5"),
        ({"std": -1}, r"`std` .* but got -1"),
        ({"buckets": ()}, r"`buckets` .* but got \(\)"),
        ({"buckets": (8, 0)}, r"`buckets` .* but got \(8, 0\)"),
        ({"scale_lr": 1}, r"`scale_lr` of `RandomLengths` to be True or False but got 1"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RandomLengths(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"random_lengths": 3}, r"`random_lengths` to be a `RandomLengths`, a mapping of its fields, or None"),
        ({"random_lengths": {"sead": 1}}, r"`random_lengths` to hold the fields of `RandomLengths`"),
        ({"probe_every": 5, "random_lengths": {}}, r"cannot be combined with `random_lengths`"),
        ({"random_lengths": {"scale_lr": True}, "step_per": "batch"}, r"takes one step per batch"),
        ({"random_lengths": {"scale_lr": True}, "stride": 4}, r"cannot be combined with `stride=4`"),
    ],
)
def test_bad_combinations_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        TBPTTCallback(K, **kwargs)


def test_counting_a_batchs_segments_takes_its_epoch_and_index() -> None:
    callback = TBPTTCallback(K, random_lengths=RandomLengths(seed=1))
    with pytest.raises(ConfigurationError, match=r"to get the `epoch` and `batch` whose drawn lengths to count"):
        callback.training_segments(40)
    expected, drawn = [], awd(1, 0, 3, K, std=5, minimum=5)
    while sum(expected) < 40:
        expected.append(min(next(drawn), 40 - sum(expected)))
    assert callback.random_lengths.lengths(K, 40, epoch=0, batch=3) == expected
    assert callback.training_segments(40, epoch=0, batch=3) == len(expected)


def test_resuming_with_other_random_lengths_warns(tmp_path: Path) -> None:
    resumed_fit(tmp_path / "whole")
    torch.manual_seed(0)
    callback = TBPTTCallback(5, streaming=True, resets="starts", random_lengths=RandomLengths(seed=3, std=2, minimum=1))
    trainer = make_trainer(tmp_path / "other", [callback], max_epochs=2)
    with pytest.warns(UserWarning, match=r"trained with `TBPTTCallback\(random_lengths=\{'rule': 'awd', 'seed': 2"):
        trainer.fit(StreamRegressor().double(), datamodule=stream_data(), ckpt_path=tmp_path / "whole" / "batch=2.ckpt")
