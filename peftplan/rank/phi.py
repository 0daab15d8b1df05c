"""The LoRA paper's subspace similarity (Hu et al. 2021, §7.2, Eq. 4) and the rank rule built on it. numpy only.

For LoRA's A ∈ R^{r×d_in} (peft's `lora_A.weight`), A = U Σ Vᵀ and the right-singular vectors (rows of Vᵀ, in
R^{d_in}, ordered by singular value) span the input directions the adapter reads. For two adapters of ranks
r1 < r2 on the same weight, with V1 (r1 × d_in) and V2 (r2 × d_in):

    φ(A_r1, A_r2, i, j) = ‖V1[:i] V2[:j]ᵀ‖²_F / min(i, j)        1 ≤ i ≤ r1, 1 ≤ j ≤ r2

φ ∈ [0, 1]: 1 when the top-i directions of one lie in the top-j directions of the other, 0 when orthogonal.
Two independent uniformly random subspaces of dimensions i and j in R^d have E‖·‖²_F = i·j/d, so the random
baseline is φ = max(i, j)/d (the paper's Figure 4 compares against random Gaussian matrices the same way).
"""
from __future__ import annotations

import numpy as np


TIE = 1e-9
GRAM_MIN_EIGEN_RATIO = 1e-6  # λ_min/λ_max of A·Aᵀ above which the Gram route is exact to ~1e-9 (cond(A) < 1000)


def right_singular_vectors(a: np.ndarray) -> np.ndarray:
    """The right-singular vectors of A (r × d_in) as rows, largest singular value first: shape (min(r, d_in), d_in).

    Float64. For a thin A (r < d_in, LoRA's case) through the r × r Gram matrix: A·Aᵀ = U Σ² Uᵀ, V = Σ⁻¹ Uᵀ A
    (an eigh of r × r and two thin products: ~6× faster than a full SVD of 64 × 4096). Squaring the condition
    number costs accuracy in the small singular directions, so when λ_min/λ_max < GRAM_MIN_EIGEN_RATIO it falls
    back to numpy's SVD (LAPACK gesdd). Raises ValueError for a non-2-D or empty matrix.
    """
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"a LoRA A matrix must be a non-empty 2-D array, got shape {a.shape}")
    a = np.asarray(a, dtype=np.float64)
    if a.shape[0] < a.shape[1]:
        eig, u = np.linalg.eigh(a @ a.T)  # ascending
        eig, u = eig[::-1], u[:, ::-1]
        if eig[-1] > GRAM_MIN_EIGEN_RATIO * eig[0] > 0:
            return (u.T @ a) / np.sqrt(eig)[:, None]
    return np.linalg.svd(a, full_matrices=False)[2]


def phi_from_vectors(v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """φ(i, j) for every 1 ≤ i ≤ len(v1), 1 ≤ j ≤ len(v2), from orthonormal rows: shape (len(v1), len(v2)).

    Entry [i-1, j-1] is φ(i, j). All entries come from one product G = V1 V2ᵀ: ‖V1[:i] V2[:j]ᵀ‖²_F is the sum
    of G² over the top-left i × j block, a 2-D cumulative sum.
    """
    g2 = np.square(v1 @ v2.T)
    block = g2.cumsum(axis=0).cumsum(axis=1)
    i = np.arange(1, len(v1) + 1)[:, None]
    j = np.arange(1, len(v2) + 1)[None, :]
    return block / np.minimum(i, j)


def phi(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """φ(A1, A2, i, j) (Eq. 4) for A1 (r1 × d_in) and A2 (r2 × d_in): shape (r1, r2), entry [i-1, j-1] = φ(i, j).

    Raises ValueError when the two A matrices read different input sizes.
    """
    if a1.shape[1:] != a2.shape[1:]:
        raise ValueError(f"A matrices of different input size: {a1.shape} and {a2.shape}")
    return phi_from_vectors(right_singular_vectors(a1), right_singular_vectors(a2))


def random_baseline(r1: int, r2: int, d: int) -> np.ndarray:
    """E φ(i, j) for independent uniformly random subspaces of R^d: max(i, j)/d, shape (r1, r2)."""
    i = np.arange(1, r1 + 1)[:, None]
    j = np.arange(1, r2 + 1)[None, :]
    return np.maximum(i, j) / d


def captured_rank(diagonal: np.ndarray, threshold: float) -> int:
    """The largest i such that φ(i', i') > threshold for every i' ≤ i (0 if φ(1, 1) ≤ threshold).

    `diagonal[k]` is φ(k+1, k+1). "Stays above": the first drop below the threshold ends the run, so a
    chance crossing at a larger i (φ(i, i) grows towards 1 as i approaches d) does not count. A value within
    TIE of the threshold is not above it (φ carries ~1e-12 of rounding; k shared directions of i give k/i exactly).
    """
    below = np.flatnonzero(np.asarray(diagonal) <= threshold + TIE)
    return int(below[0]) if below.size else len(diagonal)


def majority_rank(layer_ranks: list[int] | tuple[int, ...]) -> int:
    """The largest k that more than half of the layers reach (captured rank ≥ k): "most layers".

    With n layers sorted by captured rank, largest first, this is the (⌊n/2⌋+1)-th: ⌊n/2⌋+1 > n/2 layers reach
    it and fewer reach anything larger. One layer: its own rank; two: the smaller. Raises ValueError if empty.
    """
    if not layer_ranks:
        raise ValueError("no layers")
    ranked = sorted(layer_ranks, reverse=True)
    return ranked[len(ranked) // 2]


def recommend_r(k: int, r1: int, r2: int) -> int:
    """The recommended rank for a module kind whose majority captured rank is k, from adapters of ranks r1 < r2.

    The smallest power of two ≥ k, capped at r1 (the evidence is that r1 already learns the shared directions;
    a rank between r1 and r2 was not tried). k = 0 (not even the top direction is shared in most layers): r2,
    since nothing shows that the smaller rank learns what the larger one does.
    """
    if k <= 0:
        return r2
    return min(1 << (k - 1).bit_length(), r1)
