"""How a PyTorch model meets its IOSpec: which inputs it takes, example tensors, calls, outputs.

A model's IOSpec comes from, in order: the caller (`io=`), the model itself (an `io_spec()`
method, as the zoo's models have), example inputs (`args=`/`kwargs=`, as `torch.export` takes
them), or the attention contract for a FlashAttention or a model whose forward is
(values, keys, queries, mask=None).
"""

import inspect
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from flash_export.core.errors import ExportError
from flash_export.core.feeds import make_feed
from flash_export.core.io_spec import Constant, Dim, IOSpec, TensorSpec, attention_io
from flash_export.nn.attention import FlashAttention, ReferenceAttention
from flash_export.nn.conversion import no_flash_attention
from flash_export.nn.swap import replace_attention

_TORCH_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.float64: "float64",
                torch.int64: "int64", torch.int32: "int32", torch.bool: "bool"}
# Example sizes for tracing: distinct and >= 2, so no dim is specialised or merged with another.
_NAMED_SIZES = {"batch": 2, "q_len": 17, "seq": 17, "k_len": 23}
_OTHER_SIZES = (19, 29, 31, 37, 41, 43, 47)
CONTRACT_INPUTS = ("values", "keys", "queries")


def forward_parameters(model: nn.Module) -> List[str]:
    """The names of `model.forward`'s parameters, in order (no *args/**kwargs)."""
    params = inspect.signature(model.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                 p.KEYWORD_ONLY)]


def follows_attention_contract(model: nn.Module) -> bool:
    """Whether `model.forward` is (values, keys, queries, mask=None), the original module's."""
    return isinstance(model, FlashAttention) \
        or tuple(forward_parameters(model)[:3]) == CONTRACT_INPUTS


def resolve_io(model: nn.Module, *, io: Optional[IOSpec] = None,
               args: Optional[Sequence[Any]] = None, kwargs: Optional[Mapping[str, Any]] = None,
               mask: bool = False) -> IOSpec:
    """The IOSpec to export `model` with (see the module docstring for the order).

    Raises:
        ExportError: no way to know the inputs, or example inputs that do not fit the forward.
    """
    if io is not None:
        return io
    declared = getattr(model, "io_spec", None)
    if callable(declared):
        spec = declared()
        if not isinstance(spec, IOSpec):
            raise ExportError(f"{type(model).__name__}.io_spec() returned "
                              f"{type(spec).__name__}, not an IOSpec")
        return spec
    if args is not None or kwargs is not None:
        return derive_io(model, args or (), kwargs or {})
    if follows_attention_contract(model):
        layers = [m for m in model.modules() if isinstance(m, FlashAttention)]
        if not layers:
            raise ExportError(no_flash_attention(model))
        return attention_io(layers[0].embed_size, mask=mask)
    takes = ", ".join(forward_parameters(model))
    raise ExportError(f"{type(model).__name__}.forward takes ({takes}): pass example inputs "
                      "(args=/kwargs=) or io=, or give the model an io_spec() method")


