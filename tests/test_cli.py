"""``TBPTTCallback`` set up from a ``LightningCLI`` config like any Lightning callback, in real ``fit`` runs."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader

from lightning_tbptt import ConfigurationError, DynamicEvaluation, RandomLengths, TBPTTCallback, masked_mean
from lightning_tbptt.cli import OneLineErrors

# 12 padded sequences of 10 steps in batches of 4, the first 2 batches run, segments of 3: 4 segments per batch
SEQUENCES, STEPS, BATCH_SIZE, BATCHES, SEGMENT_LENGTH = 12, 10, 4, 2, 3
SEGMENTS = -(-STEPS // SEGMENT_LENGTH)
# a batch's lengths are 10, 9, 8, 7: what `training_step` sees in `batch["lengths"]`, segment by segment
SEGMENT_LENGTHS = [[3, 3, 3, 3], [3, 3, 3, 3], [3, 3, 2, 1], [1, 0, 0, 0]]

CALLBACK = """
  callbacks:
    - class_path: lightning_tbptt.TBPTTCallback
      init_args:
        segment_length: {segment_length}
        step_per: {step_per}
        lengths: {lengths}
"""


class PaddedRegressor(pl.LightningModule):
    """An LSTM regressor of padded dict batches ``{"x", "y", "lengths"}``, written for short sequences."""

    def __init__(self, hidden_size: int = 6, lr: float = 0.1) -> None:
        super().__init__()
        self.rnn = nn.LSTM(2, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)
        self.lr = lr
        self.seen_lengths: list[list[int]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen_lengths.append(batch["lengths"].tolist())
        out, _ = self.rnn(batch["x"])
        return masked_mean(F.mse_loss(self.head(out), batch["y"], reduction="none"))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class PaddedData(pl.LightningDataModule):
    def __init__(self, batch_size: int = BATCH_SIZE) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(SEQUENCES, STEPS, 2, generator=generator)
        y = torch.cumsum(x[..., :1], dim=1) / STEPS**0.5
        lengths = STEPS - torch.arange(SEQUENCES) % BATCH_SIZE  # full length first: no segment is padding only
        items = [{"x": x[i], "y": y[i], "lengths": lengths[i]} for i in range(SEQUENCES)]
        return DataLoader(items, batch_size=self.batch_size)


def batch_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["lengths"]


@pytest.fixture(autouse=True)
def _no_command_line(monkeypatch):
    # LightningCLI warns when given `args` while `sys.argv` holds arguments (here pytest's)
    monkeypatch.setattr(sys, "argv", ["cli"])


def write_config(tmp_path: Path, callback: str = CALLBACK, **init_args: object) -> Path:
    init_args = {"segment_length": SEGMENT_LENGTH, "step_per": "segment", "lengths": "lengths", **init_args}
    path = tmp_path / "config.yaml"
    path.write_text(
        "seed_everything: 0\n"
        "trainer:\n"
        "  max_epochs: 1\n"
        f"  limit_train_batches: {BATCHES}\n"
        "  enable_progress_bar: false\n"
        "  enable_model_summary: false\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  accelerator: cpu\n"
        "  devices: 1\n"
        f"  default_root_dir: '{tmp_path / 'logs'}'\n" + callback.format(**init_args)
    )
    return path


def run_cli(config: Path, *args: str, run: bool = True) -> LightningCLI:
    command = ["fit", "--config", str(config)] if run else ["--config", str(config)]
    return LightningCLI(PaddedRegressor, PaddedData, args=[*command, *args], run=run)


def tbptt_callback(cli: LightningCLI) -> TBPTTCallback:
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, TBPTTCallback)]
    return callback


@pytest.mark.parametrize(("step_per", "steps"), [("segment", BATCHES * SEGMENTS), ("batch", BATCHES)])
def test_config_file_sets_up_the_callback(tmp_path, step_per, steps):
    cli = run_cli(write_config(tmp_path, step_per=step_per))

    callback = tbptt_callback(cli)
    assert (callback.segment_length, callback.step_per, callback.lengths) == (SEGMENT_LENGTH, step_per, "lengths")
    assert (callback.time_dim, callback.resets, callback.streaming, callback.transfer) == (1, None, False, None)
    assert cli.trainer.global_step == steps
    assert cli.model.seen_lengths == SEGMENT_LENGTHS * BATCHES
    # the config Lightning saves next to the run holds the callback as parsed
    saved = (tmp_path / "logs" / "config.yaml").read_text()
    assert "class_path: lightning_tbptt.TBPTTCallback" in saved
    assert f"step_per: {step_per}" in saved


def test_command_line_overrides_the_config_files_init_args(tmp_path):
    # `--trainer.callbacks.<arg>` (or `.init_args.<arg>`) sets an init arg of the last callback of the list
    args = ["--trainer.callbacks.segment_length=5", "--trainer.callbacks.init_args.step_per=batch"]
    cli = run_cli(write_config(tmp_path), *args)

    callback = tbptt_callback(cli)
    assert (callback.segment_length, callback.step_per, callback.lengths) == (5, "batch", "lengths")
    assert cli.trainer.global_step == BATCHES
    assert cli.model.seen_lengths == [[5, 5, 5, 5], [5, 4, 3, 2]] * BATCHES


def test_callback_given_on_the_command_line_only(tmp_path):
    args = [
        "--trainer.callbacks+=lightning_tbptt.TBPTTCallback",
        f"--trainer.callbacks.segment_length={SEGMENT_LENGTH}",
        "--trainer.callbacks.lengths=lengths",
    ]
    cli = run_cli(write_config(tmp_path, callback=""), *args)

    callback = tbptt_callback(cli)
    assert (callback.segment_length, callback.step_per, callback.lengths) == (SEGMENT_LENGTH, "segment", "lengths")
    assert cli.trainer.global_step == BATCHES * SEGMENTS
    assert cli.model.seen_lengths == SEGMENT_LENGTHS * BATCHES


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("lengths", "lengths"), ("2", 2), ("[meta, lengths]", ("meta", "lengths")), ("[meta, 0]", ("meta", 0))],
)
def test_lengths_places_parse_from_yaml(tmp_path, value, parsed):
    cli = run_cli(write_config(tmp_path, lengths=value), run=False)
    assert tbptt_callback(cli).lengths == parsed


def test_lengths_index_on_the_command_line(tmp_path):
    cli = run_cli(write_config(tmp_path), "--trainer.callbacks.lengths=2", run=False)
    assert tbptt_callback(cli).lengths == 2


def test_lengths_function_by_import_path(tmp_path):
    cli = run_cli(write_config(tmp_path, lengths=f"{__name__}.batch_lengths"), run=False)
    assert tbptt_callback(cli).lengths is batch_lengths


def test_invalid_init_arg_value_raises_the_callbacks_configuration_error(tmp_path):
    # the type is right (an int), so the parser accepts it; `TBPTTCallback.__init__` rejects it when the CLI
    # instantiates the callbacks, and jsonargparse raises a ValueError with our message in it (from jsonargparse 4.51
    # on, raised from our ConfigurationError)
    message = "Expected argument `segment_length` to be a positive integer but got 0."
    with pytest.raises((ValueError, ConfigurationError), match=message):
        run_cli(write_config(tmp_path, segment_length=0))


def test_init_arg_value_outside_its_type_is_a_parser_error(tmp_path, capsys):
    # `step_per: Literal["segment", "batch"] | None` is checked by the parser, which exits like any command-line error
    with pytest.raises(SystemExit) as raised:
        run_cli(write_config(tmp_path, step_per="sequence"))
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert 'Parser key "trainer.callbacks"' in error
    assert 'Parser key "step_per"' in error
    # before jsonargparse 4.43 the reason reads "Cannot take a Union of no types."
    assert any(reason in error for reason in ("Got value: sequence", "Given value: sequence", "Union of no types"))


SPEC_CALLBACK = CALLBACK + "        recurrent_modules: {recurrent_modules}\n"


@pytest.mark.parametrize(
    "value",
    ['{rnn: "hx -> 1"}', "{rnn: {state_in: hx, state_out: 1, batch_dim: 1}}"],
    ids=["string", "mapping"],
)
def test_state_specs_parse_from_yaml_and_train(tmp_path, value):
    cli = run_cli(write_config(tmp_path, callback=SPEC_CALLBACK, recurrent_modules=value))
    callback = tbptt_callback(cli)
    (spec,) = callback.recurrent_modules.values()
    assert (spec.state_in, spec.state_out) == ("hx", (1,))
    assert cli.trainer.global_step == BATCHES * SEGMENTS


OPTIONS_CALLBACK = CALLBACK + "        random_lengths: {random_lengths}\n        dynamic_eval: {dynamic_eval}\n"


def test_random_lengths_and_dynamic_eval_parse_from_yaml_and_train(tmp_path):
    config = write_config(
        tmp_path,
        callback=OPTIONS_CALLBACK,
        random_lengths="{rule: offset, seed: 3}",
        dynamic_eval="{lr: 0.01, rule: sgd, stages: [test]}",
    )
    cli = run_cli(config)
    callback = tbptt_callback(cli)
    assert callback.random_lengths == RandomLengths("offset", seed=3)
    assert callback.dynamic_eval == DynamicEvaluation(0.01, "sgd", stages=("test",))
    drawn = [callback.training_segments(STEPS, epoch=0, batch=b) for b in range(BATCHES)]
    assert cli.trainer.global_step == sum(drawn)


# --------------------------------------------------------------------------------------------------------------------
# What a bad value prints, in a real command (docs/integration.md, "A bad value")
# --------------------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
RECIPE = next(
    textwrap.dedent(block)
    for block in re.findall(r"^ *```python\n(.*?)^ *```$", (ROOT / "docs" / "integration.md").read_text(), re.S | re.M)
    if "class CLI(OneLineErrors, LightningCLI)" in block
)
SEGMENT_LENGTH_MESSAGE = (
    "Expected argument `segment_length` to be a positive integer but got 0. Pass the number of time steps per"
    " segment, e.g. `TBPTTCallback(segment_length=64)`."
)
STEP_PER_MESSAGE = (
    "Expected argument `step_per` of `TBPTTCallback` to be one of 'segment', 'batch' or None but got sequence."
)


def command(cli: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A user's script, ``cli`` then ``cli(PaddedRegressor, PaddedData)``, run with ``args``."""
    script = f"{cli}\nfrom tests.test_cli import PaddedData, PaddedRegressor\n\nCLI(PaddedRegressor, PaddedData)\n"
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


