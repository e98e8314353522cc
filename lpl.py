"""The Latent Perceptual Loss (Berrada et al., ICLR 2025), Eq. (3):

    L_LPL = E_{t, eps, x0} [ delta(sigma_t/alpha_t <= tau)
                             sum_l  omega_l / C_l  sum_c || rho_lc (.) (phi'_lc - phi_hat'_lc) ||^2 ]

    phi_l, phi_hat_l   decoder features of z0 and of the estimate z0_hat (Eq. 2), l = 1..L: the mid block,
                       then each up block (coarse to fine); C_l channels                         (features)
    phi', phi_hat'     the same, standardised per channel with phi_hat's statistics           (normalize)
    rho_lc             binary mask that drops the outliers of a channel map               (outlier_mask)
    omega_l = r_1/r_l  depth weight, halving each time the resolution r_l doubles          (layer_terms)
    delta, tau         the gate: only low-noise samples (sigma/alpha <= tau) get the loss       (gate, tau)

and L_tot = L_diff + w_LPL * L_LPL, z0_hat from the network's output by Table 1 (schedules.x0_from_pred).
"""

import math

import torch
import torch.nn.functional as F

from runtime import require

NORMS = ("shared", "separate", "target-l2")  # see normalize
MASK_SOURCES = ("prediction", "target", "none")  # see masks
DEPTH_WEIGHTS = ("resolution", "uniform")  # omega_l = r_1 / r_l, or 1 (the ablation)


# ---- Normalisation: phi, phi_hat -> phi', phi_hat' ------------------------------------------------------
def channel_stats(phi, eps=1e-6):
    """Per sample and channel mean and std over the pixels of a (N, C, H, W) map, in float32."""
    mean = phi.mean(dim=(2, 3), keepdim=True, dtype=torch.float32)
    centre = mean.to(phi.dtype)  # no float32 copy of a bf16 map: centred on its rounded mean, corrected below
    norm = torch.linalg.vector_norm(phi - centre, dim=(2, 3), keepdim=True, dtype=torch.float32)
    variance = norm ** 2 / phi[0, 0].numel() - (mean - centre) ** 2  # E[(x - c)^2] - (mean - c)^2
    return mean, (variance + eps).sqrt()


def normalize(phi, phi_hat, norm):
    """(a, b, scale) with phi' - phi_hat' = (a - b) / scale. "shared" (Sec. 3.2): both standardised with
    phi_hat's detached statistics; the mean cancels, the loss is ||phi - phi_hat||^2 / var(phi_hat), and no
    gradient rewards inflating var. "separate": each its own. "target-l2": over phi's L2 norm (diffusers)."""
    if norm == "shared":
        return phi, phi_hat, channel_stats(phi_hat.detach())[1]
    if norm == "separate":
        mean, std = channel_stats(phi)
        mean_hat, std_hat = channel_stats(phi_hat)
        return (phi - mean) / std, (phi_hat - mean_hat) / std_hat, 1.0
    length = torch.linalg.vector_norm(phi, dim=1, keepdim=True, dtype=torch.float32) + 1e-6
    return phi / length, phi_hat / length, 1.0


class MaskedSquaredDistance(torch.autograd.Function):
    """sum_c mean_pixels(rho ((a - b) / scale)^2) per sample, a from phi (no gradient), b from phi_hat: a mean
    over pixels, so a term does not grow with the image. Closed-form backward: one map kept, in its dtype."""

    @staticmethod
    def forward(ctx, a, b, scale, rho):
        difference = b - a if rho is None else (b - a).mul_(rho)  # masked pixels are zeros
        weight = torch.as_tensor(scale, dtype=torch.float32) ** -2  # 1 / scale^2: (N, C, 1, 1) or ()
        norm = torch.linalg.vector_norm(difference, dim=(2, 3), keepdim=True, dtype=torch.float32)
        ctx.save_for_backward(difference.mul_(weight))  # in place: rho (b - a) / scale^2
        return (norm ** 2 * weight).sum(dim=(1, 2, 3)) / difference[0, 0].numel()  # (N,)

    @staticmethod
    def backward(ctx, grad):
        (kept,) = ctx.saved_tensors  # rho (b - a) / scale^2 = d term / d b * pixels / 2
        factor = (grad * 2 / kept[0, 0].numel()).view(-1, 1, 1, 1).to(kept.dtype)  # (N, 1, 1, 1)
        return None, kept * factor, None, None


