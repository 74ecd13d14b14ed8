"""Behaviour of the Sparse-GAN networks, losses, scores and the reconstruction-based models.

Everything runs on CPU at small sizes (32x32, base width 8) except the shape test, which checks
the paper's 224x224 -> 1024x7x7 latent.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso
from torch import nn

from sparsegan.anomaly import (anomaly_activation_map, image_anomaly_score, latent_anomaly_score,
                               residual_activation_map)
from sparsegan.scoring import score_batch
from sparsegan.models.losses import discriminator_loss, sparse_coding_loss
from sparsegan.models.networks import (Decoder, Encoder, SparsityRegularizationNet, latent_shape,
                                       num_blocks)
from sparsegan.models.sparse_gan import CONFIGS, ReconstructionDetector, lr_schedule
from sparsegan.params import ModelParams, TrainParams

SMALL = 32  # image size of the training tests: 2 blocks, latent 8x8
BASE = 8  # base width of the training tests: latent channels 16


def make_detector(model: str, seed: int = 0, **train_kw) -> ReconstructionDetector:
    torch.manual_seed(seed)
    return ReconstructionDetector(CONFIGS[model], SMALL, ModelParams(base_channels=BASE),
                                  TrainParams(**train_kw))


def layered_batch(n: int = 8, size: int = SMALL, seed: int = 0) -> torch.Tensor:
    """Smooth, OCT-like images in [-1, 1]: curved horizontal bands with per-image phase/tilt."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, size)[:, None]
    x = torch.linspace(0, 1, size)[None, :]
    imgs = []
    for _ in range(n):
        phase, tilt, freq = torch.rand(3, generator=g)
        band = torch.sin(2 * math.pi * ((3 + 2 * freq) * (y + 0.3 * tilt * (x - 0.5) ** 2) + phase))
        imgs.append(0.8 * band)
    return torch.stack(imgs)[:, None].float()


# --------------------------------------------------------------------------------------- shapes

def test_encoder_gives_paper_latent_1024x7x7_and_decoder_returns_224_image():
    torch.manual_seed(0)
    enc, dec = Encoder(224, 64), Decoder(224, 64)
    with torch.no_grad():
        h = enc(torch.rand(2, 1, 224, 224) * 2 - 1)
        out = dec(h)
    assert h.shape == (2, 1024, 7, 7)
    assert out.shape == (2, 1, 224, 224)
    assert out.abs().max() <= 1.0  # Tanh output, images live in [-1, 1]
    assert latent_shape(224, 64) == (1024, 7, 7)
    assert num_blocks(224) == 5


@pytest.mark.parametrize("size,blocks,base,expected", [(64, 3, 16, (64, 8, 8)),
                                                        (128, 4, 16, (128, 8, 8))])
def test_latent_stays_8x8_at_64_and_128(size, blocks, base, expected):
    assert num_blocks(size) == blocks
    assert latent_shape(size, base) == expected
    with torch.no_grad():
        h = Encoder(size, base)(torch.zeros(1, 1, size, size))
        out = Decoder(size, base)(h)
    assert tuple(h.shape[1:]) == expected
    assert out.shape == (1, 1, size, size)


@pytest.mark.parametrize("size", [100, 8])
def test_invalid_image_size_raises_value_error_naming_data_image_size(size):
    with pytest.raises(ValueError, match=r"data\.image_size"):
        num_blocks(size)
    with pytest.raises(ValueError, match=r"data\.image_size"):
        Encoder(size, 8)
    with pytest.raises(ValueError, match=r"data\.image_size"):
        latent_shape(size, 8)


# -------------------------------------------------------------------------------------- the SRN

def _lasso_reference(w_d: np.ndarray, h: np.ndarray, lam: float) -> np.ndarray:
    """argmin_s ||h - W_d s||^2 + lam ||s||_1 per row of h (P, C) -> (P, K), by scikit-learn.

    sklearn's Lasso minimises (1 / (2 n)) ||y - X w||^2 + alpha ||w||_1 with n = len(y) = C rows of
    X = W_d; dividing our objective by 2 C gives the same minimiser with alpha = lam / (2 C).
    """
    n = w_d.shape[0]
    lasso = Lasso(alpha=lam / (2 * n), fit_intercept=False, tol=1e-12, max_iter=100_000)
    return np.stack([lasso.fit(w_d, row).coef_.copy() for row in h])


def _objective(h: torch.Tensor, w_d: torch.Tensor, s: torch.Tensor, lam: float) -> torch.Tensor:
    """||H - W_d s||^2 + lam ||s||_1 per position; h (P, C), s (P, K) -> (P,)."""
    return (h - s @ w_d.T).pow(2).sum(1) + lam * s.abs().sum(1)


