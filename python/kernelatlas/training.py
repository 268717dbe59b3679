"""Training of the paper's autoencoder (Babaiee et al., ICLR 2024; reference/README.md A): one network per kernel
size and layer kind, d -> 64 -> 32 -> 1 -> 32 -> 64 -> d by default, ReLU hidden layers, a sigmoid code in
[0, 1], an identity output, trained with the cosine loss 1 - cos(kernel, reconstruction) on centred,
L2-normalised kernels.  The result is a model directory the engine reads (DESIGN.md); torch is needed here only.

What it assumes and why:
* The corpus is never loaded: a uniform sample of rows (without replacement) is drawn over the layers of the
  requested kind, split per layer with a multivariate hypergeometric draw, and gathered shard by shard from the
  memmaps with sorted row indices -- so 2 million rows cost 2 million row reads, whatever the corpus size.
* Preprocessing is the engine's (:func:`kernelatlas.normalize`), so training sees exactly what ``assign`` sees.
  Dead kernels (every |w| <= ``min_abs``, default 1e-4 as in the authors' group's code), flat and non-finite
  ones are left out of training.
* Reproducible on the CPU: the same corpus, options, seed and thread count give bit-identical weights
  (numpy and torch generators seeded from ``seed``, ``torch.use_deterministic_algorithms``, a fixed torch thread
  count during training).  On CUDA, runs are close but not guaranteed bit-identical.
* A held-out validation share (5%) decides early stopping (no improvement above ``min_delta`` for ``patience``
  epochs) and the weights kept (those of the best validation epoch).
* A one-dimensional code has local minima in which two clusters share one stretch of the code axis and decode
  to their blend; ``restarts`` trains several initialisations and keeps the one with the lowest validation loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kernelatlas.autoencoder import ACTIVATIONS, Autoencoder
from kernelatlas.corpus import Corpus
from kernelatlas.engine import normalize

__all__ = ["KINDS", "sample_kernels", "train"]

KINDS = ("depthwise", "grouped", "regular", "all")
DEFAULT_WIDTHS = (64, 32)
DEFAULT_MIN_ABS = 1e-4  # the authors' group drops kernels whose entries are all below about 1e-4
VAL_SHARE = 0.05
RESTART_SEED_STRIDE = 1_000_003
GATHER_ROWS = 1 << 20  # row indices gathered from a memmap per step (bounds the index arrays' memory)


def train(
    corpus: str | os.PathLike[str] | Corpus,
    kernel_size: int,
    out: str | os.PathLike[str],
    *,
    kind: str = "depthwise",
    widths: Sequence[int] = DEFAULT_WIDTHS,
    activation: str = "relu",
    code_activation: str = "sigmoid",
    epochs: int = 30,
    sample: int | None = 2_000_000,
    batch_size: int = 512,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "auto",
    patience: int = 5,
    min_delta: float = 1e-4,
    val_share: float = VAL_SHARE,
    min_abs: float = DEFAULT_MIN_ABS,
    threads: int | None = None,
    restarts: int = 1,
    progress: bool = True,
) -> Autoencoder:
    """Train the autoencoder for ``kernel_size`` x ``kernel_size`` kernels of layers of ``kind`` and write the
    model directory ``out`` (autoencoder.safetensors + model.json; a clusters.json of an earlier model there is
    removed: run :func:`kernelatlas.clusters` next).

    ``sample``: rows drawn uniformly from the corpus (None or more than there are: all of them).  ``widths``:
    hidden widths of the encoder (the decoder mirrors them).  ``kind``: depthwise | grouped | regular | all.
    ``device``: 'auto' (CUDA when torch sees one), 'cpu' or 'cuda'.  ``threads``: torch CPU threads during
    training (default: all cores available to the process; part of what makes a run reproducible).
    ``epochs`` is the maximum: training stops earlier once the validation loss has not improved by
    ``min_delta`` for ``patience`` epochs.  ``restarts``: train that many networks from different initialisations
    (seeds seed, seed + 1000003, ...) and keep the one with the lowest validation loss -- a 1-D code can get
    stuck with two clusters sharing one stretch of the axis, and a restart is the cheap way out.  Returns the
    trained :class:`~kernelatlas.Autoencoder`.
    """
    import torch

    _check_options(kernel_size, kind, widths, activation, code_activation, epochs, sample, batch_size, lr,
                   patience, val_share, min_abs, threads)
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    corpus = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)
    out = Path(out)
    dev = _pick_device(device)
    n_threads = threads or _available_cores()
    started = time.time()

    rng = np.random.default_rng(seed)
    raw, drawn = sample_kernels(corpus, kernel_size, kind=kind, sample=sample, rng=rng, progress=progress)
    kernels, excluded = _preprocess(raw, min_abs=min_abs, threads=threads)
    del raw
    if len(kernels) < 2:
        raise ValueError(f"{corpus.root}: only {len(kernels)} usable {kernel_size}x{kernel_size} kernels of kind "
                         f"{kind!r} ({excluded['dead']} dead, {excluded['flat']} flat, {excluded['nonfinite']} "
                         "non-finite): nothing to train on; extract more models or pick another --kind")
    order = rng.permutation(len(kernels))
    n_val = min(max(1, int(round(val_share * len(kernels)))), len(kernels) - 1) if val_share > 0 else 0
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])

    with _torch_settings(torch, n_threads, deterministic=dev.type == "cpu"):
        train_x = torch.from_numpy(kernels[train_idx]).to(dev)
        val_x = torch.from_numpy(kernels[val_idx]).to(dev)
        del kernels
        runs = []
        for restart in range(restarts):
            # restart 0 uses the seed itself, so restarts=1 is the plain run
            run_seed = seed + restart * RESTART_SEED_STRIDE
            torch.manual_seed(run_seed)
            net = _build(torch, kernel_size * kernel_size, widths, activation, code_activation)
            net[0].to(dev)
            net[1].to(dev)
            history = _fit(torch, net[0], net[1], train_x, val_x, epochs=epochs, batch_size=batch_size, lr=lr,
                           seed=run_seed, patience=patience, min_delta=min_delta, progress=progress, device=dev,
                           desc="training" if restarts == 1 else f"training {restart + 1}/{restarts}")
            runs.append((history["val_loss"][history["best_epoch"] - 1], restart, net, history))
        all_val = [run[0] for run in runs]
        _, chosen, (encoder, decoder), history = min(runs, key=lambda run: (run[0], run[1]))
        del runs
        codes = _codes(torch, encoder, val_x if len(val_x) else train_x[:65536], batch_size)
        encoder.cpu()
        decoder.cpu()

    model = Autoencoder.from_torch(encoder, decoder)
    model.info = {
        "training": {
            "kind": kind,
            "widths": [int(w) for w in widths],
            "activation": activation,
            "code_activation": code_activation,
            "loss": "1 - cos(normalised kernel, reconstruction)",
            "restarts": restarts,
            "restart_chosen": chosen,
            "restart_val_losses": [round(float(r), 7) for r in all_val],
            "epochs_max": epochs,
            "epochs_run": history["epochs_run"],
            "best_epoch": history["best_epoch"],
            "batch_size": batch_size,
            "lr": lr,
            "optimizer": "Adam",
            "patience": patience,
            "min_delta": min_delta,
            "val_share": val_share,
            "min_abs": min_abs,
            "seed": seed,
            "device": str(dev),
            "threads": n_threads,
            "torch_version": torch.__version__,
            "train_loss": history["train_loss"][history["best_epoch"] - 1],
            "val_loss": history["val_loss"][history["best_epoch"] - 1],
            "final_train_loss": history["train_loss"][-1],
            "final_val_loss": history["val_loss"][-1],
            "history": {"train_loss": history["train_loss"], "val_loss": history["val_loss"]},
            "train_seconds": round(time.time() - started, 3),
            "code_quantiles": _quantiles(codes),
        },
        "corpus": _corpus_record(corpus),
        "sample": {
            "requested": sample,
            "available": drawn["available"],
            "drawn": drawn["drawn"],
            "used": int(len(train_idx) + len(val_idx)),
            "train": int(len(train_idx)),
            "validation": int(len(val_idx)),
            "excluded": excluded,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("clusters.json", "spectrum.png"):  # they describe an earlier model's code axis
        with contextlib.suppress(FileNotFoundError):
            (out / stale).unlink()
    model.save(out)
    return model


# ---------------------------------------------------------------------------------------------- sampling


def sample_kernels(
    corpus: Corpus,
    kernel_size: int,
    *,
    kind: str = "depthwise",
    sample: int | None = 2_000_000,
    rng: np.random.Generator | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, int]]:
    """A uniform sample without replacement of the stored k x k rows of layers of ``kind`` ('all': every
    kind), as a float32 array [n, k*k] in corpus order (shard by shard, rows ascending), and the counts
    ``{"available", "drawn"}``.  Only the sampled rows are read from the memmaps."""
    rng = rng if rng is not None else np.random.default_rng(0)
    layers = corpus.layers
    sel = layers[(layers["kh"] == kernel_size) & (layers["kw"] == kernel_size) & (layers["rows"] > 0)
                 & (layers["shard"] != "")]
    if kind != "all":
        sel = sel[sel["kind"] == kind]
    shard_order = {s: i for i, s in enumerate(corpus.shards(kernel_size))}
    sel = sel[sel["shard"].isin(list(shard_order))]
    sel = sel.assign(_shard_pos=sel["shard"].map(shard_order)).sort_values(["_shard_pos", "row_start"], kind="stable")
    rows = sel["rows"].to_numpy(dtype=np.int64)
    available = int(rows.sum())
    if available == 0:
        what = "layers" if kind == "all" else f"{kind} layers"
        raise ValueError(f"{corpus.root} stores no {kernel_size}x{kernel_size} kernels of {what} (see "
                         "`kernelatlas info`; extract with --sizes including the size, or --all-convs for "
                         "regular layers)")
    n = available if sample is None or sample >= available else int(sample)
    per_layer = rows if n == available else rng.multivariate_hypergeometric(rows, n, method="marginals")
    d = kernel_size * kernel_size
    out = np.empty((n, d), dtype=np.float32)
    pos = 0
    bar = _bar(progress, total=n, desc=f"sampling {kernel_size}x{kernel_size}", unit="kernel")
    for shard, grp in _group_by_shard(sel, per_layer):
        arr = corpus.shard_array(shard)
        idx = []
        for (row_start, n_rows), count in grp:
            if count == n_rows:
                idx.append(np.arange(row_start, row_start + n_rows, dtype=np.int64))
            elif count:
                idx.append(row_start + np.sort(rng.choice(n_rows, size=count, replace=False)).astype(np.int64))
        if not idx:
            continue
        rows_idx = np.concatenate(idx)
        rows_idx.sort()
        for a in range(0, len(rows_idx), GATHER_ROWS):
            part = rows_idx[a:a + GATHER_ROWS]
            out[pos:pos + len(part)] = arr[part]
            pos += len(part)
            bar.update(len(part))
    bar.close()
    assert pos == n
    return out, {"available": available, "drawn": n}


def _group_by_shard(sel: Any, counts: np.ndarray) -> Iterator[tuple[str, list[tuple[tuple[int, int], int]]]]:
    shards = sel["shard"].to_numpy()
    starts = sel["row_start"].to_numpy(dtype=np.int64)
    rows = sel["rows"].to_numpy(dtype=np.int64)
    i = 0
    while i < len(shards):
        j = i
        while j < len(shards) and shards[j] == shards[i]:
            j += 1
        yield str(shards[i]), [((int(starts[t]), int(rows[t])), int(counts[t])) for t in range(i, j)]
        i = j


def _preprocess(raw: np.ndarray, *, min_abs: float, threads: int | None) -> tuple[np.ndarray, dict[str, int]]:
    """Centre + L2-normalise with the engine; drop dead, flat and non-finite rows."""
    normalized, norms = normalize(raw, min_abs=min_abs, threads=threads)
    nonfinite = np.isnan(norms)
    zero = norms == 0
    dead = zero & (np.abs(np.nan_to_num(raw)).max(axis=1, initial=0.0) <= min_abs) & ~nonfinite
    keep = ~nonfinite & ~zero
    excluded = {"nonfinite": int(nonfinite.sum()), "dead": int(dead.sum()), "flat": int((zero & ~dead).sum())}
    return np.ascontiguousarray(normalized[keep]), excluded


# ---------------------------------------------------------------------------------------------- the network


def _build(torch: Any, d: int, widths: Sequence[int], activation: str, code_activation: str) -> tuple[Any, Any]:
    from kernelatlas.autoencoder import _torch_activation

    nn = torch.nn

    def stack(sizes: Sequence[int], acts: Sequence[str]) -> Any:
        mods: list[Any] = []
        for i, act in enumerate(acts):
            mods.append(nn.Linear(sizes[i], sizes[i + 1]))
            if act != "identity":
                mods.append(_torch_activation(act))
        return nn.Sequential(*mods)

    hidden = [int(w) for w in widths]
    encoder = stack([d, *hidden, 1], [activation] * len(hidden) + [code_activation])
    decoder = stack([1, *reversed(hidden), d], [activation] * len(hidden) + ["identity"])
    return encoder, decoder


def _cosine_loss(torch: Any, x: Any, recon: Any) -> Any:
    """Mean of 1 - cos(x, recon); x is already unit-norm, so only recon's norm is needed."""
    dot = (x * recon).sum(dim=1)
    norm = recon.norm(dim=1).clamp_min(1e-8)
    return (1.0 - dot / norm).mean()


