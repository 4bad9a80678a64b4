"""The three LightningModules of the blog post this project started from, rewritten as plain short-sequence models.

The blog's modules loop over segments inside ``training_step``. Example 1 never detaches the state (its graph and
memory grow with the sequence), example 2 has an ``overlap`` that carries the state from the *end* of a window into
a window starting earlier, and example 3 masks padded steps by hand. Rewritten, each ``training_step`` handles the
segment it is given, and ``TBPTTCallback(step_per="batch")`` reproduces the blog's intended semantics (segment losses
summed into one step per batch), with the state detached between segments.
"""

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_tbptt import TBPTTCallback
from lightning_tbptt.state import detach_state
from tests.helpers import make_trainer, parameters_equal, twin

INPUT_SIZE, HIDDEN_SIZE, OUTPUT_SIZE, SEQ_LEN = 10, 32, 5, 10
PAD = -100


class LastStepClassifier(pl.LightningModule):
    """Blog examples 1 and 2, rewritten: an LSTM and a linear head classifying the last step of the segment."""

    def __init__(self, overlap: int = 0) -> None:
        super().__init__()
        self.lstm = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, batch_first=True)
        self.fc = nn.Linear(HIDDEN_SIZE, OUTPUT_SIZE)
        self.overlap = overlap  # example 2's parameter; overlapping windows are not used here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1, :])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y[:, -1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.001)


class MaskedLastStepClassifier(LastStepClassifier):
    """Blog example 3, rewritten: padded steps carry the label ``PAD`` and do not count."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, lengths = batch
        target = y[:, -1]
        valid = target != PAD
        losses = F.cross_entropy(self(x), target.clamp_min(0), reduction="none")
        loss = (losses * valid).sum() / lengths.sum()
        self.log("train_loss", loss)
        return loss


def blog_reference(model: LastStepClassifier, loader: Any, masked: bool = False) -> int:
    """The blog's own loop over segments (losses summed, one backward and step per batch), with the state detached."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    steps = 0
    for batch in loader:
        x, y = batch[0], batch[1]
        h, loss = None, 0
        for t in range(0, x.size(1), SEQ_LEN):
            out, h = model.lstm(x[:, t : t + SEQ_LEN], h)
            output = model.fc(out[:, -1, :])
            if masked:
                lengths = batch[2]
                mask = (t + x[:, t : t + SEQ_LEN].size(1) - 1 < lengths).double()
                loss += (
                    F.cross_entropy(output, y[:, t : t + SEQ_LEN][:, -1].clamp_min(0), reduction="none") * mask
                ).sum()
            else:
                loss += F.cross_entropy(output, y[:, t : t + SEQ_LEN][:, -1])
            h = detach_state(h)
        if masked:
            loss = loss / batch[2].sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    return steps


def fixed_length_loader() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(64, 100, INPUT_SIZE, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, OUTPUT_SIZE, (64, 100), generator=generator)
    return DataLoader(TensorDataset(data, labels), batch_size=32)


def test_example_1_last_step_classifier(tmp_path):
    torch.manual_seed(0)
    model = LastStepClassifier().double()
    reference = twin(model)
    loader = fixed_length_loader()
    trainer = make_trainer(tmp_path, [TBPTTCallback(SEQ_LEN, step_per="batch")])
    trainer.fit(model, loader)
    assert trainer.global_step == blog_reference(reference, loader) == 2
    assert parameters_equal(model, reference)


def test_example_2_overlap_parameter_is_ignored(tmp_path):
    torch.manual_seed(0)
    model = LastStepClassifier(overlap=5).double()
    reference = twin(model)
    loader = fixed_length_loader()
    trainer = make_trainer(tmp_path, [TBPTTCallback(SEQ_LEN, step_per="batch")])
    trainer.fit(model, loader)
    assert trainer.global_step == blog_reference(reference, loader)
    assert parameters_equal(model, reference)


class VariableLengthDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, num_samples: int, max_len: int) -> None:
        generator = torch.Generator().manual_seed(0)
        lengths = torch.randint(10, max_len + 1, (num_samples,), generator=generator)
        self.data = [
            (
                torch.randn(int(n), INPUT_SIZE, generator=generator, dtype=torch.float64),
                torch.randint(0, OUTPUT_SIZE, (int(n),), generator=generator),
            )
            for n in lengths
        ]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index]


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    sequences, labels = zip(*batch, strict=True)
    return (
        pad_sequence(list(sequences), batch_first=True),
        pad_sequence(list(labels), batch_first=True, padding_value=PAD),
        torch.tensor([len(s) for s in sequences]),
    )


def test_example_3_variable_length_with_masked_loss(tmp_path):
    torch.manual_seed(0)
    model = MaskedLastStepClassifier().double()
    reference = twin(model)
    loader = DataLoader(VariableLengthDataset(64, 100), batch_size=32, collate_fn=pad_collate)
    trainer = make_trainer(tmp_path, [TBPTTCallback(SEQ_LEN, step_per="batch")])
    trainer.fit(model, loader)
    assert trainer.global_step == blog_reference(reference, loader, masked=True) == 2
    assert parameters_equal(model, reference)


def test_rewritten_model_learns_with_per_segment_steps(tmp_path):
    """The classic TBPTT mode on the blog's model: one step per segment, and the loss goes down."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 100, INPUT_SIZE, generator=generator)
    y = (x[..., 0] > 0).long()  # the label of a step is readable from that step's input
    model = LastStepClassifier()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    before = F.cross_entropy(model(x), y[:, -1]).item()
    trainer = make_trainer(tmp_path, [TBPTTCallback(SEQ_LEN)], max_epochs=5)
    trainer.fit(model, loader)
    assert trainer.global_step == 5 * 2 * 10
    assert F.cross_entropy(model(x), y[:, -1]).item() < 0.8 * before
