"""Smoke test of an installed distribution (wheel or sdist), outside the source tree: ``smoke.py VERSION NAMESPACE``.

NAMESPACE is the one whose ``Trainer`` runs the fit: ``pytorch_lightning`` (then the ``lightning`` package must be
absent: nothing but the extra installs it) or ``lightning.pytorch`` (the ``lightning`` extra).
"""

import importlib
import importlib.util
import subprocess
import sys
from importlib.metadata import files, version
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_tbptt
from lightning_tbptt import TBPTTCallback

expected, namespace = sys.argv[1:3]
if namespace == "pytorch_lightning":
    assert importlib.util.find_spec("lightning") is None, "the `lightning` package was installed without its extra"
pl = importlib.import_module(namespace)
assert lightning_tbptt.__version__ == version("lightning-tbptt") == expected, (lightning_tbptt.__version__, expected)
package = Path(lightning_tbptt.__file__).parent
assert "site-packages" in package.parts, f"imported from {package}, not from the installed distribution"
installed = {str(f) for f in files("lightning-tbptt") or []}
for name in ["lightning_tbptt/py.typed", "lightning_tbptt/demo.py", "lightning_tbptt/__main__.py"]:
    assert name in installed, f"{name} is missing from the distribution"
assert any(name.endswith("licenses/LICENSE") for name in installed), "LICENSE is missing from the distribution"


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, 8, batch_first=True)

    def training_step(self, batch, batch_idx):
        out, _ = self.rnn(batch[0])
        return (out.sum(-1) - batch[1]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


data = TensorDataset(torch.randn(4, 50, 2), torch.randn(4, 50))
trainer = pl.Trainer(
    max_epochs=1,
    callbacks=[TBPTTCallback(segment_length=10)],
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
trainer.fit(Model(), DataLoader(data, batch_size=2))
assert trainer.global_step == 2 * 5, trainer.global_step  # 2 batches of 5 segments

command = [Path(sys.executable).with_name("lightning-tbptt")]
assert subprocess.run([*command, "--version"], capture_output=True, text=True, check=True).stdout.strip() == (
    f"lightning-tbptt {expected}"
)
demo = [
    "demo",
    "--chars=200000",
    "--held-out=8000",
    "--lanes=4",
    "--eval-lanes=4",
    "--batch-steps=64",
    "--segment-length=16",
    "--hidden-size=16",
    "--max-steps=8",
    "--val-every=1",
    "--threads=1",
]
for runner in [command, [sys.executable, "-m", "lightning_tbptt"]]:
    out = subprocess.run([*runner, *demo], capture_output=True, text=True, check=True).stdout
    for expected_line in ["held-out bits per character before training", "after 8 steps", "peak memory"]:
        assert expected_line in out, out
print(f"smoke test of lightning-tbptt {expected} from {package} with a {namespace} Trainer: passed")
