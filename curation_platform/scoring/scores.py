"""Every per-sample score of SCORES.md, chunked to bounded memory, on CPU or GPU.

Inputs are L2-normalised embeddings as torch tensors (any device) or numpy arrays; outputs come
back in the same kind (numpy in, numpy out; a tensor in, a float64 tensor on its device out).
Pairwise work never materialises more than ``chunk x chunk`` similarities: reductions over a
reference set stream over its chunks with running log-sum-exp statistics kept in float64, so
memory depends on the chunk size, not on the pool or reference size.

Notation as in SCORES.md: ``u`` image and ``v`` text embeddings, ``s(x, y) = <x, y>``. Every
``scale`` argument is ``a = exp(logit_scale)``, the teacher's inverse temperature (``tau = 1 / a``,
about 100 for OpenAI CLIP; ``Teacher.logit_scale`` returns it), never the raw log parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

Array = torch.Tensor | np.ndarray
DEFAULT_CHUNK = 1024  # fastest on CPU in benchmarks/score_throughput.py; raise it on a GPU


def _tensor(values: Array, device: torch.device | None = None) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values))
    return tensor.to(device=device or tensor.device, dtype=torch.float32)


def _like(result: torch.Tensor, template: Array) -> Array:
    return result.cpu().numpy() if isinstance(template, np.ndarray) else result


def _chunks(count: int, size: int) -> range:
    return range(0, count, max(1, size))


# -- 1. CLIPScore -------------------------------------------------------------------------------

def clip_score(image: Array, text: Array) -> Array:
    """``s(u_i, v_i)``: cosine similarity of each pair (unitless, in [-1, 1])."""
    u, v = _tensor(image), _tensor(text, _tensor(image).device)
    return _like((u * v).sum(dim=1, dtype=torch.float64), image)


# -- streaming log-sum-exp statistics over a reference set ----------------------------------------

@dataclass(frozen=True)
class LogitStats:
    """For each query, over ``z_j = a * s(q, r_j)`` (j = 1..N): logsumexp, softmax-mean and mean of z."""

    logsumexp: torch.Tensor
    softmax_mean: torch.Tensor
    mean: torch.Tensor
    count: int

    def kl(self) -> torch.Tensor:
        """``D_KL = sum_j p_j z_j - (logsumexp_j z_j - log N)`` (nats, in [0, log N]), SCORES.md section 5."""
        return self.softmax_mean - self.logsumexp + math.log(self.count)

    def kl_reverse(self) -> torch.Tensor:
        """``D_KLR = logsumexp_j z_j - log N - mean_j z_j`` (nats, >= 0)."""
        return self.logsumexp - math.log(self.count) - self.mean

    def log_ratio(self, self_logit: torch.Tensor) -> torch.Tensor:
        """``z_self - (logsumexp_j z_j - log N)``: the pointwise mutual information estimate (nats), section 4."""
        return self_logit - (self.logsumexp - math.log(self.count))


def logit_stats(query: Array, reference: Array, scale: float, chunk: int = DEFAULT_CHUNK) -> LogitStats:
    """One pass over the reference in chunks; running max / sums in float64 (no N x N matrix)."""
    q = _tensor(query)
    r = _tensor(reference, q.device)
    n_ref = r.shape[0]
    if n_ref == 0:
        raise ValueError("the reference set is empty")
    out_lse, out_pmean, out_mean = [], [], []
    for start in _chunks(q.shape[0], chunk):
        block = q[start : start + chunk]
        running_max = torch.full((block.shape[0],), -math.inf, dtype=torch.float64, device=q.device)
        sum_exp = torch.zeros_like(running_max)
        sum_exp_z = torch.zeros_like(running_max)
        sum_z = torch.zeros_like(running_max)
        for r_start in _chunks(n_ref, chunk):
            z = (block @ r[r_start : r_start + chunk].T).double() * scale
            new_max = torch.maximum(running_max, z.max(dim=1).values)
            rescale = torch.exp(running_max - new_max)
            weights = torch.exp(z - new_max[:, None])
            sum_exp = sum_exp * rescale + weights.sum(dim=1)
            sum_exp_z = sum_exp_z * rescale + (weights * z).sum(dim=1)
            sum_z += z.sum(dim=1)
            running_max = new_max
        out_lse.append(running_max + torch.log(sum_exp))
        out_pmean.append(sum_exp_z / sum_exp)
        out_mean.append(sum_z / n_ref)
    return LogitStats(torch.cat(out_lse), torch.cat(out_pmean), torch.cat(out_mean), n_ref)


# -- 4. density ratio ---------------------------------------------------------------------------

def log_density_ratio(
    image: Array,
    text: Array,
    scale: float,
    reference_text: Array | None = None,
    reference_image: Array | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> dict[str, Array]:
    """Pointwise mutual information estimates (nats), SCORES.md section 4.

    ``log_ratio_t_given_i = a s(u_i, v_i) - (logsumexp_j a s(u_i, v_j) - log N)`` over the text
    reference, and ``log_ratio_i_given_t`` likewise over the image reference; each direction is
    computed when its reference is given.
    """
    a = float(scale)
    u = _tensor(image)
    v = _tensor(text, u.device)
    self_logit = (u * v).sum(dim=1, dtype=torch.float64) * a
    result: dict[str, Array] = {}
    if reference_text is not None:
        result["log_ratio_t_given_i"] = _like(logit_stats(u, reference_text, a, chunk).log_ratio(self_logit), image)
    if reference_image is not None:
        result["log_ratio_i_given_t"] = _like(logit_stats(v, reference_image, a, chunk).log_ratio(self_logit), image)
    if not result:
        raise ValueError("give reference_text, reference_image or both")
    return result


# -- 5. KL divergences --------------------------------------------------------------------------

def kl_divergence(query: Array, reference: Array, scale: float, chunk: int = DEFAULT_CHUNK) -> Array:
    """``D_KL(q) = sum_j p_j z_j - (logsumexp_j z_j - log N)``, ``p = softmax(z)`` (nats, in [0, log N]).

    Query one modality against the reference of the other (image -> text reference: D_KL(i)).
    """
    return _like(logit_stats(query, reference, scale, chunk).kl(), query)


def kl_divergence_reverse(query: Array, reference: Array, scale: float, chunk: int = DEFAULT_CHUNK) -> Array:
    """``D_KLR(q) = logsumexp_j z_j - log N - mean_j z_j`` (nats, >= 0)."""
    return _like(logit_stats(query, reference, scale, chunk).kl_reverse(), query)


@dataclass(frozen=True)
class WhiteningStats:
    """``mean_I`` of the image reference and ``Cov_T`` of the text reference (float64)."""

    image_mean: torch.Tensor
    text_covariance: torch.Tensor

    @classmethod
    def fit(cls, reference_image: Array, reference_text: Array, chunk: int = DEFAULT_CHUNK) -> WhiteningStats:
        image = _tensor(reference_image)
        return cls(_mean(image, chunk), _covariance(_tensor(reference_text, image.device), chunk, centred=True))


def whitened_kl(image: Array, stats: WhiteningStats, scale: float, chunk: int = DEFAULT_CHUNK) -> Array:
    """Cheap D_KL(i) approximation ``a^2 (u_i - mean_I)^T Cov_T (u_i - mean_I)`` (nats)."""
    u = _tensor(image)
    mean, covariance = stats.image_mean.to(u.device), stats.text_covariance.to(u.device)
    quadratic = _chunked_quadratic(u, covariance, chunk, centre=mean)
    return _like(float(scale) ** 2 * quadratic, image)


def _chunked_quadratic(u: torch.Tensor, matrix: torch.Tensor, chunk: int,
                       centre: torch.Tensor | None = None) -> torch.Tensor:
    """``(u - c)^T M (u - c)`` per row, in float64, a chunk of rows at a time."""
    out = torch.empty(u.shape[0], dtype=torch.float64, device=u.device)
    for start in _chunks(u.shape[0], chunk):
        rows = u[start : start + chunk].double()
        if centre is not None:
            rows = rows - centre
        out[start : start + chunk] = ((rows @ matrix) * rows).sum(dim=1)
    return out


def _mean(values: torch.Tensor, chunk: int) -> torch.Tensor:
    total = torch.zeros(values.shape[1], dtype=torch.float64, device=values.device)
    for start in _chunks(values.shape[0], chunk):
        total += values[start : start + chunk].double().sum(dim=0)
    return total / values.shape[0]


def _covariance(values: torch.Tensor, chunk: int, centred: bool) -> torch.Tensor:
    """``(1/n) sum_t (x_t - m)(x_t - m)^T`` (or uncentred second moment), accumulated in float64."""
    mean = _mean(values, chunk) if centred else torch.zeros(values.shape[1], dtype=torch.float64,
                                                              device=values.device)
    second = torch.zeros((values.shape[1], values.shape[1]), dtype=torch.float64, device=values.device)
    for start in _chunks(values.shape[0], chunk):
        block = values[start : start + chunk].double() - mean
        second += block.T @ block
    return second / values.shape[0]


# -- 2. negCLIPLoss -----------------------------------------------------------------------------

def neg_clip_loss(
    image: Array,
    text: Array,
    scale: float,
    batch_size: int = 32768,
    repeats: int = 10,
    seed: int = 0,
    batches: Array | None = None,
    reference: tuple[Array, Array] | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> Array:
    """``clip_score(i) - (1/K) sum_k R_{B_k}(i)`` (similarity units), SCORES.md section 2.

    ``R_B(i) = (tau/2) [logsumexp_{j in B} s(u_i, v_j)/tau + logsumexp_{j in B} s(u_j, v_i)/tau]``.
    Batch-mates come from one of three populations:

    * default: each repetition is a seeded random permutation of the scored samples cut into
      consecutive batches of ``batch_size`` (the last one may be smaller);
    * ``batches``: an explicit (K, n) integer array of batch ids per repetition;
    * ``reference=(ref_image, ref_text)``: sample i's batch is i plus ``batch_size - 1`` pairs
      drawn (seeded, without replacement, per repetition and chunk) from the global reference,
      which makes scores comparable across shards. When ``batch_size - 1 >= N`` every repetition
      draws the whole reference, so the K repetitions are one (:func:`neg_clip_loss_from_stats`).
    """
    a = float(scale)
    u = _tensor(image)
    v = _tensor(text, u.device)
    n = u.shape[0]
    diagonal = (u * v).sum(dim=1, dtype=torch.float64)
    penalty = torch.zeros(n, dtype=torch.float64, device=u.device)
    if reference is not None:
        ref_u, ref_v = _tensor(reference[0], u.device), _tensor(reference[1], u.device)
        mates = min(batch_size - 1, ref_u.shape[0])
        if mates == ref_u.shape[0]:
            return _like(neg_clip_loss_from_stats(diagonal, _streamed_lse(u, ref_v, a, chunk),
                                                  _streamed_lse(v, ref_u, a, chunk), a), image)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(repeats):
            for start in _chunks(n, chunk):
                pick = torch.randperm(ref_u.shape[0], generator=generator)[:mates].to(u.device)
                rows = slice(start, start + chunk)
                penalty[rows] += _half_sum_lse(u[rows], v[rows], ref_u[pick], ref_v[pick], diagonal[rows], a, chunk)
        return _like(diagonal - penalty / repeats, image)

    assignment = _batch_assignment(n, batch_size, repeats, seed) if batches is None else _assignment(batches, n)
    for repetition in assignment:
        for batch_id in torch.unique(repetition):
            members = torch.nonzero(repetition == batch_id).flatten().to(u.device)
            penalty[members] += _batch_penalty(u[members], v[members], a, chunk)
    return _like(diagonal - penalty / len(assignment), image)


def neg_clip_loss_from_stats(clip: torch.Tensor, image_lse: torch.Tensor, text_lse: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """negCLIPLoss when each batch is the sample plus the whole reference (``B - 1 >= N``).

    ``image_lse`` / ``text_lse`` are ``logsumexp_j a s(u_i, v_j)`` over the text reference and
    ``logsumexp_j a s(u_j, v_i)`` over the image reference: the :class:`LogitStats` the density ratio
    and KL passes compute, so scoring reads each reference similarity matrix once.
    """
    self_logit = clip * scale
    penalty = (torch.logaddexp(image_lse, self_logit) + torch.logaddexp(text_lse, self_logit)) / (2 * scale)
    return clip - penalty


def _batch_assignment(n: int, batch_size: int, repeats: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    assignment = torch.empty((repeats, n), dtype=torch.int64)
    for k in range(repeats):
        assignment[k, torch.randperm(n, generator=generator)] = torch.arange(n) // batch_size
    return assignment


def _assignment(batches: Array, n: int) -> torch.Tensor:
    assignment = torch.as_tensor(np.asarray(batches) if not isinstance(batches, torch.Tensor) else batches)
    assignment = assignment.reshape(-1, n) if assignment.ndim == 1 else assignment
    if assignment.shape[1] != n:
        raise ValueError(f"batch assignment has {assignment.shape[1]} columns for {n} samples")
    return assignment.cpu().long()


def _batch_penalty(u: torch.Tensor, v: torch.Tensor, a: float, chunk: int) -> torch.Tensor:
    """``R_B(i)`` for every member of one batch, rows streamed in chunks (the B x B matrix is never built)."""
    image_side = _streamed_lse(u, v, a, chunk)  # logsumexp_j a s(u_i, v_j)
    text_side = _streamed_lse(v, u, a, chunk)   # logsumexp_j a s(u_j, v_i)
    return (image_side + text_side) / (2 * a)


def _half_sum_lse(u: torch.Tensor, v: torch.Tensor, ref_u: torch.Tensor, ref_v: torch.Tensor,
                  diagonal: torch.Tensor, a: float, chunk: int) -> torch.Tensor:
    """``R_B(i)`` where B = {i} + the given reference mates."""
    image_side = torch.logaddexp(_streamed_lse(u, ref_v, a, chunk), diagonal * a)
    text_side = torch.logaddexp(_streamed_lse(v, ref_u, a, chunk), diagonal * a)
    return (image_side + text_side) / (2 * a)


def _streamed_lse(query: torch.Tensor, keys: torch.Tensor, a: float, chunk: int) -> torch.Tensor:
    if keys.shape[0] == 0:
        return torch.full((query.shape[0],), -math.inf, dtype=torch.float64, device=query.device)
    return logit_stats(query, keys, a, chunk).logsumexp


# -- 3. NormSim ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetStats:
    """NormSim target statistics: ``Sigma_T = (1/|T|) sum_t u_t u_t^T`` and ``|T|`` (float64)."""

    second_moment: torch.Tensor
    count: int

    @classmethod
    def fit(cls, target_image: Array, chunk: int = DEFAULT_CHUNK) -> TargetStats:
        target = _tensor(target_image)
        return cls(_covariance(target, chunk, centred=False), target.shape[0])


def norm_sim_2(image: Array, target: TargetStats) -> Array:
    """``NormSim_2(i) = sqrt(|T| u_i^T Sigma_T u_i) = (sum_t s(u_i, u_t)^2)^(1/2)`` (similarity units)."""
    u = _tensor(image)
    quadratic = _chunked_quadratic(u, target.second_moment.to(u.device), DEFAULT_CHUNK).clamp_min(0)
    return _like(torch.sqrt(target.count * quadratic), image)


def norm_sim_inf(image: Array, target_image: Array, chunk: int = DEFAULT_CHUNK) -> Array:
    """``NormSim_inf(i) = max_t |s(u_i, u_t)|``: similarity to the nearest target image."""
    u = _tensor(image)
    t = _tensor(target_image, u.device)
    best = torch.full((u.shape[0],), -math.inf, dtype=torch.float64, device=u.device)
    for start in _chunks(u.shape[0], chunk):
        rows = slice(start, start + chunk)
        for t_start in _chunks(t.shape[0], chunk):
            similarity = (u[rows] @ t[t_start : t_start + chunk].T).abs().max(dim=1).values.double()
            best[rows] = torch.maximum(best[rows], similarity)
    return _like(best, image)


def norm_sim(image: Array, target_image: Array, p: Literal[2, "inf"], chunk: int = DEFAULT_CHUNK) -> Array:
    """``NormSim_p`` for p = 2 (via the target second moment) or p = inf (nearest target)."""
    if p == 2:
        return norm_sim_2(image, TargetStats.fit(target_image, chunk))
    if p == "inf":
        return norm_sim_inf(image, target_image, chunk)
    raise ValueError(f"p must be 2 or 'inf', got {p!r}")


def norm_sim_dynamic(image: Array, keep: int, num_iters: int = 10, sample_fraction: float = 0.1,
                     seed: int = 0) -> np.ndarray:
    """NormSim-D: indices (sorted) of the ``keep`` candidates that survive iterative pruning.

    Each iteration scores the current subset by ``u^T Sigma u`` with ``Sigma`` the second moment of
    a seeded random ``sample_fraction`` of the current subset, drops the lowest
    ``ceil((n0 - keep) / num_iters)``; the last iteration keeps exactly ``keep``.
    """
    u = _tensor(image)
    n0 = u.shape[0]
    if not 0 < keep <= n0:
        raise ValueError(f"keep must be in 1..{n0}, got {keep}")
    generator = torch.Generator().manual_seed(seed)
    current = torch.arange(n0)
    step = math.ceil((n0 - keep) / max(1, num_iters))
    for iteration in range(num_iters):
        if current.numel() <= keep:
            break
        sample_size = max(1, round(sample_fraction * current.numel()))
        sample = current[torch.randperm(current.numel(), generator=generator)[:sample_size]]
        sigma = _covariance(u[sample.to(u.device)], DEFAULT_CHUNK, centred=False)
        scores = _chunked_quadratic(u[current.to(u.device)], sigma, DEFAULT_CHUNK).cpu()
        survivors = keep if iteration == num_iters - 1 else max(keep, current.numel() - step)
        order = torch.argsort(scores, descending=True, stable=True)
        current = current[order[:survivors]]
    return np.sort(current.numpy())


# -- 6. importance weights ----------------------------------------------------------------------

WeightMode = Literal["raw", "self_normalised", "clipped"]
WEIGHT_MODES: tuple[WeightMode, ...] = get_args(WeightMode)


def normalise_log_weights(log_weights: np.ndarray, mode: WeightMode = "raw", clip_at: float = 10.0,
                          log_mean: float | None = None) -> np.ndarray:
    """Importance weights from their float64 logs in one of the :data:`WEIGHT_MODES` (the one place they are
    defined: :func:`importance_weights` and a release's weights both call it).

    ``raw`` is ``exp(log w)``; ``self_normalised`` divides by the mean weight over the given samples,
    computed in log space (``logaddexp`` reduction) so large log weights cannot overflow; ``clipped``
    caps the self-normalised weight at ``clip_at``. numpy, not torch: release weights are written to a
    checksummed ``samples.parquet`` and must keep their bits (torch's ``logsumexp`` differs in the last
    bits from numpy's ``logaddexp.reduce``). ``log_mean`` gives the mean's log when ``log_weights`` are one
    batch of a larger set (a release written in streamed batches).
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"mode must be raw, self_normalised or clipped, got {mode!r}")
    log_weights = np.asarray(log_weights, dtype=np.float64)
    if mode == "raw":
        return np.exp(log_weights)
    if log_mean is None:
        log_mean = np.logaddexp.reduce(log_weights) - np.log(max(len(log_weights), 1))
    normalised = np.exp(log_weights - log_mean)
    if mode == "clipped":
        normalised = np.minimum(normalised, clip_at)
    return normalised


def importance_weights(image: Array, prompt_embedding: Array, scale: float = 10.0, mode: WeightMode = "raw",
                       clip_at: float = 10.0) -> Array:
    """``w(i) = exp(a_w s(u_i, v*))`` for a domain prompt embedding ``v*`` (unitless ratio), float64.

    ``raw`` is the published form (``a_w = 10``, not normalised); ``self_normalised`` divides by
    the mean over the given samples; ``clipped`` caps the self-normalised weight at ``clip_at``
    (:func:`normalise_log_weights`). The similarity is a product and a row sum, not a matrix-vector
    product: MKL's gemv changes its float summation with the number of threads it picks, which
    changes under load, and so would every weight's last bits.
    """
    u = _tensor(image)
    prompt = _tensor(prompt_embedding, u.device).reshape(-1)
    log_weights = (u * prompt).sum(dim=1, dtype=torch.float64) * float(scale)
    weights = normalise_log_weights(log_weights.cpu().numpy(), mode, clip_at)
    return weights if isinstance(image, np.ndarray) else torch.from_numpy(weights).to(u.device)
