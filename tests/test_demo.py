"""The main job, `lightning-tbptt demo`: its command line, a short run, exact resume after an interruption."""

import ast
import copy
import itertools
import math
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lightning_tbptt
from lightning_tbptt import LaneDataModule, RandomLengths, TBPTTCallback, demo
from lightning_tbptt.__main__ import build_parser, main
from lightning_tbptt.windows import windows as plan_windows

# a small corpus, lanes and model: a run of a few seconds
TINY = [
    "demo",
    "--chars=200000",
    "--held-out=8000",
    "--lanes=4",
    "--eval-lanes=4",
    "--batch-steps=64",
    "--segment-length=16",
    "--hidden-size=16",
    "--embedding-size=8",
    "--lr=0.01",
    "--accelerator=cpu",
    "--threads=1",  # two threads of a busy 2-core machine are many times slower than one
]


def run(*flags):
    args = build_parser().parse_args([*TINY, *flags])
    return args.run(args)


@pytest.mark.slow  # `python -m lightning_tbptt demo --help` in a fresh interpreter
def test_console_script_and_module_run_the_same_main():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lightning-tbptt"]
    assert script.value == "lightning_tbptt.__main__:main"
    help_text = subprocess.run(
        [sys.executable, "-m", "lightning_tbptt", "demo", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ["--max-steps", "--segment-length", "--stride", "--accelerator", "--checkpoint-dir", "--resume"]:
        assert flag in help_text
    with pytest.raises(SystemExit, match="0"):
        main(["--version"])


def test_demo_uses_only_the_public_api():
    imported = set()
    for node in ast.walk(ast.parse(Path(demo.__file__).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_tbptt"):
            assert node.module == "lightning_tbptt"
            imported |= {alias.name for alias in node.names}
        if isinstance(node, ast.Import):
            assert not any(alias.name.startswith("lightning_tbptt") for alias in node.names)
    assert imported
    assert imported <= set(lightning_tbptt.__all__)


def test_short_run_learns_and_reports(capsys):
    result = run("--max-steps=24", "--val-every=2", "--seed=1")
    out = capsys.readouterr().out
    # 64 steps per batch / 16 per segment: 4 optimizer steps per batch, a validation every 2 batches
    assert result["global_step"] == 24
    assert [(step, characters) for step, characters, _ in result["history"]] == [(8, 512), (16, 1024), (24, 1536)]
    assert result["planned_batches"] == result["batches"] == 6
    assert result["before"] > 7.5  # about log2(256) = 8 bits: an untrained model
    assert result["after"] < result["history"][0][2] < result["before"]
    assert "unigram entropy of the corpus" in out
    assert f"held-out {result['after']:.3f} bits per character after 24 steps (improved from" in out
    assert f"dynamic evaluation (rms, lr 0.001): held-out {result['dynamic']:.3f} bits per character" in out
    assert "peak memory:" in out
    assert 100 < result["peak_mib"] < 4096  # MiB: torch and Lightning alone take more than 100
    assert 3.5 < result["unigram_entropy"] < 6  # source code: far from uniform over 256 bytes


def test_state_is_carried_from_segment_to_segment_and_batch_to_batch(monkeypatch):
    seen = []

    def record_states(self):
        def hook(module, args, kwargs, output):
            if self.training:
                hx = kwargs.get("hx", args[1] if len(args) > 1 else None)
                seen.append((self.trainer.global_step, hx is not None and bool(hx[0].abs().sum() > 0)))

        self.lstm.register_forward_hook(hook, with_kwargs=True)

    monkeypatch.setattr(demo.CharLM, "on_fit_start", record_states, raising=False)
    run("--max-steps=12", "--val-every=3")
    # one LSTM call per segment, 4 segments per batch: every call but the very first starts from a carried state
    assert seen == [(step, step > 0) for step in range(12)]


def test_the_demo_counts_steps_with_the_librarys_window_geometry():
    # the demo's step counts are the callback's: one implementation of where segments lie, the one the plans use
    for length, segment_length, stride, burn_in in itertools.product([64, 100, 128], [16, 30], [None, 8, 16], [0, 5]):
        trained = sum(not window.burn_in for window in plan_windows(length, segment_length, stride, burn_in))
        callback = TBPTTCallback(segment_length, stride=stride, burn_in=burn_in)
        assert callback.training_segments(length) == trained
        assert callback.training_segments(length, fresh=False) == len(plan_windows(length, segment_length, stride))
    assert "steps_in_batch" not in vars(demo)


def test_overlapping_windows_and_burn_in(capsys):
    result = run("--max-steps=12", "--val-every=1", "--stride=8", "--burn-in=4")
    out = capsys.readouterr().out
    assert "TBPTT segments of 16 characters, a window every 8" in out
    # 7 windows per batch of 64 steps (also after a burn-in of 4): 12 steps end in the second batch, trained whole
    assert "--max-steps 12 ends inside a batch: training runs to step 14" in out
    assert result["global_step"] == 14
    assert result["planned_batches"] == result["batches"] == 2
    assert [step for step, _, _ in result["history"]] == [7, 14]
    assert result["after"] < result["before"]


def test_sampling_equals_the_hand_written_step_loop():
    torch.manual_seed(0)
    model = demo.CharLM(embedding_size=8, hidden_size=16)
    text = demo.sample(model, "def", 30, 0.8, seed=3)
    generator = torch.Generator().manual_seed(3)
    drawn = []
    with torch.no_grad():
        out, state = model.lstm(model.embed(torch.tensor([list(b"def")])))
        logits = model.head(out)[:, -1]
        for _ in range(30):
            token = torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=generator)
            drawn.append(int(token))
            out, state = model.lstm(model.embed(token), state)
            logits = model.head(out)[:, -1]
    decoded = bytes(drawn).decode("utf-8", errors="replace")  # control characters shown as their escapes
    assert text == "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in decoded)
    assert all(c.isprintable() or c in "\n\t" for c in text)
    assert model.training and not model.lstm._forward_hooks  # left as it was


def test_a_run_prints_a_sample_of_the_trained_model(capsys):
    result = run("--max-steps=8", "--val-every=2", "--sample=25", "--prompt=import ")
    out = capsys.readouterr().out
    assert "sample: 25 characters after 'import ', temperature 0.8:" in out
    assert ("import " + result["sample"]) in out and len(result["sample"].encode("utf-8", "replace")) >= 25 - 3


def test_the_probe_reports_the_bias_and_changes_nothing(capsys):
    plain = run("--max-steps=12", "--val-every=3")
    capsys.readouterr()
    probed = run("--max-steps=12", "--val-every=3", "--probe=2")
    out = capsys.readouterr().out
    # batches of 64 steps, segments of 16: 3 batches, probed before batches 0 and 2 (steps 0 and 8), spans of 64
    assert [(r.batch, r.global_step, r.span, r.segment_length) for r in probed["probes"]] == [
        (0, 0, 64, 16),
        (2, 8, 64, 16),
    ]
    assert plain["probes"] == []
    assert probed["history"] == plain["history"]  # the probe trains nothing
    last = probed["probes"][-1]
    assert sorted(last.biases) == [4, 8, 16, 32] and 0 < last.bias < 1
    assert "truncation probe: relative bias of the truncated gradient" in out
    shortest = "none" if last.suggested is None else str(last.suggested)
    assert f"{8:>16}  " + "  ".join(f"{last.biases[k]:>7.3f}" for k in (4, 8, 16, 32)) + f"  {shortest:>8}" in out
    assert f"probe: at step 8, segments of 16 characters drop {last.bias:.3f} of the gradient;" in out
    assert "2 probe(s) took" in out


class Interrupted(Exception):
    pass


@pytest.mark.slow  # three demo fits
def test_resume_continues_exactly(tmp_path, monkeypatch):
    torch.manual_seed(0)
    whole = run("--max-steps=24", "--val-every=2", f"--checkpoint-dir={tmp_path / 'whole'}")
    trained = torch.load(tmp_path / "whole" / "last.ckpt", weights_only=False)["state_dict"]

    # an interrupted run resumes from the checkpoint of its last validation
    step = demo.CharLM.training_step

    def crash_after_18(self, batch, batch_idx):
        if self.trainer.global_step == 18:
            raise Interrupted
        return step(self, batch, batch_idx)

    monkeypatch.setattr(demo.CharLM, "training_step", crash_after_18)
    with pytest.raises(Interrupted):
        run("--max-steps=24", "--val-every=2", f"--checkpoint-dir={tmp_path / 'cut'}")
    saved = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 16  # the last validation before the interruption (mid-epoch)
    monkeypatch.setattr(demo.CharLM, "training_step", step)
    resumed = run("--max-steps=24", "--val-every=2", f"--checkpoint-dir={tmp_path / 'cut'}", "--resume=last")
    assert resumed["history"] == whole["history"]  # the history travels in the checkpoint
    assert resumed["before"] == whole["before"]
    assert resumed["planned_batches"] == resumed["batches"] == 6  # the bar, resumed at batch 4 of 6
    again = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=False)["state_dict"]
    for name, value in trained.items():
        assert torch.equal(again[name], value), name

    # a completed run goes on from its last batch when resumed with a larger --max-steps
    run("--max-steps=12", "--val-every=2", f"--checkpoint-dir={tmp_path / 'short'}")
    assert torch.load(tmp_path / "short" / "last.ckpt", weights_only=False)["global_step"] == 12
    longer = run("--max-steps=24", "--val-every=2", f"--checkpoint-dir={tmp_path / 'short'}", "--resume=last")
    assert longer["global_step"] == 24
    assert longer["after"] == whole["after"]
    continued = torch.load(tmp_path / "short" / "last.ckpt", weights_only=False)["state_dict"]
    for name, value in trained.items():
        assert torch.equal(continued[name], value), name


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-steps=0"], "argument --max-steps: expected a positive integer, got 0"),
        (["--threads=0"], "argument --threads: expected a positive integer, got 0"),
        (["--lr=-1"], "argument --lr: expected a positive learning rate, got -1"),
        (["--stride=17"], r"argument --stride: expected 1 to --segment-length \(16\), got 17"),
        (["--burn-in=64"], r"argument --burn-in: expected 0 to --batch-steps - 1 \(63\), got 64"),
        (["--held-out=50000"], "argument --held-out: expected at most a tenth of --chars"),
        (
            ["--batch-steps=4096"],
            r"argument --batch-steps: .* held-out characters per lane \(1,999 with --eval-lanes 4\)",
        ),
        (
            ["--lanes=64", "--batch-steps=4000"],
            r"argument --batch-steps: .* training characters per lane \(2,999 with --lanes 64\)",
        ),
        (["--devices=3"], r"argument --devices: expected a number that divides --lanes \(4\)"),
        (["--resume=last"], "argument --resume: `last` needs --checkpoint-dir"),
        (["--probe=0"], "argument --probe: expected a positive number of batches, got 0"),
        (["--sample=-1"], "argument --sample: expected a number of characters >= 0, got -1"),
        (["--temperature=0"], "argument --temperature: expected a positive temperature, got 0.0"),
        (["--temperature=inf"], "argument --temperature: expected a positive temperature, got inf"),
        (["--sample=5", "--prompt="], "argument --prompt: expected at least one character for the model to continue"),
        (["--probe", "--stride=8"], r"argument --probe: not with --stride \(the probe measures plain segments\)"),
        (["--probe=4", "--burn-in=4"], "argument --probe: not with --burn-in"),
        (["--probe=4", "--random-lengths=awd"], "argument --probe: not with --random-lengths"),
        (["--dynamic-lr=0"], "argument --dynamic-lr: expected a positive step size, got 0.0"),
        (["--dynamic-lr=nan"], "argument --dynamic-lr: expected a positive step size, got nan"),
        (["--dynamic-decay=-1"], "argument --dynamic-decay: expected a number >= 0, got -1.0"),
        (["--resume=missing.ckpt"], "argument --resume: no checkpoint at missing.ckpt"),
        (["--chars=1000000000000", "--held-out=1000"], "argument --chars: the standard library at .* holds"),
        (["--seed=-1"], r"argument --seed: expected 0 to 4294967295 \(numpy's seeds\), got -1"),
        # Lightning's own refusals of the device flags, in one line
        (["--precision=8"], r"argument --accelerator/--devices/--precision: Lightning refused .* 8: Precision"),
        (["--devices=0,1"], r"Lightning refused --accelerator cpu --devices 0,1 --precision 32-true: `devices`"),
    ],
)
def test_bad_flags_are_refused_with_the_flag_and_value(flags, message):
    with pytest.raises(SystemExit, match=message):
        run(*flags)


