"""flash_export::attention: eager, TorchScript, torch.compile and torch.export see one op.

The CPU kernel is the native core (through its C entry point); every result is judged against
the float64 reference by the tolerance rule. The libtorch shim's registration and its interplay
with the Python one run in subprocesses (a process can define the schema once).
"""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from helpers import assert_matches_reference, core_reference

from flash_export import FlashAttention, ModelSpec, reference_forward
from flash_export.export.prepare import quiet_jit_deprecation
from flash_export.export.torchscript import export_torchscript, load_torchscript
from flash_export.nn.swap import with_attention
from flash_export.nn.torch_op import SCHEMA, SCHEMA_V2, register

ROOT = Path(__file__).resolve().parents[1]


def _inputs(b, lq, lk, e, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, e, generator=g).to(dtype) for n in (lk, lk, lq))


def _mask(b, lq, lk, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, 1, lq, lk, generator=g) > 0.25
    mask[0, 0, 0] = False  # a row that sees no key: zeros
    return mask


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b,lq,lk", [(1, 1, 1), (2, 7, 63), (3, 65, 7), (1, 129, 129)],
                         ids=["1x1", "7x63", "65x7", "129x129"])
def test_native_module_matches_float64_reference(b, lq, lk, causal, masked):
    model = FlashAttention(64, 4, 16, causal=causal).eval()
    native = with_attention(model, "native")
    values, keys, queries = _inputs(b, lq, lk, 64)
    mask = _mask(b, lq, lk) if masked else None
    with torch.no_grad():
        got = native(values, keys, queries, mask)
        baseline = reference_forward(model, values, keys, queries, mask, dtype=torch.float32)
    assert_matches_reference(got, reference_forward(model, values, keys, queries, mask), baseline)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_op_runs_half_precisions_within_the_rule(dtype):
    v, k, q = _inputs(2, 33, 70, 32, dtype=dtype)
    mask = _mask(2, 33, 70)
    got = torch.ops.flash_export.attention(q, k, v, mask, 4, 16, True, 0.5)
    assert got.dtype == dtype and got.shape == q.shape

    def heads(x):  # (B, L, E) -> (B, H, L, D)
        return x.view(x.size(0), x.size(1), 4, 8).transpose(1, 2)

    def ref(dt):
        o = core_reference(heads(q), heads(k), heads(v), mask, True, 0.5, dt)
        return o.transpose(1, 2).reshape(q.shape)  # (B, Lq, E)

    assert_matches_reference(got, ref(torch.float64), ref(dtype))


def test_op_reads_strided_inputs_and_broadcast_masks():
    register()
    base = torch.randn(2, 9, 2, 32)
    q = base[:, :, 0]  # (B, L, E) with a row stride of 2E
    k, v = torch.randn(2, 12, 32), torch.randn(2, 12, 32)
    mask = torch.rand(12) > 0.3  # rank 1: broadcast to (B, H, Lq, Lk)
    got = torch.ops.flash_export.attention(q, k, v, mask, 4, 5, False, 0.3)
    want = torch.ops.flash_export.attention(q.contiguous(), k, v,
                                            mask.expand(2, 4, 9, 12).contiguous(), 4, 5, False,
                                            0.3)
    assert torch.equal(got, want)


