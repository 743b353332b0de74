"""Each loss against a hand computation."""
import math

import torch

from training import losses


def test_reconstruction_is_mean_l1() -> None:
    recon = torch.tensor([[0.0, 1.0], [0.5, -1.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert losses.reconstruction(recon, target).item() == (1 + 0 + 0.5 + 2) / 4


def test_structure_is_one_minus_ssim() -> None:
    # Flat images have no variance, so SSIM is its luminance term alone: (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    # with C1 = (0.01 * data range)^2, on the [0, 1] scale ([-1, 1] inputs -> [0, 1]).
    x = torch.full((2, 3, 32, 32), -0.6)  # 0.2 on [0, 1]
    y = torch.full((2, 3, 32, 32), 0.4)  # 0.7
    c1 = 0.01**2
    expected = 1 - (2 * 0.2 * 0.7 + c1) / (0.2**2 + 0.7**2 + c1)
    assert math.isclose(losses.structure(x, y).item(), expected, rel_tol=1e-4)
    z = torch.rand(2, 3, 32, 32) * 2 - 1
    assert abs(losses.structure(z, z).item()) < 1e-5
    # A thin dark line missing from a flat image costs far more in structure than in L1 (its share of the pixels).
    line = torch.zeros(1, 3, 32, 32)
    line[..., 16, 8:24] = -1.0
    flat = torch.zeros(1, 3, 32, 32)
    assert losses.structure(flat, line).item() > 20 * losses.reconstruction(flat, line).item()


def test_zero_sums_both_cross_codes() -> None:
    sep_a_of_b = torch.tensor([1.0, -1.0, 0.0, 2.0])  # mean |.| = 1
    sep_b_of_a = torch.tensor([0.5, -0.5])  # mean |.| = 0.5
    assert losses.zero(sep_a_of_b, sep_b_of_a).item() == 1.5


def test_discriminator_and_adversarial_labels() -> None:
    la, lb = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 3.0])
    sig = lambda v: 1 / (1 + math.exp(-v))
    bce = lambda logit, y: -(y * math.log(sig(logit)) + (1 - y) * math.log(1 - sig(logit)))
    d = (bce(2, 1) + bce(0, 1)) / 2 + (bce(-1, 0) + bce(3, 0)) / 2
    g = (bce(2, 0) + bce(0, 0)) / 2 + (bce(-1, 0) + bce(3, 0)) / 2  # the encoder calls both domains 'b'
    assert math.isclose(losses.discriminator(la, lb).item(), d, rel_tol=1e-6)
    assert math.isclose(losses.adversarial(la, lb).item(), g, rel_tol=1e-6)


def test_three_group_discriminator_and_the_pull_towards_neither() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 3.0]])
    log_softmax = lambda row, k: row[k] - math.log(sum(math.exp(v) for v in row))  # noqa: E731
    rows = logits.tolist()
    d = -(log_softmax(rows[0], 0) + log_softmax(rows[1], 1) + log_softmax(rows[2], 2)) / 3
    assert math.isclose(losses.discriminator_groups(logits, torch.tensor([0, 1, 2])).item(), d, rel_tol=1e-6)
    g = -(log_softmax(rows[0], 2) + log_softmax(rows[1], 2)) / 2  # A's and B's codes called 'neither'
    assert math.isclose(losses.adversarial_towards(logits[:2], 2).item(), g, rel_tol=1e-6)


def test_mask_variant_terms() -> None:
    rgb = torch.full((1, 3, 2, 2), 1.0)
    base = torch.full((1, 3, 2, 2), -1.0)
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    target = torch.zeros(1, 3, 2, 2)
    torch.testing.assert_close(losses.composite(rgb, mask, base), torch.tensor([[[[1.0, -1.0], [0.0, -1.0]]]]).expand(1, 3, 2, 2))
    assert losses.masked_reconstruction(rgb, mask, base, target).item() == (1 + 1 + 0 + 1) / 4
    # over the real image: each pixel costs its mask times the generator's error there (1 everywhere here)
    assert losses.mask_reconstruction(rgb, mask, target).item() == (1 + 0 + 0.5 + 0) / 4
    assert losses.mask_reconstruction(rgb, torch.zeros_like(mask), target).item() == 0.0
    assert losses.mask_sparsity(mask, torch.ones(2, 1, 2, 2)).item() == (0.375 + 1) / 2
    common_t, common = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    sep_t, sep = torch.full((1, 2, 2, 2), 0.5), torch.full((1, 2, 2, 2), -0.5)
    assert losses.code_cycle(common_t, sep_t, common, sep).item() == 2.0
