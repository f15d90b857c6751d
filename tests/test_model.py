"""Behaviour of the Diffold model: interface, masking, symmetry, determinism, training.

Symmetry, as tested here (the denoiser is AF3-style, not rotation-equivariant by design):

- the training loss is exactly invariant to translating the native (same RNG draws);
- it depends on the native's orientation only through the random augmentation rotation:
  rotating the native by Q and the augmentation by Q^T gives the same loss terms, and the
  augmentation draws uniformly random proper rotations;
- the denoiser is exactly translation-equivariant, D(x + t) = D(x) + t;
- the loss functions themselves are invariant to rigid motions of target and prediction.
"""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from pipeline.data.features import ATOM_NAMES, FEATURE_KEYS
from pipeline.errors import ConfigError
from pipeline.model import Diffold, ModelConfig, build_model, count_parameters, flops_per_step
from pipeline.metrics import rmsd, superimpose
from pipeline.model import losses
from pipeline.model.diffold import TrainingNoise
from pipeline.model.diffusion import random_rotations, rigid_motion
from pipeline.model.layers import TriangleMultiplication, pairwise_distances

N_ATOMS = len(ATOM_NAMES)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def tiny_config(**overrides) -> ModelConfig:
    """A model small enough for many forward passes in a test."""
    fields = dict(
        d_single=32, d_pair=16, n_blocks=2, n_heads=4, diffusion_d_model=32,
        diffusion_n_blocks=2, diffusion_n_heads=4, n_diffusion_samples=2, dropout=0.0,
        plddt_bins=10, distogram_bins=16, n_steps=4,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def make_model(seed: int = 0, **overrides) -> Diffold:
    torch.manual_seed(seed)
    return build_model(tiny_config(**overrides))


def helix(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, A, 3) coordinates in A along an A-form-like helix (C3' rise 2.8 A, twist 32.7 deg)."""
    i = torch.arange(n, dtype=torch.float32)
    theta = i * math.radians(32.7)
    c3 = torch.stack([8.7 * torch.cos(theta), 8.7 * torch.sin(theta), 2.8 * i], dim=-1)
    offsets = torch.tensor(
        [[2.0, 1.0, 1.0], [0.8, 0.9, 0.2], [0.0, 0.0, 0.0], [-0.5, 1.6, -0.7], [-1.5, 2.2, -1.0]]
    )
    return c3[:, None] + offsets + 0.3 * torch.randn(n, N_ATOMS, 3, generator=generator)


def make_batch(lengths: list[int], seed: int = 0, pad_to: int | None = None) -> dict:
    """A padded batch following the data contract; padding holds junk that must not matter."""
    g = torch.Generator().manual_seed(seed)
    b, length = len(lengths), max(pad_to or 0, max(lengths))
    coords = torch.full((b, length, N_ATOMS, 3), float("nan"))  # junk at padding
    atom_mask = torch.zeros(b, length, N_ATOMS, dtype=torch.bool)
    aatype = torch.full((b, length), -1)  # an out-of-vocabulary pad value
    for i, n in enumerate(lengths):
        aatype[i, :n] = torch.randint(0, 5, (n,), generator=g)
        coords[i, :n] = helix(n, g)
        atom_mask[i, :n] = True
    residue_mask = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    return {
        "aatype": aatype,
        "residue_index": torch.arange(length).repeat(b, 1) + 1,
        "chain_index": torch.zeros(b, length, dtype=torch.long),
        "residue_mask": residue_mask,
        "coords": coords,
        "atom_mask": atom_mask,
        "lengths": torch.tensor(lengths),
        "names": [f"s{i}" for i in range(b)],
    }


def single(batch: dict, i: int) -> dict:
    """Row ``i`` of a batch, cropped to its own length (no padding)."""
    n = int(batch["lengths"][i])
    out = {k: v[i : i + 1, :n] for k, v in batch.items() if k not in ("lengths", "names")}
    out["lengths"] = batch["lengths"][i : i + 1]
    out["names"] = [batch["names"][i]]
    return out


def features(batch: dict) -> dict:
    return {k: batch[k] for k in FEATURE_KEYS}


def slice_noise(noise: TrainingNoise, i: int, n: int) -> TrainingNoise:
    return TrainingNoise(
        sigma=noise.sigma[i : i + 1],
        rotation=noise.rotation[i : i + 1],
        translation=noise.translation[i : i + 1],
        eps=noise.eps[i : i + 1, :, :n],
    )


def assert_terms_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------- interface
def test_forward_returns_differentiable_loss_and_detached_terms():
    model = make_model()
    out = model(make_batch([9, 6]))
    assert out["loss"].shape == () and out["loss"].dtype == torch.float32
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
    assert set(out["terms"]) == {"diffusion", "smooth_lddt", "distogram", "plddt"}
    for value in out["terms"].values():
        assert value.shape == () and not value.requires_grad and torch.isfinite(value)
    weights = dataclasses.asdict(model.cfg.loss)
    expected = sum(weights[k] * v for k, v in out["terms"].items())
    torch.testing.assert_close(out["loss"].detach(), expected)
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name


def test_distogram_term_absent_when_disabled():
    model = make_model(distogram=False)
    out = model(make_batch([7]))
    assert set(out["terms"]) == {"diffusion", "smooth_lddt", "plddt"}
    assert not any(name.startswith("distogram") for name, _ in model.named_parameters())


def test_sample_shapes_ranges_and_zero_padding():
    model = make_model()
    batch = make_batch([8, 5])
    out = model.sample(features(batch), n_samples=3, generator=torch.Generator().manual_seed(1))
    assert out["coords"].shape == (2, 3, 8, N_ATOMS, 3) and out["coords"].dtype == torch.float32
    assert out["plddt"].shape == (2, 3, 8)
    assert torch.isfinite(out["coords"]).all()
    assert (out["plddt"] >= 0).all() and (out["plddt"] <= 100).all()
    assert (out["coords"][1, :, 5:] == 0).all() and (out["plddt"][1, :, 5:] == 0).all()
    assert model.training, "sample() must restore training mode"


def test_sample_refuses_native_coordinates():
    model = make_model()
    batch = make_batch([5])
    with pytest.raises(ValueError, match="coords"):
        model.sample({**features(batch), "coords": batch["coords"]})
    with pytest.raises(ValueError, match="residue_mask"):
        model.sample({k: v for k, v in features(batch).items() if k != "residue_mask"})


def test_sampler_is_deterministic_given_generator():
    model = make_model()
    feats = features(make_batch([7, 4]))
    a = model.sample(feats, n_samples=2, generator=torch.Generator().manual_seed(3))
    b = model.sample(feats, n_samples=2, generator=torch.Generator().manual_seed(3))
    c = model.sample(feats, n_samples=2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a["coords"], b["coords"]) and torch.equal(a["plddt"], b["plddt"])
    assert not torch.allclose(a["coords"], c["coords"])
    # Samples of one call are distinct draws, not copies.
    assert not torch.allclose(a["coords"][:, 0], a["coords"][:, 1])


@pytest.mark.parametrize("n_steps", [2, 4, 10, 20])
def test_sampler_with_an_oracle_denoiser_lands_on_the_native(n_steps):
    """A denoiser that knows the answer (the native, superposed onto its noisy input) must
    lead the sampler to the native in any number of steps. AF3's Euler step overshoots the
    denoised estimate by up to half the noise; with few steps, uncapped, that overshoot
    exceeds the next noise level and grows each step (uncapped, 4 steps ended ~280 A from
    the native and 10 steps 0.9 A)."""
    model = make_model()
    batch = make_batch([12])
    native = batch["coords"][0].reshape(1, 1, -1, 3)

    def oracle(x_noisy, sigma, cond):
        flat = x_noisy.flatten(2, 3)
        return superimpose(native.expand_as(flat), flat).view_as(x_noisy)

    model.diffusion.forward = oracle
    out = model.sample(
        features(batch), n_samples=3, n_steps=n_steps, generator=torch.Generator().manual_seed(0)
    )
    pred = out["coords"][0].flatten(1, 2)
    deviation = rmsd(pred, native[0].expand_as(pred))
    assert (deviation < 0.05).all(), f"{n_steps} steps: RMSD to the native {deviation.tolist()}"


# ------------------------------------------------------------------------------ masking
def test_padding_changes_no_loss_term():
    model = make_model()
    model.eval()  # no dropout; the tiny config has none, this guards against a default change
    batch = make_batch([6, 11])
    batch["atom_mask"][0, 2, 0] = False  # a missing atom must be ignored as well
    batch["coords"][0, 2, 0] = float("nan")
    torch.manual_seed(5)
    noise = model.draw_training_noise(batch)
    with torch.no_grad():
        padded = model.loss_terms(batch, noise)
        alone = model.loss_terms(single(batch, 0), slice_noise(noise, 0, 6))
        other = model.loss_terms(single(batch, 1), slice_noise(noise, 1, 11))
    assert_terms_close({k: v[:1] for k, v in padded.items()}, alone, rtol=1e-4, atol=1e-5)
    assert_terms_close({k: v[1:] for k, v in padded.items()}, other, rtol=1e-4, atol=1e-5)


def test_padding_changes_no_sample():
    model = make_model()
    batch = make_batch([6, 11])
    padded = model.sample(features(batch), n_samples=2, generator=torch.Generator().manual_seed(2))
    alone = model.sample(
        features(single(batch, 0)), n_samples=2, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(padded["coords"][:1, :, :6], alone["coords"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(padded["plddt"][:1, :, :6], alone["plddt"], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("lengths", [[1], [2], [3], [1, 2, 3]])
def test_short_chains_give_finite_losses_gradients_and_samples(lengths):
    model = make_model()
    batch = make_batch(lengths)
    out = model(batch)
    assert all(torch.isfinite(v) for v in out["terms"].values())
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    pred = model.sample(features(batch), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(pred["coords"]).all() and torch.isfinite(pred["plddt"]).all()


@pytest.mark.parametrize("outgoing", [True, False])
def test_triangle_multiplication_follows_the_published_update(outgoing):
    """The channel-first batched product equals AF2 Algorithms 11/12 written out with einsum
    on channel-last tensors (values and gradients), and padding pairs do not enter the sum."""
    torch.manual_seed(0)
    module = TriangleMultiplication(8, outgoing=outgoing)
    z = torch.randn(2, 7, 7, 8, requires_grad=True)
    pair_mask = torch.ones(2, 7, 7, dtype=torch.bool)
    pair_mask[1, 5:], pair_mask[1, :, 5:] = False, False

    def published(z):
        x = module.norm_in(z)
        a, a_gate, b, b_gate = torch.nn.functional.linear(x, module.proj.weight).chunk(4, -1)
        m = pair_mask[..., None].float()
        a, b = a * torch.sigmoid(a_gate) * m, b * torch.sigmoid(b_gate) * m
        spec = "bikc,bjkc->bijc" if outgoing else "bkic,bkjc->bijc"
        t = torch.einsum(spec, a, b)
        return torch.sigmoid(module.gate(x)) * module.out(module.norm_out(t))

    ours, reference = module(z, pair_mask), published(z)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    (grad_ours,) = torch.autograd.grad(ours.square().sum(), z)
    (grad_ref,) = torch.autograd.grad(reference.square().sum(), z)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-5)
    # Junk in padding pairs changes nothing at real pairs.
    junk = z.detach().clone()
    junk[1, 5:], junk[1, :, 5:] = 1e3, -1e3
    torch.testing.assert_close(module(junk, pair_mask)[1, :5, :5], ours[1, :5, :5].detach())


# ----------------------------------------------------------------------------- symmetry
def test_loss_is_invariant_to_translating_the_native():
    model = make_model()
    batch = make_batch([9, 7])
    moved = {**batch, "coords": batch["coords"] + torch.tensor([30.0, -12.0, 7.0])}
    torch.manual_seed(11)
    a = model(batch)["terms"]
    torch.manual_seed(11)
    b = model(moved)["terms"]
    assert_terms_close(a, b, rtol=1e-4, atol=1e-5)


def test_loss_depends_on_native_orientation_only_through_augmentation():
    model = make_model()
    batch = make_batch([9, 7])
    q = random_rotations((), generator=torch.Generator().manual_seed(9))
    moved = {**batch, "coords": batch["coords"] @ q.T + torch.tensor([3.0, 1.0, -2.0])}
    torch.manual_seed(12)
    noise = model.draw_training_noise(batch)
    # The augmentation rotates the centred native by R; with the native rotated by Q, the
    # rotation R Q^T gives the denoiser exactly the same input.
    compensated = dataclasses.replace(noise, rotation=noise.rotation @ q.T)
    with torch.no_grad():
        a = model.loss_terms(batch, noise)
        b = model.loss_terms(moved, compensated)
        c = model.loss_terms(moved, noise)
    assert_terms_close(a, b, rtol=1e-4, atol=1e-4)
    # Sanity check that the test has teeth: without compensation the denoiser sees another pose.
    assert not torch.allclose(a["diffusion"], c["diffusion"], rtol=1e-3)


def test_augmentation_rotations_are_proper_and_uniform():
    r = random_rotations((4000,), generator=torch.Generator().manual_seed(0))
    eye = torch.eye(3).expand(4000, 3, 3)
    torch.testing.assert_close(r @ r.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(4000), atol=1e-5, rtol=0)
    # Haar measure: every matrix entry has mean 0 and variance 1/3.
    assert r.mean(0).abs().max() < 0.05
    torch.testing.assert_close(r.var(0), torch.full((3, 3), 1 / 3), atol=0.03, rtol=0)


def test_denoiser_is_translation_equivariant():
    model = make_model()
    batch = make_batch([8, 5])
    mask = batch["residue_mask"]
    with torch.no_grad():
        s_inputs, s, z = model.trunk(features(batch))
        cond = model.diffusion.condition(s_inputs, s, z, mask)
        x = 10 * torch.randn(2, 3, 8, N_ATOMS, 3)
        sigma = torch.tensor([[0.5, 4.0, 40.0], [1.0, 16.0, 200.0]])
        shift = torch.tensor([25.0, -40.0, 3.0])
        d0 = model.diffusion(x, sigma, cond)
        d1 = model.diffusion(x + shift, sigma, cond)
    real = mask[:, None, :, None, None]
    torch.testing.assert_close((d1 - shift) * real, d0 * real, atol=2e-4, rtol=1e-4)


def test_loss_functions_are_invariant_to_rigid_motions():
    g = torch.Generator().manual_seed(0)
    target = helix(12, g)[None]  # (1, L, A, 3)
    pred = (target + 0.8 * torch.randn(target.shape, generator=g))[:, None]  # (1, 1, L, A, 3)
    mask = torch.ones(1, 12, N_ATOMS, dtype=torch.bool)
    mask[0, 3, 1] = False
    sigma = torch.tensor([[2.0]])
    q = random_rotations((), generator=g)
    moved = target @ q.T + torch.tensor([5.0, -3.0, 8.0])
    mse = losses.aligned_mse(pred, target[:, None], mask, sigma, 16.0)
    torch.testing.assert_close(losses.aligned_mse(pred, moved[:, None], mask, sigma, 16.0), mse)
    slddt = losses.smooth_lddt_loss(pred, target, mask, 30.0)
    torch.testing.assert_close(losses.smooth_lddt_loss(pred, moved, mask, 30.0), slddt)
    torch.testing.assert_close(
        losses.smooth_lddt_loss(pred @ q.T, target, mask, 30.0), slddt, atol=1e-5, rtol=1e-5
    )
    # A rigidly moved copy of the target is a perfect prediction for the aligned MSE; smooth
    # lDDT of a perfect prediction is 1 - mean(sigmoid(thresholds)) (sigmoid(0.5) < 1).
    perfect = moved[:, None]
    assert losses.aligned_mse(perfect, target[:, None], mask, sigma, 16.0).item() < 1e-8
    floor = 1 - sum(torch.sigmoid(torch.tensor(t)) for t in losses.LDDT_THRESHOLDS) / 4
    torch.testing.assert_close(losses.smooth_lddt_loss(perfect, target, mask, 30.0)[0, 0], floor)
    # A mirror image cannot be aligned by a proper rotation: its aligned MSE stays large.
    assert losses.aligned_mse(-perfect, target[:, None], mask, sigma, 16.0).item() > 1.0


def test_smooth_lddt_in_chunks_matches_one_pass():
    g = torch.Generator().manual_seed(2)
    target = torch.stack([helix(9, g), helix(9, g)])
    mask = torch.ones(2, 9, N_ATOMS, dtype=torch.bool)
    mask[1, 6:] = False
    base = target[:, None] + 2 * torch.randn(2, 5, 9, N_ATOMS, 3, generator=g)
    values, grads = [], []
    for max_chunk in (2**26, 2 * 45 * 45):  # one pass; chunks of one sample (recomputed)
        pred = base.clone().requires_grad_()
        value = losses.smooth_lddt_loss(pred, target, mask, 30.0, max_chunk_elements=max_chunk)
        value.sum().backward()
        values.append(value.detach())
        grads.append(pred.grad)
    torch.testing.assert_close(values[1], values[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_pairwise_distances_are_precise_with_finite_gradients():
    g = torch.Generator().manual_seed(0)
    x = (80 + 30 * torch.randn(3, 40, 3, generator=g)).requires_grad_()
    d = pairwise_distances(x)
    exact = (x.double()[:, :, None] - x.double()[:, None, :]).norm(dim=-1)
    off_diagonal = ~torch.eye(40, dtype=torch.bool)
    assert (d.double() - exact)[:, off_diagonal].abs().max() < 1e-4  # A, at ~100 A from 0
    assert d.diagonal(dim1=-2, dim2=-1).max() <= 1.1e-3
    d.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_masked_atoms_do_not_change_losses():
    g = torch.Generator().manual_seed(1)
    target = helix(10, g)[None]
    pred = (target + torch.randn(target.shape, generator=g))[:, None]
    mask = torch.ones(1, 10, N_ATOMS, dtype=torch.bool)
    mask[0, 4] = False
    sigma = torch.tensor([[3.0]])
    junk_pred, junk_target = pred.clone().requires_grad_(), target.clone()
    with torch.no_grad():
        junk_pred[0, 0, 4] += 100.0
        junk_target[0, 4] = float("nan")
    torch.testing.assert_close(
        losses.aligned_mse(junk_pred, junk_target[:, None], mask, sigma, 16.0),
        losses.aligned_mse(pred, target[:, None], mask, sigma, 16.0),
    )
    junk_slddt = losses.smooth_lddt_loss(junk_pred, junk_target, mask, 30.0)
    torch.testing.assert_close(junk_slddt, losses.smooth_lddt_loss(pred, target, mask, 30.0))
    junk_slddt.sum().backward()
    assert torch.isfinite(junk_pred.grad).all() and (junk_pred.grad[0, 0, 4] == 0).all()


# ----------------------------------------------------------------------- training/state
def test_training_lowers_the_loss_on_a_fixed_batch():
    model = make_model(seed=1)
    batch = make_batch([10, 8], seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_with_fixed_draws() -> torch.Tensor:
        torch.manual_seed(0)  # the same noise every step: a fixed objective
        return model(batch)["loss"]

    with torch.no_grad():
        before = loss_with_fixed_draws().item()
    for _ in range(40):
        optimizer.zero_grad(set_to_none=True)
        loss_with_fixed_draws().backward()
        optimizer.step()
    with torch.no_grad():
        after = loss_with_fixed_draws().item()
    assert after < 0.6 * before, (before, after)


def test_state_dict_round_trip_gives_identical_outputs():
    model = make_model(seed=0)
    batch = make_batch([7, 5])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(batch)["loss"].backward()
    optimizer.step()  # move the weights off their initial values
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = make_model(seed=123)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for m in (model, restored):
        m.eval()
    torch.manual_seed(4)
    a = model(batch)
    torch.manual_seed(4)
    b = restored(batch)
    assert torch.equal(a["loss"], b["loss"])
    sa = model.sample(features(batch), generator=torch.Generator().manual_seed(0))
    sb = restored.sample(features(batch), generator=torch.Generator().manual_seed(0))
    assert torch.equal(sa["coords"], sb["coords"]) and torch.equal(sa["plddt"], sb["plddt"])


def test_activation_checkpointing_gives_the_same_gradients():
    # With dropout on, this also checks that recomputation replays the same dropout masks.
    plain = make_model(seed=0, dropout=0.2)
    ckpt = build_model(dataclasses.replace(plain.cfg, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    batch = make_batch([8, 6])
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(7)
        loss = model(batch)["loss"]
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_forward_and_sample_under_bf16_autocast():
    model = make_model()
    batch = make_batch([9, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        pred = model.sample(features(batch), generator=torch.Generator().manual_seed(0))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert pred["coords"].dtype == torch.float32 and torch.isfinite(pred["coords"]).all()


def test_attention_masks_are_dense_in_their_last_dimension(monkeypatch):
    """Every attention call (trunk, diffusion, confidence head; training and sampling) hands
    SDPA a mask whose last dimension has stride 1. The fused CUDA kernels require it; a
    permuted pair bias made SDPA fall back to its math path, with no error, for all of the
    model's attention (seen in an H100 profile: no attention kernel at all)."""
    import torch.nn.functional as F

    from pipeline.model import layers

    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        seen.append((tuple(attn_mask.shape), attn_mask.stride(), attn_mask.dtype, q.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", recording)
    model = make_model(confidence_blocks=2)
    batch = make_batch([9, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(batch)["loss"].backward()
        model.sample(features(batch), n_samples=2, generator=torch.Generator().manual_seed(0))
    cfg = model.cfg
    per_pass = cfg.n_blocks + cfg.diffusion_n_blocks + cfg.confidence_blocks
    assert len(seen) >= 2 * per_pass
    for shape, stride, mask_dtype, q_dtype in seen:
        assert stride[-1] == 1 or shape[-1] == 1, (shape, stride)
        assert mask_dtype == q_dtype == torch.bfloat16, (shape, mask_dtype, q_dtype)


def test_coordinates_stay_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    x = 40 * torch.randn(2, 9, N_ATOMS, 3, generator=g)
    rot = random_rotations((2, 3), generator=g)
    shift = torch.randn(2, 3, 3, generator=g)
    expected = rigid_motion(x, rot, shift)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moved = rigid_motion(x, rot, shift)
    assert moved.dtype == torch.float32
    torch.testing.assert_close(moved, expected)
    # Distances are kept (the rotation is proper and applied in float32).
    torch.testing.assert_close(
        pairwise_distances(moved[0, 1].flatten(0, 1)), pairwise_distances(x[0].flatten(0, 1)),
        atol=1e-4, rtol=1e-5,
    )


def test_flops_and_parameter_count():
    model = make_model()
    batch = make_batch([8])
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) > 10_000
    model(batch)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = torch.get_rng_state()
    flops = flops_per_step(model, batch)
    assert torch.equal(torch.get_rng_state(), state)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), f"flops_per_step changed the gradient of {name}"
    # More residues, more work: the pair stack grows at least linearly.
    assert flops > 0 and flops_per_step(model, make_batch([16])) > 2 * flops


# --------------------------------------------------------------------------------- config
def test_default_config_is_consistent():
    assert ModelConfig().validate() == []


def test_validate_names_each_problem():
    cfg = ModelConfig(d_single=128, n_heads=5, sigma_min=10.0, sigma_max=1.0)
    problems = cfg.validate()
    assert "model.n_heads: must divide model.d_single (128), got 5" in problems
    assert any(p.startswith("model.sigma_min:") for p in problems)
    with pytest.raises(ConfigError, match="model.n_heads"):
        build_model(cfg)
