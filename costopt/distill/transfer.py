"""Moving a model's weights to a GPU machine that takes a bounded amount per transfer, and back.

The GPU machines this project can borrow take at most 64 MiB per call (the working tree included) and
return at most 16 MiB per file, while the teacher holds 134.5M parameters (538 MB in fp32). So its
weights travel as bf16 (269 MB), split byte-wise: the high byte of each bf16 (sign and exponent, few
distinct values) is zlib-compressed, the low byte (mantissa, close to uniform) stored as it is; on this
model that packs bf16 to 0.69x (measured on every tensor: zlib over the whole bf16 stream gave 0.71x,
lzma over the high bytes 0.68x at 60x the time). The packed tensors go into parts of at most
`max_bytes`, each a safetensors file of uint8 arrays (no pickle: a part from elsewhere cannot run
code) whose metadata holds each tensor's shape and dtype; `unpack` checks that every part is present
and every tensor complete before it returns anything.

bf16 is not lossless for this teacher: 211 of its 272 fp32 tensors have bits below bf16's mantissa,
so the GPU side sees a bf16-rounded teacher (BENCHMARKS.md gives the difference it makes). Weights that
come back (a student trained there) are rounded the same way.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Iterable

import torch

FORMAT = "costopt-bf16-split-1"


class TransferError(ValueError):
    """A part set that cannot be unpacked; the message names the file or tensor."""


def _split(t: torch.Tensor) -> tuple[bytes, bytes]:
    b = t.detach().to(torch.bfloat16).contiguous().view(torch.uint8).reshape(-1, 2)
    lo, hi = b[:, 0].contiguous().numpy().tobytes(), b[:, 1].contiguous().numpy().tobytes()  # little-endian
    return zlib.compress(hi, 6), lo


def pack(state: dict[str, torch.Tensor], out_dir: Path, max_bytes: int, prefix: str = "part") -> list[Path]:
    """Write `state` as bf16 parts of at most `max_bytes` each (a tensor larger than that on its own gets
    a part to itself) into `out_dir`; returns the part files in order."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    groups: list[dict[str, torch.Tensor]] = [{}]
    meta: list[dict[str, str]] = [{}]
    size = 0
    for name, t in state.items():
        hi, lo = _split(t)
        n = len(hi) + len(lo)
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            meta.append({})
            size = 0
        groups[-1][f"{name}::hi"] = torch.frombuffer(bytearray(hi), dtype=torch.uint8)
        groups[-1][f"{name}::lo"] = torch.frombuffer(bytearray(lo), dtype=torch.uint8)
        meta[-1][name] = json.dumps({"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")})
        size += n
    files = []
    for i, (g, m) in enumerate(zip(groups, meta)):
        path = out_dir / f"{prefix}{i + 1:02d}-of-{len(groups):02d}.safetensors"
        save_file(g, str(path), metadata={"format": FORMAT, "tensors": json.dumps(m)})
        files.append(path)
    return files


def unpack(files: Iterable[Path], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict the parts hold (bf16, or `dtype`); every part of the set must be given."""
    from safetensors import safe_open

    files = sorted(Path(f) for f in files)
    if not files:
        raise TransferError("unpack: no part files given")
    state: dict[str, torch.Tensor] = {}
    expected = None
    for path in files:
        try:
            fh = safe_open(str(path), "pt")
        except Exception as exc:
            raise TransferError(f"{path}: not a weights part ({exc})") from exc
        md = fh.metadata() or {}
        if md.get("format") != FORMAT:
            raise TransferError(f"{path}: format {md.get('format')!r}, expected {FORMAT!r}")
        total = path.stem.rsplit("-of-", 1)
        if len(total) != 2 or not total[1].isdigit():
            raise TransferError(f"{path}: expected a name like part01-of-04.safetensors")
        if expected not in (None, int(total[1])):
            raise TransferError(f"{path}: belongs to a set of {total[1]} parts, the others to {expected}")
        expected = int(total[1])
        for name, spec in json.loads(md["tensors"]).items():
            spec = json.loads(spec)
            try:
                hi = zlib.decompress(fh.get_tensor(f"{name}::hi").numpy().tobytes())
                lo = fh.get_tensor(f"{name}::lo").numpy().tobytes()
            except Exception as exc:
                raise TransferError(f"{path}: tensor {name!r} is damaged ({exc})") from exc
            n = 1
            for d in spec["shape"]:
                n *= d
            if len(hi) != n or len(lo) != n:
                raise TransferError(f"{path}: tensor {name!r} holds {len(lo)} values, its shape {spec['shape']} needs {n}")
            pair = torch.stack([torch.frombuffer(bytearray(lo), dtype=torch.uint8),
                                torch.frombuffer(bytearray(hi), dtype=torch.uint8)], 1)
            t = pair.reshape(-1).view(torch.bfloat16).reshape(spec["shape"])
            state[name] = t.to(dtype) if dtype is not None else t
    if len(files) != expected:
        raise TransferError(f"unpack: {len(files)} part files given, the set has {expected}")
    return state
