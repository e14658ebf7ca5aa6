"""nn.MultiheadAttention -> FlashAttention for whole models.

`convert(model)` returns a copy of `model` in which every `torch.nn.MultiheadAttention` (MHA) is
a `FlashMultiheadAttention`: MHA's call signature and results, computed by a `FlashAttention`
that holds MHA's weights. The reference semantics are those of
`torch.nn.functional.multi_head_attention_forward` (MHA's documented path, which PyTorch also
takes whenever its fused fast path declines), with `need_weights=False`.

What cannot be matched is refused with `ConversionError` naming the module: at conversion time
kdim/vdim != embed_dim, add_bias_kv, add_zero_attn and subclasses of MHA; at call time
`need_weights=True`, float masks holding values other than 0 and -inf, and dropout in training.
"""

import copy
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from flash_export.core.errors import ConversionError
from flash_export.nn.attention import FlashAttention


def _recording() -> bool:
    """Whether torch.export, torch.compile or torch.jit.trace is recording a graph.

    Such a graph cannot branch on a tensor's values (export refuses, trace freezes the branch);
    scripted code can, at call time.
    """
    if torch.jit.is_scripting():
        return False
    else:
        return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _check_mask_dtype(mask: Optional[Tensor], name: str) -> None:
    # MHA's own check and message (F._canonical_mask).
    if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")


def _may_attend(mask: Tensor, name: str, where: str) -> Tuple[Tensor, Optional[Tensor]]:
    """An MHA mask (True or -inf = blocked) as bool, True = may attend; and its refused entries.

    MHA adds a float mask to the logits; FlashAttention only decides visibility. A float mask
    whose entries are all 0 or -inf is a boolean mask (nn.Transformer* layers turn every bool mask
    into one with F._canonical_mask before calling MHA; generate_square_subsequent_mask returns
    one), any other value is refused. Eager and scripted calls raise; while a graph is recorded
    the values cannot be read, so the refused entries come back (else None) for the caller to make
    the rows they reach NaN: never a finite wrong answer.

    Args:
        mask: bool or float, any shape.
        name: the argument's name, for the message.
        where: the module, for the message.

    Returns:
        (bool tensor shaped like `mask`, optional bool tensor shaped like `mask`).
    """
    if mask.dtype == torch.bool:
        return torch.logical_not(mask), None
    attend = mask == 0
    refused = torch.logical_not(attend | (mask == -math.inf))
    if _recording():
        return attend, refused
    if bool(refused.any()):
        raise ConversionError(
            f"{where}: {name} is an additive float mask with values other than 0 and -inf; "
            "FlashAttention can only block keys: pass a bool mask (True = blocked) or a float "
            "mask of 0 and -inf")
    return attend, None


