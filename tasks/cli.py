"""The command line shared by every phase: `python -m tasks.<phase> [--params F] [--profile P] [--workspace D]`.

It loads and validates `params.yaml` once, prints the phase's JSON result, and turns the project's
typed errors into a one-line message and exit code 2 instead of a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any, Callable, Iterator

from costopt.storage.layout import MissingArtifactError, ReportInputError, Workspace
from costopt.models.source import ModelFileError, ModelSourceError
from costopt.params import Params, ParamsError, load_frozen, load_params
from costopt.quantization.schemes import SchemeError
from costopt.storage.s3 import StorageError
from costopt.storage.dvc import DvcError
from costopt.distill.student import StudentConfigError
from costopt.distill.train import CheckpointError
from costopt.distill.transfer import TransferError

# Errors caused by input (settings, model files, missing upstream artifacts, storage): a clear message
# and exit code 2 on the command line, and no pointless retries in Airflow.
USER_ERRORS = (ParamsError, ModelSourceError, ModelFileError, SchemeError, StorageError,
               MissingArtifactError, ReportInputError, DvcError, StudentConfigError, CheckpointError,
               TransferError)


@contextlib.contextmanager
def phase_timer(ws: Workspace, label: str) -> Iterator[None]:
    """Record the wall time of one phase run into logs/timings/<label>.json (not a DVC output: a measurement) (the report lists them)."""
    from costopt.storage.layout import write_json

    started = time.perf_counter()
    yield
    write_json(ws.root / "logs" / "timings" / f"{label}.json",
               {"phase": label, "wall_s": round(time.perf_counter() - started, 2)})


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    p.add_argument("--profile", default=None, choices=["quick", "full"],
                   help="quick: small sets for tests; full: the real run (default: full)")
    p.add_argument("--workspace", default=None,
                   help="folder holding artifacts/ and reports/ (default: $COSTOPT_WORKSPACE or .)")
    p.add_argument("--settings", default=None,
                   help="a run's frozen settings (artifacts/run/params.yaml, written by preflight); when given, "
                        "--params and --profile are not read (dvc.yaml's stages pass it)")
    return p


def run_phase(description: str, phase: Callable[[Params, Workspace], Any],
              argv: list[str] | None = None) -> int:
    return execute(phase, parser(description).parse_args(argv))


def run_variant_phase(description: str, one: Callable[[Params, Workspace, str], Any],
                      every: Callable[[Params, Workspace], Any], argv: list[str] | None = None,
                      parser_: argparse.ArgumentParser | None = None) -> int:
    """A phase that runs per variant: `--variant NAME` runs `one` for it, otherwise `every` runs."""
    p = parser_ or parser(description)
    p.add_argument("--variant", help="only this variant (default: every one of quantize.variants)")
    args = p.parse_args(argv)
    if args.variant:
        return execute(lambda params, ws: one(params, ws, args.variant), args, f"{one.__name__}-{args.variant}")
    return execute(every, args)


def execute(phase: Callable[[Params, Workspace], Any], args: argparse.Namespace, label: str | None = None) -> int:
    """Run one phase with parsed flags; user errors become one line on stderr and exit code 2."""
    try:
        ws = Workspace.from_env(args.workspace)
        settings = getattr(args, "settings", None)
        params = load_frozen(ws.root / settings) if settings else load_params(args.params, profile=args.profile)
        with phase_timer(ws, label or phase.__name__):
            result = phase(params, ws)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0
