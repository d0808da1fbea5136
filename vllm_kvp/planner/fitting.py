"""Least squares for a handful of unknowns, in pure Python (the planner imports no numpy/torch).

`nonnegative_least_squares` is exact: the solution of min |A x - y| over x >= 0 is the
unconstrained least-squares solution on some subset of the columns (the others held at 0), so with
at most a few unknowns every subset is tried. `first_dependent` finds a column the others already
span, i.e. an unknown the data cannot determine whatever y is.
"""

from __future__ import annotations

from itertools import combinations

# Columns are compared after scaling to unit norm; model columns are exact counts, so a dependent
# one leaves a residual at rounding level, far below this.
TOLERANCE = 1e-9


def _norm(v: list[float]) -> float:
    return sum(x * x for x in v) ** 0.5


def first_dependent(columns: list[list[float]]) -> tuple[int, list[int]] | None:
    """(j, earlier) for the first column j that is a combination of the earlier columns, with the
    indices of those it combines (empty for an all-zero column); None if all are independent."""
    for j, col in enumerate(columns):
        if _norm(col) == 0:
            return j, []
        earlier = list(range(j))
        if not earlier:
            continue
        coef = least_squares([columns[i] for i in earlier], col)
        fitted = [sum(c * columns[i][n] for c, i in zip(coef, earlier)) for n in range(len(col))]
        if _norm([a - b for a, b in zip(col, fitted)]) <= TOLERANCE * _norm(col):
            scale = [_norm(columns[i]) / _norm(col) for i in earlier]
            return j, [i for c, i, s in zip(coef, earlier, scale) if abs(c) * s > TOLERANCE]
    return None


def least_squares(columns: list[list[float]], y: list[float]) -> list[float]:
    """argmin_x |A x - y|^2 for A given by linearly independent columns, via the normal equations
    (a handful of unknowns), each column scaled to unit norm first so that bytes and counts stay
    comparable."""
    scale = [max(_norm(c), 1e-300) for c in columns]
    a = [[v / s for v in c] for c, s in zip(columns, scale)]
    k = len(a)
    ata = [[sum(p * q for p, q in zip(a[i], a[j])) for j in range(k)] for i in range(k)]
    aty = [sum(p * q for p, q in zip(a[i], y)) for i in range(k)]
    return [xi / s for xi, s in zip(solve(ata, aty), scale)]


def nonnegative_least_squares(columns: list[list[float]], y: list[float]) -> list[float]:
    """argmin_{x >= 0} |A x - y|^2 for linearly independent columns (at most ~8 of them)."""
    k = len(columns)
    best_residual, best = _residual(columns, [0.0] * k, y), [0.0] * k
    for size in range(1, k + 1):
        for subset in combinations(range(k), size):
            sub = least_squares([columns[i] for i in subset], y)
            if min(sub) < 0:
                continue
            x = [0.0] * k
            for i, v in zip(subset, sub):
                x[i] = v
            r = _residual(columns, x, y)
            if r < best_residual:
                best_residual, best = r, x
    return best


def _residual(columns: list[list[float]], x: list[float], y: list[float]) -> float:
    return sum((sum(xi * c[n] for xi, c in zip(x, columns)) - yn) ** 2 for n, yn in enumerate(y))


def solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting; a singular system raises ValueError."""
    n = len(b)
    m = [row[:] + [bi] for row, bi in zip(a, b)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            raise ValueError("singular system: the columns are not independent")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            m[r] = [v - f * p for v, p in zip(m[r], m[col])]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x
