"""Streaming data in the lane layout: batches against hand-written loops, lazy memory maps, workers, ranks, resume."""

import json
import math
import os
import pickle
import subprocess
import sys
import tracemalloc
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from packaging.version import Version
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

import lightning_tbptt.data
from lightning_tbptt import BatchError, ConfigurationError
from lightning_tbptt.data import LaneDataModule, LaneStream
from tests.helpers import PEAK_MIB

pytestmark = [
    # Lightning's caution for any IterableDataset with a length; each worker of a LaneStream reads its own batches
    pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]

# sequence k holds 1000 * k + t at step t, so every value says where it comes from; lengths 1 and 2 are too short
# for some target shifts
SEQUENCES = [1000 * k + np.arange(n) for k, n in enumerate([7, 1, 12, 2, 9, 5, 13])]


def reference_batches(sequences, lanes, steps, shift=0, rank=0, world_size=1):
    """The lane layout with plain loops: lists of per-row lists of (input, target, starts) values."""
    values, targets, starts = [], [], []
    for sequence in sequences:
        for t in range(len(sequence) - shift):
            values.append(int(sequence[t]))
            targets.append(int(sequence[t + shift]))
            starts.append(t == 0)
    lane_length = len(values) // lanes
    rows = lanes // world_size
    batches = []
    for i in range(math.ceil(lane_length / steps)):
        inputs, target_rows, start_rows = [], [], []
        for lane in range(rank * rows, (rank + 1) * rows):
            lo, hi = lane * lane_length + i * steps, lane * lane_length + min((i + 1) * steps, lane_length)
            inputs.append(values[lo:hi])
            target_rows.append(targets[lo:hi])
            start_rows.append([starts[p] or (i == 0 and p == lo) for p in range(lo, hi)])
        batches.append((inputs, target_rows, start_rows))
    return batches


