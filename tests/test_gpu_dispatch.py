"""device='cpu' | 'cuda' | 'auto' without a GPU: the refusal (with its reason) when no usable GPU is there, and
the whole Python path of the CUDA backend -- dispatch, the runtime self-check, its refusal and the 'auto'
fallback with a warning, outputs into numpy arrays and memmaps -- run against a stand-in for kernelatlas._cuda
built on the CPU harness (the GPU kernels' own bodies, executed launch by launch on the CPU), in chunks as the
streaming entry points cut them.  A stand-in that corrupts one output must fail the self-check.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_assign import calibrated as calibrated_model
from test_assign import check_assign
from test_prototypes import calibrated as calibrated_prototypes
from test_prototypes import check_prototypes

import kernelatlas as ka
from kernelatlas import gpu

H = pytest.importorskip("kernelatlas._cuda_harness", reason="the CUDA harness extension is not built")
SIMD = any(name in ka.build_info()["isa_supported"] for name in ("avx2", "avx512"))


def _chunked(n: int, chunk_rows: int):
    for a in range(0, n, max(1, chunk_rows)):
        yield a, min(n, a + chunk_rows)


def _into(out, shape, dtype):
    if out is None:
        return np.empty(shape, dtype)
    assert out.shape == shape and out.dtype == dtype
    return out


class FakeCuda:
    """kernelatlas._cuda's host (streaming) entry points, computed by the kernels' bodies on the CPU."""

    def __init__(self, corrupt: str | None = None):
        self.corrupt = corrupt
        self.calls: list[str] = []
        fake = self

        class DeviceAutoencoder:
            def __init__(self, d, encoder, decoder, lo, hi):
                self.d = d
                self.h = H.Autoencoder(d, encoder, decoder, lo, hi)

            def encode_host(self, x, *, out=None, min_abs=0.0, chunk_rows=1 << 20, precision="fp32"):
                fake.calls.append("encode" if precision == "fp32" else f"encode {precision}")
                codes = _into(out, (len(x),), np.float32)
                for a, b in _chunked(len(x), chunk_rows):
                    codes[a:b] = self.h.encode(x[a:b], min_abs=min_abs, precision=precision)[0]
                return codes

            def assign_host(self, x, *, threshold=0.85, labels=None, scores=None, codes=None, min_abs=0.0,
                            decoder="auto", chunk_rows=1 << 20, precision="fp32", recheck_code=0.0,
                            recheck_score=0.0):
                fake.calls.append("assign" if precision == "fp32" else f"assign {precision}")
                n = (len(x),)
                outs = (_into(labels, n, np.int16), _into(scores, n, np.float32), _into(codes, n, np.float32))
                for a, b in _chunked(len(x), chunk_rows):
                    got = self.h.assign(x[a:b], threshold=threshold, min_abs=min_abs, decoder=decoder,
                                        precision=precision, recheck_code=recheck_code,
                                        recheck_score=recheck_score)
                    for o, g in zip(outs, got[:3], strict=True):
                        o[a:b] = g
                if fake.corrupt == "assign" and len(x) > 20:
                    outs[0][20] = 7  # a wrong label
                if fake.corrupt == "tf32" and precision == "tf32":
                    outs[2][:] += 0.02  # codes off by far more than TF32 rounding (a wrong fragment layout)
                return outs

        class DevicePrototypes:
            def __init__(self, p):
                self.d = p.shape[1]
                self.h = H.Prototypes(p)

            def assign_host(self, x, *, threshold, labels=None, scores=None, min_abs=0.0, chunk_rows=1 << 20):
                fake.calls.append("prototypes")
                n = (len(x),)
                outs = (_into(labels, n, np.int16), _into(scores, n, np.float32))
                for a, b in _chunked(len(x), chunk_rows):
                    got = self.h.assign(x[a:b], threshold=threshold, min_abs=min_abs)
                    outs[0][a:b], outs[1][a:b] = got[0], got[1]
                return outs

        self.DeviceAutoencoder = DeviceAutoencoder
        self.DevicePrototypes = DevicePrototypes

    def device_info(self):
        return {"runtime_version": 13000, "device_count": 1, "devices": ["CPU harness (sm_00)"]}

    def normalize_host(self, x, *, out=None, norms=None, min_abs=0.0, chunk_rows=1 << 20):
        self.calls.append("normalize")
        o = _into(out, x.shape, np.float32)
        nr = _into(norms, (len(x),), np.float32)
        flat = o.reshape(len(x), -1)
        for a, b in _chunked(len(x), chunk_rows):
            got = H.normalize(x[a:b], min_abs=min_abs)
            flat[a:b], nr[a:b] = got[0], got[1]
        if self.corrupt == "normalize" and len(x) > 30:
            flat[30] += 1e-3
        return o, nr


@pytest.fixture
def fresh_backend(monkeypatch):
    """gpu's caches cleared before and after; returns a function installing a module as kernelatlas._cuda."""

    def install(module):
        monkeypatch.setattr(gpu, "_module", lambda: module)
        gpu._probe.cache_clear()
        gpu._SELF_CHECK.clear()
        return module

    yield install
    gpu._probe.cache_clear()
    gpu._SELF_CHECK.clear()


