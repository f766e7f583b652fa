"""Policy iteration on the truncated SMDP, directly (no uniformisation).

Evaluation solves h(n) = c(n) - g tau(n) + sum_j p(j|n) h(j) with h(0) = 0: the unknowns are
(g, h(1..N)), i.e. the column of h(0) in I - P is replaced by tau. The same factor also gives the
stationary distribution, because the transposed system A^T y = e_0 is solved by y = pi / (pi . tau)
(rows of I - P sum to zero, so y^T (I - P) = 0 follows from its columns 1..N).

The structure that pays: a batch removes at most B requests, so row n of I - P is zero left of
column n - B. With the unknowns ordered (h(1..N), g) the system is zero below its (B + 1)-th
subdiagonal (banded below, full above), and ``BandedBelowLU`` factors it with LAPACK's banded LU
(dgbtrf, kl = B + 1 subdiagonals, ku = N superdiagonals; partial pivoting) in about (B + 1) N^2
flops instead of the dense LU's 2/3 N^3, built in place in the band storage (the default,
"banded"; 2.5-2.7x faster than the earlier block-by-block Python LU at B = 128 and 256, CV 1,
which took as long as the dense LU there: docs/notes/issue-18.md). It is not sparse above the diagonal:
row n holds the whole K pmf window from n - a, about N / 2 wide for deterministic service and all
of 0..N for CV 1, so a general sparse LU fills in and loses (RESULTS.md section 4);
``linear_solver="sparse"`` (scipy ``splu``) and "dense" (one LAPACK LU) are kept for comparison.

Policy iteration's evaluations go through ``PolicyEvaluator``: a policy that differs from the last
factored one in at most ``MAX_UPDATE_RANK`` states is solved from that LU by the Woodbury identity
(the changed rows are a rank-r update), checked by its Bellman residual and refactored when the
check fails. Near convergence and after a size step of the automatic truncation PI changes only a
few states, so those steps cost 2 r triangular solves instead of a fill and an LU. A policy that
differs in more states, but in at most ``KRYLOV_MAX_SHARE`` of them, is solved by GMRES on the same
system preconditioned with that LU (``_BandedSolve.krylov``): the preconditioned matrix is the
identity plus the changed rows' rank-r term, and after a size step (87-383 changed states at cold
B = 256, CV 1) it converges to rounding in 5-7 iterations, one banded solve each, where a fresh LU
costs about 15 solves. It is checked like the update (the Bellman residual) and refactored when it
does not converge within ``KRYLOV_MAX_ITER`` iterations.

``control_limit_search``: the best policy of Deb & Serfozo's control-limit family, a start for PI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import linalg
from scipy.sparse import linalg as sparse_linalg

from solver.tail import TruncatedSMDP


class PolicyValues:
    """Gain, relative values (h(0) = 0) and stationary distribution of one policy on 0..N.

    ``pi`` is given, or computed on first use by ``stationary`` (a transposed solve, unnormalised):
    policy iteration reads only the gain and h of every policy but the last, so the banded
    evaluation leaves the transposed solves (one per LU, r per low-rank step) until ``pi`` is read.
    """

    __slots__ = ("gain", "h", "_pi", "_stationary")

    def __init__(
        self, gain: float, h: np.ndarray, pi: np.ndarray | None = None,
        stationary: Callable[[], np.ndarray] | None = None,
    ) -> None:
        if (pi is None) == (stationary is None):
            raise ValueError("PolicyValues needs pi or stationary, exactly one of them")
        self.gain = gain
        self.h = h
        self._pi = pi
        self._stationary = stationary

    @property
    def pi(self) -> np.ndarray:
        """Stationary distribution of the embedded chain (per decision epoch)."""
        if self._pi is None:
            assert self._stationary is not None
            y = self._stationary()
            if not np.all(np.isfinite(y)):
                raise SingularPolicyError("policy evaluation matrix is singular")
            y = np.clip(y, 0.0, None)
            self._pi, self._stationary = y / y.sum(), None
        return self._pi


class SingularPolicyError(ArithmeticError):
    """The evaluation system is singular: the policy does not define a single recurrent class."""


LINEAR_SOLVERS = ("banded", "dense", "sparse")
DEFAULT_LINEAR_SOLVER = "banded"
"""The banded LU of the banded-below system (``BandedBelowLU``): the dense LU's answer in about
(b + 1) N^2 flops instead of 2/3 N^3, b the policy's largest batch (at most B). "dense" (one LAPACK LU) and "sparse" (SuperLU) are kept
for comparison; sparse pays only for short pmf windows (RESULTS.md section 4)."""
MIN_BLOCKS = 3
"""Below this many blocks of B + 1 states the banded LU saves nothing: factor densely instead."""


class BandedBelowLU:
    """LU with partial pivoting of an n x n matrix that is zero below its kl-th subdiagonal.

    LAPACK's banded LU (dgbtrf) with kl subdiagonals and ku = n - 1 superdiagonals: a column's
    pivot search covers the kl rows below the diagonal, which is all of its nonzeros, so this is
    ordinary partial pivoting (the dense LU's answer to rounding), in about kl n^2 flops instead of
    2/3 n^3, blocked by LAPACK itself. The matrix is written in place into LAPACK's band storage
    (``matrix``: an n x n view whose column j is column j of the (2 kl + n) x n band array, shifted
    so that entry (i, j) sits in band row kl + ku + i - j): no copy before the factorisation.
    Entries below the band are not part of the matrix (writes there land in storage LAPACK does not
    read, since the fill-in rows of dgbtrf are only used for columns past ku).

    Use: ``lu = BandedBelowLU(n, kl)``, write ``lu.matrix`` (or ``lu.extended``, the same with one
    scratch column in front), ``lu.factor()``, then ``solve`` / ``solve_transposed``.
    """

    def __init__(self, n: int, kl: int, capacity: int | None = None) -> None:
        if int(n) < 2 or int(kl) < 1:
            raise ValueError(f"BandedBelowLU needs n >= 2 and kl >= 1, got n = {n}, kl = {kl}")
        self.n = int(n)
        self.ku = max(self.n - 1, 0)
        self.capacity = min(max(int(kl), 0 if capacity is None else int(capacity)), max(self.n - 1, 0))
        """The largest kl this storage holds (``clear`` can change kl up to it)."""
        # front: room for one scratch column in front of column 0 (``extended``)
        self._flat = np.zeros(self._size(self.capacity))
        self._piv: np.ndarray | None = None
        self.generation = 0
        """Counts the factorisations held: a solve kept for later checks it still has its matrix."""
        self._layout(int(kl))

    def _size(self, kl: int) -> int:
        ldab = 2 * kl + self.ku + 1
        return ldab - 1 + ldab * self.n

    def _layout(self, kl: int) -> None:
        """The band array and the matrix views for ``kl`` subdiagonals, at the front of the storage."""
        self.kl = min(int(kl), max(self.n - 1, 0))
        ldab = 2 * self.kl + self.ku + 1
        step = ldab - 1  # one column of the view further is ldab - 1 further in memory
        self.band = self._flat[step : step + ldab * self.n].reshape((ldab, self.n), order="F")
        offset = self.kl + self.ku  # band row of the diagonal
        item = self._flat.itemsize
        # a view whose base is the flat storage itself (so row runs can be viewed through it too)
        self.extended = np.ndarray((self.n, self.n + 1), dtype=float, buffer=self._flat, offset=offset * item,
                                   strides=(item, item * step))
        self.matrix = self.extended[:, 1:]

    @classmethod
    def of(cls, M: np.ndarray, kl: int) -> "BandedBelowLU":
        """Factor a copy of M (its entries below the kl-th subdiagonal are taken to be zero)."""
        lu = cls(M.shape[0], kl)
        lu.matrix[:] = np.triu(M, -lu.kl)
        lu.factor()
        return lu

    def clear(self, kl: int | None = None) -> None:
        """Zero the storage, to write and factor another matrix of the same size in it, with ``kl``
        subdiagonals (at most ``capacity``; default: as before)."""
        if kl is not None:
            if not 1 <= int(kl) <= max(self.capacity, 1):
                raise ValueError(f"kl must be in 1..{self.capacity}, got {kl}")
            self._layout(int(kl))
        self._flat[: self._size(self.kl)] = 0.0
        self._piv = None
        self.generation += 1

    def factor(self) -> None:
        # the scratch column in front of ``matrix`` overlaps band rows that LAPACK never reads; clear
        # it anyway so that nothing but the matrix is ever in the array
        self._flat[: self.band.shape[0] - 1 + self.kl + self.ku] = 0.0
        _, piv, info = linalg.lapack.dgbtrf(self.band, self.kl, self.ku, overwrite_ab=1)
        if info < 0:  # pragma: no cover - argument error
            raise ValueError(f"dgbtrf: illegal argument {-info}")
        d = self.band[self.kl + self.ku]
        self.generation += 1
        if info > 0 or not np.all(np.isfinite(d)) or np.min(np.abs(d)) == 0.0:
            raise SingularPolicyError("policy evaluation matrix is singular")
        self._piv = piv

    def _solve(self, b: np.ndarray, trans: int) -> np.ndarray:
        if self._piv is None:
            raise ValueError("factor() first")
        x, info = linalg.lapack.dgbtrs(self.band, self.kl, self.ku, np.asarray(b, dtype=float), self._piv,
                                       trans=trans)
        if info != 0:  # pragma: no cover - argument error
            raise ValueError(f"dgbtrs: illegal argument {-info}")
        return x

    def solve(self, b: np.ndarray) -> np.ndarray:
        """x with M x = b."""
        return self._solve(b, 0)

    def solve_transposed(self, b: np.ndarray) -> np.ndarray:
        """z with M^T z = b."""
        return self._solve(b, 1)


def _check_solver(linear_solver: str | None) -> str:
    name = DEFAULT_LINEAR_SOLVER if linear_solver is None else linear_solver
    if name not in LINEAR_SOLVERS:
        raise ValueError(f"linear_solver must be one of {LINEAR_SOLVERS}, got {linear_solver!r}")
    return name


def evaluate_policy(smdp: TruncatedSMDP, actions: np.ndarray, linear_solver: str | None = None) -> PolicyValues:
    """Gain, relative values and stationary distribution of ``actions`` (one LU, two solves).

    linear_solver: "banded" (the default, ``BandedBelowLU``), "dense" (LAPACK LU) or "sparse"
    (SuperLU via scipy.sparse.linalg.splu); all solve the same system and agree to rounding.
    """
    name = _check_solver(linear_solver)
    block = smdp.model.max_batch + 1
    if name == "banded" and smdp.n_states >= MIN_BLOCKS * block:
        return _evaluate_banded(smdp, actions, block)
    sparse = name == "sparse"
    A, c, tau = smdp.evaluation_system(actions, sparse=sparse)
    e0 = np.zeros(smdp.n_states)
    e0[0] = 1.0
    if sparse:
        try:
            lu = sparse_linalg.splu(A)
        except RuntimeError as exc:  # "Factor is exactly singular"
            raise SingularPolicyError(str(exc)) from exc
        # SuperLU's threshold pivoting after a fill-reducing ordering leaves residuals near 1e-8 here;
        # one step of refinement (a sparse product and two more solves) brings them to rounding
        x = lu.solve(c)
        x += lu.solve(c - A @ x)
        y = lu.solve(e0, trans="T")
        y += lu.solve(e0 - A.T @ y, trans="T")
        del A
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise SingularPolicyError("policy evaluation matrix is singular")
    else:
        try:
            lu = linalg.lu_factor(A, overwrite_a=True, check_finite=False)
        except (linalg.LinAlgError, ValueError) as exc:  # pragma: no cover - unichain by construction
            raise SingularPolicyError(str(exc)) from exc
        del A
        if not np.all(np.isfinite(lu[0])) or np.min(np.abs(np.diag(lu[0]))) == 0.0:
            raise SingularPolicyError("policy evaluation matrix is singular")
        x = linalg.lu_solve(lu, c, check_finite=False)
        y = linalg.lu_solve(lu, e0, trans=1, check_finite=False)
    g = float(x[0])
    h = x.copy()
    h[0] = 0.0
    y = np.clip(y, 0.0, None)
    return PolicyValues(g, h, y / y.sum())


def _evaluate_banded(smdp: TruncatedSMDP, actions: np.ndarray, block: int) -> PolicyValues:
    """``evaluate_policy`` on the (h(1..N), g) ordering, factored by ``BandedBelowLU``."""
    return _BandedSolve.factored(smdp, actions, block).values()


def _values(x: np.ndarray, stationary: Callable[[], np.ndarray]) -> PolicyValues:
    """PolicyValues from the solution x = (h(1..N), g) and the transposed solve that gives y ~ pi."""
    if not np.all(np.isfinite(x)):
        raise SingularPolicyError("policy evaluation matrix is singular")
    h = np.empty(x.size)
    h[0] = 0.0
    h[1:] = x[:-1]
    return PolicyValues(float(x[-1]), h, stationary=stationary)


@dataclass(eq=False)
class _BandedSolve:
    """One policy's factored evaluation system and its solution (the base of low-rank updates).

    The transposed solution y (~ pi) is computed when first needed. A solve whose ``lu`` storage has
    been refactored for another policy since (``BandedBelowLU.generation``) evaluates afresh instead.
    """

    smdp: TruncatedSMDP
    actions: np.ndarray
    lu: BandedBelowLU
    generation: int
    c: np.ndarray
    x: np.ndarray
    _y: np.ndarray | None = field(default=None, init=False)

    @classmethod
    def factored(
        cls, smdp: TruncatedSMDP, actions: np.ndarray, block: int, lu: BandedBelowLU | None = None
    ) -> "_BandedSolve":
        """Factor ``actions``' system, in ``lu``'s storage when given (cleared first: memory already
        touched fills about twice as fast as fresh pages at N = 2667)."""
        # row n's first entry is at column n - a(n) - 1 (h(0) is not an unknown): the policy's largest
        # batch + 1 subdiagonals hold the matrix, often fewer than B + 1 (cold B = 256, CV 1, load
        # 0.6: 160 to 246), and the LU's work is about kl N^2
        kl = max(1, min(block, int(np.max(actions)) + 1))
        if lu is None or kl > lu.capacity:
            lu = BandedBelowLU(smdp.n_states, kl, capacity=block)
        else:
            lu.clear(kl)
        _, c, _ = smdp.hessenberg_system(actions, out=lu.extended)
        lu.factor()
        x = lu.solve(c)
        actions = np.array(actions, dtype=np.int64)
        out = cls(smdp, actions, lu, lu.generation, c, x)
        return out

    def values(self) -> PolicyValues:
        """This policy's values; their pi refers to this solve (which holds no reference back to them:
        no cycle, so the LU is freed with the last of them)."""
        return _values(self.x, self.stationary(self.actions, lambda: self.y))

    @property
    def current(self) -> bool:
        return self.lu.generation == self.generation

    @property
    def y(self) -> np.ndarray:
        """M^T y = e_N (the equation of g is column N: A^T y = e_0 becomes M^T y = e_N)."""
        if self._y is None:
            if not self.current:
                raise ValueError("the factorisation was replaced")
            last = np.zeros(self.smdp.n_states)
            last[-1] = 1.0
            self._y = self.lu.solve_transposed(last)
        return self._y

    def stationary(self, actions: np.ndarray, solve: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
        """``solve`` while this factorisation is held, else a fresh evaluation of ``actions``."""
        smdp = self.smdp

        def run() -> np.ndarray:
            if self.current:
                return solve()
            return _evaluate_banded(smdp, actions, smdp.model.max_batch + 1).pi

        return run

    def updated(self, smdp: TruncatedSMDP, actions: np.ndarray, states: np.ndarray) -> PolicyValues:
        """Values of ``actions``, which differ from this policy in ``states`` only (Woodbury).

        The new system is M + E D (E: the unit columns of the changed states, D: their new rows
        minus the old ones), so with Z = M^-1 E and the capacitance C = I + D Z:
        x' = y - Z C^-1 D y, y = M^-1 c' (= x + Z dc), and for the transposed system
        y' = y0 - W C^-T y0[states], W = M^-T D^T: r solves now, r transposed ones when pi is read.
        """
        r = states.size
        new_rows, new_c = smdp.hessenberg_rows(actions, states)
        old_rows, _ = smdp.hessenberg_rows(self.actions, states)
        D = new_rows - old_rows
        E = np.zeros((self.c.size, r), order="F")
        E[states, np.arange(r)] = 1.0
        Z = self.lu.solve(E)
        C = np.eye(r) + D @ Z
        y = self.x + Z @ (new_c - self.c[states])
        x = y - Z @ np.linalg.solve(C, D @ y)

        def transposed() -> np.ndarray:
            W = self.lu.solve_transposed(np.asfortranarray(D.T))
            return self.y - W @ np.linalg.solve(C.T, self.y[states])

        return _values(x, self.stationary(np.array(actions, dtype=np.int64), transposed))

    def krylov(
        self, smdp: TruncatedSMDP, actions: np.ndarray, states: np.ndarray, x0: np.ndarray
    ) -> tuple[PolicyValues, np.ndarray] | None:
        """Values of ``actions`` (differing from this policy in ``states``) by GMRES preconditioned
        with this LU, from ``x0``, and the solution x; None where it does not converge within
        ``KRYLOV_MAX_ITER`` iterations.

        The new system is M + E D (``updated``), so M^-1 (M + E D) x = M^-1 c' is
        (I + M^-1 E D) x = M^-1 c': each iteration one product with the r x N rows D and one solve.
        pi, when read, by the same iteration on the transposed system from this policy's y.
        """
        new_rows, new_c = smdp.hessenberg_rows(actions, states)
        old_rows, _ = smdp.hessenberg_rows(self.actions, states)
        np.subtract(new_rows, old_rows, out=new_rows)
        D = new_rows
        del old_rows
        n = self.c.size
        lu = self.lu

        def forward(v: np.ndarray) -> np.ndarray:
            e = np.zeros(n)
            e[states] = D @ v
            return v + lu.solve(e)

        c = self.c.copy()
        c[states] = new_c
        x = gmres(forward, lu.solve(c), x0, KRYLOV_MAX_ITER, KRYLOV_RTOL)
        if x is None:
            return None
        actions = np.array(actions, dtype=np.int64)

        def transposed() -> np.ndarray:
            def backward(v: np.ndarray) -> np.ndarray:
                return v + lu.solve_transposed(D.T @ v[states])

            y = gmres(backward, self.y, self.y, KRYLOV_MAX_ITER, KRYLOV_RTOL)
            return _evaluate_banded(smdp, actions, smdp.model.max_batch + 1).pi if y is None else y

        return _values(x, self.stationary(actions, transposed)), x


def gmres(
    apply: Callable[[np.ndarray], np.ndarray], b: np.ndarray, x0: np.ndarray, max_iter: int, rtol: float
) -> np.ndarray | None:
    """x with apply(x) = b by GMRES from x0 (no restart), or None where the residual's 2-norm is
    not within ``rtol`` |b| after ``max_iter`` iterations (the least-squares residual of the Arnoldi
    basis, orthogonalised twice: classical Gram-Schmidt with one reorthogonalisation)."""
    target = rtol * float(np.linalg.norm(b))
    r = b - apply(x0)
    beta = float(np.linalg.norm(r))
    if beta <= target:
        return x0.copy()
    V = np.empty((max_iter + 1, b.size))
    H = np.zeros((max_iter + 1, max_iter))
    V[0] = r / beta
    for k in range(max_iter):
        w = apply(V[k])
        coef = V[: k + 1] @ w
        w -= coef @ V[: k + 1]
        again = V[: k + 1] @ w
        w -= again @ V[: k + 1]
        H[: k + 1, k] = coef + again
        H[k + 1, k] = np.linalg.norm(w)
        rhs = np.zeros(k + 2)
        rhs[0] = beta
        y = np.linalg.lstsq(H[: k + 2, : k + 1], rhs, rcond=None)[0]
        residual = float(np.linalg.norm(H[: k + 2, : k + 1] @ y - rhs))
        if residual <= target or H[k + 1, k] <= target:
            return x0 + y @ V[: k + 1]
        V[k + 1] = w / H[k + 1, k]
    return None


MAX_UPDATE_RANK = 16
"""Policy iteration solves a policy that differs from the last factored one in at most this many
states by a low-rank (Woodbury) update of that factorisation, 2 r solves instead of a new LU."""
UPDATE_RESIDUAL = 1e-12
"""An updated evaluation is kept when its Bellman residual |Q(n, a(n)) - h(n)| is within this
fraction of the largest |h|, otherwise the policy is factored afresh. Measured at B = 64-256, CV 0
and 1: 1e-15 to 3e-15 for updates and fresh LUs alike (1e-14 for a fresh LU at CV 0), so this is
a check that the update lost no accuracy, with a margin of about 100."""
KRYLOV_MAX_SHARE = 0.375
"""A policy that differs from the factored one in more than ``MAX_UPDATE_RANK`` states but in at most
this share of them is solved by GMRES preconditioned with that LU (``_BandedSolve.krylov``) before a
new LU is tried. Beyond it GMRES costs about what the LU does: policy iteration's first steps from
greedy (767-851 of 873 states at B = 256) took 11-26 iterations, and at 40% (B = 256, CV 2, load 0.6,
1035 of 2605) the changed rows' fill and products (r x N each) cost as much as the iterations' solves."""
KRYLOV_MAX_ITER = 10
"""GMRES iterations (one banded solve each) before a new LU is made instead: a fresh LU and its fill
cost about 12-15 solves at B = 256, N = 872-2133."""
KRYLOV_RTOL = 1e-14
"""GMRES stops when the preconditioned residual is within this fraction of the right-hand side: the
gain then agrees with a fresh LU's to about 5e-15 relative (cold B = 256, CV 1 search)."""


