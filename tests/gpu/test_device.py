"""The CUDA backend on a real GPU against the CPU engine: every op on host arrays (streamed in chunks that
break tiling), on cupy arrays and torch CUDA tensors (zero-copy, outputs on the same device), memmaps in and out,
the runtime self-check, and the corpus-scale `kernelatlas assign --device cuda`.  The kernels compute the CPU
engine's expressions in the same order, so results are compared to the bit with the AVX2 / AVX-512 engine (and
within the reference tolerances with any ISA).  Skipped, with the reason, without a GPU (conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
from test_assign import calibrated as calibrated_model
from test_assign import check_assign
from test_normalize import check_normalized
from test_prototypes import calibrated as calibrated_prototypes
from test_prototypes import check_prototypes

import kernelatlas as ka
from kernelatlas import gpu

SIMD = [name for name in ("avx512", "avx2") if name in ka.build_info()["isa_supported"]]
ROWS = (0, 1, 31, 32, 33, 127, 128, 129, 1025, 100003)


def cpu(fn):
    """fn() on the CPU engine's best SIMD path (bit-identical to the GPU), or None when the CPU has none."""
    if not SIMD:
        return None
    previous = ka.set_isa(SIMD[0])
    try:
        return fn()
    finally:
        ka.set_isa(previous)


def same(got, want):
    if want is None:
        return
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_self_check_passes():
    assert gpu.self_check() is None
    assert gpu.status()["cuda_usable"]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("d", [9, 25, 49])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_host_arrays_streamed(rows, d, dtype, make_autoencoder, make_kernels):
    model, enc, dec, intervals, threshold = calibrated_model(d, make_autoencoder, make_kernels)
    x = make_kernels(rows, d, dtype, pattern_model=(d,))
    for decoder in ("segments", "mlp"):
        got = ka.assign(x, model, threshold=threshold, decoder=decoder, device="cuda")
        check_assign(got, x, enc, dec, intervals, threshold)
        same(got, cpu(lambda dec_=decoder: ka.assign(x, model, threshold=threshold, decoder=dec_, device="cpu")))
    norm = ka.normalize(x, device="cuda")
    check_normalized(x, *norm)
    same(norm, cpu(lambda: ka.normalize(x, device="cpu")))
    same((model.encode(x, device="cuda"),), cpu(lambda: (model.encode(x, device="cpu"),)))
    prototypes, pthr = calibrated_prototypes(d, make_kernels)
    got_p = ka.assign_prototypes(x, prototypes, threshold=pthr, device="cuda")
    check_prototypes(got_p, x, prototypes, pthr)
    same(got_p, cpu(lambda: ka.assign_prototypes(x, prototypes, threshold=pthr, device="cpu")))


@pytest.mark.parametrize("chunk_rows", [1, 96, 1000, 4097])
def test_streaming_chunk_boundaries(chunk_rows, make_autoencoder, make_kernels):
    model, _, _, _, threshold = calibrated_model(49, make_autoencoder, make_kernels)
    x = make_kernels(10007, 49, np.float16, pattern_model=(49,))
    dev = gpu.device_autoencoder(model)
    got = dev.assign_host(x, threshold=threshold, chunk_rows=chunk_rows)
    same(got, ka.assign(x, model, threshold=threshold, device="cuda"))


def test_memmaps_in_and_out(tmp_path, make_autoencoder, make_kernels):
    model, _, _, _, threshold = calibrated_model(25, make_autoencoder, make_kernels)
    src = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(20011, 25))
    src[:] = make_kernels(20011, 25, pattern_model=(25,))
    src.flush()
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    outs = tuple(np.lib.format.open_memmap(tmp_path / f"{n}.npy", mode="w+", dtype=dt, shape=(20011,))
                 for n, dt in (("l", np.int16), ("s", np.float32), ("c", np.float32)))
    ka.assign(x, model, threshold=threshold, device="cuda", out=outs)
    same(outs, ka.assign(x, model, threshold=threshold, device="cuda"))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_torch_cuda_tensors_zero_copy(dtype, make_autoencoder, make_kernels):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA (scripts/setup.sh installs the CPU wheel)")
    model, _, _, _, threshold = calibrated_model(49, make_autoencoder, make_kernels)
    x = np.ascontiguousarray(make_kernels(5003, 49, dtype, pattern_model=(49,)))
    t = torch.from_numpy(x).cuda()
    got = ka.assign(t, model, threshold=threshold)  # 'auto': a GPU array runs on the GPU
    assert all(g.device == t.device for g in got)
    assert got[0].dtype == torch.int16
    same([g.cpu().numpy() for g in got], ka.assign(x, model, threshold=threshold, device="cuda"))
    same([g.cpu().numpy() for g in ka.normalize(t.reshape(-1, 7, 7))], ka.normalize(x.reshape(-1, 7, 7), device="cuda"))
    with pytest.raises(ValueError, match="not C-contiguous"):
        ka.assign(t.t(), model)


