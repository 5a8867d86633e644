"""Where every artifact of a run lives, relative to one workspace folder.

The workspace is the project folder by default (so DVC sees the artifacts); tests and users can point
`COSTOPT_WORKSPACE` or `--workspace` elsewhere. All phases agree on these paths, so only paths pass
between Airflow tasks, never tensors.

    artifacts/model/            fp32 safetensors, tokenizer, fingerprint.json     (ingest)
    artifacts/data/             prompts, ppl texts, calibration, task set, manifest (evaldata)
    artifacts/variants/<name>/  quantized weights + spec.json                    (quantize)
    artifacts/bench/            baseline.json, variants/<name>.json               (benchmark)
    artifacts/reference/        fp32 top-k log-probs, passage NLL, task answers   (reference)
    artifacts/quality/variants/ <name>.json (metrics + gate verdict), <name>.docs/ (validate)
    artifacts/sensitivity/      per-part KL of INT4/INT8 against fp32             (sensitivity)
    artifacts/calibration/      KL versus calibration-set size                   (calibration_curve)
    artifacts/search/           search.json, quality.json, gates.json, data_docs/,
                                variants|bench|quality of the mixed candidates    (search)
    reports/<run_id>/           summary.json, report.html, data_docs/            (report)
    reports/latest -> <run_id>
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class MissingArtifactError(FileNotFoundError):
    """An input artifact is missing; the message names the file and the phase that writes it."""


class ReportInputError(ValueError):
    """An input artifact exists but is malformed or disagrees with the others; the message names the file."""


MIXED_PREFIX = "mixed_"  # names of the search's mixed-precision candidates


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_env(cls, root: str | Path | None = None) -> "Workspace":
        return cls(Path(root or os.environ.get("COSTOPT_WORKSPACE") or Path.cwd()).resolve())

    @property
    def admin_key_file(self) -> Path:
        """The model server's admin key (mode 0600), written at its first start unless COSTOPT_ADMIN_KEY
        is set; the deploy phase reads it to call the admin routes. Outside artifacts/: never versioned."""
        return self.root / ".costopt" / "admin.key"

    @property
    def model_dir(self) -> Path:
        return self.root / "artifacts" / "model"

    @property
    def data_dir(self) -> Path:
        return self.root / "artifacts" / "data"

    @property
    def variants_dir(self) -> Path:
        return self.root / "artifacts" / "variants"

    @property
    def bench_dir(self) -> Path:
        return self.root / "artifacts" / "bench"

    @property
    def quality_dir(self) -> Path:
        return self.root / "artifacts" / "quality"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def reference_dir(self) -> Path:
        return self.root / "artifacts" / "reference"

    @property
    def sensitivity_dir(self) -> Path:
        return self.root / "artifacts" / "sensitivity"

    @property
    def calibration_dir(self) -> Path:
        return self.root / "artifacts" / "calibration"

    @property
    def search_dir(self) -> Path:
        return self.root / "artifacts" / "search"

    @property
    def distill_dir(self) -> Path:
        """The distill phase's student (`student/`, a model folder) and its record (`distill.json`)."""
        return self.root / "artifacts" / "distill"

    @property
    def distill_work_dir(self) -> Path:
        """The teacher's targets and the training checkpoint: machine state for resuming, never versioned."""
        return self.root / ".costopt" / "distill"

    def _owner(self, name: str) -> Path:
        """Mixed-precision candidates ("mixed_*") belong to the search phase, the rest to quantize."""
        return self.search_dir if name.startswith(MIXED_PREFIX) else self.root / "artifacts"

    def variant_dir(self, name: str) -> Path:
        return self._owner(name) / "variants" / name

    def bench_file(self, name: str) -> Path:
        return (self.search_dir / "bench" if name.startswith(MIXED_PREFIX) else self.bench_dir / "variants") \
            / f"{name}.json"

    def quality_file(self, name: str) -> Path:
        return (self.search_dir / "quality" if name.startswith(MIXED_PREFIX) else self.quality_dir / "variants") \
            / f"{name}.json"


def write_json(path: Path, obj: Any) -> Path:
    """Write JSON atomically: a reader never sees half a file, a crash never truncates the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600
    os.replace(tmp, path)
    return path


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def replace_dir(staging: Path, final: Path) -> None:
    """Swap a fully written staging folder into place; the old folder survives until the new one is complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)


def staging_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.staging-"))
    path.chmod(0o755)  # mkdtemp makes 0700; artifacts are ordinary readable folders
    return path
