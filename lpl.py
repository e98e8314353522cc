"""The Latent Perceptual Loss (Berrada et al., ICLR 2025), Eq. (3):

    L_LPL = E_{t, eps, x0} [ delta(sigma_t/alpha_t <= tau)  sum_l  omega_l / C_l  sum_c || rho_lc  (.)  (phi'_lc - phi_hat'_lc) ||^2 ]

    phi_l,  phi_hat_l   decoder features of the true latent z0 and of the estimate z0_hat (Eq. 2), l = 1..L
                        (l = 1 the mid block, then each up block: coarse to fine)
    phi',   phi_hat'    the same, standardised per channel with the statistics of phi_hat ("cross normalisation")
    rho_lc              binary mask that drops the outliers of a channel map
    omega_l = r_1/r_l   depth weight, halving each time the resolution doubles
    C_l                 channels of layer l
    delta, tau          the gate: only low-noise samples (sigma/alpha <= tau) get the loss

and L_tot = L_diff + w_LPL * L_LPL. z0_hat comes from the network through Table 1 (schedules.x0_from_pred).

Where the paper is silent, these choices (each one a constructor argument, each one tested):
- ||.||^2 is averaged over the pixels of a map (masked pixels count as zeros), so a term does not grow with the
  image size; the batch loss is sum over gated samples / batch size: the expectation with delta inside it.
- phi_hat's statistics are detached: with shared statistics the mean cancels and the loss is a per-channel weighted
  MSE, ||phi - phi_hat||^2 / var(phi_hat); a gradient through var(phi_hat) would reward the network for inflating
  the variance of its own features (`norm="separate"`, the ablation, keeps it).
- rho comes from phi_hat by default, as Eq. 3 writes rho(phi_hat); the public reference code takes it from phi
  (`mask_from="target"`): a fixed property of the data, where a mask from the prediction lets the network exclude
  pixels by producing outliers there. We follow the paper and expose both.
- rho: outliers lie outside [q_0.02 - 2 std, q_0.98 + 2 std] of their channel map, the quantiles read from ~4096
  strided pixels (`quantile_samples`: the bounds lie 2 std beyond them, where few pixels are). A closing fills
  outlier specks smaller than its kernel (isolated threshold crossings are detector noise), an opening removes inlier
  islands in outlier regions; kernels are sized for a map at the full resolution of a 256 image and scale with the
  map, to cover the same fraction of the image at every layer and image size (Sec. 4.1).
- tau is scaled by image resolution / 256 (Sec. 4.1). The paper prints omega_l = 2^(-r_l/r_1); we use what its text
  says ("weight them by the inverse of the upscaling factor"): omega_l = r_1 / r_l.

Cost: only gated samples are decoded (`compile=True`: by a decoder compiled once for any gated count), the target
branch and the masks without autograd. Statistics accumulate in float32 with no float32 copy of a map; each term's
backward is its closed form, keeping one map in the features' dtype. Pass sigma_ratio on the CPU: no sync.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("shared", "separate", "target-l2")


# ----------------------------------------------------------------------------------------------------------------
# Normalisation: phi, phi_hat -> phi', phi_hat'
# ----------------------------------------------------------------------------------------------------------------

def channel_stats(phi, eps=1e-6):
    """Per sample and channel mean and std over the pixels of a (N, C, H, W) map, in float32."""
    mean = phi.mean(dim=(2, 3), keepdim=True, dtype=torch.float32)
    centre = mean.to(phi.dtype)  # no float32 copy of a bf16 map: centred on its rounded mean, corrected below
    norm = torch.linalg.vector_norm(phi - centre, dim=(2, 3), keepdim=True, dtype=torch.float32)
    return mean, (norm ** 2 / phi[0, 0].numel() - (mean - centre) ** 2 + eps).sqrt()


def normalize(phi, phi_hat, norm):
    """(a, b, scale) with phi' - phi_hat' = (a - b) / scale. shared (Sec. 3.2): both standardised with phi_hat's
    detached statistics (the mean cancels); separate: each with its own; target-l2: both over the target's L2 norm
    across channels, diffusers' examples/research_projects/lpl norm_type="shared" (not LPIPS: each over its own)."""
    if norm == "shared":
        return phi, phi_hat, channel_stats(phi_hat.detach())[1]
    if norm == "separate":
        (mean, std), (mean_hat, std_hat) = channel_stats(phi), channel_stats(phi_hat)
        return (phi - mean) / std, (phi_hat - mean_hat) / std_hat, 1.0
    length = torch.linalg.vector_norm(phi, dim=1, keepdim=True, dtype=torch.float32) + 1e-6
    return phi / length, phi_hat / length, 1.0


