"""Stream sequences larger than RAM in the lane layout: :class:`LaneStream` and :class:`LaneDataModule`.

The sequences are concatenated into one virtual stream, which is cut into ``lanes`` equally long contiguous lanes.
Batch ``i`` holds, for every lane ``j``, the steps ``[i * steps, (i + 1) * steps)`` of lane ``j`` (the last batch may
be shorter), so row ``j`` of batch ``i + 1`` continues row ``j`` of batch ``i`` and a recurrent state can be carried
from one batch to the next. ``starts`` marks where a sequence begins inside a lane (and step 0 of the first batch),
which is where that lane's state must start from zeros::

    stream  a0 a1 a2 a3 a4 b0 b1 b2 b3 b4 b5 b6      (sequences a and b; lanes=2, steps=4)
    lane 0  a0 a1 a2 a3 | a4 b0                        row 0 of batch 0 | row 0 of batch 1
    lane 1  b1 b2 b3 b4 | b5 b6                        row 1 of batch 0 | row 1 of batch 1
    starts  ^           |    ^                         lane 0
            ^           |                              lane 1 (starts mid-sequence: fresh in batch 0 only)

Arrays are read slice by slice from memory maps: a sequence is never loaded whole, and a dataset sent to
``DataLoader`` workers carries file names, not data.

Example:
    >>> import numpy as np
    >>> stream = LaneStream([np.arange(5), np.arange(10, 17)], lanes=2, steps=4)
    >>> first, second = stream
    >>> first["input"]
    tensor([[ 0,  1,  2,  3],
            [11, 12, 13, 14]])
    >>> second["input"]
    tensor([[ 4, 10],
            [15, 16]])
    >>> second["starts"]
    tensor([[False,  True],
            [False, False]])
    >>> LaneStream(np.arange(5), lanes=2, steps=4)
    Traceback (most recent call last):
      ...
    lightning_tbptt.errors.ConfigurationError: Expected the lane length (5 stream steps // 2 lanes = 2) to be at least `steps=4` but it is shorter. Use fewer `lanes` or shorter `steps`.

"""  # noqa: E501

import bisect
import functools
import math
import mmap
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, Literal, TypeAlias

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from typing_extensions import override

from lightning_tbptt._lightning_internals import batches_done_in_epoch, resume_reruns_last_batch
from lightning_tbptt.errors import BatchError, ConfigurationError
from lightning_tbptt.namespaces import DataModuleBase, TrainerDefault, default_hook

ArrayLike: TypeAlias = np.ndarray[Any, Any] | Tensor | str | os.PathLike[str]
SequenceLike: TypeAlias = ArrayLike | Mapping[str, ArrayLike]
Sequences: TypeAlias = SequenceLike | list[SequenceLike] | tuple[SequenceLike, ...]
Batch: TypeAlias = dict[str, Tensor]

_ARRAY = "input"  # the field of array (not mapping) sequences
_MAX_OPEN_MAPS = 128  # memory maps kept open per process; each holds a file descriptor


_open_files: "OrderedDict[tuple[int, str, tuple[int, ...]], int]" = OrderedDict()


def _identity(filename: str) -> tuple[int, ...]:
    """What tells one file from another stored at the same path later: device, inode, size, modification time."""
    status = os.stat(filename)
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _replaced(filename: str) -> BatchError:
    return BatchError(
        f"Expected {filename!r} to be the file the stream was built from but it was replaced or modified since."
        " Build the stream again after changing its files."
    )


def _file_descriptor(filename: str, identity: tuple[int, ...]) -> int:
    """A read-only descriptor of the file ``identity`` at ``filename``, for this process (at most 128 stay open)."""
    key = (os.getpid(), filename, identity)
    if key in _open_files:
        _open_files.move_to_end(key)
        return _open_files[key]
    descriptor = os.open(filename, os.O_RDONLY)
    status = os.fstat(descriptor)
    if (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns) != identity:
        os.close(descriptor)
        raise _replaced(filename)
    _open_files[key] = descriptor
    while len(_open_files) > _MAX_OPEN_MAPS:
        (pid, _, _), evicted = _open_files.popitem(last=False)
        if pid == os.getpid():
            os.close(evicted)
    return descriptor


