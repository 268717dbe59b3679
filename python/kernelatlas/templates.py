"""Analytic reference patterns for naming the clusters of the code axis (Babaiee et al., ICLR 2024: on/off-centre
difference of Gaussians, first and second Gaussian derivatives, on/off cross and square), built here from their
formulas at any odd kernel size.

Orientation, as PyTorch stores a kernel (and as every corpus row is): the row index is y and grows downwards,
the column index is x and grows to the right; (0, 0) is the top-left entry.  So ``"dx+"`` increases from left
to right and ``"dy+"`` from top to bottom.  Every template is centred (zero mean) and L2-normalised, so its
cosine with a centred kernel is a plain dot product, and ``"<name>-"`` / ``"..._off"`` is exactly the negative of
``"<name>+"`` / ``"..._on"`` (cosine -1: signs are kept, as in the paper, where on- and off-centre are different
classes).

Scales are relative to the kernel's radius r = (k - 1) / 2 (our choice; the paper gives none), so a template
looks the same at every size; the coordinates are x, y in [-r, r]:

* ``gauss_on``: exp(-(x^2 + y^2) / (2 s^2)) with s = 0.6 r -- a broad blob; centred, its rim goes negative.
* ``dog_on``: G(s1) - G(s2) with s1 = 0.3 r, s2 = 2 s1, each Gaussian normalised to unit sum: a sharp centre on
  a narrow negative surround whose outer part returns to about zero (unlike the centred broad Gaussian, whose
  whole rim is negative).
* ``dx+``, ``dy+``: x G(s), y G(s) with s = 0.5 r (the negated first derivative -s^2 dG/dx, so the value grows
  along +x / +y).
* ``dxx+``, ``dyy+``: (x^2 - s^2) G(s) = s^4 d^2G/dx^2 with s = 0.5 r: a valley along the centre column (row)
  with raised flanks; ``dxx-`` is a ridge.  ``dxy+``: x y G(s): positive where x y > 0 (top-left and bottom-right
  quadrants, y growing downwards).
* ``cross_on``: a plus sign -- exp(-min(x^2, y^2) / (2 w^2)), w = 0.25 r, bars through the centre along the
  full row and column.
* ``square_on``: a square outline -- exp(-(max(|x|, |y|) - rho)^2 / (2 w^2)) with rho = 2 r / 3, w = 0.2 r
  (at 7x7 the border of the centred 5x5 square, at 5x5 that of the 3x3).  A filled square would be nearly the
  Gaussian blob; the outline stays distinct from every other template from 5x5 up.

At 3x3 the symmetric patterns (gauss, dog, cross, square) share a 2-dimensional space (centre / edge / corner
weights after centring), so they are necessarily closer there than at 7x7.  A template pair whose on-template
has a |cosine| of DISTINCT_COS (0.9) or more with a template earlier in the list is left out at that size: this
drops only the square at 3x3 (its outline is every entry but the centre, i.e. dog_off).  The tests hold every
remaining pair below cosine 0.9 (designed sign pairs aside) at 3x3 to 11x11.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["best_match", "template_names", "templates"]

# (on name, off name) pairs; the off template is the negative of the on template
_PAIRS = (
    ("gauss_on", "gauss_off"),
    ("dog_on", "dog_off"),
    ("dx+", "dx-"),
    ("dy+", "dy-"),
    ("dxx+", "dxx-"),
    ("dyy+", "dyy-"),
    ("dxy+", "dxy-"),
    ("cross_on", "cross_off"),
    ("square_on", "square_off"),
)

GAUSS_SIGMA = 0.6  # x radius
DOG_SIGMA = 0.3  # centre; surround = DOG_RATIO x centre
DOG_RATIO = 2.0
DERIV_SIGMA = 0.5
CROSS_WIDTH = 0.25  # Gaussian profile of the cross's bars
SQUARE_HALF_SIDE = 2.0 / 3.0
SQUARE_WIDTH = 0.2  # Gaussian profile of the square's outline
DISTINCT_COS = 0.9  # a template pair this close to an earlier one (|cosine|) is left out at that size


def template_names() -> list[str]:
    """Every template name, on before off, in a fixed order."""
    return [name for pair in _PAIRS for name in pair]


def _gauss(x: np.ndarray, y: np.ndarray, s: float) -> np.ndarray:
    return np.exp(-(x * x + y * y) / (2.0 * s * s))


def _unit(pattern: np.ndarray) -> np.ndarray | None:
    centred = pattern - pattern.mean()
    norm = float(np.linalg.norm(centred))
    if not norm > 1e-9 * float(np.abs(pattern).max()):
        return None
    return centred / norm


def templates(k: int) -> dict[str, np.ndarray]:
    """The templates at size k x k (odd, >= 3): name -> float64 [k, k], centred and L2-normalised."""
    if k < 3 or k % 2 == 0:
        raise ValueError(f"templates are defined for odd kernel sizes >= 3, got {k}")
    r = (k - 1) / 2.0
    coords = np.arange(k, dtype=np.float64) - r
    y, x = np.meshgrid(coords, coords, indexing="ij")  # y: row index (down), x: column index (right)

    s_d = DERIV_SIGMA * r
    g_d = _gauss(x, y, s_d)
    s1 = DOG_SIGMA * r
    s2 = DOG_RATIO * s1
    c1, c2 = _gauss(x, y, s1), _gauss(x, y, s2)
    w = CROSS_WIDTH * r
    ws = SQUARE_WIDTH * r
    on = {
        "gauss_on": _gauss(x, y, GAUSS_SIGMA * r),
        "dog_on": c1 / c1.sum() - c2 / c2.sum(),
        "dx+": x * g_d,
        "dy+": y * g_d,
        "dxx+": (x * x - s_d * s_d) * g_d,
        "dyy+": (y * y - s_d * s_d) * g_d,
        "dxy+": x * y * g_d,
        "cross_on": np.exp(-np.minimum(x * x, y * y) / (2.0 * w * w)),
        "square_on": np.exp(-((np.maximum(np.abs(x), np.abs(y)) - SQUARE_HALF_SIDE * r) ** 2) / (2.0 * ws * ws)),
    }
    out: dict[str, np.ndarray] = {}
    for on_name, off_name in _PAIRS:
        unit = _unit(on[on_name])
        if unit is None or any(abs(float(np.vdot(unit, t))) >= DISTINCT_COS for t in out.values()):
            continue  # at 3x3 the square outline is the negated centre pixel, i.e. dog_off: left out
        out[on_name] = unit
        out[off_name] = -unit
    return out


def best_match(pattern: np.ndarray, bank: Mapping[str, np.ndarray]) -> tuple[str | None, float]:
    """The template of ``bank`` with the highest cosine to ``pattern`` (both centred first; signs count), and that
    cosine.  A flat pattern matches nothing: (None, 0.0)."""
    p = np.asarray(pattern, dtype=np.float64).ravel()
    p = p - p.mean()
    norm = float(np.linalg.norm(p))
    if not norm > 0.0 or not np.isfinite(norm):
        return None, 0.0
    p /= norm
    best_name, best_cos = None, -np.inf
    for name, t in bank.items():
        c = float(np.dot(p, t.ravel()))
        if c > best_cos:
            best_name, best_cos = name, c
    return best_name, float(best_cos)
