"""Training speed: kernelatlas.train against the plain PyTorch loop a user would write (the one issue 11 used:
numpy centring and L2 normalisation, the same network, Adam 1e-3, batches of 256 drawn from a fresh
permutation each epoch), on the same kernels, threads and number of optimiser steps, in the same run.

    python -m pytest benchmarks/test_bench_training.py -p no:cacheprovider -s

kernelatlas.train does more per run than the peer (it samples from the corpus memmaps, preprocesses with the
engine, evaluates the validation loss every 200 steps, keeps the best weights, records the code density); the
figure that matters is steps per second of the whole call against the peer's loop.  KERNELATLAS_BENCH_TRAIN_STEPS
(default 4,000), KERNELATLAS_BENCH_TRAIN_ROWS (default 15,706: the default corpus's 3x3 depthwise kernels),
KERNELATLAS_BENCH_THREADS (default: all cores).  Machine: see `kernelatlas build-info`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from planted import planted_kernels, write_corpus

import kernelatlas as ka
from kernelatlas.templates import templates

STEPS = int(os.environ.get("KERNELATLAS_BENCH_TRAIN_STEPS", "4000"))
ROWS = int(os.environ.get("KERNELATLAS_BENCH_TRAIN_ROWS", "15706"))
THREADS = int(os.environ.get("KERNELATLAS_BENCH_THREADS", "0")) or len(os.sched_getaffinity(0))
ROUNDS = 6


def plain_torch_loop(kernels: np.ndarray, steps: int, threads: int) -> float:
    """The peer: seconds for ``steps`` Adam steps of the same autoencoder, preprocessing included."""
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    x = kernels - kernels.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(x, axis=1)
    x = torch.from_numpy((x[norms > 0] / norms[norms > 0, None]).astype(np.float32))
    torch.manual_seed(0)
    nn = torch.nn
    d = x.shape[1]
    enc = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())
    dec = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, d))
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    done = 0
    while done < steps:
        perm = torch.randperm(len(x))
        for a in range(0, len(x), 256):
            batch = x[perm[a:a + 256]]
            recon = dec(enc(batch))
            loss = (1 - (batch * recon).sum(1) / recon.norm(dim=1).clamp_min(1e-8)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return time.perf_counter() - started


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    bank = templates(3)
    sources = np.array([bank[n] for n in ("dog_on", "dog_off", "dx+", "dy-", "dxy+", "cross_on")])
    n_per = ROWS // 7
    kernels, _ = planted_kernels(sources, n_per, ROWS - 6 * n_per, 0.3, seed=0)
    return write_corpus(tmp_path_factory.mktemp("bench-train") / "corpus", kernels, 3), kernels


def test_training_steps_per_second_vs_plain_torch(corpus, tmp_path):
    corpus, kernels = corpus
    ours, peer = [], []
    for r in range(ROUNDS):  # alternating, and which goes first alternates too (the machine warms up)
        order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")
        for who in order:
            if who == "peer":
                peer.append(plain_torch_loop(kernels, STEPS, THREADS))
                continue
            t0 = time.perf_counter()
            model = ka.train(corpus, 3, tmp_path / f"m{r}", max_steps=STEPS, schedule="constant", patience=10**9,
                             holdout=0.0, threads=THREADS, progress=False, sample=None)
            ours.append(time.perf_counter() - t0)
            assert model.info["training"]["steps_run"] == STEPS
    o, p = float(np.median(ours)), float(np.median(peer))
    fit = model.info["training"]["fit_seconds"]
    print(f"\ntraining, {len(kernels):,} 3x3 kernels, {STEPS:,} steps of 256, {THREADS} threads, "
          f"{ka.build_info().get('isa')}: kernelatlas.train {STEPS / o:,.0f} steps/s ({o:.2f} s, of which the "
          f"step loop {fit:.2f} s), plain torch {STEPS / p:,.0f} steps/s ({p:.2f} s): ratio {p / o:.2f}x "
          f"(> 1: kernelatlas faster); rounds {[round(t, 2) for t in ours]} vs {[round(t, 2) for t in peer]}")
