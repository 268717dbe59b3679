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
* Kernels the model is never allowed to see: a share of the corpus (``holdout``, default 20%) is removed from
  the pool before sampling, by a rule on each kernel's identity (:mod:`kernelatlas.holdout`), so the report can
  give coverage on kernels the model never saw beside the in-sample figure.
* Training runs to convergence, measured in optimiser steps: the validation loss (a 5% share of the sample)
  is evaluated every ``eval_every`` steps; when it has not improved by the relative margin ``min_rel_delta``
  for ``patience`` steps the learning rate is divided by 4, up to ``lr_drops`` times, and after the last drop
  the next such plateau stops training.  ``max_steps`` is a safety cap only; model.json records why training
  stopped, and the weights kept are those of the best validation loss.  docs/training.md has the measured table
  of these choices.
* A one-dimensional code has local minima in which two clusters share one stretch of the code axis and decode
  to their blend.  With a sigmoid code the usual one is a saturated end: the encoder drives two clusters' code
  pre-activations far out on one tail, where the sigmoid is flat, so both decode to one blend and the gradient
  that could pull them apart has vanished.  Training therefore adds ``code_penalty`` (default 0.01) times the
  mean of max(|pre-activation| - ``code_margin``, 0)^2 (default margin 4: codes in about [0.018, 0.982] cost
  nothing) to the loss; the validation loss, the stopping rule and the choice of weights use the cosine loss
  alone.  On the planted-cluster check (tests/test_train_clusters.py) it took the passes from 12 / 9 / 11 of
  12 seeds at 3x3 / 5x5 / 7x7 to 12 / 12 / 12.  ``restarts`` trains several initialisations and keeps the one
  with the lowest validation loss.
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
from kernelatlas.holdout import DEFAULT_SHARE, Holdout

__all__ = ["KINDS", "SCHEDULES", "sample_kernels", "train"]

KINDS = ("depthwise", "grouped", "regular", "all")
DEFAULT_WIDTHS = (64, 32)
DEFAULT_MIN_ABS = 1e-4  # the authors' group drops kernels whose entries are all below about 1e-4
VAL_SHARE = 0.05
RESTART_SEED_STRIDE = 1_000_003
GATHER_ROWS = 1 << 20  # row indices gathered from a memmap per step (bounds the index arrays' memory)
SCHEDULES = ("plateau", "cosine", "constant")
DEFAULT_MAX_STEPS = 200_000  # a safety cap: on the default corpus training converges long before it
DEFAULT_PATIENCE = 2_000     # steps without a relative improvement of min_rel_delta in the validation loss
DEFAULT_EVAL_EVERY = 200     # steps between validation evaluations
DEFAULT_LR_DROPS = 3         # plateau schedule: lr / 4 at each plateau, this many times, then stop
LR_FACTOR = 0.25
DEFAULT_CODE_PENALTY = 0.01  # weight of the penalty on code pre-activations beyond the margin (0: none)
DEFAULT_CODE_MARGIN = 4.0    # |pre-activation| free of penalty: sigmoid(4) = 0.982, so codes stay off the flat tails
CODE_BINS = 400              # the histogram of training codes recorded for clusters (density of real kernels)