# --------------------------------------------------------------------------------------------------------------------
# The help is plain text with every default; errors end in one line (issue: CLI polish)
# --------------------------------------------------------------------------------------------------------------------

MARKUP = re.compile(r"``|:[a-z]+:`|`")  # reST's literals and roles, Markdown's code


def demo_parser():
    commands = next(action for action in build_parser()._actions if action.dest == "command")
    return commands.choices["demo"]


def test_every_flag_states_its_default_in_plain_text():
    for action in demo_parser()._actions:
        if action.dest == "help":
            continue
        flag = action.option_strings[0]
        assert action.help and not MARKUP.search(action.help), flag
        stated = re.search(r"; default: (.+)$", action.help)
        assert stated, f"{flag}: its help does not end with its default"
        if action.default is not None:  # otherwise the help says what happens: "off", "none (a new run)"...
            assert stated[1].split(" ")[0].replace(",", "") == str(action.default), flag


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]], ids=["top level", "demo"])
def test_the_help_is_plain_text(argv, capsys):
    with pytest.raises(SystemExit, match="0"):
        main(argv)
    help_text = capsys.readouterr().out
    assert "usage: lightning-tbptt" in help_text
    assert not MARKUP.search(help_text), MARKUP.search(help_text)
    if "demo" in argv:
        assert "streams it as lanes with LaneDataModule; TBPTTCallback (streaming=True) cuts" in help_text
        assert "    lightning-tbptt demo --max-steps 6000 --checkpoint-dir runs/demo\n" in help_text  # kept as written