def _fit(torch: Any, encoder: Any, decoder: Any, train_x: Any, val_x: Any, *, epochs: int, batch_size: int,
         lr: float, seed: int, patience: int, min_delta: float, progress: bool, device: Any,
         desc: str = "training") -> dict[str, Any]:
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = len(train_x)
    steps = math.ceil(n / batch_size)
    best = math.inf
    best_epoch = 0
    best_state: list[Any] = []
    train_hist: list[float] = []
    val_hist: list[float] = []
    stale = 0
    bar = _bar(progress, total=epochs * steps, desc=desc, unit="batch")
    for epoch in range(1, epochs + 1):
        encoder.train()
        decoder.train()
        perm = torch.randperm(n, generator=gen).to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for s in range(steps):
            batch = train_x[perm[s * batch_size:(s + 1) * batch_size]]
            loss = _cosine_loss(torch, batch, decoder(encoder(batch)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().double() * len(batch)
            if s % 50 == 0 or s == steps - 1:
                bar.set_postfix_str(f"epoch {epoch} loss {loss.item():.4f}", refresh=False)
            bar.update(1)
        train_loss = float(total.item() / n)
        val_loss = _evaluate(torch, encoder, decoder, val_x, batch_size) if len(val_x) else train_loss
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            bar.close()
            raise RuntimeError(f"training diverged in epoch {epoch} (loss {train_loss} train, {val_loss} "
                               "validation): lower the learning rate (--lr)")
        train_hist.append(round(train_loss, 7))
        val_hist.append(round(val_loss, 7))
        bar.set_postfix_str(f"epoch {epoch} train {train_loss:.4f} val {val_loss:.4f}", refresh=True)
        if val_loss < best - min_delta:
            best, best_epoch, stale = val_loss, epoch, 0
            best_state = [p.detach().clone() for p in params]
        else:
            stale += 1
            if stale >= patience:
                break
    bar.close()
    with torch.no_grad():
        for p, saved in zip(params, best_state, strict=True):
            p.copy_(saved)
    return {"epochs_run": len(train_hist), "best_epoch": best_epoch, "train_loss": train_hist, "val_loss": val_hist}


def _evaluate(torch: Any, encoder: Any, decoder: Any, x: Any, batch_size: int) -> float:
    encoder.eval()
    decoder.eval()
    total = 0.0
    with torch.no_grad():
        for a in range(0, len(x), max(batch_size, 8192)):
            batch = x[a:a + max(batch_size, 8192)]
            total += float(_cosine_loss(torch, batch, decoder(encoder(batch))).double().item()) * len(batch)
    return total / len(x)


def _codes(torch: Any, encoder: Any, x: Any, batch_size: int) -> np.ndarray:
    encoder.eval()
    parts = []
    with torch.no_grad():
        for a in range(0, len(x), 65536):
            parts.append(encoder(x[a:a + 65536]).squeeze(1).cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _quantiles(codes: np.ndarray) -> dict[str, float]:
    """Where the codes of the validation kernels lie (for a code activation without a fixed range)."""
    if not len(codes):
        return {}
    qs = (0.0, 0.001, 0.01, 0.5, 0.99, 0.999, 1.0)
    return {f"q{q:g}": float(v) for q, v in zip(qs, np.quantile(codes.astype(np.float64), qs), strict=True)}


# ---------------------------------------------------------------------------------------------- plumbing


@contextlib.contextmanager
def _torch_settings(torch: Any, threads: int, *, deterministic: bool) -> Iterator[None]:
    """A fixed thread count and (on the CPU) deterministic algorithms for the duration of training, restored
    after.  Not on CUDA: there torch refuses cuBLAS matmuls in deterministic mode unless the process was started
    with CUBLAS_WORKSPACE_CONFIG set, and GPU runs are not promised to be bit-identical anyway."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def _pick_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but torch sees no CUDA device (torch {torch.__version__}); "
                             "use device='cpu' or 'auto'")
        return torch.device(device)
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _corpus_record(corpus: Corpus) -> dict[str, Any]:
    manifest_path = corpus.root / "manifest.json"
    return {
        "path": str(corpus.root.resolve()),
        "generation": int(corpus.manifest.get("generation", 0)),
        "manifest_sha256": hashlib.sha256(manifest_path.read_bytes()).hexdigest(),
        "updated": corpus.manifest.get("updated"),
    }


def _bar(progress: bool, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, dynamic_ncols=True, **kwargs)


def _check_options(kernel_size: int, kind: str, widths: Sequence[int], activation: str, code_activation: str,
                   epochs: int, sample: int | None, batch_size: int, lr: float, patience: int, val_share: float,
                   min_abs: float, threads: int | None) -> None:
    if kernel_size < 1 or kernel_size * kernel_size > 64:
        raise ValueError(f"kernel_size must be 1..8 (the engine takes up to 64 entries), got {kernel_size}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not widths or any(int(w) < 1 or int(w) > 256 for w in widths) or len(widths) > 4:
        raise ValueError(f"widths must be 1 to 4 hidden widths of 1..256 units (engine limits), got {list(widths)}")
    for name, act in (("activation", activation), ("code_activation", code_activation)):
        if act not in ACTIVATIONS:
            raise ValueError(f"{name} must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if sample is not None and sample < 2:
        raise ValueError(f"sample must be >= 2 (or None for every row), got {sample}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if not 0.0 <= val_share < 0.5:
        raise ValueError(f"val_share must be in [0, 0.5), got {val_share}")
    if not min_abs >= 0:
        raise ValueError(f"min_abs must be >= 0, got {min_abs}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for all cores), got {threads}")