def test_srn_reset_to_ista_recovers_the_lasso_sparse_code():
    channels = code = 32
    batch, hh, ww = 2, 2, 3
    positions = batch * hh * ww
    lam = 0.2  # large enough that a theta off by 2x moves the code by ~15% (checked)
    torch.manual_seed(0)
    srn = SparsityRegularizationNet(channels, code, steps=3, l1=lam)
    srn.reset_to_ista()
    w_d = srn.dictionary.weight[:, :, 0, 0].detach().double()  # (C, K)

    g = torch.Generator().manual_seed(1)
    s_true = torch.zeros(positions, code, dtype=torch.float64)
    for p in range(positions):  # 3 nonzeros per position, |value| in [0.5, 1.5]
        idx = torch.randperm(code, generator=g)[:3]
        mag = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
        sign = torch.randint(0, 2, (3,), generator=g).double() * 2 - 1
        s_true[p, idx] = mag * sign
    h = s_true @ w_d.T + 1e-3 * torch.randn(positions, channels, generator=g, dtype=torch.float64)

    latent = h.reshape(batch, hh, ww, channels).permute(0, 3, 1, 2).float()  # (B, C, h, w)
    with torch.no_grad():
        s_map = srn(latent, steps=500)
    assert s_map.shape == (batch, code, hh, ww)
    s = s_map.double().permute(0, 2, 3, 1).reshape(positions, code)

    ref = torch.from_numpy(_lasso_reference(w_d.numpy(), h.numpy(), lam))
    rel = float((s - ref).norm() / ref.norm())
    assert rel < 1e-3, f"SRN code is {rel:.3g} away (relative) from the Lasso solution"

    obj_srn, obj_ref = _objective(h, w_d, s, lam), _objective(h, w_d, ref, lam)
    ratio = obj_srn / obj_ref
    assert torch.all(ratio < 1 + 1e-4), ratio.max()  # brief asks ~1%; it is far tighter
    assert torch.all(ratio > 1 - 1e-6), ratio.min()  # the reference is the optimum

    assert torch.equal(s != 0, ref != 0)  # same support as the reference
    acc_srn = float(((s != 0) == (s_true != 0)).double().mean())
    acc_ref = float(((ref != 0) == (s_true != 0)).double().mean())
    assert acc_srn >= acc_ref
    assert acc_srn > 0.95


def test_srn_codes_get_sparser_as_lambda_grows():
    channels = code = 32
    h = torch.randn(4, channels, 3, 3, generator=torch.Generator().manual_seed(3))
    zero_fractions = []
    for lam in (0.01, 0.1, 1.0):
        torch.manual_seed(0)  # the same dictionary W_d for every lambda
        srn = SparsityRegularizationNet(channels, code, steps=3, l1=lam)
        with torch.no_grad():
            s = srn(h, steps=300)
        zero_fractions.append(float((s == 0).float().mean()))
    assert zero_fractions[0] < zero_fractions[1] < zero_fractions[2], zero_fractions
    assert zero_fractions[0] < 0.05 and zero_fractions[2] - zero_fractions[0] > 0.3, zero_fractions


def test_sparse_coding_loss_is_the_srn_objective_per_latent_entry():
    # With K = C, L_scl = sum over positions of ||H - W_d s||^2 + lambda ||s||_1, / (B C h w).
    g = torch.Generator().manual_seed(0)
    b, c, hh, ww, lam = 2, 6, 3, 2, 0.3
    latent = torch.randn(b, c, hh, ww, generator=g, dtype=torch.float64)
    code = torch.randn(b, c, hh, ww, generator=g, dtype=torch.float64)
    w_d = torch.randn(c, c, generator=g, dtype=torch.float64)
    recon = torch.einsum("ck,bkhw->bchw", w_d, code)
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, c)  # noqa: E731
    expected = _objective(flat(latent), w_d, flat(code), lam).sum() / (b * c * hh * ww)
    torch.testing.assert_close(sparse_coding_loss(latent, code, recon, lam), expected)


# ------------------------------------------------------------------------ L_sp and shared E = G_en

