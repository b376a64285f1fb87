"""The training reward of self-critical training, measured on greedy captions: does a run raise it?

    python bench/scst_reward.py captioner/default_model runs/flickr8k-scst/best [--images 300]

For each checkpoint: the mean CIDEr-D (``train/cider.py``, the reward ``fit --scst`` optimises,
document frequencies from the whole training split) of its greedy captions of the first
``--images`` training photos, and their mean length. Self-critical training that works raises it;
the first checks of this project's SCST runs used it to tell a failing run from a slow one.
Prints one line per checkpoint (no result file: the checkpoints compared are the point).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from captioner import checkpoint  # noqa: E402
from captioner.beam import BeamConfig  # noqa: E402
from captioner.vocab import tokenize  # noqa: E402
from train.data import load_dataset  # noqa: E402
from train.features import feature_source  # noqa: E402
from train.scoring import decode_captions  # noqa: E402
from train.scst import reference_cider  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", default="flickr:../shared/data/flickr8k")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--cache", default=str(ROOT / "cache" / "features"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = load_dataset(args.data, ("train",)).split("train")
    cider = reference_cider(train)
    chosen = train[: args.images]
    ids = [r.image_id for r in chosen]
    for path in args.checkpoints:
        model = checkpoint.load(path, "cpu")
        source = feature_source(model, {r.image_id: r.path for r in chosen}, torch.device("cpu"), args.cache)
        captions = decode_captions(model, source, ids, BeamConfig(1, 20, 0.0, 0))
        reward = float(cider.score(ids, [tokenize(captions[i]) for i in ids]).mean())
        length = sum(len(captions[i].split()) for i in ids) / len(ids)
        print(f"{path}: greedy CIDEr-D reward {reward:.4f} on {len(ids)} training photos, mean length {length:.2f}")


if __name__ == "__main__":
    main()