class PolicyEvaluator:
    """Evaluates the successive policies of policy iteration on one SMDP.

    With the banded LU (the default), a policy that differs from the last factored one in at most
    ``MAX_UPDATE_RANK`` states is solved from that factorisation by a low-rank update; after a
    size step of the automatic truncation (``solver.smdp``) and near convergence the policy changes
    in a handful of states, so most of policy iteration's last steps cost solves, not an LU.
    """

    def __init__(self, smdp: TruncatedSMDP, linear_solver: str | None = None, krylov: bool = True) -> None:
        self.smdp = smdp
        self.name = _check_solver(linear_solver)
        self.block = smdp.model.max_batch + 1
        self.banded = self.name == "banded" and smdp.n_states >= MIN_BLOCKS * self.block
        self.krylov = krylov
        """Whether a policy too far from the factored one for the low-rank update tries GMRES
        preconditioned with its LU before a new LU (False: always a new LU, the evaluation before)."""
        self._base: _BandedSolve | None = None
        self._base_values: PolicyValues | None = None
        self._last_x: np.ndarray | None = None
        self.updated = False
        """Whether the last evaluation was a low-rank update or GMRES, not a new LU (``refactor`` redoes it)."""
        self.iterated = False
        """Whether the last evaluation was GMRES's."""

    def __call__(self, actions: np.ndarray) -> PolicyValues:
        if not self.banded:
            return evaluate_policy(self.smdp, actions, self.name)
        base = self._base
        self.iterated = False
        if base is not None:
            states = np.nonzero(actions != base.actions)[0]
            if states.size == 0:
                self.updated = False
                assert self._base_values is not None
                return self._base_values
            if states.size <= MAX_UPDATE_RANK:  # (hessenberg_rows checks the actions)
                try:
                    values = base.updated(self.smdp, actions, states)
                except (np.linalg.LinAlgError, SingularPolicyError):
                    pass  # a singular capacitance: let the LU say whether the policy is singular
                else:
                    self.updated = True
                    return values
            elif self.krylov and states.size <= KRYLOV_MAX_SHARE * self.smdp.n_states:
                x0 = base.x if self._last_x is None else self._last_x
                try:
                    found = base.krylov(self.smdp, actions, states, x0)
                except SingularPolicyError:
                    found = None  # non-finite values: let the LU say whether the policy is singular
                if found is not None:
                    values, self._last_x = found
                    self.updated = self.iterated = True
                    return values
        return self.refactor(actions)

    def refactor(self, actions: np.ndarray) -> PolicyValues:
        old = self._base
        self._base = None  # its storage is reused: it no longer describes a factored policy
        self._base = _BandedSolve.factored(self.smdp, actions, self.block, None if old is None else old.lu)
        self._base_values = self._base.values()
        self._last_x = None
        self.updated = self.iterated = False
        return self._base_values


