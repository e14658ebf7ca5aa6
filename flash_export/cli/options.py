"""The CLI's shared options and their callbacks: model options, trust options, lists, outputs.

Everything here parses and checks what the user typed; nothing imports torch.
"""

import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import click

from flash_export.core.contract import HF_TASKS
from flash_export.nn.spec import ModelSpec  # torch-free

F = TypeVar("F", bound=Callable[..., Any])

# Shared by a command's context and its group's (click shares `meta` down the chain), so each of
# these options works before the subcommand and after it.
_DEBUG, _VERBOSITY = "flash_export.debug", "flash_export.verbosity"
_STDOUT_TAKEN = "flash_export.stdout"
STDOUT = Path("-")  # `--json -`, `--csv -`: the report goes to standard output


def _set_verbosity(level: int) -> Callable[..., None]:
    def callback(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if not value:
            return
        if ctx.meta.get(_VERBOSITY, level) != level:
            raise click.UsageError("--quiet and --verbose exclude each other")
        ctx.meta[_VERBOSITY] = level

    return callback


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_DEBUG] = True


def common_options(f: F) -> F:
    """--debug, -q/--quiet and -v/--verbose: accepted by the group and by every command."""
    options = [
        click.option("--debug", is_flag=True, expose_value=False, callback=_set_debug,
                     help="Show full tracebacks on errors. Default: off."),
        click.option("-q", "--quiet", is_flag=True, expose_value=False,
                     callback=_set_verbosity(-1),
                     help="Print only results and errors: no progress, no 'wrote' lines."),
        click.option("-v", "--verbose", is_flag=True, expose_value=False,
                     callback=_set_verbosity(1),
                     help="Print each step as it happens, and per-case detail."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def debugging(ctx: click.Context) -> bool:
    """Whether --debug was given anywhere on the command line."""
    return bool(ctx.meta.get(_DEBUG))


class Console:
    """Where a command's lines go: by the chosen verbosity.

    When a report takes stdout (`--json -`), every line goes to stderr, so stdout stays the
    report alone.
    """

    def __init__(self, ctx: Optional[click.Context] = None) -> None:
        ctx = ctx or click.get_current_context()
        self.verbosity: int = ctx.meta.get(_VERBOSITY, 0)
        self.to_stderr: bool = bool(ctx.meta.get(_STDOUT_TAKEN))

    def result(self, line: str) -> None:
        """A line the command exists to print (a verdict, a table): always shown."""
        click.echo(line, err=self.to_stderr)

    def info(self, line: str) -> None:
        """A line about what was done ("wrote ..."): hidden by --quiet."""
        if self.verbosity >= 0:
            click.echo(line, err=self.to_stderr)

    def detail(self, line: str) -> None:
        """A line of detail: shown with --verbose."""
        if self.verbosity > 0:
            click.echo(line, err=self.to_stderr)

    def progress(self, label: str) -> "Progress":
        """A progress callback for the library: a bar, lines with --verbose, none with --quiet."""
        return Progress(label, mode={-1: "off", 0: "bar", 1: "lines"}[self.verbosity])

    def write(self, path: Path, text: str) -> None:
        """Write a text report to `path`, or to stdout for STDOUT."""
        if path == STDOUT:
            click.echo(text, nl=not text.endswith("\n"))
        else:
            path.write_text(text)
            self.info(f"wrote {path}")


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelSpec)}
_HELP = {"embed": "Embedding size E.", "heads": "Number of attention heads (must divide E).",
         "chunk": "Keys per online-softmax step.",
         "seed": "Seed of the parameter initialisation when --weights is not given."}


