"""The CLI's shared options and their callbacks: model options, trust options, lists, outputs.

Everything here parses and checks what the user typed; nothing imports torch.
"""

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def model_options(f: F) -> F:
    """The options every command uses to (re)build the model; they arrive as `spec`."""
    options = [
        click.option("--embed", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Embedding size E."),
        click.option("--heads", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Number of attention heads (must divide E)."),
        click.option("--chunk", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Keys per online-softmax step."),
        click.option("--causal/--no-causal", default=False,
                     help="Causal attention, bottom-right aligned. Default: off."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the parameter initialisation when --weights is not given."),
        click.option("--model", "model_factory", metavar="FILE.py:FACTORY", default=None,
                     help="Build the model with FACTORY(embed_size=, heads=, chunk_size=, "
                          "causal=) from FILE.py. Default: a single FlashAttention."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="State-dict checkpoint loaded with weights_only=True, strict. "
                          "Default: none (seeded initialisation)."),
    ]

    @functools.wraps(f)
    def wrapper(*args: Any, embed: int, heads: int, chunk: int, causal: bool, seed: int,
                model_factory: Optional[str], weights: Optional[str], **kwargs: Any) -> Any:
        from flash_export.spec import ModelSpec  # imports no torch: checked before heavy work

        try:
            spec = ModelSpec(embed=embed, heads=heads, chunk=chunk, causal=causal, seed=seed,
                             model=model_factory, weights=weights)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        return f(*args, spec=spec, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]



_MODEL_OPTION_FIELDS = {"embed": "embed", "heads": "heads", "chunk": "chunk", "causal": "causal",
                        "seed": "seed", "model_factory": "model", "weights": "weights"}


def int_list(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Any:
    """Click callback: "1,7,9" -> [1, 7, 9] (positive ints); None stays None."""
    if value is None:
        return None
    try:
        items = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not items or any(v < 1 for v in items):
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return items


def backend_list(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Any:
    """Click callback: "custom,eager:cuda" -> ["custom", "eager:cuda"], names checked."""
    if value is None:
        return None
    from flash_export.runners import ALL_BACKENDS

    items = [v for v in value.replace(" ", "").split(",") if v]
    for item in items:
        base, _, device = item.partition(":")
        if base not in ALL_BACKENDS or device not in ("", "cpu", "cuda"):
            raise click.BadParameter(f"unknown backend {item!r}; choose from "
                                     f"{', '.join(ALL_BACKENDS)} (optionally with :cuda)")
    return items or None


def artifact_spec(ctx: click.Context, spec: Any, artifact: Optional[Path],
                   trust: bool = False) -> Any:
    """The spec to compare against: the artifact's, with the model options given explicitly.

    None means "the artifact's own": the library then reads it and applies the trust rules.
    """
    from click.core import ParameterSource

    explicit = {field: getattr(spec, field) for name, field in _MODEL_OPTION_FIELDS.items()
                if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)}
    if artifact is None:
        return spec
    from flash_export.artifact import artifact_kind, read_metadata

    meta = read_metadata(artifact)  # data only: no .pt is loaded here
    if not explicit:
        return None
    from flash_export.recorded import base_spec, recorded
    from flash_export.spec import resolve_spec

    base = base_spec(recorded(meta, artifact, artifact_kind(artifact)), meta, artifact)
    try:
        return resolve_spec(base, explicit, trust=trust, source=artifact)
    except ValueError as exc:  # explicit options that contradict the recorded ones
        raise click.UsageError(str(exc)) from None


def output_file(ctx: click.Context, param: click.Parameter, value: Optional[Path]) -> Any:
    """Click callback: an output file whose folder exists and is writable, checked up front."""
    if value is None:
        return None
    folder = value.parent if str(value.parent) else Path(".")
    if not folder.is_dir():
        raise click.BadParameter(f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise click.BadParameter(f"folder {folder} is not writable")
    return value


def _gibibytes(ctx: click.Context, param: click.Parameter, value: Optional[float]) -> Any:
    """Click callback: GiB -> bytes (None stays None)."""
    return None if value is None else int(value * 2**30)


def trust_options(f: F) -> F:
    """--trust, --expect-sha256 and --max-memory: how much an artifact is believed and allowed."""
    options = [
        click.option("--trust", is_flag=True, default=False,
                     help="Load a .pt of unknown origin (a .pt is a program) and use the model "
                          "file and weights the artifact records. Default: off."),
        click.option("--expect-sha256", metavar="HEX", default=None,
                     help="The artifact's SHA-256 as its publisher gave it; any other file is "
                          "refused, a matching one is trusted. Default: none."),
        click.option("--max-memory", type=click.FloatRange(min=0), default=None,
                     callback=_gibibytes, metavar="GIB",
                     help="Refuse runs estimated to need more (GiB), before allocating. "
                          "Default: half the physical memory."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


class Progress:
    """click.progressbar on stderr, (re)created whenever the library reports a new total."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None
        self.item = ""

    def __call__(self, done: int, total: int, item: str) -> None:
        """Report `done` of `total` (0: a step of unknown length, printed as one line)."""
        if total == 0:  # a step of unknown length (an export): one line
            click.echo(f"{self.label}: {item}", err=True)
            return
        if self.bar is None or self.bar.length != total:
            self.close()
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr,
                                         item_show_func=lambda _: self.item)
            self.bar.__enter__()
        self.item = item
        self.bar.update(max(done - self.bar.pos, 0))

    def close(self) -> None:
        """Finish the bar, if one is showing."""
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
