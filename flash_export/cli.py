"""The `flash-export` command line: each command parses, calls one library function, prints.

Heavy modules (torch, onnx) are imported inside the commands so `flash-export --help` is instant.
"""

import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import click

from flash_export._version import __version__
from flash_export.errors import FlashExportError

F = TypeVar("F", bound=Callable[..., Any])


class _Group(click.Group):
    """Turns FlashExportError into one line and exit 1; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FlashExportError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="flash-export")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors. Default: off.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Export a chunked FlashAttention model to TorchScript and onnxruntime, check and time it."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def model_options(f: F) -> F:
    """The options every command uses to (re)build the model; they arrive as `spec`."""
    options = [
        click.option("--embed", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Embedding size E."),
        click.option("--heads", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Number of attention heads (must divide E)."),
        click.option("--chunk", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Keys per online-softmax step."),
        click.option("--causal", is_flag=True, default=False,
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
        from flash_export.spec import ModelSpec

        spec = ModelSpec(embed=embed, heads=heads, chunk=chunk, causal=causal, seed=seed,
                         model=model_factory, weights=weights)
        return f(*args, spec=spec, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


def _report_written(path: Path, started: float) -> None:
    size = path.stat().st_size
    click.echo(f"wrote {path} ({size / 1e6:.2f} MB) in {time.perf_counter() - started:.2f} s")


@main.command()
@model_options
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def torchscript(spec: Any, out: Path) -> None:
    """Script the model and save it as a TorchScript archive OUT.pt (loads in C++)."""
    from flash_export.export import export_torchscript

    started = time.perf_counter()
    model = spec.build()
    _report_written(export_torchscript(model, out, spec=spec), started)


@main.command()
@model_options
@click.option("--target", type=click.Choice(["custom", "standard", "contrib", "attention23"]),
              default="custom", show_default=True,
              help="custom: one com.flash_export::FlashAttention node (needs our library); "
                   "standard: standard ops with an ONNX Loop; contrib: com.microsoft."
                   "MultiHeadAttention; attention23: ONNX Attention (opset 23).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="Precision of the exported graph.")
@click.option("--opset", type=click.IntRange(min=1), default=None,
              help="Default-domain opset. Default: the newest the installed onnxruntime loads.")
@click.option("--static-shapes", is_flag=True, default=False,
              help="Fix batch and sequence dimensions to the export example. Default: dynamic.")
@click.option("--mask", "with_mask", is_flag=True, default=False,
              help="Add a bool `mask` input of shape (batch, 1, q_len, k_len). Default: none.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run the file in onnxruntime against PyTorch at two lengths after writing.")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def onnx(spec: Any, target: str, dtype: str, opset: Optional[int], static_shapes: bool,
         with_mask: bool, check: bool, out: Path) -> None:
    """Export the model to ONNX file OUT.onnx, then check it in onnxruntime."""
    from flash_export.onnx_export import check_onnx_export, export_onnx

    started = time.perf_counter()
    model = spec.build()
    path = export_onnx(model, out, target=target, opset=opset, dtype=dtype, spec=spec,
                       static_shapes=static_shapes, mask=with_mask)
    _report_written(path, started)
    if check:
        for line in check_onnx_export(model, path, mask=with_mask):
            click.echo(f"check: {line}")


def run() -> None:
    """Console-script entry point."""
    main(prog_name="flash-export")


if __name__ == "__main__":
    sys.exit(main(prog_name="flash-export"))