@pytest.mark.parametrize("case,message", [
    ((torch.randn(2, 5, 32), torch.randn(2, 6, 32), torch.randn(2, 7, 32), None, 4),
     r"value has sequence length 7, expected 6 \(key's sequence length\)"),
    ((torch.randn(2, 5, 32), torch.randn(2, 6, 32), torch.randn(2, 6, 32), None, 5),
     r"query has embed 32, not divisible by num_heads 5"),
    ((torch.randn(2, 5, 32), torch.randn(2, 6, 32), torch.randn(2, 6, 32),
      torch.ones(2, 1, 5, 7, dtype=torch.bool), 4),
     r"mask dimension 3 is 7, expected 1 or 6 \(Lk\) to broadcast to \(B, num_heads, Lq, Lk\)"),
    ((torch.randn(2, 5, 32), torch.randn(2, 6, 32), torch.randn(2, 6, 32),
      torch.ones(2, 1, 5, 6), 4), r"mask has element type float32, expected bool"),
    ((torch.randn(2, 5, 32).double(), torch.randn(2, 6, 32).double(),
      torch.randn(2, 6, 32).double(), None, 4),
     r"query has element type float64, expected float32, float16 or bfloat16"),
    ((torch.randn(2, 5, 32), torch.randn(2, 6, 32).half(), torch.randn(2, 6, 32).half(), None, 4),
     r"key has element type float16, expected float32 \(query's element type\)"),
], ids=["lengths", "heads", "mask-shape", "mask-dtype", "float64", "key-dtype"])
def test_op_refuses_what_the_kernel_cannot_honour(case, message):
    register()
    q, k, v, mask, heads = case
    with pytest.raises(ValueError, match=f"^flash_export::attention: {message}"):
        torch.ops.flash_export.attention(q, k, v, mask, heads, 8, False, 1.0)


def _to(device, *tensors):
    return tuple(None if t is None else t.to(device) for t in tensors)


@pytest.mark.parametrize("meta", ["mask", "query"], ids=["meta-mask", "meta-query"])
def test_inputs_on_two_devices_are_refused_before_any_kernel_runs(meta):
    """CPU inputs with a meta mask dispatch to the fake kernel, which returned uninitialised
    memory as if it were the answer; every input must be on query's device."""
    register()
    q, k, v = (torch.randn(2, n, 32) for n in (5, 6, 6))
    mask = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    if meta == "mask":
        mask, expected = mask.to("meta"), "mask is on meta, expected cpu"
    else:
        q, expected = q.to("meta"), "key is on cpu, expected meta"
    with pytest.raises(ValueError, match=f"^flash_export::attention: {expected} "
                                         r"\(query's device\)$"):
        torch.ops.flash_export.attention(q, k, v, mask, 4, 8, False, 0.5)
    out = torch.ops.flash_export.attention(*_to("meta", q, k, v, mask), 4, 8, False, 0.5)
    assert out.device.type == "meta" and out.shape == (2, 5, 32)  # all meta: the fake kernel


SCALES = [(float("nan"), "nan"), (float("inf"), "inf"), (0.0, "0"), (-0.0, "-0"),
          (1e39, "1e+39"), (1e-50, "1e-50")]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("scale,shown", SCALES, ids=[s for _, s in SCALES])
def test_scale_must_be_finite_and_not_zero_in_float32(scale, shown, device):
    """The contract's scale rule, on the CPU kernel and the fake one alike: NaN gave finite output,
    0 was accepted, 1e39 gave all-NaN rows where the reference is finite."""
    register()
    q, k, v = _to(device, *(torch.randn(2, n, 32) for n in (5, 6, 6)))
    with pytest.raises(ValueError, match=f"^flash_export::attention: scale is {re.escape(shown)}, "
                                         "expected a finite float32 other than 0$"):
        torch.ops.flash_export.attention(q, k, v, None, 4, 8, False, scale)


@pytest.mark.parametrize("scale", [-0.5, 1e-30, 8.0], ids=["negative", "tiny", "large"])
def test_every_finite_nonzero_float32_scale_runs(scale):
    register()
    v, k, q = _inputs(2, 5, 6, 32)

    def heads(x):  # (B, L, E) -> (B, H, L, D)
        return x.view(x.size(0), x.size(1), 4, 8).transpose(1, 2)

    got = torch.ops.flash_export.attention(q, k, v, None, 4, 8, False, scale)
    ref, base = (core_reference(heads(q), heads(k), heads(v), None, False, scale, dt)
                 .transpose(1, 2).reshape(q.shape) for dt in (torch.float64, torch.float32))
    assert_matches_reference(got, ref, base)


