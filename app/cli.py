"""The ``fedimaging`` command: one entry point that dispatches to each tool's own ``main``.

Each subcommand lives in the module that owns it and has a ``main(argv=None) -> int`` that
tests call in-process; this file only routes. Exit codes: 0 success, 2 usage error, other
codes as each tool documents (``prep``: 3 when some series were rejected).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prep": ("data_prep.prep_cli", "main", "DICOM folders to a de-identified site dataset"),
    "import": ("data_prep.import_cli", "main", "a NIfTI data set (MSD, nnU-Net raw, folders) to a de-identified site dataset"),
    "split": ("data_prep.split", "split_main", "research only: one site dataset to N simulated sites"),
    "demo-data": ("app.cli", "demo_data_main", "write the synthetic demo federation"),
    "predict": ("app.predict", "predict_main", "apply a trained model to a NIfTI file or DICOM series"),
    "report": ("app.report", "report_main", "(re)build a run's report.md and plots"),
    "export": ("app.export_bundle", "export_main", "export a run's final model as a MONAI bundle"),
    "deploy": ("app.cli", "deploy_main", "deploy init DIR --sites a,b,c: CA, certificates, site keys and configs"),
    "privacy": ("app.cli", "privacy_main", "privacy show|migrate: a site's privacy ledger"),
}


def demo_data_main(argv: list[str] | None = None) -> int:
    """``fedimaging demo-data OUTPUT_DIR [--sites N] [--seed S] [--task T] [--size S]``.

    Each site is written as DICOM series and converted by ``fedimaging prep`` (the path a real
    site takes); ``--keep-dicom`` keeps that DICOM under ``OUTPUT_DIR/dicom/<site>/``.
    """
    import os

    from data_prep.demo import UNSEEN_SITE, demo_site_names, write_demo_site

    parser = argparse.ArgumentParser(prog="fedimaging demo-data", description=demo_data_main.__doc__)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--sites", type=int, default=3, help="number of training sites (1-4; the fourth is an MR site)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--task", choices=("segmentation", "classification"), default="segmentation")
    parser.add_argument("--size", choices=("standard", "small"), default="standard")
    parser.add_argument("--no-unseen", action="store_true", help="skip the evaluation-only unseen site")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="prep worker processes (default: min(4, CPUs))")
    parser.add_argument("--keep-dicom", action="store_true",
                        help="keep each site's DICOM and label maps in OUTPUT_DIR/dicom/<site>/ "
                             "(images/ and labels/, the input 'fedimaging prep' converted)")
    args = parser.parse_args(argv)
    try:
        names = demo_site_names(args.sites)
    except ValueError as exc:
        parser.error(str(exc))
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not args.no_unseen:
        names.append(UNSEEN_SITE)
    for name in names:
        keep = args.output_dir / "dicom" / name if args.keep_dicom else None
        existed = (args.output_dir / name / "dataset.json").is_file()
        path = write_demo_site(args.output_dir / name, name, args.seed, args.task, args.size,
                               workers=args.workers, keep_dicom=keep)
        note = " (already there, kept as it was)" if existed else ""
        if keep is not None and not existed:
            note = f" (DICOM in {keep})"
        print(f"{name}: {path}{note}")
    return 0


def _nested(prog: str, actions: dict[str, tuple[str, str]], argv: list[str] | None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] not in actions:
        print(f"usage: fedimaging {prog} {{{','.join(actions)}}} ...", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module_name, function = actions[argv[0]]
    return int(getattr(importlib.import_module(module_name), function)(argv[1:]) or 0)


def deploy_main(argv: list[str] | None = None) -> int:
    """``fedimaging deploy init DIR --sites a,b,c`` | ``register DIR/superlink`` | ``sites DIR/superlink``."""
    return _nested("deploy", {"init": ("deploy.init", "init_main"), "register": ("deploy.sites", "register_main"),
                              "sites": ("deploy.sites", "list_main")}, argv)


def privacy_main(argv: list[str] | None = None) -> int:
    """``fedimaging privacy show [DATA_PATH] [--state-dir DIR | --node-config FILE]``, ``privacy migrate``."""
    return _nested("privacy", {"show": ("privacy.cli", "show_main"), "migrate": ("privacy.cli", "migrate_main")}, argv)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``fedimaging SUBCOMMAND ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fedimaging SUBCOMMAND [ARGS]\n\nsubcommands:")
        for name, (_, _, summary) in COMMANDS.items():
            print(f"  {name:<10} {summary}")
        print("\nRun 'fedimaging SUBCOMMAND --help' for a subcommand's options.")
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        from fedimaging import __version__

        print(f"fedimaging {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fedimaging: unknown subcommand {name!r}; run 'fedimaging --help'", file=sys.stderr)
        return 2
    module_name, function, _ = COMMANDS[name]
    handler = getattr(importlib.import_module(module_name), function)
    return int(handler(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
