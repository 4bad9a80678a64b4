"""Dynamic evaluation: equal to a hand-written score-then-update loop; the trained weights untouched afterwards."""

import copy
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_tbptt import DynamicEvaluation, TBPTTCallback
from lightning_tbptt.errors import ConfigurationError, ModelError
from lightning_tbptt.state import detach_state
from tests.helpers import SequenceRegressor, make_data, make_loader, make_trainer

K = 5


class Scored(SequenceRegressor):
    """Returns its loss from the evaluation steps and records each segment's (loss, steps)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scored: list[tuple[float, int]] = []
        self.fail_at: int | None = None

    def _score(self, batch: Any, name: str) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.scored.append((loss.item(), x.shape[1]))
        if self.fail_at is not None and len(self.scored) == self.fail_at:
            raise RuntimeError("failing on purpose")
        self.log(name, loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self._score(batch, "val_loss")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._score(batch, "test_loss")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


def trained_model(tmp_path: Any) -> Scored:
    torch.manual_seed(0)
    model = Scored().double()
    make_trainer(tmp_path, [TBPTTCallback(K)], max_epochs=2).fit(model, make_loader())
    model.scored.clear()
    return model


def val_loader(seed: int = 1) -> DataLoader[Any]:
    return make_loader(batch_size=4, num_sequences=8, length=23, seed=seed)


def parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def reference(
    model: Scored,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    decay: float = 0.0,
    scales: list[torch.Tensor] | None = None,
    rates: list[torch.Tensor] | None = None,
    streaming: bool = False,
) -> tuple[list[tuple[float, int]], list[list[torch.Tensor]]]:
    """The oracle: score each segment, then one gradient step on its loss, by hand.

    Returns the scores and the weights after each batch.
    """
    model = copy.deepcopy(model)
    params = list(model.parameters())
    trained = [p.detach().clone() for p in params]
    scored: list[tuple[float, int]] = []
    after: list[list[torch.Tensor]] = []
    state = None
    for x, y in batches:
        if not streaming:
            state = None
        for start in range(0, x.shape[1], K):
            xs, ys = x[:, start : start + K], y[:, start : start + K]
            out, new_state = model.rnn(xs, state)
            loss = F.mse_loss(model.head(out), ys)
            scored.append((loss.item(), xs.shape[1]))
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for i, (p, g, p0) in enumerate(zip(params, grads, trained, strict=True)):
                    step = g if scales is None else g / scales[i]
                    pull = decay * (p0 - p) if rates is None else decay * rates[i] * (p0 - p)
                    p.copy_(p - lr * step + pull)
            state = detach_state(new_state)
        after.append([p.detach().clone() for p in params])
    return scored, after


class AdaptedWeights(pl.Callback):
    """Keeps the weights as each evaluation batch starts (adapted on the batches before it) and as the run ends."""

    def __init__(self) -> None:
        self.weights: list[list[torch.Tensor]] = []

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.weights.append(parameters(pl_module))

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.weights.append(parameters(pl_module))


def close(a: list[tuple[float, int]], b: list[tuple[float, int]]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-10 and n == m for (x, n), (y, m) in zip(a, b, strict=True))


@pytest.mark.parametrize("decay", [0.0, 0.05])
def test_sgd_equals_score_then_update_loop_and_weights_come_back(tmp_path: Any, decay: float) -> None:
    model = trained_model(tmp_path)
    trained = parameters(model)
    loader = val_loader()
    expected, adapted = reference(model, list(loader), lr=0.5, decay=decay)
    static, _ = reference(model, list(loader), lr=0.0)
    kept = AdaptedWeights()
    callback = TBPTTCallback(K, dynamic_eval=DynamicEvaluation(lr=0.5, decay=decay))
    trainer = make_trainer(tmp_path, [callback, kept])
    (logged,) = trainer.validate(model, loader, verbose=False)
    assert close(model.scored, expected)
    assert model.scored[0] == pytest.approx(static[0], abs=1e-12)  # the first segment is scored by trained weights
    assert not close(model.scored, static)  # later segments are scored by adapted weights
    weighted = sum(loss * n for loss, n in expected) / sum(n for _, n in expected)
    assert logged["val_loss"] == pytest.approx(weighted, rel=1e-6)
    first, second, end = kept.weights  # as the two batches start, and as the run ends
    assert all(torch.equal(p, q) for p, q in zip(first, trained, strict=True))
    assert all(torch.allclose(p, q, atol=1e-10) for p, q in zip(second, adapted[0], strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(second, trained, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(end, trained, strict=True))  # back after the last batch
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), trained, strict=True))  # bitwise back
    assert trainer.validate_loop.inference_mode is True  # the loop's own setting is back


def test_rms_rule_equals_loop_with_training_gradient_statistics(tmp_path: Any) -> None:
    model = trained_model(tmp_path)
    train = make_loader(batch_size=4, num_sequences=8, seed=3)
    # MS by hand: the mean squared gradient of the training loss over the segments of two training batches
    params = list(model.parameters())
    sums = [torch.zeros_like(p) for p in params]
    count = 0
    for x, y in list(train)[:2]:
        state = None
        for start in range(0, x.shape[1], K):
            out, new_state = model.rnn(x[:, start : start + K], state)
            loss = F.mse_loss(model.head(out), y[:, start : start + K])
            for total, g in zip(sums, torch.autograd.grad(loss, params), strict=True):
                total += g**2
            count += 1
            state = detach_state(new_state)
    roots = [torch.sqrt(total / count) for total in sums]
    mean = torch.cat([r.flatten() for r in roots]).mean()
    decay = 0.02
    rates = [(r / mean).clamp(max=1 / decay) for r in roots]
    scales = [r + 1e-3 for r in roots]
    loader = val_loader()
    expected, _ = reference(model, list(loader), lr=0.01, decay=decay, scales=scales, rates=rates)
    settings = DynamicEvaluation(lr=0.01, rule="rms", decay=decay, eps=1e-3, statistics=train, statistics_batches=2)
    trainer = make_trainer(tmp_path, [TBPTTCallback(K, dynamic_eval=settings)])
    trainer.test(model, loader, verbose=False)
    assert close(model.scored, expected)
    assert len(model.scored) == 10  # the statistics' training steps score nothing


def test_streaming_adapts_across_batches_with_the_state_carried(tmp_path: Any) -> None:
    model = trained_model(tmp_path)
    loader = val_loader()
    expected, _ = reference(model, list(loader), lr=0.3, streaming=True)
    callback = TBPTTCallback(K, streaming=True, dynamic_eval=DynamicEvaluation(lr=0.3))
    make_trainer(tmp_path, [callback]).validate(model, loader, verbose=False)
    assert close(model.scored, expected)


def test_each_dataloader_adapts_from_the_trained_weights(tmp_path: Any) -> None:
    model = trained_model(tmp_path)
    trained = parameters(model)
    expected, _ = reference(model, list(val_loader()), lr=0.5)
    callback = TBPTTCallback(K, dynamic_eval=DynamicEvaluation(lr=0.5))
    make_trainer(tmp_path, [callback]).validate(model, [val_loader(), val_loader()], verbose=False)
    assert close(model.scored, expected + expected)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), trained, strict=True))


def test_stages_limit_where_it_adapts(tmp_path: Any) -> None:
    model = trained_model(tmp_path)
    static, _ = reference(model, list(val_loader()), lr=0.0)
    callback = TBPTTCallback(K, dynamic_eval=DynamicEvaluation(lr=0.5, stages=("test",)))
    make_trainer(tmp_path, [callback]).validate(model, val_loader(), verbose=False)
    assert close(model.scored, static)


def test_training_is_not_disturbed_and_checkpoints_hold_the_trained_weights(tmp_path: Any) -> None:
    def fit(dynamic: DynamicEvaluation | None, where: Any) -> tuple[Scored, pl.Trainer]:
        torch.manual_seed(0)
        model = Scored().double()
        checkpoint = ModelCheckpoint(dirpath=where, save_last=True)
        trainer = make_trainer(
            where,
            [TBPTTCallback(K, dynamic_eval=dynamic), checkpoint],
            max_epochs=2,
            enable_checkpointing=True,
            num_sanity_val_steps=2,
        )
        trainer.fit(model, make_loader(), val_loader())
        return model, trainer

    plain, plain_trainer = fit(None, tmp_path / "plain")
    adapted, trainer = fit(DynamicEvaluation(lr=0.5), tmp_path / "adapted")
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), adapted.parameters(), strict=True))
    assert trainer.global_step == plain_trainer.global_step == 2 * 3 * 5
    plain_momentum = [s["momentum_buffer"] for s in plain_trainer.optimizers[0].state.values()]
    momentum = [s["momentum_buffer"] for s in trainer.optimizers[0].state.values()]
    assert all(torch.equal(a, b) for a, b in zip(plain_momentum, momentum, strict=True))
    assert trainer.callback_metrics["val_loss"] < plain_trainer.callback_metrics["val_loss"]  # it did adapt
    saved = torch.load(tmp_path / "adapted" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(saved[name], p) for name, p in adapted.state_dict().items())


def test_an_exception_mid_evaluation_puts_the_trained_weights_back(tmp_path: Any) -> None:
    model = trained_model(tmp_path)
    trained = parameters(model)
    model.fail_at = 7
    callback = TBPTTCallback(K, dynamic_eval=DynamicEvaluation(lr=0.5))
    trainer = make_trainer(tmp_path, [callback])
    with pytest.raises(RuntimeError, match="failing on purpose"):
        trainer.validate(model, val_loader(), verbose=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), trained, strict=True))
    assert trainer.validate_loop.inference_mode is True


def test_predict_adapts_on_a_given_loss(tmp_path: Any) -> None:
    model = trained_model(tmp_path)
    trained = parameters(model)
    loader = val_loader()
    _, y = make_data(num_sequences=8, length=23, seed=1)
    expected, _ = reference(model, list(loader), lr=0.5)

    def loss(output: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.mse_loss(output, batch[1])

    callback = TBPTTCallback(K, dynamic_eval=DynamicEvaluation(lr=0.5, loss=loss))
    predictions = make_trainer(tmp_path, [callback]).predict(model, loader)
    assert predictions is not None
    joined = torch.cat(predictions)  # type: ignore[arg-type]
    assert not joined.requires_grad
    scores = [
        (F.mse_loss(joined[r : r + 4, s : s + K], y[r : r + 4, s : s + K]).item(), min(K, 23 - s))
        for r in (0, 4)
        for s in range(0, 23, K)
    ]
    assert close(scores, expected)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), trained, strict=True))


def test_a_step_that_returns_no_loss_is_refused(tmp_path: Any) -> None:
    model = trained_model(tmp_path)
    trained = parameters(model)
    callback = TBPTTCallback(K, dynamic_eval=DynamicEvaluation(lr=0.5))
    with pytest.raises(ModelError, match=r"`predict_step` to give a scalar loss tensor but got a tensor .* Pass `Dyn"):
        make_trainer(tmp_path, [callback]).predict(model, val_loader())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), trained, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0}, r"`lr` of `DynamicEvaluation` to be a finite number > 0 but got 0"),
        ({"lr": float("nan")}, r"`lr` .* but got nan"),
        ({"lr": 1, "decay": -1}, r"`decay` .* ≥ 0 but got -1"),
        ({"lr": 1, "rule": "adam"}, r"`rule` .* \('sgd', 'rms'\) but got 'adam'"),
        ({"lr": 1, "stages": ("fit",)}, r"`stages` .* but got \('fit',\)"),
        ({"lr": 1, "stages": ()}, r"`stages`"),
        ({"lr": 1, "loss": 3}, r"`loss` .* but got 3"),
        ({"lr": 1, "statistics_batches": 0}, r"`statistics_batches` .* but got 0"),
        ({"lr": 1, "rule": "rms"}, r"`statistics` of `DynamicEvaluation\(rule='rms'\)` to give training batches"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        DynamicEvaluation(**kwargs)


def test_dynamic_eval_arguments_of_the_callback() -> None:
    assert TBPTTCallback(8, dynamic_eval={"lr": 0.1, "decay": 0.5}).dynamic_eval == DynamicEvaluation(0.1, decay=0.5)
    with pytest.raises(ConfigurationError, match=r"`dynamic_eval` to be a `DynamicEvaluation`, a mapping"):
        TBPTTCallback(8, dynamic_eval=0.1)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"`dynamic_eval` to hold the fields of `DynamicEvaluation`"):
        TBPTTCallback(8, dynamic_eval={"rate": 0.1})
    with pytest.raises(ConfigurationError, match=r"`evaluate=False` leaves evaluation to Lightning"):
        TBPTTCallback(8, evaluate=False, dynamic_eval=DynamicEvaluation(lr=0.1))


def test_a_model_without_trainable_inputs_to_its_loss(tmp_path: Any) -> None:
    class Detached(Scored):
        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
            return super().validation_step(batch, batch_idx).detach()

    torch.manual_seed(0)
    model = Detached().double()
    loader = DataLoader(TensorDataset(*make_data(num_sequences=4, length=10)), batch_size=4)
    callback = TBPTTCallback(K, dynamic_eval=DynamicEvaluation(lr=0.5))
    with pytest.raises(ModelError, match=r"the loss has no gradient"):
        make_trainer(tmp_path, [callback]).validate(model, loader, verbose=False)


def _ema_fit(tmp_path: Any, dynamic: DynamicEvaluation | None, tbptt_first: bool, ema_class: Any) -> Any:
    torch.manual_seed(0)
    model = Scored().double()
    tbptt, ema = TBPTTCallback(K, dynamic_eval=dynamic), ema_class(decay=0.9)
    trainer = make_trainer(tmp_path, [tbptt, ema] if tbptt_first else [ema, tbptt], max_epochs=3)
    trainer.fit(model, make_loader(), val_loader())
    average = ema._average_model.module.state_dict()
    return parameters(model), [v.detach().clone() for v in average.values()], model.scored


@pytest.mark.parametrize("tbptt_first", [True, False], ids=["tbptt-first", "ema-first"])
def test_weight_averaging_callbacks_see_the_trained_weights_in_either_order(tmp_path: Any, tbptt_first: bool) -> None:
    # EMAWeightAveraging swaps its average in at `on_validation_epoch_start` and out at `on_validation_epoch_end`
    callbacks = pytest.importorskip("pytorch_lightning.callbacks")
    ema_class = getattr(callbacks, "EMAWeightAveraging", None)
    if ema_class is None:
        pytest.skip("EMAWeightAveraging is new in this Lightning release")
    weights, average, static = _ema_fit(tmp_path / "static", None, tbptt_first, ema_class)
    adapted_weights, adapted_average, scored = _ema_fit(
        tmp_path / "dynamic", DynamicEvaluation(0.5), tbptt_first, ema_class
    )
    assert all(torch.equal(a, b) for a, b in zip(weights, adapted_weights, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(average, adapted_average, strict=True))
    assert len(scored) == len(static) == 4 * 10  # the sanity check and 3 validations, 2 batches of 5 segments each
    assert scored[::10] == static[::10]  # each run's first segment is scored by the average, before any adaptation
    assert scored != static


def test_the_rms_statistics_draw_nothing_from_the_global_generators(tmp_path: Any) -> None:
    model = trained_model(tmp_path)
    train = make_loader(batch_size=4, num_sequences=8, seed=3)
    drawn = []
    for dynamic in (None, DynamicEvaluation(lr=0.01, rule="rms", statistics=train, statistics_batches=2)):
        torch.manual_seed(5)
        make_trainer(tmp_path, [TBPTTCallback(K, dynamic_eval=dynamic)]).validate(model, val_loader(), verbose=False)
        drawn.append(torch.rand(3))
    assert torch.equal(*drawn)


class Metered(Scored):
    def __init__(self) -> None:
        super().__init__()
        from torchmetrics import MeanSquaredError

        self.metric = MeanSquaredError()

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x, y = batch
        self.metric.update(self(x).flatten(), y.flatten())
        self.log("val_mse", self.metric)
        return super().validation_step(batch, batch_idx)


def test_metrics_reset_by_an_earlier_inference_mode_run_can_be_updated(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = Metered().double()
    make_trainer(tmp_path, [TBPTTCallback(K)]).validate(model, val_loader(), verbose=False)  # inference mode
    callback = TBPTTCallback(K, dynamic_eval=DynamicEvaluation(lr=0.5))
    (logged,) = make_trainer(tmp_path, [callback]).validate(model, val_loader(), verbose=False)
    scored = model.scored[10:]
    assert logged["val_mse"] == pytest.approx(sum(v * n for v, n in scored) / sum(n for _, n in scored), rel=1e-6)


class ManualScored(Scored):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def test_the_rms_rule_is_refused_with_manual_optimization(tmp_path: Any) -> None:
    settings = DynamicEvaluation(lr=0.01, rule="rms", statistics=make_loader())
    with pytest.raises(ConfigurationError, match=r"`DynamicEvaluation\(rule='rms'\)` takes the gradients of"):
        make_trainer(tmp_path, [TBPTTCallback(K, dynamic_eval=settings)]).validate(
            ManualScored().double(), val_loader()
        )


def test_error_messages_name_what_the_step_returned(tmp_path: Any) -> None:
    class Keyed(Scored):
        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
            return {"bpc": super().validation_step(batch, batch_idx)}

    callback = TBPTTCallback(K, dynamic_eval=DynamicEvaluation(lr=0.5))
    with pytest.raises(ModelError, match=r"got a dict without 'loss' \(keys \['bpc'\]\)"):
        make_trainer(tmp_path, [callback]).validate(Keyed().double(), val_loader(), verbose=False)
    with pytest.raises(ConfigurationError, match=r"`statistics` of `DynamicEvaluation` to be an iterable .* but got 5"):
        DynamicEvaluation(lr=1, rule="rms", statistics=5)  # type: ignore[arg-type]
