"""AnoGAN and f-AnoGAN (the latent-search baselines of Table 1) on tiny CPU sizes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from sparsegan.anomaly import anogan_initial_z, anogan_search
from sparsegan.models import build_detector
from sparsegan.models.anogan import AnoGAN
from sparsegan.models.fanogan import FAnoGAN
from sparsegan.models.gan_parts import Generator, frozen, gradient_penalty
from sparsegan.params import (AnoganParams, AnoganSearchParams, FanoganParams, ModelParams, Params,
                              ScoreParams)
from sparsegan.scoring import score_batch

SIZE = 32
MODEL = ModelParams(base_channels=4)  # latent map 8x8x8 at 32x32


def bands(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, 32, 32) smooth "retinas": a bright horizontal band at a random depth on -1."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(SIZE, dtype=torch.float32)[:, None]
    centre = 10 + 12 * torch.rand(n, 1, 1, generator=g)
    image = -1 + 1.2 * torch.exp(-(((rows - centre) / 3.0) ** 2))
    return image.expand(n, SIZE, SIZE)[:, None].clone()


def with_lesion(x: torch.Tensor) -> torch.Tensor:
    """A bright 6x6 lesion in the dark region above every band."""
    out = x.clone()
    out[:, :, 2:8, 12:18] = 1.0
    return out


def anogan(seed: int = 0) -> AnoGAN:
    torch.manual_seed(seed)
    return AnoGAN(SIZE, MODEL, AnoganParams(latent_dim=4))


def ano_score(m: AnoGAN, x: torch.Tensor, **knobs):
    """AnoGAN's score (the latent search, sparsegan.scoring) with search knobs ``knobs``."""
    search = AnoganSearchParams(**{"search_steps": 20, "search_lr": 0.1, **knobs})
    return score_batch(m, x, ScoreParams(anogan=search))["search"]


def search(m: AnoGAN, x: torch.Tensor, steps: int):
    return anogan_search(m.generator, m.discriminator, x, m.p.latent_dim, steps, 0.1, "sample",
                         0.1)