def test_sparsity_loss_sends_gradient_into_the_generator_encoder():
    det = make_detector("sparse_gan")
    assert det.srn is not None
    x = layered_batch(4)
    det.zero_grad(set_to_none=True)
    loss = det.sparsity_loss(det.encoder(x))
    assert loss.item() > 0
    loss.backward()
    convs = [m for m in det.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == num_blocks(SMALL)
    for conv in convs:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert det.srn.dictionary.weight.grad.abs().sum() > 0  # and it trains W_d
    assert all(p.grad is None for p in det.decoder.parameters())  # L_sp does not touch G_de


def test_unit_atoms_makes_the_dictionary_blind_to_atom_size():
    torch.manual_seed(0)
    srn = SparsityRegularizationNet(16, 12, steps=3, l1=0.1, unit_atoms=True)
    norms = srn.atoms().flatten(2).norm(dim=0).squeeze()
    assert norms.shape == (12,) and torch.allclose(norms, torch.ones(12), atol=1e-6)
    code = torch.randn(2, 12, 4, 4)
    before = srn.reconstruct(code)
    with torch.no_grad():
        srn.dictionary.weight.mul_(torch.linspace(0.1, 10, 12)[None, :, None, None])
    assert torch.allclose(srn.reconstruct(code), before, atol=1e-5)  # only directions count
    plain = SparsityRegularizationNet(16, 12, steps=3, l1=0.1)
    with torch.no_grad():
        plain.dictionary.weight.copy_(srn.dictionary.weight)
    assert not torch.allclose(plain.reconstruct(code), before, atol=1e-3)


def test_scale_invariant_sparsity_loss_cannot_be_lowered_by_shrinking_h():
    from sparsegan.params import SrnParams
    torch.manual_seed(0)
    h = torch.randn(4, 16, 8, 8)
    losses = {}
    for invariant in (False, True):
        torch.manual_seed(1)
        det = ReconstructionDetector(CONFIGS["sparse_gan"], SMALL, ModelParams(base_channels=BASE),
                                     TrainParams(), SrnParams(scale_invariant=invariant))
        losses[invariant] = [float(det.sparsity_loss(h * k)) for k in (1.0, 0.1)]
    assert losses[False][1] < 0.05 * losses[False][0]  # plain L_sp: a 10x smaller H, ~100x less
    assert losses[True][1] == pytest.approx(losses[True][0], rel=1e-4)  # invariant: unchanged


def test_train_step_lets_l_sp_reach_the_encoder():
    # lambda_re = lambda_adv = 0: in the generator step only L_sp can give G_en a nonzero gradient
    det = make_detector("sparse_gan", lambda_re=0.0, lambda_adv=0.0, lambda_sp=50.0)
    losses = det.train_step(layered_batch(4), "generator")
    assert losses["sp"] > 0
    for conv in (m for m in det.encoder.modules() if isinstance(m, nn.Conv2d)):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in det.decoder.parameters())


def test_autoencoder_has_no_srn_and_no_discriminator():
    det = make_detector("autoencoder")
    assert det.srn is None and det.discriminator is None
    losses = det.train_step(layered_batch(4), "generator")
    assert set(losses) == {"re", "g"}
    gan = make_detector("sparse_gan")
    assert set(gan.train_step(layered_batch(4), "generator")) == {"d", "re", "adv", "sp", "g"}


@pytest.mark.parametrize("model", ["autoencoder", "pix2pix", "sparse_gan"])
def test_scores_compute_h_re_with_the_same_encoder_module(model):
    det = make_detector(model).eval()
    inputs: list[torch.Tensor] = []
    handle = det.encoder.register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
    x = layered_batch(3)
    scores = score_batch(det, x)
    handle.remove()
    assert set(scores) == {"image", "latent"}  # both levels from one pass
    latent, image = scores["latent"], scores["image"]
    assert len(inputs) == 2 and torch.equal(inputs[0], x)
    # H_re = E(I_re) with E = G_en: the second call reads the reconstruction
    assert torch.equal(inputs[1], latent.reconstruction)
    with torch.no_grad():
        expected = (det.encoder(x) - det.encoder(latent.reconstruction)).flatten(1).norm(dim=1)
    torch.testing.assert_close(latent.score, expected)
    assert set(latent.maps) == {"difference", "aam", "aam_residual"}
    torch.testing.assert_close(image.score, (x - image.reconstruction).square().flatten(1).mean(1))
    assert set(image.maps) == {"difference"}
    assert torch.equal(image.reconstruction, latent.reconstruction)
    assert latent.score.shape == image.score.shape == (3,)


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_there_is_no_separate_encoder_parameter_set(model):
    det = make_detector(model)
    total = _count(det)
    parts = _count(det.encoder) + _count(det.decoder) + _count(det.discriminator) + _count(det.srn)
    assert total == parts
    assert {name for name, _ in det.named_children()} <= {"encoder", "decoder", "discriminator",
                                                         "srn"}
    disc_modules = set(det.discriminator.modules()) if det.discriminator is not None else set()
    encoders = [m for m in det.modules() if isinstance(m, Encoder) and m not in disc_modules]
    assert encoders == [det.encoder]
    # the generator optimizer trains exactly G_en + G_de (+ SRN), each parameter once
    g_ids = [id(p) for group in det.optimizers()["generator"].param_groups for p in group["params"]]
    expected = {id(p) for m in (det.encoder, det.decoder, det.srn) if m is not None
                for p in m.parameters()}
    assert len(g_ids) == len(set(g_ids)) and set(g_ids) == expected


