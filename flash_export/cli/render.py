"""Plain-text renderings of the library's reports, for the CLI to print."""

from typing import Any, List, Optional, Tuple

_ORIGINS = {
    "trust store": "exported by you here (trust store)",
    "expected sha256": "the hash you expected (--expect-sha256)",
    "--trust": "unknown origin, loaded because of --trust",
    "unverified": "unknown origin: the reference is what the file's own metadata describes "
                  "(pass --expect-sha256 or your model options to pin it)",
}


def fmt(value: Optional[float], spec: str = ".2e") -> str:
    """`value` formatted, or "-" when there is none."""
    return "-" if value is None else format(value, spec)


def validation_lines(report: Any, verbose: bool) -> List[str]:
    """A ValidationReport as text: header, provenance, rule, then a row per backend (or case)."""
    s = report.spec
    described = (f"the spec from the {report.spec_source} (embed {s.embed}, heads {s.heads}, "
                 f"chunk {s.chunk}, causal {s.causal}, "
                 + (f"weights {s.weights}" if s.weights else f"seed {s.seed}")
                 + f"{', model ' + s.model if s.model else ''})") if s else "the model passed in"
    lines = [f"{report.artifact}: {report.kind}"
             + (f" target {report.target}" if report.target else "")
             + f", {report.dtype}, provider {report.provider}",
             f"reference: {report.reference or 'float64 plain attention of ' + described}",
             f"provenance: sha256 {report.provenance.sha256[:16]}..., "
             + _ORIGINS[report.provenance.source],
             f"rule: {report.rule}"]
    bad = [c for c in report.checks if not c.passed]
    lines.append(f"structural checks: {len(report.checks) - len(bad)}/{len(report.checks)} "
                 "passed")
    lines += [f"{c.name}: {c.got}" + ("" if c.passed else f" (expected {c.expected})")
              for c in report.checks if c.name.startswith("generate.")]
    if not report.backends:
        return lines
    # The bound limits the max abs error (a relative error is shown for information only), and
    # "used" is the worst error as a share of what the rule allows: a row passes up to 100%.
    lines.append(f"{'backend':<18} {'shape':<34} {'max abs':>9} {'abs bound':>9} {'used':>6} "
                 f"{'p99 abs':>9} {'max rel':>9}  result")
    for b in report.backends:
        if b.load_error:
            lines.append(f"{b.name:<18} {'(failed to load)':<34} {'':>9} {'':>9} {'':>6} "
                         f"{'':>9} {'':>9}  FAIL")
            continue
        rows = b.cases if verbose else [w for w in [b.worst()] if w is not None]
        for r in rows:
            c = r.comparison
            shape = r.case.label if verbose else f"worst of {len(b.cases)}: {r.case.label}"
            verdict = "ok" if (b.passed if not verbose else r.passed) else "FAIL"
            if not verbose:
                verdict += f" ({len(b.cases) - len(b.failures)}/{len(b.cases)})"
            bound = c.bound if c and c.rule == "2x-baseline" else None  # atol/rtol: per element
            lines.append(f"{b.name:<18} {shape:<34} {fmt(c.max_abs if c else None):>9} "
                         f"{fmt(bound):>9} {_percent(c.used if c else None):>6} "
                         f"{fmt(c.p99_abs if c else None):>9} "
                         f"{fmt(c.max_rel if c else None):>9}  {verdict}")
    return lines


def _percent(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "inf" if value == float("inf") else f"{100 * value:.0f}%"


def bench_lines(report: Any) -> List[str]:
    """A BenchReport as text: environment, model, a row per (backend, chunk, batch, length)."""
    env, sp, cfg = report.environment, report.spec, report.config
    lines = [f"flash-export bench  {env['date']}  {env['platform']}, {env['cpu_count']} CPUs; "
             f"torch {env['torch']}, onnxruntime {env['onnxruntime']}",
             f"model: embed {sp['embed']}, heads {sp['heads']}, causal {sp['causal']}"
             f"{', ' + sp['model'] if sp.get('model') else ''}; "
             f"{cfg.dtype}, threads {cfg.threads}",
             f"{'backend':<20} {'chunk':>5} {'B':>4} {'L':>6} {'p50 ms':>9} {'p90 ms':>9} "
             f"{'p99 ms':>9} {'tok/s':>9} {'GFLOP/s':>8} {'peak MB':>8} {'block':>5}  status"]
    for r in report.rows:
        name = r.backend + ("" if r.device == "cpu" else f":{r.device}")
        mem = r.peak_cuda_mb if r.peak_cuda_mb is not None else r.peak_rss_mb
        status = r.status if r.status == "ok" and not r.error else f"{r.status}: {r.error}"
        lines.append(f"{name:<20} {'-' if r.chunk is None else r.chunk:>5} {r.batch:>4} "
                     f"{r.seq_q:>6} "
                     f"{fmt(r.p50_ms, '.3f'):>9} {fmt(r.p90_ms, '.3f'):>9} "
                     f"{fmt(r.p99_ms, '.3f'):>9} {fmt(r.tokens_per_s, '.3g'):>9} "
                     f"{fmt(r.gflops_per_s, '.3g'):>8} {fmt(mem, '.1f'):>8} "
                     f"{fmt(r.block, 'd'):>5}  {status}")
    return lines + [f"method: {report.method}", f"FLOPs: {report.flops_formula}"]


def doctor_lines(report: Any) -> List[Tuple[str, bool]]:
    """A DoctorReport as text: (line, whether it tells of a failure) for each line."""
    lines = [(f"{name:<14} {version}", False) for name, version in report.versions.items()]
    lines.append((f"{'providers':<14} {', '.join(report.providers) or '-'}"
                  + ("" if report.cuda_provider_usable is None else
                     f" (CUDA usable here: {'yes' if report.cuda_provider_usable else 'no'})"),
                  False))
    lines.append((f"{'library':<14} {report.library_path} (from {report.library_source})", False))
    if report.build_info:
        info = report.build_info
        archs = ", ".join(str(a) for a in info.get("cuda_archs", [])) or "-"
        lines.append((f"{'build':<14} ORT API {info.get('ort_api_version')} (runtime serves "
                      f"{report.runtime_api_version}), CUDA {'yes' if info.get('cuda') else 'no'}"
                      f" (archs {archs}), CPU kernel {info.get('cpu_isa')}", False))
    for check in report.checks:
        lines.append((f"[{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}",
                      not check.ok))
        if not check.ok and check.hint:
            lines.append((f"       hint: {check.hint}", True))
    return lines
