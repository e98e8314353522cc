"""The three training paradigms of the paper's Table 1 in one form: x_t = alpha_t * x_0 + sigma_t * eps.

    DDPM-eps   alpha_t = sqrt(abar_t)   sigma_t = sqrt(1 - abar_t)   D predicts eps
    DDPM-v     alpha_t = sqrt(abar_t)   sigma_t = sqrt(1 - abar_t)   D predicts v = alpha*eps - sigma*x_0
    Flow-OT    alpha_t = 1 - t          sigma_t = t                  D predicts the velocity eps - x_0

Time is one float convention for all three: t in [0, 1], t = 0 is clean data, t = 1 is pure noise.

DDPM's 1000 discrete steps k = 0..999 sit at t_k = (k + 1) / 1000 (k = 0, the least noisy step, is t = 0.001;
k = 999 is t = 1). Between and below the grid points abar is interpolated linearly in t, with abar(0) = 1, so that
t = 0 is clean for every objective. Training draws DDPM times only on the grid, as DDPM does. Its betas are SD's
"scaled_linear" schedule or DDPM / DiT's "linear" one.

DiT's learned variance (Nichol & Dhariwal 2021) lives here too: the posterior q(x_s | x_t, x_0) between any two grid
times, the learned log-variance range and the variational-bound term of the hybrid loss, exact to DiT's
diffusion/gaussian_diffusion.py.

Used by train.py (noising, targets, the x_0 estimate that LPL decodes), lpl.py (sigma_ratio, the unit of the LPL
threshold tau) and sample.py (the sampler's time grid). Run `python schedules.py` to print a summary.
"""

import math

import torch

OBJECTIVES = ("eps", "v", "flow")
BETA_SCHEDULES = ("scaled_linear", "linear")


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


def linear_alphas_cumprod(num_steps=1000, beta_start=1e-4, beta_end=0.02):
    """abar_k for DDPM's linear schedule (Ho et al. 2020; DiT's "linear"): betas = linspace(b0, b1),
    abar_k = prod_{j <= k} (1 - b_j)."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def default_betas(beta_schedule, num_steps):
    """(beta_start, beta_end) each schedule was published with. scaled_linear: SD's 0.00085..0.012 at any num_steps.
    linear: 1e-4..0.02 for 1000 steps, both scaled by 1000 / num_steps (DiT's get_named_beta_schedule("linear"))."""
    if beta_schedule == "scaled_linear":
        return 0.00085, 0.012
    if beta_schedule == "linear":
        scale = 1000 / num_steps
        return scale * 1e-4, scale * 0.02
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


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
# The two terms of the variational bound (Ho et al. 2020, Eq. 5; ADM / DiT's diffusion_utils.py)
# ----------------------------------------------------------------------------------------------------------------

def gaussian_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats:
    (log_var2 - log_var1 + e^(log_var1 - log_var2) + (mean1 - mean2)^2 e^-log_var2 - 1) / 2."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
                  - 1.0)


def approximate_standard_normal_cdf(x):
    """Phi(x) ~ (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) / 2, the approximation ADM and DiT evaluate."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) per element, in nats, for N(mean, e^(2 log_scale)) discretised into the 256 bins of width 2 / 255 of
    uint8 data rescaled to [-1, 1]: log(Phi((x - mean + 1/255) / scale) - Phi((x - mean - 1/255) / scale)), the
    outermost bins open to -inf (x < -0.999) and +inf (x > 0.999); probabilities floored at 1e-12 as in DiT."""
    centered, inverse_scale = x - mean, torch.exp(-log_scale)
    cdf_above = approximate_standard_normal_cdf(inverse_scale * (centered + 1.0 / 255.0))
    cdf_below = approximate_standard_normal_cdf(inverse_scale * (centered - 1.0 / 255.0))
    log_bin = torch.log((cdf_above - cdf_below).clamp(min=1e-12))
    log_lowest_bin = torch.log(cdf_above.clamp(min=1e-12))
    log_highest_bin = torch.log((1.0 - cdf_below).clamp(min=1e-12))
    return torch.where(x < -0.999, log_lowest_bin, torch.where(x > 0.999, log_highest_bin, log_bin))