def _q_from(smdp: TruncatedSMDP, g: float, expected: np.ndarray, first: int) -> np.ndarray:
    """(c - g tau) + E[h(next)] written into ``expected`` (a fresh array), +inf where not allowed: the
    same operations in the same order as the plain expression, without its temporaries."""
    scaled = np.multiply(smdp.time[first:], g)
    np.subtract(smdp.cost[first:], scaled, out=scaled)
    np.add(scaled, expected, out=expected)
    np.copyto(expected, np.inf, where=~smdp.valid[first:])
    return expected


def q_values(smdp: TruncatedSMDP, h: np.ndarray, g: float, first: int = 0) -> np.ndarray:
    """Q(n, a) = c(n, a) - g tau(n, a) + E[h(next)] for n = first..N; +inf where the action is not allowed."""
    return _q_from(smdp, g, smdp.expected_next(h, first), first)


def improve(q: np.ndarray, current: np.ndarray, rtol: float = 1e-11) -> np.ndarray:
    """Greedy improvement that keeps the current action unless another is better by more than noise.

    Keeping ties is what makes policy iteration terminate instead of cycling between equal actions.
    """
    n = np.arange(q.shape[0])
    best = np.argmin(q, axis=1)
    qb = q[n, best]
    qc = q[n, current]
    scale = np.abs(qb) + np.abs(qc) + 1e-300
    keep = qc <= qb + rtol * scale
    return np.where(keep, current, best)