def fanogan(seed: int = 0, **kw) -> FAnoGAN:
    torch.manual_seed(seed)
    return FAnoGAN(SIZE, MODEL, FanoganParams(**{"latent_dim": 4, **kw}))


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(module: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


def fit_generator(generator: Generator, x: torch.Tensor, steps: int = 100) -> float:
    """Make G reproduce the clean images: fixed codes z_i ~ N(0, I), MSE, G in eval mode (its batch
    norm is then the fixed affine that scoring uses). Returns the final MSE."""
    was_training = generator.training
    generator.eval()
    codes = torch.randn(x.shape[0], generator.latent_dim)
    opt = torch.optim.Adam(generator.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = (generator(codes) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    generator.train(was_training)
    return loss.item()


class LinearCritic(nn.Module):
    """D(x) = w . x + b: its gradient is w everywhere, so GP = (||w|| - 1)^2 exactly."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(w.numel(), 1)
        with torch.no_grad():
            self.linear.weight.copy_(w.view(1, -1))
            self.linear.bias.fill_(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)).flatten()


def test_gradient_penalty_equals_hand_value_for_linear_critic():
    w = torch.tensor([3.0, 0.0, 4.0, 0.0]).view(1, 2, 2)  # ||w|| = 5 -> GP = 16
    critic = LinearCritic(w)
    real, fake = torch.randn(6, 1, 2, 2), torch.randn(6, 1, 2, 2)
    alpha = torch.rand(6, 1, 1, 1)
    gp = gradient_penalty(critic, real, fake, alpha)
    assert gp.item() == pytest.approx(16.0, rel=1e-5)
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(16.0, rel=1e-5)
    # create_graph: GP trains the critic, dGP/dw = 2 (||w|| - 1) w / ||w||
    gp.backward()
    expected = 2 * (5.0 - 1) * w.view(1, -1) / 5.0
    torch.testing.assert_close(critic.linear.weight.grad, expected)
    unit = LinearCritic(torch.tensor([0.6, 0.8, 0.0, 0.0]).view(1, 2, 2))
    assert gradient_penalty(unit, real, fake, alpha).item() == pytest.approx(0.0, abs=1e-6)


def test_generator_shapes_and_range():
    g = Generator(SIZE, 4, latent_dim=5)
    out = g(torch.randn(3, 5))
    assert out.shape == (3, 1, SIZE, SIZE)
    assert out.min() >= -1 and out.max() <= 1


def test_frozen_restores_modes_and_flags():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    net.train()
    net[1].eval()
    net[0].bias.requires_grad_(False)
    with frozen(net):
        assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.training and net[0].training and not net[1].training
    assert net[0].weight.requires_grad and not net[0].bias.requires_grad


def test_factory_builds_both():
    params = Params(model=MODEL)
    a, f = build_detector("anogan", params, SIZE), build_detector("fanogan", params, SIZE)
    assert isinstance(a, AnoGAN) and isinstance(f, FAnoGAN)
    assert a.phases() == ["gan"] * params.anogan.epochs
    assert f.phases() == (["gan"] * params.fanogan.epochs
                          + ["encoder"] * params.fanogan.encoder_epochs)
    assert set(a.optimizers()) == {"generator", "discriminator"}
    assert set(f.optimizers()) == {"generator", "critic", "encoder"}


def test_anogan_train_step_updates_g_and_d():
    m = anogan()
    m.train()
    g0, d0 = snapshot(m.generator), snapshot(m.discriminator)
    logs = m.train_step(bands(8), "gan")
    assert set(logs) == {"d", "g"} and all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert not same(m.generator, g0) and not same(m.discriminator, d0)
    assert all(p.requires_grad for p in m.parameters())


def test_anogan_search_lowers_loss_for_every_image():
    m = anogan()
    x = bands(6)
    fit_generator(m.generator, x, steps=50)  # a G whose output depends on z
    m.eval()
    _, after_1, _ = search(m, x, steps=1)
    z, after_20, generated = search(m, x, steps=20)
    assert (after_20 < 0.99 * after_1).all()
    assert z.shape == (6, 4) and generated.shape == x.shape


def test_anogan_search_is_per_image():
    """Each image has its own z: scoring it alone or inside a batch gives the same loss."""
    m = anogan()
    m.eval()
    x = bands(5)
    batched = ano_score(m, x).score
    alone = torch.cat([ano_score(m, x[i:i + 1]).score for i in range(5)])
    torch.testing.assert_close(batched, alone, rtol=1e-3, atol=1e-3)


def test_anogan_score_shapes_no_grad_and_state_restored():
    m = anogan()
    m.train()
    before = snapshot(m)
    x = bands(3)
    with torch.no_grad():
        out = ano_score(m, x)
    assert out.score.shape == (3,)
    assert out.reconstruction.shape == out.maps["difference"].shape == (3, 1, SIZE, SIZE)
    torch.testing.assert_close(out.maps["difference"], (x - out.reconstruction).abs())
    assert m.training and m.generator.training and m.discriminator.training
    assert all(p.requires_grad for p in m.parameters()) and same(m, before)
    with torch.inference_mode():
        torch.testing.assert_close(ano_score(m, x).score, out.score)


def test_anogan_deterministic():
    x = bands(4)
    a, b = anogan(seed=3), anogan(seed=3)
    a.eval(), b.eval()
    s = ano_score(a, x).score
    torch.testing.assert_close(s, ano_score(b, x).score, rtol=0, atol=0)
    torch.testing.assert_close(s, ano_score(a, x).score, rtol=0, atol=0)
    zeros = ano_score(a, x, search_init="zeros").score
    torch.testing.assert_close(zeros, ano_score(a, x, search_init="zeros").score, rtol=0, atol=0)
    assert not torch.equal(zeros, s)  # the knob reaches the search


def test_anogan_score_is_the_search_loss_under_the_score_knobs():
    """score_batch takes every search knob from ``params.score.anogan`` (model.pt holds none), and
    its score is L(z*) = (1 - l) sum |x - G(z*)| + l sum |f(x) - f(G(z*))|."""
    m = anogan()
    x = bands(6)
    fit_generator(m.generator, x, steps=50)  # a G whose output depends on z
    m.eval()
    x = x[:3]
    knobs = AnoganSearchParams(search_steps=7, search_lr=0.05, search_init="sample", weight=0.3)
    out = score_batch(m, x, ScoreParams(anogan=knobs))["search"]
    z, loss, generated = anogan_search(m.generator, m.discriminator, x, 4, 7, 0.05, "sample", 0.3)
    torch.testing.assert_close(out.score, loss, rtol=0, atol=0)
    torch.testing.assert_close(out.reconstruction, generated, rtol=0, atol=0)
    with torch.no_grad():
        g = m.generator(z)
        residual = (x - g).abs().sum(dim=(1, 2, 3))
        features = (m.discriminator(x)[1] - m.discriminator(g)[1]).abs().sum(dim=(1, 2, 3))
    torch.testing.assert_close(generated, g)
    torch.testing.assert_close(out.score, 0.7 * residual + 0.3 * features)
    # each knob reaches the search: changing any one of them changes the score
    for change in ({"search_steps": 8}, {"search_lr": 0.2}, {"search_init": "zeros"},
                   {"weight": 0.1}):
        other = dataclasses.replace(knobs, **change)
        assert not torch.equal(score_batch(m, x, ScoreParams(anogan=other))["search"].score,
                               out.score), change


def test_anogan_initial_z_is_one_fixed_row_for_every_image():
    torch.manual_seed(123)
    z = anogan_initial_z(4, 6, "sample", "cpu")
    torch.manual_seed(456)  # the global RNG plays no part
    assert torch.equal(z, anogan_initial_z(4, 6, "sample", "cpu"))
    assert z.shape == (4, 6) and (z == z[:1]).all() and z.abs().sum() > 0
    assert torch.equal(anogan_initial_z(1, 6, "sample", "cpu"), z[:1])  # whatever the batch
    expected = torch.randn(1, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z[0], expected[0])  # one draw of N(0, I) seeded with 0
    assert torch.equal(anogan_initial_z(3, 6, "zeros", "cpu"), torch.zeros(3, 6))


def test_anogan_lesion_scores_higher_than_clean():
    """G fitted to reproduce the clean bands (fixed codes, MSE): a bright lesion that G cannot
    draw raises every image's score."""
    m = anogan()
    x = bands(8)
    assert fit_generator(m.generator, x) < 0.1
    m.eval()
    clean = ano_score(m, x, search_steps=30).score
    lesion = ano_score(m, with_lesion(x), search_steps=30).score
    assert (lesion > clean + 20).all()


def test_fanogan_generator_updated_every_n_critic_steps():
    m = fanogan(n_critic=3)
    m.train()
    x = bands(6)
    for step in range(1, 7):
        g0, d0 = snapshot(m.generator), snapshot(m.critic)
        logs = m.train_step(x, "gan")
        assert int(m.critic_steps) == step
        assert not same(m.critic, d0)
        g_step = step % 3 == 0
        assert same(m.generator, g0) != g_step
        assert set(logs) == {"d", "gp", "wasserstein", "g"}  # the same keys every step
    # the counter is checkpointed, so a resumed run keeps the schedule
    state = m.state_dict()
    assert int(state["critic_steps"]) == 6
    resumed = fanogan(seed=1, n_critic=3)
    resumed.load_state_dict(state)
    resumed.train()
    g0 = snapshot(resumed.generator)
    resumed.train_step(x, "gan")
    assert int(resumed.critic_steps) == 7 and same(resumed.generator, g0)
    resumed.train_step(x, "gan"), resumed.train_step(x, "gan")
    assert int(resumed.critic_steps) == 9 and not same(resumed.generator, g0)


def test_fanogan_encoder_training_lowers_izif_with_g_and_d_fixed():
    m = fanogan(lr=2e-3)
    x = bands(8)
    fit_generator(m.generator, x)  # a G whose output depends on z, as after the GAN phase
    m.train()
    g0, d0 = snapshot(m.generator), snapshot(m.critic)
    g_buffers = [b.clone() for b in m.generator.buffers()]
    losses = [m.train_step(x, "encoder")["izif"] for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    assert same(m.generator, g0) and same(m.critic, d0)
    assert all(torch.equal(a, b) for a, b in zip(m.generator.buffers(), g_buffers))  # eval mode
    assert m.generator.training and all(p.requires_grad for p in m.parameters())


def test_fanogan_score_is_image_mse_plus_kappa_feature_mse():
    m = fanogan(kappa=2.0)
    m.eval()
    x = bands(3)
    (name, out), = score_batch(m, x).items()
    assert name == "izif" and out.score.shape == (3,)
    assert out.reconstruction.shape == out.maps["difference"].shape == (3, 1, SIZE, SIZE)
    with torch.no_grad():
        rec = m.generator(m.encoder(x))
        feat_x, feat_r = m.critic(x)[1], m.critic(rec)[1]
    image_mse = ((x - rec) ** 2).mean(dim=(1, 2, 3))
    expected = image_mse + 2.0 * ((feat_x - feat_r) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.score, expected)
    torch.testing.assert_close(out.maps["difference"], (x - rec).abs())


def test_fanogan_deterministic():
    x = bands(4)
    scores = []
    for _ in range(2):
        m = fanogan(seed=5)
        m.train()
        torch.manual_seed(7)
        for phase in ("gan", "gan", "encoder"):
            m.train_step(x, phase)
        m.eval()
        scores.append(score_batch(m, x)["izif"].score)
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=0)
