"""Several processes (DDP on CPU, gloo): ranks whose batches have different numbers of segments stay in step."""

import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_tbptt.probe import ProbeSettings, next_length
from lightning_tbptt.state import detach_state
from tests.helpers import LR, MOMENTUM, SequenceRegressor

SLOW = pytest.mark.slow  # two DDP processes, seconds each: one test of the module stays in the fast subset

SEGMENT = 4
WEIGHT_DECAY = 0.1
# per rank: batches of 2 padded sequences; (padded length, lengths). Segments run per batch with SEGMENT=4:
# rank 0: 5 and 3, rank 1: 3 and 1, so each rank has batches where the other has more segments.
LAYOUT = {0: [(20, [20, 13]), (20, [9, 5])], 1: [(11, [11, 4]), (20, [3, 2])]}
WORLD = len(LAYOUT)


def rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(10 + rank)
    batches = []
    for padded, lengths in LAYOUT[rank]:
        x = torch.randn(2, padded, 3, generator=generator, dtype=torch.float64)
        y = torch.randn(2, padded, 1, generator=generator, dtype=torch.float64)
        batches.append((x, y, torch.tensor(lengths)))
    return batches


def masks(lengths: torch.Tensor, start: int, size: int) -> torch.Tensor:
    return torch.arange(start, start + size).unsqueeze(0) < lengths.unsqueeze(1)


def rank_windows(longest: int, stride: int, burn_in: int) -> list[tuple[int, int, int, bool]]:
    """``(start, stop, first new step, another window follows)`` of the windows after a burn-in of ``burn_in`` steps."""
    found, start, covered = [], burn_in, burn_in
    while covered < longest:
        stop = min(start + SEGMENT, longest)
        found.append((start, stop, covered - start, stop < longest))
        covered, start = stop, start + stride
    return found


def drawn_windows(longest: int, drawn: list[int]) -> list[tuple[int, int, int, bool]]:
    """Consecutive segments of the drawn lengths up to ``longest``, as :func:`rank_windows` gives them (none overlaps
    the next, so the state is carried from each one's end)."""
    found, start = [], 0
    for length in drawn:
        if start >= longest:
            break
        stop = min(start + length, longest)
        found.append((start, stop, 0, False))
        start = stop
    assert start >= longest, "draw more lengths"
    return found


def reference(
    model: SequenceRegressor,
    step_per: str,
    accumulate: int = 1,
    weight_decay: float = 0.0,
    stride: int = SEGMENT,
    burn_in: int = 0,
    draws: Any = None,
) -> dict[str, Any]:
    """DDP by hand in one process: per segment index, the mean over ranks of each rank's masked loss (0 when the rank
    has no segment left); one step per segment index, or per ``accumulate`` batches (losses divided by it). With
    ``stride`` < SEGMENT, overlapping windows (the loss on their new steps; the state carried from the previous
    window after ``stride`` steps); ``burn_in`` steps first run without gradient. ``draws(batch)``: the drawn lengths
    of a batch's segments (the same on every rank), each step's learning rate scaled by its drawn length."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=weight_decay)
    squared, valid, steps = 0.0, 0, 0
    data = {rank: rank_batches(rank) for rank in LAYOUT}
    for b in range(len(LAYOUT[0])):
        states: dict[int, Any] = dict.fromkeys(LAYOUT)
        windows = {rank: rank_windows(int(data[rank][b][2].max()), stride, burn_in) for rank in LAYOUT}
        if draws is not None:
            drawn = draws(b)
            windows = {rank: drawn_windows(int(data[rank][b][2].max()), drawn) for rank in LAYOUT}
        if burn_in:
            with torch.no_grad():
                states = {rank: detach_state(model.rnn(data[rank][b][0][:, :burn_in])[1]) for rank in LAYOUT}
        most = max(len(found) for found in windows.values())
        for index in range(most):
            loss = torch.zeros((), dtype=torch.float64)
            for rank in LAYOUT:
                if index >= len(windows[rank]):
                    continue
                x, y, lengths = data[rank][b]
                start, stop, new, follows = windows[rank][index]
                if follows and stride < stop - start:
                    first, carried = model.rnn(x[:, start : start + stride], states[rank])
                    rest, _ = model.rnn(x[:, start + stride : stop], carried)
                    out = torch.cat([first, rest], dim=1)
                else:
                    out, carried = model.rnn(x[:, start:stop], states[rank])
                states[rank] = detach_state(carried)
                mask = masks(lengths, start, stop - start) & (torch.arange(stop - start) >= new)
                errors = (model.head(out) - y[:, start:stop]).pow(2).squeeze(-1)
                loss = loss + errors[mask].sum() / mask.sum().clamp(min=1)
                squared += float(errors[mask].detach().sum())
                valid += int(mask.sum())
            (loss / WORLD / accumulate).backward()
            last = index == most - 1 and ((b + 1) % accumulate == 0 or b == len(LAYOUT[0]) - 1)
            if draws is not None:
                optimizer.param_groups[0]["lr"] = LR * drawn[index] / SEGMENT
            if step_per == "segment" or last:
                optimizer.step()
                optimizer.zero_grad()
                steps += 1
    return {"steps": steps, "metric": squared / valid}


SCRIPT = """
import sys
from pathlib import Path