PLAIN = "from pytorch_lightning.cli import LightningCLI as CLI"


class OneLineCLI(OneLineErrors, LightningCLI):
    pass


def documented_cli() -> type:
    namespace: dict[str, object] = {}
    exec(compile(RECIPE, "integration.md", "exec"), namespace)
    cli = namespace["CLI"]
    assert isinstance(cli, type) and issubclass(cli, LightningCLI) and issubclass(cli, OneLineErrors)
    return cli


@pytest.mark.slow  # two commands in fresh interpreters
def test_a_value_outside_its_type_is_a_parser_error_and_one_line_with_the_documented_cli(tmp_path):
    args = ["fit", "--config", str(write_config(tmp_path, callback=""))]
    args += ["--trainer.callbacks+=lightning_tbptt.TBPTTCallback", "--trainer.callbacks.step_per=sequence"]
    plain = command(PLAIN, *args)  # what the page says a plain LightningCLI prints
    assert plain.returncode == 2, plain.stderr
    assert "Traceback" not in plain.stderr
    assert 'Parser key "step_per"' in plain.stderr
    # the allowed values (before jsonargparse 4.43 the reason reads "Cannot take a Union of no types.")
    assert "Literal['segment', 'batch']" in plain.stderr or "Union of no types" in plain.stderr
    assert last_line(plain.stderr) != f"error: {STEP_PER_MESSAGE}"

    documented = command(RECIPE, *args)
    assert documented.returncode == 2, documented.stderr
    assert "Traceback" not in documented.stderr
    assert last_line(documented.stderr) == f"error: {STEP_PER_MESSAGE}"


