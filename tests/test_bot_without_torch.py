"""The bot process never loads torch: the model runs in the caption worker only."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT

# Every module of the bot (found by walking the package, so new ones are covered), and the
# service implementations the bot starts: the process one spawns the worker, the Ray one talks to
# replicas elsewhere; neither may load torch itself.
IMPORT_ALL = """
import importlib, pkgutil, sys
import bot
names = ["bot", *(m.name for m in pkgutil.walk_packages(bot.__path__, "bot."))]
for name in [*names, "captioner.serving.process", "captioner.serving.ray_service"]:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, f"torch was imported: {loaded[:5]}"
assert "bot.handlers.photos" in sys.modules and "bot.app" in sys.modules
print(len(names))
"""


def test_importing_every_bot_module_leaves_torch_out() -> None:
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 15  # the walk really found the bot's modules