def _read_into(descriptor: int, target: "np.ndarray[Any, Any]", position: int) -> None:
    """Fill the contiguous array ``target`` with the bytes of the file at ``position``."""
    buffer = target.reshape(-1).view(np.uint8).data
    while buffer.nbytes:
        count = os.preadv(descriptor, [buffer], position)
        if count == 0:
            raise BatchError(f"Expected more data in the mapped file at byte {position} but it ended early.")
        buffer, position = buffer[count:], position + count


@functools.lru_cache(maxsize=_MAX_OPEN_MAPS)
def _open_map(
    filename: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    offset: int,
    order: Literal["C", "F"],
    identity: tuple[int, ...],
) -> np.memmap:
    # per process: a forked worker inherits the open maps, an unpickled copy opens its own
    if _identity(filename) != identity:
        raise _replaced(filename)
    return np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


def _torch_dtype(dtype: np.dtype[Any], where: str) -> torch.dtype:
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype.newbyteorder("="))).dtype
    except TypeError:
        raise BatchError(
            f"Expected {where} to have a dtype that torch supports but got {dtype}. Convert it, e.g. to float32."
        ) from None


class _InMemory:
    """A numpy array or CPU tensor, pickled as it is."""

    def __init__(self, value: "np.ndarray[Any, Any] | Tensor", where: str) -> None:
        self.value = value
        self.shape = tuple(value.shape)
        self.dtype = value.dtype if isinstance(value, Tensor) else _torch_dtype(value.dtype, where)

    def write(self, out: Tensor, begin: int, end: int) -> None:
        if isinstance(self.value, Tensor):
            out.copy_(self.value[begin:end])
        else:
            out.numpy()[...] = self.value[begin:end]


class _Mapped:
    """An array in a file, reopened lazily in each process: pickling it copies the file name, not the data."""

    def __init__(self, array: np.memmap, buffer: mmap.mmap, where: str) -> None:
        if array.filename is None:
            raise ConfigurationError(
                f"Expected {where} to be a memory map of a named file but it maps a file object without a name."
                " Pass the path of a .npy file or a memmap opened from a path."
            )
        order: Literal["C", "F"] | None = "C" if array.flags.c_contiguous else "F" if array.flags.f_contiguous else None
        if order is None:
            raise ConfigurationError(
                f"Expected {where} to be a memory map that can be reopened from (filename, offset, shape) but got a"
                f" non-contiguous view with strides {array.strides}. Pass the path or the memmap as opened and select"
                " from the batches instead."
            )
        # numpy maps the file from `offset` rounded down to the allocation granularity; a view starts further in
        mapped_from = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
        start = mapped_from + array.ctypes.data - np.frombuffer(buffer, dtype=np.uint8).ctypes.data
        self.filename, self.offset, self.order = str(array.filename), int(start), order
        self.identity = _identity(self.filename)
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.numpy_dtype = array.dtype
        self.dtype = _torch_dtype(array.dtype, where)

    def write(self, out: Tensor, begin: int, end: int) -> None:
        target = out.numpy()
        rows_are_contiguous = self.order == "C" or len(self.shape) == 1
        if rows_are_contiguous and self.numpy_dtype.isnative and target.flags.c_contiguous:
            # a positioned read: the file's pages are not mapped into this process, so reading a long stream does not
            # grow its resident memory (the operating system's page cache may still keep them)
            row_bytes = self.numpy_dtype.itemsize * math.prod(self.shape[1:])
            _read_into(_file_descriptor(self.filename, self.identity), target, self.offset + begin * row_bytes)
            return
        array = _open_map(self.filename, self.numpy_dtype, self.shape, self.offset, self.order, self.identity)
        target[...] = array[begin:end]


_Source: TypeAlias = _InMemory | _Mapped