def assert_batches_equal(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert list(got) == list(want)
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            assert torch.equal(got[key], want[key]), key


# --------------------------------------------------------------------------------------------------------------- layout


def test_a_small_stream_by_hand():
    stream = LaneStream([np.arange(5), np.arange(10, 17)], lanes=2, steps=4)
    # stream 0 1 2 3 4 10 11 12 13 14 15 16; lane 0 = 0 1 2 3 4 10, lane 1 = 11 ... 16
    first, second = list(stream)
    assert first["input"].tolist() == [[0, 1, 2, 3], [11, 12, 13, 14]]
    assert first["starts"].tolist() == [[True, False, False, False], [True, False, False, False]]
    assert second["input"].tolist() == [[4, 10], [15, 16]]
    assert second["starts"].tolist() == [[False, True], [False, False]]
    assert list(first) == ["input", "starts"]
    assert (stream.lane_length, stream.num_batches, len(stream)) == (6, 2, 2)


def test_a_small_stream_with_next_step_targets_by_hand():
    stream = LaneStream([np.arange(5), np.arange(10, 17)], lanes=2, steps=3, target_shift=1)
    # pairs (0,1) (1,2) (2,3) (3,4) | (10,11) ... (15,16): 4 + 6 = 10 pairs, 5 per lane; no pair (4, 10)
    first, second = list(stream)
    assert first["input"].tolist() == [[0, 1, 2], [11, 12, 13]]
    assert first["target"].tolist() == [[1, 2, 3], [12, 13, 14]]
    assert second["input"].tolist() == [[3, 10], [14, 15]]
    assert second["target"].tolist() == [[4, 11], [15, 16]]
    assert second["starts"].tolist() == [[False, True], [False, False]]
    assert list(first) == ["input", "target", "starts"]


@pytest.mark.parametrize(
    ("lanes", "steps", "shift", "world_size"),
    [(1, 4, 0, 1), (2, 3, 0, 1), (3, 5, 1, 1), (4, 2, 2, 1), (2, 24, 0, 1), (4, 3, 1, 2), (6, 2, 0, 3)],
    ids=lambda v: str(v),
)
def test_every_batch_equals_the_reference_loops(lanes, steps, shift, world_size):
    for rank in range(world_size):
        stream = LaneStream(SEQUENCES, lanes=lanes, steps=steps, target_shift=shift, rank=rank, world_size=world_size)
        expected = reference_batches(SEQUENCES, lanes, steps, shift, rank, world_size)
        batches = list(stream)
        assert len(batches) == len(expected) == stream.num_batches == len(stream)
        for batch, (inputs, targets, starts) in zip(batches, expected, strict=True):
            assert batch["input"].tolist() == inputs
            assert batch["starts"].tolist() == starts
            if shift:
                assert batch["target"].tolist() == targets
            else:
                assert "target" not in batch


@pytest.mark.parametrize("shift", [1, 2, 5])
def test_targets_never_cross_into_the_next_sequence(shift):
    for batch in LaneStream(SEQUENCES, lanes=3, steps=4, target_shift=shift):
        # each value is 1000 * sequence + step: a target from the same sequence is exactly `shift` larger
        assert torch.equal(batch["target"] - batch["input"], torch.full_like(batch["input"], shift))


def test_starts_mark_sequence_starts_and_the_first_step_only():
    stream = LaneStream(SEQUENCES, lanes=3, steps=4)
    batches = list(stream)
    lanes = torch.cat([b["input"] for b in batches], dim=1)
    starts = torch.cat([b["starts"] for b in batches], dim=1)
    assert torch.equal(starts[:, 1:], lanes[:, 1:] % 1000 == 0)
    assert starts[:, 0].all()
    assert not lanes[1:, 0].remainder(1000).eq(0).all(), "lanes 1, 2 start mid-sequence: the marker is still there"


@pytest.mark.parametrize(("lanes", "steps"), [(1, 7), (2, 5), (3, 4), (5, 1), (4, 11), (7, 3)], ids=lambda v: str(v))
def test_concatenating_the_batches_of_a_lane_gives_the_lane_back(lanes, steps):
    stream_values = np.concatenate(SEQUENCES)
    stream = LaneStream(SEQUENCES, lanes=lanes, steps=steps)
    lane_length = len(stream_values) // lanes
    assert stream.lane_length == lane_length
    batches = list(stream)
    assert [b["input"].shape[1] for b in batches[:-1]] == [steps] * (len(batches) - 1)
    assert batches[-1]["input"].shape == (lanes, lane_length - steps * (len(batches) - 1))
    for lane in range(lanes):
        joined = torch.cat([b["input"][lane] for b in batches])
        assert joined.tolist() == stream_values[lane * lane_length : (lane + 1) * lane_length].tolist()


def test_some_combinations_have_a_shorter_last_batch():
    assert LaneStream(SEQUENCES, lanes=2, steps=5).lane_length % 5 != 0
    assert list(LaneStream(SEQUENCES, lanes=2, steps=5))[-1]["input"].shape == (2, 4)


def test_the_remainder_of_the_stream_is_dropped():
    stream = LaneStream(np.arange(11), lanes=3, steps=3)
    assert stream.lane_length == 3
    assert torch.cat([b["input"] for b in stream]).flatten().tolist() == list(range(9))


# ------------------------------------------------------------------------------------------------------- kinds of input


@pytest.mark.parametrize(
    "make",
    [
        lambda a: torch.from_numpy(a),
        lambda a: a.astype(a.dtype.newbyteorder(">")),
        lambda a: np.asfortranarray(a),
    ],
    ids=["tensor", "big-endian", "fortran-order"],
)
def test_arrays_tensors_and_byte_orders_give_the_same_batches(make):
    arrays = [np.arange(30, dtype=np.int32).reshape(10, 3) + 100 * k for k in range(3)]
    expected = list(LaneStream(arrays, lanes=2, steps=4))
    assert_batches_equal(list(LaneStream([make(a) for a in arrays], lanes=2, steps=4)), expected)
    assert expected[0]["input"].shape == (2, 4, 3)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"),
    [(np.int8, torch.int8), (np.uint8, torch.uint8), (np.float16, torch.float16), (np.bool_, torch.bool)],
    ids=["int8", "uint8", "float16", "bool"],
)
def test_dtypes_are_kept_and_batches_are_writable(dtype, torch_dtype):
    batch = next(iter(LaneStream(np.ones((20, 2), dtype=dtype), lanes=2, steps=3)))
    assert batch["input"].dtype == torch_dtype
    batch["input"][0, 0] = 0  # a copy, not a view of read-only data


