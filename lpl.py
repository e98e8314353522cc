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
- The normalisation statistics of phi_hat are detached. With shared statistics the mean cancels and the loss is a
  per-channel weighted MSE, ||phi - phi_hat||^2 / var(phi_hat); a gradient through var(phi_hat) would reward the
  network for inflating the variance of its own features. (`norm="separate"`, the ablation, keeps the gradient
  through each tensor's own statistics, as LPIPS-style normalisation does.)
- rho is computed from phi_hat by default: Eq. 3 writes rho(phi_hat). The public reference code computes it from
  phi (`mask_from="target"`): a mask from the target is a fixed property of the data, while a mask from the
  prediction lets the network exclude pixels by producing outliers there. We follow the paper and expose both.
- rho: a value is an outlier outside [q_0.02 - 2 std, q_0.98 + 2 std] of its channel map. The inlier mask is then
  cleaned by a morphological closing (fills outlier specks smaller than the kernel: isolated crossings of the
  threshold are treated as detector noise) and an opening (removes inlier islands inside outlier regions). Kernel
  sizes are given for a map at the full resolution of a 256 image and scale with the map's size, so that they
  cover the same fraction of the image at every layer and every image resolution (Sec. 4.1).
- tau is scaled by image resolution / 256 (Sec. 4.1). The paper prints omega_l = 2^(-r_l/r_1); we use what its text
  says ("weight them by the inverse of the upscaling factor"): omega_l = r_1 / r_l.

Cost: only the gated samples are indexed out of the batch and decoded; the target branch runs without autograd;
the decoder is frozen (requires_grad False) and belongs to no optimiser; statistics are float32 under bf16 autocast.
Pass sigma_ratio on the CPU (as train.py does) and the gate costs no host-device synchronisation.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("shared", "separate", "lpips")


# ----------------------------------------------------------------------------------------------------------------
# Normalisation: phi, phi_hat -> phi', phi_hat'
# ----------------------------------------------------------------------------------------------------------------

def channel_stats(phi, eps=1e-6):
    """Per sample and channel mean and std over the pixels of a (N, C, H, W) map."""
    var, mean = torch.var_mean(phi, dim=(2, 3), keepdim=True, correction=0)
    return mean, (var + eps).sqrt()


def normalize(phi, phi_hat, norm):
    """shared: both standardised with phi_hat's (detached) statistics (Sec. 3.2, the paper's choice);
    separate: each with its own; lpips: unit L2 norm across channels, using phi's norm for both."""
    if norm == "shared":
        mean, std = channel_stats(phi_hat.detach())
        return (phi - mean) / std, (phi_hat - mean) / std
    if norm == "separate":
        (mean, std), (mean_hat, std_hat) = channel_stats(phi), channel_stats(phi_hat)
        return (phi - mean) / std, (phi_hat - mean_hat) / std_hat
    length = phi.norm(dim=1, keepdim=True) + 1e-6
    return phi / length, phi_hat / length


# ----------------------------------------------------------------------------------------------------------------
# Outlier masks rho
# ----------------------------------------------------------------------------------------------------------------

def odd_kernel(size):
    """The odd integer kernel nearest below size + 1 (1 means: no morphology at this resolution)."""
    return 2 * int(size // 2) + 1


def dilate(mask, k):
    return F.max_pool2d(mask, k, stride=1, padding=k // 2) if k > 1 else mask


def erode(mask, k):
    return -F.max_pool2d(-mask, k, stride=1, padding=k // 2) if k > 1 else mask


def outlier_mask(phi, quantile=0.02, margin=2.0, closing=1, opening=1):
    """rho: 1 where a value lies in [q_quantile - margin std, q_(1-quantile) + margin std] of its channel map,
    cleaned by a closing then an opening. (N, C, H, W) -> float mask of the same shape."""
    flat = phi.flatten(2)
    n = flat.shape[-1]
    low = flat.kthvalue(max(1, round(quantile * n)), dim=-1).values
    high = flat.kthvalue(max(1, round((1 - quantile) * n)), dim=-1).values
    spread = margin * flat.std(dim=-1)
    low, high = (low - spread)[..., None, None], (high + spread)[..., None, None]
    rho = ((phi >= low) & (phi <= high)).float()
    rho = erode(dilate(rho, closing), closing)  # closing
    return dilate(erode(rho, opening), opening)  # opening


# ----------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------

class LatentPerceptualLoss(nn.Module):
    """LPL of Eq. (3). forward(z0_hat, z0, sigma_ratio) -> (loss, stats).

    n_blocks: decoder taps (1 = mid block, 5 = mid + 4 up blocks, the paper's "LPL-5 blocks").
    threshold: tau in sigma/alpha units at 256 px (Fig. 6: best between 3 and 6), scaled by resolution / 256.
    norm: "shared" | "separate" | "lpips".  mask_from: "prediction" | "target" | "none".
    depth_weights: "resolution" (omega_l = r_1/r_l) | "uniform".
    closing, opening: outlier-mask kernel sizes for a map at the full resolution of a 256 image.
    max_samples: apply LPL to a random subset of at most this many gated samples, reweighted by
        gated / chosen so the expectation is unchanged (cheaper, noisier). None: every gated sample.
    checkpointing: recompute the decoder blocks of the prediction branch in the backward pass (less memory).
    channels_last: run the decoder's convolutions in the NHWC layout (faster on tensor-core GPUs).
    """

    def __init__(self, autoencoder, n_blocks=5, threshold=4.0, norm="shared", mask_from="prediction",
                 depth_weights="resolution", quantile=0.02, margin=2.0, closing=3, opening=5, checkpointing=False,
                 max_samples=None, channels_last=False):
        super().__init__()
        if not 1 <= n_blocks <= autoencoder.num_feature_blocks:
            raise ValueError(f"n_blocks must be in 1..{autoencoder.num_feature_blocks} for this decoder "
                             f"({autoencoder.num_feature_blocks} feature taps), got {n_blocks}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if mask_from not in ("prediction", "target", "none"):
            raise ValueError(f"mask_from must be 'prediction', 'target' or 'none', got {mask_from!r}")
        if depth_weights not in ("resolution", "uniform"):
            raise ValueError(f"depth_weights must be 'resolution' or 'uniform', got {depth_weights!r}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be a positive number of samples or None, got {max_samples}")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.autoencoder.to(memory_format=self.memory_format)
        self.n_blocks, self.threshold, self.norm, self.mask_from = n_blocks, threshold, norm, mask_from
        self.depth_weights, self.quantile, self.margin = depth_weights, quantile, margin
        self.closing, self.opening = closing, opening
        self.checkpointing, self.max_samples = checkpointing, max_samples

    def resolution(self, z0):
        """Image side in pixels (geometric mean of height and width) of a latent batch."""
        return math.sqrt(z0.shape[-2] * z0.shape[-1]) * self.autoencoder.downsample

    def tau(self, resolution):
        """tau_sigma at this resolution (Sec. 4.1: scaled by the upscaling factor w.r.t. 256)."""
        return self.threshold * resolution / 256

    def gate(self, sigma_ratio, resolution, generator=None):
        """Indices of the samples with delta(sigma/alpha <= tau) = 1 that get the loss, how many passed the gate, and
        the weight that keeps the estimator unbiased when only max_samples of them are used."""
        gated = torch.nonzero(sigma_ratio <= self.tau(resolution)).squeeze(1)
        passed = len(gated)
        if self.max_samples is None or passed <= self.max_samples:
            return gated, passed, 1.0
        chosen = torch.randperm(passed, generator=generator, device=gated.device)[: self.max_samples]
        return gated[chosen], passed, passed / self.max_samples

    def layer_terms(self, phi, phi_hat, resolution):
        """omega_l / C_l sum_c mean_pixels(rho (phi' - phi_hat')^2) for every layer: a list of (n,) tensors."""
        r_1 = phi[0].shape[-2]
        terms, outlier_fractions = [], []
        for phi_l, phi_hat_l in zip(phi, phi_hat):
            phi_l, phi_hat_l = phi_l.float(), phi_hat_l.float()
            channels, r_l = phi_l.shape[1], phi_l.shape[-2]
            omega = r_1 / r_l if self.depth_weights == "resolution" else 1.0
            phi_n, phi_hat_n = normalize(phi_l, phi_hat_l, self.norm)
            squared = (phi_n - phi_hat_n) ** 2
            if self.mask_from != "none":
                with torch.no_grad():
                    scale = r_l / 256  # kernels cover the same fraction of the image at any layer and resolution
                    source = phi_hat_l if self.mask_from == "prediction" else phi_l
                    rho = outlier_mask(source, self.quantile, self.margin,
                                       odd_kernel(self.closing * scale), odd_kernel(self.opening * scale))
                squared = rho * squared
                outlier_fractions.append(1.0 - rho.mean())
            else:
                outlier_fractions.append(squared.new_zeros(()))
            terms.append(omega / channels * squared.mean(dim=(2, 3)).sum(dim=1))
        return terms, outlier_fractions

    def forward(self, z0_hat, z0, sigma_ratio, generator=None):
        batch = z0_hat.shape[0]
        resolution = self.resolution(z0)
        gated, passed, weight = self.gate(sigma_ratio, resolution, generator)
        zero = z0_hat.new_zeros((), dtype=torch.float32)
        stats = {"gated_fraction": zero + passed / batch, "decoded_fraction": zero + len(gated) / batch}
        if len(gated) == 0:  # nothing to decode: a zero loss, no decoder call
            stats.update({f"layer{l}": zero for l in range(self.n_blocks)})
            stats.update({f"outliers{l}": zero for l in range(self.n_blocks)})
            return zero, stats
        gated = gated.to(z0_hat.device, non_blocking=True)
        z0_hat, z0 = (z[gated].contiguous(memory_format=self.memory_format) for z in (z0_hat, z0))
        phi_hat = self.autoencoder.decoder_features(z0_hat, self.n_blocks, checkpointing=self.checkpointing)
        with torch.no_grad():
            phi = self.autoencoder.decoder_features(z0, self.n_blocks)
        terms, outlier_fractions = self.layer_terms(phi, phi_hat, resolution)
        per_sample = torch.stack(terms).sum(dim=0)  # (n,)
        loss = weight * per_sample.sum() / batch
        for l, (term, fraction) in enumerate(zip(terms, outlier_fractions)):
            stats[f"layer{l}"] = (weight * term.sum() / batch).detach()
            stats[f"outliers{l}"] = fraction.detach()
        return loss, stats
