"""One-shot checks of TBPTTCallback on a CUDA GPU: what the CPU-only development machine cannot check.

1. Equivalence on CUDA/cuDNN: a GPU ``Trainer`` fit with ``TBPTTCallback`` (2-layer LSTM, 2-layer GRU, float32)
   against a plain hand-written TBPTT loop on the same device (zero state per batch, detach between segments, one
   optimizer step per segment, same optimizer): parameters compared with ``torch.allclose``.
2. Per-segment transfer: the segments reach ``training_step`` on the device, ``transfer_batch_to_device`` receives one
   segment at a time and device memory never holds the whole batch (against ``transfer="batch"`` as a control);
   streamed training (``LaneDataModule`` + ``TBPTTCallback(streaming=True)``) has a peak GPU memory flat in the length
   of the stream, against full backpropagation through one batch.
3. Mixed precision: ``16-mixed`` (autocast float16 + GradScaler) and ``bf16-mixed`` fits against the same hand-written
   loop under ``torch.autocast``.
4. ``LaneDataModule`` pins its training batches under a GPU ``Trainer`` (with and without workers).
5. ``exact=True`` against a loop that keeps every segment's graph and steps once per batch, without dropout, with
   ``nn.Dropout`` (CUDA generator replayed) and with dropout between ``nn.LSTM`` layers (which cuDNN would draw from a
   state no generator sets back: the callback turns cuDNN off for such a model around its exact batches, and the
   reference runs without cuDNN too), each with a truncated control that must differ.
6. Dynamic evaluation (``dynamic_eval``) of a cuDNN LSTM in eval mode, whose backward cuDNN refuses (the callback
   turns cuDNN off around each adapting step): the score on the device against the CPU's, the trained weights back
   bitwise, and below the static score.

Every check prints PASS, FAIL or SKIP with its numbers; the exit status is 1 if any check failed. ``--device cpu
--quick`` smoke-tests the script on a machine without a GPU (the GPU-only parts are reported as SKIP)::

    python benchmarks/gpu_check.py --out "$OUT/gpu_check.txt"        # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --quick               # smoke test, no GPU
"""

import argparse
import contextlib
import copy
import gc
import logging
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_tbptt
from lightning_tbptt import DynamicEvaluation, TBPTTCallback
from lightning_tbptt.data import LaneDataModule

LR = 0.05
MOMENTUM = 0.9
FP32_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # cuDNN float32 (TF32 off); identical kernels give 0
AMP_TOLERANCE = {"rtol": 5e-2, "atol": 5e-2}  # loose: catches a wrong scale or state, not rounding
MIB = 2**20


@dataclass(frozen=True)
class Sizes:
    # 1 and 3: equivalence against the hand-written loop
    eq_sequences: int
    eq_length: int
    eq_input: int
    eq_hidden: int
    eq_batch: int
    eq_segment: int
    eq_epochs: int
    # 2a: per-segment transfer of ordinary (non-streaming) batches
    tr_sequences: int
    tr_length: int
    tr_input: int
    tr_hidden: int
    tr_segment: int
    # 2b-2d: streamed training against full backpropagation
    st_lengths: tuple[int, ...]
    st_extra_length: int | None
    st_full_length: int
    st_lanes: int
    st_hidden: int
    st_segment: int
    st_steps: int


FULL = Sizes(
    eq_sequences=16,
    eq_length=200,
    eq_input=8,
    eq_hidden=64,
    eq_batch=8,
    eq_segment=25,
    eq_epochs=2,  # 2 epochs x 2 batches x 8 segments = 32 optimizer steps
    tr_sequences=16,
    tr_length=40_000,
    tr_input=128,  # a batch of 8 x 40,000 x 128 float32 inputs is 156 MiB; a segment of 500 steps 2 MiB
    tr_hidden=32,
    tr_segment=500,
    st_lengths=(10_000, 100_000),
    st_extra_length=1_000_000,  # run last, only if the time budget allows
    st_full_length=10_000,
    st_lanes=16,
    st_hidden=128,
    st_segment=200,
    st_steps=2_000,
)
QUICK = Sizes(
    eq_sequences=8,
    eq_length=60,
    eq_input=4,
    eq_hidden=16,
    eq_batch=4,
    eq_segment=10,
    eq_epochs=1,
    tr_sequences=8,
    tr_length=2_000,
    tr_input=16,
    tr_hidden=16,
    tr_segment=100,
    st_lengths=(2_000, 20_000),
    st_extra_length=None,
    st_full_length=2_000,
    st_lanes=8,
    st_hidden=32,
    st_segment=100,
    st_steps=1_000,
)


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------