import torch
import torch.distributed
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader
from torchmetrics import MeanSquaredError

from lightning_tbptt import DynamicEvaluation, MaskedMetric, RandomLengths, TBPTTCallback, current_segment, masked_mean
from tests.helpers import LR, MOMENTUM, SequenceRegressor, make_trainer
from tests.test_distributed import SEGMENT, WEIGHT_DECAY, rank_batches

strategy_name, step_per, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
RANDOM = {
    "random": {"random_lengths": RandomLengths(seed=5, std=1.5, minimum=1, scale_lr=True)},
    "dynamic": {"dynamic_eval": DynamicEvaluation(lr=0.5)},
}
scenario = sys.argv[4] if len(sys.argv) > 4 else ""
synced = []  # gradient all-reduces (DDP communication hook calls)
reduced = []  # every all-reduce (the hook's too)
all_reduce = torch.distributed.all_reduce


def counting_all_reduce(*args, **kwargs):
    reduced.append(1)
    return all_reduce(*args, **kwargs)


torch.distributed.all_reduce = counting_all_reduce


def counting_hook(state, bucket):
    synced.append(1)
    return default_hooks.allreduce_hook(None, bucket)


class Model(SequenceRegressor):
    def __init__(self):
        super().__init__(log=False)
        if scenario == "unused":
            self.unused = torch.nn.Linear(2, 2)  # never called: no process gives it a gradient
        self.metric = MaskedMetric(MeanSquaredError())
        self.per_batch = []
        self.counts = []  # `current_segment().count` after every backward, idle steps included
        self.probes = []  # with "auto": (batch, length probed, suggested, length chosen) of every probe
        self.val_losses = []  # with "dynamic": every validation segment's loss

    def configure_optimizers(self):
        decay = WEIGHT_DECAY if scenario == "unused" else 0.0
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=decay)

    def on_after_backward(self):
        self.counts.append(current_segment().count)

    def training_step(self, batch, batch_idx):
        x, y, lengths = batch
        prediction = self(x)
        self.metric.update(prediction.squeeze(-1), y.squeeze(-1))
        return masked_mean((prediction - y).pow(2).squeeze(-1))

    def validation_step(self, batch, batch_idx):
        x, y, lengths = batch
        loss = masked_mean((self(x) - y).pow(2).squeeze(-1))
        self.val_losses.append(float(loss))
        return loss

    def val_dataloader(self):
        return DataLoader(rank_batches(self.trainer.global_rank), batch_size=None)

    def train_dataloader(self):
        batches = rank_batches(self.trainer.global_rank)
        if scenario == "broken" and self.trainer.global_rank == 1:
            x, y, lengths = batches[1]
            batches[1] = (x, y, torch.zeros_like(lengths))  # planning this batch fails on this process only
        return DataLoader(batches, batch_size=None)

    def on_train_start(self):
        # (Lightning registers `ddp_comm_hook` on CUDA only)
        self.trainer.strategy.model.register_comm_hook(None, counting_hook)

    def on_train_batch_start(self, batch, batch_idx):
        self.before = (len(reduced), len(synced))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        (tbptt,) = [c for c in self.trainer.callbacks if isinstance(c, TBPTTCallback)]
        if tbptt.probe_result is not None:
            probe = tbptt.probe_result
            self.probes.append((probe.batch, probe.segment_length, probe.suggested, probe.next_length))
        gradients = len(synced) - self.before[1]
        self.per_batch.append((len(reduced) - self.before[0] - gradients, gradients))
        if scenario == "unused" and batch_idx == 0:  # gradients pending: every process gathers them
            self.trainer.save_checkpoint(root / "pending.ckpt")

    def on_train_end(self):
        # saved by every process (under `ddp_spawn` only rank 0's model returns to the launching process)
        result = {
            "parameters": self.state_dict(),
            "global_step": self.trainer.global_step,
            "per_batch": self.per_batch,
            "metric": float(self.metric.compute()),
            "counts": self.counts,
            "probes": self.probes,
            "val_losses": self.val_losses,
        }
        torch.save(result, root / f"rank{self.trainer.global_rank}.pt")


