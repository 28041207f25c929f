"""A scaling law fitted to finished runs: L(N, D) = E + A/N^α + B/D^β, with bootstrap intervals,
the compute-optimal frontier and forecasts (used by `kiln scale` and `kiln plan fit=`).

N is the model's parameter count (`ModelConfig.num_params`), D the training tokens, L the final
validation bits per byte. The fit minimizes a Huber loss of the log-space residual
log L̂ − log L (as Chinchilla's approach 3), by damped Gauss-Newton (Levenberg–Marquardt with
Huber weights) from a grid of starting points, on log E, log A, log B, α, β. Numpy only: no
torch, so `kiln plan` stays fast.

The interval of a forecast is the 5th–95th percentile of the law refitted on runs resampled with
replacement (the bootstrap over runs), widened by the fit's own log-space scatter (a run's
noise around the law, which the refits do not see at a point that was not measured).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.errors import KilnError

SCALE_JSON = "scale.json"  # in a `kiln scale` directory: the points, the law, its bootstrap, the held-out check
HUBER_DELTA = 1e-3
Z90 = 1.6449  # a 90% two-sided interval for the scatter term
PARAM_NAMES = ("E", "A", "alpha", "B", "beta")


@dataclass(frozen=True)
class Law:
    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def loss(self, n, d):
        """L(N, D); broadcasts over arrays."""
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A * n ** -self.alpha + self.B * d ** -self.beta

    def optimal(self, compute: float) -> tuple[float, float]:
        """(N*, D*) minimizing L at training compute C = 6·N·D."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        n = g * (compute / 6) ** (b / (a + b))
        return n, compute / (6 * n)

    def compute_for(self, target: float) -> float:
        """The least compute C whose compute-optimal run reaches loss `target` (bisection on log C)."""
        if target <= self.E:
            raise KilnError(f"target {target:g} is at or below the fitted irreducible loss E = {self.E:.4g}: "
                            "no model size and token count reaches it")
        lo, hi = 0.0, 120.0  # log10 of FLOPs
        for _ in range(200):
            mid = (lo + hi) / 2
            if float(self.loss(*self.optimal(10 ** mid))) > target:
                lo = mid
            else:
                hi = mid
        return 10 ** hi

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in PARAM_NAMES}

    @classmethod
    def from_dict(cls, d: dict) -> Law:
        return cls(**{k: float(d[k]) for k in PARAM_NAMES})


def _law(theta: np.ndarray) -> Law:
    return Law(math.exp(theta[0]), math.exp(theta[1]), float(theta[3]), math.exp(theta[2]), float(theta[4]))


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _solve(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray, logl: np.ndarray, delta: float,
           iters: int = 200) -> tuple[np.ndarray, float]:
    """Levenberg–Marquardt on the Huber objective (iteratively reweighted), from `theta` =
    (log E, log A, log B, α, β). Returns the parameters and the objective."""

    def parts(t):
        ta = np.exp(t[1] - t[3] * logn)
        tb = np.exp(t[2] - t[4] * logd)
        s = math.exp(t[0]) + ta + tb
        return np.log(s) - logl, s, ta, tb

    r, s, ta, tb = parts(theta)
    obj = float(_huber(r, delta).sum())
    lam = 1e-3
    for _ in range(iters):
        jac = np.stack([math.exp(theta[0]) / s, ta / s, tb / s, -ta * logn / s, -tb * logd / s], axis=1)
        w = np.where(np.abs(r) <= delta, 1.0, delta / np.maximum(np.abs(r), 1e-300))
        jw = jac * w[:, None]
        h = jac.T @ jw
        g = jw.T @ r
        improved = False
        for _ in range(20):
            step = np.linalg.solve(h + lam * (np.diag(np.diag(h)) + 1e-12 * np.eye(5)), -g)
            cand = theta + step
            cand[3:] = np.clip(cand[3:], 0.01, 3.0)
            cand[:3] = np.clip(cand[:3], -30, 60)
            rc, sc, tac, tbc = parts(cand)
            oc = float(_huber(rc, delta).sum())
            if np.isfinite(oc) and oc < obj:
                done = obj - oc < 1e-14 * max(1.0, obj)
                theta, r, s, ta, tb, obj = cand, rc, sc, tac, tbc, oc
                lam = max(lam / 3, 1e-9)
                improved = True
                break
            lam *= 4
        if not improved or done:
            break
    return theta, obj