def test_mapping_sequences():
    def sequence(k, n):
        steps = np.arange(n)
        return {"x": np.stack([steps, -steps], axis=1).astype(np.float32) + k, "y": 1000 * k + steps}

    sequences = [sequence(k, n) for k, n in enumerate([6, 9, 4])]
    stream = LaneStream(sequences, lanes=2, steps=3)
    expected = reference_batches([s["y"] for s in sequences], lanes=2, steps=3)
    batches = list(stream)
    assert len(batches) == len(expected)
    for batch, (labels, _, starts) in zip(batches, expected, strict=True):
        assert list(batch) == ["x", "y", "starts"]
        assert batch["x"].dtype == torch.float32
        assert batch["x"].shape == (2, len(labels[0]), 2)
        assert batch["y"].tolist() == labels
        assert batch["starts"].tolist() == starts
        step, k = batch["y"] % 1000, batch["y"] // 1000
        assert torch.equal(batch["x"], torch.stack([step + k, -step + k], dim=-1).float())


def test_a_mapping_of_paths_and_a_single_mapping(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(40).reshape(20, 2))
    single = LaneStream({"x": tmp_path / "x.npy", "y": torch.arange(20)}, lanes=2, steps=5)
    batch = next(iter(single))
    assert batch["x"][1, 0].tolist() == [20, 21]
    assert batch["y"][1].tolist() == [10, 11, 12, 13, 14]


# ------------------------------------------------------------------------------------------------ files and memory maps


def test_a_large_memmap_is_read_lazily_and_pickles_small(tmp_path):
    size = 10**7
    array = np.memmap(tmp_path / "big.bin", dtype=np.int8, mode="w+", shape=(size,))
    array[:] = np.arange(size, dtype=np.int64).astype(np.int8)
    array.flush()
    tracemalloc.start()
    stream = LaneStream(array, lanes=8, steps=100)
    third = stream.batch(3)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000, "numpy allocated a large part of the 10 MB memmap"
    lane_length = size // 8
    expected = [[(lane * lane_length + 300 + t) % 256 for t in range(100)] for lane in range(8)]
    assert third["input"].tolist() == np.array(expected).astype(np.int8).tolist()
    dumped = pickle.dumps(stream)
    assert len(dumped) < 4096
    assert torch.equal(pickle.loads(dumped).batch(3)["input"], third["input"]), "a copy reopens the file"


def test_npy_paths_and_memmap_views_are_reopened_at_the_right_place(tmp_path):
    arrays = [np.arange(1000 * k, 1000 * k + n, dtype=np.int64).reshape(-1, 2) for k, n in [(1, 600), (2, 400)]]
    paths = []
    for k, array in enumerate(arrays):
        np.save(tmp_path / f"{k}.npy", array)
        paths.append(tmp_path / f"{k}.npy")
    expected = list(LaneStream(arrays, lanes=2, steps=7))
    for sequences in [
        paths,
        [str(p) for p in paths],
        [np.load(p, mmap_mode="r") for p in paths],
    ]:
        stream = LaneStream(sequences, lanes=2, steps=7)
        assert len(pickle.dumps(stream)) < 4096
        assert_batches_equal(list(pickle.loads(pickle.dumps(stream))), expected)
    view = np.load(paths[0], mmap_mode="r")[123:]  # a contiguous view: reopened from its own offset
    stream = pickle.loads(pickle.dumps(LaneStream(view, lanes=1, steps=10)))
    assert next(iter(stream))["input"][0, 0].tolist() == [1246, 1247]


def test_in_memory_arrays_are_pickled_with_the_dataset():
    stream = LaneStream([np.arange(50), torch.arange(50)], lanes=2, steps=10)
    assert_batches_equal(list(pickle.loads(pickle.dumps(stream))), list(stream))


# ------------------------------------------------------------------------------------------ workers, ranks and resuming


def test_workers_give_the_batches_in_the_order_of_the_main_process(tmp_path):
    np.save(tmp_path / "a.npy", SEQUENCES[2])
    sequences = [*SEQUENCES[:2], tmp_path / "a.npy", *SEQUENCES[3:]]
    stream = LaneStream(sequences, lanes=2, steps=3, target_shift=1)
    in_process = list(DataLoader(stream, batch_size=None, num_workers=0))
    assert len(in_process) == 7, "an odd count: worker 0 reads one batch more"
    assert_batches_equal(list(DataLoader(stream, batch_size=None, num_workers=2)), in_process)
    assert_batches_equal(in_process, list(stream))


