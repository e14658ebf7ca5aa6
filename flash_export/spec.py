"""Model options shared by every command: how to rebuild the exact model an artifact came from."""

import dataclasses
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from flash_export.attention import FlashAttention
from flash_export.errors import ModelError, summary


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model exactly.

    Without `weights`, parameters come from `torch.manual_seed(seed)` right before the model is
    built, so the same spec always gives the same model.

    Attributes:
        embed: embedding size E (default: the original README's 128).
        heads: number of heads H (default 8).
        chunk: keys per online-softmax step (default 64).
        causal: bottom-right aligned causal attention.
        seed: seed of the parameter initialisation when `weights` is None.
        model: optional "FILE.py:FACTORY"; FACTORY(embed_size=, heads=, chunk_size=, causal=)
            returns a module whose forward is (values, keys, queries, mask=None) -> (B, Lq, E).
        weights: optional state-dict checkpoint, loaded with weights_only=True and strict=True.
    """

    embed: int = 128
    heads: int = 8
    chunk: int = 64
    causal: bool = False
    seed: int = 0
    model: Optional[str] = None
    weights: Optional[str] = None

    def to_json(self) -> str:
        """Serialise for artifact metadata."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        """Inverse of `to_json`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a model spec is a JSON object, got {type(data).__name__}")
        spec = cls(**{k: v for k, v in data.items() if k in fields})
        for name, kind in (("embed", int), ("heads", int), ("chunk", int), ("seed", int),
                           ("causal", bool)):
            value = getattr(spec, name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"model spec field {name!r} must be {kind.__name__}, "
                                 f"got {value!r}")
        for name in ("model", "weights"):
            if getattr(spec, name) is not None and not isinstance(getattr(spec, name), str):
                raise ValueError(f"model spec field {name!r} must be a string or null")
        return spec

    def build(self) -> nn.Module:
        """Build the model in eval mode (float32, CPU).

        Raises:
            ModelError: the factory cannot be loaded or fails, or the weights do not fit.
        """
        factory = _load_factory(self.model) if self.model else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            try:
                if factory is None:
                    model = FlashAttention(self.embed, self.heads, self.chunk, causal=self.causal)
                else:
                    model = factory(embed_size=self.embed, heads=self.heads,
                                    chunk_size=self.chunk, causal=self.causal)
            except Exception as exc:  # a user factory may fail in any way; report one line
                raise ModelError(f"cannot build the model: {summary(exc)}") from exc
        if not isinstance(model, nn.Module):
            raise ModelError(f"{self.model} returned {type(model).__name__}, not an nn.Module")
        if self.weights:
            _load_weights(model, Path(self.weights))
        return model.eval()


def _load_factory(spec: str) -> Callable[..., Any]:
    file, sep, name = spec.rpartition(":")
    if not sep or not file or not name:
        raise ModelError(f"--model must look like FILE.py:FACTORY, got {spec!r}")
    path = Path(file)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    module_name = f"_flash_export_model_{abs(hash(path.resolve()))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ModelError(f"cannot import {path}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # the user's file may fail in any way; report it in one line
        raise ModelError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelError(f"{path} has no callable {name!r}")
    return factory


def _load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        state: Dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or unsafe file
        raise ModelError(f"cannot load weights from {path}: {exc}".splitlines()[0]) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds a {type(state).__name__}, expected a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())
        raise ModelError(f"weights in {path} do not fit the model: {first}") from exc
