"""A character-level LSTM language model on Python source, trained as streams, sampled, evaluated dynamically.

The corpus is the source code of some of the Python standard library's modules, read from the running interpreter
with ``inspect.getsource`` (no download). Each module is one document; the training documents are laid end to end in
lanes by ``LaneDataModule``, and ``TBPTTCallback(streaming=True, resets="starts")`` carries every lane's LSTM state
from segment to segment and from batch to batch, zeroing it where a new document starts. Other modules are held out.

The script prints the held-out bits per character before and after training, the same with dynamic evaluation (the
weights adapted on each held-out segment after it is scored), and a sample generated one character at a time with
the LSTM's state carried by a ``Stepper``. It checks its own claims and exits non-zero when one fails:

* training lowered the held-out bits per character;
* dynamic evaluation did not make them worse than the static evaluation of the same trained model;
* dynamic evaluation left the trained weights as they were (bitwise).

    python examples/char_lm.py            # the default run: about two minutes on 2 CPU cores
    python examples/char_lm.py --help     # the flags and their defaults
"""

import argparse
import importlib
import inspect
import math
import time

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tbptt import DynamicEvaluation, LaneDataModule, Stepper, TBPTTCallback

# the small setting the test suite runs the script with (tests/test_examples.py): a few seconds on one core
CI_ARGV = ["--max-steps", "24", "--hidden-size", "32", "--lanes", "4", "--batch-steps", "128", "--eval-lanes", "16"]

# the modules whose source makes the training corpus, and those held out (documents the model never trains on)
TRAIN_MODULES = [
    "argparse", "ast", "base64", "calendar", "cmd", "codecs", "collections", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "difflib", "enum", "filecmp", "fileinput", "fractions", "ftplib", "functools",
    "gettext", "gzip", "hashlib", "hmac", "imaplib", "inspect", "ipaddress", "json.decoder", "json.encoder",
    "locale", "logging", "lzma", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib",
    "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "quopri", "random", "re._parser",
    "reprlib", "secrets", "selectors",
    "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics", "string", "stringprep",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "token", "tokenize", "trace",
    "traceback", "types", "typing", "uuid", "warnings", "wave", "weakref", "zipfile",
]  # fmt: skip
HELD_OUT_MODULES = ["heapq", "glob", "bisect", "fnmatch", "colorsys", "netrc", "sched", "getopt"]
VOCAB = 256  # the source is read as bytes (UTF-8)


def module_sources(names: list[str]) -> list[np.ndarray]:
    """The source of each module in ``names`` (a module of the standard library), as an array of bytes."""
    return [np.frombuffer(inspect.getsource(importlib.import_module(name)).encode(), np.uint8) for name in names]


class CharLM(pl.LightningModule):
    """A plain character-level language model, written as if its sequences were short: no state appears in it."""

    def __init__(self, hidden_size: int, embedding_size: int, lr: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embedding_size)
        self.lstm = nn.LSTM(embedding_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, VOCAB)
        self.lr = lr

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens.long()))  # no state: the callback (or a Stepper) carries it
        return self.head(out)

    def bits_per_char(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(batch["input"])
        return F.cross_entropy(logits.flatten(0, 1), batch["target"].long().flatten()) / math.log(2)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.bits_per_char(batch)  # runs once per segment

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        bpc = self.bits_per_char(batch)
        self.log("val_bpc", bpc)  # the callback weights each segment's value by its number of time steps
        return bpc  # the loss dynamic evaluation adapts on

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def trainer(callback: TBPTTCallback, **options: object) -> pl.Trainer:
    """A quiet CPU trainer with ``callback``."""
    return pl.Trainer(
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        **options,
    )


def sample(model: CharLM, prompt: str, count: int, temperature: float, seed: int) -> str:
    """``count`` characters generated after ``prompt``, one at a time: a ``Stepper`` carries the LSTM's state."""
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    drawn: list[int] = []
    with torch.no_grad(), Stepper(model) as step:
        logits = step(torch.tensor([list(prompt.encode())]))[:, -1]  # the prompt's last logits, its state kept
        for _ in range(count):
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)
            drawn.append(int(token))
            logits = step(token)[:, -1]  # one character in, starting from the state the previous call left
    return bytes(drawn).decode("utf-8", errors="replace")