# ------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("model", ["autoencoder", "sparse_gan"])
def test_training_steps_lower_reconstruction_loss_on_a_fixed_batch(model):
    det = make_detector(model).train()
    x = layered_batch(8)
    re = [det.train_step(x, "generator")["re"] for _ in range(30)]
    assert all(math.isfinite(v) for v in re)
    assert re[-1] < 0.7 * re[0], re
    assert np.mean(re[-5:]) < np.mean(re[:5]), re


def test_lr_schedule_is_pix2pix_constant_then_linear_decay():
    f = lr_schedule(30, 0.5)  # 15 epochs at train.lr, then 15 falling to 1/16 of it
    assert [f(e) for e in range(15)] == [1.0] * 15
    assert f(15) == pytest.approx(15 / 16) and f(29) == pytest.approx(1 / 16)
    assert all(f(e) - f(e + 1) == pytest.approx(1 / 16) for e in range(14, 29))
    assert [lr_schedule(4, 0.0)(e) for e in range(4)] == [1.0] * 4  # 0: constant


def test_schedulers_step_every_optimizer_of_a_model():
    det = make_detector("sparse_gan", epochs=4, lr=0.01, lr_decay=0.5).train()
    lrs, x = [], layered_batch(4)
    for _ in range(4):  # an "epoch" of one step, then the loop's per-epoch scheduler step
        lrs.append({k: o.param_groups[0]["lr"] for k, o in det.optimizers().items()})
        det.train_step(x, "generator")
        for sched in det.schedulers().values():
            sched.step()
    assert [r["generator"] for r in lrs] == pytest.approx([0.01, 0.01, 0.01 * 2 / 3, 0.01 / 3])
    assert [r["discriminator"] for r in lrs] == [r["generator"] for r in lrs]


def test_optimizers_are_built_on_first_use_once_and_the_schedulers_drive_them():
    det = make_detector("sparse_gan")
    assert det._training is None  # scoring never builds them (no torch._dynamo import)
    with torch.no_grad():
        score_batch(det.eval(), layered_batch(2))
    assert det._training is None
    opts = det.optimizers()
    assert set(opts) == {"generator", "discriminator"} and det.optimizers() is opts
    assert [s.optimizer for s in det.schedulers().values()] == list(opts.values())


def _train_and_score(seed: int) -> torch.Tensor:
    det = make_detector("sparse_gan", seed=seed).train()
    x = layered_batch(8)
    for _ in range(3):
        det.train_step(x, "generator")
    det.eval()
    return score_batch(det, layered_batch(4, seed=1))["latent"].score


def test_two_cpu_runs_with_the_same_seed_give_identical_scores():
    first, second = _train_and_score(0), _train_and_score(0)
    assert torch.equal(first, second)
    assert not torch.equal(first, _train_and_score(1))  # and the seed does matter


# ---------------------------------------------------------------------------- scores and the AAM

def test_aam_is_highest_where_the_latent_residual_is():
    c, hw, size = 4, 8, 64
    g = torch.Generator().manual_seed(0)
    h_in = torch.rand(1, c, hw, hw, generator=g) + 0.5
    h_re = h_in.clone()
    c0, (r, q) = 2, (5, 2)  # channel and cell of the anomaly
    h_in[0, c0] = 1.0
    h_re[0, c0] = 1.0
    h_in[0, c0, r, q] += 10.0  # bump: GAP(H_in[c0]) - GAP(H_re[c0]) = 10 / 64
    h_in[0, 0, 1, 6] += 100.0  # a far larger peak on an unchanged channel: weight 0, must not show
    h_re[0, 0, 1, 6] += 100.0
    aam = anomaly_activation_map(h_in, h_re, size)
    assert aam.shape == (1, 1, size, size)
    assert float(aam.min()) == 0.0 and float(aam.max()) == 1.0
    assert float(aam.min()) >= 0.0 and float(aam.max()) <= 1.0
    idx = int(aam.flatten().argmax())
    row, col = divmod(idx, size)
    scale = size // hw
    assert r * scale <= row < (r + 1) * scale and q * scale <= col < (q + 1) * scale, (row, col)


