"""The three training paradigms of the paper's Table 1 in one form: x_t = alpha_t * x_0 + sigma_t * eps.

    DDPM-eps   alpha_t = sqrt(abar_t)   sigma_t = sqrt(1 - abar_t)   D predicts eps
    DDPM-v     alpha_t = sqrt(abar_t)   sigma_t = sqrt(1 - abar_t)   D predicts v = alpha*eps - sigma*x_0
    Flow-OT    alpha_t = 1 - t          sigma_t = t                  D predicts the velocity eps - x_0

Time is one float convention for all three: t in [0, 1], t = 0 is clean data, t = 1 is pure noise.

DDPM's 1000 discrete steps k = 0..999 sit at t_k = (k + 1) / 1000 (k = 0, the least noisy step, is t = 0.001;
k = 999 is t = 1). Between and below the grid points abar is interpolated linearly in t, with abar(0) = 1, so that
t = 0 is clean for every objective. Training draws DDPM times only on the grid, as DDPM does.

Used by train.py (noising, targets, the x_0 estimate that LPL decodes), lpl.py (sigma_ratio, the unit of the LPL
threshold tau) and sample.py (the sampler's time grid). Run `python schedules.py` to print a summary.
"""

import math

import torch

OBJECTIVES = ("eps", "v", "flow")


def _per_sample(a, x):
    """(B,) -> (B, 1, 1, ...) so that a scalar per sample broadcasts over x."""
    return a.reshape(-1, *([1] * (x.ndim - 1)))


# ----------------------------------------------------------------------------------------------------------------
# DDPM noise schedule
# ----------------------------------------------------------------------------------------------------------------

def scaled_linear_alphas_cumprod(num_steps=1000, beta_start=0.00085, beta_end=0.012):
    """abar_k for the quadratic ("scaled linear") schedule of SD / SDXL (Sec. 4.1): betas = linspace(sqrt b0, sqrt b1)^2."""
    betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(alphas_cumprod):
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(abar) so the last step has alpha = 0 (SNR = 0) while the
    first step keeps its value. Without it the last training step still leaks signal that sampling never has."""
    sqrt_abar = alphas_cumprod.sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    return sqrt_abar**2


# ----------------------------------------------------------------------------------------------------------------
# Flow-OT timestep sampling (Esser et al. 2024, Sec. 3.1)
# ----------------------------------------------------------------------------------------------------------------

def mode_with_heavy_tails(u, scale=1.29):
    """f(u; s) = 1 - u - s * (cos^2(pi u / 2) - 1 + u): maps u ~ U(0, 1) onto [0, 1] with f(0) = 1, f(1) = 0,
    concentrating on the middle times for s > 0 while keeping mass at both ends (SD3's "mode" sampling)."""
    return 1.0 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1.0 + u)


def resolution_shift(t, shift):
    """SD3's time shift t' = s t / (1 + (s - 1) t): s > 1 spends more time at high noise, as a larger image needs
    (s = resolution / 256 keeps the per-patch uncertainty of a 256 image). s = 1 is the identity."""
    return shift * t / (1.0 + (shift - 1.0) * t)


# ----------------------------------------------------------------------------------------------------------------
# One class for the three paradigms
# ----------------------------------------------------------------------------------------------------------------