class Report:
    """Prints lines and writes them at once to the report file, so that a run cut short still leaves its results."""

    def __init__(self, path: str | None) -> None:
        self.file: TextIO | None = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "w")  # noqa: SIM115 (kept open for the whole run, closed in `close`)
        self.results: list[tuple[str, str, str]] = []

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        if self.file is not None:
            self.file.write(text + "\n")
            self.file.flush()

    def result(self, name: str, status: str, detail: str) -> None:
        self.results.append((name, status, detail))
        self.line(f"[{status}] {name}: {detail}")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@dataclass
class Context:
    device: str
    sizes: Sizes
    budget: float
    start: float
    root: str

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def run_check(report: Report, name: str, check: Callable[[str], None]) -> None:
    """Run one check; an exception is a FAIL with its message, and the other checks still run."""
    began = time.perf_counter()
    try:
        check(name)
    except Exception as error:
        report.result(name, "FAIL", f"{type(error).__name__}: {error}"[:600])
        for text in traceback.format_exc().strip().splitlines()[-8:]:
            report.line(f"    {text}")
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    report.line(f"    ({time.perf_counter() - began:.1f} s)")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# --------------------------------------------------------------------------------------------------------------------
# Models, data, Trainer
# --------------------------------------------------------------------------------------------------------------------


def make_optimizer(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=LR, momentum=MOMENTUM)


class LossSum:
    """Adds up the losses on the device (one tensor, so that memory does not grow with the number of steps)."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def add(self, loss: Tensor) -> None:
        value = loss.detach().float()
        self.total = value if self.total is None else self.total + value
        self.count += 1

    def value(self) -> float:
        return math.nan if self.total is None else float(self.total)


class Regressor(pl.LightningModule):
    """A per-step regression model written for short sequences: nothing about TBPTT in it."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 2) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(input_size, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)
        self.losses = LossSum()

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.losses.add(loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters())