@pytest.mark.parametrize("fault", ["key-dtype", "query-dtype", "mask-dtype"])
def test_the_fake_kernel_refuses_in_the_cpu_kernels_words(fault):
    """What the fake kernel checks without sizes, it says as the library's params filler does."""
    register()
    q, k, v = (torch.randn(2, n, 32) for n in (5, 6, 6))
    mask = None
    if fault == "key-dtype":
        k = k.half()
    elif fault == "query-dtype":
        q, k, v = q.double(), k.double(), v.double()
    else:
        mask = torch.ones(5, 6)
    messages = []
    for device in ("cpu", "meta"):
        with pytest.raises(ValueError) as refused:
            torch.ops.flash_export.attention(*_to(device, q, k, v, mask), 4, 8, False, 0.5)
        messages.append(str(refused.value))
    assert messages[0] == messages[1]


def test_backward_is_refused_with_a_clear_error():
    native = FlashAttention(32, 4, 8, attention="native")
    values, keys, queries = _inputs(2, 5, 6, 32)
    out = native(values, keys, queries)  # the forward runs with grad on
    with pytest.raises(RuntimeError, match="has no backward: it is an inference kernel"):
        out.sum().backward()


def test_default_module_stays_the_pure_chunk_loop_when_scripted():
    model = FlashAttention(32, 4, 8)
    assert model.attention == "chunk" and "native" not in repr(model)
    with quiet_jit_deprecation():
        portable = torch.jit.script(model)
        native = torch.jit.script(with_attention(model, "native"))
    assert "flash_export::attention" not in str(portable.inlined_graph)
    assert "flash_export::attention" in str(native.inlined_graph)
    with pytest.raises(ValueError, match="attention must be one of"):
        FlashAttention(32, 4, 8, attention="fast")


def test_torch_export_and_compile_see_one_op_with_dynamic_lengths():
    model = FlashAttention(32, 4, 8, causal=True, attention="native").eval()
    values, keys, queries = _inputs(2, 5, 6, 32)
    batch, lq, lk = (torch.export.Dim(n) for n in ("batch", "q_len", "k_len"))
    program = torch.export.export(model, (values, keys, queries), dynamic_shapes=(
        {0: batch, 1: lk}, {0: batch, 1: lk}, {0: batch, 1: lq}))
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.flash_export.attention.default in ops
    values, keys, queries = _inputs(3, 17, 40, 32, seed=5)  # lengths not seen at export
    with torch.no_grad():
        assert torch.equal(program.module()(values, keys, queries),
                           model(values, keys, queries))
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
        assert torch.equal(compiled(values, keys, queries), model(values, keys, queries))


def test_torchscript_native_archive_records_its_needs_and_validates(tmp_path):
    from flash_export.check.validate import validate

    spec = ModelSpec(embed=32, heads=4, chunk=8, causal=True)
    path = export_torchscript(spec.build(), tmp_path / "native.pt", spec=spec, attention="native")
    module, meta = load_torchscript(path)
    assert meta["attention"] == "native" and "libflash_export_torch.so" in meta["requires"]
    assert "flash_export::attention" in str(module.inlined_graph)
    report = validate(path, seq=[1, 9, 30], batch=[2])
    assert report.passed, report.failure_lines()
    assert [b.name for b in report.backends] == ["eager", "torchscript-native"]
    assert {(c.case.seq_q != c.case.seq_k, c.case.mask) for c in report.backends[1].cases} == {
        (False, False), (False, True), (True, False), (True, True)}


def test_bench_exports_and_times_torchscript_native_on_the_fly():
    from flash_export.bench.benchmark import BenchConfig, benchmark

    report = benchmark(spec=ModelSpec(embed=32, heads=4, chunk=8), config=BenchConfig(
        seqs=(9,), backends=("torchscript-native", "native"), iters=2, warmup=1, memory=False))
    assert [(r.backend, r.status) for r in report.rows] == [("torchscript-native", "ok"),
                                                            ("native", "ok")], report.rows


