"""The truncation-bias probe against direct measurements, and ``segment_length="auto"`` on a lag it has to find.

Three parts, one after another in this process, one torch thread:

1. **Estimator** (``bias``): on the copy task with lag ``L`` (``benchmarks/lag.py``: ``T`` random symbols, the target
   at step ``t`` is the symbol at ``t - L``) and on a linear recurrence ``h_t = a·h_{t-1} + W x_t`` regressing a
   teacher of the same form, for each segment length ``k``:

   * ``direct``: the relative bias measured on the whole batch, ``‖g_exact - g_k‖ / ‖g_exact‖`` with ``g_exact`` the
     first optimizer step's gradient of ``TBPTTCallback(k, exact=True)`` and ``g_k`` that of
     ``TBPTTCallback(k, step_per="batch")`` (the same summed segment losses, truncated), both through Lightning;
   * ``probe 4k``: what ``TBPTTCallback(k, probe_every=1)`` reports for the same batch (its default horizon, ``4k``
     steps from the batch's start);
   * ``probe H``: the same with ``probe_horizon=H`` (``--horizon``).

   The copy-task model is measured twice: at initialisation and after ``--warm-batches`` batches of full-BPTT
   training (a model that has begun to use the lag has a large bias; a model at initialisation barely any).
2. **Decay** (``decay``): the decay rate the probe fits on the linear recurrence, against ``a``, its closed form.
3. **Auto** (``auto``): the copy task trained with ``TBPTTCallback("auto", min_segment_length=2,
   max_segment_length=4L, probe_every=...)`` from the same initialisation and batches as ``benchmarks/lag.py``'s
   fixed lengths, which are run again here: the segment lengths the probes chose, in order, the held-out accuracy,
   and what the probes cost: their seconds against the mean seconds of a training batch of the same fit.

    python benchmarks/probe.py
    python benchmarks/probe.py --length 32 --lag 4 --hidden-size 8 --batches 4 --epochs 1 --warm-batches 2 \
        --eval-size 8 --probe-every 2   # smoke test
"""

import argparse
import copy
import logging
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lag import Copier, accuracy, batches, make_sequences
from torch import nn

from lightning_tbptt import TBPTTCallback
from lightning_tbptt.probe import ProbeResult, relative_difference