def test_ranks_together_give_the_rows_of_one_process():
    whole = list(LaneStream(SEQUENCES, lanes=4, steps=3, target_shift=1))
    parts = [list(LaneStream(SEQUENCES, lanes=4, steps=3, target_shift=1, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for batch, first, second in zip(whole, *parts, strict=True):
        assert first["input"].shape[0] == second["input"].shape[0] == 2
        for key in batch:
            assert torch.equal(torch.cat([first[key], second[key]]), batch[key])


def test_start_batch_applies_to_the_next_iteration_only():
    full = list(LaneStream(SEQUENCES, lanes=2, steps=4))
    stream = LaneStream(SEQUENCES, lanes=2, steps=4, start_batch=3)
    assert len(stream) == len(full) == 6, "the length is the whole epoch's"
    assert_batches_equal(list(stream), full[3:])
    assert_batches_equal(list(stream), full)
    stream.start_batch = 5
    assert_batches_equal(list(stream), full[5:])
    stream.start_batch = 6
    assert list(stream) == []


def test_persistent_workers_reset_their_copies_after_one_iteration():
    full = list(LaneStream(SEQUENCES, lanes=2, steps=4))
    stream = LaneStream(SEQUENCES, lanes=2, steps=4, start_batch=3)
    loader = DataLoader(stream, batch_size=None, num_workers=2, persistent_workers=True)
    assert_batches_equal(list(loader), full[3:])
    assert_batches_equal(list(loader), full)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_data_module_loader_resets_start_batch_after_handing_it_to_the_workers(num_workers):
    data = LaneDataModule(SEQUENCES, lanes=2, steps=4, num_workers=num_workers)
    data.setup("fit")
    loader = data.train_dataloader()
    full = list(loader)
    assert len(full) == 6
    data.streams["train"].start_batch = 3
    assert_batches_equal(list(loader), full[3:])
    assert_batches_equal(list(loader), full)


# --------------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lanes": 0}, ConfigurationError, r"argument `lanes` to be a positive integer but got 0\. Pass"),
        ({"lanes": True}, ConfigurationError, r"argument `lanes` to be a positive integer but got True"),
        ({"steps": 2.5}, ConfigurationError, r"argument `steps` to be a positive integer but got 2\.5"),
        ({"target_shift": -1}, ConfigurationError, r"`target_shift` to be a non-negative integer but got -1"),
        ({"lanes": 8, "steps": 8}, ConfigurationError, r"lane length \(49 stream steps // 8 lanes = 6\) to be at least"
         r" `steps=8` but it is shorter\. Use fewer `lanes` or shorter `steps`"),
        ({"lanes": 3, "world_size": 2}, ConfigurationError, r"`lanes` to be divisible by the world size 2 but got 3\."
         r" Use a multiple of the number of processes, e.g\. `lanes=4`"),
        ({"rank": 2, "world_size": 2}, ConfigurationError, r"`rank` to be an integer from 0 to 1 \(world size 2\) but"
         r" got 2"),
        ({"world_size": 0}, ConfigurationError, r"`world_size` to be a positive integer but got 0"),
        ({"start_batch": 50}, ConfigurationError, r"`start_batch` to be an integer from 0 to 24 \(the batches per"
         r" epoch\) but got 50"),
        ({"start_batch": -1}, ConfigurationError, r"`start_batch` to be an integer from 0 to 24"),
    ],
    ids=["lanes", "lanes-bool", "steps", "target-shift", "too-short", "world-size", "rank", "world-size-0",
         "start-batch", "start-batch-negative"],
)  # fmt: skip
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LaneStream(SEQUENCES, **{"lanes": 2, "steps": 1, **kwargs})


def test_start_batch_is_checked_when_set():
    stream = LaneStream(SEQUENCES, lanes=2, steps=4)
    with pytest.raises(ConfigurationError, match=r"`start_batch` to be an integer from 0 to 6 .* but got 7"):
        stream.start_batch = 7


def test_invalid_sequences(tmp_path):
    np.savez(tmp_path / "archive.npz", a=np.arange(3))
    np.save(tmp_path / "objects.npy", np.array([1, None]), allow_pickle=True)
    x, y = np.arange(10), np.zeros(10)
    view = np.load(_saved(tmp_path, np.arange(20).reshape(10, 2)), mmap_mode="r")
    cases = [
        ([], ConfigurationError, r"`sequences` to hold at least one sequence but got an empty list"),
        (tmp_path / "missing.npy", ConfigurationError, r"sequence 0 \('.*missing\.npy'\) of `sequences` to be the path"
         r" of an existing \.npy file but got '.*missing\.npy', which does not exist\. Check the path"),
        (tmp_path / "archive.npz", ConfigurationError, r"to be a \.npy file but '.*archive\.npz' is an \.npz archive"),
        (tmp_path / "objects.npy", ConfigurationError, r"to be a \.npy file that can be memory-mapped but reading"),
        ([[1, 2, 3]], ConfigurationError, r"sequence 0 of `sequences` to be a numpy array, .* but got list"),
        (np.array(3), BatchError, r"sequence 0 of `sequences` to have a leading time dimension"),
        (np.array([{}, {}], dtype=object), BatchError, r"to have a dtype that torch supports but got object"),
        ([x, x.reshape(5, 2)], BatchError, r"every sequence of `sequences` to have the per-step shape \(\) and dtype"
         r" torch\.int64 of sequence 0 but sequence 1 has shape \(2,\) and dtype torch\.int64"),
        ([x, y], BatchError, r"sequence 1 has shape \(\) and dtype torch\.float64\. Give every sequence the same"),
        ([x, {"x": x}], BatchError, r"sequence 0 is an array and sequence 1 is a mapping"),
        ([{"x": x}, {"y": x}], BatchError, r"the keys \['x'\] \(those of sequence 0\) but sequence 1 has \['y'\]"),
        ([{"x": x}, {"x": y}], BatchError, r"sequence\['x'\] of `sequences` to have the per-step shape"),
        ({"x": x, "y": x[:9]}, BatchError, r"share their leading \(time\) length but got \{'x': 10, 'y': 9\}"),
        ({"x": x, "starts": x}, BatchError, r"strings other than 'starts' .* but got \['x', 'starts'\]"),
        (view[:, 0], ConfigurationError, r"memory map that can be reopened from \(filename, offset, shape\) but got a"
         r" non-contiguous view with strides \(16,\)\. Pass the path or the memmap as opened"),
    ]  # fmt: skip
    for sequences, error, match in cases:
        with pytest.raises(error, match=match):
            LaneStream(sequences, lanes=1, steps=1)


def _saved(directory, array):
    path = directory / "saved.npy"
    np.save(path, array)
    return path


def test_target_shift_needs_array_sequences():
    with pytest.raises(ConfigurationError, match=r"`target_shift` to be 0 for mapping sequences but got 1\. Shift"):
        LaneStream({"x": np.arange(10)}, lanes=1, steps=1, target_shift=1)


def test_invalid_data_module_arguments():
    with pytest.raises(ConfigurationError, match=r"`eval_lanes` to be a positive integer but got 0"):
        LaneDataModule(SEQUENCES, lanes=2, steps=2, eval_lanes=0)
    with pytest.raises(ConfigurationError, match=r"`num_workers` to be a non-negative integer but got -1"):
        LaneDataModule(SEQUENCES, lanes=2, steps=2, num_workers=-1)
    with pytest.raises(ConfigurationError, match=r"`pin_memory` to be a bool or None but got 'yes'"):
        LaneDataModule(SEQUENCES, lanes=2, steps=2, pin_memory="yes")


# ---------------------------------------------------------------------------------------------------- in a real Trainer

VOCAB = 16
TOKENS = [(np.arange(n) * 7 + k) % VOCAB for k, n in enumerate([150, 90, 200])]


class TinyLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, VOCAB)
        self.seen: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": [], "predict": []}

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)

    def loss(self, batch, stage):
        self.seen[stage].append(batch["input"].clone())
        return F.cross_entropy(self(batch["input"]).transpose(1, 2), batch["target"])

    def training_step(self, batch, batch_idx):
        return self.loss(batch, "train")

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch, "val"))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.loss(batch, "test"))

    def predict_step(self, batch, batch_idx):
        self.seen["predict"].append(batch["input"].clone())
        return self(batch["input"]).argmax(-1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_trainer(tmp_path, **kwargs):
    options = {
        "max_epochs": 1,
        "enable_progress_bar": False,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
        **kwargs,
    }
    return pl.Trainer(**options)


def inputs(stream):
    return [batch["input"] for batch in LaneStream(**stream)]


def assert_inputs_equal(actual, expected):
    assert len(actual) == len(expected)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))