class NextValue(pl.LightningModule):
    """Predicts the next value of a stream of noisy waves (as in ``benchmarks/memory.py``)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)
        self.losses = LossSum()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        out, _ = self.lstm(batch["input"].unsqueeze(-1))
        loss = F.mse_loss(self.head(out).squeeze(-1), batch["target"])
        self.losses.add(loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters())


def regression_loader(sequences: int, length: int, input_size: int, batch_size: int) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(sequences, length, input_size, generator=generator)
    y = torch.cumsum(x[..., :1], dim=1) / length**0.5  # depends on the past: the carried state matters
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def make_waves(lanes: int, length: int) -> "np.ndarray[Any, Any]":
    """``lanes`` noisy sine waves of ``length + 1`` steps, float32, one per row."""
    generator = np.random.default_rng(0)
    steps = np.arange(length + 1, dtype=np.float32)[None, :]
    phases = generator.uniform(0, 2 * np.pi, size=(lanes, 1)).astype(np.float32)
    waves = np.sin(0.01 * steps + phases)
    waves += generator.standard_normal(size=waves.shape, dtype=np.float32) * np.float32(0.1)
    return waves


def fit(
    ctx: Context,
    model: pl.LightningModule,
    callbacks: list[Callback],
    *,
    loader: Any = None,
    datamodule: Any = None,
    **kwargs: Any,
) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "gpu" if ctx.cuda else "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "benchmark": False,
        "default_root_dir": ctx.root,
    }
    options.update(kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    trainer.fit(model, train_dataloaders=loader, datamodule=datamodule)
    return trainer


def detach(state: Any) -> Any:
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


@dataclass
class ReferenceRun:
    steps: int
    loss_sum: float
    scale: float | None = None


def reference_tbptt(
    model: Regressor,
    loader: DataLoader[Any],
    *,
    segment_length: int,
    device: str,
    epochs: int = 1,
    carry: bool = True,
    amp_dtype: torch.dtype | None = None,
    scaler: Any = None,
) -> ReferenceRun:
    """The oracle: a plain PyTorch TBPTT loop (zero state per batch, detach between segments, a step per segment)."""
    model.to(device).train()
    optimizer = make_optimizer(model.parameters())
    losses = LossSum()
    for _ in range(epochs):
        for x, y in loader:
            state = None
            for start in range(0, x.shape[1], segment_length):
                x_seg = x[:, start : start + segment_length].to(device)
                y_seg = y[:, start : start + segment_length].to(device)
                # Lightning's MixedPrecision plugin autocasts with the weight cache off: so must the oracle, else the
                # results differ in the last bits
                autocast = (
                    torch.autocast(device, dtype=amp_dtype, cache_enabled=False)
                    if amp_dtype is not None
                    else contextlib.nullcontext()
                )
                with autocast:
                    out, new_state = model.rnn(x_seg, state)
                    loss = F.mse_loss(model.head(out), y_seg)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:  # the order of Lightning's MixedPrecision plugin
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    scaler.step(optimizer)
                    scaler.update()
                optimizer.zero_grad()
                state = detach(new_state) if carry else None
                losses.add(loss)
    model.cpu()
    return ReferenceRun(losses.count, losses.value(), None if scaler is None else float(scaler.get_scale()))


@dataclass
class Comparison:
    max_diff: float
    close: bool
    bitwise: bool


def compare(a: nn.Module, b: nn.Module, tolerance: dict[str, float]) -> Comparison:
    pairs = [
        (p.detach().cpu().float(), q.detach().cpu().float())
        for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    ]
    return Comparison(
        max_diff=max((p - q).abs().max().item() for p, q in pairs),
        close=all(torch.allclose(p, q, **tolerance) for p, q in pairs),
        bitwise=all(torch.equal(p, q) for p, q in pairs),
    )


# --------------------------------------------------------------------------------------------------------------------
# 1. Equivalence in float32
# --------------------------------------------------------------------------------------------------------------------


def check_equivalence(report: Report, ctx: Context, name: str, cell: str) -> None:
    s = ctx.sizes
    loader = regression_loader(s.eq_sequences, s.eq_length, s.eq_input, s.eq_batch)
    torch.manual_seed(0)
    model = Regressor(cell, s.eq_input, s.eq_hidden)
    reference, no_carry, initial = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    trainer = fit(ctx, model, [TBPTTCallback(s.eq_segment)], loader=loader, max_epochs=s.eq_epochs)
    run = reference_tbptt(reference, loader, segment_length=s.eq_segment, device=ctx.device, epochs=s.eq_epochs)
    reference_tbptt(no_carry, loader, segment_length=s.eq_segment, device=ctx.device, epochs=s.eq_epochs, carry=False)
    result = compare(model, reference, FP32_TOLERANCE)
    moved = compare(model, initial, FP32_TOLERANCE).max_diff
    sensitivity = compare(model, no_carry, FP32_TOLERANCE)
    loss_diff = abs(model.losses.value() - run.loss_sum)
    ok = result.close and trainer.global_step == run.steps and not sensitivity.close and moved > 0
    report.result(
        name,
        verdict(ok),
        f"max|dparam|={result.max_diff:.3e} (allclose rtol={FP32_TOLERANCE['rtol']:g} atol="
        f"{FP32_TOLERANCE['atol']:g}: {result.close}, bitwise: {result.bitwise}); steps {trainer.global_step} vs"
        f" reference {run.steps}; |dloss_sum|={loss_diff:.3e}; params moved {moved:.3e}; control without state"
        f" carry differs by {sensitivity.max_diff:.3e}",
    )


# --------------------------------------------------------------------------------------------------------------------
# 2a. Per-segment transfer
# --------------------------------------------------------------------------------------------------------------------


def allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def reset_peak() -> int:
    """Start measuring the peak of GPU memory allocated; returns what is allocated now."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return allocated()