def test_cupy_arrays_zero_copy(make_autoencoder, make_kernels):
    cupy = pytest.importorskip("cupy", reason="cupy is an optional extra: pip install 'kernelatlas[cuda]'")
    model, _, _, _, threshold = calibrated_model(9, make_autoencoder, make_kernels)
    x = np.ascontiguousarray(make_kernels(5003, 9, pattern_model=(9,)))
    c = cupy.asarray(x)
    got = ka.assign(c, model, threshold=threshold)
    assert all(isinstance(g, cupy.ndarray) for g in got)
    same([cupy.asnumpy(g) for g in got], ka.assign(x, model, threshold=threshold, device="cuda"))
    prototypes, pthr = calibrated_prototypes(9, make_kernels)
    same([cupy.asnumpy(g) for g in ka.assign_prototypes(c, prototypes, threshold=pthr)],
         ka.assign_prototypes(x, prototypes, threshold=pthr, device="cuda"))


def test_corpus_assign_device_cuda_gives_the_cpu_runs_files(tmp_path):
    """`kernelatlas assign --device cuda`: the same output files, byte for byte, as the CPU engine's run (on an
    AVX2 / AVX-512 CPU; the files are compared through the reference tolerances otherwise)."""
    from test_runs import make_corpus, make_model, outputs

    from kernelatlas.jobs.assign import assign_corpus

    c = make_corpus(tmp_path / "corpus")
    mdir, _ = make_model(tmp_path)
    a = outputs(c, assign_corpus(c, model=mdir, threshold=0.3, progress=False, run_id="gpu", device="cuda"))
    b = outputs(c, assign_corpus(c, model=mdir, threshold=0.3, progress=False, run_id="cpu", device="cpu"))
    assert a.keys() == b.keys() and a
    if SIMD:
        assert a == b


# ---------------------------------------------------------------------------------------------- precision='tf32'


def test_tf32_check_passes():
    assert gpu.tf32_check() is None, gpu.tf32_check()


@pytest.mark.parametrize("d", [9, 25, 49])
@pytest.mark.parametrize("rows", [1, 31, 33, 129, 100003])
def test_tf32_on_the_device_matches_the_harness_reference(d, rows, make_autoencoder, make_kernels):
    """The tensor cores' TF32 codes against the float64 reference on TF32-rounded operands
    (tests/test_cuda_tf32.py): the fragment layout of the hardware is the one the harness emulates."""
    import reference as R
    from test_cuda_tf32 import tf32_reference_codes

    model, enc, _ = make_autoencoder(d)
    x = make_kernels(rows, d, pattern_model=(d,))
    codes = model.encode(x, device="cuda", precision="tf32")
    want = tf32_reference_codes(x, enc)
    np.testing.assert_array_equal(np.isnan(codes), np.isnan(want))
    good = ~np.isnan(want)
    # the tensor core sums in its own order (and may truncate): a little more than the harness's 1e-6
    assert np.all(np.abs(codes[good] - want[good]) <= 1e-5 * R.conditioning(x, R.normalize(x))[good])


@pytest.mark.parametrize("decoder", ["segments", "mlp"])
def test_tf32_labels_agree_with_fp32(decoder, make_autoencoder, make_kernels):
    model, _, _, _, threshold = calibrated_model(49, make_autoencoder, make_kernels)
    x = make_kernels(200003, 49, pattern_model=(49,))
    got = ka.assign(x, model, threshold=threshold, decoder=decoder, device="cuda", precision="tf32")
    want = ka.assign(x, model, threshold=threshold, decoder=decoder, device="cuda")
    assert np.mean(got[0] == want[0]) >= 0.999
    np.testing.assert_array_equal(np.isnan(got[2]), np.isnan(want[2]))