@pytest.mark.slow  # a fit, validation, test and predict
def test_the_data_module_feeds_a_trainer_in_every_stage(tmp_path):
    data = LaneDataModule(TOKENS, TOKENS[:2], TOKENS[2], TOKENS, lanes=4, steps=16, eval_lanes=2, target_shift=1)
    model = TinyLM()
    trainer = make_trainer(tmp_path, limit_train_batches=5)
    trainer.fit(model, datamodule=data)
    train = {"sequences": TOKENS, "lanes": 4, "steps": 16, "target_shift": 1}
    assert_inputs_equal(model.seen["train"], inputs(train)[:5])
    assert_inputs_equal(model.seen["val"], inputs({**train, "sequences": TOKENS[:2], "lanes": 2}))
    assert "val_loss" in trainer.callback_metrics
    trainer.test(model, datamodule=data)
    assert_inputs_equal(model.seen["test"], inputs({**train, "sequences": TOKENS[2], "lanes": 2}))
    predictions = trainer.predict(model, datamodule=data)
    assert_inputs_equal(model.seen["predict"], inputs({**train, "lanes": 2}))
    assert [p.shape for p in predictions] == [x.shape for x in model.seen["predict"]]
    loader = data.train_dataloader()
    assert (loader.batch_size, loader.num_workers, loader.pin_memory) == (None, 0, False)
    pinned = LaneDataModule(TOKENS, lanes=4, steps=16, num_workers=1, pin_memory=True).train_dataloader()
    assert (pinned.num_workers, pinned.pin_memory) == (1, True)