@pytest.mark.slow  # two commands in fresh interpreters
def test_a_value_the_callback_refuses_ends_in_one_line_with_the_documented_cli(tmp_path):
    config = str(write_config(tmp_path, segment_length=0))
    plain = command(PLAIN, "fit", "--config", config)  # what the page says a plain LightningCLI prints
    assert plain.returncode == 1
    assert "Traceback" in plain.stderr
    assert f"lightning_tbptt.errors.ConfigurationError: {SEGMENT_LENGTH_MESSAGE}" in plain.stderr

    documented = command(RECIPE, "fit", "--config", config)
    assert documented.returncode == 2, documented.stderr
    assert "Traceback" not in documented.stderr
    assert last_line(documented.stderr) == f"error: {SEGMENT_LENGTH_MESSAGE}"


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        (CALLBACK.format(segment_length=3, step_per="sequence", lengths="null"), STEP_PER_MESSAGE),
        (
            CALLBACK.format(segment_length=3, step_per="segment", lengths="null") + "        loss_on: middle\n",
            "Expected argument `loss_on` of `TBPTTCallback` to be one of 'new', 'window' but got middle.",
        ),
        (
            CALLBACK.format(segment_length="many", step_per="segment", lengths="null"),
            "Expected argument `segment_length` of `TBPTTCallback` to be an int or one of 'auto' or None but got many.",
        ),
        (
            CALLBACK.format(segment_length=3, step_per="segment", lengths="null") + "        exact: 2\n",
            "Expected argument `exact` of `TBPTTCallback` to be a bool but got 2.",
        ),
        (CALLBACK.format(segment_length=0, step_per="segment", lengths="null"), SEGMENT_LENGTH_MESSAGE),
        (
            OPTIONS_CALLBACK.format(
                segment_length=3, step_per="segment", lengths="null", random_lengths="{rule: bad}", dynamic_eval="null"
            ),
            "Expected argument `rule` of `RandomLengths` to be",
        ),
    ],
    ids=["literal", "literal alone", "int or auto", "bool", "refused by the callback", "a nested class"],
)
def test_one_line_errors_end_with_one_line_that_names_the_argument(tmp_path, capsys, callback, message):
    (tmp_path / "config.yaml").write_text("trainer:\n  max_epochs: 1\n" + callback)
    with pytest.raises(SystemExit) as exited:
        OneLineCLI(PaddedRegressor, PaddedData, args=["--config", str(tmp_path / "config.yaml")], run=False)
    assert exited.value.code == 2
    assert last_line(capsys.readouterr().err).startswith(f"error: {message}")


def test_one_line_errors_leave_other_errors_and_good_configs_as_lightning_cli_has_them(tmp_path, capsys):
    cli = documented_cli()(PaddedRegressor, PaddedData, args=["--config", str(write_config(tmp_path))], run=False)
    assert tbptt_callback(cli).segment_length == SEGMENT_LENGTH
    with pytest.raises(SystemExit):
        OneLineCLI(PaddedRegressor, PaddedData, args=["--trainer.max_epochs=abc"], run=False)
    assert "Given value: abc" in last_line(capsys.readouterr().err)  # not about the library: jsonargparse's report