def train(
    corpus: str | os.PathLike[str] | Corpus,
    kernel_size: int,
    out: str | os.PathLike[str],
    *,
    kind: str = "depthwise",
    widths: Sequence[int] = DEFAULT_WIDTHS,
    activation: str = "relu",
    code_activation: str = "sigmoid",
    max_steps: int = DEFAULT_MAX_STEPS,
    epochs: int | None = None,
    sample: int | None = 2_000_000,
    batch_size: int = 256,
    lr: float = 1e-3,
    schedule: str = "plateau",
    seed: int = 0,
    device: str = "auto",
    patience: int = DEFAULT_PATIENCE,
    min_rel_delta: float = 1e-3,
    eval_every: int = DEFAULT_EVAL_EVERY,
    lr_drops: int = DEFAULT_LR_DROPS,
    val_share: float = VAL_SHARE,
    holdout: float = DEFAULT_SHARE,
    models: Sequence[int | str] | None = None,
    exclude_models: Sequence[int | str] = (),
    min_abs: float = DEFAULT_MIN_ABS,
    threads: int | None = None,
    restarts: int = 1,
    code_penalty: float = DEFAULT_CODE_PENALTY,
    code_margin: float = DEFAULT_CODE_MARGIN,
    progress: bool = True,
) -> Autoencoder:
    """Train the autoencoder for ``kernel_size`` x ``kernel_size`` kernels of layers of ``kind`` and write the
    model directory ``out`` (autoencoder.safetensors + model.json; a clusters.json of an earlier model there is
    removed: run :func:`kernelatlas.clusters` next).

    ``sample``: rows drawn uniformly from the training pool (None or more than there are: all of them).
    ``holdout``: share of the kernels never put in the pool (see :mod:`kernelatlas.holdout`; 0: none), so that
    coverage can be reported on kernels the model never saw.  ``models`` / ``exclude_models``: model ids or
    names whose kernels may / may not be in the pool (e.g. one model for a per-model autoencoder, or all but
    one to test on the one left out).  ``widths``: hidden widths of the encoder (the decoder mirrors them).
    ``kind``: depthwise | grouped | regular | all.  ``device``: 'auto' (CUDA when torch sees one), 'cpu' or
    'cuda'.  ``threads``: torch CPU threads during training (default: all cores available to the process;
    part of what makes a run reproducible).

    Length of training: until convergence (see the module docstring: ``eval_every``, ``patience`` and
    ``min_rel_delta`` in steps, ``schedule`` 'plateau' | 'cosine' | 'constant', ``lr_drops``), capped by
    ``max_steps`` and, when given, ``epochs`` passes over the training rows; model.json's
    ``training.stop_reason`` says which ended it.  ``restarts``: train that many networks from different
    initialisations (seeds seed, seed + 1000003, ...) and keep the one with the lowest validation loss -- a 1-D
    code can get stuck with two clusters sharing one stretch of the axis, and a restart is the cheap way out.
    ``code_penalty`` / ``code_margin``: the penalty on code pre-activations beyond +-margin that keeps clusters
    off the saturated ends of a sigmoid (or tanh) code (module docstring; code_penalty=0: none).
    Returns the trained :class:`~kernelatlas.Autoencoder`.
    """
    import torch

    _check_options(kernel_size, kind, widths, activation, code_activation, max_steps, epochs, sample, batch_size,
                   lr, schedule, patience, min_rel_delta, eval_every, lr_drops, val_share, holdout, min_abs,
                   threads)
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if not (code_penalty >= 0 and math.isfinite(code_penalty)) or not (code_margin >= 0 and math.isfinite(code_margin)):
        raise ValueError(f"code_penalty and code_margin must be finite and >= 0, got {code_penalty} and {code_margin}")
    corpus = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)
    out = Path(out)
    dev = _pick_device(device)
    n_threads = threads or _available_cores()
    started = time.time()

    split = Holdout(share=float(holdout), salt=int(seed), shards=_shard_digests(corpus, kernel_size),
                    models=_pool_models(corpus, models, exclude_models))
    rng = np.random.default_rng(seed)
    raw, drawn = sample_kernels(corpus, kernel_size, kind=kind, sample=sample, rng=rng, progress=progress,
                                holdout=split)
    kernels, excluded = _preprocess(raw, min_abs=min_abs, threads=threads)
    del raw
    if len(kernels) < 2:
        raise ValueError(f"{corpus.root}: only {len(kernels)} usable {kernel_size}x{kernel_size} kernels of kind "
                         f"{kind!r} in the training pool ({excluded['dead']} dead, {excluded['flat']} flat, "
                         f"{excluded['nonfinite']} non-finite): nothing to train on; extract more models, pick "
                         "another --kind or lower --holdout")
    order = rng.permutation(len(kernels))
    n_val = min(max(1, round(val_share * len(kernels))), len(kernels) - 1) if val_share > 0 else 0
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    if epochs is not None:
        max_steps = min(max_steps, epochs * math.ceil(len(train_idx) / batch_size))
    fit_options = dict(max_steps=max_steps, epochs_cap=epochs is not None, batch_size=batch_size, lr=lr,
                       schedule=schedule, patience=patience, min_rel_delta=min_rel_delta, eval_every=eval_every,
                       lr_drops=lr_drops, progress=progress, device=dev, code_penalty=code_penalty,
                       code_margin=code_margin)

    with _torch_settings(torch, n_threads, deterministic=dev.type == "cpu"):
        train_x = torch.from_numpy(kernels[train_idx]).to(dev)
        val_x = torch.from_numpy(kernels[val_idx]).to(dev)
        runs = []
        for restart in range(restarts):
            # restart 0 uses the seed itself, so restarts=1 is the plain run
            run_seed = seed + restart * RESTART_SEED_STRIDE
            torch.manual_seed(run_seed)
            net = _build(torch, kernel_size * kernel_size, widths, activation, code_activation)
            net[0].to(dev)
            net[1].to(dev)
            history = _fit(torch, net[0], net[1], train_x, val_x, seed=run_seed,
                           desc="training" if restarts == 1 else f"training {restart + 1}/{restarts}",
                           **fit_options)
            runs.append((history["best_val_loss"], restart, net, history))
        all_val = [run[0] for run in runs]
        _, chosen, (encoder, decoder), history = min(runs, key=lambda run: (run[0], run[1]))
        del runs, train_x, val_x
        codes = _codes(torch, encoder, torch.from_numpy(kernels).to(dev))
        encoder.cpu()
        decoder.cpu()
    del kernels

    model = Autoencoder.from_torch(encoder, decoder)
    quantiles = _quantiles(codes)
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
            "code_penalty": code_penalty,
            "code_margin": code_margin,
            "stop_reason": history["stop_reason"],
            "steps_run": history["steps_run"],
            "best_step": history["best_step"],
            "steps_per_epoch": math.ceil(len(train_idx) / batch_size),
            "max_steps": max_steps,
            "epochs_max": epochs,
            "epochs_run": round(history["steps_run"] * batch_size / max(len(train_idx), 1), 2),
            "schedule": schedule,
            "lr_drops": lr_drops,
            "lr_final": history["lr_final"],
            "eval_every": eval_every,
            "patience": patience,
            "min_rel_delta": min_rel_delta,
            "batch_size": batch_size,
            "lr": lr,
            "optimizer": "Adam",
            "val_share": val_share,
            "min_abs": min_abs,
            "seed": seed,
            "device": str(dev),
            "threads": n_threads,
            "torch_version": torch.__version__,
            "train_loss": history["best_train_loss"],
            "val_loss": history["best_val_loss"],
            "final_train_loss": history["train_loss"][-1],
            "final_val_loss": history["val_loss"][-1],
            "history": {k: history[k] for k in ("step", "train_loss", "val_loss", "lr")},
            "train_seconds": round(time.time() - started, 3),
            "fit_seconds": round(history["seconds"], 3),
            "code_quantiles": quantiles,
            "code_density": _code_density(codes, code_activation, quantiles),
        },
        "holdout": split.to_json(),
        "corpus": _corpus_record(corpus),
        "sample": {
            "requested": sample,
            "available": drawn["available"],
            "pool": drawn["pool"],
            "drawn": drawn["drawn"],
            "used": int(len(train_idx) + len(val_idx)),
            "train": len(train_idx),
            "validation": len(val_idx),
            "excluded": excluded,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("clusters.json", "spectrum.png"):  # they describe an earlier model's code axis
        with contextlib.suppress(FileNotFoundError):
            (out / stale).unlink()
    model.save(out)
    return model


def _shard_digests(corpus: Corpus, kernel_size: int) -> dict[str, str]:
    """shard path -> sha256 of the corpus's k x k shards now (what the held-out record calls 'seen')."""
    digests = {str(s["path"]): str(s.get("sha256", "")) for s in corpus.manifest.get("shards", [])}
    return {s: digests.get(s, "") for s in corpus.shards(kernel_size)}


def _pool_models(corpus: Corpus, models: Sequence[int | str] | None,
                 exclude: Sequence[int | str]) -> tuple[int, ...] | None:
    """The model ids training may draw from (None: every model), from ids or names."""
    if models is None and not exclude:
        return None
    pool = set(corpus.model_ids(models) if models is not None else corpus.models["model_id"].astype(int))
    pool -= set(corpus.model_ids(exclude))
    if not pool:
        raise ValueError(f"{corpus.root}: models / exclude_models leave no model to train on")
    return tuple(sorted(pool))


# ---------------------------------------------------------------------------------------------- sampling


def per_layer_counts(rng: np.random.Generator, sizes: np.ndarray, n: int) -> np.ndarray:
    """How many of a uniform sample of ``n`` rows without replacement fall in each layer (``sizes`` rows each):
    a multivariate hypergeometric draw.  numpy's draw refuses pools of 10^9 rows or more (CNN Filter DB has
    1.46x10^9), so there ``n`` distinct positions of the pool are drawn instead (Floyd's method: memory in n) and
    counted per layer -- the same distribution; below 10^9 the draw is numpy's, as before."""
    sizes = np.asarray(sizes, dtype=np.int64)
    pool = int(sizes.sum())
    if pool < 1_000_000_000:
        return rng.multivariate_hypergeometric(sizes, n, method="marginals")
    picks = np.sort(rng.choice(pool, size=n, replace=False))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return np.diff(np.searchsorted(picks, bounds, side="left")).astype(np.int64)


def sample_kernels(
    corpus: Corpus,
    kernel_size: int,
    *,
    kind: str = "depthwise",
    sample: int | None = 2_000_000,
    rng: np.random.Generator | None = None,
    progress: bool = False,
    holdout: Holdout | None = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """A uniform sample without replacement of the stored k x k rows of layers of ``kind`` ('all': every
    kind) in the training pool of ``holdout`` (None: every row), as a float32 array [n, k*k] in corpus order
    (shard by shard, rows ascending), and the counts ``{"available", "pool", "drawn"}``.  Only the sampled rows
    are read from the memmaps; the held-out rule is evaluated per layer (memory bounded by the largest layer)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    layers = corpus.layers
    sel = layers[(layers["kh"] == kernel_size) & (layers["kw"] == kernel_size) & (layers["rows"] > 0)
                 & (layers["shard"] != "")]
    if kind != "all":
        sel = sel[sel["kind"] == kind]
    shard_order = {s: i for i, s in enumerate(corpus.shards(kernel_size))}
    sel = sel[sel["shard"].isin(list(shard_order))]
    sel = sel.assign(_shard_pos=sel["shard"].map(shard_order)).sort_values(["_shard_pos", "row_start"], kind="stable")
    available = int(sel["rows"].sum())
    if available == 0:
        what = "layers" if kind == "all" else f"{kind} layers"
        raise ValueError(f"{corpus.root} stores no {kernel_size}x{kernel_size} kernels of {what} (see "
                         "`kernelatlas info`; extract with --sizes including the size, or --all-convs for "
                         "regular layers)")
    if holdout is not None and holdout.models is not None:
        sel = sel[sel["model_id"].isin(list(holdout.models))]
    keys = holdout.keys(corpus, sel) if holdout is not None and holdout.share > 0.0 else np.zeros(len(sel), np.uint64)
    layer_list = list(zip(sel["shard"].astype(str), sel["row_start"].astype(np.int64), sel["rows"].astype(np.int64),
                          keys, strict=True))

    def pool_rows(shard: str, start: int, n_rows: int, key: np.uint64) -> np.ndarray | None:
        """Rows of one layer in the pool (None: all of them)."""
        if holdout is None or holdout.share == 0.0:
            return None
        return start + np.flatnonzero(~holdout.layer_mask(key, shard, start, n_rows)).astype(np.int64)

    pools = [None if (p := pool_rows(*layer)) is None else len(p) for layer in layer_list]
    sizes = np.array([layer[2] if p is None else p for layer, p in zip(layer_list, pools, strict=True)],
                     dtype=np.int64)
    pool = int(sizes.sum())
    if pool == 0:
        raise ValueError(f"{corpus.root}: every {kernel_size}x{kernel_size} kernel of the selected models is held "
                         "out: lower --holdout or train on more models")
    n = pool if sample is None or sample >= pool else int(sample)
    per_layer = sizes if n == pool else per_layer_counts(rng, sizes, n)
    d = kernel_size * kernel_size
    out = np.empty((n, d), dtype=np.float32)
    pos = 0
    bar = _bar(progress, total=n, desc=f"sampling {kernel_size}x{kernel_size}", unit="kernel")
    i = 0
    while i < len(layer_list):
        shard = layer_list[i][0]
        arr = corpus.shard_array(shard)
        idx = []
        while i < len(layer_list) and layer_list[i][0] == shard:
            _, start, n_rows, key = layer_list[i]
            count = int(per_layer[i])
            if count:
                rows = pool_rows(shard, int(start), int(n_rows), key)
                if rows is None:
                    rows = np.arange(start, start + n_rows, dtype=np.int64)
                if count < len(rows):
                    rows = rows[np.sort(rng.choice(len(rows), size=count, replace=False))]
                idx.append(rows)
            i += 1
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
    return out, {"available": available, "pool": pool, "drawn": n}


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
    from kernelatlas.autoencoder import torch_activation

    nn = torch.nn

    def stack(sizes: Sequence[int], acts: Sequence[str]) -> Any:
        mods: list[Any] = []
        for i, act in enumerate(acts):
            mods.append(nn.Linear(sizes[i], sizes[i + 1]))
            if act != "identity":
                mods.append(torch_activation(act))
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


def _fit(torch: Any, encoder: Any, decoder: Any, train_x: Any, val_x: Any, *, max_steps: int, epochs_cap: bool,
         batch_size: int, lr: float, schedule: str, patience: int, min_rel_delta: float, eval_every: int,
         lr_drops: int, seed: int, progress: bool, device: Any, code_penalty: float = 0.0,
         code_margin: float = 0.0, desc: str = "training") -> dict[str, Any]:
    """Adam on the cosine loss, step by step, until convergence (module docstring) or ``max_steps``; keeps the
    weights of the best validation loss.  Returns the history (one entry per evaluation) and why it stopped."""
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    penalised = code_penalty > 0 and not isinstance(encoder[-1], torch.nn.Linear)
    pre_code, code_act = encoder[:-1], encoder[-1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = len(train_x)
    has_val = len(val_x) > 0
    best = math.inf          # best validation loss seen (its weights are kept)
    plateau_ref = math.inf   # the loss a new value must beat by min_rel_delta to count as progress
    best_step, best_train, stale, drops = 0, math.inf, 0, 0
    best_state = [p.detach().clone() for p in params]
    hist: dict[str, list[float]] = {"step": [], "train_loss": [], "val_loss": [], "lr": []}
    stop_reason = ""
    current_lr = lr
    window = torch.zeros((), dtype=torch.float32, device=device)  # sum of the batch losses since the last eval
    window_steps = 0
    step = 0
    started = time.perf_counter()
    bar = _bar(progress, total=max_steps, desc=desc, unit="step")
    while not stop_reason:
        encoder.train()
        decoder.train()
        perm = torch.randperm(n, generator=gen).to(device)
        for a in range(0, n, batch_size):
            if schedule == "cosine":
                current_lr = lr * 0.5 * (1.0 + math.cos(math.pi * step / max_steps))
                for group in opt.param_groups:
                    group["lr"] = current_lr
            batch = train_x[perm[a:a + batch_size]]
            if penalised:  # the loss plus code_penalty * mean(max(|pre-activation| - code_margin, 0)^2)
                pre = pre_code(batch)
                loss = _cosine_loss(torch, batch, decoder(code_act(pre)))
                objective = loss + code_penalty * (pre.abs() - code_margin).clamp_min(0.0).square().mean()
            else:
                loss = objective = _cosine_loss(torch, batch, decoder(encoder(batch)))
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
            window += loss.detach()  # one in-place add per step: the loop stays as cheap as a plain torch loop
            window_steps += 1
            step += 1
            bar.update(1)
            if step % eval_every and step != max_steps:
                continue
            train_loss = float(window.item()) / window_steps  # mean of the batch losses since the last eval
            window.zero_()
            window_steps = 0
            val_loss = _evaluate(torch, encoder, decoder, val_x) if has_val else train_loss
            encoder.train()
            decoder.train()
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                bar.close()
                raise RuntimeError(f"training diverged by step {step} (loss {train_loss} train, {val_loss} "
                                   "validation): lower the learning rate (--lr)")
            for key, value in (("step", step), ("train_loss", round(train_loss, 7)),
                               ("val_loss", round(val_loss, 7)), ("lr", current_lr)):
                hist[key].append(value)
            if val_loss < best:
                best, best_step, best_train = val_loss, step, train_loss
                best_state = [p.detach().clone() for p in params]
            if val_loss < plateau_ref * (1.0 - min_rel_delta):
                plateau_ref, stale = val_loss, 0
            else:
                stale += eval_every
            bar.set_postfix_str(f"train {train_loss:.4f} val {val_loss:.4f} lr {current_lr:.1e}", refresh=True)
            if stale >= patience:
                if schedule == "plateau" and drops < lr_drops:
                    drops += 1
                    stale = 0
                    current_lr *= LR_FACTOR
                    for group in opt.param_groups:
                        group["lr"] = current_lr
                else:
                    stop_reason = (f"converged: validation loss improved by less than {min_rel_delta:g} (relative) "
                                   f"over {patience} steps" + (f" after {drops} learning-rate drops"
                                                               if schedule == "plateau" else ""))
                    break
            if step >= max_steps:
                stop_reason = (f"epochs: the --epochs cap ({step} steps)" if epochs_cap else
                               f"max_steps: the step cap ({max_steps}) before convergence; raise --max-steps")
                break
    bar.close()
    with torch.no_grad():
        for p, saved in zip(params, best_state, strict=True):
            p.copy_(saved)
    return {**hist, "steps_run": step, "best_step": best_step, "best_val_loss": round(best, 7),
            "best_train_loss": round(best_train, 7), "stop_reason": stop_reason, "lr_final": current_lr,
            "seconds": time.perf_counter() - started}


def _evaluate(torch: Any, encoder: Any, decoder: Any, x: Any) -> float:
    encoder.eval()
    decoder.eval()
    total = 0.0
    with torch.no_grad():
        for a in range(0, len(x), 65536):
            batch = x[a:a + 65536]
            total += float(_cosine_loss(torch, batch, decoder(encoder(batch))).double().item()) * len(batch)
    return total / len(x)


def _codes(torch: Any, encoder: Any, x: Any) -> np.ndarray:
    encoder.eval()
    parts = []
    with torch.no_grad():
        for a in range(0, len(x), 65536):
            parts.append(encoder(x[a:a + 65536]).squeeze(1).cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _code_density(codes: np.ndarray, code_activation: str, quantiles: dict[str, float]) -> dict[str, Any]:
    """Histogram of the codes of every kernel training used: where real kernels sit on the code axis (what
    :func:`kernelatlas.clusters` anchors intervals on)."""
    if code_activation == "sigmoid":
        lo, hi = 0.0, 1.0
    elif code_activation == "tanh":
        lo, hi = -1.0, 1.0
    elif quantiles:
        lo, hi = quantiles["q0"], quantiles["q1"]
    else:
        return {}
    if not hi > lo:
        hi = lo + 1.0
    counts, _ = np.histogram(codes.astype(np.float64), bins=CODE_BINS, range=(lo, hi))
    return {"lo": float(lo), "hi": float(hi), "counts": [int(c) for c in counts]}


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
                   max_steps: int, epochs: int | None, sample: int | None, batch_size: int, lr: float,
                   schedule: str, patience: int, min_rel_delta: float, eval_every: int, lr_drops: int,
                   val_share: float, holdout: float, min_abs: float, threads: int | None) -> None:
    if kernel_size < 1 or kernel_size * kernel_size > 64:
        raise ValueError(f"kernel_size must be 1..8 (the engine takes up to 64 entries), got {kernel_size}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not widths or any(int(w) < 1 or int(w) > 256 for w in widths) or len(widths) > 4:
        raise ValueError(f"widths must be 1 to 4 hidden widths of 1..256 units (engine limits), got {list(widths)}")
    for name, act in (("activation", activation), ("code_activation", code_activation)):
        if act not in ACTIVATIONS:
            raise ValueError(f"{name} must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1 (or None: no epoch cap), got {epochs}")
    if sample is not None and sample < 2:
        raise ValueError(f"sample must be >= 2 (or None for every row), got {sample}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if patience < 1 or eval_every < 1:
        raise ValueError(f"patience and eval_every are steps (>= 1), got {patience} and {eval_every}")
    if not 0 <= min_rel_delta < 1:
        raise ValueError(f"min_rel_delta must be in [0, 1), got {min_rel_delta}")
    if lr_drops < 0:
        raise ValueError(f"lr_drops must be >= 0, got {lr_drops}")
    if not 0.0 <= val_share < 0.5:
        raise ValueError(f"val_share must be in [0, 0.5), got {val_share}")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if not min_abs >= 0:
        raise ValueError(f"min_abs must be >= 0, got {min_abs}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for all cores), got {threads}")