def last_line(text):
    return [line for line in text.splitlines() if line.strip()][-1]


def test_a_refused_flag_ends_the_command_in_one_argparse_style_line(capsys):
    with pytest.raises(SystemExit) as exited:
        main([*TINY, "--lanes=0"])
    assert exited.value.code == 2
    assert (
        capsys.readouterr().err == "lightning-tbptt demo: error: argument --lanes: expected a positive integer, got 0\n"
    )


def old_checkpoint(checkpoint, folder):
    """The checkpoint as the demo saved it before it kept its flags: a resume checks only the model's."""
    saved = torch.load(checkpoint, weights_only=True)
    del saved[demo.FLAGS_KEY]
    torch.save(saved, folder / "old.ckpt")
    return folder / "old.ckpt"


LANES_MESSAGE = (
    "lightning-tbptt demo: error: Expected the training stream to have the 750 batches per epoch of the checkpoint"
    " being resumed but it has 375. Resume with the data, `lanes` and `steps` the checkpoint was trained with."
)


BATCH_MESSAGE = (
    "lightning-tbptt demo: error: Expected the batches to continue the lanes of the checkpoint being resumed, which"
    " carries the state of 4 lanes, but the batch has 8 rows. Resume with the data layout (`lanes`, and the number of"
    " processes) the checkpoint was trained with."
)
# Lightning 2.6 restores the datamodule's state before the first batch: `LaneDataModule` refuses the other lanes (a
# ConfigurationError, status 2); Lightning 2.1 restores it later, and the callback refuses the first batch's rows first
# (a BatchError, status 1). Either ends in the one line of the library's error.
REFUSED_RESUME = {(2, LANES_MESSAGE), (1, BATCH_MESSAGE)}