# ---------------------------------------------------------------------------------------------- no GPU


def test_cuda_is_refused_with_the_reason_when_no_gpu_is_usable(make_autoencoder, make_kernels):
    if gpu.available():
        pytest.skip("a GPU is visible: tests/gpu/ covers it")
    model, _, _ = make_autoencoder(9)
    x = make_kernels(7, 9)
    for call in (lambda: ka.assign(x, model, device="cuda"), lambda: ka.normalize(x, device="cuda"),
                 lambda: model.encode(x, device="cuda"),
                 lambda: ka.assign_prototypes(x, np.eye(9, dtype=np.float32)[:3], threshold=0.5, device="cuda")):
        with pytest.raises(gpu.GpuUnavailable, match=r"device='cuda' needs a usable GPU: (no CUDA device|the CUDA module)"):
            call()
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda', got 'gpu'"):
        ka.normalize(x, device="gpu")


def test_auto_runs_on_the_cpu_without_a_gpu(make_autoencoder, make_kernels):
    model, _, _ = make_autoencoder(9)
    x = make_kernels(1025, 9)
    for got, want in zip(ka.assign(x, model, device="auto"), ka.assign(x, model, device="cpu"), strict=True):
        np.testing.assert_array_equal(got, want)


def test_build_info_says_the_backend_is_not_verified():
    info = ka.build_info()
    assert info["cuda_verified"] is False
    if info["cuda_built"]:
        assert info["cuda_backend"] == "CUDA backend: not yet verified on hardware"
        from kernelatlas.jobs.build_info import build_info_text

        assert "CUDA backend: not yet verified on hardware" in build_info_text(info)


# ---------------------------------------------------------------------------------------------- stand-in GPU


def test_cuda_path_with_the_kernels_bodies_matches_the_engine(fresh_backend, make_autoencoder, make_kernels, tmp_path):
    fake = fresh_backend(FakeCuda())
    assert gpu.self_check() is None and gpu.status()["cuda_self_check"] == "passed"
    model, enc, dec, intervals, threshold = calibrated_model(25, make_autoencoder, make_kernels)
    x = make_kernels(1025, 25, np.float16, pattern_model=(25,))
    got = ka.assign(x, model, threshold=threshold, device="cuda")
    check_assign(got, x, enc, dec, intervals, threshold)
    if SIMD:
        for g, w in zip(got, ka.assign(x, model, threshold=threshold, device="cpu"), strict=True):
            np.testing.assert_array_equal(g, w)
    # outputs streamed into memmaps
    outs = tuple(np.lib.format.open_memmap(tmp_path / f"{n}.npy", mode="w+", dtype=dt, shape=(1025,))
                 for n, dt in (("labels", np.int16), ("scores", np.float32), ("codes", np.float32)))
    ka.assign(x, model, threshold=threshold, device="cuda", out=outs)
    for g, o in zip(got, outs, strict=True):
        np.testing.assert_array_equal(g, o)
    np.testing.assert_array_equal(model.encode(x, device="cuda"), got[2])
    normalized, norms = ka.normalize(x, device="cuda")
    cpu = ka.normalize(x, device="cpu")
    np.testing.assert_allclose(normalized, cpu[0], atol=1e-6)
    np.testing.assert_allclose(norms, cpu[1], rtol=1e-6)
    prototypes, pthr = calibrated_prototypes(25, make_kernels)
    check_prototypes(ka.assign_prototypes(x, prototypes, threshold=pthr, device="cuda"), x, prototypes, pthr)
    assert {"assign", "encode", "normalize", "prototypes"} <= set(fake.calls)


def test_auto_uses_a_checked_gpu_for_large_host_arrays(fresh_backend, monkeypatch, make_autoencoder, make_kernels):
    fake = fresh_backend(FakeCuda())
    monkeypatch.setattr(gpu, "AUTO_MIN_ROWS", 1000)
    model, _, _ = make_autoencoder(9)
    ka.assign(make_kernels(95, 9), model)
    assert "assign" not in fake.calls  # small: the CPU
    ka.assign(make_kernels(1025, 9), model)
    assert fake.calls.count("assign") == 5  # the self-check's four (d = 9 and 49, segments and MLP) and this one


