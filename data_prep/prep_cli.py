"""``fedimaging prep INPUT_DIR OUTPUT_DIR``: the command-line face of :func:`prepare_site`.

Exit codes: 0 all image series converted, 3 some series (or labels, or files) rejected while
the rest were written (or none converted: then no dataset.json is written or changed), 2 usage
errors (bad folders or options, an input with no DICOM series, an output prep does not own).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_prep.cli_options import add_workers, dataset_parser, parse, summary, usage_error
from data_prep.prep import UsageError, prepare_site


def build_parser() -> argparse.ArgumentParser:
    parser = dataset_parser(
        "fedimaging prep",
        "Convert a hospital DICOM tree into a de-identified site dataset "
        "(NIfTI + dataset.json + fingerprint.json + prep_report.json).",
        "input_dir", "DICOM folder (read only, searched recursively)",
    )
    parser.add_argument("--labels", metavar="DIR",
                        help="NIfTI label maps; matched by mapping.json/mapping.csv or the "
                             "SeriesInstanceUID in the file name (a mapping entry with "
                             "\"split\": \"test\" keeps a labelled case for testing only)")
    parser.add_argument("--label-names", metavar="JSON",
                        help='file with label names, e.g. {"liver": 1, "tumour": 2}')
    add_workers(parser)
    parser.add_argument("--force", action="store_true",
                        help="reconvert every series (OUTPUT_DIR must still be new, empty or "
                             "a prep output: prep never writes into a folder it did not create)")
    parser.add_argument("--tilt", choices=("correct", "reject"), default="correct",
                        help="gantry-tilted CT: resample to an orthogonal grid (default) or reject")
    parser.add_argument("--uneven", choices=("reject", "resample"), default="reject",
                        help="missing slices / uneven spacing: reject (default) or resample to "
                             "uniform spacing")
    parser.add_argument("--split-4d", action="store_true",
                        help="write each time point of a 4D series as its own case "
                             "(default: one 4D NIfTI)")
    parser.add_argument("--modality", choices=("CT", "MR"),
                        help="modality of the dataset (default: the most common); other series are skipped")
    parser.add_argument("--name", default="fedimaging-site", help="dataset name in dataset.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    label_names = None
    if args.label_names:
        try:
            label_names = json.loads(Path(args.label_names).read_text(encoding="utf-8"))
            if not isinstance(label_names, dict) or not all(isinstance(v, int) for v in label_names.values()):
                raise ValueError("expected an object of name: integer")
        except (OSError, ValueError) as exc:
            return usage_error("fedimaging prep", f"--label-names {args.label_names}: {exc}")
    try:
        result = prepare_site(
            args.input_dir, args.output_dir, labels=args.labels, workers=args.workers,
            force=args.force, tilt=args.tilt, uneven=args.uneven, split_4d=args.split_4d,
            modality=args.modality, name=args.name, label_names=label_names,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    except UsageError as exc:
        return usage_error("fedimaging prep", exc)
    if result.nothing_converted:
        print(result.table, file=sys.stderr)
        return result.exit_code
    return summary(result, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
