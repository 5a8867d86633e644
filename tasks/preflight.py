"""Phase 0, preflight: fail in seconds, not hours. Checks settings, the model source, the eval-set sizes
and the S3 remote.

Run it as `python -m tasks.preflight`. Nothing is written: a bad setting, an unknown model or an
unreachable artifact store stops the run before any stored artifact or report is touched.
"""
from __future__ import annotations

from typing import Any

from costopt.layout import Workspace
from costopt.modelio import resolve_source
from costopt.params import Params


def preflight(params: Params, ws: Workspace) -> dict[str, Any]:
    from costopt.evaldata import build_sets
    from costopt.s3 import check_endpoint, parse_s3_url

    src = resolve_source(params.ingest.model)
    build_sets(params.evaldata)  # pure Python, milliseconds: set sizes the generators cannot meet fail here
    remote = {"remote": params.version.remote, "checked": False}
    if params.version.remote.startswith("s3://"):
        bucket, _ = parse_s3_url(params.version.remote)
        check_endpoint(params.version.endpoint_url, bucket, create=True)
        remote["checked"] = True
    return {"model": params.ingest.model, "source": src.kind, "profile": params.profile,
            "workspace": str(ws.root), "variants": list(params.quantize.variants), **remote}


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_phase
    return run_phase(__doc__.splitlines()[0], preflight, argv)


if __name__ == "__main__":
    raise SystemExit(main())
