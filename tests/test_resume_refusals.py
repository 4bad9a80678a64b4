"""Resuming from a checkpoint that cannot continue the run it came from: refused, or warned about, never silent."""

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_tbptt import ConfigurationError, TBPTTCallback
from tests.helpers import make_trainer, parameters_equal
from tests.test_resume import SEGMENT, StreamRegressor, checkpoint, fit, stream_data


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, int]:
    directory = tmp_path_factory.mktemp("uninterrupted")
    model, trainer = fit(directory, every=6)  # a checkpoint after every second batch (3 per epoch)
    return model, directory, trainer.global_step


def edited(tmp_path: Path, directory: Path, edit: Any, name: str = "epoch=0-step=6") -> Path:
    """A copy of a checkpoint of the uninterrupted run with the callback's entry changed by ``edit``."""
    saved = torch.load(checkpoint(directory, name), weights_only=False)
    (key,) = [key for key in saved["callbacks"] if "TBPTTCallback" in key]
    edit(saved["callbacks"], key)
    path = tmp_path / "edited.ckpt"
    torch.save(saved, path)
    return path


def resume(tmp_path: Path, path: Path, callback: TBPTTCallback, **kwargs: Any) -> Any:
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [callback], max_epochs=2, **kwargs)
    trainer.fit(StreamRegressor().double(), datamodule=stream_data(), ckpt_path=path)
    return trainer


def test_a_mid_epoch_checkpoint_without_the_callbacks_state_is_refused_in_streaming_mode(tmp_path, uninterrupted):
    _, directory, _ = uninterrupted
    path = edited(tmp_path, directory, lambda entries, key: entries.pop(key))
    match = r"to hold the state of `TBPTTCallback` \(the carried state of every lane\), since it was saved in the"
    with pytest.raises(ConfigurationError, match=match):
        resume(tmp_path, path, TBPTTCallback(SEGMENT, streaming=True, resets="starts"))


def test_a_mid_epoch_checkpoint_without_the_callbacks_state_warns_where_gradients_accumulate(tmp_path, uninterrupted):
    _, directory, _ = uninterrupted
    path = edited(tmp_path, directory, lambda entries, key: entries.pop(key))
    with pytest.warns(UserWarning, match=r"holds no state of `TBPTTCallback` .* the accumulated gradients"):
        resume(tmp_path, path, TBPTTCallback(SEGMENT, resets="starts"), accumulate_grad_batches=2)


def test_an_end_of_epoch_checkpoint_needs_no_state_of_the_callback(tmp_path, uninterrupted):
    model, directory, global_step = uninterrupted
    path = edited(tmp_path, directory, lambda entries, key: entries.pop(key), name="epoch=0-step=18")
    trainer = resume(tmp_path, path, TBPTTCallback(SEGMENT, streaming=True, resets="starts"))
    # Lightning before 2.5 runs the saved batch's index once more (its issue #18060), which the callback's state would
    # have absorbed; `LaneDataModule`'s training loader gives that index no data, so no batch is trained twice
    assert trainer.global_step == global_step == 36
    assert parameters_equal(trainer.lightning_module, model, rtol=0, atol=1e-12)


def test_resuming_with_other_settings_warns_and_names_them(tmp_path, uninterrupted):
    _, directory, _ = uninterrupted
    match = (
        r"trained with `TBPTTCallback\(segment_length=5, stride=5\)` and this fit uses `segment_length=4, stride=4`:"
        r" training goes on with the new settings"
    )
    with pytest.warns(UserWarning, match=match):
        resume(tmp_path, checkpoint(directory, "epoch=0-step=6"), TBPTTCallback(4, streaming=True, resets="starts"))


EDITED = "Expected the checkpoint's `TBPTTCallback` entry to hold "
CARRIED = r"`carried` as a dict of module names to states \(tensors, or tuples of them\) "


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda entry: entry.pop("batches_done"), EDITED + r"`batches_done` as an integer >= 0 \(it has none\)\. It"),
        (lambda entry: entry.update(epoch="0"), EDITED + r"`epoch` as an integer >= 0 \(it holds '0'\)\. It was"),
        (lambda entry: entry.update(batches_done=-1), EDITED + r"`batches_done` as an integer >= 0 \(it holds -1\)"),
        (lambda entry: entry.pop("mid_epoch"), EDITED + r"`mid_epoch` as True or False \(it has none\)"),
        (lambda entry: entry.pop("streaming"), EDITED + r"`streaming` as True or False \(it has none\)"),
        (lambda entry: entry.update(accumulated="x"), EDITED + r"`accumulated` as an integer >= 0 \(it holds 'x'\)"),
        (lambda entry: entry.pop("carried"), EDITED + CARRIED + r"\(it has none\)"),
        (lambda entry: entry.update(carried="junk"), EDITED + CARRIED + r"\(it holds 'junk'\)"),
        (lambda entry: entry.update(carried={"rnn": "junk"}), EDITED + CARRIED + r"\(it holds \{'rnn': 'junk'\}\)"),
        (
            lambda entry: entry["carried"].update(rnn=entry["carried"]["rnn"][:1]),
            r"carried state of `rnn` \(LSTM\) to be a tuple of 2 tensors of 3 dimensions but it holds \[\(1, 4, 8\)\]",
        ),
        (lambda entry: entry.update(version=2), r"to be in format 1 or older but it is in format 2, written by a"),
    ],
    ids=[
        "missing-key",
        "wrong-type",
        "negative",
        "no-mid-epoch",
        "no-streaming",
        "accumulated",
        "no-carried",
        "carried-not-a-dict",
        "state-not-a-tensor",
        "state-too-short",
        "newer-format",
    ],
)
def test_an_edited_or_newer_entry_is_refused_with_what_is_wrong(tmp_path, uninterrupted, edit, match):
    _, directory, _ = uninterrupted
    path = edited(tmp_path, directory, lambda entries, key: edit(entries[key]))
    with pytest.raises(ConfigurationError, match=match):
        resume(tmp_path, path, TBPTTCallback(SEGMENT, streaming=True, resets="starts"))


def test_a_checkpoint_of_release_0_1_0_without_version_or_settings_still_resumes_exactly(tmp_path, uninterrupted):
    model, directory, global_step = uninterrupted

    def strip(entries: Any, key: str) -> None:
        entries[key].pop("version")
        entries[key].pop("config")

    resumed, trainer = fit(tmp_path, ckpt_path=edited(tmp_path, directory, strip))
    assert trainer.global_step == global_step
    assert parameters_equal(resumed, model, rtol=0, atol=1e-12)
