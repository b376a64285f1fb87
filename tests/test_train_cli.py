"""`python -m train fit|evaluate --help`: every option documented, defaults shown once, no noise."""

from __future__ import annotations

import argparse

import pytest

from train.__main__ import build_parser


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found: argparse.ArgumentParser = action.choices[name]
    return found


@pytest.mark.parametrize("command", ["fit", "evaluate", "finetune"])
def test_every_option_is_documented(command: str) -> None:
    parser = subparser(command)
    for action in parser._actions:
        assert action.help and len(action.help) > 8, action.option_strings
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: )" not in text
    assert text.count("(default: 64)") <= 1  # shown once, not twice
    assert "FORMAT:PATH" in text


def test_fit_help_shows_examples_and_the_model_options() -> None:
    text = subparser("fit").format_help()
    for needle in ("--fine-tune-blocks", "--init-from CHECKPOINT", "--resume", "torchrun", "karpathy:",
                   "coco:", "model (ignored with --init-from"):
        assert needle in text


def test_cli_parses_into_the_train_config() -> None:
    from train.cli import config_from_args
    from train.fit import TrainConfig

    args = build_parser().parse_args(["fit", "--data", "coco:x", "--no-progress", "--fine-tune-blocks", "2",
                                      "--lr", "1e-4", "--raw-images"])
    cfg = config_from_args(TrainConfig, vars(args))
    assert (cfg.data, cfg.progress, cfg.lr, cfg.raw_images) == ("coco:x", False, 1e-4, True)
    assert args.fine_tune_blocks == 2
