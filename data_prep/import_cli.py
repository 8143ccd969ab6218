"""``fedimaging import INPUT OUTPUT_DIR``: the command-line face of :func:`import_dataset`.

Exit codes as ``prep``: 0 every case imported, 3 some cases rejected (the others written),
2 usage errors (bad folders, format or options).
"""

from __future__ import annotations

import argparse
import sys

from data_prep.cli_options import add_workers, dataset_parser, parse, summary, usage_error
from data_prep.nifti_import import import_dataset
from data_prep.nifti_sources import FORMATS
from data_prep.prep import UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = dataset_parser(
        "fedimaging import",
        "Import a NIfTI data set (Medical Segmentation Decathlon, nnU-Net v2 raw, or plain "
        "folders) into a de-identified site dataset, in the format 'fedimaging prep' writes.",
        "input", "data set folder (read only)",
    )
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="auto (default): nnU-Net v2 if dataset.json has channel_names, MSD if it has "
                             "modality, plain folders if there is no dataset.json")
    parser.add_argument("--labels", metavar="DIR", help="plain folders: label maps named like the images")
    parser.add_argument("--modality", choices=("CT", "MR"),
                        help="modality of a single-channel data set when the input does not say "
                             "(required for plain folders); CT channels get the CT window, others z-score")
    parser.add_argument("--test-fraction", type=float, default=0.0,
                        help="hold out this seeded fraction of the labelled cases as test cases (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test hold-out (default 0)")
    add_workers(parser)
    parser.add_argument("--force", action="store_true",
                        help="re-import every case, and allow a non-empty OUTPUT_DIR")
    parser.add_argument("--quiet", action="store_true", help="no summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        result = import_dataset(args.input, args.output_dir, fmt=args.format, labels=args.labels,
                                modality=args.modality, test_fraction=args.test_fraction, seed=args.seed,
                                workers=args.workers, force=args.force)
    except UsageError as exc:
        return usage_error("fedimaging import", exc)
    return summary(result, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