def test_a_library_error_in_the_fit_ends_the_command_in_one_line(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*TINY, "--max-steps=16", "--lanes=8", f"--resume={old_checkpoint(checkpoint, tmp_path)}"])
    assert (exited.value.code, last_line(capsys.readouterr().err)) in REFUSED_RESUME


def test_other_library_errors_exit_with_status_1_and_bugs_keep_their_traceback(monkeypatch, capsys):
    def fails(error):
        def run(args):
            raise error

        return run

    monkeypatch.setattr(demo, "run", fails(lightning_tbptt.BatchError("Expected a batch.")))
    with pytest.raises(SystemExit) as exited:
        main(["demo"])
    assert exited.value.code == 1
    assert capsys.readouterr().err == "lightning-tbptt demo: error: Expected a batch.\n"
    monkeypatch.setattr(demo, "run", fails(KeyError("a bug")))
    with pytest.raises(KeyError, match="a bug"):
        main(["demo"])
    monkeypatch.setattr(demo, "run", fails(SystemExit(130)))  # Ctrl-C's status passes as it is
    with pytest.raises(SystemExit, match="130"):
        main(["demo"])


@pytest.mark.slow  # two commands in fresh interpreters
def test_the_command_prints_errors_in_one_line_without_a_traceback(checkpoint, tmp_path):
    def command(*flags):
        return subprocess.run(
            [sys.executable, "-m", "lightning_tbptt", *TINY, *flags], capture_output=True, text=True, timeout=300
        )

    # (what comes before the last line: warnings of older Lightning releases as they are imported)
    refused = command("--stride=17")
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    assert (
        last_line(refused.stderr)
        == "lightning-tbptt demo: error: argument --stride: expected 1 to --segment-length (16), got 17"
    )
    failed = command("--max-steps=16", "--lanes=8", f"--resume={old_checkpoint(checkpoint, tmp_path)}")
    assert "Traceback" not in failed.stderr
    assert (failed.returncode, last_line(failed.stderr)) in REFUSED_RESUME, failed.stderr


