"""One callback and one datamodule for both namespaces: ``pytorch_lightning`` and ``lightning.pytorch`` Trainers."""

import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import pytorch_lightning
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tbptt import LaneDataModule, TBPTTCallback
from tests.helpers import LR, MOMENTUM, make_loader, make_trainer, parameters_equal, reference_tbptt, twin

L = pytest.importorskip("lightning.pytorch", reason="the `lightning` package (extra `lightning`) is not installed")
NAMESPACES = pytest.mark.parametrize("namespace", [pytorch_lightning, L], ids=["pytorch_lightning", "lightning"])


def regressor(namespace: ModuleType, **hooks: Any) -> Any:
    """A model written for short sequences, deriving from ``namespace.LightningModule``, with extra ``hooks``."""

    class Regressor(namespace.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(3, 6, batch_first=True)
            self.head = nn.Linear(6, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            out, _ = self.rnn(x)
            loss = F.mse_loss(self.head(out), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    for name, hook in hooks.items():
        setattr(Regressor, name, hook)
    return Regressor


def test_the_callback_is_a_callback_of_both_namespaces():
    callback = TBPTTCallback(4)
    assert isinstance(callback, pytorch_lightning.Callback)
    assert isinstance(callback, L.Callback)


@NAMESPACES
def test_training_with_either_namespace_equals_the_reference(tmp_path, namespace):
    torch.manual_seed(0)
    model = regressor(namespace)().double()
    reference = twin(model)
    loader = make_loader()
    trainer = make_trainer(tmp_path, [TBPTTCallback(5)], namespace=namespace)
    trainer.fit(model, loader)
    result = reference_tbptt(reference, loader, segment_length=5)
    assert trainer.global_step == result["steps"] == 15  # 3 batches x 5 segments
    assert parameters_equal(model, reference)


@NAMESPACES
def test_a_module_transfer_hook_is_seen_in_either_namespace(tmp_path, namespace):
    moved = []

    def on_after_batch_transfer(self: Any, batch: Any, dataloader_idx: int) -> Any:
        moved.append(batch[0].shape[1])
        return batch

    model = regressor(namespace, on_after_batch_transfer=on_after_batch_transfer)().double()
    callback = TBPTTCallback(5)
    make_trainer(tmp_path, [callback], namespace=namespace, limit_train_batches=1).fit(model, make_loader())
    assert callback._fit.transfer == "batch"  # the hook may change the layout: it sees whole batches
    assert moved == [23]


def lanes() -> LaneDataModule:
    sequence = np.sin(np.arange(400) / 7).astype(np.float32)
    return LaneDataModule(sequence, val=sequence[:200], lanes=2, steps=40, target_shift=1)


def stream_model(namespace: ModuleType, validation: bool = True) -> Any:
    def training_step(self: Any, batch: Any, batch_idx: int) -> torch.Tensor:
        out, _ = self.rnn(batch["input"].unsqueeze(-1).expand(-1, -1, 3))
        return F.mse_loss(self.head(out).squeeze(-1), batch["target"])

    def validation_step(self: Any, batch: Any, batch_idx: int) -> None:
        self.validated += batch["input"].shape[1]

    hooks: dict[str, Any] = {"training_step": training_step}
    if validation:
        hooks["validation_step"] = validation_step
    model = regressor(namespace, **hooks)()
    model.validated = 0
    return model


def fit_stream(tmp_path: Path, namespace: ModuleType, data: LaneDataModule, validation: bool = True) -> Any:
    torch.manual_seed(0)
    model = stream_model(namespace, validation)
    callback = TBPTTCallback(10, streaming=True, resets="starts")
    trainer = make_trainer(tmp_path / namespace.__name__, [callback], namespace=namespace)
    trainer.fit(model, datamodule=data)
    return model, trainer


def test_the_lane_datamodule_streams_alike_in_both_namespaces(tmp_path):
    model, trainer = fit_stream(tmp_path, pytorch_lightning, lanes())
    other, other_trainer = fit_stream(tmp_path, L, lanes())
    assert trainer.global_step == other_trainer.global_step > 0
    assert model.validated == other.validated > 0
    assert parameters_equal(model, other)


@NAMESPACES
def test_a_stage_without_lanes_is_skipped_in_either_namespace(tmp_path, namespace):
    # a `lightning.pytorch` Trainer must see the `pytorch_lightning` defaults as not overridden, and the reverse
    data = LaneDataModule(np.sin(np.arange(400) / 7).astype(np.float32), lanes=2, steps=40, target_shift=1)
    with pytest.warns(UserWarning, match="no `val_dataloader`"):
        model, trainer = fit_stream(tmp_path, namespace, data)
    assert trainer.global_step > 0
    assert model.validated == 0


@NAMESPACES
def test_a_datamodule_leaves_the_modules_transfer_hooks_in_charge_in_either_namespace(tmp_path, namespace):
    calls = []

    def on_before_batch_transfer(self: Any, batch: Any, dataloader_idx: int) -> Any:
        calls.append(dataloader_idx)
        return batch

    torch.manual_seed(0)
    model = stream_model(namespace, validation=False)
    type(model).on_before_batch_transfer = on_before_batch_transfer
    callback = TBPTTCallback(10, streaming=True, resets="starts")
    trainer = make_trainer(tmp_path, [callback], namespace=namespace, limit_train_batches=2)
    trainer.fit(model, datamodule=lanes())
    assert calls == [0, 0]  # the module's hook, not the datamodule's default


@pytest.mark.slow  # a fresh interpreter each
@pytest.mark.parametrize(
    ("first", "logger"),
    [("", "pytorch_lightning"), ("import lightning.pytorch", "lightning.pytorch")],
)
def test_lightning_keeps_logging_to_the_namespace_imported_first(first, logger):
    # each namespace's import points Lightning's shared rank-zero logger at itself; importing the other must not move it
    code = f"{first}\nimport lightning_tbptt, lightning_utilities.core.rank_zero as r\nprint(r.log.name)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == f"{logger}.utilities.rank_zero"


@pytest.mark.slow  # a fit in a fresh interpreter
def test_a_fit_logs_in_the_namespace_of_its_trainer(tmp_path):
    # `lightning_tbptt` imported first points the shared logger at `pytorch_lightning`; a `lightning.pytorch` fit
    # must log where a `lightning.pytorch` user configured logging, and leave the logger as it found it
    code = f"""
import lightning_tbptt, lightning_utilities.core.rank_zero as r
import lightning.pytorch as L
from tests.test_namespaces import regressor
from tests.helpers import make_loader, make_trainer
before = r.log.name
class During(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.names = r.log.name, r.rank_zero_deprecation_category.__module__
during = During()
callbacks = [lightning_tbptt.TBPTTCallback(5), during]
trainer = make_trainer({str(tmp_path)!r}, callbacks, namespace=L, limit_train_batches=1)
trainer.fit(regressor(L)().double(), make_loader())
print(before, *during.names, r.log.name, r.rank_zero_deprecation_category.__module__)
"""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=180, cwd=root
    )
    before, during, category, after, category_after = result.stdout.split()[-5:]
    assert before == "pytorch_lightning.utilities.rank_zero"
    assert during == "lightning.pytorch.utilities.rank_zero"
    assert category == "lightning.fabric.utilities.rank_zero"
    # put back after the fit: importing or using the library leaves the global logger where the user's imports put it
    assert after == before
    assert category_after == "lightning_fabric.utilities.rank_zero"


@NAMESPACES
def test_the_datamodule_resolves_hooks_it_leaves_to_lightning_in_the_trainers_namespace(tmp_path, namespace):
    data = lanes()
    assert data.on_after_batch_transfer.__func__ is pytorch_lightning.LightningDataModule.on_after_batch_transfer
    data.trainer = make_trainer(tmp_path, namespace=namespace)
    for name in ("prepare_data", "on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer"):
        assert getattr(data, name).__func__ is getattr(namespace.LightningDataModule, name)
    data = LaneDataModule(None, lanes=2, steps=40)  # no data: every dataloader hook stands for the default
    data.trainer = make_trainer(tmp_path, namespace=namespace)
    assert data.val_dataloader.__wrapped__ is namespace.LightningDataModule.val_dataloader


@NAMESPACES
def test_overrides_are_judged_in_the_trainers_namespace(tmp_path, namespace):
    from lightning_tbptt.namespaces import is_overridden

    trainer = make_trainer(tmp_path, namespace=namespace)
    model = regressor(namespace)()
    # `train_dataloader` differs in code between the namespaces even at one release
    assert not is_overridden("train_dataloader", model, trainer)
    assert is_overridden("training_step", model, trainer)


@NAMESPACES
@pytest.mark.parametrize(("version", "reruns"), [("2.4.0", True), ("2.5.0", False)])
def test_release_dependent_behaviour_follows_the_trainers_namespace(tmp_path, namespace, version, reruns, monkeypatch):
    from lightning_tbptt._lightning_internals import resume_reruns_last_batch

    other = L if namespace is pytorch_lightning else pytorch_lightning
    monkeypatch.setattr(namespace, "__version__", version)
    monkeypatch.setattr(other, "__version__", "2.4.0" if version == "2.5.0" else "2.5.0")
    assert resume_reruns_last_batch(make_trainer(tmp_path, namespace=namespace)) is reruns


# Each namespace alone: the other package made unimportable in a fresh interpreter (as if it were not installed).
BLOCK = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Blocker())
"""

ONE_NAMESPACE_FIT = """
import importlib, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import lightning_tbptt
from lightning_tbptt import TBPTTCallback
from lightning_tbptt import demo
pl = importlib.import_module({namespace!r})
assert demo.pl is pl, demo.pl

class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(2, 4, batch_first=True)
    def training_step(self, batch, batch_idx):
        out, _ = self.rnn(batch[0])
        return out.pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

trainer = pl.Trainer(max_epochs=1, callbacks=[TBPTTCallback(segment_length=5)], logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Model(), DataLoader(TensorDataset(torch.randn(2, 20, 2)), batch_size=2))
assert trainer.global_step == 4, trainer.global_step
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print("fit with", pl.__name__, "alone: ok")
"""


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("namespace", "blocked"),
    [("lightning.pytorch", {"pytorch_lightning", "lightning_fabric"}), ("pytorch_lightning", {"lightning"})],
    ids=["lightning only", "pytorch_lightning only"],
)
def test_the_library_and_the_demo_work_with_either_package_alone(namespace, blocked):
    result = run_python(BLOCK.format(blocked=blocked) + ONE_NAMESPACE_FIT.format(namespace=namespace))
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"fit with {namespace} alone: ok" in result.stdout


def test_without_lightning_the_import_says_what_to_install():
    result = run_python(
        BLOCK.format(blocked={"pytorch_lightning", "lightning", "lightning_fabric"}) + "import lightning_tbptt"
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: lightning-tbptt needs PyTorch Lightning 2.1 or newer"), last
    assert "pip install 'pytorch-lightning>=2.1,!=2.6.2,!=2.6.3'" in last and "'lightning-tbptt[lightning]'" in last
