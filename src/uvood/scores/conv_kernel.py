"""Per-sample norms of Conv2d weight gradients by a compiled kernel that never forms them (issue 13).

For sample n with unfolded input patches A_n (T x d: T output positions, d = Cin kh kw patch elements)
and the output gradient G_{n,k} (Cout x T) of cotangent k, the weight gradient of sample n alone is
W_{n,k} = G_{n,k} A_n (Cout x d), and a reduction (norm, O) asks for

    l1:    sum_{c,j} |W_{n,k}[c, j] + O[c, j]|          l2sq:  sum_{c,j} (W_{n,k}[c, j] + O[c, j])^2

with O a constant offset of the weight's shape (BatchGrad's anchor gradient, Eq. 6) or 0. GradNorm's deep
L1 norm needs every entry of every W_{n,k}; torch forms them with one weight-gradient kernel call per
sample (``ConvRule._per_sample_weight_grads``) and reads them back for |.|. ``conv_kernel.c`` forms each
6 x 16 tile of W_{n,k} in AVX registers (a GEMM micro-kernel over the T positions, on panels of 16 patch
columns packed once per sample) and reduces the tile there, so no per-sample gradient reaches memory.
Each tile's |.| or squares are summed in float32 (a vector of 8 lanes, 12 values each), tiles in float64.
Measured on the CNN of ``benchmarks/gradient_scores.py`` (``benchmarks/fused_pass.py``, "conv kernel"
table): 1.4-3x faster than torch's per-sample kernel per layer.

The C file is compiled at first use with the machine's C compiler (``$CC``, else ``cc`` or ``gcc``;
``-O3 -mavx2 -mfma``) into ``<uvood cache>/native/`` (``$UVOOD_CACHE``, default ``~/.cache/uvood``), under a
name that hashes source and flags, written atomically (temp file + rename), and loaded with ctypes. ctypes
releases the GIL, so a call splits its samples over ``torch.get_num_threads()`` Python threads; each
sample's values come from the same instructions whatever the split (bitwise equal at any thread count).

Where the kernel cannot run, :func:`weight_norms` returns None and the engine takes torch's per-sample
kernel (values equal to float32 rounding; :func:`tag` enters the benchmark's cache keys, so values of one
path are never served as the other's): no C compiler or a failed build (the reason is logged once, at
warning level), a CPU without AVX2 (``torch.backends.cpu.get_cpu_capability()``), ``UVOOD_NATIVE=0`` in
the environment or :data:`ENABLED` set False, and layers it does not cover: not 2-D, groups > 1, not
float32 on the CPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..cache import default_cache_dir

#: use the compiled kernel where it covers a layer (``UVOOD_NATIVE=0`` in the environment sets it False)
ENABLED = os.environ.get("UVOOD_NATIVE", "1") != "0"
#: version of the kernel's values (summation order): enters :func:`tag`, hence the benchmark's cache keys
VERSION = 1
SOURCE = Path(__file__).with_name("conv_kernel.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-std=c99")
MR, NR = 6, 16  # register tile of conv_kernel.c: output channels x patch columns

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None; "why": why not; "pool": (pid, workers, executor)


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    return (shutil.which(cc) if cc else None) or shutil.which("cc") or shutil.which("gcc")


def _build(cc: str) -> Path:
    """The compiled library's path, building it first if it is not there (atomic: temp file + rename)."""
    src = SOURCE.read_bytes()
    digest = hashlib.sha256(src + " ".join((cc, *FLAGS)).encode()).hexdigest()[:16]
    folder = default_cache_dir() / "native"
    path = folder / f"conv_kernel-{digest}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        run = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(run.stderr or run.stdout).strip()[-500:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load():
    """The library (built and loaded once per process), or None with ``_state["why"]`` saying why."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, why = None, ""
        cc = _compiler()
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            why = f"the CPU lacks AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
        elif cc is None:
            why = "no C compiler found ($CC, cc, gcc)"
        else:
            try:
                lib = ctypes.CDLL(str(_build(cc)))
                P, In = ctypes.c_void_p, ctypes.c_int
                lib.conv_weight_norms.argtypes = [P, P] + [In] * 19 + [P, P, In, P, P, P, P]
                lib.conv_weight_norms.restype = None
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                lib, why = None, f"building {SOURCE.name} failed ({e})"
        if lib is None:
            log.warning("uvood: the compiled convolution kernel is not used (%s); per-sample convolution "
                        "gradient norms take torch's kernels (same values, slower)", why)
        _state["lib"], _state["why"] = lib, why
        return lib


def available() -> bool:
    """Whether the compiled kernel is enabled and loads on this machine (builds it on the first call)."""
    return ENABLED and _load() is not None


def tag() -> str:
    """Which path computes convolution weight-gradient norms here, for cache keys: ``"conv-kernel:<VERSION>"``
    or ``"torch"``."""
    return f"conv-kernel:{VERSION}" if available() else "torch"


def covers(module: torch.nn.Module, a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the kernel computes this layer: a 2-D convolution without groups, float32 on the CPU."""
    return (isinstance(module, torch.nn.Conv2d) and module.groups == 1 and a.ndim == 4 and g.ndim == 5
            and a.dtype == g.dtype == torch.float32 and a.device.type == g.device.type == "cpu")