def test_the_demo_page_states_the_defaults_and_a_real_run():
    page = (Path(__file__).resolve().parent.parent / "docs" / "demo.md").read_text()
    commands = next(action for action in build_parser()._actions if action.dest == "command")
    defaults = {
        action.option_strings[0]: action.default
        for action in commands.choices["demo"]._actions
        if action.option_strings[0].startswith("--") and action.dest != "help"
    }
    stated = {}
    for flags, values in re.findall(r"^\| (`--.*?) \| (.*?) \|", page, flags=re.MULTILINE):
        names = re.findall(r"`(--[a-z-]+)`", flags)
        values = values.split(", ")
        assert len(names) == len(values), flags
        stated.update(zip(names, values, strict=True))
    assert set(stated) == set(defaults)  # every flag, in the table
    for flag, value in stated.items():
        expected = defaults.get(flag)
        if expected is None:
            assert value in ("none", "torch's choice"), flag
        else:
            assert value.replace(",", "") == str(expected), flag
    result = re.search(r"result: held-out (\d\.\d+) bits per character after (\d+) steps .* entropy (\d\.\d+)", page)
    assert result is not None  # the output of a real default run, not a placeholder
    assert int(result[2]) == defaults["--max-steps"]
    assert float(result[1]) < float(result[3])


# --------------------------------------------------------------------------------------------------------------------
# Resuming a completed run, flags that differ from the checkpoint, Ctrl-C (issue 13, item 6); warnings (item 11)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A whole run of 24 steps (6 batches) with checkpoints: its result and its final parameters."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    result = run("--max-steps=24", "--val-every=2", f"--checkpoint-dir={directory}")
    return result, torch.load(directory / "last.ckpt", weights_only=True)["state_dict"]


def assert_same_parameters(path, expected):
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == 24
    assert saved["state_dict"].keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(saved["state_dict"][name], value), name