def _start_grid(logl: np.ndarray) -> list[np.ndarray]:
    """Starting points: E below the smallest loss, A and B over orders of magnitude, α and β over 0.1–0.9."""
    low = float(np.exp(logl.min()))
    es = [math.log(low * f) for f in (0.1, 0.5, 0.9)]
    return [np.array([e, a, b, al, be]) for e, a, b, al, be in
            itertools.product(es, (0.0, 5.0, 10.0), (0.0, 5.0, 10.0), (0.2, 0.5, 0.8), (0.2, 0.5, 0.8))]


def fit_law(params, tokens, losses, delta: float = HUBER_DELTA, starts: list[np.ndarray] | None = None
            ) -> tuple[Law, np.ndarray]:
    """The law fitted to points (N, D, L), and its raw parameter vector (for warm starts)."""
    logn, logd, logl = (np.log(np.asarray(x, float)) for x in (params, tokens, losses))
    if len(logl) < 3:
        raise KilnError(f"a scaling fit needs at least 3 finished runs; got {len(logl)}")
    best, best_obj = None, math.inf
    for theta in starts if starts is not None else _start_grid(logl):
        t, o = _solve(theta.astype(float), logn, logd, logl, delta)
        if o < best_obj:
            best, best_obj = t, o
    return _law(best), best


@dataclass
class Fit:
    """The law fitted to every point, the laws refitted on bootstrap resamples, and the log scatter."""

    law: Law
    samples: list[Law] = field(default_factory=list)
    scatter: float = 0.0  # RMS of log L̂ − log L over the fitted points

    def forecast(self, n: float, d: float) -> dict:
        """{"bpb": L(N, D), "interval": [lo, hi]} (90%: bootstrap percentiles widened by the scatter)."""
        mid = float(self.law.loss(n, d))
        preds = np.array([float(s.loss(n, d)) for s in self.samples]) if self.samples else np.array([mid])
        lo, hi = np.percentile(preds, [5, 95])
        lo, hi = min(lo, mid), max(hi, mid)
        widen = math.exp(Z90 * self.scatter)
        return {"bpb": mid, "interval": [float(lo / widen), float(hi * widen)]}

    def cheapest(self, target: float) -> dict:
        """The compute-optimal (N, D) expected to reach `target`, and its compute 6·N·D."""
        c = self.law.compute_for(target)
        n, d = self.law.optimal(c)
        return {"target_bpb": target, "params": n, "tokens": d, "compute": c}

    def to_dict(self) -> dict:
        return {"law": self.law.to_dict(), "scatter": self.scatter, "samples": [s.to_dict() for s in self.samples]}

    @classmethod
    def from_dict(cls, d: dict) -> Fit:
        return cls(Law.from_dict(d["law"]), [Law.from_dict(s) for s in d.get("samples", [])],
                   float(d.get("scatter", 0.0)))


def fit(params, tokens, losses, bootstrap: int = 100, seed: int = 0) -> Fit:
    """The law, `bootstrap` refits on runs resampled with replacement (warm-started from the full fit),
    and the scatter of the points around the law."""
    n, d, loss = (np.asarray(x, float) for x in (params, tokens, losses))
    law, theta = fit_law(n, d, loss)
    scatter = float(np.sqrt(np.mean((np.log(law.loss(n, d)) - np.log(loss)) ** 2)))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(loss), len(loss))
        if len(np.unique(idx)) < 3:
            continue
        samples.append(fit_law(n[idx], d[idx], loss[idx], starts=[theta])[0])
    return Fit(law, samples, scatter)


def read_fit(scale_dir: str | Path) -> tuple[Fit, dict]:
    """The fit a `kiln scale` directory wrote (its scale.json), and the whole file."""
    path = Path(scale_dir) / SCALE_JSON
    if Path(scale_dir).is_file() and Path(scale_dir).name.endswith(".json"):
        path = Path(scale_dir)
    if not path.is_file():
        raise KilnError(f"fit={scale_dir}: no {SCALE_JSON} there; run `kiln scale out={scale_dir}` first")
    try:
        data = json.loads(path.read_text())
        return Fit.from_dict(data["fit"]), data
    except (ValueError, KeyError, TypeError) as e:
        raise KilnError(f"fit={scale_dir}: {path} is not a kiln scale fit ({e})") from None
