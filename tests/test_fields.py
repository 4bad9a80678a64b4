"""Finding, validating and replacing per-sequence lengths in a batch."""

import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_tbptt import BatchError, ConfigurationError, TBPTTCallback
from lightning_tbptt.fields import FieldLocation, check_lengths, segment_lengths
from lightning_tbptt.plan import plan_segments
from tests.helpers import SequenceRegressor, make_trainer

Batch = namedtuple("Batch", ["x", "lengths"])


@dataclasses.dataclass
class Record:
    x: torch.Tensor
    lengths: torch.Tensor


LENGTHS = torch.tensor([3, 1])
X = torch.zeros(2, 3)


@pytest.mark.parametrize(
    ("spec", "batch", "read_back"),
    [
        ("lengths", {"x": X, "lengths": LENGTHS}, lambda b: b["lengths"]),
        ("lengths", OrderedDict(x=X, lengths=LENGTHS), lambda b: b["lengths"]),
        ("lengths", Batch(X, LENGTHS), lambda b: b.lengths),
        ("lengths", Record(X, LENGTHS), lambda b: b.lengths),
        (1, (X, LENGTHS), lambda b: b[1]),
        (-1, [X, LENGTHS], lambda b: b[-1]),
        (1, Batch(X, LENGTHS), lambda b: b.lengths),
        (("meta", 0), {"x": X, "meta": (LENGTHS, "id")}, lambda b: b["meta"][0]),
    ],
    ids=["dict", "ordered-dict", "namedtuple", "dataclass", "tuple", "list-negative", "namedtuple-index", "path"],
)
def test_get_and_replace_keep_the_container_types(spec, batch, read_back):
    where = FieldLocation(spec)
    assert where.get(batch) is LENGTHS
    new = torch.tensor([1, 0])
    replaced = where.replace(batch, new)
    assert type(replaced) is type(batch)
    assert read_back(replaced) is new
    assert read_back(batch) is LENGTHS, "the original batch is not modified"


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: torch.Tensor
    lengths: torch.Tensor


def test_a_frozen_dataclass_is_refused_by_name():
    where = FieldLocation("lengths")
    assert where.get(Frozen(X, LENGTHS)) is LENGTHS
    with pytest.raises(
        BatchError, match=r"Expected the Frozen holding lengths at batch\['lengths'\] to be a dataclass"
    ):
        where.replace(Frozen(X, LENGTHS), None)


def test_callable_lengths_are_read_only():
    batch = {"x": X, "n": LENGTHS}
    where = FieldLocation(lambda b: b["n"])
    assert where.get(batch) is LENGTHS
    assert not where.writable
    assert where.replace(batch, None) is batch


@pytest.mark.parametrize("spec", [None, True, 2.0, (), ("a", 1.5), []], ids=repr)
def test_invalid_specs(spec):
    with pytest.raises(ConfigurationError, match=r"`lengths` to be a key, an index, a tuple of keys and indices"):
        FieldLocation(spec)


@pytest.mark.parametrize(
    ("spec", "batch", "match"),
    [
        ("n", {"x": X}, r"at batch\['n'\] .* the dict has no key 'n' \(its keys: \['x'\]\)"),
        (3, (X, LENGTHS), r"at batch\[3\] .* the tuple has only 2 elements"),
        ("n", Batch(X, LENGTHS), r"the Batch has no field 'n'"),
        (("x", 0), {"x": 5}, r"found a int where 0 was to be looked up"),
        (0, (X.tolist(),), r"lengths at batch\[0\] to be a tensor but got list"),
    ],
    ids=["missing-key", "index", "field", "not-a-container", "not-a-tensor"],
)
def test_lengths_not_found(spec, batch, match):
    with pytest.raises(BatchError, match=match):
        FieldLocation(spec).get(batch)