def _source(value: Any, where: str) -> _Source:
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not os.path.isfile(path):
            raise ConfigurationError(
                f"Expected {where} to be the path of an existing .npy file but got {path!r}, which does not exist."
                " Check the path, or pass the array itself."
            )
        try:
            value = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise ConfigurationError(
                f"Expected {where} to be a .npy file that can be memory-mapped but reading {path!r} failed: {error}"
                " Save each array with `np.save`."
            ) from None
        if not isinstance(value, np.ndarray):  # an .npz archive
            value.close()
            raise ConfigurationError(
                f"Expected {where} to be a .npy file but {path!r} is an .npz archive. Pass the paths of .npy files"
                " saved with `np.save`, or the archive's arrays."
            )
    if isinstance(value, Tensor):
        if value.device.type != "cpu" or value.layout != torch.strided:
            raise ConfigurationError(
                f"Expected {where} to be a dense CPU tensor but got one on {value.device} with layout {value.layout}."
                " Pass `tensor.cpu()`: batches are moved to the model's device by the Trainer."
            )
        value = value.detach()
    elif not isinstance(value, np.ndarray):
        raise ConfigurationError(
            f"Expected {where} to be a numpy array, a CPU tensor, the path of a .npy file or a mapping of those but got"
            f" {type(value).__name__}. Convert it, e.g. with `np.asarray`."
        )
    if value.ndim == 0:
        raise BatchError(
            f"Expected {where} to have a leading time dimension but got a 0-dimensional array. Give each sequence's"
            " steps along dimension 0."
        )
    if isinstance(value, np.memmap):
        owner: Any = value
        while isinstance(owner, np.ndarray):
            owner = owner.base
        if isinstance(owner, mmap.mmap):
            return _Mapped(value, owner, where)
    return _InMemory(value, where)


def _describe(index: int, value: Any) -> str:
    name = f" ({os.fspath(value)!r})" if isinstance(value, (str, os.PathLike)) else ""
    return f"sequence {index}{name} of `sequences`"


def _read_sequences(sequences: Any) -> tuple[bool, list[dict[str, _Source]]]:
    """Return whether the sequences are mappings, and each sequence's sources by field, all checked."""
    items = list(sequences) if isinstance(sequences, (list, tuple)) else [sequences]
    if not items:
        raise ConfigurationError(
            "Expected argument `sequences` to hold at least one sequence but got an empty "
            f"{type(sequences).__name__}. Pass an array, a .npy path, a mapping of those, or a list of them."
        )
    is_mapping = isinstance(items[0], Mapping)
    result: list[dict[str, _Source]] = []
    for index, item in enumerate(items):
        where = _describe(index, item)
        if isinstance(item, Mapping) != is_mapping:
            kinds = ("a mapping", "an array") if is_mapping else ("an array", "a mapping")
            raise BatchError(
                f"Expected every sequence of `sequences` to be of one kind but sequence 0 is {kinds[0]} and sequence"
                f" {index} is {kinds[1]}. Give all sequences as arrays or all as mappings with the same keys."
            )
        if is_mapping:
            if not item or not all(isinstance(key, str) and key != "starts" for key in item):
                raise BatchError(
                    f"Expected the keys of {where} to be strings other than 'starts' (which the batches use for the"
                    f" sequence starts) but got {list(item)}. Rename the fields."
                )
            sources = {key: _source(value, f"{where}[{key!r}]") for key, value in item.items()}
            lengths = {key: source.shape[0] for key, source in sources.items()}
            if len(set(lengths.values())) > 1:
                raise BatchError(
                    f"Expected the arrays of {where} to share their leading (time) length but got {lengths}. Give"
                    " every field one entry per time step."
                )
        else:
            sources = {_ARRAY: _source(item, where)}
        if result:
            _check_like(result[0], sources, index, is_mapping)
        result.append(sources)
    return is_mapping, result


def _check_like(first: dict[str, _Source], sources: dict[str, _Source], index: int, is_mapping: bool) -> None:
    if set(sources) != set(first):
        raise BatchError(
            f"Expected every mapping of `sequences` to have the keys {sorted(first)} (those of sequence 0) but sequence"
            f" {index} has {sorted(sources)}. Give every sequence the same fields."
        )
    for key, reference in first.items():
        source = sources[key]
        if (source.shape[1:], source.dtype) != (reference.shape[1:], reference.dtype):
            field = f"[{key!r}]" if is_mapping else ""
            raise BatchError(
                f"Expected every sequence{field} of `sequences` to have the per-step shape {reference.shape[1:]} and"
                f" dtype {reference.dtype} of sequence 0{field} but sequence {index}{field} has shape"
                f" {source.shape[1:]} and dtype {source.dtype}. Give every sequence the same per-step shape and dtype."
            )