@pytest.mark.parametrize("corrupt", ["assign", "normalize"])
def test_a_gpu_that_disagrees_is_refused_and_auto_falls_back(corrupt, fresh_backend, monkeypatch, make_autoencoder,
                                                            make_kernels):
    fresh_backend(FakeCuda(corrupt=corrupt))
    monkeypatch.setattr(gpu, "AUTO_MIN_ROWS", 1000)
    model, _, _ = make_autoencoder(9)
    x = make_kernels(1025, 9)
    with pytest.raises(gpu.GpuUnavailable, match="disagrees with the CPU engine on its self-check") as err:
        ka.assign(x, model, device="cuda")
    assert ("labels" if corrupt == "assign" else "normalize d=9") in str(err.value)
    assert gpu.status()["cuda_usable"] is False
    with pytest.warns(RuntimeWarning, match="running on the CPU instead"):
        got = ka.assign(x, model, device="auto")
    for g, w in zip(got, ka.assign(x, model, device="cpu"), strict=True):
        np.testing.assert_array_equal(g, w)


def test_gpu_arrays_are_refused_on_the_cpu_and_out_on_the_gpu():
    class FakeTensor:  # what device_input sees of a torch CUDA tensor
        __module__ = "torch"
        device = type("Device", (), {"type": "cuda"})()

    assert gpu._is_torch_cuda(FakeTensor())
    assert gpu.device_input(np.zeros((3, 9), np.float32)) is None
    with pytest.raises(ValueError, match="drop out="):
        gpu.no_out_for_gpu_arrays((np.zeros(3), None))


# ---------------------------------------------------------------------------------------------- precision='tf32'


def test_tf32_is_refused_on_the_cpu_and_bf16_on_the_gpu(fresh_backend, make_autoencoder, make_kernels):
    model, _, _ = make_autoencoder(9)
    x = make_kernels(33, 9)
    for call in (lambda: ka.assign(x, model, device="cpu", precision="tf32"),
                 lambda: model.encode(x, device="cpu", precision="tf32")):
        with pytest.raises(ValueError, match="precision='tf32' is the GPU's tensor-core path"):
            call()
    fresh_backend(FakeCuda())
    with pytest.raises(ValueError, match=r"precision on the GPU must be 'fp32' or 'tf32', got 'bf16'.*device='cpu'"):
        ka.assign(x, model, device="cuda", precision="bf16")


def test_tf32_on_the_kernels_bodies_agrees_with_fp32(fresh_backend, make_autoencoder, make_kernels):
    fake = fresh_backend(FakeCuda())
    model, _, _, _, threshold = calibrated_model(25, make_autoencoder, make_kernels)
    x = make_kernels(20000, 25, pattern_model=(25,))
    labels, _, codes = ka.assign(x, model, threshold=threshold, device="cuda", precision="tf32")
    assert gpu.status()["cuda_tf32_check"] == "passed"
    want = ka.assign(x, model, threshold=threshold, device="cpu")
    np.testing.assert_array_equal(np.isnan(codes), np.isnan(want[2]))
    live = ~np.isnan(want[2])
    assert np.abs(codes[live] - want[2][live]).max() < 5e-3
    assert not np.array_equal(codes[live], want[2][live]), "tf32 codes equal fp32's: the TF32 path did not run"
    assert np.mean(labels == want[0]) >= 0.999
    # rows near a decision were recomputed with the exact first layer: their outputs are fp32's to the bit
    rechecked = live & (codes == want[2])
    assert 0 < rechecked.mean() < 0.5
    np.testing.assert_array_equal(labels[rechecked], want[0][rechecked])
    # encode has no decision to recheck: its codes are the TF32 path's everywhere
    enc = model.encode(x, device="cuda", precision="tf32")
    np.testing.assert_array_equal(enc[live & ~rechecked], codes[live & ~rechecked])
    assert np.abs(enc[live] - want[2][live]).max() < 5e-3
    assert "assign tf32" in fake.calls and "encode tf32" in fake.calls


def test_a_tf32_path_that_disagrees_is_refused_and_fp32_still_runs(fresh_backend, make_autoencoder, make_kernels):
    fresh_backend(FakeCuda(corrupt="tf32"))
    model, _, _ = make_autoencoder(9)
    x = make_kernels(1025, 9)
    with pytest.raises(gpu.GpuUnavailable, match=r"precision='tf32' disagrees with the CPU engine's fp32.*codes"):
        ka.assign(x, model, device="cuda", precision="tf32")
    assert gpu.status()["cuda_tf32_check"] == "failed" and gpu.status()["cuda_usable"] is True
    for g, w in zip(ka.assign(x, model, device="cuda"), ka.assign(x, model, device="cpu"), strict=True):
        if SIMD:
            np.testing.assert_array_equal(g, w)
