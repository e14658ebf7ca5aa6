"""The `flash-export` command line: each command parses, calls one library function, prints.

Heavy modules (torch, onnx) are imported inside the commands so `flash-export --help` is instant.
"""

import time
from pathlib import Path
from typing import Any, List, Optional

import click
from click.core import ParameterSource

from flash_export._version import __version__
from flash_export.bench.timing import BLOCK_TARGET_S, MAX_BLOCK
from flash_export.cli.options import (
    Console,
    artifact_file,
    artifact_spec,
    backend_list,
    block_size,
    common_options,
    debugging,
    hf_options,
    int_list,
    model_options,
    output_file,
    trust_options,
)
from flash_export.cli.serve import serve, triton
from flash_export.core.contract import EXPORT_DTYPES, TARGETS
from flash_export.core.errors import FlashExportError
from flash_export.core.install import EXPORT_MODULES


class _Group(click.Group):
    """Turns FlashExportError into one line and exit 1; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FlashExportError as exc:
            if debugging(ctx):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except ImportError as exc:  # a light install (no export extra) running an export command
            if debugging(ctx) or (exc.name or "").partition(".")[0] not in EXPORT_MODULES:
                raise
            from flash_export.core.install import export_extra_hint

            click.echo(f"error: {ctx.invoked_subcommand or 'this command'} needs {exc.name}, "
                       f"which this install lacks: {export_extra_hint()}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flash-export")
@common_options
def main() -> None:
    """Export a chunked FlashAttention model to TorchScript and onnxruntime, check and time it.

    --debug, --quiet and --verbose work before or after the command's name.
    """


def _report_written(console: Console, path: Path, started: float) -> None:
    size = path.stat().st_size
    console.info(f"wrote {path} ({size / 1e6:.2f} MB) in {time.perf_counter() - started:.2f} s")


@main.command()
@common_options
@model_options
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path),
                callback=artifact_file("torchscript"))
@click.option("--attention", type=click.Choice(["chunk", "native"]), default="chunk",
              show_default=True,
              help="chunk: the PyTorch chunk loop, loads in any libtorch; native: calls "
                   "flash_export::attention (our kernel), C++ must load the libtorch shim "
                   "(custom_ops/torch).")
def torchscript(spec: Any, attention: str, out: Path) -> None:
    """Script the model and save it as a TorchScript archive OUT.pt (loads in C++)."""
    from flash_export.export.torchscript import export_torchscript

    started = time.perf_counter()
    model = spec.build()
    _report_written(Console(), export_torchscript(model, out, spec=spec, attention=attention),
                    started)


@main.command()
@common_options
@model_options
@click.option("--mask", "with_mask", is_flag=True, default=False,
              help="Add a bool `mask` input of shape (batch, 1, q_len, k_len). Default: none.")
@hf_options
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path),
                callback=artifact_file("pt2"))
def pt2(spec: Any, with_mask: bool, hf_folder: Optional[Path], task: Optional[str],
        out: Path) -> None:
    """Compile the model to an AOTInductor package OUT.pt2 (torch.export, dynamic sizes).

    Its attention is flash_export::attention: in C++, load the libtorch shim (custom_ops/torch)
    before AOTIModelPackageLoader. Compiling takes tens of seconds (g++). With --hf DIR --task
    TASK: a transformers checkpoint instead (not text-generation-with-past).
    """
    from flash_export.export.pt2 import export_pt2

    console = Console()
    started = time.perf_counter()
    if hf_folder is not None or task is not None:
        _export_checkpoint(console, hf_folder, task, out, started, pt2=True)
        return
    model = spec.build()
    progress = console.progress("exporting pt2")
    try:
        path = export_pt2(model, out, spec=spec, mask=with_mask, progress=progress)
    finally:
        progress.close()
    _report_written(console, path, started)


@main.command()
@common_options
@model_options
@click.option("--target", type=click.Choice(TARGETS),
              default="custom", show_default=True,
              help="custom: one com.flash_export::FlashAttention node (needs our library); "
                   "standard: standard ops with an ONNX Loop; contrib: com.microsoft."
                   "MultiHeadAttention; attention23: ONNX Attention (opset 23).")
@click.option("--dtype", type=click.Choice(EXPORT_DTYPES), default="float32",
              show_default=True, help="Precision of the exported graph.")
@click.option("--opset", type=click.IntRange(min=1), default=None,
              help="Default-domain opset. Default: the newest both the exporter and the installed "
                   "onnxruntime handle (25 with onnxruntime 1.31).")
@click.option("--static-shapes", is_flag=True, default=False,
              help="Fix batch and sequence dimensions to the export example. Default: dynamic.")
@click.option("--mask", "with_mask", is_flag=True, default=False,
              help="Add a bool `mask` input of shape (batch, 1, q_len, k_len). Default: none.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run the file in onnxruntime against PyTorch at two lengths after writing.")
@hf_options
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path),
                callback=artifact_file("onnx"))
def onnx(spec: Any, target: str, dtype: str, opset: Optional[int], static_shapes: bool,
         with_mask: bool, check: bool, hf_folder: Optional[Path], task: Optional[str],
         out: Path) -> None:
    """Export the model to ONNX file OUT.onnx, then check it in onnxruntime.

    With --hf DIR --task TASK: a transformers checkpoint instead (one graph, dynamic batch and
    length; custom target, float32), checked against the checkpoint run by transformers.
    """
    from flash_export.check.export_check import check_onnx_export
    from flash_export.export.onnx import export_onnx

    console = Console()
    started = time.perf_counter()
    if hf_folder is not None or task is not None:
        _export_checkpoint(console, hf_folder, task, out, started, opset=opset, check=check)
        return
    model = spec.build()
    path = export_onnx(model, out, target=target, opset=opset, dtype=dtype, spec=spec,
                       static_shapes=static_shapes, mask=with_mask)
    _report_written(console, path, started)
    if check:
        for line in check_onnx_export(model, path, mask=with_mask):
            console.info(f"check: {line}")


def _export_checkpoint(console: Console, folder: Optional[Path], task: Optional[str], out: Path,
                       started: float, *, opset: Optional[int] = None, check: bool = False,
                       pt2: bool = False) -> None:
    """`onnx|pt2 --hf DIR --task TASK`: refuse the FlashAttention-model options, export, check."""
    ctx = click.get_current_context()
    if folder is None or task is None:
        raise click.UsageError("--hf DIR and --task TASK go together")
    given = [f"--{name.replace('_', '-')}" for name in ctx.params
             if name not in ("hf_folder", "task", "opset", "check", "out")
             and ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)]
    if given:
        raise click.UsageError(f"{', '.join(given)} do not apply to --hf (a checkpoint exports "
                               "as itself: custom target, float32, dynamic sizes)")
    from flash_export.check.validate import validate as run_validate
    from flash_export.hf.export import export_hf_onnx, export_hf_pt2

    if pt2:
        progress = console.progress("exporting pt2")
        try:
            path = export_hf_pt2(folder, out, task=task, progress=progress)
        finally:
            progress.close()
    else:
        path = export_hf_onnx(folder, out, task=task, opset=opset)
    _report_written(console, path, started)
    if check:  # one length seen at export (17), one not
        report = run_validate(out, checkpoint=folder, seq=[17, 40], batch=[2])
        report.raise_for_failures()
        console.info(f"check: passed at lengths 17 and 40, batch 2, against {report.reference} "
                     "(flash-export validate runs more)")


@main.command()
@common_options
@model_options(artifact=True)
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--seq", callback=int_list, default=None, metavar="LIST",
              help="Comma-separated sequence lengths; each L runs as Lq=Lk=L and as Lq=L with "
                   "Lk the next length. Default: 1,chunk-1,chunk,chunk+1,3*chunk+5,1024.")
@click.option("--batch", callback=int_list, default="1,3", show_default=True, metavar="LIST",
              help="Comma-separated batch sizes.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default=None,
              help="Precision to run in. Default: the artifact's.")
@click.option("--atol", type=click.FloatRange(min=0), default=None,
              help="Absolute tolerance; with --rtol replaces the 2x-baseline rule by "
                   "|a-r| <= atol + rtol*|r|. Default: the 2x-baseline rule.")
@click.option("--rtol", type=click.FloatRange(min=0), default=None,
              help="Relative tolerance (see --atol). Default: the 2x-baseline rule.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu",
              show_default=True, help="onnxruntime execution provider for ONNX artifacts.")
@click.option("--runtime", type=click.Choice(["onnxruntime", "openvino"]), default="onnxruntime",
              show_default=True, help="What runs an ONNX artifact; openvino (CPU, float32, the "
              "openvino extra) runs the standard target only.")
@click.option("--all-targets", is_flag=True, default=False,
              help="Also export and compare every other ONNX target. Default: off.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, callback=output_file,
              help="Write the full report as JSON (- for stdout). Default: none.")
@click.option("--hf", "hf_folder", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="For a graph exported with onnx --hf: the checkpoint folder "
              "(its config and weights must be the exported ones). Default: the folder "
              "recorded at export.")
@trust_options
def validate(spec: Any, artifact: Path, seq: Optional[List[int]], batch: List[int],
             dtype: Optional[str], atol: Optional[float], rtol: Optional[float], provider: str,
             runtime: str, all_targets: bool, json_path: Optional[Path], hf_folder: Optional[Path],
             trust: bool, expect_sha256: Optional[str], max_memory: Optional[int]) -> None:
    """Check ARTIFACT (.onnx of any target, .pt or .pt2) against the float64 PyTorch reference.

    The reference is rebuilt from the model spec recorded in ARTIFACT; model options given
    explicitly override it. A graph exported with onnx --hf is checked against its checkpoint's
    transformers model with eager attention in float64 (padded rows left out). Exit 0 when
    everything passes, 1 on any mismatch. --verbose adds a row per backend and shape.
    """
    import json as json_module

    from flash_export.check.validate import validate as run_validate
    from flash_export.cli.render import validation_lines

    ctx = click.get_current_context()
    console = Console(ctx)
    progress = console.progress("validating")
    try:
        report = run_validate(artifact, spec=artifact_spec(ctx, spec, artifact, trust),
                              seq=seq, batch=batch, dtype=dtype, atol=atol, rtol=rtol,
                              provider=provider, all_targets=all_targets, trust=trust,
                              expect_sha256=expect_sha256, max_memory=max_memory,
                              checkpoint=hf_folder, runtime=runtime, progress=progress)
    finally:
        progress.close()
    for line in validation_lines(report, console.verbosity > 0):
        console.info(line)
    if json_path is not None:
        console.write(json_path, json_module.dumps(report.to_dict(), indent=2))
    if not report.passed:
        lines = report.failure_lines()
        for line in lines[:20]:
            console.result(f"FAIL {line}")
        if len(lines) > 20:
            console.result(f"... {len(lines) - 20} more failures (see --json)")
        console.result("validation FAILED")
        ctx.exit(1)
    console.result("validation passed")


@main.command()
@common_options
@model_options(artifact=True)
@click.argument("artifact", required=False,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--seq", callback=int_list, default="128,512,1024", show_default=True,
              metavar="LIST", help="Comma-separated sequence lengths (Lq = Lk = L).")
@click.option("--chunks", "chunks", callback=int_list, default=None, metavar="LIST",
              help="Chunk sizes to sweep (speed vs memory); chunk-free backends (contrib, "
                   "attention23, sdpa) run once. Default: the model's --chunk.")
@click.option("--batch", callback=int_list, default="1", show_default=True, metavar="LIST",
              help="Comma-separated batch sizes; every batch runs every --seq length.")
@click.option("--backends", callback=backend_list, default=None, metavar="LIST",
              help="Comma-separated from custom, standard, contrib, attention23, torchscript, "
                   "eager, sdpa, native, torchscript-native, pt2 (append :cuda for the GPU). "
                   "Default: all (CUDA ones too when a GPU is present); with ARTIFACT: it, "
                   "eager and sdpa.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Untimed warm-up calls per backend and shape, before each repetition.")
@click.option("--iters", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed samples per backend, shape and repetition. A sample is one untimed "
                   "call, then a block of back-to-back calls timed together (per-call time = "
                   "block time / block size); every iteration runs all backends' blocks in a "
                   "shuffled order, and the percentiles are over the block means.")
@click.option("--block", callback=block_size, default="auto", show_default=True, metavar="N|auto",
              help="Calls per timed block: auto sizes each backend's block per shape, from the "
                   f"faster of two calls, to last about {BLOCK_TARGET_S * 1e3:.0f} ms (1 to "
                   f"{MAX_BLOCK} calls).")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Repetitions of warm-up + timed samples (blocks keep their size).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch.set_num_threads and onnxruntime intra_op_num_threads.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="Precision (an ARTIFACT keeps its own).")
@trust_options
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Measure peak memory of one forward in a fresh subprocess per row.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, callback=output_file,
              help="Write the full report as JSON (- for stdout). Default: none.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, callback=output_file,
              help="Write the rows as CSV (- for stdout). Default: none.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, callback=artifact_file("png"),
              help="Save a PNG of latency and memory vs sequence length "
                   "(needs matplotlib, the plot extra). Default: none.")
def bench(spec: Any, artifact: Optional[Path], seq: List[int], chunks: Optional[List[int]],
          batch: List[int], backends: Optional[List[str]], warmup: int, iters: int,
          block: Optional[int], repeats: int, threads: int, dtype: str, trust: bool,
          expect_sha256: Optional[str], max_memory: Optional[int], memory: bool,
          json_path: Optional[Path], csv_path: Optional[Path], plot_path: Optional[Path]) -> None:
    """Time every backend side by side (interleaved blocks) and measure peak memory per forward."""
    import json as json_module

    from flash_export.bench.benchmark import BenchConfig, benchmark
    from flash_export.bench.files import csv_text, plot_report, require_matplotlib
    from flash_export.cli.render import bench_lines

    if json_path == csv_path and json_path is not None:
        raise click.UsageError("--json and --csv name the same output")
    if plot_path is not None:
        require_matplotlib()  # fail before the long run, not after
    ctx = click.get_current_context()
    config = BenchConfig(seqs=tuple(seq), chunks=tuple(chunks) if chunks else None,
                         batches=tuple(batch), backends=tuple(backends) if backends else None,
                         warmup=warmup, iters=iters, repeats=repeats, block=block,
                         threads=threads, dtype=dtype, memory=memory, max_memory=max_memory)
    console = Console(ctx)
    progress = console.progress("benchmarking")
    try:
        report = benchmark(artifact, spec=artifact_spec(ctx, spec, artifact, trust),
                           config=config, trust=trust, expect_sha256=expect_sha256,
                           progress=progress)
    finally:
        progress.close()
    for line in bench_lines(report):
        console.result(line)
    if json_path is not None:
        console.write(json_path, json_module.dumps(report.to_dict(), indent=2))
    if csv_path is not None:
        console.write(csv_path, csv_text(report))
    if plot_path is not None:
        plot_report(report, plot_path)
        console.info(f"wrote {plot_path}")


@main.command()
@common_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, callback=output_file,
              help="Write the report as JSON (- for stdout). Default: none.")
def doctor(json_path: Optional[Path]) -> None:
    """Check the install: versions, the native library, and one run of the custom op.

    --quiet prints only the failed checks and their hints.
    """
    import json as json_module

    from flash_export.check.doctor import diagnose
    from flash_export.cli.render import doctor_lines

    console = Console()
    report = diagnose()
    for line, failed in doctor_lines(report):
        (console.result if failed else console.info)(line)
    if json_path is not None:
        console.write(json_path, json_module.dumps(report.to_dict(), indent=2))
    if not report.ok:
        click.get_current_context().exit(1)


main.add_command(serve)
main.add_command(triton)


def run(prog_name: str = "flash-export") -> None:
    """Console-script entry point (and `python -m flash_export`'s)."""
    main(prog_name=prog_name)
