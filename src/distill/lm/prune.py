"""Minitron-style structured pruning of decoder-only Hugging Face causal LMs (Llama layout).

One calibration pass (forward hooks only, no model code changes, ``torch.no_grad``) scores every prunable
structure; ``prune`` then slices the kept rows/columns out of every affected weight and returns a *new* model of the
same class (the input is never modified), with its config updated, plus a report.

Importance (padding tokens, ``attention_mask == 0``, never count):

* MLP neurons: mean ``|act_fn(gate) * up|`` per intermediate neuron (the input of ``down_proj``), per layer.
* Attention heads: mean L2 norm of each query head's slice of the attention output (the input of ``o_proj``).
  GQA: a KV group is scored by the sum of its best query heads. ``kv_heads`` keeps the best whole KV groups
  (k/v rows go with them); ``heads`` keeps, inside every kept group, the same number of best query heads, so
  ``num_attention_heads / num_key_value_heads`` stays an integer and the model stays valid. ``head_dim`` is never
  pruned and is written explicitly into the config.
* Hidden (embedding) channels: mean ``|x|`` per channel of every RMSNorm output (both norms of every layer and the
  final norm), summed over the norms. The same channels are kept everywhere in the residual stream: embeddings,
  all norms, q/k/v/gate/up input columns, o/down output rows, lm_head columns (tied embeddings stay tied).
* Depth: block importance ``1 - cos(residual in, residual out)`` of each decoder layer, averaged over tokens
  (ShortGPT / Minitron); ``layers=n`` keeps the ``n`` most important layers in their original order.

``target_params``: sizes given explicitly are fixed; otherwise the MLP shrinks first (not below the hidden size,
rounded down to a multiple of 8), then, if that is not enough, depth is dropped, until the exact parameter count is
at or under the target (``ValueError`` if unreachable). Width before depth follows the Minitron finding.

Families: the structure access lives in a :class:`Layout`; Llama, Mistral, Qwen2 and Qwen3 share it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Axes = tuple[str | None, ...]

_LLAMA_LAYER_RULES: dict[str, Axes] = {
    "self_attn.q_proj.weight": ("q", "hid"),
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "hid"),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "hid"),
    "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("hid", "q"),
    "self_attn.o_proj.bias": ("hid",),
    "self_attn.q_norm.weight": (None,),  # per-head norms (Qwen3): head_dim is never pruned
    "self_attn.k_norm.weight": (None,),
    "mlp.gate_proj.weight": ("mlp", "hid"),
    "mlp.gate_proj.bias": ("mlp",),
    "mlp.up_proj.weight": ("mlp", "hid"),
    "mlp.up_proj.bias": ("mlp",),
    "mlp.down_proj.weight": ("hid", "mlp"),
    "mlp.down_proj.bias": ("hid",),
    "input_layernorm.weight": ("hid",),
    "post_attention_layernorm.weight": ("hid",),
}


@dataclass(frozen=True)
class Layout:
    """Where a model family keeps its parts: module paths and how each weight's axes are indexed.

    Axis kinds: ``"hid"`` residual channel, ``"mlp"`` intermediate neuron, ``"q"``/``"kv"`` head rows (a head index
    expanded by ``head_dim``), ``None`` untouched.
    """

    base: str = "model"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    attn_out: str = "self_attn.o_proj"
    mlp_out: str = "mlp.down_proj"
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    layer_rules: Mapping[str, Axes] = field(default_factory=lambda: dict(_LLAMA_LAYER_RULES))
    global_rules: Mapping[str, Axes] = field(
        default_factory=lambda: {
            "model.embed_tokens.weight": (None, "hid"),
            "model.norm.weight": ("hid",),
            "lm_head.weight": (None, "hid"),
            "lm_head.bias": (None,),
        }
    )


LLAMA_LAYOUT = Layout()
LAYOUTS: dict[str, Layout] = {name: LLAMA_LAYOUT for name in ("llama", "mistral", "qwen2", "qwen3")}


def get_layout(model: nn.Module) -> Layout:
    kind = getattr(model.config, "model_type", None)
    if kind not in LAYOUTS:
        raise ValueError(f"no pruning layout for model_type {kind!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[kind]


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def current_sizes(config: Any) -> dict[str, int]:
    return {
        "mlp": config.intermediate_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
    }


def count_params(model: nn.Module) -> int:
    """Unique parameters (a tied embedding / lm_head counts once)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# importance