def peak_since(base: int) -> int:
    return torch.cuda.max_memory_allocated() - base if torch.cuda.is_available() else 0


class TransferProbe(Regressor):
    """Records what ``transfer_batch_to_device`` receives and what ``training_step`` sees."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transferred: list[tuple[int, ...]] = []
        self.step_devices: set[str] = set()
        self.step_lengths: set[int] = set()
        self.peak_in_step = 0

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        self.transferred.append(tuple(tensor.shape[1] for tensor in batch))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _ = batch
        self.step_devices.add(x.device.type)
        self.step_lengths.add(x.shape[1])
        self.peak_in_step = max(self.peak_in_step, allocated())
        loss = super().training_step(batch, batch_idx)
        self.peak_in_step = max(self.peak_in_step, allocated())  # with the segment's activations
        return loss


def check_transfer(report: Report, ctx: Context, name: str) -> None:
    s = ctx.sizes
    batch_size = s.tr_sequences // 2
    loader = regression_loader(s.tr_sequences, s.tr_length, s.tr_input, batch_size)
    batch_bytes = sum(t.nbytes for t in next(iter(loader)))
    segments = 2 * math.ceil(s.tr_length / s.tr_segment)
    runs = {}
    for transfer in ("segment", "batch"):
        torch.manual_seed(0)
        model = TransferProbe("lstm", s.tr_input, s.tr_hidden, num_layers=1)
        # the default transfer (None) is "segment" for this module; the control moves whole batches
        callback = (
            TBPTTCallback(s.tr_segment) if transfer == "segment" else TBPTTCallback(s.tr_segment, transfer="batch")
        )
        base = reset_peak()
        trainer = fit(ctx, model, [callback], loader=loader)
        runs[transfer] = (model, trainer, peak_since(base), model.peak_in_step - base)
    model, trainer, peak, in_step = runs["segment"]
    control, _, control_peak, control_in_step = runs["batch"]
    segment_shape = (s.tr_segment, s.tr_segment)
    segments_ok = (
        model.step_devices == {ctx.device}
        and model.step_lengths == {s.tr_segment}
        and model.transferred == [segment_shape] * segments
        and trainer.global_step == segments
    )
    control_ok = control.transferred == [(s.tr_length, s.tr_length)] * 2
    same = compare(model, control, FP32_TOLERANCE)
    detail = (
        f"segments on {sorted(model.step_devices)} with {sorted(model.step_lengths)} steps; transfer_batch_to_device"
        f" got {len(model.transferred)} pieces of {sorted(set(model.transferred))} steps (expected {segments} of"
        f" {segment_shape}); control transfer='batch' got {sorted(set(control.transferred))}; same parameters as"
        f" the control: max|dparam|={same.max_diff:.3e}"
    )
    if ctx.cuda:
        memory_ok = peak < batch_bytes / 4 and control_peak >= batch_bytes
        detail += (
            f"; one batch is {batch_bytes / MIB:.1f} MiB; peak GPU memory of the fit {peak / MIB:.1f} MiB"
            f" (in training_step {in_step / MIB:.1f}), with transfer='batch' {control_peak / MIB:.1f} MiB"
            f" (in training_step {control_in_step / MIB:.1f}); target: peak < batch / 4, control >= batch"
        )
    else:
        memory_ok = True
        detail += "; GPU memory not measured on cpu"
    report.result(name, verdict(segments_ok and control_ok and memory_ok and same.close), detail)


# --------------------------------------------------------------------------------------------------------------------
# 2b-2d. Streamed training: peak GPU memory against the length of the stream
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StreamRun:
    length: int
    peak: int
    seconds: float
    steps: int
    expected_steps: int
    loss_sum: float


def stream_fit(ctx: Context, length: int, full: bool = False) -> StreamRun:
    s = ctx.sizes
    waves = make_waves(s.st_lanes, length)
    torch.manual_seed(0)
    model = NextValue(s.st_hidden)
    base = reset_peak()
    began = time.perf_counter()
    if full:  # no callback: the whole batch on the device, one backward through all `length` steps
        tensors = torch.from_numpy(waves)
        loader = DataLoader([{"input": tensors[:, :-1], "target": tensors[:, 1:]}], batch_size=None)
        trainer = fit(ctx, model, [], loader=loader)
        expected = 1
    else:
        data = LaneDataModule(list(waves), lanes=s.st_lanes, steps=s.st_steps, target_shift=1)
        callback = TBPTTCallback(s.st_segment, streaming=True, resets="starts")
        trainer = fit(ctx, model, [callback], datamodule=data)
        expected = sum(
            math.ceil(min(s.st_steps, length - begin) / s.st_segment) for begin in range(0, length, s.st_steps)
        )
    seconds = time.perf_counter() - began
    return StreamRun(length, peak_since(base), seconds, trainer.global_step, expected, model.losses.value())


def describe(run: StreamRun) -> str:
    peak = f"peak {run.peak / MIB:.1f} MiB, " if run.peak else ""
    return f"T={run.length}: {peak}{run.steps} steps (expected {run.expected_steps}), {run.seconds:.1f} s"


def stream_runs_ok(runs: list[StreamRun]) -> bool:
    return all(run.steps == run.expected_steps and math.isfinite(run.loss_sum) for run in runs)


def check_streaming(report: Report, ctx: Context, streamed: list[StreamRun]) -> None:
    s = ctx.sizes
    for length in s.st_lengths:
        streamed.append(stream_fit(ctx, length))
        report.line(f"    streamed {describe(streamed[-1])}")
    report.result(
        "2b streamed training runs",
        verdict(stream_runs_ok(streamed)),
        "; ".join(describe(run) for run in streamed) + "; losses finite: "
        f"{all(math.isfinite(run.loss_sum) for run in streamed)}",
    )
    full = stream_fit(ctx, s.st_full_length, full=True)
    report.line(f"    full BPTT {describe(full)}")
    if not ctx.cuda:
        report.result("2c peak GPU memory flat in T, against full BPTT", "SKIP", "needs --device cuda")
        return
    short = next(run for run in streamed if run.length == s.st_full_length)
    ratio = streamed[-1].peak / streamed[0].peak
    contrast = full.peak / short.peak
    ok = ratio <= 1.10 and contrast >= 2.0 and full.steps == 1
    report.result(
        "2c peak GPU memory flat in T, against full BPTT",
        verdict(ok),
        f"streamed peak T={streamed[-1].length} / T={streamed[0].length} = {ratio:.3f} (target <= 1.10);"
        f" full BPTT at T={full.length}: {full.peak / MIB:.1f} MiB = {contrast:.1f}x streamed (target >= 2)",
    )


def check_longest_stream(report: Report, ctx: Context, name: str, streamed: list[StreamRun]) -> None:
    length = ctx.sizes.st_extra_length
    if length is None or not ctx.cuda or not streamed:
        report.result(name, "SKIP", "only without --quick, on cuda")
        return
    last = streamed[-1]
    projected = last.seconds * length / last.length + 5.0
    if ctx.elapsed() + 1.5 * projected > ctx.budget:  # a margin: the run cannot be stopped once started
        report.result(
            name, "SKIP", f"T={length} would take ~{projected:.0f} s, {ctx.elapsed():.0f} s of {ctx.budget:.0f} used"
        )
        return
    run = stream_fit(ctx, length)
    ratio = run.peak / streamed[0].peak
    ok = stream_runs_ok([run]) and ratio <= 1.10
    report.result(
        name,
        verdict(ok),
        f"{describe(run)}; peak T={length} / T={streamed[0].length} = {ratio:.3f} (target <= 1.10)",
    )


# --------------------------------------------------------------------------------------------------------------------
# 3. Mixed precision
# --------------------------------------------------------------------------------------------------------------------


def bf16_lstm_runs_on_cpu() -> bool:
    """OneDNN's bfloat16 LSTM needs CPU instructions that not every x86 machine has."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nn.LSTM(2, 2)(torch.zeros(1, 1, 2))
    except RuntimeError:
        return False
    return True