@dataclass(frozen=True, eq=False)
class PIOutcome:
    actions: np.ndarray
    values: PolicyValues
    iterations: int
    converged: bool
    start_gain: float
    """The gain of the start policy (the first evaluation): start_gain - values.gain >= 0 is what the
    start loses against the policy found (``solver.smdp`` reads it as the size step's policy change)."""
    confirmed: bool = True
    """Whether the policy passed the improvement over all actions. False only with ``confirm=False``:
    the windowed step found no change and the full one was left to the caller."""


def default_start(smdp: TruncatedSMDP) -> np.ndarray:
    """Greedy: serve min(n, B), the natural policy when nothing better is known."""
    n = np.arange(smdp.n_states)
    return np.minimum(n, smdp.model.max_batch)


def control_limit(n_states: int, max_batch: int, limit: int) -> np.ndarray:
    """The control-limit policy: wait below ``limit`` requests, serve min(n, B) from there on."""
    n = np.arange(n_states)
    return np.where(n < limit, 0, np.minimum(n, max_batch))


@dataclass(frozen=True, eq=False)
class ControlLimit:
    limit: int
    actions: np.ndarray
    values: PolicyValues
    evaluations: int


def control_limit_search(smdp: TruncatedSMDP, linear_solver: str | None = None) -> ControlLimit:
    """The best control limit t in 1..B on ``smdp``, by ternary search on the gain g(t).

    Deb & Serfozo (1973): for batch service whose time and cost do not depend on the batch size, a
    control limit is optimal and the gain is unimodal in it. Here service times and energies
    depend on the size, so the family is only a candidate: the search is exact over the family when
    g(t) is unimodal (the tests compare it with all B limits), and what it returns is a start for
    policy iteration, which decides. About 2 log_1.5 B evaluations.
    """
    B = smdp.model.max_batch
    memo: dict[int, PolicyValues] = {}

    def gain(t: int) -> float:
        if t not in memo:
            memo[t] = evaluate_policy(smdp, control_limit(smdp.n_states, B, t), linear_solver)
        return memo[t].gain

    lo, hi = 1, B
    while hi - lo > 2:
        m1 = lo + (hi - lo) // 3
        m2 = hi - (hi - lo) // 3
        if gain(m1) <= gain(m2):
            hi = m2 - 1 if gain(m1) < gain(m2) else m2
        else:
            lo = m1 + 1
    best = min(range(lo, hi + 1), key=lambda t: (gain(t), t))
    return ControlLimit(best, control_limit(smdp.n_states, B, best), memo[best], len(memo))


