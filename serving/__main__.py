"""`python -m serving`: start the KServe model server with a library of precision variants.

    .venv-serving/bin/python -m serving --workspace . --variants fp32 int8_weight_only --http_port 8080

Flags only; the model class is `serving.model.VariantModel`, the library `serving.library`. KServe's
own flags (`--http_port`, `--grpc_port`, `--enable_grpc`, ...) come from `kserve.model_server.parser`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kserve import model_server
from kserve.model_server import ModelServer

from costopt.storage.layout import Workspace
from serving.admission import AdmissionConfig
from serving.model import DEVICES, ServeOptions

defaults, admission_defaults = ServeOptions(), AdmissionConfig()
parser = argparse.ArgumentParser(parents=[model_server.parser], description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--workspace", type=Path, default=Path("."), help="the pipeline's workspace (artifacts/)")
parser.add_argument("--variants", nargs="+", default=["fp32"], help="variants to serve: fp32 or quantized names")
parser.add_argument("--max_batch", type=int, default=admission_defaults.max_batch, help="sequences per step")
parser.add_argument("--max_wait_ms", type=float, default=admission_defaults.max_wait_ms,
                    help="longest an idle engine waits to fill a batch")
parser.add_argument("--max_queue", type=int, default=admission_defaults.max_queue, help="queued requests")
parser.add_argument("--reserved_high", type=int, default=admission_defaults.reserved_high,
                    help="batch slots only high-priority requests may use")
parser.add_argument("--high_queue_reserve", type=int, default=admission_defaults.high_queue_reserve,
                    help="queue places only high-priority requests may take")
parser.add_argument("--default_deadline_s", type=float, default=admission_defaults.default_deadline_s,
                    help="deadline of a request that sets no x-costopt-deadline-ms")
parser.add_argument("--fixed_batching", action="store_true", help="turn off adaptive batch parameters")
parser.add_argument("--no_deadline_admission", action="store_true",
                    help="turn off deadline forecasts: refuse only on a full queue or a passed deadline")
parser.add_argument("--no_preempt", action="store_true",
                    help="never pause lower-priority sequences to make room for an urgent high-priority one")
parser.add_argument("--deadline_margin", type=float, default=admission_defaults.deadline_margin,
                    help="share by which deadline forecasts are stretched until enough steps are measured (always, "
                         "with --fixed_margin)")
parser.add_argument("--fixed_margin", action="store_true",
                    help="keep --deadline_margin instead of following the forecast errors observed")
parser.add_argument("--margin_quantile", type=float, default=admission_defaults.margin_quantile,
                    help="quantile of the observed forecast errors the adaptive margin covers")
parser.add_argument("--max_len", type=int, default=defaults.max_len, help="prompt + answer tokens per sequence")
parser.add_argument("--max_tokens_limit", type=int, default=defaults.max_tokens_limit, help="largest max_tokens")
parser.add_argument("--max_prompt_tokens", type=int, default=defaults.max_prompt_tokens, help="longest prompt")
parser.add_argument("--max_body_bytes", type=int, default=1 << 20, help="largest request body")
parser.add_argument("--device", choices=DEVICES, default=defaults.device,
                    help="cuda: serve fp32 and torch-runtime variants on the CUDA engine (needs a CUDA device)")
parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads per engine")
parser.add_argument("--prefix_cache", type=int, default=defaults.prefix_cache,
                    help="prompts whose KV cache each llama.cpp engine keeps for reuse (0: off)")
parser.add_argument("--host", default="127.0.0.1",
                    help="address the HTTP server binds to; KServe's own default is 0.0.0.0 (every interface): "
                         "pass 0.0.0.0 inside a container or a pod, where the network around it decides who connects")
parser.add_argument("--keys", type=Path, default=None,
                    help="tenant keys file (YAML; see serving/tenants.py); else COSTOPT_TENANT_KEYS; neither: the "
                         "inference routes are open (loopback only unless --allow_open)")
parser.add_argument("--admin_key_file", type=Path, default=None,
                    help="the admin key for /v2/repository/... (generated at first start, mode 0600); default "
                         "WORKSPACE/.costopt/admin.key; COSTOPT_ADMIN_KEY overrides it")
parser.add_argument("--allow_open", action="store_true",
                    help="serve open inference routes (no tenant keys) on a --host beyond loopback")
parser.add_argument("--request_log", type=Path, default=None, help="JSONL request log (none: no log)")
parser.add_argument("--log_prompts", action="store_true", help="write prompt text into the request log")


def main(argv: list[str] | None = None) -> None:
    args = parser.parse_args(argv)
    try:
        admission = AdmissionConfig(max_queue=args.max_queue, high_queue_reserve=args.high_queue_reserve,
                                    max_batch=args.max_batch, reserved_high=args.reserved_high,
                                    max_wait_ms=args.max_wait_ms, default_deadline_s=args.default_deadline_s,
                                    adaptive=not args.fixed_batching,
                                    deadline_admission=not args.no_deadline_admission,
                                    deadline_margin=args.deadline_margin, preempt=not args.no_preempt,
                                    adaptive_margin=not args.fixed_margin, margin_quantile=args.margin_quantile)
        if args.prefix_cache < 0:
            raise ValueError(f"prefix_cache: {args.prefix_cache}; must be >= 0 (0: off)")
        if args.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes: {args.max_body_bytes}; must be >= 1024")
    except ValueError as exc:
        parser.error(str(exc).replace("AdmissionConfig.", "--"))
    from serving.tenants import ConfigError, admin_key, is_loopback, load_keys

    try:
        keys = load_keys(args.keys)
        admin, admin_from = admin_key(args.admin_key_file or Workspace(args.workspace.resolve()).admin_key_file)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.device == "cuda":
        from costopt.runtimes.cuda_runtime import available as cuda_available

        if cuda_available():
            parser.error(f"--device cuda: {cuda_available()}")
    if keys is None and not is_loopback(args.host) and not args.allow_open:
        parser.error(f"--host {args.host}: without tenant keys (--keys or COSTOPT_TENANT_KEYS) the inference routes "
                     f"are open to anyone who can connect; give keys, bind to 127.0.0.1, or pass --allow_open")
    _announce(keys, admin_from, args.host, args.http_port)
    options = ServeOptions(workspace=args.workspace.resolve(), admission=admission, max_len=args.max_len,
                           max_tokens_limit=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
                           threads=args.threads, prefix_cache=args.prefix_cache, device=args.device)
    from serving.api import bind_to, register
    from serving.library import ModelLibrary
    from serving.protocol import ApiError
    from serving.reqlog import RequestLog

    library = ModelLibrary(options)
    try:
        models = [library.load_now(name) for name in args.variants]
    except ApiError as exc:
        parser.error(f"--variants: {exc.message}")
    register(model_server.app, library, RequestLog(args.request_log, args.log_prompts), args.max_body_bytes,
             keys=keys, admin=admin)
    from serving.compare import register_compare

    register_compare(model_server.app, library)
    bind_to(args.host)
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, registered_models=library,
                enable_grpc=args.enable_grpc).start(models)


def _announce(keys: Any, admin_from: str, host: str, port: int) -> None:
    """Say at start who may do what: open mode is loud, keyed mode lists tenants and their grants."""
    if keys is None:
        _say(f"WARNING: no tenant keys configured (--keys, COSTOPT_TENANT_KEYS): the inference routes are OPEN to "
             f"anyone who can connect to {host}:{port}, at any priority, without quotas")
    else:
        for t in keys.tenants:
            _say(f"tenant {t.name}: {t.quota.describe()}")
        _say(f"{len(keys.tenants)} tenant(s) from {keys.source}; requests without a valid key get 401")
    _say(f"admin routes (/v2/repository/...) need the admin key from {admin_from}")


def _say(line: str) -> None:
    """Start-up notices go to stderr before KServe configures logging (and so before any log handler)."""
    print(f"costopt serving: {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