def test_a_stage_without_data_is_skipped_as_lightning_does(tmp_path):
    data = LaneDataModule(TOKENS, lanes=2, steps=16, target_shift=1)
    model = TinyLM()
    with pytest.warns(UserWarning, match="You defined a `validation_step` but have no `val_dataloader`"):
        make_trainer(tmp_path, limit_train_batches=2).fit(model, datamodule=data)
    assert len(model.seen["train"]) == 2
    assert model.seen["val"] == []
    with pytest.raises(ConfigurationError, match=r"`test` of `LaneDataModule` to hold the test sequences but got None"):
        data.test_dataloader()


class HasResumeBatch(Callback):
    """A callback with an attribute named `resume_batch`, which the data module must not read."""

    resume_batch = 2


def test_the_training_loader_does_not_read_a_callback_attribute_named_resume_batch(tmp_path):
    data = LaneDataModule(TOKENS, lanes=4, steps=16, target_shift=1)
    model = TinyLM()
    make_trainer(tmp_path, callbacks=[HasResumeBatch()]).fit(model, datamodule=data)
    assert_inputs_equal(model.seen["train"], inputs({"sequences": TOKENS, "lanes": 4, "steps": 16, "target_shift": 1}))


class SavesAfterValidation(Callback):
    """Saves a checkpoint after each validation run in the middle of an epoch, as `ModelCheckpoint` may do."""

    def __init__(self, directory):
        self.directory = directory

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.directory / f"validated-step={trainer.global_step}.ckpt")


class SavesAtEpochEnd(Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.directory / f"epoch-end-step={trainer.global_step}.ckpt")


def fit_lm(root, ckpt_path=None, callbacks=(), steps=32, tokens=TOKENS, **kwargs):
    """A fit of two epochs of 4 batches (32, 32, 32 and 14 steps), one optimizer step per batch, without TBPTT."""
    torch.manual_seed(0)
    model = TinyLM()
    data = LaneDataModule(tokens, TOKENS[:1], lanes=4, steps=steps, eval_lanes=1, target_shift=1)
    trainer = make_trainer(root, max_epochs=2, callbacks=list(callbacks), **kwargs)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model, trainer


@pytest.fixture(scope="module")
def lm_checkpoints(tmp_path_factory):
    """An uninterrupted fit with a checkpoint after every batch and after every validation run (every 2 batches)."""
    root = tmp_path_factory.mktemp("lm")
    every_batch = ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    model, trainer = fit_lm(
        root,
        callbacks=[every_batch, SavesAfterValidation(root), SavesAtEpochEnd(root)],
        enable_checkpointing=True,
        val_check_interval=2,
    )
    assert trainer.global_step == 8
    return model, root


