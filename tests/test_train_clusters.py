"""Training the autoencoder, naming the clusters of its code axis, and the analytic templates the names come from.

(a) templates: shape, normalisation, orientation (row = y down, column = x right, as torch stores kernels),
    distinctness; (b) training is bit-reproducible on the CPU and samples only what it is asked to; (c) the
    planted-cluster check: kernels a*f + b + noise made from known patterns f, plus pure noise, go through
    train -> clusters -> assign, and the patterns must come back as separate clusters; (d) clusters.json round
    trip with Autoencoder.load, hand edits honoured; (e) the same model always gives the same intervals.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from planted import centred_unit, make_small_corpus, planted_kernels, read_master_key_filters, write_corpus

import kernelatlas as ka
from kernelatlas import Autoencoder
from kernelatlas.autoencoder import Dense
from kernelatlas.cli import main as cli_main
from kernelatlas.corpus import Corpus
from kernelatlas.jobs.clusters import THRESHOLDS, clusters, merge_intervals, read_spec
from kernelatlas.jobs.train import train
from kernelatlas.templates import _PAIRS, best_match, template_names, templates

SIZES = (3, 5, 7, 9, 11)


# ---------------------------------------------------------------------------------------------- (a) templates


@pytest.mark.parametrize("k", SIZES)
def test_templates_are_centred_unit_kernels(k):
    bank = templates(k)
    expected = set(template_names()) - ({"square_on", "square_off"} if k == 3 else set())
    assert set(bank) == expected
    for name, t in bank.items():
        assert t.shape == (k, k) and t.dtype == np.float64, name
        assert abs(t.mean()) < 1e-12, name
        assert abs(np.linalg.norm(t) - 1.0) < 1e-12, name


@pytest.mark.parametrize("k", SIZES)
def test_templates_are_distinct(k):
    bank = templates(k)
    names = list(bank)
    pairs = {frozenset(p) for p in _PAIRS}
    cos = np.array([[float(np.vdot(bank[a], bank[b])) for b in names] for a in names])
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            b = names[j]
            if frozenset((a, b)) in pairs:
                assert cos[i, j] == pytest.approx(-1.0, abs=1e-12), (a, b)
            else:
                assert cos[i, j] < 0.9, f"{a} and {b} are too alike at {k}x{k}: cosine {cos[i, j]:.3f}"


def _response(kernel: np.ndarray, image: np.ndarray) -> float:
    """torch's conv2d (a correlation) of an image with the kernel, at the image centre."""
    out = F.conv2d(torch.from_numpy(image)[None, None], torch.from_numpy(kernel)[None, None])
    return float(out[0, 0, out.shape[2] // 2, out.shape[3] // 2])


@pytest.mark.parametrize("k", SIZES)
def test_template_orientation_matches_torch(k):
    """Row index = y (down), column index = x (right): "dx+" grows to the right and responds positively under
    conv2d to an image that brightens to the right; "dy+" likewise downwards; "dxy+" is positive top-left and
    bottom-right."""
    bank = templates(k)
    c = k // 2
    size = 3 * k
    cols, rows = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    dx, dy = bank["dx+"], bank["dy+"]
    assert (dx[:, c + 1:].sum(axis=1) > 0).all() and (dx[:, :c].sum(axis=1) < 0).all()
    assert np.allclose(dx[:, c], 0) and np.allclose(dx, -dx[:, ::-1]) and np.allclose(dx, dx[::-1, :])
    assert dx[c, c + 1] > dx[c, c] > dx[c, c - 1]
    assert np.allclose(dy, dx.T)
    assert dy[c + 1, c] > dy[c, c] > dy[c - 1, c]
    assert _response(dx, cols) > 0 and _response(dx, rows) == pytest.approx(0, abs=1e-9)
    assert _response(dy, rows) > 0 and _response(dy, cols) == pytest.approx(0, abs=1e-9)
    assert _response(bank["dx-"], cols) < 0
    dxy = bank["dxy+"]
    assert dxy[0, 0] > 0 and dxy[-1, -1] > 0 and dxy[0, -1] < 0 and dxy[-1, 0] < 0
    # second derivatives: dxx+ is a valley along the centre column, dyy+ along the centre row
    assert bank["dxx+"][c, c] < 0 < bank["dxx+"][c, -1] and np.allclose(bank["dyy+"], bank["dxx+"].T)
    # centre-surround: on-centre templates peak at the centre
    for name in ("gauss_on", "dog_on", "cross_on"):
        assert bank[name][c, c] == bank[name].max(), name
    if k >= 5:
        assert bank["square_on"][c, c] < 0 < bank["square_on"].max()


def test_templates_name_the_master_key_derivatives():
    """An outside check of the orientation: filter 5 of the master-key set is a centred x-derivative (positive
    on the left) and filter 6 a centred y-derivative (positive at the bottom), per its authors."""
    filters = read_master_key_filters()
    bank = templates(7)
    assert best_match(filters[4], bank)[0] == "dx-"
    assert best_match(filters[5], bank)[0] == "dy+"


@pytest.mark.parametrize("k", (1, 2, 4, 0))
def test_templates_reject_even_or_tiny_sizes(k):
    with pytest.raises(ValueError, match="odd kernel sizes"):
        templates(k)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Corpus, np.ndarray, np.ndarray]:
    return make_small_corpus(tmp_path_factory.mktemp("small") / "corpus")


# ---------------------------------------------------------------------------------------------- (c) planted clusters

# The planted check.  Sources: the 8 master-key filters at 7x7; 8 analytic templates at 3x3 and 5x5.  Kernels:
# planted_kernels() with noise up to NOISE_MAX (noise norm / signal norm), so every planted kernel has a cosine
# of about 0.96 or more with its source; pure-noise kernels are 1/9 of the corpus.  All kernels are assigned,
# including the 20% that training holds out (the default holdout).
# Threshold: 0.85 at 5x5 and 7x7; 0.9 at 3x3, because after centring a 3x3 kernel has only 8 dimensions and about
# 2-4% of pure-noise kernels lie within cosine 0.85 of the decoded curve whatever the training (measured 2.1-3.9%
# over the 12 seeds below); at 0.9, 0.5-1.1%.
# Training and cut: the library defaults of train() and clusters() (the seed, threads=2, progress=False and
# sample=None aside), so restarts=1 and the code penalty (code_penalty=0.01 beyond code_margin=4); the check used
# to train with 3 restarts and cut at merge_cos 0.8, and no longer does.  Measured over PLANTED_SEEDS (1,500
# kernels per source; training to convergence, plateau schedule, holdout 0.2), passes out of 12 at 3x3 / 5x5 / 7x7:
#   with the code penalty (default), density rule (default)   12 / 12 / 12
#   before it (code_penalty=0):
#     density rule (default)                                  12 / 9 / 11
#     first-pattern rule, merge 0.9                            9 / 9 / 11
#     first-pattern rule, merge 0.8                           10 / 9 / 10
# The first-pattern rule's failures at 3x3 are cuts: an interval that starts on a transition between two
# clusters ends inside the next cluster's stretch of the axis and splits it (a cluster's decoded patterns span a
# 10-25 degree arc; acos(0.9) is 26 degrees).  On every model the density rule passed before the penalty, at
# least 99.88% of the planted kernels were in their source's cluster, in 6-8 intervals (the first-pattern rule
# made 17-27).
# Without the code penalty the density rule's 4 failures (5x5 seeds 3, 7, 10; 7x7 seed 6) were failures of the
# first-pattern rule too: training parked two or three sources on the same saturated end of the sigmoid code
# (figures["shared_ends"]), where they decode to one blend that no cut can separate, and where the sigmoid is
# flat, so no gradient pulls them apart.  At 7x7 seed 6 those were filters 4 and 5 (cosine 0.68), and filters 7
# and 8 (cosine 0.90; their anchors 0.904) are merged at merge_cos 0.9 as well, leaving 6 of 8.  3 restarts
# recovered the three 5x5 models (at three times the training time), not the 7x7 one.  The penalty on code
# pre-activations beyond +-4 keeps every cluster off the flat tails: with it all 36 models pass (this test, run
# with threads=2; with threads=1, whose weights differ at some seeds, 36 of 36 too), no source's median code lies
# within 0.01 of an end, every source comes back at 3x3 and 5x5 (8 of 8) and 7 or 8 of 8 at 7x7 (filters 7 and 8
# merged at merge_cos 0.9 in 8 of 12, no other pair), at least 99.90% of the planted kernels are in their
# source's cluster, and 0.5-1.3% of the pure-noise kernels are assigned at 3x3 (none at 5x5 and 7x7).  The
# first-pattern rule was not measured with the penalty.
PLANTED_SOURCES = ("dog_on", "dog_off", "dx+", "dx-", "dy+", "dy-", "dxy+", "cross_on")
NOISE_MAX = 0.3
PLANTED_THRESHOLD = {3: 0.9, 5: 0.85, 7: 0.85}
PLANTED_SEEDS = tuple(range(12))


def planted_sources(k: int) -> np.ndarray:
    if k == 7:
        return read_master_key_filters()
    bank = templates(k)
    return np.array([bank[name] for name in PLANTED_SOURCES])


def run_planted_check(tmp_path: Path, k: int, *, n_per: int, seed: int, **training) -> dict:
    """Planted kernels drawn with data seed 100 * seed + k, trained with ``seed`` at the library defaults (but
    ``training``), cut at the defaults of clusters(), every kernel assigned."""
    sources = planted_sources(k)
    kernels, source = planted_kernels(sources, n_per, n_per, NOISE_MAX, seed=100 * seed + k)
    corpus = write_corpus(tmp_path / "corpus", kernels, k)
    train(corpus, k, tmp_path / "model", progress=False, **({"seed": seed, "threads": 2, "sample": None} | training))
    intervals = clusters(tmp_path / "model", plot=False)
    assert read_spec(tmp_path / "model")["options"]["rule"] == "density"
    model = Autoencoder.load(tmp_path / "model")
    assert model.cluster_names == [iv["name"] for iv in intervals]
    labels, _, codes = ka.assign(kernels, model, threshold=PLANTED_THRESHOLD[k])
    planted = source >= 0
    # each source's cluster: the label most of its kernels get (-1 if most are unassigned)
    cluster_of = np.array([np.bincount(labels[source == i] + 1).argmax() - 1 for i in range(len(sources))])
    recovered = len({int(c) for c in cluster_of if c >= 0})
    # a training failure that no cut can undo: sources whose kernels sit on the same saturated end of the code
    medians = [float(np.median(codes[source == i])) for i in range(len(sources))]
    ends = {end: [i for i, m in enumerate(medians) if abs(m - end) < 0.01] for end in (0.0, 1.0)}
    figures = {
        "recovered": recovered,
        "assigned": float(np.mean((labels[planted] == cluster_of[source[planted]]) & (labels[planted] >= 0))),
        "noise": float(np.mean(labels[~planted] >= 0)),
        "clusters": [intervals[c]["name"] if c >= 0 else None for c in cluster_of],
        "intervals": len(intervals),
        "shared_ends": {end: ids for end, ids in ends.items() if len(ids) > 1},
    }
    print(f"planted {k}x{k} seed {seed}: {figures}")
    return figures


def check_planted(figures: dict) -> None:
    assert figures["recovered"] >= 7, f"only {figures['recovered']} of 8 patterns came back as clusters: {figures}"
    assert figures["assigned"] >= 0.95, f"planted kernels assigned to their source's cluster: {figures}"
    assert figures["noise"] <= 0.02, f"pure-noise kernels assigned to a cluster: {figures}"


@pytest.mark.parametrize("k", (3, 5, 7))
def test_planted_clusters_are_recovered(tmp_path, k):
    """1,500 kernels per source and 1,500 of noise, one seed per size (the first of PLANTED_SEEDS); tens of
    seconds of training per size on 2 cores."""
    figures = run_planted_check(tmp_path, k, n_per=1500, seed=PLANTED_SEEDS[0])
    check_planted(figures)
    if k == 5:  # names: every source's cluster is named after its own template
        assert figures["clusters"] == list(PLANTED_SOURCES)


@pytest.mark.slow
@pytest.mark.parametrize("seed", PLANTED_SEEDS)
@pytest.mark.parametrize("k", (3, 5, 7))
def test_planted_clusters_are_recovered_for_every_seed(tmp_path, k, seed):
    """The planted check at the defaults for each of 12 seeds (data and training) per size: the stability the
    density rule was chosen for (the first-pattern rule split clusters of 3 of the 12 models at 3x3) and the
    code penalty of training for (without it, training parked two sources on one saturated end of the code at
    5x5 seeds 3, 7, 10 and 7x7 seed 6; with it all 36 pass -- see the comment above PLANTED_SOURCES)."""
    check_planted(run_planted_check(tmp_path, k, n_per=1500, seed=seed))


@pytest.mark.slow
@pytest.mark.parametrize("k", (3, 5, 7))
def test_planted_clusters_are_recovered_at_scale(tmp_path, k):
    """20,000 kernels per source, drawn through a 100,000-kernel sample of the corpus."""
    check_planted(run_planted_check(tmp_path, k, n_per=20_000, seed=1, sample=100_000))


# ---------------------------------------------------------------------------------------------- clusters


def line_model(k: int, a: np.ndarray, b: np.ndarray) -> Autoencoder:
    """A model whose decoder is the straight line a + z (b - a) (identity layer), so the decoded spectrum is
    known exactly; its encoder ignores the kernel (code 0.5)."""
    d = k * k
    encoder = [Dense(np.zeros((1, d), np.float32), np.zeros(1, np.float32), "sigmoid")]
    decoder = [Dense((b - a).reshape(d, 1).astype(np.float32), a.reshape(d).astype(np.float32), "identity")]
    return Autoencoder(encoder, decoder, k)


def step_model(k: int, a: np.ndarray, b: np.ndarray, at: float = 0.5, steep: float = 50.0) -> Autoencoder:
    """A decoder that holds pattern a up to code ``at`` and pattern b from at + 1/steep on (ReLU ramp)."""
    d = k * k
    encoder = [Dense(np.zeros((1, d), np.float32), np.zeros(1, np.float32), "sigmoid")]
    hidden = Dense(np.array([[steep], [steep]], np.float32), np.array([-steep * at, -steep * at - 1], np.float32),
                   "relu")
    out = Dense(np.stack([(b - a).ravel(), (a - b).ravel()], axis=1).astype(np.float32), a.reshape(d).astype(np.float32),
                "identity")
    return Autoencoder(encoder, [hidden, out], k)


def reference_cut(patterns: np.ndarray, merge_cos: float) -> list[int]:
    """The documented rule, written out: a pattern joins the open interval while its cosine with the interval's
    first pattern is >= merge_cos."""
    unit = centred_unit(patterns)
    starts = [0]
    for i in range(1, len(unit)):
        if unit[i] @ unit[starts[-1]] < merge_cos:
            starts.append(i)
    return starts


@pytest.mark.parametrize("samples", (2, 9, 200, 501))
def test_intervals_follow_the_first_pattern_rule(tmp_path, samples):
    bank = templates(5)
    a, b = bank["dx+"], bank["dy-"]
    line_model(5, a, b).save(tmp_path)
    intervals = clusters(tmp_path, samples=samples, rule="first", plot=False)
    grid = np.linspace(0.0, 1.0, samples)
    patterns = line_model(5, a, b).decode(grid.astype(np.float32)).astype(np.float64)
    starts = reference_cut(patterns, 0.9)
    edges = [0.0] + [(grid[s - 1] + grid[s]) / 2 for s in starts[1:]] + [1.0]
    assert [iv["lo"] for iv in intervals] == pytest.approx(edges[:-1], abs=1e-12)
    assert [iv["hi"] for iv in intervals] == pytest.approx(edges[1:], abs=1e-12)
    if samples >= 200:
        # a straight path from dx+ to dy- turns by 90 degrees: cut about every 26 degrees, so 4 intervals, the
        # first ending where cos(pattern, dx+) drops below 0.9 (z = 0.3263 for a path between orthogonal unit
        # patterns), not where neighbours differ (they never differ by that much)
        assert len(intervals) == 4
        assert intervals[0]["hi"] == pytest.approx(0.3263, abs=1.0 / samples)
        assert intervals[0]["name"] == "dx+" and intervals[-1]["name"] == "dy-"


def test_intervals_are_named_by_templates(tmp_path):
    bank = templates(7)
    step_model(7, bank["dog_on"], -bank["dxy+"], at=0.4).save(tmp_path)
    intervals = clusters(tmp_path, rule="first", plot=False)
    names = [iv["name"] for iv in intervals]
    assert names[0] == "dog_on" and names[-1] == "dxy-", names
    assert intervals[0]["template_cos"] == pytest.approx(1.0, abs=1e-5)
    assert intervals[0]["hi"] == pytest.approx(0.4 + 0.5 / 199, abs=1.0 / 199)  # the ramp starts at 0.4
    # between them, only intervals that start inside the 1/50-wide ramp
    assert all(0.4 < iv["lo"] < 0.4 + 1 / 50 + 1 / 199 for iv in intervals[1:])
    # a pattern that matches no template gets a numbered name; duplicates get suffixes, best match plain
    odd = np.zeros((7, 7))
    odd[0, 0], odd[6, 3] = 1.0, -1.0
    step_model(7, odd, odd * 1.0001).save(tmp_path)
    only = clusters(tmp_path, rule="first", plot=False)
    assert [iv["name"] for iv in only] == ["pattern_1"] and only[0]["template_cos"] < 0.7


def test_clusters_spec_round_trip_and_hand_edits(tmp_path):
    bank = templates(3)
    line_model(3, bank["dog_on"], bank["dx+"]).save(tmp_path)
    intervals = clusters(tmp_path, samples=200)
    spec = read_spec(tmp_path)
    assert spec["thresholds"] == list(THRESHOLDS) == [0.8, 0.85, 0.9]
    # a hand-built model records no code density: the first-pattern rule, and clusters.json says why
    note = spec["options"].pop("rule_note")
    assert "no code density" in note
    assert spec["options"] == {"samples": 200, "rule": "first", "merge_cos": 0.9, "match_cos": 0.7,
                               "min_width": 0.0}
    assert spec["intervals"] == intervals
    # contiguous cover of [0, 1]
    assert intervals[0]["lo"] == 0.0 and intervals[-1]["hi"] == 1.0
    assert all(p["hi"] == q["lo"] for p, q in itertools.pairwise(intervals))
    colours = [iv["colour"] for iv in intervals]
    assert len(set(colours)) == len(colours) and all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours)
    for iv in intervals:
        proto = np.array(iv["prototype"])
        assert proto.shape == (3, 3)
        centre = np.float32((iv["lo"] + iv["hi"]) / 2)
        expected = line_model(3, bank["dog_on"], bank["dx+"]).decode(np.array([centre]))[0].reshape(3, 3)
        np.testing.assert_allclose(proto, expected, atol=1e-6)
    png = (tmp_path / "spectrum.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    model = Autoencoder.load(tmp_path)
    assert model.clusters == [(iv["lo"], iv["hi"]) for iv in intervals]
    assert model.cluster_names == [iv["name"] for iv in intervals]

    # codes at the centre of each interval get that interval's label
    probe = [(iv["lo"] + iv["hi"]) / 2 for iv in intervals]
    assert labels_at(model, probe) == list(range(len(intervals)))

    # rename by hand: honoured, labels unchanged
    spec["intervals"][0]["name"] = "centre"
    (tmp_path / "clusters.json").write_text(json.dumps(spec))
    assert Autoencoder.load(tmp_path).cluster_names[0] == "centre"

    # merge the first two intervals by hand: delete the second, widen the first
    spec["intervals"][0]["hi"] = spec["intervals"][1]["hi"]
    del spec["intervals"][1]
    (tmp_path / "clusters.json").write_text(json.dumps(spec))
    merged = Autoencoder.load(tmp_path)
    assert len(merged.clusters) == len(intervals) - 1
    assert labels_at(merged, probe) == [0, 0, *range(1, len(intervals) - 1)]


def labels_at(model: Autoencoder, codes: list[float]) -> list[int]:
    """The engine's label for a kernel whose code is each of ``codes``: the model's decoder and intervals with
    an encoder that ignores the kernel and outputs that code (bias = logit(code))."""
    kernel = np.random.default_rng(0).standard_normal((1, model.d)).astype(np.float32)
    labels = []
    for code in codes:
        bias = np.array([np.log(code / (1 - code))], np.float32)
        encoder = [Dense(np.zeros((1, model.d), np.float32), bias, "sigmoid")]
        probe = Autoencoder(encoder, model.decoder, model.kernel_size, model.clusters, model.cluster_names)
        label, _, got = ka.assign(kernel, probe, threshold=-1.0)
        assert got[0] == pytest.approx(code, abs=1e-6)
        labels.append(int(label[0]))
    return labels


def test_merge_intervals_helper(tmp_path):
    bank = templates(5)
    line_model(5, bank["dx+"], bank["dy-"]).save(tmp_path)
    before = clusters(tmp_path, rule="first", plot=False)
    assert len(before) == 4
    names = [iv["name"] for iv in before]
    after = merge_intervals(tmp_path, [names[1], names[2]], name="middle")
    assert [iv["name"] for iv in after] == [names[0], "middle", names[3]]
    assert after[1]["lo"] == before[1]["lo"] and after[1]["hi"] == before[2]["hi"]
    assert after[1]["merged_from"] == names[1:3]
    model = Autoencoder.load(tmp_path)
    assert model.cluster_names == [names[0], "middle", names[3]]
    assert (tmp_path / "spectrum.png").is_file()
    with pytest.raises(ValueError, match="not neighbours"):
        merge_intervals(tmp_path, [names[0], names[3]])
    with pytest.raises(ValueError, match="no interval named"):
        merge_intervals(tmp_path, [names[0], "nonesuch"])


def test_min_width_absorbs_narrow_intervals(tmp_path):
    bank = templates(5)
    # a ramp 2 grid steps wide whose middle falls on grid point 100: that pattern, half one and half the other,
    # becomes an interval of its own, one grid step wide
    steep = 100.0
    step_model(5, bank["dx+"], bank["dy-"], at=100 / 199 - 0.5 / steep, steep=steep).save(tmp_path)
    plain = clusters(tmp_path, rule="first", plot=False)
    assert len(plain) == 3 and plain[1]["hi"] - plain[1]["lo"] == pytest.approx(1 / 199)
    wide = clusters(tmp_path, rule="first", plot=False, min_width=0.05)
    assert [iv["name"] for iv in wide] == ["dx+", "dy-"]
    assert wide[0]["lo"] == 0.0 and wide[0]["hi"] == wide[1]["lo"] and wide[1]["hi"] == 1.0


# ---------------------------------------------------------------------------------------------- the density rule


def path_model(k: int, knots: list[tuple[float, np.ndarray]]) -> Autoencoder:
    """A decoder that runs along straight lines through the (code, pattern) knots (ReLU units at the knots),
    constant before the first knot and after the last; its encoder ignores the kernel."""
    d = k * k
    codes = np.array([c for c, _ in knots], np.float64)
    pats = [np.asarray(p, np.float64).ravel() for _, p in knots]
    slopes = [(pats[i + 1] - pats[i]) / (codes[i + 1] - codes[i]) for i in range(len(knots) - 1)] + [np.zeros(d)]
    change = np.stack([slopes[0]] + [slopes[i] - slopes[i - 1] for i in range(1, len(knots))], axis=1)
    encoder = [Dense(np.zeros((1, d), np.float32), np.zeros(1, np.float32), "sigmoid")]
    hidden = Dense(np.ones((len(knots), 1), np.float32), (-codes).astype(np.float32), "relu")
    out = Dense(change.astype(np.float32), pats[0].astype(np.float32), "identity")
    return Autoencoder(encoder, [hidden, out], k)


def with_density(model: Autoencoder, bumps: list[tuple[float, float, int]], *, top: int = 0,
                 bins: int = 400) -> Autoencoder:
    """The model with a synthetic training-code histogram (model.json training.code_density over [0, 1]):
    Gaussian bumps (centre, sd, kernels), plus ``top`` kernels piled in the last bin (a saturated sigmoid)."""
    centres = (np.arange(bins) + 0.5) / bins
    counts = np.zeros(bins)
    for mu, sd, n in bumps:
        counts += n * np.exp(-0.5 * ((centres - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi)) / bins
    counts[-1] += top
    model.info = {"training": {"code_density": {"lo": 0.0, "hi": 1.0,
                                                "counts": [int(c) for c in np.round(counts)]}}}
    return model


def test_density_rule_cuts_between_modes(tmp_path):
    """One interval per mode, anchored on it; the cut where the decoded pattern becomes closer to the next
    anchor; prototypes decoded at the anchors; shares of the training codes recorded."""
    bank = templates(5)
    a, b = bank["dx+"], bank["dy-"]  # orthogonal unit patterns
    with_density(step_model(5, a, b, at=0.5, steep=50.0), [(0.25, 0.05, 3000), (0.75, 0.05, 1000)]).save(tmp_path)
    intervals = clusters(tmp_path, plot=False)
    options = read_spec(tmp_path)["options"]
    assert options["rule"] == "density" and "rule_note" not in options
    assert options["bandwidth"] == 0.01 and options["min_prominence"] == 0.05
    assert [iv["name"] for iv in intervals] == ["dx+", "dy-"]
    # on the ramp 0.5 + t/50, the pattern (1 - t) a + t b is closer to b for t > 1/2: from grid point 102 on
    assert intervals[0]["lo"] == 0.0 and intervals[1]["hi"] == 1.0
    assert intervals[0]["hi"] == intervals[1]["lo"] == pytest.approx(101.5 / 199, abs=1e-12)
    assert [iv["anchor"] for iv in intervals] == pytest.approx([0.25, 0.75], abs=0.5 / 199)
    assert [iv["share"] for iv in intervals] == pytest.approx([0.75, 0.25], abs=0.005)
    for iv, pattern in zip(intervals, (a, b), strict=True):
        assert iv["template_cos"] == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(np.array(iv["prototype"]), pattern, atol=1e-5)
    # a coarse grid: the density is smoothed over at least one grid step, so the modes are still found
    coarse = clusters(tmp_path, samples=9, plot=False)
    assert [iv["name"] for iv in coarse] == ["dx+", "dy-"] and coarse[0]["hi"] == pytest.approx(0.5625)
    # the first-pattern rule on request, on the same model: no anchors, recorded without a note
    first = clusters(tmp_path, rule="first", plot=False)
    assert "anchor" not in first[0] and read_spec(tmp_path)["options"]["rule"] == "first"
    assert "rule_note" not in read_spec(tmp_path)["options"]


def test_density_rule_does_not_split_a_cluster_after_a_transition(tmp_path):
    """The failure the density rule is for: cluster A (dx+, codes near 0.1), a long transition to cluster B,
    whose patterns turn by 20 degrees along its stretch [0.45, 0.75] (codes near 0.6).  The first-pattern rule
    starts an interval on a transition pattern 12 degrees short of B and ends it 26 degrees on, inside B's
    stretch, so B's kernels are split between two intervals; the density rule cuts once, in the transition."""
    bank = templates(5)
    a, b1 = bank["dx+"], bank["dy-"]
    b2 = np.cos(np.radians(20)) * b1 - np.sin(np.radians(20)) * a  # on, in the same plane
    model = with_density(path_model(5, [(0.2, a), (0.45, b1), (0.75, b2)]), [(0.1, 0.03, 2000), (0.6, 0.05, 2000)])
    model.save(tmp_path)
    first = clusters(tmp_path, rule="first", plot=False)
    inside = [iv["lo"] for iv in first if 0.45 < iv["lo"] < 0.75]
    assert inside, f"the first-pattern rule was expected to split B's stretch: {first}"
    intervals = clusters(tmp_path, plot=False)
    assert len(intervals) == 2 and intervals[0]["name"] == "dx+"
    assert 0.2 < intervals[0]["hi"] < 0.45  # the cut is in the transition
    assert intervals[1]["anchor"] == pytest.approx(0.6, abs=0.5 / 199)
    assert intervals[1]["share"] == pytest.approx(0.5, abs=0.01)
    # every code in B's stretch gets B's label
    model = Autoencoder.load(tmp_path)
    assert labels_at(model, [0.46, 0.55, 0.65, 0.74]) == [1, 1, 1, 1]


def test_density_modes_need_prominence():
    """Modes: local maxima of the smoothed density (0 beyond the ends, so a pile at an end is one) whose
    prominence is at least min_prominence of the highest; plateaus count once, at their middle."""
    from kernelatlas.jobs.clusters import _modes

    x = np.linspace(0.0, 1.0, 200)
    big = 100.0 * np.exp(-0.5 * ((x - 0.3) / 0.03) ** 2)
    small = 3.0 * np.exp(-0.5 * ((x - 0.6) / 0.02) ** 2)  # 3% of the highest mode
    edge = 40.0 * np.exp(-0.5 * ((x - 1.0) / 0.01) ** 2)
    density = big + small + edge + 0.5
    assert _modes(density, 0.05) == [60, 199]
    assert _modes(density, 0.0) == [60, 119, 199]
    assert _modes(density, 0.5) == [60]  # the edge mode stands 40% of the highest above its saddle
    assert _modes(np.array([0.0, 1.0, 1.0, 1.0, 0.0]), 0.05) == [2]
    assert _modes(np.array([1.0, 2.0, 1.0, 2.0, 1.0]), 0.05) == [1, 3]  # equal modes: both stand
    assert _modes(np.array([1.0, 2.0, 1.95, 2.0, 1.0]), 0.05) == [1, 3]
    assert _modes(np.array([1.0, 2.0, 1.95, 1.99, 1.0]), 0.05) == [1]


def test_density_rule_ignores_noise_bumps_and_merges_like_anchors(tmp_path):
    bank = templates(5)
    a, b, c = bank["dx+"], bank["dog_on"] + 0.2 * bank["dy-"], bank["dy-"]
    # a over [0, 0.3], b over [0.35, 0.65], c from 0.7 on; few kernels near b, a pile at the top end (c)
    model = path_model(5, [(0.3, a), (0.35, b), (0.65, b), (0.7, c)])
    with_density(model, [(0.15, 0.04, 3000), (0.5, 0.02, 20)], top=1500).save(tmp_path)
    intervals = clusters(tmp_path, plot=False)
    assert [iv["name"] for iv in intervals] == ["dx+", "dy-"]
    assert intervals[1]["anchor"] == 1.0 and intervals[1]["share"] == pytest.approx(1500 / 4520, abs=0.01)
    # b's kernels are a noise bump at the default prominence; with none required, b is a cluster too
    assert [iv["name"] for iv in clusters(tmp_path, min_prominence=0.0, plot=False)] == ["dx+", "dog_on", "dy-"]
    # two modes on one pattern (cosine 1 >= merge_cos) are one anchor: the denser mode
    with_density(step_model(5, a, c, at=0.5), [(0.1, 0.03, 1000), (0.35, 0.03, 3000), (0.8, 0.03, 2000)]
                 ).save(tmp_path)
    merged = clusters(tmp_path, plot=False)
    assert [iv["name"] for iv in merged] == ["dx+", "dy-"]
    assert merged[0]["anchor"] == pytest.approx(0.35, abs=0.5 / 199)
    assert merged[0]["share"] == pytest.approx(4 / 6, abs=0.01)


def test_density_rule_with_min_width_and_merge_intervals(tmp_path):
    bank = templates(5)
    a, c = bank["dx+"], bank["dy-"]
    b = c + 0.5 * a  # closer to c than to a
    # b holds only over [0.41, 0.43]: with a mode there, a narrow interval of its own
    model = path_model(5, [(0.4, a), (0.41, b), (0.43, b), (0.44, c)])
    with_density(model, [(0.2, 0.04, 2000), (0.42, 0.004, 500), (0.7, 0.04, 2000)]).save(tmp_path)
    plain = clusters(tmp_path, plot=False)
    assert len(plain) == 3 and plain[1]["hi"] - plain[1]["lo"] < 0.05
    wide = clusters(tmp_path, plot=False, min_width=0.05)
    assert [iv["name"] for iv in wide] == ["dx+", "dy-"]  # absorbed by c, whose anchor stays
    assert [iv["anchor"] for iv in wide] == [plain[0]["anchor"], plain[2]["anchor"]]
    assert wide[0]["hi"] == plain[0]["hi"] and wide[1]["lo"] == plain[1]["lo"]
    # merge_intervals: the prototype of the merged interval is decoded at the anchor holding more kernels
    line = with_density(line_model(5, a, c), [(0.1, 0.03, 3000), (0.9, 0.03, 1000)])
    line.save(tmp_path)
    halves = clusters(tmp_path, plot=False)
    assert len(halves) == 2 and halves[0]["hi"] == pytest.approx(0.5, abs=1e-12)
    after = merge_intervals(tmp_path, [iv["name"] for iv in halves], name="all", plot=False)
    assert len(after) == 1 and after[0]["anchor"] == halves[0]["anchor"]
    expected = line.decode(np.array([halves[0]["anchor"]], np.float32))[0].reshape(5, 5)
    np.testing.assert_allclose(np.array(after[0]["prototype"]), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------- (e) determinism


def test_clusters_are_deterministic(small_corpus, tmp_path):
    corpus, _, _ = small_corpus
    train(corpus, 3, tmp_path / "m", epochs=4, batch_size=128, seed=1, threads=2, progress=False, sample=None)
    first = clusters(tmp_path / "m", plot=False)
    text = (tmp_path / "m" / "clusters.json").read_text()
    second = clusters(tmp_path / "m", plot=False)
    assert first == second and (tmp_path / "m" / "clusters.json").read_text() == text


def test_clusters_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a kernelatlas model directory"):
        clusters(tmp_path)
    bank = templates(3)
    line_model(3, bank["dx+"], bank["dy+"]).save(tmp_path)
    with pytest.raises(ValueError, match="samples must be >= 2"):
        clusters(tmp_path, samples=1)
    with pytest.raises(ValueError, match="cosines in"):
        clusters(tmp_path, merge_cos=1.5)
    with pytest.raises(ValueError, match="rule must be one of"):
        clusters(tmp_path, rule="middle")
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        clusters(tmp_path, bandwidth=0.0)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_train_and_clusters(small_corpus, tmp_path, capsys):
    corpus, _, _ = small_corpus
    model = tmp_path / "model"
    assert cli_main(["train", str(corpus.root), "--kernel-size", "3", "--out", str(model), "--epochs", "2",
                     "--sample", "1500", "--threads", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "autoencoder trained on" in out and f"kernelatlas clusters {model}" in out
    assert json.loads((model / "model.json").read_text())["sample"]["drawn"] == 1500
    assert cli_main(["clusters", str(model), "--samples", "50", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "clusters.json" in out and "[0.0000," in out
    assert read_spec(model)["options"]["samples"] == 50
    assert cli_main(["train", str(corpus.root), "--kernel-size", "5", "--out", str(model), "--no-progress"]) == 1
    assert "stores no 5x5 kernels" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ("train", "clusters"))
def test_cli_help(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main([verb, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "example: kernelatlas " + verb in text and "default" in text


def test_load_then_save_keeps_what_clusters_wrote(tmp_path):
    """Autoencoder.save() must not drop prototypes, colours or template matches from clusters.json."""
    import json as _json

    from torch import nn

    d = 9
    enc = nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid())
    dec = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, d))
    model = Autoencoder.from_torch(enc, dec)
    model.save(tmp_path / "m")
    clusters(tmp_path / "m")
    before = _json.loads((tmp_path / "m" / "clusters.json").read_text())
    loaded = Autoencoder.load(tmp_path / "m")
    loaded.cluster_names = [f"renamed_{i}" for i in range(len(loaded.cluster_names))]
    loaded.save(tmp_path / "copy")
    after = _json.loads((tmp_path / "copy" / "clusters.json").read_text())
    assert [iv["name"] for iv in after["intervals"]] == loaded.cluster_names
    for a, b in zip(before["intervals"], after["intervals"], strict=True):
        assert a["prototype"] == b["prototype"] and a.get("colour") == b.get("colour")
    assert {k for k in before if k != "intervals"} <= set(after)