def check_mixed_precision(report: Report, ctx: Context, name: str, precision: str) -> None:
    if not ctx.cuda and (precision == "16-mixed" or not bf16_lstm_runs_on_cpu()):
        report.result(name, "SKIP", f"{precision} LSTM needs cuda here")
        return
    s = ctx.sizes
    loader = regression_loader(s.eq_sequences, s.eq_length, s.eq_input, s.eq_batch)
    torch.manual_seed(0)
    model = Regressor("lstm", s.eq_input, s.eq_hidden)
    reference = copy.deepcopy(model)
    trainer = fit(ctx, model, [TBPTTCallback(s.eq_segment)], loader=loader, max_epochs=s.eq_epochs, precision=precision)
    fp16 = precision == "16-mixed"
    run = reference_tbptt(
        reference,
        loader,
        segment_length=s.eq_segment,
        device=ctx.device,
        epochs=s.eq_epochs,
        amp_dtype=torch.float16 if fp16 else torch.bfloat16,
        scaler=torch.amp.GradScaler(ctx.device) if fp16 else None,
    )
    result = compare(model, reference, AMP_TOLERANCE)
    finite = math.isfinite(model.losses.value()) and all(torch.isfinite(p).all() for p in model.parameters())
    detail = (
        f"losses finite: {finite} (sum {model.losses.value():.4f}, reference {run.loss_sum:.4f}); steps"
        f" {trainer.global_step} vs reference {run.steps}; max|dparam|={result.max_diff:.3e} (bitwise:"
        f" {result.bitwise}; allclose rtol={AMP_TOLERANCE['rtol']:g} atol={AMP_TOLERANCE['atol']:g}: {result.close})"
    )
    ok = finite and result.close and trainer.global_step == run.steps
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if fp16:
        scale = None if scaler is None else float(scaler.get_scale())
        detail += f"; GradScaler scale {scale} vs reference {run.scale}"
        ok = ok and scale == run.scale
    report.result(name, verdict(ok), detail)