class Manual(Model):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        optimizer.step()


if __name__ == "__main__":
    torch.manual_seed(0)
    model = Manual().double() if step_per == "manual" else Model().double()
    windows = {"stride": 2, "burn_in": 1} if scenario == "windows" else {}
    exact = {"exact": True} if step_per == "exact" else {"step_per": "segment" if step_per == "manual" else step_per}
    if step_per == "auto":  # every batch probed; a grid of 2, 4, 8
        callback = TBPTTCallback("auto", lengths=2, probe_every=1, min_segment_length=2, max_segment_length=8)
    else:
        callback = TBPTTCallback(SEGMENT, lengths=2, **windows, **exact, **RANDOM.get(scenario, {}))
    options = dict(max_epochs=1, strategy=strategy_name, devices=2, use_distributed_sampler=False)
    if scenario != "dynamic":
        options["limit_val_batches"] = 0
    if scenario == "unused":
        options["accumulate_grad_batches"] = 2
    if scenario == "dynamic":
        options["num_sanity_val_steps"] = 0
    make_trainer(root, [callback], **options).fit(model)
    # Lightning destroys a gloo process group at no exit: freeing gloo's threads while the interpreter shuts down can
    # abort the process (SIGABRT) after its results are written
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
"""


STDERR_TAIL = 60


def with_stderr_tail(message: str, stderr: bytes | None) -> str:
    lines = (stderr or b"").decode(errors="replace").splitlines()
    return "\n".join([message, f"last {STDERR_TAIL} lines of its stderr:", *lines[-STDERR_TAIL:]])


class DDPFailed(subprocess.CalledProcessError):
    """A failed DDP run whose message ends with the tail of its stderr (the ranks' tracebacks, a signal's report)."""

    def __str__(self) -> str:
        return with_stderr_tail(super().__str__(), self.stderr)


class DDPTimedOut(subprocess.TimeoutExpired):
    def __str__(self) -> str:
        return with_stderr_tail(super().__str__(), self.stderr)


def run_ddp(tmp_path: Path, strategy: str, step_per: str, scenario: str = "") -> list[dict[str, Any]]:
    script = tmp_path / "ddp_segments.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parent.parent
    try:
        subprocess.run(
            [sys.executable, str(script), strategy, step_per, str(tmp_path), scenario],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            check=True,
            timeout=240,  # a rank waiting for a collective the other skips would hang here
            capture_output=True,
        )
    except subprocess.CalledProcessError as error:  # still one: the tests of failing runs read its `stderr`
        raise DDPFailed(error.returncode, error.cmd, error.output, error.stderr) from None
    except subprocess.TimeoutExpired as error:
        raise DDPTimedOut(error.cmd, error.timeout, error.output, error.stderr) from None
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.mark.parametrize(
    ("strategy", "step_per"),
    [("ddp", "segment"), pytest.param("ddp", "batch", marks=SLOW), pytest.param("ddp_spawn", "segment", marks=SLOW)],
)
def test_ranks_with_different_segment_counts_stay_identical_and_equal_the_reference(tmp_path, strategy, step_per):
    ranks = run_ddp(tmp_path, strategy, step_per)
    for rank in ranks:
        assert all(torch.equal(rank["parameters"][k], ranks[0]["parameters"][k]) for k in rank["parameters"])
    torch.manual_seed(0)  # as the script does before building its model
    reference_model = SequenceRegressor(log=False).double()
    expected = reference(reference_model, step_per)
    trained = ranks[0]["parameters"]
    for key, value in reference_model.state_dict().items():
        assert torch.allclose(trained[key], value, rtol=0, atol=1e-10), key
    segments_per_batch = [5, 3]  # the most any rank has
    steps = sum(segments_per_batch) if step_per == "segment" else len(segments_per_batch)
    assert expected["steps"] == steps
    for rank in ranks:
        assert rank["global_step"] == steps
        assert rank["metric"] == pytest.approx(expected["metric"], rel=1e-6)  # float32 state, synced over both ranks
        # one agreement all-reduce per batch; one gradient all-reduce per optimizer step (none while accumulating)
        syncs = segments_per_batch if step_per == "segment" else [1, 1]
        assert rank["per_batch"] == [(1, n) for n in syncs]
        # idle steps run inside a segment too: hooks see the batch's agreed count
        assert rank["counts"] == [5] * 5 + [3] * 3


@SLOW
def test_a_parameter_no_process_uses_keeps_no_gradient_and_pending_gradients_are_gathered(tmp_path):
    # `find_unused_parameters=True`: the idle process must not give the unused layer a (zero) gradient, which weight
    # decay would turn into a step; a checkpoint taken between accumulated batches gathers every process's gradients
    ranks = run_ddp(tmp_path, "ddp_find_unused_parameters_true", "batch", "unused")
    torch.manual_seed(0)  # as the script builds its model
    reference_model = SequenceRegressor(log=False).double()
    reference_model.unused = torch.nn.Linear(2, 2).double()
    initial = {k: v.clone() for k, v in reference_model.state_dict().items()}
    expected = reference(reference_model, "batch", accumulate=2, weight_decay=WEIGHT_DECAY)
    assert expected["steps"] == 1
    for rank in ranks:
        assert rank["global_step"] == 1
        for key, value in reference_model.state_dict().items():
            assert torch.allclose(rank["parameters"][key], value, rtol=0, atol=1e-10), key
        assert torch.equal(rank["parameters"]["unused.weight"], initial["unused.weight"])
    state = torch.load(tmp_path / "pending.ckpt", weights_only=False)["callbacks"]["TBPTTCallback"]
    names = list(state["gradients"])
    assert state["gradients_present"].shape == (WORLD, len(names))
    assert state["gradients_present"][:, names.index("unused.weight")].tolist() == [0, 0]
    assert state["gradients_present"][:, names.index("rnn.weight_ih_l0")].tolist() == [1, 1]


@SLOW
def test_overlapping_windows_and_burn_in_with_different_window_counts_equal_the_reference(tmp_path):
    ranks = run_ddp(tmp_path, "ddp", "segment", "windows")
    torch.manual_seed(0)
    reference_model = SequenceRegressor(log=False).double()
    expected = reference(reference_model, "segment", stride=2, burn_in=1)
    # after a burn-in of 1 step, windows of 4 steps every 2 up to each batch's longest sequence:
    # rank 0: 9 and 3 windows, rank 1: 4 and 1
    assert expected["steps"] == 9 + 3
    for rank in ranks:
        assert rank["global_step"] == expected["steps"]
        for key, value in reference_model.state_dict().items():
            assert torch.allclose(rank["parameters"][key], value, rtol=0, atol=1e-10), key
        assert rank["metric"] == pytest.approx(expected["metric"], rel=1e-6)
        assert rank["counts"] == [9 + 1] * 9 + [3 + 1] * 3  # the burn-in prefix counts among the batch's segments


@SLOW
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_a_batch_that_fails_on_one_process_stops_every_process_with_the_cause(tmp_path, strategy):
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_ddp(tmp_path, strategy, "segment", "broken")
    error = failure.value.stderr.decode()
    # whichever process's error the launcher shows (`ddp_spawn` shows the first to fail), the cause is in it
    assert "every length at batch[2] is 0" in error
    if strategy == "ddp":  # every process prints its own: the other one stops too, instead of waiting, and quotes it
        assert re.search(
            r"BatchError: Another process could not plan its batch \(process 1: BatchError: Expected at"
            r" least one sequence of the batch to have a time step but every length at batch\[2\] is 0",
            error,
        )


@SLOW
def test_manual_optimization_with_different_segment_counts_fails_on_every_rank_without_hanging(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_ddp(tmp_path, "ddp", "manual")
    error = failure.value.stderr.decode()
    assert error.count("BatchError: Expected every process to run the same number of segments") == 2  # both ranks
    assert "they run between 3 and 5" in error
    assert "manual optimization" in error


@SLOW
def test_auto_segment_length_is_the_longest_any_process_proposes_and_the_ranks_stay_identical(tmp_path):
    ranks = run_ddp(tmp_path, "ddp", "auto")
    grid = ProbeSettings(every=1, auto=True, min_length=2, max_length=8)
    assert [len(rank["probes"]) for rank in ranks] == [2, 2]  # every batch probed
    differed = 0
    for probes in zip(*(rank["probes"] for rank in ranks), strict=True):
        ((_, length),), chosen = {p[:2] for p in probes}, {p[3] for p in probes}  # the same batch and length
        assert len(chosen) == 1  # the same length on every process
        proposals = [next_length(length, suggested, grid) for _, _, suggested, _ in probes]
        assert chosen == {max(proposals)}
        differed += len(set(proposals)) > 1
    assert differed  # (a process proposed a shorter length than it got)
    assert ranks[0]["global_step"] == ranks[1]["global_step"]
    for name, value in ranks[0]["parameters"].items():
        assert torch.equal(value, ranks[1]["parameters"][name]), name


def awd_lengths(batch: int, count: int = 12) -> list[int]:
    """The lengths `RandomLengths(seed=5, std=1.5, minimum=1)` draws for a batch, by its documented rule."""
    generator = random.Random(f"5:0:{batch}")
    drawn = []
    for _ in range(count):
        centre = SEGMENT if generator.random() < 0.95 else SEGMENT / 2
        drawn.append(max(1, int(generator.gauss(centre, 1.5))))
    return drawn


@SLOW
def test_every_process_draws_the_same_lengths_and_scales_its_steps_alike(tmp_path):
    ranks = run_ddp(tmp_path, "ddp", "segment", "random")
    torch.manual_seed(0)
    reference_model = SequenceRegressor(log=False).double()
    expected = reference(reference_model, "segment", draws=awd_lengths)
    for rank in ranks:
        assert rank["global_step"] == expected["steps"]
        for key, value in reference_model.state_dict().items():
            assert torch.allclose(rank["parameters"][key], value, rtol=0, atol=1e-10), key
        assert rank["metric"] == pytest.approx(expected["metric"], rel=1e-6)


@SLOW
def test_dynamic_evaluation_adapts_each_process_on_its_own_lanes_and_leaves_training_alone(tmp_path):
    ranks = run_ddp(tmp_path, "ddp", "segment", "dynamic")
    torch.manual_seed(0)
    reference_model = SequenceRegressor(log=False).double()
    reference(reference_model, "segment")  # training as without evaluation
    for rank in ranks:
        for key, value in reference_model.state_dict().items():
            assert torch.allclose(rank["parameters"][key], value, rtol=0, atol=1e-10), key
    for rank, result in enumerate(ranks):  # scored by the weights adapted on this process's earlier segments only
        model = SequenceRegressor(log=False).double()
        model.load_state_dict(result["parameters"])
        params = list(model.parameters())
        expected = []
        for x, y, lengths in rank_batches(rank):
            state = None
            for start in range(0, int(lengths.max()), SEGMENT):
                size = min(SEGMENT, x.shape[1] - start)
                out, new_state = model.rnn(x[:, start : start + size], state)
                errors = (model.head(out) - y[:, start : start + size]).pow(2).squeeze(-1)
                mask = masks(lengths, start, size)
                loss = errors[mask].sum() / mask.sum()
                expected.append(loss.item())
                with torch.no_grad():
                    for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
                        p -= 0.5 * g
                state = detach_state(new_state)
        assert result["val_losses"] == pytest.approx(expected, rel=1e-9)
