"""The op tbfast::weight_digest (tbfast/ops/digest.py, csrc/digest_cpu.cpp): a 128-bit digest of a
tensor's bytes, the base-weight check of the LoRA cache.

Oracles: the definition written word by word with Python ints (tests/oracle.py, anchored to the
published first output of splitmix64) on small inputs; the same definition vectorized with numpy
uint64 (which wraps mod 2^64) on inputs of several MiB. The C++ kernel (each vector variant) and
the torch reference are held to them, and to each other on random inputs of odd lengths.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from childproc import run_json
from oracle import DIGEST_KEYS, oracle_digest, splitmix64_finalizer
from tbfast import _backend
from tbfast.errors import BackendUnavailableError
from tbfast.kernels.ref import weight_digest_ref
from tbfast.ops import digest

HAS_CPP = _backend.has_op("weight_digest") and torch._C._dispatch_has_kernel_for_dispatch_key(digest.OP, "CPU")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="tbfast._C extension not built")
BACKENDS = ["cpp", "torch"] if HAS_CPP else ["torch"]
U64 = (1 << 64) - 1
SMALL_LENGTHS = [0, 1, 7, 8, 9, 63, 64, 65, 1000]


def numpy_digest(data: bytes) -> tuple[int, int]:
    """The definition in numpy uint64 (products and sums wrap mod 2^64; shifts are logical)."""
    L = len(data)
    x = np.frombuffer(data + bytes(-L % 8), dtype="<u8")
    pos = np.arange(1, len(x) + 1, dtype=np.uint64)
    out = []
    with np.errstate(over="ignore"):
        for key in DIGEST_KEYS:
            z = x ^ (pos * np.uint64(key))
            z ^= z >> np.uint64(30)
            z *= np.uint64(0xBF58476D1CE4E5B9)
            z ^= z >> np.uint64(27)
            z *= np.uint64(0x94D049BB133111EB)
            z ^= z >> np.uint64(31)
            s = int(z.sum(dtype=np.uint64))
            out.append(splitmix64_finalizer(s ^ ((L * key) & U64)))
    return out[0], out[1]


def unsigned(t: torch.Tensor) -> tuple[int, int]:
    assert t.dtype == torch.int64 and tuple(t.shape) == (2,)
    h0, h1 = t.tolist()
    return h0 & U64, h1 & U64


def random_bytes(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["auto", "avx2", "portable"])
def simd(request, monkeypatch):
    """The C++ kernel's vector variant: the best the CPU has, or capped by TBFAST_DIGEST_SIMD
    (read at every call), so every variant's loop is checked on an AVX-512 machine."""
    if request.param == "auto":
        monkeypatch.delenv("TBFAST_DIGEST_SIMD", raising=False)
    else:
        monkeypatch.setenv("TBFAST_DIGEST_SIMD", request.param)
    return request.param


@pytest.fixture(params=[1, 2])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------------- oracles