def check(condition: bool, claim: str) -> None:
    """Exit with status 1, saying which claim failed, unless ``condition`` holds (unlike ``assert``, also under -O)."""
    if not condition:
        raise SystemExit(f"FAILED: {claim}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--max-steps", type=int, default=1024, help="optimizer steps (one per segment)")
    parser.add_argument("--lanes", type=int, default=16, help="training lanes (rows of every batch)")
    parser.add_argument("--eval-lanes", type=int, default=4, help="held-out lanes")
    parser.add_argument("--batch-steps", type=int, default=512, help="characters per lane per batch")
    parser.add_argument("--segment-length", type=int, default=64, help="the TBPTT segment length")
    parser.add_argument("--hidden-size", type=int, default=256, help="LSTM units")
    parser.add_argument("--embedding-size", type=int, default=32, help="size of the character embeddings")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate")
    parser.add_argument("--dynamic-lr", type=float, default=1e-3, help="the step size of dynamic evaluation (rms)")
    parser.add_argument("--sample", type=int, default=300, help="characters to generate after training")
    parser.add_argument("--prompt", default="def ", help="the text the sample continues")
    parser.add_argument("--temperature", type=float, default=0.7, help="the sample's logits are divided by it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the sample")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pl.seed_everything(args.seed)

    # 1. The data: one document per module; the held-out modules are never trained on.
    train = module_sources(TRAIN_MODULES)
    held_out = module_sources(HELD_OUT_MODULES)
    print(
        f"corpus: {sum(map(len, train)):,} characters of training source ({len(train)} modules),"
        f" {sum(map(len, held_out)):,} held out ({', '.join(HELD_OUT_MODULES)})"
    )
    # lanes of documents laid end to end; batch["starts"] marks where a document starts, batch["target"] is the next
    # character of batch["input"]
    data = LaneDataModule(
        train, held_out, lanes=args.lanes, steps=args.batch_steps, eval_lanes=args.eval_lanes, target_shift=1
    )

    # 2. The callback: segments of `segment_length`, the state carried across batches and reset at every document.
    tbptt = TBPTTCallback(segment_length=args.segment_length, streaming=True, resets="starts")
    model = CharLM(args.hidden_size, args.embedding_size, args.lr)
    # held-out evaluation is segmented and streamed the same way (each lane's state carried through its documents)
    evaluation = trainer(TBPTTCallback(segment_length=args.segment_length, streaming=True, resets="starts"))
    before = evaluation.validate(model, datamodule=data, verbose=False)[0]["val_bpc"]
    print(f"held-out bits per character before training: {before:.3f}")
    fit = trainer(tbptt, max_steps=args.max_steps, max_epochs=-1, gradient_clip_val=1.0, limit_val_batches=0)
    fit.fit(model, datamodule=data)  # no validation inside the fit (limit_val_batches=0): it is measured after
    after = evaluation.validate(model, datamodule=data, verbose=False)[0]["val_bpc"]
    characters = fit.global_step * args.segment_length * args.lanes
    print(f"held-out bits per character after {fit.global_step} steps ({characters:,} characters): {after:.3f}")
    counts = np.bincount(np.concatenate(train), minlength=VOCAB)
    frequencies = counts[counts > 0] / counts.sum()
    entropy = -(frequencies * np.log2(frequencies)).sum()
    print(f"unigram entropy of the training source: {entropy:.3f} bits per character (no context)")

    # 3. Dynamic evaluation: each held-out segment is scored, then the weights take one step on it (Krause et al.'s
    # rms rule, with the gradient statistics of two training batches); the trained weights come back afterwards.
    trained = [p.detach().clone() for p in model.parameters()]
    settings = DynamicEvaluation(
        lr=args.dynamic_lr,
        rule="rms",
        statistics=lambda: LaneDataModule(
            train, lanes=args.lanes, steps=args.batch_steps, target_shift=1
        ).train_dataloader(),
        statistics_batches=2,
    )
    dynamic_callback = TBPTTCallback(args.segment_length, streaming=True, resets="starts", dynamic_eval=settings)
    dynamic = trainer(dynamic_callback).validate(model, datamodule=data, verbose=False)[0]["val_bpc"]
    print(
        f"held-out bits per character with dynamic evaluation (rms, lr {args.dynamic_lr:g}): {dynamic:.3f}"
        f" ({100 * (after - dynamic) / after:.1f} % below the static {after:.3f})"
    )

    # 4. Sampling from the trained model, its state carried from one character to the next.
    if args.sample:
        text = sample(model, args.prompt, args.sample, args.temperature, args.seed)
        print(f"sample: {args.sample} characters after {args.prompt!r}, temperature {args.temperature}:")
        print(args.prompt + text)
    print(f"time: {time.perf_counter() - started:.0f} s")

    # 5. The claims.
    check(after < before, f"training lowered the held-out bits per character ({before:.3f} -> {after:.3f})")
    check(dynamic <= after, f"dynamic evaluation did not make them worse ({after:.4f} -> {dynamic:.4f})")
    unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), trained, strict=True))
    check(unchanged, "dynamic evaluation left the trained weights as they were")


if __name__ == "__main__":
    main()
