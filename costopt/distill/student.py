"""A student built from the teacher, so it starts close: drop whole blocks and narrow every MLP, each by
measured importance.

- **Blocks** (ShortGPT's Block Influence): a block whose output hidden state points where its input
  did changes little, so `1 - cos(h_in, h_out)`, averaged over the calibration tokens, scores it; the
  lowest-scored blocks are dropped.
- **MLP channels** (Minitron's activation importance): the mean magnitude of each intermediate channel
  (`act(gate) * up`, the input of `down_proj`) over the same tokens; each kept block keeps its
  `intermediate_size` strongest channels (rows of gate/up, columns of down).
Attention heads, the embeddings and the (tied) head are kept whole: the heads of this family are few
(9 query, 3 key/value) and the embeddings are shared with the head.

The student is a plain model of the teacher's architecture (a new config with fewer layers and a
narrower MLP, weights copied from the teacher), saved like any model folder, so quantization, the
runtimes and the gates treat it as a base like the teacher.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch

MAX_PARAM_RATIO = 0.5  # the bound: at most half the teacher's parameters


class StudentConfigError(ValueError):
    """A student shape the teacher cannot give; the message names the field."""


@dataclass(frozen=True)
class StudentShape:
    layers: int  # decoder blocks kept
    intermediate_size: int  # MLP channels kept in every kept block

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def param_count(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied head counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def shape_params(config: Any, shape: StudentShape) -> int:
    """Parameters a Llama-family model of `config` would have with `shape` (no bias, tied or not)."""
    h, v = config.hidden_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attn = h * q + 2 * h * kv + q * h
    mlp = 3 * h * shape.intermediate_size
    block = attn + mlp + 2 * h  # two RMSNorm weights
    embed = v * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return embed + shape.layers * block + h


def check_shape(config: Any, shape: StudentShape, max_ratio: float = MAX_PARAM_RATIO) -> int:
    """The student's parameter count, or StudentConfigError naming the field that cannot work."""
    n_layers, width = config.num_hidden_layers, config.intermediate_size
    if not isinstance(shape.layers, int) or not 1 <= shape.layers <= n_layers:
        raise StudentConfigError(f"distill.layers: expected an integer from 1 to the teacher's {n_layers} blocks, "
                                 f"got {shape.layers!r}")
    if not isinstance(shape.intermediate_size, int) or not 1 <= shape.intermediate_size <= width:
        raise StudentConfigError(f"distill.intermediate_size: expected an integer from 1 to the teacher's {width}, "
                                 f"got {shape.intermediate_size!r}")
    if shape.intermediate_size % 8:
        raise StudentConfigError(f"distill.intermediate_size: expected a multiple of 8 (the INT4 kernels' "
                                 f"groups and SIMD width), got {shape.intermediate_size}")
    teacher = shape_params(config, StudentShape(n_layers, width))
    student = shape_params(config, shape)
    if student > max_ratio * teacher:
        raise StudentConfigError(
            f"distill.layers / distill.intermediate_size: {shape.layers} blocks of MLP width "
            f"{shape.intermediate_size} give {student / 1e6:.1f}M parameters, {student / teacher:.2f}x the "
            f"teacher's {teacher / 1e6:.1f}M; at most {max_ratio}x is allowed (drop blocks or narrow the MLP)")
    return student


@torch.no_grad()
def importance(model: Any, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Block influence per block ([layers]) and MLP channel importance per block ([layers, width]) over
    the real (unmasked) tokens of `batches`."""
    layers = model.model.layers
    chan = torch.zeros(len(layers), model.config.intermediate_size, dtype=torch.float64)
    bi = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    current_mask: list[torch.Tensor] = []

    def hook(i: int) -> Any:
        def fn(_mod: Any, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].abs()  # [batch, seq, width]
            m = current_mask[0].unsqueeze(-1).to(x.dtype)
            chan[i] += (x * m).sum((0, 1)).double()
        return fn

    last: list[torch.Tensor] = []  # the last block's own output (hidden_states[-1] is after the final norm)
    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    handles.append(model.model.norm.register_forward_pre_hook(lambda _m, a: last.__setitem__(slice(None), [a[0]])))
    try:
        for enc in batches:
            mask = enc["attention_mask"].bool()
            current_mask[:] = [mask]
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
            hs = [*out.hidden_states[:-1], last[0]]  # the embeddings, then every block's output
            for i in range(len(layers)):
                h_in, h_out = hs[i][mask], hs[i + 1][mask]
                bi[i] += (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum().double()
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("importance: the batches hold no tokens")
    return {"block_influence": (bi / count).tolist(), "channels": (chan / count).float(), "tokens": count}


def plan(scores: dict[str, Any], shape: StudentShape) -> dict[str, Any]:
    """Which blocks stay (in order) and which channels each keeps: the most important ones."""
    bi = torch.tensor(scores["block_influence"])
    kept = sorted(torch.argsort(bi, descending=True)[: shape.layers].tolist())
    channels = [sorted(torch.argsort(scores["channels"][i], descending=True)[: shape.intermediate_size].tolist())
                for i in kept]
    dropped = sorted(set(range(len(bi))) - set(kept))
    return {"shape": shape.to_dict(), "kept_layers": kept, "dropped_layers": dropped, "channels": channels,
            "block_influence": scores["block_influence"]}


def build(teacher: Any, the_plan: dict[str, Any]) -> Any:
    """A new model of the teacher's class: its kept blocks, their kept MLP channels, everything else copied."""
    import copy

    shape = StudentShape(**the_plan["shape"])
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = shape.layers
    config.intermediate_size = shape.intermediate_size
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in the_plan["kept_layers"]]
    student = type(teacher)(config).to(next(teacher.parameters()).dtype)
    t_sd = teacher.state_dict()
    s_sd: dict[str, torch.Tensor] = {}
    for key, value in t_sd.items():
        if not key.startswith("model.layers."):
            s_sd[key] = value.clone()
    for j, (i, idx) in enumerate(zip(the_plan["kept_layers"], the_plan["channels"])):
        idx_t = torch.tensor(idx, dtype=torch.long)
        prefix_t, prefix_s = f"model.layers.{i}.", f"model.layers.{j}."
        for key, value in t_sd.items():
            if not key.startswith(prefix_t):
                continue
            name = key[len(prefix_t):]
            if name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                value = value[idx_t]
            elif name == "mlp.down_proj.weight":
                value = value[:, idx_t]
            s_sd[prefix_s + name] = value.clone()
    missing, unexpected = student.load_state_dict(s_sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"student build: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        student.tie_weights()
    return student.eval()