@dataclass
class Importance:
    mlp: torch.Tensor  # [layers, intermediate]
    heads: torch.Tensor  # [layers, query heads]
    hidden: torch.Tensor  # [hidden]
    blocks: torch.Tensor  # [layers]
    tokens: int

    def as_lists(self) -> dict[str, Any]:
        return {
            "mlp": self.mlp.tolist(),
            "heads": self.heads.tolist(),
            "hidden": self.hidden.tolist(),
            "blocks": self.blocks.tolist(),
            "tokens": self.tokens,
        }


def _batches(calibration: Iterable[Any]) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Accept tensors of input_ids, dicts with input_ids[/attention_mask], or (input_ids, attention_mask) pairs."""
    for item in calibration:
        if isinstance(item, torch.Tensor):
            ids, mask = item, None
        elif isinstance(item, Mapping):
            ids, mask = item["input_ids"], item.get("attention_mask")
        else:
            ids, mask = item[0], (item[1] if len(item) > 1 else None)
        if ids.dim() == 1:
            ids = ids[None]
            mask = None if mask is None else mask[None]
        yield ids, (torch.ones_like(ids) if mask is None else mask)


class _Collector:
    """Accumulates per-structure sums over valid tokens; hooks read ``self.mask`` set per batch."""

    def __init__(self, config: Any, device: torch.device) -> None:
        n, z = config.num_hidden_layers, lambda *s: torch.zeros(*s, device=device)
        self.mlp, self.heads = z(n, config.intermediate_size), z(n, config.num_attention_heads)
        self.hidden, self.blocks = z(config.hidden_size), z(n)
        self.head_dim, self.mask, self.tokens = head_dim(config), None, 0
        self.inputs: dict[int, torch.Tensor] = {}

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.mask].float()  # boolean indexing: padding rows (even NaN ones) drop out

    def hooks(self, i: int) -> dict[str, Any]:
        def mlp_in(_m, args):
            self.mlp[i] += self.valid(args[0]).abs().sum(0)

        def attn_in(_m, args):
            v = self.valid(args[0])
            self.heads[i] += v.view(v.shape[0], -1, self.head_dim).norm(dim=-1).sum(0)

        def block_in(_m, args, kwargs):
            self.inputs[i] = args[0] if args else kwargs["hidden_states"]

        def block_out(_m, _args, _kwargs, out):
            out = out[0] if isinstance(out, tuple) else out
            cos = nn.functional.cosine_similarity(self.valid(self.inputs.pop(i)), self.valid(out), dim=-1)
            self.blocks[i] += (1 - cos).sum()

        return {"mlp_in": mlp_in, "attn_in": attn_in, "block_in": block_in, "block_out": block_out}

    def norm_out(self, _m, _args, out):
        self.hidden += self.valid(out).abs().sum(0)


def _register(model: nn.Module, layout: Layout, col: _Collector) -> list[Any]:
    handles = []
    for i, layer in enumerate(model.get_submodule(layout.layers)):
        h = col.hooks(i)
        handles.append(layer.get_submodule(layout.mlp_out).register_forward_pre_hook(h["mlp_in"]))
        handles.append(layer.get_submodule(layout.attn_out).register_forward_pre_hook(h["attn_in"]))
        handles.append(layer.register_forward_pre_hook(h["block_in"], with_kwargs=True))
        handles.append(layer.register_forward_hook(h["block_out"], with_kwargs=True))
        handles += [layer.get_submodule(n).register_forward_hook(col.norm_out) for n in layout.norms]
    handles.append(model.get_submodule(layout.final_norm).register_forward_hook(col.norm_out))
    return handles


def collect_importance(model: nn.Module, calibration: Iterable[Any]) -> Importance:
    """One no-grad pass of the base model (no lm_head) over the calibration batches; the model is left as found."""
    layout = get_layout(model)
    device = next(model.parameters()).device
    col = _Collector(model.config, device)
    handles = _register(model, layout, col)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids, mask in _batches(calibration):
                ids, mask = ids.to(device), mask.to(device)
                col.mask, col.tokens = mask.bool(), col.tokens + int(mask.sum())
                model.get_submodule(layout.base)(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if col.tokens == 0:
        raise ValueError("calibration holds no (unmasked) tokens")
    t = col.tokens
    return Importance(
        (col.mlp / t).cpu(), (col.heads / t).cpu(), (col.hidden / t).cpu(), (col.blocks / t).cpu(), t
    )


# ----------------------------------------------------------------------------------------------------------------
# selection


@dataclass
class Keep:
    """Original indices to keep. Per-layer lists are indexed by the ORIGINAL layer number (all layers)."""

    layers: list[int]
    hidden: list[int]
    mlp: list[list[int]]
    q_heads: list[list[int]]
    kv_heads: list[list[int]]

    def sizes(self) -> dict[str, int]:
        i = self.layers[0]
        return {
            "mlp": len(self.mlp[i]),
            "heads": len(self.q_heads[i]),
            "kv_heads": len(self.kv_heads[i]),
            "hidden": len(self.hidden),
            "layers": len(self.layers),
        }


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores, k).indices.tolist())


def select_heads(scores: torch.Tensor, num_kv: int, heads: int, kv_heads: int) -> tuple[list[int], list[int]]:
    """Keep the ``kv_heads`` best KV groups and, inside each, its ``heads // kv_heads`` best query heads.

    Query heads come out grouped by kept KV head (original order), which is the layout GQA expects.
    """
    per_group = heads // kv_heads
    groups = scores.view(num_kv, -1)  # query head h belongs to KV group h // (num_q // num_kv)
    best = groups.topk(per_group, dim=1)
    kept_kv = _top(best.values.sum(1), kv_heads)
    width = groups.shape[1]
    q = [g * width + h for g in kept_kv for h in sorted(best.indices[g].tolist())]
    return q, kept_kv


def select(importance: Importance, config: Any, sizes: Mapping[str, int]) -> Keep:
    n = config.num_hidden_layers
    heads = [
        select_heads(importance.heads[i], config.num_key_value_heads, sizes["heads"], sizes["kv_heads"])
        for i in range(n)
    ]
    return Keep(
        layers=_top(importance.blocks, sizes["layers"]),
        hidden=_top(importance.hidden, sizes["hidden"]),
        mlp=[_top(importance.mlp[i], sizes["mlp"]) for i in range(n)],
        q_heads=[q for q, _ in heads],
        kv_heads=[kv for _, kv in heads],
    )


def resolve_sizes(config: Any, **targets: int | None) -> dict[str, int]:
    """Fill unset targets with current sizes and check them. ``kv_heads`` alone keeps the query/KV ratio."""
    cur = current_sizes(config)
    out = {k: (cur[k] if v is None else int(v)) for k, v in targets.items() if k != "heads"}
    ratio = cur["heads"] // cur["kv_heads"]
    out["heads"] = int(targets["heads"]) if targets.get("heads") is not None else out["kv_heads"] * ratio
    for k, v in out.items():
        if not 1 <= v <= cur[k]:
            raise ValueError(f"{k}={v} must be between 1 and the current {cur[k]}")
    if out["heads"] % out["kv_heads"] or out["heads"] // out["kv_heads"] > ratio:
        raise ValueError(
            f"heads={out['heads']} must be a multiple of kv_heads={out['kv_heads']} with at most {ratio} per group"
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# slicing


def _new_config(config: Any, sizes: Mapping[str, int], layers: list[int]) -> Any:
    cfg = copy.deepcopy(config)
    cfg.head_dim = head_dim(config)
    cfg.intermediate_size, cfg.hidden_size = sizes["mlp"], sizes["hidden"]
    cfg.num_attention_heads, cfg.num_key_value_heads = sizes["heads"], sizes["kv_heads"]
    cfg.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:
        cfg.layer_types = [config.layer_types[i] for i in layers]
    if hasattr(cfg, "quantization_config"):  # e.g. GGUF-loaded teachers: the pruned model is plain and saveable
        del cfg.quantization_config
    return cfg


def _heads_to_rows(heads: list[int], dim: int) -> torch.Tensor:
    h = torch.tensor(heads, dtype=torch.long)
    return (h[:, None] * dim + torch.arange(dim)).flatten()


def _slice(t: torch.Tensor, axes: Axes, index: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if len(axes) != t.dim():
        raise ValueError(f"rule {axes} does not fit a tensor of shape {tuple(t.shape)}")
    for d, kind in enumerate(axes):
        if kind is not None:
            t = t.index_select(d, index[kind].to(t.device))
    return t


def _sliced_state_dict(model: nn.Module, layout: Layout, keep: Keep) -> dict[str, torch.Tensor]:
    dim, prefix = head_dim(model.config), layout.layers + "."
    hid = torch.tensor(keep.hidden, dtype=torch.long)
    new_pos = {old: new for new, old in enumerate(keep.layers)}
    out = {}
    for key, t in model.state_dict().items():
        if not key.startswith(prefix):
            if key not in layout.global_rules:
                raise ValueError(f"pruning does not know the parameter {key!r}")
            out[key] = _slice(t, layout.global_rules[key], {"hid": hid})
            continue
        num, rest = key[len(prefix):].split(".", 1)
        if int(num) not in new_pos:
            continue
        if rest not in layout.layer_rules:
            raise ValueError(f"pruning does not know the layer parameter {rest!r}")
        i = int(num)
        index = {
            "hid": hid,
            "mlp": torch.tensor(keep.mlp[i], dtype=torch.long),
            "q": _heads_to_rows(keep.q_heads[i], dim),
            "kv": _heads_to_rows(keep.kv_heads[i], dim),
        }
        out[f"{prefix}{new_pos[i]}.{rest}"] = _slice(t, layout.layer_rules[rest], index)
    return out


def apply_keep(model: nn.Module, keep: Keep) -> nn.Module:
    """A new model of the same class holding only the kept structures (the input model is not modified)."""
    layout = get_layout(model)
    param = next(model.parameters())
    state = _sliced_state_dict(model, layout, keep)
    new = type(model)(_new_config(model.config, keep.sizes(), keep.layers))
    new.to(device=param.device, dtype=param.dtype)
    new.load_state_dict(state, strict=True)
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new


# ----------------------------------------------------------------------------------------------------------------
# target_params planning


def _planned_params(model: nn.Module, sizes: Mapping[str, int]) -> int:
    cfg = _new_config(model.config, sizes, list(range(sizes["layers"])))
    with torch.device("meta"):
        return count_params(type(model)(cfg))


def _shrink(model: nn.Module, sizes: dict[str, int], key: str, floor: int, target: int, step: int) -> bool:
    """Lower ``sizes[key]`` (params are linear in it) to the largest value >= floor fitting ``target``."""
    cur = sizes[key]
    if floor >= cur:
        return _planned_params(model, sizes) <= target
    high, low = _planned_params(model, sizes), _planned_params(model, {**sizes, key: floor})
    if low > target:
        sizes[key] = floor
        return False
    per_unit = (high - low) // (cur - floor)
    value = min(cur, floor + (target - low) // max(per_unit, 1))
    if value - value % step >= floor:
        value -= value % step
    while value > floor and _planned_params(model, {**sizes, key: value}) > target:
        value -= 1
    sizes[key] = value
    return True


def fit_params(model: nn.Module, sizes: Mapping[str, int], target: int, fixed: Iterable[str] = ()) -> dict[str, int]:
    """MLP first (not below the hidden size, multiple of 8), then depth; sizes named in ``fixed`` never move."""
    sizes, fixed = dict(sizes), set(fixed)
    if _planned_params(model, sizes) <= target:
        return sizes
    if "mlp" not in fixed and _shrink(model, sizes, "mlp", min(sizes["mlp"], sizes["hidden"]), target, 8):
        return sizes
    if "layers" not in fixed and _shrink(model, sizes, "layers", 1, target, 1):
        return sizes
    raise ValueError(f"cannot reach {target} parameters by shrinking MLP then depth (got {sizes})")


# ----------------------------------------------------------------------------------------------------------------
# entry point


def prune(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    *,
    mlp: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    hidden: int | None = None,
    layers: int | None = None,
    target_params: int | None = None,
    importance: Importance | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune to the target sizes; returns ``(new_model, report)``. The input model is left untouched.

    ``importance`` may be passed (from :func:`collect_importance`) to reuse one calibration pass.
    """
    given = {"mlp": mlp, "heads": heads, "kv_heads": kv_heads, "hidden": hidden, "layers": layers}
    sizes = resolve_sizes(model.config, **given)
    if target_params is not None:
        sizes = fit_params(model, sizes, int(target_params), fixed=[k for k, v in given.items() if v is not None])
    if importance is None:
        if calibration is None:
            raise ValueError("pass calibration batches or a precomputed importance")
        importance = collect_importance(model, calibration)
    keep = select(importance, model.config, sizes)
    new = apply_keep(model, keep)
    report = {
        "sizes_before": current_sizes(model.config),
        "sizes_after": current_sizes(new.config),
        "params_before": count_params(model),
        "params_after": count_params(new),
        "target_params": target_params,
        "kept": {  # per-layer lists follow the NEW layer order (kept original layers ascending)
            "layers": keep.layers,
            "hidden": keep.hidden,
            "mlp": [keep.mlp[i] for i in keep.layers],
            "q_heads": [keep.q_heads[i] for i in keep.layers],
            "kv_heads": [keep.kv_heads[i] for i in keep.layers],
        },
        "importance": importance.as_lists(),
    }
    return new, report
