"""PyTorch's word_language_model training loop, ported to Lightning with TBPTTCallback; both run, and agree.

The classic example (``pytorch/examples``, ``word_language_model/main.py``) trains an LSTM language model with a
hand-written truncated-BPTT loop: the corpus is laid out time-first as ``(T, B)`` by ``batchify``, ``get_batch(source,
i)`` slices ``bptt`` steps at a time, ``hidden = repackage_hidden(hidden)`` detaches the state before every step, and
each step clips the gradient norm and takes a plain SGD step with the learning rate ``lr``.

Its port is a ``LightningModule`` whose ``training_step`` is the loop's body without the state handling, trained by
a ``Trainer`` with ``TBPTTCallback(segment_length=bptt, time_dim=0, streaming=True)`` (time-first tensors, the state
carried across batches as the loop carries it across the whole epoch) and ``gradient_clip_val=clip``.

This script runs both from the same initial weights on the same data, the same dropout masks included, and checks
that they end with the same parameters (bitwise: ``torch.equal``) and the same validation loss after every epoch. The
corpus is built locally (no download): the words of the docstrings of some of the standard library's modules, one
sentence per docstring line, rare words replaced by ``<unk>`` as in the Penn Treebank data the example uses.

    python examples/word_lm_port.py            # the default run: about two minutes on 2 idle CPU cores
    python examples/word_lm_port.py --help     # the flags and their defaults
"""

import argparse
import ast
import collections
import importlib
import inspect
import math
import re
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_tbptt import TBPTTCallback

# the small setting the test suite runs the script with (tests/test_examples.py): a few seconds on one core
CI_ARGV = ["--modules", "6", "--emsize", "16", "--nhid", "16", "--epochs", "3", "--batches-per-chunk", "3"]