class MaskedSquaredDistance(torch.autograd.Function):
    """sum_c mean_pixels(rho ((a - b) / scale)^2) per sample; a is phi's side (no gradient), b phi_hat's."""
    # The backward is the closed form 2 rho (b - a) / scale^2 / pixels. It keeps that one map, in the maps' dtype,
    # where autograd would keep the float32 difference and the float32 mask.

    @staticmethod
    def forward(ctx, a, b, scale, rho):
        difference = b - a if rho is None else (b - a).mul_(rho)
        weight = torch.as_tensor(scale, dtype=torch.float32) ** -2  # (N, C, 1, 1) or ()
        norm = torch.linalg.vector_norm(difference, dim=(2, 3), keepdim=True, dtype=torch.float32)
        ctx.save_for_backward(difference.mul_(weight))  # in place: rho (b - a) / scale^2
        return (norm ** 2 * weight).sum(dim=(1, 2, 3)) / difference[0, 0].numel()  # (N,)

    @staticmethod
    def backward(ctx, grad):
        (kept,) = ctx.saved_tensors  # rho (b - a) / scale^2 = d term / d b * pixels / 2
        return None, kept * (grad * 2 / kept[0, 0].numel()).view(-1, 1, 1, 1).to(kept.dtype), None, None


# ----------------------------------------------------------------------------------------------------------------
# Outlier masks rho
# ----------------------------------------------------------------------------------------------------------------