CYCLE_MEMORY = 8
"""Policies remembered to stop a rounding-driven cycle between tied actions."""


def _residual_ok(q: np.ndarray, actions: np.ndarray, values: PolicyValues) -> bool:
    """The Bellman equation of ``actions`` holds to rounding: |Q(n, a(n)) - h(n)| small."""
    n = np.arange(actions.size)
    res = np.max(np.abs(q[n, actions] - values.h))
    return bool(res <= UPDATE_RESIDUAL * max(np.max(np.abs(values.h)), abs(values.gain), 1e-300))


def q_values_near(smdp: TruncatedSMDP, h: np.ndarray, g: float, actions: np.ndarray, width: int) -> np.ndarray:
    """``q_values`` on the wait and the serve actions within ``width`` of ``actions``; +inf elsewhere."""
    return _q_from(smdp, g, smdp.expected_next_near(h, actions, width), 0)


NEAR_ACTIONS = 8
"""Policy iteration improves within this many batch sizes of the current action while that finds a
change, and over every action to stop (``policy_iteration``)."""
NEAR_MIN_RATIO = 8
"""... only where B >= this many times the window's 2 NEAR_ACTIONS + 1 actions (B >= 136 with the
default: at B = 128 the windowed product saved less than the extra full step costs)."""
NEAR_FIRST_RATIO = 6
"""Where B is at least this many times the window but below ``NEAR_MIN_RATIO`` times (B = 102..135
with the default window), only the first step improves near the current actions: there the windowed
product costs 60-75% of the full one (B = 128, N = 547-856), so a windowed step pays only where it
replaces a full one, not where a full one follows it anyway."""


