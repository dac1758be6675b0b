"""``python -m convert CKPT [OUT] [--to detectron2|torchvision] [--no-validate]``."""

from __future__ import annotations

import argparse
import sys
import warnings

from convert.converter import (
    DEFAULT_CONFIG,
    TARGETS,
    ValidationError,
    default_output,
    to_detectron2,
    to_torchvision,
)
from moco_d2.core.backbone import ARCHS
from moco_d2.core.errors import exit_on_user_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a MoCo / torchvision / linear-classification ResNet checkpoint into Detectron2 "
        "weights (MODEL.WEIGHTS) or a plain torchvision state dict, and validate the result.",
    )
    parser.add_argument("ckpt", help="input checkpoint (.pth)")
    parser.add_argument(
        "out", nargs="?", help="output file (default: beside CKPT, *_detectron2.pkl or *_torchvision.pth)"
    )
    parser.add_argument("--to", choices=TARGETS, default="detectron2", help="output format")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="refuse a backbone of any other architecture")
    parser.add_argument(
        "--config-file", default=DEFAULT_CONFIG, help="Detectron2 config to validate against (C4 detector)"
    )
    parser.add_argument("--no-validate", action="store_true", help="skip loading the result back")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Library notices that say nothing about the user's files (Detectron2's torch.jit.script deprecation,
    # torch noting a plain pickle's protocol) would bury the one-line result or error.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"Detected pickle protocol", category=UserWarning)
    out = args.out or default_output(args.ckpt, args.to)
    try:
        if args.to == "detectron2":
            report = to_detectron2(
                args.ckpt, out, validate=not args.no_validate, config_file=args.config_file, arch=args.arch
            )
        else:
            report = to_torchvision(args.ckpt, out, validate=not args.no_validate, arch=args.arch)
    except ValidationError as exc:
        print(exc.result.summary(), file=sys.stderr)
        raise
    print(report.summary())


if __name__ == "__main__":
    main()