def odd_kernel(size):
    """The odd integer kernel nearest below size + 1 (1 means: no morphology at this resolution)."""
    return 2 * int(size // 2) + 1


def morphology(mask, k, erode=False):
    """Dilation (any) or erosion (all) of a bool mask over a k x k window: a k x k max-pool's values."""
    # Separable, k x 1 then 1 x k: 2k reads per pixel, not k^2; no int64 indices (max_pool2d's on CUDA), no float
    # copy. The padding counts for neither, as a max-pool ignores its padding.
    for dim, pad in ((-2, (0, 0, k // 2, k // 2)), (-1, (k // 2, k // 2))) if k > 1 else ():
        windows = F.pad(mask, pad, value=erode).unfold(dim, k, 1)
        mask = windows.all(-1) if erode else windows.any(-1)
    return mask


def outlier_mask(phi, quantile=0.02, margin=2.0, closing=1, opening=1, samples=None):
    """rho: True where a value lies in [q_quantile - margin std, q_(1-quantile) + margin std] of its channel map,
    cleaned by a closing then an opening. (N, C, H, W) -> bool. Quantiles of ~samples pixels per map (None: all)."""
    flat = phi.flatten(2)
    # Every s-th pixel, s = n // samples made odd, so that it walks across the columns of a power-of-two-wide map:
    # a selection among ~samples values instead of n. Every pixel (exact) when n <= samples or samples is None.
    sample = flat[..., ::flat.shape[-1] // (samples or flat.shape[-1]) | 1]
    low, high = (sample.kthvalue(max(1, round(q * sample.shape[-1])), dim=-1).values for q in (quantile, 1 - quantile))
    spread = margin * flat.std(dim=-1).float()  # bounds in float32; a bf16 map's std moves them by < 0.01 std
    rho = (phi >= (low - spread)[..., None, None]) & (phi <= (high + spread)[..., None, None])
    rho = morphology(morphology(rho, closing), closing, erode=True)  # closing
    return morphology(morphology(rho, opening, erode=True), opening)  # opening


# ----------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------

class LatentPerceptualLoss(nn.Module):
    """LPL of Eq. (3). forward(z0_hat, z0, sigma_ratio) -> (loss, stats).

    n_blocks: decoder taps (1 = mid block, 5 = mid + 4 up blocks, the paper's "LPL-5 blocks"); None: all up to 5.
    threshold: tau in sigma/alpha units at 256 px (Fig. 6: best between 3 and 6), scaled by resolution / 256.
    norm: "shared" | "separate" | "target-l2" (see normalize); mask_from: "prediction" | "target" | "none";
    depth_weights: "resolution" (omega_l = r_1/r_l) | "uniform". quantile, margin: rho's bounds, the quantiles read
    from quantile_samples pixels per map (None: all); closing, opening: its kernels for a map of 256 px.
    max_samples: LPL on a random subset of at most this many gated samples, reweighted by gated / chosen so the
    expectation is unchanged (cheaper, noisier; None: all). checkpointing: recompute the prediction branch's
    decoder blocks in the backward pass (less memory). compile: torch.compile decoder_features once.
    """

    def __init__(self, autoencoder, n_blocks=None, threshold=4.0, norm="shared", mask_from="prediction",
                 depth_weights="resolution", quantile=0.02, margin=2.0, quantile_samples=4096, closing=3, opening=5,
                 checkpointing=False, max_samples=None, compile=False):
        super().__init__()
        taps = autoencoder.num_feature_blocks
        n_blocks = min(5, taps) if n_blocks is None else n_blocks
        for name, value, valid, expected in (  # every option checked here: train.py passes its flags through
                ("n_blocks", n_blocks, 1 <= n_blocks <= taps, f"in 1..{taps} for this decoder ({taps} feature taps)"),
                ("threshold", threshold, threshold > 0, "positive"), ("norm", norm, norm in NORMS, f"one of {NORMS}"),
                ("mask_from", mask_from, mask_from in ("prediction", "target", "none"), "prediction, target or none"),
                ("depth_weights", depth_weights, depth_weights in ("resolution", "uniform"), "resolution or uniform"),
                ("quantile", quantile, 0 < quantile < 0.5, "in (0, 0.5)"),
                ("quantile_samples", quantile_samples, quantile_samples is None or quantile_samples >= 1, "None or >0"),
                ("margin, closing and opening", (margin, closing, opening), min(margin, closing, opening) >= 0, ">= 0"),
                ("max_samples", max_samples, max_samples is None or max_samples >= 1, "None or a positive count")):
            if not valid:
                raise ValueError(f"{name} must be {expected}, got {value!r}")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.n_blocks, self.threshold, self.norm, self.mask_from = n_blocks, threshold, norm, mask_from
        self.depth_weights, self.quantile, self.margin, self.closing = depth_weights, quantile, margin, closing
        self.opening, self.quantile_samples, self.max_samples = opening, quantile_samples, max_samples
        self.checkpointing = checkpointing
        self.compiled = torch.compile(autoencoder.decoder_features) if compile else None

    def tau(self, resolution):
        """tau_sigma at this resolution (Sec. 4.1: scaled by the upscaling factor w.r.t. 256)."""
        return self.threshold * resolution / 256

    def gate(self, sigma_ratio, resolution, generator=None):
        """Indices of the samples that get the loss, how many passed delta(sigma/alpha <= tau), and their weight."""
        gated = torch.nonzero(sigma_ratio <= self.tau(resolution)).squeeze(1)
        passed = len(gated)
        if self.max_samples is None or passed <= self.max_samples:
            return gated, passed, 1.0
        chosen = torch.randperm(passed, generator=generator, device=gated.device)[: self.max_samples]
        return gated[chosen], passed, passed / self.max_samples

    def features(self, z0_hat, z0):
        """Eq. (2): phi (without autograd) and phi_hat, coarse to fine; compiled, one graph for any gated count > 1."""
        decode = self.compiled or self.autoencoder.decoder_features
        for z in (z0_hat, z0) if self.compiled else ():
            torch._dynamo.maybe_mark_dynamic(z, 0)
        phi_hat = decode(z0_hat, self.n_blocks, checkpointing=self.checkpointing)
        with torch.no_grad():
            return decode(z0, self.n_blocks), phi_hat

    @torch.no_grad()
    def masks(self, phi, phi_hat):
        """rho of every layer, from phi_hat (Eq. 3) or phi; None each with mask_from="none"."""
        sources = {"prediction": phi_hat, "target": phi, "none": [None] * len(phi)}[self.mask_from]
        scales = [p.shape[-2] / 256 for p in phi]  # kernels cover the same fraction of the image everywhere (4.1)
        return [None if source is None else outlier_mask(source, self.quantile, self.margin, odd_kernel(
            self.closing * scale), odd_kernel(self.opening * scale), self.quantile_samples)
            for source, scale in zip(sources, scales)]

    def layer_terms(self, phi, phi_hat, masks):
        """omega_l / C_l sum_c mean_pixels(rho (phi' - phi_hat')^2) of every layer: a list of (n,) tensors."""
        omegas = [phi[0].shape[-2] / p.shape[-2] if self.depth_weights == "resolution" else 1.0 for p in phi]
        return [omega / p.shape[1] * MaskedSquaredDistance.apply(*normalize(p, p_hat, self.norm), rho)
                for omega, p, p_hat, rho in zip(omegas, phi, phi_hat, masks)]

    def forward(self, z0_hat, z0, sigma_ratio, generator=None):
        batch = z0_hat.shape[0]
        resolution = math.sqrt(z0.shape[-2] * z0.shape[-1]) * self.autoencoder.downsample  # image side (geometric mean)
        gated, passed, weight = self.gate(sigma_ratio, resolution, generator)
        zero = z0_hat.new_zeros((), dtype=torch.float32)
        stats = {"gated_fraction": zero + passed / batch, "decoded_fraction": zero + len(gated) / batch}
        if len(gated) == 0:  # nothing to decode: a zero loss, no decoder call
            stats.update({f"{name}{l}": zero for name in ("layer", "outliers") for l in range(self.n_blocks)})
            return zero, stats
        gated = gated.to(z0_hat.device, non_blocking=True)
        phi, phi_hat = self.features(z0_hat[gated], z0[gated])
        masks = self.masks(phi, phi_hat)
        terms = self.layer_terms(phi, phi_hat, masks)
        loss = weight * torch.stack(terms).sum(dim=0).sum() / batch  # per sample, then over the batch
        stats.update({f"layer{l}": (weight * term.sum() / batch).detach() for l, term in enumerate(terms)})
        stats.update({f"outliers{l}": zero if rho is None else 1 - rho.count_nonzero() / rho.numel()
                      for l, rho in enumerate(masks)})
        return loss, stats