class Diffusion:
    """x_t = alpha_t x_0 + sigma_t eps, its target, its x_0 estimate (Table 1) and its training-time t sampler.

    objective: "eps" | "v" | "flow".
    zero_terminal_snr: DDPM only; None means on for "v" (Sec. 4.1 enforces it for velocity models), off for "eps".
        With "eps" it is allowed, but x_0 is not recoverable at t = 1 (alpha = 0): samplers start just below it.
    time_sampling: flow only; "mode" (heavy tails, scale mode_scale), "logit_normal" (logit_mean, logit_std),
        or "uniform". DDPM always draws its discrete steps uniformly.
    shift: flow only; the resolution shift applied to sampled training times and to sampler grids.
    """

    def __init__(self, objective="eps", num_steps=1000, beta_start=0.00085, beta_end=0.012, zero_terminal_snr=None,
                 time_sampling="mode", mode_scale=1.29, logit_mean=0.0, logit_std=1.0, shift=1.0):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if time_sampling not in ("mode", "logit_normal", "uniform"):
            raise ValueError(f"time_sampling must be 'mode', 'logit_normal' or 'uniform', got {time_sampling!r}")
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.objective = objective
        self.is_flow = objective == "flow"
        self.num_steps = num_steps
        self.time_sampling, self.mode_scale = time_sampling, mode_scale
        self.logit_mean, self.logit_std, self.shift = logit_mean, logit_std, shift
        if zero_terminal_snr is None:
            zero_terminal_snr = objective == "v"
        self.zero_terminal_snr = zero_terminal_snr and not self.is_flow
        if not self.is_flow:
            abar = scaled_linear_alphas_cumprod(num_steps, beta_start, beta_end)
            if self.zero_terminal_snr:
                abar = rescale_zero_terminal_snr(abar)
            self.alphas_cumprod = abar  # (num_steps,) float64, step k at t = (k + 1) / num_steps
            self._abar_of_t = {}  # per-device copy of [1, abar_0, ..., abar_{K-1}] for interpolation

    def config(self):
        """Plain values that rebuild this object with Diffusion(**config) (stored in checkpoints)."""
        return dict(objective=self.objective, num_steps=self.num_steps, zero_terminal_snr=self.zero_terminal_snr,
                    time_sampling=self.time_sampling, mode_scale=self.mode_scale, logit_mean=self.logit_mean,
                    logit_std=self.logit_std, shift=self.shift)

    # -- the forward process ------------------------------------------------------------------------------------

    def alpha_sigma(self, t):
        """(alpha_t, sigma_t) for t of shape (B,), in t's dtype."""
        if self.is_flow:
            return 1.0 - t, t
        table = self._abar_of_t.get(t.device)
        if table is None:
            table = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod]).to(t.device)
            self._abar_of_t[t.device] = table
        position = t.double().clamp(0.0, 1.0) * self.num_steps
        lower = position.floor().clamp(max=self.num_steps - 1)
        frac = position - lower
        lower = lower.long()
        abar = table[lower] * (1.0 - frac) + table[lower + 1] * frac
        return abar.sqrt().to(t.dtype), (1.0 - abar).clamp(min=0.0).sqrt().to(t.dtype)

    def add_noise(self, z0, noise, t):
        """x_t = alpha_t z0 + sigma_t eps."""
        alpha, sigma = self.alpha_sigma(t)
        return _per_sample(alpha, z0) * z0 + _per_sample(sigma, z0) * noise

    def target(self, z0, noise, t):
        """What the network D is trained to predict: eps, v = alpha eps - sigma z0, or the velocity eps - z0."""
        if self.objective == "eps":
            return noise
        if self.objective == "flow":
            return noise - z0
        alpha, sigma = self.alpha_sigma(t)
        return _per_sample(alpha, z0) * noise - _per_sample(sigma, z0) * z0

    def x0_from_pred(self, zt, pred, t):
        """The clean-latent estimate z0_hat of Table 1, the input of LPL's prediction branch.
        eps: (x_t - sigma D) / alpha;  v: alpha x_t - sigma D;  flow: x_t - sigma D."""
        alpha, sigma = self.alpha_sigma(t)
        alpha, sigma = _per_sample(alpha, zt), _per_sample(sigma, zt)
        if self.objective == "eps":
            return (zt - sigma * pred) / alpha
        if self.objective == "v":
            return alpha * zt - sigma * pred
        return zt - sigma * pred

    def noise_from_pred(self, zt, pred, t):
        """eps_hat from the same prediction (what DDIM needs besides z0_hat)."""
        alpha, sigma = self.alpha_sigma(t)
        alpha, sigma = _per_sample(alpha, zt), _per_sample(sigma, zt)
        if self.objective == "eps":
            return pred
        if self.objective == "v":
            return sigma * zt + alpha * pred
        return zt + (1.0 - sigma) * pred  # flow: x_t = z0 + t (eps - z0)  =>  eps = x_t + (1 - t) v

    def sigma_ratio(self, t):
        """sigma_t / alpha_t: the unit of the LPL threshold tau (Sec. 3.2, Fig. 6). +inf where alpha = 0."""
        alpha, sigma = self.alpha_sigma(t)
        return torch.where(alpha > 0, sigma / alpha.clamp(min=torch.finfo(alpha.dtype).tiny), math.inf)

    def t_from_sigma_ratio(self, ratio):
        """The inverse of sigma_ratio: the t in [0, 1] at which sigma_t / alpha_t = ratio (float64 tensor). Validation
        uses it to evaluate at fixed noise levels. Flow: t / (1 - t) = ratio. DDPM: alpha^2 = 1 / (1 + ratio^2),
        found in the table that alpha_sigma interpolates linearly."""
        ratio = torch.as_tensor(ratio, dtype=torch.float64)
        if self.is_flow:
            return ratio / (1.0 + ratio)
        table = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])  # decreasing in t
        abar = 1.0 / (1.0 + ratio ** 2)
        if (abar < table[-1]).any():
            largest = ((1 - table[-1]) / table[-1]).sqrt().item()
            raise ValueError(f"sigma/alpha {ratio.max().item():g} is beyond this schedule's t = 1 ({largest:.3g})")
        k = torch.searchsorted(-table, -abar).clamp(1, self.num_steps)  # table[k] <= abar <= table[k - 1]
        fraction = (table[k - 1] - abar) / (table[k - 1] - table[k])
        return (k - 1 + fraction) / self.num_steps

    # -- training-time t ----------------------------------------------------------------------------------------

    def sample_t(self, n, device=None, generator=None):
        """n training times. DDPM: uniform over its discrete steps. Flow: mode / logit-normal / uniform, then the
        resolution shift. Drawn on the generator's device (the CPU by default), returned on `device`."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        if not self.is_flow:
            steps = torch.randint(0, self.num_steps, (n,), generator=generator, device=gen_device)
            t = (steps + 1).float() / self.num_steps
        else:
            if self.time_sampling == "logit_normal":
                normal = torch.randn(n, generator=generator, device=gen_device)
                t = torch.sigmoid(self.logit_mean + self.logit_std * normal)
            else:
                u = torch.rand(n, generator=generator, device=gen_device)
                t = mode_with_heavy_tails(u, self.mode_scale) if self.time_sampling == "mode" else u
            t = resolution_shift(t, self.shift)
        return t.to(device) if device is not None else t

    def __repr__(self):
        extra = f", zero_terminal_snr={self.zero_terminal_snr}" if not self.is_flow else \
            f", time_sampling={self.time_sampling!r}, shift={self.shift}"
        return f"Diffusion(objective={self.objective!r}{extra})"


if __name__ == "__main__":
    for objective in OBJECTIVES:
        diffusion = Diffusion(objective)
        t = diffusion.sample_t(100_000, generator=torch.Generator().manual_seed(0))
        gated = (diffusion.sigma_ratio(t) <= 4).float().mean()
        print(f"{diffusion}: mean t {t.mean():.3f}, fraction of training times with sigma/alpha <= 4: {gated:.3f}")