def _check_int(value: Any, argument: str, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise ConfigurationError(f"Expected argument `{argument}` to be {kind} but got {value!r}. {fix}")
    return value


class LaneStream(IterableDataset[Batch]):
    """An iterable dataset of batches in the lane layout, read lazily from arrays, memory maps or ``.npy`` files.

    Use it with ``DataLoader(stream, batch_size=None, num_workers=...)``: it yields whole batches, in the same order
    for any number of workers (worker ``w`` of ``W`` reads batches ``w, w + W, ...``, which the ``DataLoader`` takes
    in turn).

    Args:
        sequences: One sequence or a list or tuple of them. A sequence is a numpy array (a ``np.memmap`` too), a CPU
            tensor, the path of a ``.npy`` file (memory-mapped), or a mapping of field names to those whose arrays
            share their leading length (e.g. ``{"x": features, "y": labels}``). Time is the leading dimension of every
            array. All sequences are arrays, or all are mappings with the same keys; each field has one per-step
            shape and dtype across sequences.
        lanes: The number of lanes, over all processes.
        steps: Time steps per batch (the last batch of an epoch may be shorter).
        target_shift: With ``s > 0`` (array sequences only), a sequence of length ``n`` contributes the ``n - s``
            pairs ``(seq[t], seq[t + s])`` as ``"input"`` and ``"target"``, so no target crosses into the next
            sequence (``s = 1`` for language modelling). Sequences too short to contribute anything are skipped.
        rank: This process's rank among ``world_size`` (``Trainer.global_rank``).
        world_size: The number of processes (``Trainer.world_size``); rank ``r`` reads lanes
            ``[r * lanes / world_size, (r + 1) * lanes / world_size)``, so every rank has the same number of batches.
        start_batch: The batch at which the next iteration starts, to resume in the middle of an epoch (see
            :attr:`start_batch`).

    Batches are dicts of CPU tensors of ``R = lanes // world_size`` rows, batch-first: ``"input"`` ``(R, t, ...)``,
    ``"target"`` (with ``target_shift``) and ``"starts"`` ``(R, t)`` (bool) for array sequences; the mapping's keys and
    ``"starts"`` for mapping sequences. ``starts[j, u]`` is ``True`` where a sequence begins at step ``u`` of row
    ``j``, and at step 0 of the first batch, where every lane starts (possibly in the middle of a sequence).

    With ``N`` stream steps, each lane has ``N // lanes`` of them: the last ``N % lanes`` steps (fewer than
    ``lanes``) are never read.

    Memory maps (``np.memmap``, ``.npy`` paths) are stored as file name, dtype, shape and offset and reopened in each
    process (at most 128 open at a time), so the dataset pickles small; a view of a memory map that is not contiguous
    cannot be reopened and is rejected. The file's content is read, not changes made to a copy-on-write
    (``mode="c"``) memmap. Arrays and tensors in memory are pickled with the dataset.

    Raises:
        ConfigurationError: If an argument is invalid, a path is not a ``.npy`` file, or the lanes are shorter than
            ``steps``.
        BatchError: If the sequences do not have one kind, field names, per-step shape and dtype.

    Example:
        >>> import numpy as np
        >>> stream = LaneStream(np.arange(10), lanes=2, steps=2, target_shift=1)
        >>> stream.lane_length, stream.num_batches
        (4, 2)
        >>> batch = next(iter(stream))
        >>> batch["input"], batch["target"]
        (tensor([[0, 1],
                [4, 5]]), tensor([[1, 2],
                [5, 6]]))
        >>> LaneStream(np.arange(10), lanes=3, steps=2, world_size=2)
        Traceback (most recent call last):
          ...
        lightning_tbptt.errors.ConfigurationError: Expected argument `lanes` to be divisible by the world size 2 but got 3. Use a multiple of the number of processes, e.g. `lanes=4`.

    """  # noqa: E501

    def __init__(
        self,
        sequences: Sequences,
        *,
        lanes: int,
        steps: int,
        target_shift: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        self.lanes = _check_int(lanes, "lanes", 1, "Pass the number of lanes of the stream, e.g. `lanes=32`.")
        self.steps = _check_int(steps, "steps", 1, "Pass the number of time steps per batch, e.g. `steps=256`.")
        self.target_shift = _check_int(
            target_shift, "target_shift", 0, "Pass 0 for no target, or e.g. 1 for next-step targets."
        )
        self.world_size = _check_int(world_size, "world_size", 1, "Pass `Trainer.world_size`.")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigurationError(
                f"Expected argument `rank` to be an integer from 0 to {world_size - 1} (world size {world_size}) but"
                f" got {rank!r}. Pass `Trainer.global_rank`."
            )
        self.rank = rank
        if lanes % world_size:
            raise ConfigurationError(
                f"Expected argument `lanes` to be divisible by the world size {world_size} but got {lanes}. Use a"
                f" multiple of the number of processes, e.g. `lanes={world_size * max(1, round(lanes / world_size))}`."
            )
        self.rows = lanes // world_size
        is_mapping, sequences_ = _read_sequences(sequences)
        if is_mapping and target_shift:
            raise ConfigurationError(
                f"Expected argument `target_shift` to be 0 for mapping sequences but got {target_shift}. Shift"
                " the targets in your arrays (e.g. `{'x': x[:-1], 'y': x[1:]}`), or pass arrays."
            )
        self._fields = tuple(sequences_[0])
        self._reads = (
            [(key, key, 0) for key in self._fields]
            if is_mapping
            else [("input", _ARRAY, 0)] + ([("target", _ARRAY, target_shift)] if target_shift else [])
        )
        self._sources: list[dict[str, _Source]] = []
        self._offsets = [0]  # where each contributing sequence starts in the stream, then the stream's length
        for sources in sequences_:
            contribution = sources[self._fields[0]].shape[0] - target_shift
            if contribution > 0:
                self._sources.append(sources)
                self._offsets.append(self._offsets[-1] + contribution)
        self._shapes = {key: sequences_[0][field].shape[1:] for key, field, _ in self._reads}
        self._dtypes = {key: sequences_[0][field].dtype for key, field, _ in self._reads}
        length = self._offsets[-1]
        self._lane_length = length // lanes
        if self._lane_length < steps:
            raise ConfigurationError(
                f"Expected the lane length ({length} stream steps // {lanes} lanes = {self._lane_length}) to be at"
                f" least `steps={steps}` but it is shorter. Use fewer `lanes` or shorter `steps`."
            )
        self._start_batch = 0
        self.start_batch = start_batch

    @property
    def lane_length(self) -> int:
        """The time steps of each lane: the stream's length ``// lanes``."""
        return self._lane_length

    @property
    def num_batches(self) -> int:
        """The batches of a whole epoch, the same on every rank: ``ceil(lane_length / steps)``."""
        return math.ceil(self._lane_length / self.steps)

    @property
    def start_batch(self) -> int:
        """The batch at which the next iteration starts; 0 again after it (in each worker's copy too).

        With ``DataLoader`` workers the loader's own copy is not iterated, so it keeps the value: set it back to 0
        after ``iter(loader)`` (:class:`LaneDataModule`'s loaders do) if the loader is used for more than one epoch.
        """
        return self._start_batch

    @start_batch.setter
    def start_batch(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.num_batches:
            raise ConfigurationError(
                f"Expected argument `start_batch` to be an integer from 0 to {self.num_batches} (the batches per epoch)"
                f" but got {value!r}. Pass the number of batches of the epoch already done."
            )
        self._start_batch = value

    def __len__(self) -> int:
        """The batches of a whole epoch (:attr:`num_batches`), also when :attr:`start_batch` skips some of them.

        Lightning takes the length as the epoch's number of batches and, when it resumes in the middle of an epoch,
        counts the batches already done towards it.
        """
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        first, self._start_batch = self._start_batch, 0
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return map(self.batch, range(first + worker, self.num_batches, workers))

    def batch(self, index: int) -> Batch:
        """Read batch ``index`` of the epoch (from 0 to :attr:`num_batches` - 1)."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch index {index} out of range for {self.num_batches} batches")
        begin = index * self.steps
        size = min(self.steps, self._lane_length - begin)
        batch = {
            key: torch.empty((self.rows, size, *self._shapes[key]), dtype=self._dtypes[key]) for key in self._shapes
        }
        starts = torch.zeros((self.rows, size), dtype=torch.bool)
        for row in range(self.rows):
            row_start = (self.rank * self.rows + row) * self._lane_length + begin
            position, stop = row_start, row_start + size
            sequence = bisect.bisect_right(self._offsets, position) - 1
            while position < stop:
                piece_end = min(stop, self._offsets[sequence + 1])
                offset, column = position - self._offsets[sequence], position - row_start
                width = piece_end - position
                starts[row, column] = offset == 0
                for key, field, shift in self._reads:
                    self._sources[sequence][field].write(
                        batch[key][row, column : column + width], offset + shift, offset + shift + width
                    )
                position, sequence = piece_end, sequence + 1
        if index == 0:
            starts[:, 0] = True
        batch["starts"] = starts
        return batch

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lanes={self.lanes}, steps={self.steps}, target_shift={self.target_shift},"
            f" rank={self.rank}, world_size={self.world_size}, lane_length={self._lane_length},"
            f" num_batches={self.num_batches})"
        )


class _LaneLoader(DataLoader[Batch]):
    """A ``DataLoader`` that sets its stream's ``start_batch`` back to 0 once the workers have their copies."""

    @override
    def __iter__(self) -> Any:
        iterator = super().__iter__()
        if isinstance(self.dataset, LaneStream):
            self.dataset.start_batch = 0
        return iterator


_POSITION_FORMAT = 1  # the format of the training loader's `state_dict`


def _epoch_batches(limit: int | float, num_batches: int) -> int:
    """The batches Lightning runs per epoch of a loader of ``num_batches``, given ``Trainer.limit_train_batches``."""
    if isinstance(limit, int):
        return min(num_batches, limit)
    return int(num_batches * limit)


def _start_batch(batches_done: int, epoch_batches: int, reruns_last_batch: bool) -> int:
    """Where the stream resumes, given the batches of the epoch a checkpoint had trained and those of the epoch.

    In the middle of an epoch, after the batches done. After the epoch's last batch, Lightning 2.5 and newer start the
    next epoch from the iterator made when resuming, which must then start at 0; older releases run the finished
    epoch's last batch index once more, which must get no data (the next epoch makes a new iterator).

    Example:
        >>> _start_batch(2, 6, reruns_last_batch=False), _start_batch(6, 6, False), _start_batch(6, 6, True)
        (2, 0, 6)

    """
    if batches_done < epoch_batches or reruns_last_batch:
        return batches_done
    return 0


class _TrainingLoader(_LaneLoader):
    """The training loader: its ``state_dict`` is the position in the epoch, which Lightning saves and restores.

    Lightning (2.2 and newer) saves the ``state_dict`` of a training loader that has one in every checkpoint of a fit,
    and on resume calls ``load_state_dict`` after ``train_dataloader()`` and before iterating the loader.
    """

    def __init__(self, dataset: LaneStream, *, datamodule: "LaneDataModule", **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.datamodule = datamodule

    def _trainer(self, action: str) -> Any:
        trainer = self.datamodule.trainer
        if trainer is None:
            raise ConfigurationError(
                f"Expected the training loader of `LaneDataModule` to belong to a `Trainer` to {action} its position"
                " (read from the fit's progress) but its data module has no `trainer`. Outside a `Trainer`, set"
                " `LaneStream.start_batch` yourself."
            )
        return trainer

    def state_dict(self) -> dict[str, int]:
        """The position of the training epoch in progress: the batches of it trained, and of the epoch and stream."""
        trainer = self._trainer("save")
        stream = self.dataset
        assert isinstance(stream, LaneStream)
        return {
            "version": _POSITION_FORMAT,
            "batches_done": batches_done_in_epoch(trainer),
            "epoch_batches": int(trainer.num_training_batches),
            "num_batches": stream.num_batches,
            "lane_length": stream.lane_length,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Start the next iteration of the stream where the checkpoint's epoch stands (see :func:`_start_batch`)."""
        trainer = self._trainer("restore")
        stream = self.dataset
        assert isinstance(stream, LaneStream)
        version = state_dict.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version > _POSITION_FORMAT:
            raise ConfigurationError(
                f"Expected the checkpoint's training loader state of `LaneDataModule` to be in format"
                f" {_POSITION_FORMAT} or older but it is in format {version!r}, written by a newer release of"
                " lightning-tbptt. Upgrade lightning-tbptt to resume from it."
            )
        saved = state_dict.get("num_batches")
        if saved != stream.num_batches:
            raise ConfigurationError(
                f"Expected the training stream to have the {saved} batches per epoch of the checkpoint being resumed"
                f" but it has {stream.num_batches}. Resume with the data, `lanes` and `steps` the checkpoint was"
                " trained with."
            )
        length = state_dict.get("lane_length", stream.lane_length)
        if length != stream.lane_length:
            raise ConfigurationError(
                f"Expected the training stream's lanes to have the {length} steps of the checkpoint being resumed but"
                f" they have {stream.lane_length}, so its carried state would continue other data. Resume with the"
                " data and `lanes` the checkpoint was trained with."
            )
        done, epoch_batches = int(state_dict["batches_done"]), int(state_dict["epoch_batches"])
        stream.start_batch = _start_batch(done, epoch_batches, resume_reruns_last_batch(trainer))


class _NoData:
    """Stands for the dataloader method of a stage without data.

    Lightning sees the method as not overridden (through ``__wrapped__``) and behaves as for a datamodule without it,
    e.g. skips validation with a warning; called, it raises a clear error.
    """

    def __init__(self, datamodule: "LaneDataModule", name: str) -> None:
        self.datamodule = datamodule
        self.name = name

    @property
    def __wrapped__(self) -> Any:
        return default_hook(self.datamodule, f"{self.name}_dataloader")

    def __call__(self) -> Any:
        raise ConfigurationError(
            f"Expected argument `{self.name}` of `LaneDataModule` to hold the {self.name} sequences but got None."
            f" Pass e.g. `LaneDataModule(..., {self.name}='{self.name}.npy')`."
        )


_STAGES = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class LaneDataModule(DataModuleBase):
    """Training, validation, test and prediction loaders of :class:`LaneStream` batches, one stream per rank.

    Args:
        train: The training sequences (see :class:`LaneStream`), or ``None``.
        val: The validation sequences, or ``None``.
        test: The test sequences, or ``None``.
        predict: The prediction sequences, or ``None``.
        lanes: The lanes of the training stream, over all processes (a multiple of ``Trainer.world_size``).
        steps: Time steps per batch.
        eval_lanes: The lanes of the validation, test and prediction streams; ``None``: ``lanes``.
        target_shift: See :class:`LaneStream`.
        num_workers: ``DataLoader`` workers; the batches come in the same order for any number.
        pin_memory: ``DataLoader(pin_memory=...)``; ``None``: whether the Trainer's root device is a GPU.

    A stage without sequences has no loader, as for a datamodule that does not define it: ``Trainer.fit`` then skips
    validation (with Lightning's warning), and calling e.g. ``val_dataloader()`` raises ``ConfigurationError``.

    In ``setup``, each stream is built for ``Trainer.global_rank`` among ``Trainer.world_size`` processes.

    The training loader is resumable: its ``state_dict`` is the position in the epoch in progress (the batches of it
    trained, read from the fit's progress), which Lightning saves in every checkpoint of a fit and, on resume, gives
    back to the loader's ``load_state_dict``, so a fit resumed in the middle of an epoch reads the batches that an
    uninterrupted run would, with or without :class:`~lightning_tbptt.TBPTTCallback` (Lightning 2.2 and newer; with
    Lightning 2.1, and for checkpoints that hold no loader state, ``train_dataloader()`` reads the same position from
    the progress that the checkpoint restored).

    Raises:
        ConfigurationError: If an argument is invalid (the sequences are checked in ``setup``).

    Example:
        >>> import numpy as np
        >>> data = LaneDataModule(np.arange(1000), lanes=4, steps=50, target_shift=1)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> {key: tuple(value.shape) for key, value in batch.items()}
        {'input': (4, 50), 'target': (4, 50), 'starts': (4, 50)}
        >>> data.val_dataloader()
        Traceback (most recent call last):
          ...
        lightning_tbptt.errors.ConfigurationError: Expected argument `val` of `LaneDataModule` to hold the val sequences but got None. Pass e.g. `LaneDataModule(..., val='val.npy')`.

    """  # noqa: E501

    # hooks this class leaves to Lightning, which either namespace's `Trainer` must see as not overridden
    prepare_data = TrainerDefault()
    on_before_batch_transfer = TrainerDefault()
    transfer_batch_to_device = TrainerDefault()
    on_after_batch_transfer = TrainerDefault()

    def __init__(
        self,
        train: Sequences | None,
        val: Sequences | None = None,
        test: Sequences | None = None,
        predict: Sequences | None = None,
        *,
        lanes: int,
        steps: int,
        eval_lanes: int | None = None,
        target_shift: int = 0,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        self.sequences = {"train": train, "val": val, "test": test, "predict": predict}
        self.lanes = _check_int(lanes, "lanes", 1, "Pass the number of lanes of the stream, e.g. `lanes=32`.")
        self.steps = _check_int(steps, "steps", 1, "Pass the number of time steps per batch, e.g. `steps=256`.")
        self.eval_lanes = self.lanes
        if eval_lanes is not None:
            self.eval_lanes = _check_int(eval_lanes, "eval_lanes", 1, "Pass e.g. `eval_lanes=8`, or None for `lanes`.")
        self.target_shift = _check_int(
            target_shift, "target_shift", 0, "Pass 0 for no target, or e.g. 1 for next-step targets."
        )
        self.num_workers = _check_int(num_workers, "num_workers", 0, "Pass 0 to read in the main process.")
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise ConfigurationError(
                f"Expected argument `pin_memory` to be a bool or None but got {pin_memory!r}. Pass None to pin"
                " memory when training on a GPU."
            )
        self.pin_memory = pin_memory
        self.streams: dict[str, LaneStream] = {}
        for name, sequences in self.sequences.items():
            if sequences is None:
                setattr(self, f"{name}_dataloader", _NoData(self, name))

    @override
    def setup(self, stage: str) -> None:
        """Build the streams of ``stage`` (``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``) for this rank."""
        for name in _STAGES.get(stage, ()):
            if self.sequences[name] is not None:
                self.streams[name] = self._build(name)

    def _build(self, name: str) -> LaneStream:
        trainer = self.trainer
        rank, world_size = (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)
        return LaneStream(
            self.sequences[name],  # type: ignore[arg-type]
            lanes=self.lanes if name == "train" else self.eval_lanes,
            steps=self.steps,
            target_shift=self.target_shift,
            rank=rank,
            world_size=world_size,
        )

    def _loader(self, name: str) -> DataLoader[Batch]:
        if name not in self.streams:
            self.streams[name] = self._build(name)
        pin_memory = self.pin_memory
        if pin_memory is None:
            pin_memory = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        options: dict[str, Any] = {"batch_size": None, "num_workers": self.num_workers, "pin_memory": pin_memory}
        if name == "train":
            return _TrainingLoader(self.streams[name], datamodule=self, **options)
        return _LaneLoader(self.streams[name], **options)

    def _resumed_start(self, stream: LaneStream) -> int:
        """Where a resumed fit's epoch stands, read from the progress that the checkpoint restored (0: not resuming)."""
        trainer = self.trainer
        if trainer is None or trainer.ckpt_path is None:
            return 0
        done = batches_done_in_epoch(trainer)
        if done > stream.num_batches:
            raise ConfigurationError(
                f"Expected the training stream to have at least the {done} batches of the epoch that the checkpoint"
                f" being resumed had trained but it has {stream.num_batches} per epoch. Resume with the data, `lanes`"
                " and `steps` the checkpoint was trained with."
            )
        epoch_batches = _epoch_batches(trainer.limit_train_batches, stream.num_batches)
        return _start_batch(done, epoch_batches, resume_reruns_last_batch(trainer))

    @override
    def train_dataloader(self) -> DataLoader[Batch]:
        """The training loader; resuming a fit, it starts where the checkpoint's epoch stands."""
        loader = self._loader("train")
        stream = self.streams["train"]
        stream.start_batch = self._resumed_start(stream)
        return loader

    @override
    def val_dataloader(self) -> DataLoader[Batch]:
        """The validation loader (``eval_lanes`` lanes)."""
        return self._loader("val")

    @override
    def test_dataloader(self) -> DataLoader[Batch]:
        """The test loader (``eval_lanes`` lanes)."""
        return self._loader("test")

    @override
    def predict_dataloader(self) -> DataLoader[Batch]:
        """The prediction loader (``eval_lanes`` lanes)."""
        return self._loader("predict")