class FirstGradient(pl.Callback):
    """Keeps the gradient of the first optimizer step."""

    def __init__(self) -> None:
        self.gradient: list[torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.gradient is None:
            self.gradient = [p.grad.detach().clone() for p in pl_module.parameters() if p.grad is not None]


class Probes(pl.Callback):
    """Keeps every probe's result, and the seconds of every training batch."""

    def __init__(self, tbptt: TBPTTCallback) -> None:
        self.tbptt = tbptt
        self.results: list[ProbeResult] = []
        self.batch_seconds: list[float] = []
        self.started = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.batch_seconds.append(time.perf_counter() - self.started)
        result = self.tbptt.probe_result
        if result is not None and (not self.results or self.results[-1] is not result):
            self.results.append(result)


def trainer(callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=callbacks,
        **kwargs,
    )


def one_batch(model: nn.Module, batch: Any, callback: TBPTTCallback) -> tuple[list[torch.Tensor], TBPTTCallback]:
    """Fit a copy of ``model`` on ``batch`` with ``callback``: the first optimizer step's gradient."""
    seen = FirstGradient()
    torch.manual_seed(0)
    trainer([callback, seen], max_steps=1).fit(
        copy.deepcopy(model), torch.utils.data.DataLoader([batch], batch_size=None)
    )
    assert seen.gradient is not None
    return seen.gradient, callback


def direct_bias(model: nn.Module, batch: Any, k: int) -> float:
    exact, _ = one_batch(model, batch, TBPTTCallback(k, exact=True, **recurrent_of(model)))
    truncated, _ = one_batch(model, batch, TBPTTCallback(k, step_per="batch", **recurrent_of(model)))
    return relative_difference(exact, truncated)


def probed(model: nn.Module, batch: Any, k: int, horizon: int | None) -> ProbeResult:
    callback = TBPTTCallback(k, probe_every=1, probe_horizon=horizon, **recurrent_of(model))
    one_batch(model, batch, callback)
    assert callback.probe_result is not None
    return callback.probe_result


def recurrent_of(model: nn.Module) -> dict[str, Any]:
    return {"recurrent_modules": ["rnn"]} if isinstance(model, LinearRegressor) else {}


class LinearRecurrence(nn.Module):
    """``h_t = a·h_{t-1} + W x_t`` with a fixed scalar ``a``: the gradient reaching the state ``d`` steps back is
    ``a**d`` times the gradient reaching it at distance 0, in closed form."""

    def __init__(self, decay: float, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.decay = decay
        self.inputs = nn.Linear(input_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.new_zeros(x.shape[0], self.inputs.out_features) if state is None else state
        outputs = []
        for step in self.inputs(x).unbind(1):
            h = self.decay * h + step
            outputs.append(h)
        return torch.stack(outputs, 1), h


class LinearRegressor(pl.LightningModule):
    """A linear recurrence and a linear head, trained by the mean squared error on every step."""

    def __init__(self, decay: float, input_size: int = 4, hidden_size: int = 16) -> None:
        super().__init__()
        self.rnn = LinearRecurrence(decay, input_size, hidden_size)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        prediction: torch.Tensor = self.head(out)
        return prediction

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def linear_batch(decay: float, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs, and the targets of a random teacher with the same recurrence (its head sees the whole history)."""
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, args.length, 4, generator=generator)
    torch.manual_seed(args.seed + 1)
    with torch.no_grad():
        y = LinearRegressor(decay)(x)
    return x, y


def lengths_below(length: int) -> list[int]:
    return [2**i for i in range(1, 12) if 2**i < length]


def bias_rows(name: str, model: nn.Module, batch: Any, args: argparse.Namespace) -> list[tuple[float, float]]:
    """Print a row per segment length; return the ``(direct, probe 4k)`` pairs."""
    pairs = []
    for k in lengths_below(args.length // 2):
        direct = direct_bias(model, batch, k)
        cells = [f"{direct:>9.3f}"]
        for horizon in (min(4 * k, args.length), args.horizon):
            if horizon <= k:
                cells.append(f"{'-':>9}")
                continue
            bias = probed(model, batch, k, horizon).bias
            if bias is None:  # no scored step in the span's second half: nothing measured
                cells.append(f"{'none':>9}")
                continue
            if horizon == min(4 * k, args.length):
                pairs.append((direct, bias))
            cells.append(f"{bias:>9.3f}")
        print(f"{name:<30}{k:>4}{''.join(cells)}", flush=True)
    return pairs


def fit_auto(initial: dict[str, Any], loader: Any, callback: TBPTTCallback, args: argparse.Namespace) -> Any:
    model = Copier(args.vocab, args.hidden_size, args.lr)
    model.load_state_dict(initial)
    probes = Probes(callback)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    fit = trainer([callback, probes], max_epochs=args.epochs, gradient_clip_val=args.clip)
    fit.fit(model, torch.utils.data.DataLoader(loader, batch_size=None))
    return model, probes, fit.global_step, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lag", type=int, default=8, help="the lag L of the copy task")
    parser.add_argument("--length", type=int, default=64, help="time steps T per sequence (auto)")
    parser.add_argument("--bias-length", type=int, default=256, help="time steps of the estimator's batch")
    parser.add_argument("--vocab", type=int, default=8, help="symbols V")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=100, help="training batches per epoch (auto)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs (auto)")
    parser.add_argument("--warm-batches", type=int, default=100, help="full-BPTT batches before the second estimate")
    parser.add_argument("--horizon", type=int, default=32, help="the fixed probe horizon H of the estimator table")
    parser.add_argument("--probe-every", type=int, default=50, help="probe_every of the auto run")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient_clip_val")
    parser.add_argument("--eval-size", type=int, default=1024, help="held-out sequences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", nargs="+", choices=["bias", "decay", "auto"], default=["bias", "decay", "auto"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    loader = batches(make_sequences(args.batches * args.batch_size, args, args.seed), args.batch_size)
    torch.manual_seed(args.seed)
    initial = Copier(args.vocab, args.hidden_size, args.lr).state_dict()
    print(
        f"copy task: L={args.lag}, T={args.length}, V={args.vocab}; LSTM H={args.hidden_size}, B={args.batch_size};"
        f" {args.threads} torch thread(s), torch {torch.__version__}, pytorch-lightning {pl.__version__}"
    )

    if "bias" in args.parts:
        long = argparse.Namespace(**{**vars(args), "length": args.bias_length})
        print(f"\nrelative bias of the truncated gradient, one batch of {args.batch_size} x {long.length} steps")
        print(f"{'model':<30}{'k':>4}{'direct':>9}{'probe 4k':>9}{f'probe {args.horizon}':>9}", flush=True)
        model = Copier(args.vocab, args.hidden_size, args.lr)
        model.load_state_dict(initial)
        batch = make_sequences(args.batch_size, long, args.seed + 2)
        pairs = bias_rows("copy task, initialisation", model, batch, long)
        warm = loader[: args.warm_batches]
        torch.manual_seed(args.seed)
        trainer([], max_epochs=1, gradient_clip_val=args.clip).fit(
            model, torch.utils.data.DataLoader(warm, batch_size=None)
        )
        pairs += bias_rows(f"copy task, {len(warm)} batches trained", model, batch, long)
        for decay in (0.5, 0.9):
            torch.manual_seed(args.seed)
            linear = LinearRegressor(decay)
            pairs += bias_rows(f"linear recurrence a={decay}", linear, linear_batch(decay, long), long)
        worst = max(abs(probe - direct) for direct, probe in pairs)
        ratios = [probe / direct for direct, probe in pairs if direct > 0.05]
        print(
            f"probe 4k against direct: largest |probe - direct| {worst:.3f}; probe / direct from {min(ratios):.2f} to"
            f" {max(ratios):.2f} where direct > 0.05"
        )

    if "decay" in args.parts:
        print("\ngradient decay through the state of the linear recurrence (probe_horizon=T, k=8)")
        print(f"{'a':>6}{'fitted rate':>13}{'largest |norm(d) / a**d - 1|':>32}", flush=True)
        for decay in (0.5, 0.8, 0.9, 0.95, 0.99):
            torch.manual_seed(args.seed)
            result = probed(LinearRegressor(decay), linear_batch(decay, args), 8, args.length)
            error = max(abs(norm / decay**distance - 1) for distance, norm in result.decay)
            assert result.decay_rate is not None
            print(f"{decay:>6}{result.decay_rate:>13.6f}{error:>32.1e}", flush=True)

    if "auto" in args.parts:
        held_out = make_sequences(args.eval_size, args, args.seed + 1)
        longest = 4 * args.lag
        print(
            f"\ntraining {args.batches} batches x {args.epochs} epochs, Adam lr={args.lr},"
            f" gradient_clip_val={args.clip}; held-out accuracy on {args.eval_size} fresh sequences,"
            f" chance {1 / args.vocab:.3f}"
        )
        print(f"{'configuration':<34}{'opt steps':>10}{'seconds':>9}{'accuracy':>10}  lengths chosen", flush=True)
        fixed = {f"TBPTT k={k}": TBPTTCallback(k) for k in (max(args.lag // 4, 1), max(args.lag // 2, 1))}
        auto = TBPTTCallback("auto", min_segment_length=2, max_segment_length=longest, probe_every=args.probe_every)
        runs = {**fixed, f"auto 2..{longest}, probe_every={args.probe_every}": auto}
        for name, callback in runs.items():
            model, probes, steps, seconds = fit_auto(initial, loader, callback, args)
            chosen = " ".join(str(result.next_length) for result in probes.results)
            print(f"{name:<34}{steps:>10}{seconds:>9.1f}{accuracy(model, held_out):>10.3f}  {chosen}", flush=True)
        probe_seconds = [result.seconds for result in probes.results]
        probed_batches = {result.batch for result in probes.results}
        others = [s for i, s in enumerate(probes.batch_seconds) if i not in probed_batches]
        mean_batch = sum(others) / max(len(others), 1)
        mean_probe = sum(probe_seconds) / len(probe_seconds)
        print(
            f"a probe took {mean_probe * 1e3:.1f} ms on average ({len(probe_seconds)} probes, span"
            f" {probes.results[-1].span} steps), a batch without one {mean_batch * 1e3:.1f} ms: a probed batch costs"
            f" {mean_probe / mean_batch:.1f} batches more; probing every {args.probe_every} batches adds"
            f" {100 * mean_probe / mean_batch / args.probe_every:.0f} %"
        )
        final = probes.results[-1]
        print(
            "biases of the last probe: "
            + ", ".join(f"k={k}: {b:.3f}" for k, b in sorted(final.biases.items()))
            + f" (tolerance {final.tolerance})"
        )


if __name__ == "__main__":
    main()