def quietly_resume(root, ckpt_path, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
        warnings.filterwarnings("ignore", "Be aware that when using `ckpt_path`")
        return fit_lm(root, ckpt_path, val_check_interval=2, **kwargs)


@pytest.mark.parametrize(
    "name",
    [
        "step=1",
        "step=3",
        "step=4",
        "step=6",
        "validated-step=2",
        pytest.param("validated-step=6", marks=pytest.mark.slow),  # the slowest of these resumes here
        pytest.param("epoch-end-step=4", marks=pytest.mark.slow),
    ],
    ids=[
        "mid-epoch-0",
        "before-last-batch",
        "last-batch",
        "mid-epoch-1",
        "after-validation-0",
        "after-validation-1",
        "epoch-end",
    ],
)
def test_resuming_from_a_checkpoint_equals_the_uninterrupted_run_without_any_callback(tmp_path, lm_checkpoints, name):
    uninterrupted, root = lm_checkpoints
    resumed, trainer = quietly_resume(tmp_path, root / f"{name}.ckpt")
    assert trainer.global_step == 8
    done = int(name.split("=")[1])
    assert_inputs_equal(resumed.seen["train"], uninterrupted.seen["train"][done:])
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), uninterrupted.parameters(), strict=True))


@pytest.mark.parametrize("name", ["step=3", "step=4", "step=6"], ids=["before-last-batch", "last-batch", "mid-epoch-1"])
def test_a_checkpoint_without_loader_state_resumes_from_the_restored_progress(tmp_path, lm_checkpoints, name):
    """As a checkpoint of Lightning 2.1 or of an older release of the library: no `combined_loader` entry."""
    uninterrupted, root = lm_checkpoints
    checkpoint = torch.load(root / f"{name}.ckpt", weights_only=True)
    checkpoint["loops"]["fit_loop"]["state_dict"].pop("combined_loader", None)
    torch.save(checkpoint, tmp_path / "without.ckpt")
    resumed, _ = quietly_resume(tmp_path, tmp_path / "without.ckpt")
    assert_inputs_equal(resumed.seen["train"], uninterrupted.seen["train"][int(name.split("=")[1]) :])
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), uninterrupted.parameters(), strict=True))


def test_the_checkpoint_holds_the_position_of_the_training_loader(lm_checkpoints):
    _, root = lm_checkpoints
    loops = torch.load(root / "step=3.ckpt", weights_only=True)["loops"]["fit_loop"]
    if Version(pl.__version__) < Version("2.2"):
        assert "combined_loader" not in loops["state_dict"], "Lightning 2.1 saves no loader state"
    else:
        assert loops["state_dict"]["combined_loader"] == [
            {"version": 1, "batches_done": 3, "epoch_batches": 4, "num_batches": 4, "lane_length": 109}
        ]


@pytest.mark.skipif(Version(pl.__version__) < Version("2.3"), reason="Lightning 2.3 added the warning")
def test_resuming_mid_epoch_does_not_warn_that_the_loader_is_not_resumable(tmp_path, lm_checkpoints):
    _, root = lm_checkpoints
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_lm(tmp_path, root / "step=3.ckpt")  # global step 3 of 4 per epoch: Lightning checks the loader
    messages = [str(warning.message) for warning in caught]
    assert not [message for message in messages if "not resumable" in message], messages


def test_resuming_with_fewer_batches_per_epoch_than_the_checkpoint_trained_is_an_error(tmp_path, lm_checkpoints):
    _, root = lm_checkpoints
    with pytest.raises(
        ConfigurationError,
        match=r"Expected the training stream to have (the 4 batches per epoch of the checkpoint being resumed but it"
        r" has 2|at least the 3 batches of the epoch that the checkpoint being resumed had trained but it has 2 per"
        r" epoch)\. Resume with the data, `lanes` and `steps` the checkpoint was trained with",
    ):
        quietly_resume(tmp_path, root / "step=3.ckpt", steps=100)  # 2 batches per epoch