def test_residual_map_is_highest_where_the_residual_is_and_the_paper_aam_where_h_in_is():
    c, hw, size = 4, 8, 64
    g = torch.Generator().manual_seed(0)
    h_in = torch.rand(1, c, hw, hw, generator=g) + 0.5
    h_re = h_in.clone()
    c0, strong, changed = 1, (1, 1), (6, 5)
    h_in[0, c0], h_re[0, c0] = 1.0, 1.0
    h_in[0, c0, strong[0], strong[1]] += 20.0  # a strong response that reconstruction keeps
    h_re[0, c0, strong[0], strong[1]] += 20.0
    h_in[0, c0, changed[0], changed[1]] += 5.0  # the residual: weight W_aam[c0] = 5 / 64
    scale = size // hw

    def peak(m: torch.Tensor) -> tuple[int, int]:
        row, col = divmod(int(m.flatten().argmax()), size)
        return row // scale, col // scale

    residual = residual_activation_map(h_in, h_re, size)
    assert residual.shape == (1, 1, size, size)
    assert float(residual.min()) == 0.0 and float(residual.max()) == 1.0
    assert peak(residual) == changed
    assert peak(anomaly_activation_map(h_in, h_re, size)) == strong  # eq. 8 x H_in: the response


def test_latent_anomaly_score_is_the_l2_norm_of_the_flattened_difference():
    latent = torch.tensor([[[[3.0, 0.0]], [[0.0, 1.0]]],
                           [[[1.0, 1.0]], [[1.0, 1.0]]]])  # (2, 2, 1, 2)
    latent_re = torch.tensor([[[[0.0, 0.0]], [[4.0, 1.0]]],
                              [[[0.0, 0.0]], [[0.0, 0.0]]]])
    score = latent_anomaly_score(latent, latent_re)
    torch.testing.assert_close(score, torch.tensor([5.0, 2.0]))  # sqrt(9+16), sqrt(4 * 1)
    by_hand = torch.linalg.norm((latent - latent_re).flatten(1), dim=1)
    torch.testing.assert_close(score, by_hand)


def test_image_anomaly_score_is_the_mean_squared_difference():
    image = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    recon = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[1.0, -1.0], [1.0, -1.0]]]])
    score = image_anomaly_score(image, recon)
    torch.testing.assert_close(score, torch.tensor([2.25 / 4, 1.0]))


def test_discriminator_loss_is_zero_for_a_perfect_d_and_log2_at_chance():
    big = torch.full((5,), 40.0)
    assert float(discriminator_loss(big, -big)) < 1e-12
    zero = torch.zeros(5)
    assert float(discriminator_loss(zero, zero)) == pytest.approx(math.log(2), rel=1e-6)
    assert float(discriminator_loss(-big, big)) > 10  # and large for a fooled D


def test_model_file_rebuilds_its_detector_whatever_the_current_params(tmp_path):
    """model.pt describes its architecture, model and seed: loading it needs no params (another
    width or latent size in params.yaml changes nothing), and it holds no scoring knob (those
    come from params.score when scoring)."""
    from sparsegan.models import build_detector
    from sparsegan.params import AnoganParams, Params
    from sparsegan.checkpoint import load_trained, model_file

    trained = Params(model=ModelParams(base_channels=4), anogan=AnoganParams(latent_dim=8))
    torch.manual_seed(0)
    detector = build_detector("anogan", trained, 32)
    (tmp_path / "anogan").mkdir()
    torch.save(model_file("anogan", 7, trained, 32, "x", detector.state_dict(),
                          {"source": "folder", "n_train": 10}),
               tmp_path / "anogan" / "model.pt")
    m = load_trained(tmp_path / "anogan", model="anogan")
    assert (m.model, m.seed, m.image_size, m.data) == ("anogan", 7, 32,
                                                       {"source": "folder", "n_train": 10})
    assert m.params.model.base_channels == 4 and m.params.anogan.latent_dim == 8
    for a, b in zip(m.detector.state_dict().values(), detector.state_dict().values()):
        assert torch.equal(a, b)
    stored = torch.load(tmp_path / "anogan" / "model.pt", weights_only=True)
    assert stored["format"] == 5 and stored["name"] == "anogan" and "score" not in stored["params"]
    assert "runtime" not in stored["params"]  # where it ran is not what it learnt