class FlashMultiheadAttention(nn.Module):
    """nn.MultiheadAttention's interface and results, computed by a FlashAttention.

    Built by `convert` or `from_multihead_attention`. Calls follow MHA's
    `forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
    is_causal)` and return `(output, None)`; MHA's own input errors are raised with MHA's types
    and messages. Differences, each raising `ConversionError` rather than computing something
    else:

    - `need_weights=True` (MHA's default): FlashAttention never forms the weights. Pass
      `need_weights=False`, as every nn.Transformer* layer does.
    - a float mask holding values other than 0 and -inf (see `_may_attend`).
    - training mode with `dropout > 0`: attention dropout is not implemented (eval mode, or
      dropout 0, is exact).

    `is_causal` is MHA's hint: it needs `attn_mask`; without a `key_padding_mask` the mask is then
    ignored and keys j > i are blocked for query i (top-left aligned, as scaled_dot_product_
    attention does), with one the mask is applied and the hint unused. A query that sees no key
    (a fully padded sequence) gives zeros before the output projection, as MHA's documented path
    does on CPU (PyTorch's fused paths differ: NaN from a bare MHA, zeros at every padded position
    from nn.TransformerEncoder's nested tensors).

    Args:
        attention: the FlashAttention holding the q/k/v/output projections.
        batch_first: as MHA's: (B, L, E) inputs when True, else (L, B, E).
        dropout: MHA's attention dropout probability.
        path: where the module sits in the converted model, for messages.
    """

    embed_dim: torch.jit.Final[int]
    num_heads: torch.jit.Final[int]
    head_dim: torch.jit.Final[int]
    kdim: torch.jit.Final[int]
    vdim: torch.jit.Final[int]
    batch_first: torch.jit.Final[bool]
    dropout: torch.jit.Final[float]
    where: torch.jit.Final[str]
    _qkv_same_embed_dim: torch.jit.Final[bool]

    def __init__(self, attention: FlashAttention, *, batch_first: bool = False,
                 dropout: float = 0.0, path: str = "") -> None:
        super().__init__()
        self.attention = attention
        self.embed_dim = attention.embed_size
        self.num_heads = attention.heads
        self.head_dim = attention.head_dim
        self.kdim = self.vdim = attention.embed_size
        self._qkv_same_embed_dim = True
        self.batch_first = batch_first
        self.dropout = dropout
        self.where = f"converted nn.MultiheadAttention {path!r}" if path else \
            "converted nn.MultiheadAttention"
        # nn.TransformerEncoderLayer's fast path reads these MHA attributes and, when they hold
        # tensors, runs PyTorch's fused layer on them instead of calling this module. There is no
        # packed in-projection here: None makes that check decline ("bias=False") every time.
        self.in_proj_weight = None
        self.in_proj_bias = None

    def extra_repr(self) -> str:  # noqa: D102
        return f"batch_first={self.batch_first}, dropout={self.dropout}"

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention, chunk_size: int = 64,
                                 path: str = "") -> "FlashMultiheadAttention":
        """A FlashMultiheadAttention with `mha`'s weights, configuration and training mode.

        Raises:
            ConversionError: `mha` subclasses nn.MultiheadAttention, has kdim/vdim different
                from embed_dim, add_bias_kv or add_zero_attn.
        """
        _check_convertible(mha, path)
        fa = FlashAttention.from_multihead_attention(mha, chunk_size)
        new = cls(fa, batch_first=mha.batch_first, dropout=mha.dropout, path=path)
        return new.train(mha.training)

    # long: nn.MultiheadAttention's forward contract, each argument checked and mapped in order
    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """Attention as nn.MultiheadAttention computes it, with need_weights=False.

        Args:
            query: (B, Lq, E) if batch_first else (Lq, B, E), or unbatched (Lq, E); float.
            key: (B, Lk, E) / (Lk, B, E) / (Lk, E), same dtype as `query`.
            value: same shape and dtype as `key`.
            key_padding_mask: optional (B, Lk), or (Lk,) unbatched; bool (True = ignore the
                key) or float of 0 and -inf.
            need_weights: must be False (see the class docstring).
            attn_mask: optional (Lq, Lk) or (B * heads, Lq, Lk); bool (True = blocked) or float
                of 0 and -inf.
            average_attn_weights: unused (it only shapes the weights).
            is_causal: MHA's causal hint; requires `attn_mask`.

        Returns:
            (output shaped like `query`, None).
        """
        if need_weights:
            raise ConversionError(
                f"{self.where}: need_weights=True asks for the attention weights, which "
                "FlashAttention never forms; call it with need_weights=False")
        if self.training and self.dropout > 0.0:
            raise ConversionError(
                f"{self.where}: attention dropout {self.dropout} in training mode cannot be "
                "matched; call .eval() on the converted model")
        if query.is_nested or key.is_nested or value.is_nested:
            raise ConversionError(f"{self.where}: nested tensors are not supported")
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        _check_mask_dtype(attn_mask, "attn_mask")
        batched = self._check_ranks(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None:
            attn_mask = None  # MHA drops it and applies the causal rule instead
        else:
            is_causal = False
        if query.size(-1) != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but "
                                 f"got {query.size(-1)}")
        if key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape "
                                 f"{value.shape}")
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # From here on (B, L, E).
        bsz, tgt_len, src_len = query.size(0), query.size(1), key.size(1)
        self._check_mask_shapes(key_padding_mask, attn_mask, bsz, tgt_len, src_len)
        allowed: Optional[Tensor] = None  # bool, broadcastable to (B, H, Lq, Lk)
        refused: Optional[Tensor] = None  # float-mask entries refused while recording a graph
        if key_padding_mask is not None:
            ok, bad = _may_attend(key_padding_mask, "key_padding_mask", self.where)
            allowed = ok.reshape(bsz, 1, 1, src_len)  # (B, 1, 1, Lk)
            if bad is not None:
                refused = bad.reshape(bsz, 1, 1, src_len)
        if attn_mask is not None:
            shape: List[int] = [1, 1, tgt_len, src_len]
            if attn_mask.dim() == 3:
                shape = [bsz, self.num_heads, tgt_len, src_len]
            ok, bad = _may_attend(attn_mask, "attn_mask", self.where)
            ok = ok.reshape(shape)  # (1, 1, Lq, Lk) or (B, H, Lq, Lk)
            allowed = ok if allowed is None else allowed & ok
            if bad is not None:
                bad = bad.reshape(shape)
                refused = bad if refused is None else refused | bad
        if is_causal:
            # scaled_dot_product_attention's rule, top-left aligned: query i sees keys j <= i.
            # (FlashAttention's own `causal` is bottom-right aligned; they agree when Lq == Lk.)
            rows = torch.arange(tgt_len, device=query.device).unsqueeze(1)  # (Lq, 1)
            cols = torch.arange(src_len, device=query.device).unsqueeze(0)  # (1, Lk)
            allowed = (cols <= rows).reshape(1, 1, tgt_len, src_len)
        out = self.attention(value, key, query, allowed)  # (B, Lq, E)
        if refused is not None:
            rows_refused = refused.any(dim=-1).any(dim=1).unsqueeze(-1)  # (B|1, Lq|1, 1)
            out = out.masked_fill(rows_refused, math.nan)
        if not batched:
            out = out.squeeze(0)  # (Lq, E)
        elif not self.batch_first:
            out = out.transpose(0, 1)  # (Lq, B, E)
        return out, None

    def _check_ranks(self, query: Tensor, key: Tensor, value: Tensor,
                     key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor]) -> bool:
        """MHA's rank checks (F._mha_shape_check) with its messages; True when batched."""
        rank = query.dim()
        if rank != 2 and rank != 3:
            raise AssertionError("query should be unbatched 2D or batched 3D tensor but received "
                                 f"{rank}-D query tensor")
        kind = "batched (3-D)" if rank == 3 else "unbatched (2-D)"
        if key.dim() != rank or value.dim() != rank:
            raise AssertionError(
                f"For {kind} `query`, expected `key` and `value` to be {rank}-D but found "
                f"{key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != rank - 1:
            raise AssertionError(
                f"For {kind} `query`, expected `key_padding_mask` to be `None` or {rank - 1}-D "
                f"but found {key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None and attn_mask.dim() != 2 and attn_mask.dim() != 3:
            raise AssertionError(
                f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found "
                f"{attn_mask.dim()}-D tensor instead")
        if rank == 2 and attn_mask is not None and attn_mask.dim() == 3 and (
                attn_mask.size(0) != self.num_heads or attn_mask.size(1) != query.size(0)
                or attn_mask.size(2) != key.size(0)):
            raise AssertionError(
                f"Expected `attn_mask` shape to be ({self.num_heads}, {query.size(0)}, "
                f"{key.size(0)}) but got {attn_mask.shape}")
        return rank == 3

    def _check_mask_shapes(self, key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
                           bsz: int, tgt_len: int, src_len: int) -> None:
        """MHA's mask shape checks (F.multi_head_attention_forward) with its messages."""
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.size(0) != tgt_len or attn_mask.size(1) != src_len:
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but "
                                       f"should be ({tgt_len}, {src_len}).")
            elif (attn_mask.size(0) != bsz * self.num_heads or attn_mask.size(1) != tgt_len
                  or attn_mask.size(2) != src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but "
                                   f"should be ({bsz * self.num_heads}, {tgt_len}, {src_len}).")
        if key_padding_mask is not None:
            if key_padding_mask.size(0) != bsz:
                raise AssertionError(f"Expected key_padded_mask.shape[0] to be {bsz}, but got "
                                     f"{key_padding_mask.size(0)}")
            if key_padding_mask.size(1) != src_len:
                raise AssertionError(f"Expected key_padded_mask.shape[1] to be {src_len}, but "
                                     f"got {key_padding_mask.size(1)}")


def _check_convertible(mha: nn.MultiheadAttention, path: str) -> None:
    """Raise ConversionError, naming the module, for an MHA that FlashAttention cannot match."""
    where = f"nn.MultiheadAttention {path!r}" if path else "nn.MultiheadAttention"
    if type(mha) is not nn.MultiheadAttention:
        raise ConversionError(f"{where} is a {type(mha).__qualname__}, a subclass whose forward "
                              "may differ from nn.MultiheadAttention's: not converted")
    if not mha._qkv_same_embed_dim:
        raise ConversionError(f"{where} has kdim={mha.kdim}, vdim={mha.vdim} and embed_dim="
                              f"{mha.embed_dim}: FlashAttention's projections take keys and "
                              "values of size embed_dim")
    if mha.bias_k is not None:
        raise ConversionError(f"{where} has add_bias_kv=True (a learned key and value appended "
                              "after the projections): FlashAttention has no equivalent")
    if mha.add_zero_attn:
        raise ConversionError(f"{where} has add_zero_attn=True (a zero key and value appended "
                              "after the projections): FlashAttention has no equivalent")


def no_flash_attention(model: nn.Module) -> str:
    """The error for a model with no FlashAttention layer, naming the fix when there is one.

    A model built on nn.MultiheadAttention (nn.Transformer*, say) is one `convert` away.
    """
    found = [name or type(model).__name__ for name, m in model.named_modules()
             if isinstance(m, nn.MultiheadAttention)]
    text = f"{type(model).__name__} contains no FlashAttention layer"
    if found:
        text += (f"; it has {len(found)} nn.MultiheadAttention ({found[0]}"
                 f"{', ...' if len(found) > 1 else ''}): convert it first, "
                 "model = flash_export.convert(model) (in a --model factory: return "
                 "convert(model))")
    return text


def convert(model: nn.Module, *, chunk_size: int = 64) -> nn.Module:
    """A copy of `model` whose nn.MultiheadAttention modules compute with FlashAttention.

    Each `torch.nn.MultiheadAttention` becomes a `FlashMultiheadAttention` with the same weights,
    configuration and training mode; a module shared by several parents stays shared. The copy's
    nn.TransformerEncoder modules stop packing padded batches into nested tensors (PyTorch's
    fused layers, which the converted modules opt out of, are the only consumers). `model` is
    never modified. A model holding FlashAttention but no nn.MultiheadAttention comes back as a
    plain copy.

    Args:
        model: any nn.Module; an nn.MultiheadAttention itself is converted too.
        chunk_size: keys per online-softmax step of every FlashAttention (>= 1).

    Returns:
        The converted copy.

    Raises:
        ConversionError: `model` is not an eager nn.Module, holds neither nn.MultiheadAttention
            nor FlashAttention, or holds an nn.MultiheadAttention that cannot be matched (see
            `FlashMultiheadAttention.from_multihead_attention`); the message names its path.
        ValueError: `chunk_size` is not an integer >= 1.
    """
    if not isinstance(model, nn.Module):
        raise ConversionError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise ConversionError(f"{type(model).__name__} is a TorchScript module: convert the eager "
                              "model, then script the result")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if isinstance(model, nn.MultiheadAttention):
        return FlashMultiheadAttention.from_multihead_attention(model, chunk_size)
    attentions = [(path, m) for path, m in model.named_modules(remove_duplicate=False)
                  if isinstance(m, nn.MultiheadAttention)]
    if not attentions and not any(isinstance(m, FlashAttention) for m in model.modules()):
        raise ConversionError(f"nothing to convert: {type(model).__name__} holds no "
                              "nn.MultiheadAttention and no FlashAttention")
    for path, mha in attentions:  # refuse before copying anything
        _check_convertible(mha, path)
    replacements: Dict[int, FlashMultiheadAttention] = {}  # id of an original -> its stand-in
    for path, mha in attentions:  # a module shared by several parents is listed once per parent
        if id(mha) not in replacements:
            replacements[id(mha)] = FlashMultiheadAttention.from_multihead_attention(
                mha, chunk_size, path)
    new = copy.deepcopy(model)
    for path, mha in attentions:
        parent, _, name = path.rpartition(".")
        setattr(new.get_submodule(parent), name, replacements[id(mha)])
    for m in new.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
    return new