# ---- Outlier masks rho ----------------------------------------------------------------------------------
def morphology(mask, k, erode=False):
    """Dilation (any) or erosion (all) of a bool mask over a k x k window, as a k x k max-pool (padding counts
    for neither). Separable, k x 1 then 1 x k: 2k reads per pixel, not k^2; no float copy."""
    passes = ((-2, (0, 0, k // 2, k // 2)), (-1, (k // 2, k // 2))) if k > 1 else ()  # rows, then columns
    for dim, pad in passes:
        windows = F.pad(mask, pad, value=erode).unfold(dim, k, 1)
        mask = windows.all(-1) if erode else windows.any(-1)
    return mask


def outlier_mask(phi, quantile=0.02, margin=2.0, closing=1, opening=1, samples=None):
    """rho, (N, C, H, W) -> bool: inside [q_quantile - margin std, q_(1-quantile) + margin std] per channel;
    a closing fills outlier specks (detector noise), an opening removes inlier islands in outlier regions."""
    flat = phi.flatten(2)  # (N, C, H*W)
    # The quantiles of every stride-th pixel, ~samples values (None: all): the bounds lie 2 std beyond them,
    # where few pixels are. An odd stride walks across the columns of a power-of-two-wide map.
    stride = (flat.shape[-1] // (samples or flat.shape[-1])) | 1
    sample = flat[..., ::stride]
    low = sample.kthvalue(max(1, round(quantile * sample.shape[-1])), dim=-1).values  # (N, C)
    high = sample.kthvalue(max(1, round((1 - quantile) * sample.shape[-1])), dim=-1).values
    spread = margin * flat.std(dim=-1).float()  # bounds in float32; a bf16 map's std moves them by < 0.01 std
    rho = (phi >= (low - spread)[..., None, None]) & (phi <= (high + spread)[..., None, None])
    rho = morphology(morphology(rho, closing), closing, erode=True)  # closing: dilate, then erode
    return morphology(morphology(rho, opening, erode=True), opening)  # opening: erode, then dilate


# ---- The loss -------------------------------------------------------------------------------------------
class LatentPerceptualLoss(torch.nn.Module):
    """LPL of Eq. (3): forward(z0_hat, z0, sigma_ratio) -> (loss, stats); per_sample: the bracket, ungated.
    n_blocks: decoder taps (1 = mid block, 5 = mid + 4 up blocks, "LPL-5 blocks"; None: all up to 5);
    threshold: tau at 256 px, in sigma/alpha (Fig. 6: best 3-6); quantile ... opening: see outlier_mask.
    Cost: max_samples (see gate); checkpointing recomputes phi_hat's decoder; compile: one graph."""

    def __init__(self, autoencoder, n_blocks=None, threshold=4.0, norm="shared", mask_from="prediction",
                 depth_weights="resolution", quantile=0.02, margin=2.0, quantile_samples=4096, closing=3,
                 opening=5, checkpointing=False, max_samples=None, compile=False):
        super().__init__()
        taps = autoencoder.num_feature_blocks
        n_blocks = min(5, taps) if n_blocks is None else n_blocks
        require(1 <= n_blocks <= taps, "n_blocks", f"in 1..{taps}, this decoder's feature taps", n_blocks)
        require(threshold > 0, "threshold", "positive", threshold)
        require(norm in NORMS, "norm", f"one of {NORMS}", norm)
        require(mask_from in MASK_SOURCES, "mask_from", "prediction, target or none", mask_from)
        require(depth_weights in DEPTH_WEIGHTS, "depth_weights", "resolution or uniform", depth_weights)
        require(0 < quantile < 0.5, "quantile", "in (0, 0.5)", quantile)
        require(margin >= 0, "margin", ">= 0", margin)
        require(min(closing, opening) >= 0, "closing and opening", ">= 0", (closing, opening))
        for name, count in (("quantile_samples", quantile_samples), ("max_samples", max_samples)):
            require(count is None or count > 0, name, "None or a positive count", count)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.n_blocks, self.threshold, self.max_samples = n_blocks, threshold, max_samples  # taps, gate, cap
        self.norm, self.mask_from, self.depth_weights = norm, mask_from, depth_weights  # how layers compare
        self.quantile, self.margin, self.quantile_samples = quantile, margin, quantile_samples  # rho's bounds
        self.closing, self.opening, self.checkpointing = closing, opening, checkpointing  # kernels; cost
        self.compiled = torch.compile(autoencoder.decoder_features) if compile else None

    def tau(self, resolution):
        """tau at this image resolution: scaled by resolution / 256, the upscaling factor (Sec. 4.1)."""
        return self.threshold * resolution / 256

    def gate(self, sigma_ratio, resolution, keys=None, generator=None):
        """delta(sigma/alpha <= tau) -> (indices of the samples that get the loss, how many passed, weight).
        Over max_samples K: the K gated samples of smallest keys (default: uniform draws), weight passed/K."""
        gated = sigma_ratio <= self.tau(resolution)
        passed = int(gated.sum())
        if self.max_samples is None or passed <= self.max_samples:
            return gated.nonzero().squeeze(1), passed, 1.0
        keys = torch.rand(len(gated), generator=generator, device=gated.device) if keys is None else keys
        chosen = torch.where(gated, keys, math.inf).argsort()[: self.max_samples]
        return chosen, passed, passed / self.max_samples

    def kernels(self, side):
        """rho's closing and opening kernels on a side x side map, scaled with it (Sec. 4.1); 1 = none."""
        return [2 * int(k * side / 256 // 2) + 1 for k in (self.closing, self.opening)]

    def features(self, z0_hat, z0):
        """Eq. (2): phi (without autograd) and phi_hat, coarse to fine."""
        decode = self.compiled or self.autoencoder.decoder_features
        for z in (z0_hat, z0) if self.compiled else ():  # compiled: one graph for any gated count > 1
            torch._dynamo.maybe_mark_dynamic(z, 0)
        phi_hat = decode(z0_hat, self.n_blocks, checkpointing=self.checkpointing)
        with torch.no_grad():
            return decode(z0, self.n_blocks), phi_hat

    @torch.no_grad()
    def masks(self, phi, phi_hat):
        """rho per layer: of phi_hat (Eq. 3), or of phi (public code; phi_hat's lets the net mask pixels)."""
        if self.mask_from == "none":
            return [None] * len(phi)
        masks = []
        for source in phi_hat if self.mask_from == "prediction" else phi:
            closing, opening = self.kernels(source.shape[-2])
            masks.append(outlier_mask(source, self.quantile, self.margin, closing, opening,
                                      samples=self.quantile_samples))
        return masks

    def layer_terms(self, phi, phi_hat, masks):
        """omega_l / C_l sum_c mean_pixels(rho (phi' - phi_hat')^2) per layer, each (n,). The paper prints
        omega_l = 2^(-r_l/r_1); we use its text, "the inverse of the upscaling factor": r_1 / r_l."""
        terms = []
        for p, p_hat, rho in zip(phi, phi_hat, masks):
            omega = phi[0].shape[-2] / p.shape[-2] if self.depth_weights == "resolution" else 1.0
            a, b, scale = normalize(p, p_hat, self.norm)  # phi' - phi_hat' = (a - b) / scale
            terms.append(omega / p.shape[1] * MaskedSquaredDistance.apply(a, b, scale, rho))
        return terms

    def per_sample(self, z0_hat, z0):
        """The bracket of Eq. (3), ungated: (values (n,), terms, masks), terms and masks one per layer."""
        phi, phi_hat = self.features(z0_hat, z0)
        masks = self.masks(phi, phi_hat)
        terms = self.layer_terms(phi, phi_hat, masks)
        return torch.stack(terms).sum(dim=0), terms, masks

    def forward(self, z0_hat, z0, sigma_ratio, generator=None, chosen=None):
        """Eq. (3) over the batch. chosen: the gate's (indices, passed, weight) if drawn by the caller."""
        batch = z0_hat.shape[0]
        resolution = math.sqrt(z0.shape[-2] * z0.shape[-1]) * self.autoencoder.downsample  # image side
        gated, passed, weight = chosen or self.gate(sigma_ratio, resolution, generator=generator)
        zero = z0_hat.new_zeros((), dtype=torch.float32)
        stats = {"gated_fraction": zero + passed / batch, "decoded_fraction": zero + len(gated) / batch}
        stats.update({f"{name}{l}": zero for l in range(self.n_blocks) for name in ("layer", "outliers")})
        if len(gated) == 0:  # nothing to decode: a zero loss, no decoder call
            return zero, stats
        values, terms, masks = self.per_sample(z0_hat[gated], z0[gated])  # only gated samples are decoded
        loss = weight * values.sum() / batch  # the expectation with delta inside: sum over gated / batch
        for l, (term, rho) in enumerate(zip(terms, masks)):
            stats[f"layer{l}"] = (weight * term.sum() / batch).detach()
            stats[f"outliers{l}"] = zero if rho is None else 1 - rho.count_nonzero() / rho.numel()
        return loss, stats
