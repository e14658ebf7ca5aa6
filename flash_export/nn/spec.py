"""Model options shared by every command: how to rebuild the exact model an artifact came from.

torch is imported only to build a model, so a spec can be parsed, checked and refused before the
heavy imports (the CLI checks its options this way).
"""

import dataclasses
import difflib
import importlib.util
import json
import os
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional

from flash_export.artifacts.files import sha256_file
from flash_export.core.errors import ArtifactError, FlashExportError, ModelError, summary

if TYPE_CHECKING:
    from torch import nn

# torch.manual_seed accepts exactly this range.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model exactly.

    Without `weights`, parameters come from `torch.manual_seed(seed)` right before the model is
    built, so the same spec always gives the same model.

    Attributes:
        embed: embedding size E (default: the original README's 128).
        heads: number of heads H, dividing E (default 8).
        chunk: keys per online-softmax step (default 64).
        causal: bottom-right aligned causal attention.
        seed: seed of the parameter initialisation when `weights` is None, in [-2^63, 2^64).
        model: optional "FILE.py:FACTORY" or "MODULE:FACTORY" (such as
            "flash_export.models.gpt:build"); FACTORY(embed_size=, heads=, chunk_size=, causal=)
            returns a module built with FlashAttention. Importing FILE or MODULE runs its code.
        weights: optional state-dict checkpoint, loaded with weights_only=True and strict=True.
        model_sha256: the SHA-256 the model file had at export (see `pinned`); building refuses
            a file that changed since. None: not checked.
        weights_sha256: the same for the checkpoint.

    Raises:
        ValueError: a field of the wrong type or out of range, naming it.
    """

    embed: int = 128
    heads: int = 8
    chunk: int = 64
    causal: bool = False
    seed: int = 0
    model: Optional[str] = None
    weights: Optional[str] = None
    model_sha256: Optional[str] = None
    weights_sha256: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("embed", "heads", "chunk", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be true or false, got {self.causal!r}")
        for name in ("model", "weights", "model_sha256", "weights_sha256"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string or null, got {getattr(self, name)!r}")
        for name in ("model_sha256", "weights_sha256"):
            digest = getattr(self, name)
            if digest is not None and not _SHA256.fullmatch(digest):
                raise ValueError(f"{name} must be 64 lowercase hex digits, got {digest!r}")
        for name in ("embed", "heads", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embed % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide embed ({self.embed})")
        if not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")

    def to_json(self) -> str:
        """Serialise for artifact metadata."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        """Inverse of `to_json`.

        Raises:
            ValueError: not a JSON object, or a field of the wrong type or out of range.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a model spec is a JSON object, got {type(data).__name__}")
        return cls(**{k: v for k, v in data.items() if k in fields})

    def pinned(self) -> "ModelSpec":
        """This spec as an artifact records it: file paths absolute, with their SHA-256.

        A path typed relative to the export's folder would not resolve from another folder,
        and a hash tells a changed file from the one the artifact came from.

        Raises:
            ModelError: the model file or checkpoint is missing.
        """
        model, model_sha = self.model, self.model_sha256
        file, name = _model_file(self.model) if self.model else (None, "")
        if file is not None:
            if not file.is_file():
                raise ModelError(f"model file not found: {file}")
            model, model_sha = f"{file.resolve()}:{name}", sha256_file(file)
        weights, weights_sha = self.weights, self.weights_sha256
        if self.weights:
            path = Path(self.weights)
            if not path.is_file():
                raise ModelError(f"weights file not found: {path}")
            weights, weights_sha = str(path.resolve()), sha256_file(path)
        return dataclasses.replace(self, model=model, model_sha256=model_sha, weights=weights,
                                   weights_sha256=weights_sha)

    @property
    def runs_code(self) -> bool:
        """Whether building this spec imports a model file or loads a checkpoint."""
        return self.model is not None or self.weights is not None

    def parameter_count(self) -> Optional[int]:
        """Parameters of the model this spec builds, when known without running a factory.

        A plain FlashAttention has four E x E projections with biases. A zoo model
        (`flash_export.models.*`, our own code) is built on PyTorch's meta device, which
        allocates nothing; any other factory is user code, counted only once it is built (None).
        """
        if self.model is None:
            return 4 * self.embed * self.embed + 4 * self.embed
        if not is_zoo_model(self.model):
            return None
        import torch

        factory = _load_factory(self.model)
        with torch.device("meta"):
            try:
                model = factory(embed_size=self.embed, heads=self.heads, chunk_size=self.chunk,
                                causal=self.causal)
            except Exception as exc:  # a zoo model refusing its options: say it in one line
                raise ModelError(f"cannot build the model: {summary(exc)}") from exc
        return sum(p.numel() for p in model.parameters())

    def build(self) -> "nn.Module":
        """Build the model in eval mode (float32, CPU).

        Raises:
            ModelError: the factory cannot be loaded or fails, or the weights do not fit.
        """
        import torch
        from torch import nn

        from flash_export.nn.attention import FlashAttention

        factory = _load_factory(self.model, self.model_sha256) if self.model else None
        with torch.random.fork_rng(devices=[]):
            try:
                torch.manual_seed(self.seed)
                if factory is None:
                    model = FlashAttention(self.embed, self.heads, self.chunk, causal=self.causal)
                else:
                    model = factory(embed_size=self.embed, heads=self.heads,
                                    chunk_size=self.chunk, causal=self.causal)
            except (Exception, SystemExit) as exc:  # a user factory may fail in any way
                raise ModelError(f"cannot build the model: {summary(exc)}") from exc
        if not isinstance(model, nn.Module):
            raise ModelError(f"{self.model} returned {type(model).__name__}, not an nn.Module")
        if self.weights:
            _load_weights(model, Path(self.weights), self.weights_sha256)
        return model.eval()


def resolve_spec(recorded: ModelSpec, explicit: Mapping[str, Any], *, trust: bool,
                 source: "os.PathLike[str] | str") -> ModelSpec:
    """The spec to rebuild: `recorded` (an artifact's) with the caller's `explicit` fields.

    An artifact is data: a model file or checkpoint it names is imported or loaded only when the
    user says so, by naming it again (`explicit`) or with `trust`. The zoo's models
    (`flash_export.models.NAME:build`) are flash-export's own code: a spec may name them.

    Raises:
        ArtifactError: the spec would import a model file or load weights named only by the
            artifact, without `trust`; the message says what to pass.
        ValueError: an explicit field of the wrong type or out of range.
    """
    explicit = dict(explicit)
    for name in ("model", "weights"):  # a file named again is the user's: its hash is not pinned
        if name in explicit:
            explicit[f"{name}_sha256"] = None
    spec = _located(dataclasses.replace(recorded, **explicit), set(explicit), Path(source).parent)
    named_by_artifact = [(f"--{name}", getattr(spec, name)) for name in ("model", "weights")
                         if getattr(spec, name) is not None and name not in explicit
                         and not (name == "model" and is_zoo_model(getattr(spec, name)))]
    if named_by_artifact and not trust:
        what = " and ".join(f"{flag} {value}" for flag, value in named_by_artifact)
        raise ArtifactError(f"{source} asks to rebuild its reference with {what}; flash-export "
                            "imports model files and loads checkpoints only when you name them: "
                            f"pass {what} yourself, or --trust to use what the artifact records")
    return spec


def _located(spec: ModelSpec, explicit: "set[str]", folder: Path) -> ModelSpec:
    """`spec` with each recorded file missing where recorded looked up beside the artifact.

    That finds a folder shipped whole; the recorded SHA-256 still decides whether a file is used.
    """
    model, weights = spec.model, spec.weights
    file, name = _model_file(model) if model and "model" not in explicit else (None, "")
    if file is not None and not file.is_file() and (folder / file.name).is_file():
        model = f"{folder / file.name}:{name}"
    if weights and "weights" not in explicit and not Path(weights).is_file() \
            and (folder / Path(weights).name).is_file():
        weights = str(folder / Path(weights).name)
    return dataclasses.replace(spec, model=model, weights=weights)


ZOO_PREFIX = "flash_export.models."


def is_zoo_model(model: Optional[str]) -> bool:
    """Whether `model` names a factory of the zoo shipped inside flash-export."""
    if not model:
        return False
    module, sep, name = model.rpartition(":")
    return bool(sep) and module.startswith(ZOO_PREFIX) and module.count(".") == 2 \
        and module.rpartition(".")[2].isidentifier() and name.isidentifier()


def _model_file(spec: str) -> "tuple[Optional[Path], str]":
    """(FILE, FACTORY) of "FILE.py:FACTORY"; (None, FACTORY) of "MODULE:FACTORY".

    Raises:
        ModelError: neither form.
    """
    file, sep, name = spec.rpartition(":")
    if not sep or not file or not name:
        raise ModelError(f"--model must look like FILE.py:FACTORY or MODULE:FACTORY, "
                         f"got {spec!r}")
    if not file.endswith(".py") and "/" not in file and "\\" not in file:
        return None, name
    return Path(file), name


def _check_pinned(path: Path, sha256: Optional[str], what: str) -> None:
    """Refuse a file whose bytes are not the ones an artifact recorded."""
    if sha256 is None:
        return
    found = sha256_file(path)
    if found != sha256:
        raise ModelError(f"{what} {path} is not the file the artifact was exported from "
                         f"(sha256 {found[:16]}..., recorded {sha256[:16]}...): pass the "
                         "right one, or name this one yourself")


def _load_factory(spec: str, sha256: Optional[str] = None) -> Callable[..., Any]:
    path, name = _model_file(spec)
    if path is None:
        return _module_factory(spec.rpartition(":")[0], name)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    _check_pinned(path, sha256, "model file")
    module_name = f"_flash_export_model_{abs(hash(path.resolve()))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ModelError(f"cannot import {path}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # the user's file may fail or exit in any way
        raise ModelError(f"importing {path} failed: {summary(exc)}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelError(f"{path} has no callable {name!r}")
    return factory


def _module_factory(module_name: str, name: str) -> Callable[..., Any]:
    """FACTORY from an importable module (`flash_export.models.gpt:build`, say)."""
    zoo = module_name.startswith(ZOO_PREFIX)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if zoo and exc.name == module_name:  # a misspelt zoo model: say what the zoo has
            # The zoo is one of the modules a spec may name, loaded by name like any other: the
            # one the failed import above already loaded, read for its listing.
            ZOO = importlib.import_module(ZOO_PREFIX.rstrip(".")).ZOO

            close = difflib.get_close_matches(module_name[len(ZOO_PREFIX):], ZOO, n=1)
            guess = f" (did you mean {ZOO_PREFIX}{close[0]}:build?)" if close else ""
            raise ModelError(f"{module_name} is not a model of the zoo{guess}; its models are "
                             f"{', '.join(f'{ZOO_PREFIX}{m}:build' for m in ZOO)}") from exc
        raise ModelError(f"cannot import module {module_name}: {summary(exc)}") from exc
    except (Exception, SystemExit) as exc:  # a missing or failing module: one line
        raise ModelError(f"cannot import module {module_name}: {summary(exc)}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        hint = " (the zoo's factories are all named build)" if zoo else ""
        raise ModelError(f"module {module_name} has no callable {name!r}{hint}")
    return factory


def _load_weights(model: "nn.Module", path: Path, sha256: Optional[str] = None) -> None:
    import torch

    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    _check_pinned(path, sha256, "checkpoint")
    try:
        state: Dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # objects, not tensors: a whole pickled model, say
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        raise ModelError(f"{path} holds {what}, not a state dict of tensors (flash-export never "
                         "unpickles objects): save the weights with "
                         "torch.save(model.state_dict(), PATH) and pass that file") from exc
    except Exception as exc:  # torch raises many types for a bad or unsafe file
        raise ModelError(f"cannot load weights from {path}: {summary(exc)}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds a {type(state).__name__}, expected a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"weights in {path} do not fit the model: {summary(exc)}") from exc


def memory_limit() -> int:
    """Bytes a run may plan to use by default: half of this machine's physical memory."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): a fixed 8 GiB
        return 8 << 30


def check_memory(need: int, limit: Optional[int], what: str) -> None:
    """Refuse, before allocating, a run whose estimate `need` passes `limit`.

    `limit` defaults to `memory_limit()`.

    Raises:
        FlashExportError: naming the estimate and the limit.
    """
    cap = memory_limit() if limit is None else limit
    if need > cap:
        raise FlashExportError(f"{what} would need about {need / 2**30:.1f} GiB, over the "
                               f"limit of {cap / 2**30:.1f} GiB: use shorter --seq or smaller "
                               "--batch, or raise --max-memory")
