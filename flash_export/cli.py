"""The `flash-export` command line: each command parses, calls one library function, prints.

Heavy modules (torch, onnx) are imported inside the commands so `flash-export --help` is instant.
"""

import functools
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, TypeVar

import click

from flash_export._version import __version__
from flash_export.contract import EXPORT_DTYPES, TARGETS
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


# --- validate / bench / doctor ------------------------------------------------------------------

_MODEL_OPTION_FIELDS = {"embed": "embed", "heads": "heads", "chunk": "chunk", "causal": "causal",
                        "seed": "seed", "model_factory": "model", "weights": "weights"}


def _int_list(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Any:
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


def _backend_list(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Any:
    """Click callback: "custom,eager:cuda" -> ["custom", "eager:cuda"], names checked."""
    if value is None:
        return None
    from flash_export.bench import ALL_BACKENDS

    items = [v for v in value.replace(" ", "").split(",") if v]
    for item in items:
        base, _, device = item.partition(":")
        if base not in ALL_BACKENDS or device not in ("", "cpu", "cuda"):
            raise click.BadParameter(f"unknown backend {item!r}; choose from "
                                     f"{', '.join(ALL_BACKENDS)} (optionally with :cuda)")
    return items or None


def _artifact_spec(ctx: click.Context, spec: Any, artifact: Optional[Path],
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
    if "model_spec" not in meta:
        return spec  # nothing recorded: the options (explicit or default) describe the model
    if not explicit:
        return None
    from flash_export.spec import recorded, resolve_spec

    base = recorded(meta, artifact, artifact_kind(artifact)).spec
    try:
        return resolve_spec(base, explicit, trust=trust, source=artifact)
    except ValueError as exc:  # explicit options that contradict the recorded ones
        raise click.UsageError(str(exc)) from None


def _output_file(ctx: click.Context, param: click.Parameter, value: Optional[Path]) -> Any:
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


class _Progress:
    """click.progressbar on stderr, (re)created whenever the library reports a new total."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None
        self.item = ""

    def __call__(self, done: int, total: int, item: str) -> None:
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
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _fmt(value: Optional[float], spec: str = ".2e") -> str:
    return "-" if value is None else format(value, spec)


@main.command()
@model_options
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--seq", callback=_int_list, default=None, metavar="LIST",
              help="Comma-separated sequence lengths; each L runs as Lq=Lk=L and as Lq=L with "
                   "Lk the next length. Default: 1,chunk-1,chunk,chunk+1,3*chunk+5,1024.")
@click.option("--batch", callback=_int_list, default="1,3", show_default=True, metavar="LIST",
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
@click.option("--all-targets", is_flag=True, default=False,
              help="Also export and compare every other ONNX target. Default: off.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, callback=_output_file,
              help="Write the full report as JSON. Default: none.")
@trust_options
@click.option("-v", "--verbose", is_flag=True, default=False,
              help="One row per backend and shape. Default: a row per backend.")
def validate(spec: Any, artifact: Path, seq: Optional[List[int]], batch: List[int],
             dtype: Optional[str], atol: Optional[float], rtol: Optional[float], provider: str,
             all_targets: bool, json_path: Optional[Path], trust: bool,
             expect_sha256: Optional[str], max_memory: Optional[int], verbose: bool) -> None:
    """Check ARTIFACT (.onnx of any target, or .pt) against the float64 PyTorch reference.

    The reference is rebuilt from the model spec recorded in ARTIFACT; model options given
    explicitly override it. Exit 0 when everything passes, 1 on any mismatch.
    """
    import json as json_module

    from flash_export.validate import validate as run_validate

    ctx = click.get_current_context()
    progress = _Progress("validating")
    try:
        report = run_validate(artifact, spec=_artifact_spec(ctx, spec, artifact, trust),
                              seq=seq, batch=batch, dtype=dtype, atol=atol, rtol=rtol,
                              provider=provider, all_targets=all_targets, trust=trust,
                              expect_sha256=expect_sha256, max_memory=max_memory,
                              progress=progress)
    finally:
        progress.close()
    s = report.spec
    click.echo(f"{report.artifact}: {report.kind}"
               + (f" target {report.target}" if report.target else "")
               + f", {report.dtype}, provider {report.provider}")
    click.echo(f"reference: float64 plain attention of the spec from the {report.spec_source} "
               f"(embed {s.embed}, heads {s.heads}, chunk {s.chunk}, causal {s.causal}, "
               f"seed {s.seed}{', model ' + s.model if s.model else ''})")
    origin = report.provenance
    click.echo(f"provenance: sha256 {origin.sha256[:16]}..., " + {
        "trust store": "exported by you here (trust store)",
        "expected sha256": "the hash you expected (--expect-sha256)",
        "--trust": "unknown origin, loaded because of --trust",
        "unverified": "unknown origin: the reference is what the file's own metadata describes "
                      "(pass --expect-sha256 or your model options to pin it)"}[origin.source])
    click.echo(f"rule: {report.rule}")
    bad = [c for c in report.checks if not c.passed]
    click.echo(f"structural checks: {len(report.checks) - len(bad)}/{len(report.checks)} passed")
    header = (f"{'backend':<18} {'shape':<34} {'max abs':>9} {'p99 abs':>9} {'max rel':>9} "
              f"{'bound':>9}  result")
    click.echo(header)
    for b in report.backends:
        if b.load_error:
            click.echo(f"{b.name:<18} {'(failed to load)':<34} {'':>9} {'':>9} {'':>9} "
                       f"{'':>9}  FAIL")
            continue
        rows = b.cases if verbose else [w for w in [b.worst()] if w is not None]
        for r in rows:
            c = r.comparison
            shape = r.case.label if verbose else f"worst of {len(b.cases)}: {r.case.label}"
            verdict = "ok" if (b.passed if not verbose else r.passed) else "FAIL"
            if not verbose:
                verdict += f" ({len(b.cases) - len(b.failures)}/{len(b.cases)})"
            click.echo(f"{b.name:<18} {shape:<34} {_fmt(c.max_abs if c else None):>9} "
                       f"{_fmt(c.p99_abs if c else None):>9} {_fmt(c.max_rel if c else None):>9} "
                       f"{_fmt(c.bound if c else None):>9}  {verdict}")
    if json_path is not None:
        json_path.write_text(json_module.dumps(report.to_dict(), indent=2))
        click.echo(f"wrote {json_path}")
    if not report.passed:
        lines = report.failure_lines()
        for line in lines[:20]:
            click.echo(f"FAIL {line}")
        if len(lines) > 20:
            click.echo(f"... {len(lines) - 20} more failures (see --json)")
        click.echo("validation FAILED")
        ctx.exit(1)
    click.echo("validation passed")


@main.command()
@model_options
@click.argument("artifact", required=False,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--seq", callback=_int_list, default="128,512,1024", show_default=True,
              metavar="LIST", help="Comma-separated sequence lengths (Lq = Lk = L).")
@click.option("--chunks", "chunks", callback=_int_list, default=None, metavar="LIST",
              help="Chunk sizes to sweep (speed vs memory); chunk-free backends (contrib, "
                   "attention23, sdpa) run once. Default: the model's --chunk.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch size.")
@click.option("--backends", callback=_backend_list, default=None, metavar="LIST",
              help="Comma-separated from custom, standard, contrib, attention23, torchscript, "
                   "eager, sdpa (append :cuda for the GPU). Default: all (CUDA ones too when a "
                   "GPU is present); with ARTIFACT: it, eager and sdpa.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Untimed iterations per backend and shape.")
@click.option("--iters", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed iterations per backend and shape.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Repetitions of warmup + timed iterations.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch.set_num_threads and onnxruntime intra_op_num_threads.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="Precision (an ARTIFACT keeps its own).")
@trust_options
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Measure peak memory of one forward in a fresh subprocess per row.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, callback=_output_file,
              help="Write the full report as JSON. Default: none.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, callback=_output_file, help="Write the rows as CSV. Default: none.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, callback=_output_file,
              help="Save a PNG of latency and memory vs sequence length "
                   "(needs flash-export[plot]). Default: none.")
def bench(spec: Any, artifact: Optional[Path], seq: List[int], chunks: Optional[List[int]],
          batch: int, backends: Optional[List[str]], warmup: int, iters: int, repeats: int,
          threads: int, dtype: str, trust: bool, expect_sha256: Optional[str],
          max_memory: Optional[int], memory: bool, json_path: Optional[Path],
          csv_path: Optional[Path], plot_path: Optional[Path]) -> None:
    """Time every backend side by side (interleaved) and measure peak memory per forward."""
    import json as json_module

    from flash_export.bench import BenchConfig, benchmark
    from flash_export.bench_files import plot_report, require_matplotlib, write_csv

    if plot_path is not None:
        require_matplotlib()  # fail before the long run, not after
    ctx = click.get_current_context()
    config = BenchConfig(seqs=tuple(seq), chunks=tuple(chunks) if chunks else None, batch=batch,
                         backends=tuple(backends) if backends else None, warmup=warmup,
                         iters=iters, repeats=repeats, threads=threads, dtype=dtype,
                         memory=memory, max_memory=max_memory)
    progress = _Progress("benchmarking")
    try:
        report = benchmark(artifact, spec=_artifact_spec(ctx, spec, artifact, trust),
                           config=config, trust=trust, expect_sha256=expect_sha256,
                           progress=progress)
    finally:
        progress.close()
    env = report.environment
    click.echo(f"flash-export bench  {env['date']}  {env['platform']}, {env['cpu_count']} CPUs; "
               f"torch {env['torch']}, onnxruntime {env['onnxruntime']}")
    sp = report.spec
    click.echo(f"model: embed {sp['embed']}, heads {sp['heads']}, causal {sp['causal']}"
               f"{', ' + sp['model'] if sp.get('model') else ''}; batch {batch}, "
               f"{report.config.dtype}, threads {threads}")
    click.echo(f"{'backend':<20} {'chunk':>5} {'L':>6} {'p50 ms':>9} {'p90 ms':>9} "
               f"{'p99 ms':>9} {'tok/s':>9} {'GFLOP/s':>8} {'peak MB':>8}  status")
    for r in report.rows:
        name = r.backend + ("" if r.device == "cpu" else f":{r.device}")
        mem = r.peak_cuda_mb if r.peak_cuda_mb is not None else r.peak_rss_mb
        status = r.status if r.status == "ok" and not r.error else f"{r.status}: {r.error}"
        click.echo(f"{name:<20} {'-' if r.chunk is None else r.chunk:>5} {r.seq_q:>6} "
                   f"{_fmt(r.p50_ms, '.3f'):>9} {_fmt(r.p90_ms, '.3f'):>9} "
                   f"{_fmt(r.p99_ms, '.3f'):>9} {_fmt(r.tokens_per_s, '.3g'):>9} "
                   f"{_fmt(r.gflops_per_s, '.3g'):>8} {_fmt(mem, '.1f'):>8}  {status}")
    click.echo(f"method: {report.method}")
    click.echo(f"FLOPs: {report.flops_formula}")
    if json_path is not None:
        json_path.write_text(json_module.dumps(report.to_dict(), indent=2))
        click.echo(f"wrote {json_path}")
    if csv_path is not None:
        write_csv(report, csv_path)
        click.echo(f"wrote {csv_path}")
    if plot_path is not None:
        plot_report(report, plot_path)
        click.echo(f"wrote {plot_path}")


@main.command()
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, callback=_output_file, help="Write the report as JSON. Default: none.")
def doctor(json_path: Optional[Path]) -> None:
    """Check the install: versions, the native library, and one run of the custom op."""
    import json as json_module

    from flash_export.doctor import diagnose

    report = diagnose()
    for name, version in report.versions.items():
        click.echo(f"{name:<14} {version}")
    click.echo(f"{'providers':<14} {', '.join(report.providers) or '-'}"
               + ("" if report.cuda_provider_usable is None else
                  f" (CUDA usable here: {'yes' if report.cuda_provider_usable else 'no'})"))
    click.echo(f"{'library':<14} {report.library_path} (from {report.library_source})")
    if report.build_info:
        info = report.build_info
        archs = ", ".join(str(a) for a in info.get("cuda_archs", [])) or "-"
        click.echo(f"{'build':<14} ORT API {info.get('ort_api_version')} (runtime serves "
                   f"{report.runtime_api_version}), CUDA {'yes' if info.get('cuda') else 'no'} "
                   f"(archs {archs}), CPU kernel {info.get('cpu_isa')}")
    for check in report.checks:
        click.echo(f"[{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
        if not check.ok and check.hint:
            click.echo(f"       hint: {check.hint}")
    if json_path is not None:
        json_path.write_text(json_module.dumps(report.to_dict(), indent=2))
    if not report.ok:
        click.get_current_context().exit(1)


def run() -> None:
    """Console-script entry point."""
    main(prog_name="flash-export")


if __name__ == "__main__":
    sys.exit(main(prog_name="flash-export"))