def _pool(workers: int) -> ThreadPoolExecutor:
    pid, size, pool = _state.get("pool", (None, 0, None))
    if pid != os.getpid() or size < workers:  # a forked child gets its own threads
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="uvood-conv")
        _state["pool"] = (os.getpid(), workers, pool)
    return pool


def weight_norms(module: torch.nn.Module, a: torch.Tensor, padding: list[int], g: torch.Tensor,
                 reds: list[tuple[str, torch.Tensor | None]]) -> torch.Tensor | None:
    """R x K x n (float64): for each (norm, offset) of ``reds``, the norm of every per-sample, per-cotangent
    weight gradient of ``module`` plus ``offset`` (the module docstring's formulas), or None where the kernel
    does not run (see the module docstring). ``a``: the layer's input (n x Cin x H x W) with any non-zero
    padding mode already applied, ``padding``: the zero padding left, ``g``: K x n x Cout x Ho x Wo output
    gradients (a view of a sample-major buffer, or any layout)."""
    if not (covers(module, a, g) and available()):
        return None
    lib = _state["lib"]
    K, n = g.shape[:2]
    cout, cin, kh, kw = module.weight.shape
    ho, wo = g.shape[3:]
    T, d = ho * wo, cin * kh * kw
    dpad, cpad = -(-d // NR) * NR, -(-cout // MR) * MR
    a = a.detach().contiguous()
    gs = g.detach().transpose(0, 1).reshape(n, K * cout, T).contiguous()  # no copy from the engine's buffer
    R = len(reds)
    kinds = (ctypes.c_int * R)(*[0 if nm == "l1" else 1 for nm, _ in reds])
    offs, keep = (ctypes.c_void_p * R)(), []
    for r, (_, off) in enumerate(reds):
        if off is not None:
            o = torch.zeros(cpad, dpad, dtype=torch.float32)
            o[:cout, :d] = off.detach().to(torch.float32).reshape(cout, d)
            keep.append(o)
            offs[r] = o.data_ptr()
    out = torch.zeros(R, K, n, dtype=torch.float64)
    zeros = torch.zeros(T, dtype=torch.float32)
    sh, sw = module.stride
    dh, dw = module.dilation
    workers = max(1, min(torch.get_num_threads(), n))
    bounds = [n * t // workers for t in range(workers + 1)]

    def part(t: int) -> None:
        work = torch.empty(dpad * T, dtype=torch.float32)  # every panel (T x NR each), packed
        scratch = torch.empty(4 * R * K, dtype=torch.float64)
        lib.conv_weight_norms(a.data_ptr(), gs.data_ptr(), bounds[t], bounds[t + 1], n, cin, a.shape[2], a.shape[3],
                              K, cout, kh, kw, sh, sw, padding[0], padding[1], dh, dw, ho, wo, R, kinds, offs, dpad,
                              work.data_ptr(), zeros.data_ptr(), scratch.data_ptr(), out.data_ptr())

    if workers == 1:
        part(0)
    else:
        for f in [_pool(workers).submit(part, t) for t in range(workers)]:
            f.result()
    return out