# long: one rule in order of strength (padding mask, batch_first, contract), with its docstring
def derive_io(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> IOSpec:
    """An IOSpec from example inputs: names from the forward signature, dims declared by rule.

    The batch and sequence sizes come from what the model declares, strongest first: a padding
    mask (a bool (batch, seq) input named ``*padding*`` or ``attention_mask``, PyTorch's and
    Hugging Face's layouts), or the model's own layout applied to its first 3-D float input:
    ``batch_first`` (an attribute of the model, as `nn.MultiheadAttention` and `nn.Transformer`
    have; that of the attention layers of an `nn.TransformerEncoder`/`Decoder` or of one such
    layer), or the attention contract ((batch, len, E) for a FlashAttention). Every dim of that
    batch or sequence size is then "batch" or "seq", and the spec declares "batch" the
    per-request batch (`IOSpec.batch`).

    Otherwise nothing says which dim holds independent requests, and derive_io does not guess:
    dim 0 of every input is still a dynamic size "batch" and dim 1 of a rank-2 or rank-3 input
    "seq" (token ids, (B, L, E) features), so the export stays dynamic, but no batch is
    declared and a server runs each request alone. Give the model a ``batch_first`` attribute,
    a padding mask, an io_spec() or pass io= to declare one.

    Every other dim is static. A padding mask is True = padding when its name says key_padding
    (PyTorch's convention), else True = a real token; a square causal mask (True or -inf above
    the diagonal) stays one at every size. Scalar arguments (`is_causal=True`) are constants of
    the graph. Integer inputs take values in [0, n) with n the first nn.Embedding's size, else
    up to the example's largest value. Models that need other dims (images, say) declare an
    io_spec() or pass io=.

    Raises:
        ExportError: the examples do not bind to the forward, or one is not a tensor.
    """
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise ExportError(f"example inputs do not match {type(model).__name__}.forward"
                          f"({', '.join(forward_parameters(model))}): {exc}") from exc
    embeddings = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    tensors: Dict[str, Tensor] = {}
    constants: Dict[str, Constant] = {}
    for name, value in bound.arguments.items():
        if value is None:
            continue
        if isinstance(value, (bool, int, float, str)):
            constants[name] = value  # baked into the graph, passed again to PyTorch calls
            continue
        if not isinstance(value, Tensor) or value.dtype not in _TORCH_NAMES:
            what = f"tensor of {value.dtype}" if isinstance(value, Tensor) else \
                type(value).__name__
            raise ExportError(f"example input {name!r} is a {what}; inputs must be tensors of "
                              f"{sorted(_TORCH_NAMES.values())}")
        tensors[name] = value
    # A (batch, seq) padding mask, the model's declared layout or a (seq, seq) causal mask says
    # which sizes are the batch and the sequence; other inputs' dims of those sizes are named
    # alike (so seq-first layouts come out right).
    pads = [t for t in tensors.values()
            if t.dtype == torch.bool and t.dim() == 2 and not _is_causal_mask(t)]
    causal = [t for t in tensors.values() if _is_causal_mask(t)]
    declared_pads = [t for n, t in tensors.items() if _names_a_padding_mask(n) and
                     any(t is p for p in pads)]
    features = [t for t in tensors.values() if t.is_floating_point() and t.dim() == 3]
    batch_first = declared_batch_first(model)
    seq_size = batch_size = None
    if declared_pads:
        batch_size, seq_size = (int(n) for n in declared_pads[0].shape)
    elif batch_first is not None and features:
        batch_size = int(features[0].shape[0 if batch_first else 1])
        seq_size = int(features[0].shape[1 if batch_first else 0])
    declared = batch_size is not None
    if not declared:  # the old rules, which name dims but declare no batch
        seq_size = int(pads[0].shape[1]) if pads else int(causal[0].shape[0]) if causal else None
        batch_size = int(pads[0].shape[0]) if pads else None
    if seq_size is not None and seq_size == batch_size:
        seq_size = batch_size = None  # ambiguous: fall back to the positional rule
        declared = False
    inputs = []
    for name, value in tensors.items():
        dims = _name_dims(value, seq_size, batch_size)
        dtype = _TORCH_NAMES[value.dtype]
        low = high = None
        if dtype in ("int64", "int32"):
            low = min(0, int(value.min())) if value.numel() else 0
            seen = int(value.max()) + 1 if value.numel() else 1
            high = embeddings[0] if embeddings and embeddings[0] >= seen else seen
        role = "data"
        if _is_causal_mask(value):
            role = "causal"
        elif dtype == "bool" and value.dim() == 2:  # PyTorch's key_padding_mask: True = padding
            role = "key_padding" if "key_padding" in name else "padding"
        inputs.append(TensorSpec(name, dtype, dims, low, high, role))
    if not inputs:
        raise ExportError("the example inputs hold no tensor")
    sizes: Dict[str, Tuple[int, Optional[int]]] = {
        d: (1, None) for t in inputs for d in t.dims if isinstance(d, str)}
    batch = "batch" if declared and "batch" in sizes else None
    return IOSpec(tuple(inputs), ("output",), sizes, constants, batch=batch)


def declared_batch_first(model: nn.Module) -> Optional[bool]:
    """Whether `model` takes (batch, len, E) features (True) or (len, batch, E) (False).

    From what the model itself declares: a bool ``batch_first`` attribute (nn.MultiheadAttention,
    nn.Transformer, a converted FlashMultiheadAttention, or a module of yours that sets one); the
    attention layers of an nn.TransformerEncoder/Decoder or of one of their layers; the attention
    contract. None when it declares nothing (its forward may lay its inputs out any way).
    """
    flag = getattr(model, "batch_first", None)
    if isinstance(flag, bool):
        return flag
    if isinstance(model, FlashAttention):
        return True
    layers: List[Any] = []
    if isinstance(model, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        layers = [model]
    elif isinstance(model, (nn.TransformerEncoder, nn.TransformerDecoder)):
        layers = list(model.layers)
    flags = {getattr(getattr(layer, "self_attn", None), "batch_first", None) for layer in layers}
    if len(flags) == 1:
        (only,) = flags
        if isinstance(only, bool):
            return only
    return None


def _names_a_padding_mask(name: str) -> bool:
    """Whether a bool (batch, seq) input's name declares a padding mask's layout."""
    return "padding" in name or name == "attention_mask"


def _name_dims(value: Tensor, seq_size: Optional[int],
               batch_size: Optional[int]) -> Tuple[Dim, ...]:
    """Name the batch and sequence dims of one example input (see `derive_io`)."""
    shape = [int(n) for n in value.shape]
    if seq_size is None:
        return tuple("batch" if axis == 0 else "seq" if axis == 1 and value.dim() in (2, 3)
                     else n for axis, n in enumerate(shape))
    named: List[Dim] = ["seq" if n == seq_size else n for n in shape]
    if batch_size is not None:
        return tuple("batch" if n == batch_size else d for n, d in zip(shape, named))
    for axis in range(min(2, len(shape))):  # the batch: the first leading dim that is not seq
        if named[axis] != "seq" and not _is_causal_mask(value):
            named[axis] = "batch"
            break
    return tuple(named)


def _is_causal_mask(value: Tensor) -> bool:
    """Whether `value` is a square causal mask in PyTorch's convention.

    True or -inf above the diagonal, as `nn.Transformer.generate_square_subsequent_mask` makes.
    """
    if value.dim() != 2 or value.shape[0] != value.shape[1] or value.shape[0] < 2:
        return False
    above = torch.ones(value.shape, dtype=torch.bool).triu(1)
    if value.dtype == torch.bool:
        return bool(torch.equal(value, above))
    if not value.is_floating_point():
        return False
    return bool(torch.equal(torch.isneginf(value), above) and (value[~above] == 0).all())


def example_inputs(io: IOSpec, *, seed: int = 0) -> Dict[str, Tensor]:
    """Tensors for every input of `io` at distinct sizes >= 2 (what the exporters trace with)."""
    others = iter(_OTHER_SIZES * 4)
    sizes = io.clamp({name: _NAMED_SIZES.get(name) or next(others) for name in io.dynamic})
    return {name: torch.from_numpy(array) for name, array in make_feed(io, sizes, seed).items()}


def flatten(outputs: Any) -> List[Tensor]:
    """A model's outputs as a list: a tensor, a tuple/list of tensors, or a dict of them."""
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [v for v in outputs.values()]
    if isinstance(outputs, (tuple, list)):
        return list(outputs)
    raise ExportError(f"the model returned a {type(outputs).__name__}; expected a tensor, a "
                      "tuple of tensors or a dict of them")


def output_names(outputs: Any) -> Tuple[str, ...]:
    """Graph output names for what a model returned: "output", output_0.., or the dict's keys."""
    if isinstance(outputs, Tensor):
        return ("output",)
    if isinstance(outputs, dict):
        return tuple(str(k) for k in outputs)
    return tuple(f"output_{i}" for i in range(len(flatten(outputs))))


def call(model: Any, inputs: Mapping[str, Any]) -> List[Tensor]:
    """Run `model` on named inputs (and constants), no grad; its outputs as a list."""
    with torch.no_grad():
        return flatten(model(**inputs))


def reference_model(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A copy of `model` with every FlashAttention as plain attention, in `dtype`."""
    return replace_attention(model, ReferenceAttention).to(dtype).eval()


def reference_outputs(model: nn.Module, inputs: Mapping[str, Tensor],
                      dtype: torch.dtype = torch.float64) -> List[Tensor]:
    """`model` with every FlashAttention as plain attention, in `dtype` (float inputs cast)."""
    cast = {n: t.to(dtype) if t.is_floating_point() else t for n, t in inputs.items()}
    return call(reference_model(model, dtype), cast)


def dynamic_shapes(io: IOSpec) -> Dict[str, Dict[int, Any]]:
    """`torch.export` dynamic shapes: one Dim per size name, shared by every input using it."""
    dims = {}
    for name in io.dynamic:
        high = io.sizes[name][1]
        dims[name] = torch.export.Dim(name) if high is None else torch.export.Dim(name, max=high)
    return {t.name: {axis: dims[d] for axis, d in enumerate(t.dims) if isinstance(d, str)}
            for t in io.inputs}


def attention_calls(model: nn.Module, inputs: Mapping[str, Any]) -> List[Tuple[int, ...]]:
    """(B, Lq, Lk, E, H) of every FlashAttention call one forward of `model` makes.

    What a model's attention costs at given inputs (a ViT's token count is not an input size,
    say), measured with forward pre-hooks on its FlashAttention layers.
    """
    calls: List[Tuple[int, ...]] = []

    def record(layer: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        bound = dict(zip(CONTRACT_INPUTS, args), **kwargs)
        values, queries = bound["values"], bound["queries"]  # (B, Lk, E), (B, Lq, E)
        calls.append((int(queries.shape[0]), int(queries.shape[1]), int(values.shape[1]),
                      int(layer.embed_size), int(layer.heads)))

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()
             if isinstance(m, FlashAttention)]
    try:
        call(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return calls
