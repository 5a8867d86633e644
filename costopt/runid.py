"""Run ids: a name for one run of the roadmap, derived from its inputs only (never the clock).

The same model and the same settings give the same id, so re-running the roadmap rewrites the same
`reports/<run_id>/` folder instead of piling up copies; any change to the model or to a setting gives
a new one. The id reads as `<model-slug>-<profile>-<10 hex digits>`:

    run_id(params, fingerprint)   # 'smollm2-135m-instruct-quick-3f9c01a2b4'
"""
from __future__ import annotations

import hashlib
import json
import re

from costopt.params import Params

SLUG_MAX = 48  # characters; keeps the folder name readable, the hash keeps it unique


def model_slug(model: str) -> str:
    """The last part of a model id or path, lowercased and made safe as a folder name."""
    tail = re.split(r"[:/\\]", model.strip().rstrip("/\\"))[-1]
    slug = re.sub(r"[^a-z0-9._-]+", "-", tail.lower())
    slug = slug.strip(".-_")[:SLUG_MAX].strip(".-_")  # a leading dot would hide the folder
    return slug or "model"


def run_id(params: Params, model_fingerprint: str) -> str:
    """`<model-slug>-<profile>-<first 10 hex of sha256 over the fingerprint and every setting>`."""
    canonical = json.dumps({"model_fingerprint": model_fingerprint, "params": params.to_dict()},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:10]
    profile = re.sub(r"[^a-z0-9]+", "-", params.profile.lower()).strip("-") or "profile"
    return f"{model_slug(params.ingest.model)}-{profile}-{digest}"