MODULES = [
    "argparse", "asyncio.base_events", "calendar", "collections", "configparser", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools", "http.client", "inspect",
    "ipaddress", "logging", "mailbox", "optparse", "os", "pathlib", "pickle", "random", "shutil", "socket",
    "statistics", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize", "typing", "unittest.case",
    "urllib.parse", "uuid", "zipfile",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# The data: a small corpus of words, built locally, tokenized as the example's `data.Corpus` does
# ---------------------------------------------------------------------------------------------------------------------


def docstring_lines(names: list[str]) -> list[str]:
    """The lines of every docstring (module, classes, functions) in the source of the modules ``names``."""
    lines = []
    for name in names:
        tree = ast.parse(inspect.getsource(importlib.import_module(name)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                lines.extend((ast.get_docstring(node) or "").splitlines())
    return lines


def tokenize(lines: list[str], min_count: int) -> tuple[list[list[str]], list[str]]:
    """Lower-case words, ``<eos>`` at the end of each line; words seen fewer than ``min_count`` times become ``<unk>``.

    Returns the sentences and the vocabulary (in order of first appearance, as the example's ``Dictionary``).
    """
    sentences = [re.findall(r"[a-z]+", line.lower()) for line in lines]
    sentences = [[*words, "<eos>"] for words in sentences if words]
    counts = collections.Counter(word for words in sentences for word in words)
    sentences = [[word if counts[word] >= min_count else "<unk>" for word in words] for words in sentences]
    vocabulary = list(dict.fromkeys(word for words in sentences for word in words))
    return sentences, vocabulary


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    """The example's ``batchify``: the token stream cut into ``bsz`` columns, time first: ``(T, bsz)``."""
    nbatch = data.size(0) // bsz
    data = data.narrow(0, 0, nbatch * bsz)  # trim off any extra elements that wouldn't cleanly fit
    return data.view(bsz, -1).t().contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# The model: the example's `model.RNNModel` (its LSTM path), unchanged
# ---------------------------------------------------------------------------------------------------------------------


class RNNModel(nn.Module):
    """An encoder (embedding), a recurrent module and a decoder (linear), with dropout."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float) -> None:
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)  # time first: (T, B, ninp)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid, self.nlayers = nhid, nlayers
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor] | None) -> tuple:
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = next(self.parameters())
        return weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid)


# ---------------------------------------------------------------------------------------------------------------------
# Before: the example's hand-written loop (`main.py`'s `repackage_hidden`, `get_batch`, `train` and `evaluate`)
# ---------------------------------------------------------------------------------------------------------------------


def repackage_hidden(h: torch.Tensor | tuple) -> torch.Tensor | tuple:
    """Wraps hidden states in new Tensors, to detach them from their history."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def get_batch(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq_len = min(bptt, len(source) - 1 - i)
    data = source[i : i + seq_len]
    target = source[i + 1 : i + 1 + seq_len].view(-1)
    return data, target


def train(model: RNNModel, train_data: torch.Tensor, args: argparse.Namespace, lr: float) -> None:
    criterion = nn.NLLLoss()
    model.train()
    hidden = model.init_hidden(args.batch_size)
    for i in range(0, train_data.size(0) - 1, args.bptt):
        data, targets = get_batch(train_data, i, args.bptt)
        # Starting each batch, we detach the hidden state from how it was previously produced.
        # If we didn't, the model would try backpropagating all the way to start of the dataset.
        model.zero_grad()
        hidden = repackage_hidden(hidden)
        output, hidden = model(data, hidden)
        loss = criterion(output, targets)
        loss.backward()
        # `clip_grad_norm` helps prevent the exploding gradient problem in RNNs / LSTMs.
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)


def evaluate(model: RNNModel, data_source: torch.Tensor, args: argparse.Namespace) -> float:
    criterion = nn.NLLLoss()
    model.eval()
    total_loss = 0.0
    hidden = model.init_hidden(args.eval_batch_size)
    with torch.no_grad():
        for i in range(0, data_source.size(0) - 1, args.bptt):
            data, targets = get_batch(data_source, i, args.bptt)
            output, hidden = model(data, hidden)
            hidden = repackage_hidden(hidden)
            total_loss += len(data) * criterion(output, targets).item()
    return total_loss / (len(data_source) - 1)


# ---------------------------------------------------------------------------------------------------------------------
# After: the same loop body as a LightningModule, the state and the optimization handled by Lightning and the callback
# ---------------------------------------------------------------------------------------------------------------------


class WordLM(pl.LightningModule):
    """The loop's body, for one segment of ``bptt`` steps: no hidden state, no zero_grad/backward/clip/step."""

    def __init__(self, model: RNNModel, lr: float) -> None:
        super().__init__()
        self.model = model
        self.criterion = nn.NLLLoss()
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        data, targets = batch
        output, _ = self.model(data, None)  # no state given: the callback carries the LSTM's, detached
        return self.criterion(output, targets.reshape(-1))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        data, targets = batch
        output, _ = self.model(data, None)
        self.log("val_loss", self.criterion(output, targets.reshape(-1)))  # weighted by each segment's time steps

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)  # p -= lr * p.grad: the loop's update
        # the loop's annealing: lr /= 4 after an epoch whose validation loss is not the best so far
        anneal = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.25, patience=0, threshold=0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": anneal, "monitor": "val_loss"}}


class Chunks(Dataset):
    """Consecutive chunks of ``steps`` rows of a time-first ``(T, B)`` source: ``(data, targets)``, ``(n, B)`` each.

    The targets are the data shifted by one step, as ``get_batch`` takes them; chunk ``j + 1`` continues chunk ``j``
    in every column, so with ``streaming=True`` the state flows through the whole epoch as in the loop.
    """

    def __init__(self, source: torch.Tensor, steps: int) -> None:
        self.source, self.steps = source, steps

    def __len__(self) -> int:
        return math.ceil((len(self.source) - 1) / self.steps)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = index * self.steps
        n = min(self.steps, len(self.source) - 1 - i)
        return self.source[i : i + n], self.source[i + 1 : i + 1 + n]


def loader(source: torch.Tensor, steps: int) -> DataLoader:
    # batch_size=None: each item is already a batch; a generator of its own, so that starting an epoch draws nothing
    # from torch's global generator (which the dropout masks come from, in both runs)
    return DataLoader(Chunks(source, steps), batch_size=None, generator=torch.Generator())


def check(condition: bool, claim: str) -> None:
    """Exit with status 1, saying which claim failed, unless ``condition`` holds (unlike ``assert``, also under -O)."""
    if not condition:
        raise SystemExit(f"FAILED: {claim}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--modules", type=int, default=len(MODULES), help="standard-library modules read")
    parser.add_argument("--min-count", type=int, default=3, help="rarer words become <unk>")
    parser.add_argument("--emsize", type=int, default=200, help="size of word embeddings")
    parser.add_argument("--nhid", type=int, default=200, help="number of hidden units per layer")
    parser.add_argument("--nlayers", type=int, default=2, help="number of layers")
    parser.add_argument("--lr", type=float, default=20.0, help="initial learning rate")
    parser.add_argument("--clip", type=float, default=0.25, help="gradient clipping")
    parser.add_argument("--epochs", type=int, default=6, help="epochs")
    parser.add_argument("--batch-size", type=int, default=20, help="batch size")
    parser.add_argument("--eval-batch-size", type=int, default=10, help="validation batch size")
    parser.add_argument("--bptt", type=int, default=35, help="sequence length")
    parser.add_argument("--dropout", type=float, default=0.2, help="dropout applied to layers (0 = no dropout)")
    parser.add_argument("--batches-per-chunk", type=int, default=10, help="bptt slices per Lightning batch")
    parser.add_argument("--double", action="store_true", help="float64 instead of float32")
    parser.add_argument("--seed", type=int, default=1111, help="random seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    # the corpus: 90 % of the sentences to train on, the rest to validate
    sentences, vocabulary = tokenize(docstring_lines(MODULES[: args.modules]), args.min_count)
    index = {word: i for i, word in enumerate(vocabulary)}
    ids = torch.tensor([index[word] for words in sentences for word in words])
    split = int(0.9 * len(ids))
    train_data = batchify(ids[:split], args.batch_size)
    val_data = batchify(ids[split:], args.eval_batch_size)
    print(
        f"corpus: {len(ids):,} words ({len(vocabulary):,} distinct) from the docstrings of {args.modules} modules;"
        f" train {tuple(train_data.shape)}, validation {tuple(val_data.shape)} (time first)"
    )

    # the same initial weights for both runs
    torch.manual_seed(args.seed)
    reference = RNNModel(len(vocabulary), args.emsize, args.nhid, args.nlayers, args.dropout)
    if args.double:
        reference = reference.double()
    ported = RNNModel(len(vocabulary), args.emsize, args.nhid, args.nlayers, args.dropout).to(reference.encoder.weight)
    ported.load_state_dict(reference.state_dict())

    # before: the hand-written loop
    loop_started = time.perf_counter()
    torch.manual_seed(args.seed)  # the dropout masks come from here
    lr, best_val_loss, loop_losses, loop_lrs = args.lr, None, [], []
    for _ in range(args.epochs):
        loop_lrs.append(lr)
        train(reference, train_data, args, lr)
        val_loss = evaluate(reference, val_data, args)
        loop_losses.append(val_loss)
        if not best_val_loss or val_loss < best_val_loss:
            best_val_loss = val_loss
        else:
            # Anneal the learning rate if no improvement has been seen in the validation dataset.
            lr /= 4.0
    loop_seconds = time.perf_counter() - loop_started

    # after: Lightning and the callback
    lightning_started = time.perf_counter()
    torch.manual_seed(args.seed)
    tbptt = TBPTTCallback(segment_length=args.bptt, time_dim=0, streaming=True)
    losses, lrs = [], []  # recorded for the comparison: each epoch's validation loss and learning rate
    record = pl.callbacks.LambdaCallback(
        on_train_epoch_start=lambda trainer, module: lrs.append(trainer.optimizers[0].param_groups[0]["lr"]),
        on_validation_end=lambda trainer, module: losses.append(trainer.callback_metrics["val_loss"].item()),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        callbacks=[tbptt, record],
        gradient_clip_val=args.clip,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    chunk = args.bptt * args.batches_per_chunk  # a whole number of segments per batch, as the loop's slices
    trainer.fit(WordLM(ported, args.lr), loader(train_data, chunk), loader(val_data, chunk))
    lightning_seconds = time.perf_counter() - lightning_started

    steps_per_epoch = math.ceil((train_data.size(0) - 1) / args.bptt)
    print("  epoch  loop: lr  val loss (ppl)  Lightning: lr  val loss (ppl)")
    for epoch, (mine, theirs, lr, lightning_lr) in enumerate(zip(loop_losses, losses, loop_lrs, lrs, strict=True)):
        print(
            f"  {epoch + 1:>5}  {lr:>8g}  {mine:>7.4f} ({math.exp(mine):>5.1f})"
            f"  {lightning_lr:>13g}  {theirs:>7.4f} ({math.exp(theirs):>5.1f})"
        )
    same = all(torch.equal(p, q) for p, q in zip(reference.parameters(), ported.parameters(), strict=True))
    largest = max((p - q).abs().max().item() for p, q in zip(reference.parameters(), ported.parameters(), strict=True))
    print(
        f"optimizer steps: loop {args.epochs * steps_per_epoch}, Lightning {trainer.global_step};"
        f" parameters identical (torch.equal): {same}, largest difference {largest:g}"
    )
    total = time.perf_counter() - started
    print(f"time: loop {loop_seconds:.1f} s, Lightning {lightning_seconds:.1f} s, total {total:.0f} s")

    check(trainer.global_step == args.epochs * steps_per_epoch, "one optimizer step per bptt slice, as the loop")
    check(lrs == loop_lrs, f"the same learning rate every epoch (loop {loop_lrs}, Lightning {lrs})")
    check(same, f"the same parameters, bitwise (largest difference {largest:g})")
    close = all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(loop_losses, losses, strict=True))
    check(close, f"the same validation losses (loop {loop_losses}, Lightning {losses})")


if __name__ == "__main__":
    main()