def test_the_shim_declares_the_python_schemas_character_for_character():
    source = (ROOT / "custom_ops" / "torch" / "flash_export_torch.cc").read_text()
    declared = [m.group(1) for m in re.finditer(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", source)]
    assert ["".join(re.findall(r"\"([^\"]*)\"", d)) for d in declared] == [SCHEMA, SCHEMA_V2]


# --------------------------------------------------------------------------- Python and the shim

def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_python_keeps_a_shim_loaded_first_and_adds_only_fake_and_autograd(shim_library):
    run = _python(f"""
import torch
torch.ops.load_library({str(shim_library)!r})
from flash_export.nn.torch_op import register
from flash_export import FlashAttention
register()
m = FlashAttention(32, 4, 8, causal=True, attention="native").eval()
x = torch.randn(2, 9, 32)
ep = torch.export.export(m, (x, x, x[:, :5]))  # the fake kernel is Python's
with torch.no_grad():
    ref = FlashAttention(32, 4, 8, causal=True).eval()
    ref.load_state_dict(m.state_dict())
    print(float((m(x, x, x[:, :5]) - ref(x, x, x[:, :5])).abs().max()))
""")
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) < 1e-5


_TEAM_RUN = """
import sys, torch
{load}
from flash_export.nn.torch_op import register
register()
torch.set_num_threads(2)
a = torch.randn(256, 256)
a @ a  # torch's OpenMP team of 2 exists from here on
q = torch.randn(2, 1536, 256)  # (B, L, E): H = 4, D = 64, about 50 ms a call
op = lambda: torch.ops.flash_export.attention(q, q, q, None, 4, 64, False, 0.125)
op()
print("ready", flush=True)
sys.stdin.readline()
for _ in range(10):
    op()
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc/PID/task")
@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info().split("parallel backend:")[-1],
                    reason="torch here does not thread with OpenMP")
@pytest.mark.parametrize("kernel", ["python", "shim"])
def test_the_op_runs_on_torchs_threads_and_starts_none_of_its_own(kernel, request):
    """Both CPU kernels (the Python registration's, and the shim's in a C++ or shim-first
    process) run their work items on torch's intra-op OpenMP team: after torch's own parallel
    work, ten 2-thread calls start no thread. The threads are watched from this process through
    /proc, while the other one computes. (Threads of the kernel's own, one more per call, contend
    with torch's still-spinning ones: the whole forward took 1.3-1.6x as long on 2 cores.)"""
    load = ""
    if kernel == "shim":
        load = f"torch.ops.load_library({str(request.getfixturevalue('shim_library'))!r})"
    child = subprocess.Popen([sys.executable, "-c", _TEAM_RUN.format(load=load)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        assert child.stdout.readline().strip() == "ready"
        tasks = Path(f"/proc/{child.pid}/task")
        before = {p.name for p in tasks.iterdir()}
        seen, looks = set(before), 0
        child.stdin.write("go\n")
        child.stdin.flush()
        while child.poll() is None:
            try:
                seen.update(p.name for p in tasks.iterdir())
            except FileNotFoundError:  # exiting
                break
            looks += 1
        assert child.wait(timeout=120) == 0
    finally:
        child.kill()
    assert looks > 100  # the calls were watched
    assert seen == before, f"{len(seen - before)} threads started during the calls"


# Faults the two CPU kernels (Python's and the shim's) refuse through the library's params filler,
# as arguments to build in either process.
SHARED_FAULTS = {
    "key-dtype": "q, k.half(), v.half(), None, 4, 8, False, 0.5",
    "scale-nan": "q, k, v, None, 4, 8, False, float('nan')",
    "scale-zero": "q, k, v, None, 4, 8, False, 0.0",
    "scale-overflow": "q, k, v, None, 4, 8, False, 1e39",
    "mask-shape": "q, k, v, torch.ones(3, 6, dtype=torch.bool), 4, 8, False, 0.5",
    "heads": "q, k, v, None, 5, 8, False, 0.5",
}
_FAULT_RUN = """
import json, torch
{load}
from flash_export.nn.torch_op import register
register()
q, k, v = (torch.randn(2, n, 32) for n in (5, 6, 6))
said = {{}}
for name, args in {faults!r}.items():
    try:
        eval("torch.ops.flash_export.attention(" + args + ")")
        said[name] = "accepted"
    except (RuntimeError, ValueError) as exc:
        said[name] = str(exc).splitlines()[0]
print(json.dumps(said))
"""


def test_the_shim_refuses_what_the_python_kernel_refuses_in_its_words(shim_library):
    """The C++ process's kernel (the shim) and Python's describe the tensors to the same params
    filler: the same faults, the same one-line messages (before, the shim took a NaN scale)."""
    load = f"torch.ops.load_library({str(shim_library)!r})"
    run = _python(_FAULT_RUN.format(load=load, faults=SHARED_FAULTS))
    assert run.returncode == 0, run.stderr
    shim = json.loads(run.stdout.strip().splitlines()[-1])
    register()
    q, k, v = (torch.randn(2, n, 32) for n in (5, 6, 6))  # noqa: F841 (read by the faults)
    for name, args in SHARED_FAULTS.items():
        with pytest.raises(ValueError) as refused:
            eval("torch.ops.flash_export.attention(" + args + ")")
        assert shim[name] == str(refused.value), name
        assert shim[name].startswith("flash_export::attention: "), shim[name]


def test_the_shim_refuses_to_load_after_the_python_registration(shim_library):
    run = _python(f"""
import torch
from flash_export.nn.torch_op import register
register()
torch.ops.load_library({str(shim_library)!r})
""")
    assert run.returncode != 0
    assert "flash_export::attention" in run.stderr and "multiple times" in run.stderr



def test_a_missing_native_library_fails_registration_with_a_typed_error(tmp_path):
    run = subprocess.run([sys.executable, "-c", """
from flash_export import FlashAttention, RuntimeLibraryError
try:
    FlashAttention(32, 4, 8, attention="native")
except RuntimeLibraryError as exc:
    print("refused:", exc)
"""], capture_output=True, text=True, timeout=120,
        env={**os.environ, "FLASH_EXPORT_LIBRARY": str(tmp_path / "missing.so")})
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("refused: cannot load the native library") and \
        "missing.so" in run.stdout


# --------------------------------------------------------------------------- contract v2

def _v2_tensors(call):
    """The call's numpy arrays as torch tensors; head-major ones as (B, H, L, D) views of a
    (B, L, H, D) buffer, the layout a model's projections give, so the op reads them in place."""
    import numpy as np

    def view(x):
        if x.ndim != 4:
            return torch.from_numpy(x)
        # (B, H, L, D) -> a (B, L, H, D) buffer -> its (B, H, L, D) view
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).transpose(1, 2)

    o = call["options"]
    tensors = [view(call[n]) for n in ("q", "k", "v")]
    tensors += [None if o.get(n) is None else torch.from_numpy(np.asarray(o[n]))
                for n in ("mask", "seqlens_k", "bias")]
    attrs = dict(num_heads=call["num_heads"], kv_num_heads=o["kv_num_heads"], chunk_size=16,
                 causal=o["causal"], window_size=o["window_size"], softcap=o["softcap"],
                 output_layout=o["output_layout"])
    return tensors, attrs


_V2_TORCH = ["gqa-G1-decode", "gqa-G4-prefill", "gqa-G32-decode", "head-major-in-out",
             "mixed-layouts-out", "value-dim-differs", "seqlens-prefill-ragged",
             "seqlens-left-padded", "window-decode-seqlens", "softcap", "everything",
             "bias-1x4x1x37", "bias-5x37"]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("case", _V2_TORCH)
def test_v2_overload_matches_reference_reading_head_major_views_in_place(case, dtype):
    from _native_cases import V2_CASES, V2_DTYPES, check_output_v2, v2_call

    call = v2_call(V2_CASES[case], V2_DTYPES[dtype])
    tensors, attrs = _v2_tensors(call)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = torch.ops.flash_export.attention.v2(*tensors, **attrs)
    copies = [e.name for e in prof.events() if e.name in ("aten::clone", "aten::copy_")]
    assert not copies, f"the op copied its inputs: {copies}"
    check_output_v2(out.numpy(), call["q"], call["k"], call["v"], call["num_heads"],
                    **call["options"])
    with torch.device("meta"):  # the fake kernel's shape is the kernel's
        fake = torch.ops.flash_export.attention.v2(
            *(None if t is None else t.to("meta") for t in tensors), **attrs)
    assert fake.shape == out.shape and fake.dtype == out.dtype


def test_v2_is_scripted_and_compiled_to_pt2_and_both_run_by_the_shim_alone(tmp_path,
                                                                            shim_library):
    """One call with every v2 argument (grouped heads, head-major views in and out, seqlens_k,
    window, bias, softcap, causal): TorchScript resolves the overload by its keywords,
    torch.export keeps it as one call with the fake kernel's shape, and both the TorchScript
    archive (on float32 and float16 inputs) and the AOTInductor `.pt2` package (float32, one
    compile) run in a process that has only the libtorch shim (as a C++ one would), matching the
    float64 reference."""
    from _native_cases import V2_CASES, check_output_v2, v2_call

    with quiet_jit_deprecation():
        scripted = torch.jit.script(_V2Call())
        scripted.save(str(tmp_path / "v2.pt"))
    calls = {dtype: v2_call(V2_CASES["everything"], dtype) for dtype in (np.float32, np.float16)}
    tensors = {dtype: _v2_tensors(call)[0] for dtype, call in calls.items()}
    for dtype, inputs in tensors.items():
        torch.save([t.contiguous() if t is not None else None for t in inputs],
                   tmp_path / f"in_{np.dtype(dtype).name}.pt")
    program = torch.export.export(_V2Call(), tuple(tensors[np.float32]))
    exported = [n for n in program.graph.nodes
                if n.op == "call_function" and "flash_export" in str(n.target)]
    assert len(exported) == 1
    with warnings.catch_warnings():  # torch's own pytree deprecation, raised by the compile
        warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
        package = torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp_path / "v2.pt2"))
    run = _python(f"""
import torch
torch.ops.load_library({str(shim_library)!r})
scripted = torch.jit.load({str(tmp_path / "v2.pt")!r})
for dtype in ("float32", "float16"):
    inputs = torch.load(f"{tmp_path}/in_{{dtype}}.pt")
    torch.save(scripted(*inputs), f"{tmp_path}/out_{{dtype}}.pt")
compiled = torch._inductor.aoti_load_package({package!r})
torch.save(compiled(*torch.load(f"{tmp_path}/in_float32.pt")), f"{tmp_path}/out_pt2.pt")
""")
    assert run.returncode == 0, run.stderr
    for dtype, call in calls.items():
        out = torch.load(tmp_path / f"out_{np.dtype(dtype).name}.pt")
        check_output_v2(out.numpy(), call["q"], call["k"], call["v"], call["num_heads"],
                        **call["options"])
        assert torch.equal(scripted(*tensors[dtype]), out)  # the Python kernel and the shim's
    assert exported[0].meta["val"].shape == out.shape
    call = calls[np.float32]
    out_pt2 = torch.load(tmp_path / "out_pt2.pt")
    check_output_v2(out_pt2.numpy(), call["q"], call["k"], call["v"], call["num_heads"],
                    **call["options"])


class _V2Call(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: Optional[torch.Tensor], seqlens_k: Optional[torch.Tensor],
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.ops.flash_export.attention(q, k, v, mask, seqlens_k, bias, num_heads=8,
                                                kv_num_heads=2, chunk_size=16, causal=True,
                                                window_size=9, softcap=5.0, output_layout=1)