@pytest.mark.parametrize(
    ("lengths", "match"),
    [
        (torch.tensor([[3], [1]]), r"1-D tensor of size 2 \(the batch size\) but got shape \(2, 1\)"),
        (torch.tensor([3, 1, 2]), r"1-D tensor of size 2 \(the batch size\) but got shape \(3,\)"),
        (torch.tensor([3.0, 1.0]), r"integer tensor but got dtype torch.float32"),
        (torch.tensor([True, False]), r"integer tensor but got dtype torch.bool"),
        (torch.tensor([3, -1]), r"between 0 and the padded length 3 but got values from -1 to 3"),
        (torch.tensor([4, 1]), r"between 0 and the padded length 3 but got values from 1 to 4"),
    ],
    ids=["2-D", "wrong-size", "float", "bool", "negative", "too-long"],
)
def test_invalid_lengths(lengths, match):
    with pytest.raises(BatchError, match=match):
        check_lengths(lengths, where="batch[2]", batch_size=2, padded_length=3)


def test_valid_lengths_come_back_on_the_cpu():
    checked = check_lengths(torch.tensor([3, 0], dtype=torch.int32), where="b", batch_size=2, padded_length=3)
    assert checked.tolist() == [3, 0]
    assert checked.device.type == "cpu"


def test_segment_lengths_are_clamped_to_the_segment():
    lengths = torch.tensor([10, 7, 3, 0])
    assert segment_lengths(lengths, start=0, size=4).tolist() == [4, 4, 3, 0]
    assert segment_lengths(lengths, start=4, size=4).tolist() == [4, 3, 0, 0]
    assert segment_lengths(lengths, start=8, size=2).tolist() == [2, 0, 0, 0]


Missing = namedtuple("Missing", ["x", "y"])


@dataclasses.dataclass
class Pair:
    x: torch.Tensor
    y: torch.Tensor


# places that do not exist, in every kind of container: the first four are the ones an outside check found escaping
# as Python errors (`IndexError`, `TypeError`, `ValueError`) instead of the documented `BatchError`
PLACES_THAT_DO_NOT_EXIST = [
    (2, (X, X), r"batch\[2\] .* the tuple has only 2 elements"),
    ("n", (X, X), r"found a tuple where 'n' was to be looked up"),
    ("n", Missing(X, X), r"the Missing has no field 'n'"),
    (("x", 0), {"x": X, "y": X}, r"found a Tensor where 0 was to be looked up"),
    ("n", Pair(X, X), r"the Pair has no field 'n'"),
    ("n", {"x": X}, r"the dict has no key 'n' \(its keys: \['x'\]\)"),
    (("meta", "n"), {"x": X, "meta": {}}, r"batch\['meta'\]\['n'\] .* the dict has no key 'n'"),
]
PLACE_IDS = ["tuple-index", "tuple-key", "namedtuple-field", "tensor-index", "dataclass-field", "dict-key", "path"]


@pytest.mark.parametrize(("spec", "batch", "match"), PLACES_THAT_DO_NOT_EXIST, ids=PLACE_IDS)
def test_replacing_at_a_place_that_does_not_exist_is_a_batch_error(spec, batch, match):
    with pytest.raises(BatchError, match=r"Expected the batch to hold lengths at .*" + match):
        FieldLocation(spec).replace(batch, None)
    with pytest.raises(BatchError, match=r"Expected the batch to hold resets at .*" + match):
        FieldLocation(spec, argument="resets").replace(batch, None)


@pytest.mark.parametrize(("spec", "batch", "match"), PLACES_THAT_DO_NOT_EXIST, ids=PLACE_IDS)
@pytest.mark.parametrize("argument", ["lengths", "resets"])
def test_planning_a_batch_without_the_place_is_a_batch_error(spec, batch, match, argument):
    location = FieldLocation(spec, argument=argument)
    with pytest.raises(BatchError, match=rf"Expected the batch to hold {argument} at .*" + match):
        plan_segments(batch, 2, **{argument: location})


def test_a_fit_with_lengths_at_a_missing_index_fails_with_a_batch_error(tmp_path):
    x = torch.randn(4, 6, 3)
    loader = DataLoader(TensorDataset(x, x[..., :1]), batch_size=2)
    trainer = make_trainer(tmp_path, [TBPTTCallback(3, lengths=2)], max_steps=2)
    with pytest.raises(BatchError, match=r"TBPTTCallback\(lengths=2\)`\) but the list has only 2 elements"):
        trainer.fit(SequenceRegressor(), loader)