# --------------------------------------------------------------------------------------------------------------------
# 5. Exact gradients (``exact=True``) on the device
# --------------------------------------------------------------------------------------------------------------------


class Dropping(Regressor):
    """The regressor with dropout: ``nn.Dropout`` before the head and, with ``between_layers``, inside the RNN."""

    def __init__(self, input_size: int, hidden_size: int, between_layers: float) -> None:
        super().__init__("lstm", input_size, hidden_size)
        self.rnn = nn.LSTM(input_size, hidden_size, num_layers=2, dropout=between_layers, batch_first=True)
        self.dropout = nn.Dropout(0.3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(self.dropout(out))


def reference_exact(model: Regressor, loader: DataLoader[Any], *, segment_length: int, device: str) -> int:
    """The oracle of ``exact=True``: every segment of a batch with its graph kept, one backward and step per batch."""
    model.to(device).train()
    optimizer = make_optimizer(model.parameters())
    steps = 0
    for x, y in loader:
        state, total = None, torch.zeros((), device=device)
        for start in range(0, x.shape[1], segment_length):
            x_seg = x[:, start : start + segment_length].to(device)
            out, state = model.rnn(x_seg, state)
            out = model.dropout(out) if isinstance(model, Dropping) else out
            total = total + F.mse_loss(model.head(out), y[:, start : start + segment_length].to(device))
        total.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    model.cpu()
    return steps


def check_exact(report: Report, ctx: Context, name: str, between_layers: float | None) -> None:
    """``exact=True`` against the keep-the-graph loop on the device (``between_layers``: dropout, seeded alike)."""
    s = ctx.sizes
    loader = regression_loader(s.eq_sequences, s.eq_length, s.eq_input, s.eq_batch)
    torch.manual_seed(0)
    if between_layers is None:
        model: Regressor = Regressor("lstm", s.eq_input, s.eq_hidden)
    else:
        model = Dropping(s.eq_input, s.eq_hidden, between_layers)
    reference, truncated = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(1)
    trainer = fit(ctx, model, [TBPTTCallback(s.eq_segment, exact=True)], loader=loader)
    torch.manual_seed(1)
    # cuDNN's dropout between layers cannot be replayed, so the callback runs such a model without cuDNN in exact mode
    # (masks from the CUDA generator): so does the reference
    cudnn = torch.backends.cudnn
    off = cudnn.flags(False, cudnn.benchmark, cudnn.benchmark_limit, cudnn.deterministic, cudnn.allow_tf32)
    with off if between_layers else contextlib.nullcontext():
        steps = reference_exact(reference, loader, segment_length=s.eq_segment, device=ctx.device)
    torch.manual_seed(1)
    fit(ctx, truncated, [TBPTTCallback(s.eq_segment, step_per="batch")], loader=loader)
    result = compare(model, reference, FP32_TOLERANCE)
    control = compare(truncated, reference, FP32_TOLERANCE)
    cudnn_back = torch.backends.cudnn.enabled  # the callback turns it off only around its exact batches
    ok = result.close and trainer.global_step == steps and not control.close and cudnn_back
    report.result(
        name,
        verdict(ok),
        f"max|dparam| against the keep-the-graph loop {result.max_diff:.3e} (allclose: {result.close}, bitwise:"
        f" {result.bitwise}); steps {trainer.global_step} vs {steps}; control (truncated step_per='batch') differs"
        f" by {control.max_diff:.3e}; cuDNN enabled after the fit: {cudnn_back}",
    )


# --------------------------------------------------------------------------------------------------------------------
# 6. Dynamic evaluation on the device (cuDNN refuses an RNN's backward in eval mode: the callback turns it off)
# --------------------------------------------------------------------------------------------------------------------


class Scored(Regressor):
    """The regressor, returning its loss from ``validation_step`` (what dynamic evaluation adapts on)."""

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("val_loss", loss)
        return loss


def check_dynamic_eval(report: Report, ctx: Context, name: str) -> None:
    """Dynamic evaluation of an LSTM on the device against the same on the CPU; the weights bitwise back."""
    s = ctx.sizes
    loader = regression_loader(s.eq_sequences, s.eq_length, s.eq_input, s.eq_batch)
    torch.manual_seed(0)
    model = Scored("lstm", s.eq_input, s.eq_hidden)
    trained = [p.detach().clone() for p in model.parameters()]
    scores = []
    for accelerator in ("gpu" if ctx.cuda else "cpu", "cpu"):
        callback = TBPTTCallback(s.eq_segment, dynamic_eval=DynamicEvaluation(lr=0.5))
        trainer = pl.Trainer(
            accelerator=accelerator, devices=1, callbacks=[callback], logger=False, enable_progress_bar=False
        )
        scores.append(trainer.validate(model, loader, verbose=False)[0]["val_loss"])
        model.cpu()
    static = pl.Trainer(accelerator="cpu", devices=1, callbacks=[TBPTTCallback(s.eq_segment)], logger=False)
    unadapted = static.validate(model, loader, verbose=False)[0]["val_loss"]
    device, cpu = scores
    back = all(torch.equal(p, q) for p, q in zip(model.parameters(), trained, strict=True))
    ok = abs(device - cpu) <= 1e-4 * abs(cpu) and back and cpu < unadapted
    report.result(
        name,
        verdict(ok),
        f"val_loss on the device {device:.6f}, on the CPU {cpu:.6f}, static {unadapted:.6f}; trained weights back"
        f" bitwise: {back}",
    )


# --------------------------------------------------------------------------------------------------------------------
# 4. Pinned batches from LaneDataModule
# --------------------------------------------------------------------------------------------------------------------


class HostBatchProbe(Callback):
    """Records where the training batches are when a batch starts: on the host, pinned or not."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bool]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.records.extend((t.device.type, is_pinned(t)) for t in batch.values())


def is_pinned(tensor: Tensor) -> bool:
    return torch.cuda.is_available() and tensor.device.type == "cpu" and tensor.is_pinned()


def check_pinning(report: Report, ctx: Context, name: str) -> None:
    waves = make_waves(8, 3_000)
    details, ok = [], True
    for workers in (0, 2):
        data = LaneDataModule(list(waves), lanes=8, steps=500, target_shift=1, num_workers=workers)
        probe = HostBatchProbe()
        callback = TBPTTCallback(100, streaming=True, resets="starts")
        fit(ctx, NextValue(16), [callback, probe], datamodule=data, limit_train_batches=3)
        loader = data.train_dataloader()
        direct = [is_pinned(t) for t in next(iter(loader)).values()]
        on_host = all(device == "cpu" for device, _ in probe.records)
        pinned = sum(flag for _, flag in probe.records)
        details.append(
            f"num_workers={workers}: loader pin_memory={loader.pin_memory}, {pinned}/{len(probe.records)} batch"
            f" tensors pinned at on_train_batch_start (on host: {on_host}), loader batch pinned: {all(direct)}"
        )
        ok = ok and loader.pin_memory and on_host and bool(probe.records) and pinned == len(probe.records)
        ok = ok and all(direct)
    report.result(name, verdict(ok) if ctx.cuda else "SKIP", "; ".join(details))


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def header(report: Report, ctx: Context, args: argparse.Namespace) -> None:
    report.line(f"gpu_check: {' '.join(sys.argv[1:]) or '(defaults)'}")
    report.line(
        f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda}), cudnn"
        f" {torch.backends.cudnn.version()}, pytorch-lightning {pl.__version__}, lightning_tbptt"
        f" {lightning_tbptt.__version__}, numpy {np.__version__}"
    )
    if ctx.cuda:
        properties = torch.cuda.get_device_properties(0)
        report.line(f"device: {properties.name}, {properties.total_memory / 2**30:.0f} GiB")
    report.line(
        f"device {ctx.device}, quick={args.quick}, budget {ctx.budget:.0f} s;"
        " cudnn deterministic, no benchmark, TF32 off"
    )
    report.line()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    parser.add_argument(
        "--budget", type=float, default=180.0, help="seconds: the longest stream runs only if it fits in this total"
    )
    args = parser.parse_args()

    # Determinism: cuBLAS workspace before the first CUDA call, cuDNN deterministic, no autotuning, no TF32.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    report = Report(args.out)
    if args.device == "cuda" and not torch.cuda.is_available():
        report.result("setup", "FAIL", "--device cuda but torch.cuda.is_available() is False")
        report.close()
        return 1
    with tempfile.TemporaryDirectory() as root:
        ctx = Context(args.device, QUICK if args.quick else FULL, args.budget, time.perf_counter(), root)
        header(report, ctx, args)
        streamed: list[StreamRun] = []
        checks: list[tuple[str, Callable[[str], None]]] = [
            ("1a equivalence LSTM, float32", lambda name: check_equivalence(report, ctx, name, "lstm")),
            ("1b equivalence GRU, float32", lambda name: check_equivalence(report, ctx, name, "gru")),
            ("2a per-segment transfer", lambda name: check_transfer(report, ctx, name)),
            ("2b-2c streamed training", lambda name: check_streaming(report, ctx, streamed)),
            ("3a 16-mixed vs autocast + GradScaler", lambda name: check_mixed_precision(report, ctx, name, "16-mixed")),
            ("3b bf16-mixed vs autocast", lambda name: check_mixed_precision(report, ctx, name, "bf16-mixed")),
            ("4 LaneDataModule pins batches", lambda name: check_pinning(report, ctx, name)),
            ("5a exact=True, float32", lambda name: check_exact(report, ctx, name, None)),
            ("5b exact=True with nn.Dropout", lambda name: check_exact(report, ctx, name, 0.0)),
            ("5c exact=True with dropout inside nn.LSTM", lambda name: check_exact(report, ctx, name, 0.3)),
            ("6 dynamic evaluation, cuDNN LSTM in eval mode", lambda name: check_dynamic_eval(report, ctx, name)),
            (
                "2d streamed peak GPU memory at the longest T",
                lambda name: check_longest_stream(report, ctx, name, streamed),
            ),
        ]
        for name, check in checks:
            run_check(report, name, check)
        elapsed = ctx.elapsed()

    counts = {status: sum(r[1] == status for r in report.results) for status in ("PASS", "FAIL", "SKIP")}
    report.line()
    report.line("summary:")
    for name, status, _ in report.results:
        report.line(f"  {status:4}  {name}")
    report.line(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {elapsed:.0f} s")
    report.close()
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