@pytest.mark.skipif(Version(pl.__version__) < Version("2.2"), reason="Lightning 2.2 added the loader state")
def test_resuming_with_lanes_of_another_length_is_an_error(tmp_path, lm_checkpoints):
    _, root = lm_checkpoints
    with pytest.raises(
        ConfigurationError,
        match=r"Expected the training stream's lanes to have the 109 steps of the checkpoint being resumed but they"
        r" have 107, so its carried state would continue other data\. Resume with the data and `lanes`",
    ):
        quietly_resume(tmp_path, root / "step=3.ckpt", tokens=[*TOKENS[:2], TOKENS[2][:-8]])  # still 4 batches


def test_the_training_loader_outside_a_trainer_has_no_position():
    data = LaneDataModule(SEQUENCES, lanes=2, steps=4)
    loader = data.train_dataloader()
    with pytest.raises(ConfigurationError, match=r"to belong to a `Trainer` to save its position .* but its data"):
        loader.state_dict()


def test_the_data_module_builds_the_stream_of_its_rank():
    data = LaneDataModule(SEQUENCES, SEQUENCES, lanes=4, steps=3, eval_lanes=2)
    # the attributes of a Trainer that `setup` and the loaders read; a DDP fit is too slow for this test suite
    data.trainer = SimpleNamespace(  # type: ignore[assignment]
        global_rank=1, world_size=2, ckpt_path=None, strategy=SimpleNamespace(root_device=torch.device("cpu"))
    )
    data.setup("fit")
    train, val = data.streams["train"], data.streams["val"]
    assert (train.rank, train.world_size, train.rows, val.rows) == (1, 2, 2, 1)
    expected = [b["input"][2:] for b in LaneStream(SEQUENCES, lanes=4, steps=3)]
    assert_inputs_equal([b["input"] for b in data.train_dataloader()], expected)
    odd = LaneDataModule(SEQUENCES, SEQUENCES, lanes=2, steps=3, eval_lanes=3)
    odd.trainer = data.trainer
    with pytest.raises(ConfigurationError, match=r"`lanes` to be divisible by the world size 2 but got 3"):
        odd.setup("validate")


READ_PROBE = """
import json, sys
import numpy as np
from lightning_tbptt.data import LaneStream

before = peak_mib()
for batch in LaneStream(sys.argv[1], lanes=4, steps=4096):
    pass
print(json.dumps({"grown_mib": peak_mib() - before}))
"""


@pytest.mark.slow  # reads a 256 MiB file in a subprocess
def test_reading_a_whole_file_does_not_grow_resident_memory(tmp_path):
    """The file is read with positioned reads, not mapped: resident memory holds one batch, not the pages read."""
    path = tmp_path / "big.npy"
    waves = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(64 * 2**20,))  # 256 MiB, sparse
    waves[:: 2**20] = 1.0
    del waves
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MIB + READ_PROBE, str(path)], capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout)["grown_mib"] < 32


def test_a_file_replaced_at_the_same_path_is_read_anew_or_refused(tmp_path):
    path = tmp_path / "data.npy"
    np.save(path, np.arange(8))
    old = LaneStream(str(path), lanes=1, steps=4)
    assert next(iter(old))["input"].tolist() == [[0, 1, 2, 3]]
    path.unlink()
    np.save(path, np.arange(1000, 1012))
    assert next(iter(LaneStream(str(path), lanes=1, steps=4)))["input"].tolist() == [[1000, 1001, 1002, 1003]]
    assert next(iter(old))["input"].tolist() == [[0, 1, 2, 3]], "an open stream keeps reading the file it opened"
    lightning_tbptt.data._open_files.clear()  # as in a new worker process, where the old file cannot be opened
    with pytest.raises(BatchError, match=r"to be the file the stream was built from but it was replaced"):
        next(iter(old))


def test_a_big_endian_file_replaced_at_the_same_path_is_read_anew(tmp_path):
    """Arrays that are not in native byte order are read through a memory map, which must not be reused either."""
    path = tmp_path / "big_endian.npy"
    np.save(path, np.full(8, 1.0, dtype=">f4"))
    assert next(iter(LaneStream(str(path), lanes=1, steps=4)))["input"].tolist() == [[1.0] * 4]
    np.save(tmp_path / "new.npy", np.full(8, 2.0, dtype=">f4"))
    os.replace(tmp_path / "new.npy", path)
    assert next(iter(LaneStream(str(path), lanes=1, steps=4)))["input"].tolist() == [[2.0] * 4]
