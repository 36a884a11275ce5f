"""Every score against a brute-force float64 reference on random data, chunk boundaries included."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from curation_platform import scoring

A = 100.0  # OpenAI CLIP's inverse temperature: exp(s / tau) overflows float32 without logsumexp
TOL = 1e-4
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def unit(rng: np.random.Generator, n: int, d: int = 24) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    image = unit(rng, 103)
    text = (image + 0.7 * unit(rng, 103)).astype(np.float64)
    text = (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float32)
    return {"image": image, "text": text, "ref_image": unit(rng, 61), "ref_text": unit(rng, 61),
            "target": unit(rng, 37)}


def f64(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64)


def brute_kl(query: np.ndarray, reference: np.ndarray, a: float) -> tuple[np.ndarray, np.ndarray]:
    z = a * f64(query) @ f64(reference).T
    lse = logsumexp(z, axis=1)
    p = np.exp(z - lse[:, None])
    n = reference.shape[0]
    return (p * z).sum(axis=1) - (lse - math.log(n)), lse - math.log(n) - z.mean(axis=1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_kl_and_density_ratio_match_brute_force(data: dict, chunk: int) -> None:
    kl, klr = brute_kl(data["image"], data["ref_text"], A)
    assert np.abs(scoring.kl_divergence(data["image"], data["ref_text"], A, chunk) - kl).max() < TOL
    assert np.abs(scoring.kl_divergence_reverse(data["image"], data["ref_text"], A, chunk) - klr).max() < TOL
    got = scoring.kl_divergence(data["text"], data["ref_image"], A, chunk)
    assert (got >= -TOL).all() and (got <= math.log(61) + TOL).all()

    ratios = scoring.log_density_ratio(data["image"], data["text"], A, data["ref_text"], data["ref_image"], chunk)
    diag = A * (f64(data["image"]) * f64(data["text"])).sum(axis=1)
    expected_t = diag - (logsumexp(A * f64(data["image"]) @ f64(data["ref_text"]).T, axis=1) - math.log(61))
    expected_i = diag - (logsumexp(A * f64(data["text"]) @ f64(data["ref_image"]).T, axis=1) - math.log(61))
    assert np.abs(ratios["log_ratio_t_given_i"] - expected_t).max() < TOL * A
    assert np.abs(ratios["log_ratio_i_given_t"] - expected_i).max() < TOL * A


def brute_neg_clip_loss(image: np.ndarray, text: np.ndarray, a: float, assignment: np.ndarray) -> np.ndarray:
    u, v = f64(image), f64(text)
    penalty = np.zeros(len(u))
    for repetition in assignment:
        for batch in np.unique(repetition):
            members = np.flatnonzero(repetition == batch)
            logits = a * u[members] @ v[members].T
            penalty[members] += (logsumexp(logits, axis=1) + logsumexp(logits, axis=0)) / (2 * a)
    return (u * v).sum(axis=1) - penalty / len(assignment)


@pytest.mark.parametrize("batch_size,chunk", [(10, 3), (32, 32), (103, 4096), (500, 16)])
def test_neg_clip_loss_matches_brute_force(data: dict, batch_size: int, chunk: int) -> None:
    rng = np.random.default_rng(1)
    n = len(data["image"])
    assignment = np.stack([rng.permutation(n) // batch_size for _ in range(3)])  # N not divisible by B
    expected = brute_neg_clip_loss(data["image"], data["text"], A, assignment)
    got = scoring.neg_clip_loss(data["image"], data["text"], A, batches=assignment, chunk=chunk)
    assert np.abs(got - expected).max() < TOL

    seeded = scoring.neg_clip_loss(data["image"], data["text"], A, batch_size=batch_size, repeats=3, seed=5,
                                   chunk=chunk)
    again = scoring.neg_clip_loss(data["image"], data["text"], A, batch_size=batch_size, repeats=3, seed=5,
                                  chunk=chunk)
    other_chunk = scoring.neg_clip_loss(data["image"], data["text"], A, batch_size=batch_size, repeats=3, seed=5)
    assert np.array_equal(seeded, again) and np.abs(seeded - other_chunk).max() < TOL
    single_batch = scoring.neg_clip_loss(data["image"], data["text"], A, batch_size=n, repeats=2)
    assert np.abs(single_batch - brute_neg_clip_loss(data["image"], data["text"], A, np.zeros((1, n), int))).max() < TOL


def test_neg_clip_loss_with_reference_mates_matches_brute_force(data: dict) -> None:
    """With B - 1 >= N_ref every reference pair is a batch-mate: the batch is {i} + the whole reference."""
    got = scoring.neg_clip_loss(data["image"], data["text"], A, batch_size=1000, repeats=2,
                                reference=(data["ref_image"], data["ref_text"]), chunk=5)
    u, v, ru, rv = (f64(data[name]) for name in ("image", "text", "ref_image", "ref_text"))
    diag = (u * v).sum(axis=1)
    image_side = logsumexp(np.concatenate([A * u @ rv.T, A * diag[:, None]], axis=1), axis=1)
    text_side = logsumexp(np.concatenate([A * v @ ru.T, A * diag[:, None]], axis=1), axis=1)
    assert np.abs(got - (diag - (image_side + text_side) / (2 * A))).max() < TOL
    # the fused form reuses the density-ratio / KL pass's log-sum-exps (issue 16)
    image_stats = scoring.logit_stats(data["image"], data["ref_text"], A, chunk=5)
    text_stats = scoring.logit_stats(data["text"], data["ref_image"], A, chunk=5)
    fused = scoring.neg_clip_loss_from_stats(torch.from_numpy(diag), image_stats.logsumexp, text_stats.logsumexp, A)
    assert np.abs(fused.numpy() - got).max() < 1e-9
    # with fewer mates than the reference the K repetitions are still drawn, and their seed matters
    fewer = [scoring.neg_clip_loss(data["image"], data["text"], 1.0, batch_size=4, repeats=3, seed=seed,
                                   reference=(data["ref_image"], data["ref_text"])) for seed in (0, 1)]
    assert np.abs(fewer[0] - fewer[1]).max() > 1e-6


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_norm_sim_matches_brute_force(data: dict, chunk: int) -> None:
    sims = f64(data["image"]) @ f64(data["target"]).T
    assert np.abs(scoring.norm_sim(data["image"], data["target"], 2, chunk) - np.sqrt((sims**2).sum(1))).max() < TOL
    assert np.abs(scoring.norm_sim(data["image"], data["target"], "inf", chunk) - np.abs(sims).max(1)).max() < TOL


def test_norm_sim_dynamic_keeps_exactly_m_and_follows_the_definition(data: dict) -> None:
    keep = scoring.norm_sim_dynamic(data["image"], keep=40, num_iters=4, sample_fraction=0.5, seed=3)
    assert len(keep) == 40 and len(set(keep.tolist())) == 40
    assert np.array_equal(keep, scoring.norm_sim_dynamic(data["image"], keep=40, num_iters=4,
                                                         sample_fraction=0.5, seed=3))
    # one iteration with the whole set as the sample is plain top-M by u^T Sigma u
    u = f64(data["image"])
    sigma = u.T @ u / len(u)
    expected = np.sort(np.argsort(-((u @ sigma) * u).sum(1), kind="stable")[:40])
    got = scoring.norm_sim_dynamic(data["image"], keep=40, num_iters=1, sample_fraction=1.0)
    assert np.array_equal(got, expected)


def test_importance_weights_and_whitened_kl(data: dict) -> None:
    prompt = data["ref_text"][0]
    log_w = 10.0 * f64(data["image"]) @ f64(prompt)
    assert np.allclose(scoring.importance_weights(data["image"], prompt), np.exp(log_w), rtol=1e-5)
    normalised = scoring.importance_weights(data["image"], prompt, mode="self_normalised")
    assert np.isclose(normalised.mean(), 1.0) and np.allclose(normalised, np.exp(log_w) / np.exp(log_w).mean(),
                                                              rtol=1e-5)
    clipped = scoring.importance_weights(data["image"], prompt, scale=200.0, mode="clipped", clip_at=3.0)
    assert np.isfinite(clipped).all() and clipped.max() <= 3.0

    # The same bits whatever the thread count (MKL's gemv changes with it, and its thread count with load).
    rows = torch.nn.functional.normalize(torch.randn(1916, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    by_threads = []
    previous = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        by_threads.append(scoring.importance_weights(rows, rows[0]).numpy().tobytes())
    torch.set_num_threads(previous)
    assert by_threads[0] == by_threads[1]

    stats = scoring.WhiteningStats.fit(data["ref_image"], data["ref_text"], chunk=7)
    rt = f64(data["ref_text"])
    cov = np.cov(rt.T, bias=True)
    centred = f64(data["image"]) - f64(data["ref_image"]).mean(0)
    expected = A**2 * ((centred @ cov) * centred).sum(1)
    assert np.abs(scoring.whitened_kl(data["image"], stats, A) - expected).max() < TOL * A**2


@pytest.mark.parametrize("device", DEVICES)
def test_torch_inputs_stay_on_their_device_and_agree_with_numpy(data: dict, device: str) -> None:
    image, ref = torch.from_numpy(data["image"]).to(device), torch.from_numpy(data["ref_text"]).to(device)
    got = scoring.kl_divergence(image, ref, A, chunk=9)
    assert isinstance(got, torch.Tensor) and got.device.type == device
    assert np.abs(got.cpu().numpy() - scoring.kl_divergence(data["image"], data["ref_text"], A)).max() < TOL
    assert np.abs(scoring.clip_score(image, torch.from_numpy(data["text"]).to(device)).cpu().numpy()
                  - (f64(data["image"]) * f64(data["text"])).sum(1)).max() < TOL


def test_large_logit_scale_does_not_overflow() -> None:
    rng = np.random.default_rng(2)
    query, reference = unit(rng, 8), unit(rng, 20)
    reference[:8] = query  # exact matches: s = 1, exp(1000) overflows even float64 without logsumexp
    kl = scoring.kl_divergence(query, reference, 1000.0, chunk=3)
    assert np.isfinite(kl).all() and np.allclose(kl, math.log(20), atol=1e-3)
