"""Command line: ``python -m train fit|evaluate|finetune|ship|mirror|crop|distill ...`` (``--help`` on each)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from captioner.model import ModelConfig

# finetune imports storage (SQLAlchemy, Alembic) at once: before logging is set up, so that their
# INFO lines at import time stay out of every command's output.
from . import crop, distill, evaluate, finetune, mirror, review, ship
from .cli import DEVICE_HELP, VAL_LIMIT_HELP, HelpFormatter, add_dataclass_options, config_from_args
from .fit import TrainConfig, fit

FIT_HELP: dict[str, str] = {
    "data": "dataset as FORMAT:PATH: flickr:DIR, karpathy:FILE[@IMAGE_ROOT] or "
            "coco:ANNOTATIONS_DIR[@IMAGE_ROOT]",
    "out": "output folder: last/ (resumable state), best/ (best model by val CIDEr), history.json, "
           "curves.png",
    "train_split": "split to train on",
    "val_split": "split used for model selection (beam-search CIDEr) and early stopping",
    "cache": "folder for the float16 encoder-feature cache (reused across runs; keyed by encoder and "
             "preprocessing)",
    "epochs": "maximum number of epochs",
    "batch_size": "captions per batch (per process under torchrun)",
    "lr": "peak learning rate of the decoder (AdamW)",
    "min_lr_ratio": "final learning rate as a fraction of --lr (cosine schedule)",
    "warmup_steps": "linear warm-up steps",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip gradients to this global norm",
    "alpha_c": "weight of the doubly stochastic attention regularisation (the paper's lambda)",
    "label_smoothing": "label smoothing of the cross-entropy",
    "min_freq": "words seen fewer times in the training split map to <unk>",
    "max_caption_len": "training captions are cut to this many words",
    "patience": "stop after this many epochs without a better validation CIDEr",
    "checkpoint_minutes": "also save OUT/last within an epoch this often, in minutes (0: at epoch ends only)",
    "val_beam": "beam size for validation decoding",
    "val_max_len": "maximum caption length for validation decoding",
    "val_length_penalty": "length normalisation exponent for validation decoding",
    "val_block_ngram": "forbid repeating an n-gram of this size in validation decoding (0 = off; the shipped "
                       "model decodes with 3)",
    "val_limit": VAL_LIMIT_HELP,
    "seed": "random seed (data order, dropout, initialisation)",
    "device": DEVICE_HELP,
    "threads": "torch CPU threads (0 = torch's default)",
    "max_steps": "stop after this many optimisation steps (0 = no limit; for smoke tests)",
    "feature_batch_size": "images per encoder pass when filling the feature cache",
    "raw_images": "compute encoder features from the images at every step instead of the cache",
    "encoder_lr": "peak learning rate of the unfrozen encoder blocks (with --fine-tune-blocks)",
    "init_from": "start from this checkpoint's weights, architecture and vocabulary (for example a "
                 "decoder trained on cached features, before --fine-tune-blocks)",
    "scst": "self-critical sequence training: sample captions, reward each with CIDEr-D against the "
            "image's references, baseline the mean of the image's other samples (needs --init-from; "
            "--batch-size then counts images)",
    "scst_samples": "captions sampled per image under --scst (at least 2)",
    "scst_max_len": "maximum length of a sampled caption under --scst",
    "scst_baseline": "under --scst, each sample's baseline: mean (of the image's other samples) or greedy "
                     "(the reward of the image's greedy caption)",
    "scst_sampling": "under --scst, where the rewarded captions come from: multinomial (drawn word by word, "
                     "Rennie et al.) or beam (the final beams of a beam search with the --val-* length "
                     "penalty and n-gram blocking, --scst-samples wide: what serving ranks)",
    "distill_from": "word-level distillation: comma-separated checkpoints (the model's words, each on a "
                    "public encoder's features, which it reads whatever the model reads) whose mean word "
                    "distribution is mixed into each reference word's target",
    "distill_weight": "under --distill-from, the teacher's share of each word's target (0-1)",
    "resume": "continue the run in --out exactly where it stopped (weights, optimizer, schedule, RNG)",
    "progress": "log progress",
}

MODEL_HELP: dict[str, str] = {
    "encoder": "backbone: efficientnet_lite0 (default, weights ship with pip), resnet50, resnet101, "
               "resnet18, tiny",
    "encoder_weights": "local file with the backbone's ImageNet weights (default: the package or "
                       "torchvision download)",
    "image_size": "input size in pixels (square)",
    "embed_dim": "word embedding size",
    "attention_dim": "attention layer size",
    "hidden_dim": "LSTM size",
    "dropout": "dropout before the output layer",
    "deep_output": "use the paper's deep output layer",
    "fine_tune_blocks": "unfreeze the top N encoder blocks (the frozen part's maps are cached, the top blocks "
                        "run at each step; with --init-from, N > 0 overrides the checkpoint's setting)",
}


FIT_EPILOG = """examples:
  python -m train fit --data flickr:../shared/data/flickr8k --out runs/flickr8k
  python -m train fit --data karpathy:data/dataset_flickr30k.json@data/flickr30k-images --out runs/f30k
  python -m train fit --data karpathy:data/coco/dataset_coco.json@data/coco --out runs/coco
  python -m train fit --data coco:data/coco/annotations --out runs/coco2017  # captions_{train,val}2017.json
  python -m train fit ... --out runs/x --resume             # continue an interrupted run
  python -m train fit ... --init-from runs/x/best --fine-tune-blocks 2 --lr 1e-4 --out runs/x-ft
  python -m train fit ... --init-from runs/x/best --scst --lr 5e-5 --warmup-steps 0 --batch-size 16 \
      --val-beam 10 --val-length-penalty 1.0 --val-block-ngram 3 --out runs/x-scst  # self-critical stage
  python -m train fit ... --epochs 0                        # only fill the feature cache
  torchrun --standalone --nproc_per_node=4 -m train fit ...  # DistributedDataParallel

Features of the frozen encoder are computed once into --cache (float16, memory-mapped) and reused
by later runs; with --fine-tune-blocks N the cache holds the output of the encoder's frozen part
(its own folder) and the top N blocks run at every step; --raw-images reads the images at every
step instead.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser(
        "fit", help="train a captioner on a public dataset",
        description="Train a Show-Attend-Tell captioner with teacher forcing, select the model by\n"
                    "validation CIDEr from beam search, and write OUT/best, OUT/last, history and curves.",
        epilog=FIT_EPILOG, formatter_class=HelpFormatter)
    add_dataclass_options(fit, TrainConfig, FIT_HELP, {"model"})
    model_options = fit.add_argument_group("model (ignored with --init-from, except --fine-tune-blocks)")
    add_dataclass_options(model_options, ModelConfig, MODEL_HELP)
    evaluate.add_parser(sub, HelpFormatter)
    finetune.add_parser(sub, HelpFormatter)
    review.add_parsers(sub, HelpFormatter)
    ship.add_parser(sub, HelpFormatter)
    mirror.add_parser(sub, HelpFormatter)
    crop.add_parser(sub, HelpFormatter)
    distill.add_parser(sub, HelpFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    values = vars(args)
    if args.command == "fit":
        model_keys = {f.name for f in fields(ModelConfig)}
        cfg = config_from_args(TrainConfig, values)
        cfg.model = {k: values[k] for k in model_keys}
        fit(cfg)
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