@pytest.mark.slow  # a demo fit and several resumes
def test_resuming_a_completed_run_reports_it_and_exits_cleanly(tmp_path, capsys):
    completed = run("--max-steps=12", "--val-every=2", f"--checkpoint-dir={tmp_path}")
    capsys.readouterr()
    for max_steps in (12, 8):  # at the checkpoint's step, and below it
        result = run(f"--max-steps={max_steps}", "--val-every=2", f"--checkpoint-dir={tmp_path}", "--resume=last")
        out = capsys.readouterr().out
        assert (
            f"checkpoint: {tmp_path / 'last.ckpt'} already holds step 12, at or beyond --max-steps {max_steps}:"
            " nothing to train; its results follow (pass a --max-steps above 12 to train on)"
        ) in out
        assert result["global_step"] == 12
        assert result["history"] == completed["history"]  # the validations at steps 8 and 12
        assert [step for step, _, _ in result["history"]] == [8, 12]
        assert result["batches"] is None  # no batch trained
        assert "held-out" in out and "after 12 steps" in out
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 12  # not written again
    # a sample of the checkpoint's model, without training
    sampled = run("--max-steps=12", f"--checkpoint-dir={tmp_path}", "--resume=last", "--sample=12")["sample"]
    model = demo.CharLM(embedding_size=8, hidden_size=16, lr=0.01)
    model.load_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"])
    assert sampled == demo.sample(model, "def", 12, 0.8, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint")
    run("--max-steps=8", "--val-every=1", f"--checkpoint-dir={directory}")
    return directory / "last.ckpt"


DIFFERENT_FLAGS = [
    ("--lanes=8", "4", "pass --lanes 4"),  # failed with a BatchError after the fit had started
    ("--eval-lanes=2", "4", "pass --eval-lanes 4"),
    ("--chars=150000", "200000", "pass --chars 200000"),
    ("--held-out=9000", "8000", "pass --held-out 8000"),
    ("--batch-steps=32", "64", "pass --batch-steps 64"),
    ("--segment-length=8", "16", "pass --segment-length 16"),  # trained on with other settings, warned
    ("--stride=8", "none", "leave out --stride"),
    ("--burn-in=4", "0", "pass --burn-in 0"),
    ("--hidden-size=8", "16", "pass --hidden-size 16"),  # failed loading the parameters
    ("--embedding-size=4", "8", "pass --embedding-size 8"),
    ("--lr=0.02", "0.01", "pass --lr 0.01"),  # silently trained on with the checkpoint's learning rate
]


@pytest.mark.parametrize(("flag", "saved", "fix"), DIFFERENT_FLAGS, ids=[flag for flag, _, _ in DIFFERENT_FLAGS])
def test_resume_refuses_flags_that_differ_from_the_checkpoint(checkpoint, flag, saved, fix):
    name, value = flag.split("=")
    message = (
        f"error: argument {name}: expected the value the checkpoint {checkpoint} was trained with ({saved}), got"
        f" {value}; {fix} to resume it, or leave out --resume to start a new run"
    )
    with pytest.raises(SystemExit, match=re.escape(message)):
        run("--max-steps=16", flag, f"--resume={checkpoint}")


def test_resume_checks_the_model_flags_of_a_checkpoint_saved_without_the_flags(checkpoint, tmp_path):
    old = old_checkpoint(checkpoint, tmp_path)
    with pytest.raises(SystemExit, match=r"argument --hidden-size: expected .* \(16\), got 32; pass --hidden-size 16"):
        run("--max-steps=16", "--hidden-size=32", f"--resume={old}")


def test_a_new_run_does_not_overwrite_the_checkpoint_of_another(checkpoint):
    before = checkpoint.read_bytes()
    with pytest.raises(
        SystemExit, match=r"argument --checkpoint-dir: .* already holds last.ckpt, which a new run would"
    ):
        run("--max-steps=4", f"--checkpoint-dir={checkpoint.parent}")
    assert checkpoint.read_bytes() == before


def test_resume_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match=r"argument --resume: cannot read .*notes.ckpt as a checkpoint \("):
        run(f"--resume={tmp_path / 'notes.ckpt'}")


def interrupt_at(monkeypatch, step, interrupt):
    """Make the demo's model call ``interrupt()`` in the segment that takes optimizer step ``step`` (from 0)."""
    training_step = demo.CharLM.training_step

    def interrupted(self, batch, batch_idx):
        if self.trainer.global_step == step:
            interrupt()
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(demo.CharLM, "training_step", interrupted)
    return training_step


def resume_with_the_printed_command(out):
    (command,) = [line.strip() for line in out.splitlines() if line.startswith("  lightning-tbptt demo ")]
    words = shlex.split(command)
    assert words[:2] == ["lightning-tbptt", "demo"] and words[-2:] == ["--resume", "last"]
    main(words[1:])


