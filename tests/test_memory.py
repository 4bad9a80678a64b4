"""Memory does not grow with sequence length: no autograd graph spans two segments."""

import json
import subprocess
import sys
import weakref
from typing import Any

import pytest
import torch

import lightning_tbptt.state
from lightning_tbptt import TBPTTCallback
from tests.helpers import PEAK_MIB, SequenceRegressor, make_loader, make_trainer


class SavedTensor:
    """What autograd saves for backward, wrapped so that the test can watch it die."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class GraphWatcher(SequenceRegressor):
    """Checks at the start of every segment that everything the previous segment's graph saved has been freed."""

    def __init__(self) -> None:
        super().__init__(num_layers=2, log=True)
        self.saved: list[weakref.ref[SavedTensor]] = []
        self.checked = 0

    def pack(self, tensor: torch.Tensor) -> SavedTensor:
        saved = SavedTensor(tensor)
        self.saved.append(weakref.ref(saved))
        return saved

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.saved:
            alive = sum(ref() is not None for ref in self.saved)
            assert alive == 0, f"the previous segment's autograd graph is still alive ({alive} saved tensors)"
            self.checked += 1
        self.saved = []
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda saved: saved.tensor):
            loss = self.forward_loss(batch)
        assert self.saved, "the segment's graph saved tensors"
        self.log("train_loss", loss)
        return loss

    def forward_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)


@pytest.mark.parametrize("step_per", ["segment", "batch"])
def test_each_segment_graph_is_freed_before_the_next_segment(tmp_path, step_per):
    model = GraphWatcher().double()
    make_trainer(tmp_path, [TBPTTCallback(5, step_per=step_per)]).fit(model, make_loader())
    assert model.checked == 3 * 5 - 1


class KeepsAGraph(GraphWatcher):
    def forward_loss(self, batch: Any) -> torch.Tensor:
        self.kept = self(batch[0])  # a graph that is never backpropagated, kept until the next segment
        return super().forward_loss(batch)


def test_graph_check_detects_a_segment_kept_alive(tmp_path):
    """Negative control: the check above sees a graph that outlives its segment."""
    with pytest.raises(AssertionError, match="previous segment's autograd graph is still alive"):
        make_trainer(tmp_path, [TBPTTCallback(5)]).fit(KeepsAGraph().double(), make_loader())


def test_a_carried_state_that_kept_its_graph_would_break_the_next_backward(tmp_path, monkeypatch):
    """Negative control for detaching: without it, segment 2 backpropagates into segment 1's freed graph."""
    monkeypatch.setattr(lightning_tbptt.state, "detach_state", lambda state: state)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        make_trainer(tmp_path, [TBPTTCallback(5)]).fit(GraphWatcher().double(), make_loader())


PROBE = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch, pytorch_lightning as pl
from torch.utils.data import DataLoader, TensorDataset
from lightning_tbptt import TBPTTCallback
from tests.helpers import SequenceRegressor

length, mode = int(sys.argv[1]), sys.argv[2]
callbacks = {"tbptt": [TBPTTCallback(64)], "exact": [TBPTTCallback(64, exact=True)], "full": []}[mode]
torch.manual_seed(0)
torch.set_num_threads(1)
model = SequenceRegressor(input_size=8, hidden_size=128, log=False)
x = torch.randn(16, length, 8)
loader = DataLoader(TensorDataset(x, torch.cumsum(x[..., :1], 1)), batch_size=16)
trainer = pl.Trainer(
    max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    callbacks=callbacks,
)
trainer.fit(model, loader)
print(json.dumps({"peak_mib": peak_mib()}))
"""


def probe_peak_mib(probe: str, length: int, mode: str) -> float:
    """Run ``probe`` in a fresh process and return the peak resident memory it reports."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MIB + probe, str(length), mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"])


def peak_memory_mib(length: int, mode: str) -> float:
    return probe_peak_mib(PROBE, length, mode)


@pytest.mark.slow  # fits of short and long sequences, each in a fresh process
def test_peak_memory_is_flat_in_sequence_length():
    short, long = 512, 4096
    base = peak_memory_mib(short, "tbptt")
    with_callback = peak_memory_mib(long, "tbptt")
    full_bptt = peak_memory_mib(long, "full")
    growth_callback, growth_full = with_callback - base, full_bptt - base
    assert growth_full > 150, f"the probe must see full BPTT grow (grew {growth_full:.0f} MiB)"
    # the data itself (input, target and their collated copies) grows by about 8 MiB
    assert growth_callback < 0.1 * growth_full, (base, with_callback, full_bptt)


@pytest.mark.slow  # fits of short and long sequences, each in a fresh process
def test_exact_gradients_keep_memory_flat_in_sequence_length_but_for_the_boundary_states():
    short, long = 2048, 32768
    full_slope = (peak_memory_mib(4096, "full") - peak_memory_mib(short, "full")) / (4096 - short)
    exact_growth = peak_memory_mib(long, "exact") - peak_memory_mib(short, "exact")
    truncated_growth = peak_memory_mib(long, "tbptt") - peak_memory_mib(short, "tbptt")
    # full BPTT keeps every step's graph: about 0.1 MiB per step here, 3 GiB at the long length
    assert full_slope > 0.05, f"the probe must see full BPTT grow (by {full_slope:.3f} MiB per step)"
    # exact=True holds, beyond what truncated TBPTT holds (the data), one (h, c) per boundary: 2 x 16 x 128 floats
    boundaries = (long - short) / 64 * 2 * 16 * 128 * 4 / 2**20
    assert exact_growth < truncated_growth + boundaries + 16, (exact_growth, truncated_growth, boundaries)
    assert exact_growth < 0.05 * full_slope * (long - short), (exact_growth, full_slope)


EVALUATION_PROBE = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch, pytorch_lightning as pl
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from lightning_tbptt import TBPTTCallback
from tests.helpers import SequenceRegressor

class Validated(SequenceRegressor):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

length, segmented = int(sys.argv[1]), sys.argv[2] == "segmented"
torch.manual_seed(0)
torch.set_num_threads(1)
model = Validated(input_size=1, hidden_size=128, log=False)
x = torch.randn(16, length, 1)
loader = DataLoader(TensorDataset(x, torch.cumsum(x, 1)), batch_size=16)
trainer = pl.Trainer(
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    callbacks=[TBPTTCallback(64, evaluate=segmented)],
)
trainer.validate(model, loader)
print(json.dumps({"peak_mib": peak_mib()}))
"""


def evaluation_peak_mib(length: int, mode: str) -> float:
    return probe_peak_mib(EVALUATION_PROBE, length, mode)


@pytest.mark.slow  # fits of short and long sequences, each in a fresh process
def test_evaluation_memory_is_flat_in_sequence_length():
    short, long = 4096, 40960
    base = evaluation_peak_mib(short, "segmented")
    growth_segmented = evaluation_peak_mib(long, "segmented") - base
    growth_whole = evaluation_peak_mib(long, "whole") - base
    assert growth_whole > 200, f"the probe must see unsplit evaluation grow (grew {growth_whole:.0f} MiB)"
    # the data itself (input, target and their collated copies) grows by a few MiB
    assert growth_segmented < 0.1 * growth_whole, (base, growth_segmented, growth_whole)
