"""Multi-process training through torchrun: DistributedDataParallel with gloo on CPU, tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from captioner import checkpoint
from tests.test_train_support import make_flickr, tiny_fit_args

ROOT = Path(__file__).resolve().parents[1]


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "train", *args]
    # Without Java on PATH validation skips the PTB tokenizer's JVM start (seconds per epoch).
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not (Path(d) / "java").exists())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PATH": path}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    data = f"flickr:{make_flickr(tmp_path / 'data', n_train=5, n_val=2)}"
    out, cache = tmp_path / "ddp", tmp_path / "cache"
    # 25 captions in batches of 2: 13 batches, 12 kept so both ranks take 6 steps an epoch.
    log = torchrun(tiny_fit_args(data, out, cache, epochs=2, batch_size=2, device="cpu"), tmp_path).stderr
    for rank in (0, 1):
        assert f"rank {rank} of 2 finished at step 12" in log
    assert "weights identical on all 2 ranks" in log
    # Only rank 0 validates and writes.
    assert log.count("epoch 0: loss") == 1 and log.count("epoch 1: loss") == 1
    history = json.loads((out / "history.json").read_text())
    assert [e["step"] for e in history["epochs"]] == [6, 12]
    model = checkpoint.load(out / "best")
    assert model.meta["trained_on"] == data
    assert (out / "last" / "trainer.safetensors").is_file() and (out / "curves.png").is_file()
    assert len(list(cache.iterdir())) == 1

    # The fine-tuning stage under DDP: unfrozen encoder blocks are averaged across ranks too.
    tuned = tmp_path / "tuned"
    log = torchrun(tiny_fit_args(data, tuned, cache, epochs=1, batch_size=2, device="cpu",
                                 init_from=out / "best", fine_tune_blocks=1, encoder_lr=1e-2), tmp_path).stderr
    assert "weights identical on all 2 ranks" in log and "rank 1 of 2 finished at step 6" in log
    assert checkpoint.load(tuned / "best").config.fine_tune_blocks == 1