def test_oracles_agree_and_mix_is_splitmix64():
    """splitmix64 with seed 0 first outputs 0xE220A8397B1DCDAF (Vigna's published generator);
    the word-by-word and the numpy oracles agree."""
    assert splitmix64_finalizer(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    for L in SMALL_LENGTHS + [4099]:
        data = bytes(random_bytes(L, L).tolist())
        assert oracle_digest(data) == numpy_digest(data), L
    assert oracle_digest(b"") == (0, 0)  # mix(0) = 0: the empty string; shape and dtype tell it apart


# ------------------------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L", SMALL_LENGTHS)
def test_small_inputs_match_the_definition(L, backend, simd):
    data = random_bytes(L, seed=L)
    assert unsigned(digest.weight_digest(data, backend=backend)) == oracle_digest(bytes(data.tolist()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_parallel_sizes_match_the_numpy_oracle(backend, threads, simd):
    """3 MiB + 5 bytes: many parallel ranges and prefetch blocks, a partial last word."""
    data = random_bytes(3 * 2**20 + 5, seed=1)
    assert unsigned(digest.weight_digest(data, backend=backend)) == numpy_digest(data.numpy().tobytes())


@pytest.mark.parametrize("L", [2**23 - 1, 2**23, 2**23 + 1, 2**23 + 8])
def test_reference_piece_boundaries(L):
    """The reference works in pieces of 2^20 words (8 MiB): lengths around one piece, with and
    without a partial last word (2^23 + 1 once counted that word twice)."""
    data = random_bytes(L, seed=7)
    assert unsigned(weight_digest_ref(data)) == numpy_digest(data.numpy().tobytes())


@needs_cpp
@pytest.mark.parametrize("L", [5 * 2**20 + 3, 2**23 + 1, 2**22 - 7])
def test_cpp_equals_the_reference_on_odd_lengths(L, threads, simd):
    data = random_bytes(L, seed=L % 1000)
    assert torch.equal(torch.ops.tbfast.weight_digest(data), weight_digest_ref(data))
    # a byte view off the 8-byte grid: unaligned words in C++, a copied piece in the reference
    view = data[3:]
    assert view.storage_offset() == 3
    assert torch.equal(torch.ops.tbfast.weight_digest(view), weight_digest_ref(view))


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_tensor_is_digested_by_its_bytes(backend):
    w = torch.randn(37, 11, generator=torch.Generator().manual_seed(0))
    want = oracle_digest(w.numpy().tobytes())
    assert unsigned(digest.weight_digest(w, backend=backend)) == want
    assert unsigned(digest.weight_digest(w.T.contiguous().T, backend=backend)) == want  # non-contiguous: row-major bytes
    assert digest.digest_hex(w, backend=backend) == f"{want[0]:016x}{want[1]:016x}"
    for t in (torch.arange(10, dtype=torch.int16), torch.tensor([True, False, True]), torch.tensor(2.5)):
        assert unsigned(digest.weight_digest(t, backend=backend)) == oracle_digest(t.numpy().tobytes())


# ---------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_single_byte_change_and_a_word_swap_change_both_halves(backend):
    data = random_bytes(4 * 2**20 + 9, seed=2)
    h = unsigned(digest.weight_digest(data, backend=backend))
    for i in (0, data.numel() // 2, data.numel() - 1):  # the first, a middle and the last byte
        v = data.clone()
        v[i] ^= 1
        g = unsigned(digest.weight_digest(v, backend=backend))
        assert g[0] != h[0] and g[1] != h[1], i
    words = data[:8 * (data.numel() // 8)].view(torch.int64)
    while torch.equal(words[5], words[1000]):  # pragma: no cover - random words differ
        words[5] += 1
    v = data.clone()
    w = v[:words.numel() * 8].view(torch.int64)
    w[5], w[1000] = words[1000].clone(), words[5].clone()
    assert unsigned(digest.weight_digest(v, backend=backend)) != h
    # appending a zero byte changes the length, not the words
    assert unsigned(digest.weight_digest(torch.cat([data, data.new_zeros(1)]), backend=backend)) != h


# --------------------------------------------------------------------------------- registration


def test_one_op_with_a_kernel_per_device():
    for key in ("CompositeExplicitAutograd", "CUDA", "CPU"):  # CPU: C++ or the reference
        assert torch._C._dispatch_has_kernel_for_dispatch_key(digest.OP, key), key


@needs_cpp
def test_cpu_kernel_is_the_cpp_one_and_backend_info_names_its_variant(monkeypatch):
    """backend_info()["lora_update"]["checksum"] names the variant the kernel runs: avx512 exactly
    when the CPU lists avx512f and avx512dq (oracle: /proc/cpuinfo), else avx2 / portable."""
    import tbfast

    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this platform")
    import platform

    x86 = platform.machine() in ("x86_64", "AMD64")
    best = ("avx512" if x86 and {"avx512f", "avx512dq"} <= set(flags) else
            "avx2" if x86 and "avx2" in flags else "portable")
    monkeypatch.delenv("TBFAST_DIGEST_SIMD", raising=False)
    assert digest.implementations()["cpu"] == f"C++ weight_digest ({best})"
    assert tbfast.backend_info()["lora_update"]["checksum"] == f"C++ weight_digest ({best})"
    monkeypatch.setenv("TBFAST_DIGEST_SIMD", "portable")
    assert tbfast.backend_info()["lora_update"]["checksum"] == "C++ weight_digest (portable)"


def test_opcheck_cpu():
    for data in (random_bytes(1001, 0), random_bytes(0, 0), random_bytes(64, 3)):
        torch.library.opcheck(torch.ops.tbfast.weight_digest.default, (data,))


def test_fake_kernel_matches_the_real_output():
    data = random_bytes(77, 0)
    real = torch.ops.tbfast.weight_digest(data)
    with FakeTensorMode() as mode:
        fake = torch.ops.tbfast.weight_digest(mode.from_tensor(data))
    meta = torch.ops.tbfast.weight_digest(data.to("meta"))
    assert real.shape == fake.shape == meta.shape == (2,)
    assert real.dtype == fake.dtype == meta.dtype == torch.int64


def test_compiles_without_graph_break():
    data = random_bytes(100, 0)

    def f(x):
        return torch.ops.tbfast.weight_digest(x) ^ 1

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(data)
    assert unsigned(got ^ 1) == oracle_digest(bytes(data.tolist()))


def test_other_devices_get_the_torch_reference():
    """A device without its own kernel (here PrivateUse1) runs the CompositeExplicitAutograd
    torch reference."""
    data = random_bytes(333, 5)
    out = torch.ops.tbfast.weight_digest.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.PrivateUse1), data)
    assert unsigned(out) == oracle_digest(bytes(data.tolist()))


@pytest.mark.cuda
def test_cuda_weight_is_digested_on_the_gpu():
    w = torch.randn(1000, 333, generator=torch.Generator().manual_seed(0))
    out = digest.weight_digest(w.cuda())
    assert out.is_cuda and unsigned(out.cpu()) == numpy_digest(w.numpy().tobytes())


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown weight_digest backend"):
        digest.weight_digest(torch.zeros(3), backend="sha")
    if not HAS_CPP:
        with pytest.raises(BackendUnavailableError, match="extension is not loaded"):
            digest.weight_digest(torch.zeros(3), backend="cpp")
        return
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        digest.weight_digest(torch.zeros(3, device="meta"), backend="cpp")
    for bad, msg in ((torch.zeros(2, 4, dtype=torch.uint8), "must be 1-D"),
                     (torch.zeros(8, dtype=torch.int32), "must be uint8"),
                     (torch.zeros(16, dtype=torch.uint8)[::2], "must be contiguous")):
        with pytest.raises(RuntimeError, match=msg) as e:
            torch.ops.tbfast.weight_digest(bad)
        assert "\n" not in str(e.value).strip()


# --------------------------------------------------------------------------- without extension


_NO_EXTENSION_SCRIPT = """
import json, logging, sys
sys.modules["tbfast._C"] = None  # the extension cannot be imported
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("tbfast").addHandler(Keep(level=logging.WARNING))
import torch
import tbfast
from tbfast.lora.cache import weight_checksum
from tbfast.ops import digest
data = torch.arange(1001, dtype=torch.int64).to(torch.uint8)
h = [v & (2**64 - 1) for v in torch.ops.tbfast.weight_digest(data).tolist()]
torch.library.opcheck(torch.ops.tbfast.weight_digest.default, (data,),
                      test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
cs = [weight_checksum(w), weight_checksum(w)]
try:
    digest.weight_digest(data, backend="cpp")
    err = None
except Exception as exc:
    err = [type(exc).__name__, str(exc)]
print(json.dumps({"h": h, "checksums": cs, "cpp_error": err, "warnings": records,
                  "checksum_kernel": tbfast.backend_info()["lora_update"]["checksum"]}))
"""


def test_without_extension_cpu_kernel_is_the_torch_reference():
    got = run_json(_NO_EXTENSION_SCRIPT, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert tuple(got["h"]) == oracle_digest(bytes(i % 256 for i in range(1001)))
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    h0, h1 = oracle_digest(w.numpy().tobytes())
    assert got["checksums"] == [f"torch.float32|3x4|d128:{h0:016x}{h1:016x}"] * 2
    assert got["cpp_error"] == ["BackendUnavailableError",
                                "C++ weight_digest requested but the tbfast._C extension is not loaded"]
    assert got["checksum_kernel"] == "torch reference (tbfast.kernels.ref.weight_digest_ref)"
    fallback = [m for m in got["warnings"] if "weight_digest" in m]
    assert fallback == ["C++ extension not loaded: weight_digest uses the torch reference"]  # once