def _mean_over_dims(x):
    """(B, ...) -> (B,): the mean over every dimension but the batch (DiT's mean_flat)."""
    return x.flatten(1).mean(dim=1)


def split_variance(output, channels):
    """A network's output -> (prediction, variance values or None): `channels` channels are a prediction; 2 x
    `channels` a prediction followed by a learned-variance head's values (DiT's, learned_log_variance)."""
    if output.shape[1] == channels:
        return output, None
    if output.shape[1] == 2 * channels:
        return output[:, :channels], output[:, channels:]
    raise ValueError(f"the network returned {output.shape[1]} channels for {channels}-channel latents: expected "
                     f"{channels} (a prediction) or {2 * channels} (a prediction and DiT's variance channels)")


# ----------------------------------------------------------------------------------------------------------------
# One class for the three paradigms
# ----------------------------------------------------------------------------------------------------------------

class Diffusion:
    """x_t = alpha_t x_0 + sigma_t eps, its target, its x_0 estimate (Table 1) and its training-time t sampler.

    objective: "eps" | "v" | "flow".
    beta_schedule, beta_start, beta_end: DDPM's betas, "scaled_linear" (SD) or "linear" (DDPM, DiT); the betas
        default to the schedule's own (default_betas).
    zero_terminal_snr: DDPM only; None means on for "v" (Sec. 4.1 enforces it for velocity models), off for "eps".
        With "eps" it is allowed, but x_0 is not recoverable at t = 1 (alpha = 0): samplers start just below it.
    time_sampling: flow only; "mode" (heavy tails, scale mode_scale), "logit_normal" (logit_mean, logit_std),
        or "uniform". DDPM always draws its discrete steps uniformly.
    shift: flow only; the resolution shift applied to sampled training times and to sampler grids.
    """

    def __init__(self, objective="eps", num_steps=1000, beta_start=None, beta_end=None, zero_terminal_snr=None,
                 time_sampling="mode", mode_scale=1.29, logit_mean=0.0, logit_std=1.0, shift=1.0,
                 beta_schedule="scaled_linear"):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if time_sampling not in ("mode", "logit_normal", "uniform"):
            raise ValueError(f"time_sampling must be 'mode', 'logit_normal' or 'uniform', got {time_sampling!r}")
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        default_start, default_end = default_betas(beta_schedule, num_steps)
        self.beta_schedule = beta_schedule
        self.beta_start = default_start if beta_start is None else beta_start
        self.beta_end = default_end if beta_end is None else beta_end
        if not 0 < self.beta_start < 1 or not 0 < self.beta_end < 1:
            raise ValueError(f"beta_start and beta_end must lie in (0, 1), got {self.beta_start}, {self.beta_end}")
        self.objective = objective
        self.is_flow = objective == "flow"
        self.num_steps = num_steps
        self.time_sampling, self.mode_scale = time_sampling, mode_scale
        self.logit_mean, self.logit_std, self.shift = logit_mean, logit_std, shift
        if zero_terminal_snr is None:
            zero_terminal_snr = objective == "v"
        self.zero_terminal_snr = zero_terminal_snr and not self.is_flow
        if not self.is_flow:
            alphas_cumprod = linear_alphas_cumprod if beta_schedule == "linear" else scaled_linear_alphas_cumprod
            abar = alphas_cumprod(num_steps, self.beta_start, self.beta_end)
            if self.zero_terminal_snr:
                abar = rescale_zero_terminal_snr(abar)
            self.alphas_cumprod = abar  # (num_steps,) float64, step k at t = (k + 1) / num_steps
            self._abar_of_t = {}  # per-device copy of [1, abar_0, ..., abar_{K-1}] for interpolation

    def config(self):
        """Plain values that rebuild this object with Diffusion(**config) (stored in checkpoints). Configs written
        before the betas were recorded lack beta_schedule, beta_start and beta_end: they rebuild as scaled_linear."""
        return dict(objective=self.objective, num_steps=self.num_steps, beta_schedule=self.beta_schedule,
                    beta_start=self.beta_start, beta_end=self.beta_end, zero_terminal_snr=self.zero_terminal_snr,
                    time_sampling=self.time_sampling, mode_scale=self.mode_scale, logit_mean=self.logit_mean,
                    logit_std=self.logit_std, shift=self.shift)

    # -- the forward process ------------------------------------------------------------------------------------

    def alpha_sigma(self, t):
        """(alpha_t, sigma_t) for t of shape (B,), in t's dtype."""
        if self.is_flow:
            return 1.0 - t, t
        table = self._abar_table(t.device)
        position = t.double().clamp(0.0, 1.0) * self.num_steps
        lower = position.floor().clamp(max=self.num_steps - 1)
        frac = position - lower
        lower = lower.long()
        abar = table[lower] * (1.0 - frac) + table[lower + 1] * frac
        return abar.sqrt().to(t.dtype), (1.0 - abar).clamp(min=0.0).sqrt().to(t.dtype)

    def _abar_table(self, device):
        """[1, abar_0, ..., abar_{K-1}] (float64) on `device`: entry i is abar at the grid time t = i / num_steps."""
        table = self._abar_of_t.get(device)
        if table is None:
            table = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod]).to(device)
            self._abar_of_t[device] = table
        return table

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

    # -- the DDPM posterior and DiT's learned variance (Nichol & Dhariwal 2021) ---------------------------------
    #
    # Grid times: t = i / num_steps, i = 0..num_steps; i = 0 is the clean sample, i = k + 1 DDPM step k. A respaced
    # sampler (DiT's 250 steps) walks a sub-grid t_0 < t_1 < ... of these; the "first step" of a grid is the one
    # whose previous time is s = 0 (x_s = x_0): its posterior variance is 0, and its clipped log variance is that of
    # the grid's second step, q(x_{t_0} | x_{t_1}, x_0) (ADM / DiT's posterior_log_variance_clipped). Which time
    # is the second one is the grid's to say: `second_t`, by default t + 1 / num_steps (the full grid).

    def _grid_step(self, t, name, lowest=0):
        """Grid times -> their integer steps i = num_steps t (long). num_steps t within 1e-3 of an integer is snapped
        to it (float32 rounding of i / num_steps); anything else, or i outside lowest..num_steps, is a ValueError."""
        if self.is_flow:
            raise ValueError(f"the DDPM posterior needs a DDPM objective, got {self.objective!r}")
        position = torch.as_tensor(t, dtype=torch.float64) * self.num_steps
        step = position.round()
        if (((position - step).abs() > 1e-3) | (step < lowest) | (step > self.num_steps)).any():
            raise ValueError(f"{name} must lie on the grid i / {self.num_steps}, i = {lowest}..{self.num_steps}")
        return step.long()

    def _posterior_coefficients(self, step_t, step_s, second_step):
        """Per-sample float64 scalars of q(x_s | x_t, x_0) between grid steps s < t: (coefficient of x_0, coefficient
        of x_t, variance, clipped log variance, log beta_{t|s}). Where s = 0 the clipped log variance is the log
        variance of q(x_t | x_second, x_0)."""
        table = self._abar_table(step_t.device)
        abar_t, abar_s = table[step_t], table[step_s]
        beta_ts = 1.0 - abar_t / abar_s
        variance = beta_ts * (1.0 - abar_s) / (1.0 - abar_t)
        abar_second = table[second_step.clamp(max=self.num_steps)]
        second_variance = (1.0 - abar_second / abar_t) * (1.0 - abar_t) / (1.0 - abar_second)
        log_variance_clipped = torch.where(step_s == 0, second_variance.log(), variance.log())
        coefficient_x0 = abar_s.sqrt() * beta_ts / (1.0 - abar_t)
        coefficient_xt = (abar_t / abar_s).sqrt() * (1.0 - abar_s) / (1.0 - abar_t)
        return coefficient_x0, coefficient_xt, variance, log_variance_clipped, beta_ts.log()

    def _posterior_steps(self, t, s, second_t):
        """Validated grid steps of (t, s, second_t) for posterior and learned_log_variance."""
        step_t = self._grid_step(t, "t", lowest=1)
        step_s = self._grid_step(s, "s").to(step_t.device)
        if (step_s >= step_t).any():
            raise ValueError("s must be earlier than t (s < t)")
        if second_t is None:
            return step_t, step_s, step_t + 1
        second_step = self._grid_step(second_t, "second_t").to(step_t.device)
        if ((step_s == 0) & (second_step <= step_t)).any():
            raise ValueError("second_t must be later than t where s = 0 (t is then the grid's first time)")
        return step_t, step_s, second_step

    def posterior(self, z0, zt, t, s, second_t=None):
        """q(x_s | x_t, x_0) for grid times s < t (Ho et al. 2020, Eq. 6-7, between any two grid times):
            beta_{t|s} = 1 - abar_t / abar_s,   variance = beta_{t|s} (1 - abar_s) / (1 - abar_t),
            mean = sqrt(abar_s) beta_{t|s} / (1 - abar_t) x_0 + sqrt(abar_t / abar_s) (1 - abar_s) / (1 - abar_t) x_t.
        t, s: (B,) (s may be a float); s = the previous step for training, the previous time of a sub-grid for a
        respaced sampler, 0 at a grid's first step. Returns (mean like zt, variance (B,), log variance clipped (B,)),
        the last as in DiT: at a first step (s = 0, variance 0) that of the grid's second step, at second_t (default
        t + 1 / num_steps, a sub-grid passes its own)."""
        steps = self._posterior_steps(t, s, second_t)
        coefficient_x0, coefficient_xt, variance, log_variance, _ = self._posterior_coefficients(*steps)
        mean = _per_sample(coefficient_x0.to(zt.dtype), z0) * z0 + _per_sample(coefficient_xt.to(zt.dtype), zt) * zt
        return mean, variance.to(zt.dtype), log_variance.to(zt.dtype)

    def learned_log_variance(self, values, t, s, second_t=None):
        """DiT's learned range (Nichol & Dhariwal 2021, Eq. 15): values v in [-1, 1] from the network's variance
        channels, frac = (v + 1) / 2, log Sigma = frac log beta_{t|s} + (1 - frac) log beta-tilde_{t|s}, beta-tilde
        the posterior variance clipped as posterior's (same t, s, second_t). Shaped like values."""
        steps = self._posterior_steps(t, s, second_t)
        _, _, _, min_log, max_log = self._posterior_coefficients(*steps)
        frac = (values + 1.0) / 2.0
        return frac * _per_sample(max_log.to(values.dtype), values) + \
            (1.0 - frac) * _per_sample(min_log.to(values.dtype), values)

    def variational_bound(self, z0, zt, t, eps_prediction, variance_values):
        """L_vb of Improved DDPM's hybrid loss for DDPM-eps, per sample (B,), in bits per dimension (DiT's
        _vb_terms_bpd): at DDPM step k = num_steps t - 1 >= 1, KL(q(x_{k-1} | x_k, x_0) || p(x_{k-1} | x_k)) averaged
        over dimensions / log 2; at k = 0, -log p(x_0 | x_1) of the discretised Gaussian, averaged / log 2. p's mean
        is the posterior mean at x0_hat = x_t / sqrt(abar) - sqrt(1 / abar - 1) eps_prediction (not clipped), its log
        variance learned_log_variance(variance_values). DiT's loss (LossType.MSE, the term not rescaled) is
            L = mean_dims (eps - eps_hat)^2 + L_vb(eps_hat.detach(), v)   (Nichol & Dhariwal 2021, Sec. 3.1),
        the mean's gradient stopped so that L_vb only trains the variance: pass eps_prediction.detach().
        t: (B,) grid times (k + 1) / num_steps, best on the CPU: their check then costs no host-device sync."""
        if self.objective != "eps":
            raise ValueError(f"variational_bound is for DDPM-eps (DiT) only, got objective {self.objective!r}")
        step_t = self._grid_step(t, "t", lowest=1)
        coefficient_x0, coefficient_xt, _, true_log_variance, log_beta = (
            _per_sample(c.to(zt.device, zt.dtype, non_blocking=True), zt)
            for c in self._posterior_coefficients(step_t, step_t - 1, step_t + 1))
        abar = self._abar_table(step_t.device)[step_t].to(zt.device, non_blocking=True)
        x0_hat = _per_sample((1.0 / abar).sqrt().to(zt.dtype), zt) * zt - \
            _per_sample((1.0 / abar - 1.0).sqrt().to(zt.dtype), zt) * eps_prediction
        true_mean, model_mean = (coefficient_x0 * x0 + coefficient_xt * zt for x0 in (z0, x0_hat))
        frac = (variance_values + 1.0) / 2.0
        model_log_variance = frac * log_beta + (1.0 - frac) * true_log_variance
        kl = _mean_over_dims(gaussian_kl(true_mean, true_log_variance, model_mean, model_log_variance))
        nll = -_mean_over_dims(discretized_gaussian_log_likelihood(z0, model_mean, 0.5 * model_log_variance))
        first_step = (step_t == 1).to(zt.device, non_blocking=True)
        return torch.where(first_step, nll, kl) / math.log(2.0)

    # -- training-time t ----------------------------------------------------------------------------------------

    def times_from_uniform(self, u):
        """Training times from u ~ U[0, 1), one per sample (B,) float64: DDPM's uniform steps k = floor(u K) at
        t = (k + 1) / K; flow's mode with heavy tails f(u), logit-normal sigmoid(m + s Phi^-1(u)) or u itself, then
        the resolution shift. train.py draws u keyed by the sample's position, sample_t from a generator."""
        u = torch.as_tensor(u, dtype=torch.float64)
        if not self.is_flow:
            steps = (u * self.num_steps).floor().clamp(max=self.num_steps - 1)
            return (steps + 1) / self.num_steps
        if self.time_sampling == "logit_normal":
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.special.ndtri(u))
        elif self.time_sampling == "mode":
            t = mode_with_heavy_tails(u, self.mode_scale)
        else:
            t = u
        return resolution_shift(t, self.shift)

    def sample_t(self, n, device=None, generator=None):
        """n training times (float32), times_from_uniform of n uniforms from `generator` (a CPU torch.Generator, or
        None for the global RNG), returned on `device`."""
        t = self.times_from_uniform(torch.rand(n, generator=generator, dtype=torch.float64)).float()
        return t.to(device) if device is not None else t

    def __repr__(self):
        if self.is_flow:
            extra = f", time_sampling={self.time_sampling!r}, shift={self.shift}"
        else:
            extra = f", beta_schedule={self.beta_schedule!r}, zero_terminal_snr={self.zero_terminal_snr}"
        return f"Diffusion(objective={self.objective!r}{extra})"


if __name__ == "__main__":
    for objective in OBJECTIVES:
        diffusion = Diffusion(objective)
        t = diffusion.sample_t(100_000, generator=torch.Generator().manual_seed(0))
        gated = (diffusion.sigma_ratio(t) <= 4).float().mean()
        print(f"{diffusion}: mean t {t.mean():.3f}, fraction of training times with sigma/alpha <= 4: {gated:.3f}")