def model_options(f: Optional[F] = None, *, artifact: bool = False) -> Any:
    """The options every command uses to (re)build the model; they arrive as `spec`.

    With `artifact`, the command reads an artifact whose recorded spec fills every option not
    given, so the help says so instead of showing the defaults of a fresh export.
    """
    def default(name: str) -> str:
        value = _DEFAULTS[name]
        return f" Default: the artifact's ({value} without one)." if artifact else ""

    def numeric(name: str, minimum: Optional[int]) -> Any:
        kind = click.INT if minimum is None else click.IntRange(min=minimum)
        return click.option(f"--{name}", type=kind, default=_DEFAULTS[name],
                            show_default=not artifact, help=_HELP[name] + default(name))

    options = [
        numeric("embed", 1), numeric("heads", 1), numeric("chunk", 1),
        click.option("--causal/--no-causal", default=False,
                     help="Causal attention, bottom-right aligned. Default: "
                          + ("the artifact's (off without one)." if artifact else "off.")),
        numeric("seed", None),
        click.option("--model", "model_factory", metavar="FILE.py:FACTORY", default=None,
                     help="Build the model with FACTORY(embed_size=, heads=, chunk_size=, "
                          "causal=) from FILE.py (or MODULE:FACTORY). Default: "
                          + ("the artifact's; " if artifact else "") + "a single FlashAttention."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="State-dict checkpoint loaded with weights_only=True, strict. Default: "
                          + ("the artifact's; " if artifact else "")
                          + "none (seeded initialisation)."),
    ]

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, embed: int, heads: int, chunk: int, causal: bool, seed: int,
                    model_factory: Optional[str], weights: Optional[str], **kwargs: Any) -> Any:
            try:  # no torch yet: a bad combination is a usage error before the heavy imports
                spec = ModelSpec(embed=embed, heads=heads, chunk=chunk, causal=causal, seed=seed,
                                 model=model_factory, weights=weights)
            except ValueError as exc:
                raise click.UsageError(str(exc)) from None
            return func(*args, spec=spec, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorate(f) if f is not None else decorate


_MODEL_OPTION_FIELDS = {"embed": "embed", "heads": "heads", "chunk": "chunk", "causal": "causal",
                        "seed": "seed", "model_factory": "model", "weights": "weights"}


def hf_options(f: F) -> F:
    """--hf DIR and --task TASK: export a transformers checkpoint folder instead of the model."""
    f = click.option("--task", type=click.Choice(HF_TASKS), default=None,
                     help="With --hf: what the graph computes (its inputs as optimum names "
                          "them). Default: none.")(f)
    return click.option("--hf", "hf_folder",
                        type=click.Path(exists=True, file_okay=False, path_type=Path),
                        default=None, help="Export this transformers checkpoint folder "
                        "(config.json and safetensors, as save_pretrained writes) for --task "
                        "instead, attention on our kernel (needs the hf extra). Default: none.")(f)


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


def block_size(ctx: click.Context, param: click.Parameter, value: str) -> Optional[int]:
    """Click callback: "auto" -> None (sized per backend), "8" -> 8 (a positive int)."""
    if value.strip().lower() == "auto":
        return None
    try:
        size = int(value)
    except ValueError:
        raise click.BadParameter(f"expected a positive integer or auto, got {value!r}") from None
    if size < 1:
        raise click.BadParameter(f"expected a positive integer or auto, got {value!r}")
    return size


def backend_list(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Any:
    """Click callback: "custom,eager:cuda" -> ["custom", "eager:cuda"], names checked."""
    if value is None:
        return None
    from flash_export.bench.runners import all_backends

    items = [v for v in value.replace(" ", "").split(",") if v]
    for item in items:
        base, _, device = item.partition(":")
        if base not in all_backends() or device not in ("", "cpu", "cuda"):
            raise click.BadParameter(f"unknown backend {item!r}; choose from "
                                     f"{', '.join(all_backends())} (optionally with :cuda)")
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
    from flash_export.artifacts.kinds import artifact_kind
    from flash_export.artifacts.metadata import read_metadata

    meta = read_metadata(artifact)  # data only: no .pt is loaded here
    if not explicit:
        return None
    from flash_export.nn.recorded import base_spec, recorded
    from flash_export.nn.spec import resolve_spec

    base = base_spec(recorded(meta, artifact, artifact_kind(artifact)), meta, artifact)
    try:
        return resolve_spec(base, explicit, trust=trust, source=artifact)
    except ValueError as exc:  # explicit options that contradict the recorded ones
        raise click.UsageError(str(exc)) from None


def output_file(ctx: click.Context, param: click.Parameter, value: Optional[Path]) -> Any:
    """Click callback: an output file whose folder exists and is writable, checked up front.

    "-" is standard output (STDOUT); the command's own lines then go to standard error.
    """
    if value is None:
        return None
    if value == STDOUT:
        ctx.meta[_STDOUT_TAKEN] = True
        return STDOUT
    folder = value.parent if str(value.parent) else Path(".")
    if not folder.is_dir():
        raise click.BadParameter(f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise click.BadParameter(f"folder {folder} is not writable")
    return value


def artifact_file(kind: str) -> Callable[..., Any]:
    """Click callback for an export's OUT: an output_file whose suffix fits `kind`.

    `kind` is an artifact kind ("onnx", "torchscript", "pt2"), or "png" for a picture.
    """
    def check(ctx: click.Context, param: click.Parameter, value: Optional[Path]) -> Any:
        if value == STDOUT:
            raise click.BadParameter("this is written to a file, not to standard output")
        if value is not None and kind == "png" and value.suffix.lower() != ".png":
            raise click.BadParameter(f"{value}: a PNG image must be written to a .png file")
        if value is not None and kind != "png":
            from flash_export.artifacts.kinds import require_kind
            from flash_export.core.errors import ExportError

            try:
                require_kind(value, kind)
            except ExportError as exc:
                raise click.BadParameter(str(exc)) from None
        return output_file(ctx, param, value)

    return check


def _gibibytes(ctx: click.Context, param: click.Parameter, value: Optional[float]) -> Any:
    """Click callback: GiB -> bytes (None stays None)."""
    return None if value is None else int(value * 2**30)


def trust_options(f: F) -> F:
    """--trust, --expect-sha256 and --max-memory: how much an artifact is believed and allowed."""
    options = [
        click.option("--trust", is_flag=True, default=False,
                     help="Load a .pt or .pt2 of unknown origin (each is a program) and use the "
                          "model file and weights the artifact records. Default: off."),
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
    """The library's progress on stderr: a click.progressbar (by default), a line per step.

    The bar is (re)created whenever the library reports a new total; --verbose prints a line per
    step instead, --quiet nothing.
    """

    def __init__(self, label: str, mode: str = "bar") -> None:
        self.label = label
        self.mode = mode  # "bar", "lines" (one per step) or "off"
        self.bar: Any = None
        self.item = ""

    def __call__(self, done: int, total: int, item: str) -> None:
        """Report `done` of `total` (0: a step of unknown length, printed as one line)."""
        if self.mode == "off":
            return
        if total == 0 or self.mode == "lines":  # a step of unknown length (an export): a line
            count = f" [{done}/{total}]" if total else ""
            click.echo(f"{self.label}{count}: {item}", err=True)
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
