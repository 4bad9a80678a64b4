"""Time per segment on the CPU: padded segments with a masked loss against packing every segment.

One LSTM is trained with truncated backpropagation (one backward and SGD step per segment, the state carried and
detached) on padded batches of variable-length sequences, three ways, in plain PyTorch (no Lightning, so only the
computation differs):

* ``padded``: what ``TBPTTCallback(lengths=...)`` hands a plain model: the whole padded batch in every segment, the
  LSTM run over every step, padded steps masked out of the loss;
* ``padded, drop finished``: the same, without the rows that have ended before the segment starts (what
  ``drop_finished=True`` does);
* ``packed``: every segment packed with ``pack_padded_sequence(..., enforce_sorted=False)`` (sorted by length,
  packed, run, unpacked with ``pad_packed_sequence`` and unsorted), without the rows that have ended (a packed
  sequence cannot hold empty rows), the loss over the unpacked output with the same mask.

The three compute the same losses (checked: the difference of the summed segment losses of the last batch is
printed). Several length distributions (all padded to ``T``), interleaved rounds, the first batch of every run
untimed, one torch thread. Prints milliseconds per segment (a batch's time over its ``T / k`` segments) and the ratios
against ``padded``.

    python benchmarks/packed.py
    python benchmarks/packed.py --quick   # tiny sizes, for the test suite
"""

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

METHODS = ("padded", "padded, drop finished", "packed")


def distributions(length: int, segment_length: int) -> dict[str, Callable[[int, torch.Generator], torch.Tensor]]:
    """Named length distributions: each draws ``B`` lengths in ``[1, T]``, one of them ``T`` (the padded length)."""

    def with_longest(lengths: torch.Tensor) -> torch.Tensor:
        lengths[0] = length
        return lengths.clamp(1, length)

    return {
        "equal (no padding)": lambda b, g: torch.full((b,), length),
        "uniform [T/10, T]": lambda b, g: with_longest(torch.randint(length // 10, length + 1, (b,), generator=g)),
        "long tail (exp., mean T/8)": lambda b, g: with_longest(
            (torch.empty(b).exponential_(8.0 / length, generator=g)).long() + segment_length // 4
        ),
    }


class Net(nn.Module):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)


def train_batch(
    net: Net, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], k: int, method: str
) -> float:
    """One batch of truncated backpropagation, segment by segment; returns the sum of the segment losses."""
    x, y, lengths = batch["x"], batch["y"], batch["lengths"]
    rows = torch.arange(x.shape[0])
    state = None
    total = 0.0
    for start in range(0, x.shape[1], k):
        seg_lengths = (lengths - start).clamp(0, k)
        if method != "padded":
            keep = seg_lengths > 0
            if state is not None and not bool(keep[rows].all()):
                state = tuple(s[:, keep[rows]] for s in state)  # drop the rows that ended in the last segment
            rows = keep.nonzero().squeeze(1)
        seg_x, seg_y, seg_n = x[rows, start : start + k], y[rows, start : start + k], seg_lengths[rows]
        if method == "packed":
            packed = pack_padded_sequence(seg_x, seg_n, batch_first=True, enforce_sorted=False)
            packed_out, state = net.lstm(packed, state)
            out, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=seg_x.shape[1])
        else:
            out, state = net.lstm(seg_x, state)
        mask = torch.arange(seg_x.shape[1]) < seg_n[:, None]
        loss = ((net.head(out).squeeze(-1) - seg_y) ** 2 * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state = tuple(s.detach() for s in state)
        total += loss.item()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=1024, help="padded length T")
    parser.add_argument("--segment-length", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3, help="batches per run, the first one untimed")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median batch is reported")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args()
    if args.quick:
        args.hidden_size, args.input_size, args.batch_size, args.length, args.segment_length = 8, 2, 4, 64, 16
        args.batches, args.rounds = 2, 1
    torch.set_num_threads(args.threads)
    k, segments = args.segment_length, -(-args.length // args.segment_length)
    print(
        f"LSTM H={args.hidden_size}, input {args.input_size}, B={args.batch_size}, T={args.length}, k={k} ({segments}"
        f" segments per batch), SGD, {args.rounds} interleaved rounds of {args.batches - 1} timed batches,"
        f" {args.threads} torch threads, torch {torch.__version__}"
    )
    print(f"{'lengths':<28}{'valid':>7}{'method':>24}{'ms/segment':>12}{'min':>9}{'vs padded':>11}{'|dloss|':>12}")
    table = []
    for name, draw in distributions(args.length, k).items():
        generator = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(args.batches):
            lengths = draw(args.batch_size, generator)
            x = torch.randn(args.batch_size, args.length, args.input_size, generator=generator)
            batches.append({"x": x, "y": torch.cumsum(x[..., 0], dim=1) / args.length**0.5, "lengths": lengths})
        valid = sum(int(b["lengths"].sum()) for b in batches[1:]) / ((args.batches - 1) * args.batch_size * args.length)
        torch.manual_seed(0)
        initial = Net(args.input_size, args.hidden_size).state_dict()
        times: dict[str, list[float]] = {method: [] for method in METHODS}
        losses: dict[str, float] = {}
        for round_ in range(args.rounds):
            for method in METHODS[round_ % 3 :] + METHODS[: round_ % 3]:
                net = Net(args.input_size, args.hidden_size)
                net.load_state_dict(initial)
                optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
                stamps = []
                for batch in batches:
                    stamps.append(time.perf_counter())
                    losses[method] = train_batch(net, optimizer, batch, k, method)
                stamps.append(time.perf_counter())
                times[method] += [b - a for a, b in itertools.pairwise(stamps[1:])]  # the first batch untimed
        padded_ms = 1000 * statistics.median(times["padded"]) / segments
        for method in METHODS:
            ms = 1000 * statistics.median(times[method]) / segments
            fastest = 1000 * min(times[method]) / segments
            dloss = abs(losses[method] - losses["padded"])
            print(f"{name:<28}{valid:>7.3f}{method:>24}{ms:>12.2f}{fastest:>9.2f}{ms / padded_ms:>11.3f}{dloss:>12.2e}")
            table.append((name, valid, method, ms, ms / padded_ms))
    print("\n| lengths | valid fraction | method | ms / segment | vs padded |")
    print("|---|---:|---|---:|---:|")
    for name, valid, method, ms, ratio in table:
        print(f"| {name} | {valid:.3f} | {method} | {ms:.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
