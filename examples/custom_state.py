"""A recurrence that is not a torch.nn RNN, made carriable with a StateSpec, trained and sampled.

The model is a small character-level language model built from minGRU layers (Feng et al. 2024, "Were RNNs All We
Needed?"): ``h_t = (1 - z_t) * h_{t-1} + z_t * v_t`` with the gate ``z_t`` and the candidate ``v_t`` computed from the
input alone, so a whole segment is computed at once by a parallel scan rather than step by step. Each layer takes its
state as a keyword, ``forward(x, initial_state=None)``, and returns a dataclass, ``MinGRUOutput(sequence,
last_state)``, as many modern sequence layers do. The callback cannot guess where such a state goes in and comes
out; a :class:`~lightning_tbptt.StateSpec` per layer says it::

    StateSpec(state_in="initial_state", state_out="last_state", output="sequence")

With it, ``TBPTTCallback(streaming=True, recurrent_modules={"layers.0.rnn": spec, ...})`` carries both layers' state
from segment to segment and batch to batch of a character stream (sentences of a small random grammar, generated
here with a fixed seed), with the model's ``forward`` written as for short sequences: it never passes a state. After
training, :class:`~lightning_tbptt.Stepper` drives the same model one character at a time with the state carried by
the same specs, to sample text.

The script checks that the held-out bits per character beat a model that ignores context (the unigram entropy), and,
in float64 on a tiny model, that the callback's parameters after a few steps equal those of a plain PyTorch TBPTT
loop that passes and detaches the states itself (``torch.allclose``).

    python examples/custom_state.py                # about a minute on 2 CPU cores
    python examples/custom_state.py --sample 600   # a longer sample
"""

import argparse
import copy
import logging
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_tbptt import LaneDataModule, LaneStream, StateSpec, Stepper, TBPTTCallback

# The small setting CI runs this script with (a few seconds on one core).
CI_ARGV = ["--characters=40000", "--hidden-size=32", "--epochs=1", "--lanes=8", "--sample=80"]

SPEC = StateSpec(state_in="initial_state", state_out="last_state", output="sequence")


@dataclass
class MinGRUOutput:
    sequence: torch.Tensor  # (B, T, H): the hidden state at every step
    last_state: torch.Tensor  # (B, H): the state after the last step, to continue from


def scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` from ``h_{-1} = 0`` along dimension 1, by a Hillis-Steele parallel scan."""
    shift = 1
    while shift < a.shape[1]:
        a_prev = F.pad(a[:, :-shift], (0, 0, shift, 0), value=1.0)
        b_prev = F.pad(b[:, :-shift], (0, 0, shift, 0), value=0.0)
        a, b = a * a_prev, a * b_prev + b
        shift *= 2
    return b


class MinGRU(nn.Module):
    """One minGRU layer: takes its state as the keyword ``initial_state``, returns a :class:`MinGRUOutput`."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.gate = nn.Linear(input_size, hidden_size)
        self.candidate = nn.Linear(input_size, hidden_size)

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None) -> MinGRUOutput:
        z = torch.sigmoid(self.gate(x))
        a, b = 1 - z, z * self.candidate(x)
        if initial_state is not None:  # fold h_{-1} into the first step: b_0 + a_0 * h_{-1}
            b = torch.cat([b[:, :1] + a[:, :1] * initial_state.unsqueeze(1), b[:, 1:]], dim=1)
        h = scan(a, b)
        return MinGRUOutput(sequence=h, last_state=h[:, -1])


class Block(nn.Module):
    """A minGRU layer and a position-wise MLP, each with a residual connection and a layer norm in front."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.norm1, self.rnn = nn.LayerNorm(size), MinGRU(size, size)
        self.norm2, self.mlp = (
            nn.LayerNorm(size),
            nn.Sequential(nn.Linear(size, 2 * size), nn.GELU(), nn.Linear(2 * size, size)),
        )

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.rnn(self.norm1(x), initial_state=initial_state)  # the model passes no state: the callback does
        x = x + out.sequence
        return x + self.mlp(self.norm2(x)), out.last_state


class CharModel(pl.LightningModule):
    """A character-level language model of minGRU blocks, written as for short sequences."""

    def __init__(self, vocab: int, hidden_size: int, layers: int, lr: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden_size)
        self.layers = nn.ModuleList(Block(hidden_size) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(hidden_size), nn.Linear(hidden_size, vocab)
        self.lr = lr

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens.long())
        for block in self.layers:
            x, _ = block(x)  # no state: each block's minGRU gets the carried one through its StateSpec
        return self.head(self.norm(x))

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self(batch["input"]).transpose(1, 2), batch["target"].long())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))  # weighted by each segment's steps: the mean over the stream

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def specs(model: CharModel) -> dict[str, StateSpec]:
    """The state spec of every minGRU layer, by its name in the model: ``{"layers.0.rnn": SPEC, ...}``."""
    return {name: SPEC for name, module in model.named_modules() if isinstance(module, MinGRU)}


SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a small bird", "nobody"]
VERBS = ["sees", "likes", "follows", "paints", "finds", "forgets"]
OBJECTS = ["the moon", "a red ball", "the river", "an apple", "the garden", "its shadow"]
ENDINGS = [".", " today.", " again.", " at night.", "!"]


def make_text(characters: int, seed: int) -> str:
    """Sentences of a small random grammar, ``characters`` long."""
    rng = random.Random(seed)
    pieces, total = [], 0
    while total < characters:
        sentence = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)} "
        pieces.append(sentence)
        total += len(sentence)
    return "".join(pieces)[:characters]


def is_sentence(text: str) -> bool:
    """Whether ``text`` (one sentence, without its final space) is one the grammar makes."""
    return any(text == f"{s} {v} {o}{e}" for s in SUBJECTS for v in VERBS for o in OBJECTS for e in ENDINGS)


def hand_written_loop_agrees(args: argparse.Namespace) -> None:
    """A few streamed steps in float64 against a plain TBPTT loop that passes and detaches each layer's state."""
    torch.set_default_dtype(torch.float64)
    text = make_text(1_000, seed=7)
    tokens = np.frombuffer(text.encode(), dtype=np.uint8) % 32  # 32 symbols are enough here
    stream = LaneStream(tokens, lanes=4, steps=24, target_shift=1)  # 1,000 // 4 = 249 steps per lane: 11 batches
    torch.manual_seed(args.seed)
    model = CharModel(32, 8, layers=2, lr=0.01)
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    segment_length, batches = 8, 3
    trainer = pl.Trainer(
        max_steps=batches * 3,  # 3 batches of 3 segments
        callbacks=[TBPTTCallback(segment_length=segment_length, streaming=True, recurrent_modules=specs(model))],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(stream, batch_size=None))

    optimizer = torch.optim.Adam(reference.parameters(), lr=0.01)
    states: list[torch.Tensor | None] = [None] * len(reference.layers)  # the stream starts from zeros ...
    for batch, _ in zip(DataLoader(stream, batch_size=None), range(batches), strict=False):
        for start in range(0, batch["input"].shape[1], segment_length):
            tokens_in = batch["input"][:, start : start + segment_length]
            target = batch["target"][:, start : start + segment_length]
            x = reference.embed(tokens_in.long())
            for i, block in enumerate(reference.layers):
                x, states[i] = block(x, initial_state=states[i])  # the state passed by hand
            loss = F.cross_entropy(reference.head(reference.norm(x)).transpose(1, 2), target.long())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            states = [state.detach() for state in states]  # ... and is carried, detached, across batches too
    torch.set_default_dtype(torch.float32)

    with torch.no_grad():
        pairs = list(zip(model.parameters(), reference.parameters(), strict=True))
        same = all(torch.allclose(ours, theirs) for ours, theirs in pairs)
        largest = max(float((ours - theirs).abs().max()) for ours, theirs in pairs)
        moved = not all(torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters(), strict=True))
    print(f"callback against a hand-written TBPTT loop (float64, {trainer.global_step} steps): allclose {same},"
          f" max diff {largest:.1e}")  # fmt: skip
    if not (same and moved and trainer.global_step == batches * 3):
        sys.exit("FAILED: the callback's parameters differ from the hand-written loop's")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--characters", type=int, default=400_000, help="characters of generated training text")
    parser.add_argument("--hidden-size", type=int, default=64, help="width of the embedding and of every layer")
    parser.add_argument("--layers", type=int, default=2, help="minGRU blocks")
    parser.add_argument("--lanes", type=int, default=32, help="lanes the training text is cut into (rows per batch)")
    parser.add_argument("--steps", type=int, default=256, help="characters per batch and lane")
    parser.add_argument("--segment-length", type=int, default=64, help="TBPTT segment length")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training stream")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--sample", type=int, default=300, help="characters to sample after training")
    parser.add_argument("--seed", type=int, default=0, help="seed of the text, the weights and the sample")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning 2.6 on torch 2.13 (not about this script)
    warnings.filterwarnings("ignore", ".*IterableDataset.*__len__.*")
    warnings.filterwarnings("ignore", ".*have no `val_dataloader`.*")

    hand_written_loop_agrees(args)

    train_text, val_text = make_text(args.characters, args.seed), make_text(args.characters // 10, args.seed + 1)
    alphabet = sorted(set(train_text))
    index = {char: i for i, char in enumerate(alphabet)}
    encode = lambda text: np.array([index[char] for char in text], dtype=np.int64)  # noqa: E731
    counts = np.bincount(encode(train_text), minlength=len(alphabet))
    unigram = float(-(counts / counts.sum() * np.log2(counts / counts.sum())).sum())
    print(f"{len(train_text):,} training and {len(val_text):,} held-out characters, {len(alphabet)} symbols")

    torch.manual_seed(args.seed)
    model = CharModel(len(alphabet), args.hidden_size, args.layers, args.lr)
    callback = TBPTTCallback(
        segment_length=args.segment_length,
        streaming=True,  # row j of a batch continues row j of the previous one: the state is carried across
        resets="starts",  # zeroed where a lane starts
        recurrent_modules=specs(model),  # {"layers.0.rnn": SPEC, "layers.1.rnn": SPEC}
    )
    data = LaneDataModule(
        encode(train_text), encode(val_text), lanes=args.lanes, steps=args.steps, eval_lanes=4, target_shift=1
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[callback],
        gradient_clip_val=1.0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    began = time.perf_counter()
    trainer.fit(model, datamodule=data)
    bits = float(trainer.callback_metrics["val_loss"]) / math.log(2)
    print(
        f"{trainer.global_step} optimizer steps in {time.perf_counter() - began:.1f} s; held-out {bits:.3f} bits per"
        f" character (unigram entropy: {unigram:.3f})"
    )
    print(
        "carried state after training:", {name: tuple(state.shape) for name, state in callback.carried_state().items()}
    )

    # Sampling: the same model, one character at a time; the Stepper carries each minGRU's state through its spec.
    model.eval()
    generator = torch.Generator().manual_seed(args.seed)
    prompt = "the cat "
    drawn = list(prompt)
    with torch.no_grad(), Stepper(model, recurrent_modules=specs(model)) as step:
        logits = step(torch.from_numpy(encode(prompt))[None])[
            :, -1
        ]  # the prompt in one call, then one step per character
        for _ in range(args.sample):
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            drawn.append(alphabet[int(token)])
            logits = step(token)[:, -1]
    sample = "".join(drawn)
    sentences = [each.strip() for each in sample.replace("!", "!|").replace(".", ".|").split("|")[:-1]]
    valid = sum(is_sentence(each) for each in sentences)
    print(f"sample ({valid} of {len(sentences)} complete sentences are grammatical):\n{sample}")

    if not bits < unigram:
        sys.exit(f"FAILED: {bits:.3f} bits per character does not beat the unigram entropy {unigram:.3f}")


if __name__ == "__main__":
    main()