def policy_iteration(
    smdp: TruncatedSMDP, start: np.ndarray | None = None, max_iter: int = 1000, linear_solver: str | None = None,
    near: int | None = NEAR_ACTIONS, confirm: bool = True, krylov: bool = True,
) -> PIOutcome:
    """Policy iteration from ``start`` (default greedy) to a policy no action improves.

    near: improve only among the actions within ``near`` of the current ones (and the wait) while that
    changes the policy, and over all actions before stopping (None: always over all actions). A rate
    or size step moves most batch sizes by one or two, so the intermediate steps need only the
    product on those actions (``TruncatedSMDP.expected_next_near``: the Hankel product's window, or read
    from the FFT products where the pmf window is long); the
    last step is the full one, so the policy returned satisfies the same optimality check as without.
    Used with a given start (warm or seeded: from greedy the changes are far, and the windowed steps
    cost more iterations) where B >= NEAR_MIN_RATIO (2 near + 1), and for the first step only where
    B >= NEAR_FIRST_RATIO (2 near + 1).
    confirm=False: when a windowed step finds no change, stop there without the step over all actions
    (``PIOutcome.confirmed`` False): the automatic truncation confirms only the sizes that could end
    its search (``solver.smdp``). Where every step is a full one the policy is confirmed anyway.
    krylov: evaluate policies too far from the last LU's for the low-rank update by GMRES preconditioned
    with it where that converges (``PolicyEvaluator``; False: a new LU, as before). Same policies and
    gains to rounding.
    """
    actions = default_start(smdp) if start is None else np.asarray(start, dtype=np.int64).copy()
    B = smdp.model.max_batch
    if near is not None and (start is None or B < NEAR_FIRST_RATIO * (2 * near + 1)):
        near = None
    near_steps = None if near is None or B >= NEAR_MIN_RATIO * (2 * near + 1) else 1
    evaluate = PolicyEvaluator(smdp, linear_solver, krylov)
    values = evaluate(actions)
    start_gain = values.gain
    seen = [actions]

    def q_of(values: PolicyValues, windowed: bool) -> np.ndarray:
        if windowed:
            return q_values_near(smdp, values.h, values.gain, actions, near)
        return q_values(smdp, values.h, values.gain)

    for it in range(1, max_iter + 1):
        windowed = near is not None and (near_steps is None or it <= near_steps)
        q = q_of(values, windowed)
        if evaluate.updated and not _residual_ok(q, actions, values):
            values = evaluate.refactor(actions)
            q = q_of(values, windowed)
        new = improve(q, actions)
        if windowed and np.array_equal(new, actions):
            if not confirm:
                return PIOutcome(actions, values, it, True, start_gain, confirmed=False)
            # no better action near the current ones: every action decides whether to stop
            new = improve(q_values(smdp, values.h, values.gain), actions)
        if np.array_equal(new, actions):
            return PIOutcome(actions, values, it, True, start_gain)
        if any(np.array_equal(new, old) for old in seen[-CYCLE_MEMORY:]):
            # exact PI cannot revisit a policy: two actions tie to within the solve's rounding and
            # the rounding alternates; the policies in the cycle share the gain, keep the current one
            return PIOutcome(actions, values, it, True, start_gain)
        actions = new
        seen.append(actions)
        values = evaluate(actions)
    return PIOutcome(actions, values, max_iter, False, start_gain)