def test_ctrl_c_stops_after_the_batch_saves_and_prints_the_resume_command(tmp_path, capsys, monkeypatch, uninterrupted):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    handler = signal.getsignal(signal.SIGINT)
    # a real SIGINT, as Ctrl-C sends, in the third segment of the fifth batch (steps 16 to 19)
    training_step = interrupt_at(monkeypatch, 18, lambda: signal.raise_signal(signal.SIGINT))
    with pytest.raises(SystemExit) as stopped, warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does stopping warn
        run("--max-steps=24", "--val-every=2", f"--checkpoint-dir={tmp_path / 'run'}")
    assert stopped.value.code == 130
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C is given back
    assert list((tmp_path / "tmp").iterdir()) == []  # the corpus files are removed
    captured = capsys.readouterr()
    assert "Ctrl-C: stopping after this batch" in captured.err
    assert f"stopped by Ctrl-C at step 20, between two batches; saved {tmp_path / 'run' / 'last.ckpt'} (step 20)" in (
        captured.out
    )
    saved = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 20  # the batch finished: the state between two batches
    monkeypatch.setattr(demo.CharLM, "training_step", training_step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resume_with_the_printed_command(captured.out)
    assert_same_parameters(tmp_path / "run" / "last.ckpt", uninterrupted[1])


def test_a_second_ctrl_c_stops_at_once_and_saves_nothing(tmp_path, capsys, monkeypatch, uninterrupted):
    handler = signal.getsignal(signal.SIGINT)

    def keyboard_interrupt():
        raise KeyboardInterrupt

    training_step = interrupt_at(monkeypatch, 18, keyboard_interrupt)
    with pytest.raises(SystemExit) as stopped:
        run("--max-steps=24", "--val-every=2", f"--checkpoint-dir={tmp_path}")
    assert stopped.value.code == 130
    assert signal.getsignal(signal.SIGINT) is handler  # also where Lightning set it to be ignored
    out = capsys.readouterr().out
    assert (
        "stopped at once by a second Ctrl-C (KeyboardInterrupt) at step 18, inside a batch; nothing saved (a"
        f" checkpoint from inside a batch does not resume exactly); {tmp_path / 'last.ckpt'} holds step 16;"
    ) in out
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 16  # the last validation's
    monkeypatch.setattr(demo.CharLM, "training_step", training_step)
    resume_with_the_printed_command(out)
    assert_same_parameters(tmp_path / "last.ckpt", uninterrupted[1])


def test_ctrl_c_without_a_checkpoint_dir_says_that_nothing_was_saved(capsys, monkeypatch):
    interrupt_at(monkeypatch, 5, lambda: signal.raise_signal(signal.SIGINT))
    with pytest.raises(SystemExit, match="130"):
        run("--max-steps=24", "--val-every=2")
    out = capsys.readouterr().out
    assert (
        "stopped by Ctrl-C at step 8, between two batches; nothing saved: no --checkpoint-dir was given (pass one to"
        " be able to resume a run)"
    ) in out


def test_resume_command_repeats_the_flags_of_the_run():
    args = build_parser().parse_args([*TINY, "--max-steps=24", "--stride=8", "--checkpoint-dir=runs/a b"])
    words = shlex.split(demo.resume_command(args))
    again = build_parser().parse_args(words[1:])
    assert vars(again) == {**vars(args), "resume": "last"}


@pytest.mark.slow  # three demo fits
def test_a_run_with_checkpoints_and_resumes_warns_of_nothing(tmp_path):
    # e.g. torch 2.4 and 2.5 answer every `torch.load` without `weights_only` with a FutureWarning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run("--max-steps=8", "--val-every=1", f"--checkpoint-dir={tmp_path}")
        run("--max-steps=12", "--val-every=1", f"--checkpoint-dir={tmp_path}", "--resume=last")
        run("--max-steps=12", "--val-every=1", f"--checkpoint-dir={tmp_path}", "--resume=last")


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_run_resumes_to_the_parameters_of_an_uninterrupted_run(tmp_path):
    """A real `lightning-tbptt demo` process and a real SIGINT, at whatever point of the fit it arrives."""
    flags = ["--max-steps=160", "--val-every=2"]
    process = subprocess.Popen(
        [sys.executable, "-m", "lightning_tbptt", *TINY, *flags, f"--checkpoint-dir={tmp_path / 'cut'}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (tmp_path / "cut" / "last.ckpt").exists() and process.poll() is None:
        time.sleep(0.05)  # the first validation's checkpoint: the fit runs
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    stopped = re.search(r"stopped by Ctrl-C at step (\d+), between two batches; saved (.*) \(step (\d+)\)", out)
    assert stopped is not None, out
    assert int(stopped[1]) == int(stopped[3]) and 0 < int(stopped[1]) < 160 and int(stopped[1]) % 4 == 0
    assert torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)["global_step"] == int(stopped[1])
    resume_with_the_printed_command(out)
    run(*flags, f"--checkpoint-dir={tmp_path / 'whole'}")
    whole = torch.load(tmp_path / "whole" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == whole["global_step"] == 160
    for name, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name


@pytest.mark.slow  # two demo fits
def test_a_max_steps_inside_a_batch_trains_to_its_end_and_resumes_exactly(tmp_path, capsys, uninterrupted):
    result = run("--max-steps=9", "--val-every=2", f"--checkpoint-dir={tmp_path}")
    out = capsys.readouterr().out
    assert "--max-steps 9 ends inside a batch: training runs to step 12, the end of that batch" in out
    assert result["global_step"] == 12  # 3 batches of 4 segments
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    (entry,) = [value for key, value in saved["callbacks"].items() if "TBPTTCallback" in key]
    assert not entry["partial"] and not entry["in_batch"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning that the saved batch was cut short
        resumed = run("--max-steps=24", "--val-every=2", f"--checkpoint-dir={tmp_path}", "--resume=last")
    assert resumed["after"] == uninterrupted[0]["after"]
    assert_same_parameters(tmp_path / "last.ckpt", uninterrupted[1])


def test_end_of_batch_follows_the_burn_in_and_the_short_last_batch_of_each_epoch():
    # lanes of 200 steps in batches of 64: 64, 64, 64, 8 steps; segments of 32 after a burn-in of 16 in the first:
    # 2, 2, 2 and 1 optimizer steps, 7 per epoch
    ends = [2, 4, 6, 7, 9, 11, 13, 14]
    for max_steps in range(1, 15):
        expected = min(end for end in ends if end >= max_steps)
        assert demo.end_of_batch(max_steps, 200, 64, TBPTTCallback(32, burn_in=16)) == expected, max_steps
    assert demo.end_of_batch(5, 200, 64, TBPTTCallback(32, stride=16)) == 6  # windows every 16 steps: 3, 3, 3, 1


def test_dynamic_evaluation_equals_the_hand_written_score_then_update_loop(tmp_path):
    corpus = np.frombuffer(b"def f(x):\n    return x + 1\n" * 300, dtype=np.uint8)
    np.save(tmp_path / "train.npy", corpus[:6000])
    np.save(tmp_path / "val.npy", corpus[6000:])
    args = build_parser().parse_args([*TINY, "--dynamic-eval=sgd", "--dynamic-lr=0.5"])
    data = LaneDataModule(str(tmp_path / "train.npy"), str(tmp_path / "val.npy"), lanes=4, steps=64, target_shift=1)
    torch.manual_seed(0)
    model = demo.CharLM(embedding_size=8, hidden_size=16)
    trained = [p.detach().clone() for p in model.parameters()]
    reference = copy.deepcopy(model)
    result = demo.dynamic_evaluation(model, data, args, tmp_path / "train.npy")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), trained, strict=True))
    params = list(reference.parameters())
    state, total, count = None, 0.0, 0
    data.setup("validate")
    for b, batch in enumerate(data.val_dataloader()):
        assert not batch["starts"][:, 1:].any() and (b == 0) == bool(batch["starts"][:, 0].all())
        for start in range(0, batch["input"].shape[1], 16):
            x, y = batch["input"][:, start : start + 16], batch["target"][:, start : start + 16]
            out, new_state = reference.lstm(reference.embed(x.long()), state)
            bpc = F.cross_entropy(reference.head(out).flatten(0, 1), y.long().flatten()) / math.log(2)
            total, count = total + bpc.item() * x.shape[1], count + x.shape[1]
            with torch.no_grad():
                for p, g in zip(params, torch.autograd.grad(bpc, params), strict=True):
                    p -= 0.5 * g
            state = tuple(s.detach() for s in new_state)
    assert result == pytest.approx(total / count, rel=1e-5)
    unadapted = build_parser().parse_args([*TINY, "--dynamic-lr=1e-12"])
    static = demo.dynamic_evaluation(model, data, unadapted, tmp_path / "train.npy")
    assert result < static  # it adapted to the repeating text


def test_random_lengths_end_the_run_at_the_end_of_a_batch_of_drawn_segments(capsys):
    result = run("--max-steps=10", "--val-every=2", "--random-lengths=awd", "--sample=0", "--dynamic-eval=off")
    callback = TBPTTCallback(16, random_lengths=RandomLengths("awd", seed=0))
    per_batch = [callback.training_segments(64, fresh=b == 0, epoch=0, batch=b) for b in range(result["batches"])]
    assert result["global_step"] == sum(per_batch) >= 10 > sum(per_batch[:-1])
    assert result["planned_batches"] == result["batches"]
    assert result["dynamic"] is None and "dynamic evaluation" not in capsys.readouterr().out
