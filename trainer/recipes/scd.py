"""The train spec of continuous-time consistency distillation (sCD) and training (sCT), SCD.md section 3.

The student is the pretrained MM-DiT in the TrigFlow wrapper plus a log-variance head; it starts from the
teacher's EMA weights. The frozen teacher is built, sharded and loaded the same way as the student. One
step: the teacher's guided velocity dx/dtau (or, for sCT, the noise-data pair's own), then the student's
with-grad F and its rearranged JVP J, the tangent g, and the loss that pulls F towards F^- + g, where F^- is
F with its gradient stopped. By default (``distill.jvp_pass``) J and F come from one pass: the network
carries the tangent next to its primal (``trainer.models.tangent``).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn as nn

from infra.config import ConfigError, JobConfig, ModelConfig
from trainer import checkpoint, flow, trigflow
from trainer.loop import resolve_precision
from trainer.models import tangent
from trainer.models.mmdit import MMDiT, canonical_name
from trainer.parallelize import materialize, parallelize, reshard
from trainer.recipes.base import Recipe
from trainer.rng import RankStreams, stream_seed

TAU_BUCKETS = 4  # loss metrics per quarter of [0, pi/2]
VAL_DTAU = 0.05  # step along the ODE of the validation consistency error


class TrigFlowStudent(nn.Module):
    """``student(x_in, tau, context, pooled, guidance) -> (F, u)``: the RF network as a TrigFlow velocity F
    (B, C, H, W) and the adaptive weight's log-variance u (B,) from a ``Linear(D, 1)`` on the network's
    conditioning vector (None without the head).

    The conversion to TrigFlow lives inside ``forward``, so a JVP of the student is a JVP of the whole
    wrapper, as section 2 requires. FSDP2, the optimizer, the EMA and checkpoints treat it as the model;
    ``trainer.parallelize`` shards ``net`` block by block and keeps the head in the root group.
    """

    # FSDP2 gathers fp32 parameters for this model so the JVP pass can run in fp32 (read by parallelize).
    fp32_compute_params = True

    def __init__(self, cfg: ModelConfig, logvar_head: bool = True):
        super().__init__()
        self.net = MMDiT(cfg)
        self.logvar = nn.Linear(cfg.hidden_size, 1) if logvar_head else None

    def forward(self, x_in: torch.Tensor, tau: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                guidance: torch.Tensor | None = None, tangents: tuple[torch.Tensor, torch.Tensor] | None = None):
        """-> (F, u); with ``tangents=(dx_in, dtau)``, (F, u, dF): F's directional derivative at frozen
        weights, computed next to the primal in the same pass (``trainer.models.tangent``)."""
        x_rf, t_rf = trigflow.rf_inputs(x_in, tau)
        if tangents is None:
            v, c = self.net(x_rf, t_rf, context, pooled, guidance, return_conditioning=True)
        else:
            dx_in, dtau = tangents
            dx_in = dx_in.to(torch.promote_types(dx_in.dtype, x_in.dtype))  # as forward-mode AD would
            v, c, dv = self.net(x_rf, t_rf, context, pooled, guidance, return_conditioning=True,
                                tangents=trigflow.rf_inputs_tangent(x_in, tau, dx_in, dtau))
        u = self.logvar(c).squeeze(-1).float() if self.logvar is not None else None
        F = trigflow.trigflow_from_rf(v, x_in, tau)
        if tangents is None:
            return F, u
        return F, u, trigflow.trigflow_from_rf_tangent(F, dv, x_in, tau, dx_in, dtau)

    def init_weights(self, seed: int = 0, assign=None) -> None:
        """The network's own scheme (same names, hence the same values as an unwrapped MMDiT), then a
        xavier-uniform head with zero bias (Sana-Sprint's logvar_linear)."""
        assign = assign or (lambda param, value: param.data.copy_(value))
        self.net.init_weights(seed, assign)
        if self.logvar is not None:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
            w = self.logvar.weight
            bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
            with torch.no_grad():
                assign(w, ((torch.rand(tuple(w.shape), generator=gen) * 2 - 1) * bound).to(w.dtype))
                assign(self.logvar.bias, torch.zeros(tuple(self.logvar.bias.shape), dtype=w.dtype))


class TrigFlowTeacher:
    """The frozen pretrained network as the guided TrigFlow ODE: ``velocity -> dx_tau/dtau``."""

    def __init__(self, net: nn.Module, empty_context: torch.Tensor, empty_pooled: torch.Tensor, sigma_d: float):
        self.net, self.sigma_d = net.requires_grad_(False).eval(), sigma_d
        self.empty_context, self.empty_pooled = empty_context, empty_pooled

    @torch.no_grad()
    def velocity(self, x_tau: torch.Tensor, tau: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 w: torch.Tensor | None) -> torch.Tensor:
        """sigma_d * (F_u + w (F_c - F_u)) in fp32; w None = conditional only (w = 1, half the cost)."""
        x_in = x_tau / self.sigma_d
        if w is None:
            F = trigflow.trigflow_velocity(self.net, x_in, tau, context, pooled)
        else:
            F = trigflow.guided_trigflow_velocity(self.net, x_in, tau, context, pooled, self.empty_context.to(x_in),
                                                  self.empty_pooled.to(x_in), w)
        reshard(self.net)  # a forward without backward leaves FSDP2's last block gathered
        return self.sigma_d * F.float()


class SCDRecipe(Recipe):
    """Distilling an MM-DiT into a 1-2 step consistency model (``distill.mode=scd``) or consistency-training
    it without a teacher (``distill.mode=sct``). The empty caption is the teacher's unconditional input for
    CFG. ``init_model`` loads the teacher and copies it into the student; ``at_step`` sets the step that the
    tangent warmup and the guidance stream are functions of.
    """

    name = "scd"
    # 1- and 2-step samples of the student; the teacher's grid comes from ``reference_samples``.
    sample_grids = {"student_1step": {"steps": 1}, "student_2step": {"steps": 2}}

    def __init__(self, cfg: JobConfig, empty_condition: dict[str, torch.Tensor]):
        super().__init__(cfg, empty_condition)
        d = cfg.distill
        if d.mode == "scd" and not d.teacher:
            raise ValueError(
                "distill.mode=scd needs distill.teacher: the directory of a pretraining checkpoint (one with "
                "COMPLETE in it) whose EMA weights are the teacher; or use distill.mode=sct"
            )
        if cfg.train.compile and d.jvp_pass == "forward_ad":
            # pytorch#187284: torch.compile has silently dropped forward-mode tangents. The fused and separate
            # passes carry the tangent as ordinary tensors, which compile like the primal (tests/trainer/test_scd.py).
            raise ValueError(
                "train.compile=true does not work with distill.jvp_pass=forward_ad (torch.compile can drop "
                "forward-mode tangents, pytorch#187284); use distill.jvp_pass=fused or separate, or train.compile=false"
            )
        self.sampled_guidance = d.mode == "scd" and d.guidance == "sampled"
        self.student_cfg = cfg.model.model_copy(update={"guidance_embed": self.sampled_guidance})
        self.teacher_cfg = cfg.model.model_copy(update={"guidance_embed": False})
        self.teacher: TrigFlowTeacher | None = None
        self._teacher_grid: torch.Tensor | None = None  # the frozen teacher's grid, sampled once
        self.step = 0

    # ---- driver side -------------------------------------------------------------------------------

    @classmethod
    def resolve_config(cls, cfg: JobConfig, runs_dir: str) -> JobConfig:
        """Fill ``distill.teacher`` (the config's, or the newest pretraining checkpoint under ``runs_dir``) and
        give the student the teacher's architecture. A local teacher is recorded as an absolute path, a remote
        one as its URL (each node's workers fetch it, see ``init_model``); only its config is read here."""
        uri = cfg.distill.teacher
        if not uri and cfg.distill.mode == "scd":
            found = checkpoint.latest(runs_dir, "rectified_flow")
            if found is None:
                raise ConfigError(
                    f"no teacher: pass --teacher CHECKPOINT (distill.teacher=...), or first pretrain one with "
                    f"`python orchestration/pretrain.py` (it writes {runs_dir}/RUN/checkpoint_STEP)"
                )
            uri = str(found)
        if not uri:
            return cfg
        model = checkpoint.read_config(uri).get("model", {})
        cfg = cfg.model_copy(deep=True)
        cfg.distill.teacher = uri if checkpoint.is_remote(uri) else str(checkpoint.local_path(uri))
        if model:
            cfg.model = ModelConfig.model_validate({**model, "guidance_embed": cfg.model.guidance_embed})
        return cfg

    # ---- model -------------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        """The student on the meta device; the loop parallelizes, materialises, then calls ``init_model``."""
        with torch.device("meta"):
            return TrigFlowStudent(self.student_cfg, logvar_head=self.cfg.distill.weighting == "adaptive")

    def init_model(self, model: nn.Module) -> None:
        """sCD: build and load the frozen teacher (sharded like the student), and start the student from it;
        sCT: start the student from ``distill.teacher`` when one is given."""
        uri = self.cfg.distill.teacher
        if not uri:
            return
        if checkpoint.is_remote(uri) and not self.cfg.run.cache_dir:
            raise ValueError(f"distill.teacher={uri} is remote: set run.cache_dir, where each node fetches it once")
        path = checkpoint.fetch(uri, self.cfg.run.cache_dir)
        self.check_teacher(path)
        if self.cfg.distill.mode == "sct":
            checkpoint.load_weights(model.net, path)
            return
        net = self.build_teacher(next(model.parameters()).device, path)
        self.teacher = TrigFlowTeacher(net, self.empty_context, self.empty_pooled, self.cfg.distill.sigma_d)
        teacher_params = {canonical_name(n): p for n, p in net.named_parameters()}
        with torch.no_grad():
            for n, p in model.net.named_parameters():
                name = canonical_name(n)
                if name in teacher_params:  # all but the guidance embedding, which starts at zero output
                    p.copy_(teacher_params[name])  # DTensor to DTensor: same layout, local copies

    def build_teacher(self, device: torch.device, path: Path) -> nn.Module:
        with torch.device("meta"):
            net = MMDiT(self.teacher_cfg)
        # Nothing is back-propagated through the teacher: no activation checkpointing.
        train = self.cfg.train.model_copy(update={"activation_checkpointing": False})
        cfg = self.cfg.model_copy(update={"train": train})
        net = materialize(parallelize(net, cfg, resolve_precision(self.cfg, device)), device, self.cfg.train.seed)
        checkpoint.load_weights(net, path)
        return net

    def check_teacher(self, path: str | Path) -> None:
        """The local teacher checkpoint exists, is complete and was trained with this job's model.* sizes."""
        model = checkpoint.read_config(str(path)).get("model", {})
        for key, value in model.items():
            if key == "guidance_embed" or key not in ModelConfig.model_fields:
                continue
            ours = getattr(self.teacher_cfg, key)
            if (list(ours) if isinstance(ours, tuple) else ours) != value:
                raise ValueError(
                    f"the teacher {Path(path)} was trained with model.{key}={value!r} but this job has "
                    f"model.{key}={ours!r}; the student must have the teacher's architecture"
                )

    # ---- the objective -----------------------------------------------------------------------------

    def at_step(self, step: int) -> None:
        self.step = step

    def guidance_scales(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        d = self.cfg.distill
        if not self.sampled_guidance:
            return torch.full((n,), d.cfg_scale, device=device)
        u = torch.rand(n, generator=generator, device=generator.device).to(device)
        return d.cfg_min + (d.cfg_max - d.cfg_min) * u

    def loss(self, model: nn.Module, batch: dict, streams: RankStreams) -> tuple[torch.Tensor, dict]:
        """Draw x0, z, tau and w from the rank's streams at this step, then the sCD (or sCT) loss."""
        d = self.cfg.distill
        latents = batch["latent"].float()
        B, device = latents.shape[0], latents.device
        z = d.sigma_d * torch.randn(latents.shape, generator=streams["noise"], device=device)
        tau = trigflow.sample_tau(B, d.p_mean, d.p_std, d.sigma_d, streams["timesteps"], device, d.tau_max)
        guidance_gen = torch.Generator(device=streams.device)
        guidance_gen.manual_seed(stream_seed(streams.seed, streams.rank, "guidance", self.step))
        w = self.guidance_scales(B, guidance_gen, device)
        return self.objective(model, d.sigma_d * latents, z, tau, batch["text_tokens"], batch["text_pooled"], w)

    def objective(self, model: nn.Module, x0: torch.Tensor, z: torch.Tensor, tau: torch.Tensor,
                  context: torch.Tensor, pooled: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The loss of SCD.md section 3 for given x0 = sigma_d * latents, z ~ N(0, sigma_d^2), tau and w (B,)."""
        d = self.cfg.distill
        sd = d.sigma_d
        c, s = trigflow.expand_like(torch.cos(tau), x0), trigflow.expand_like(torch.sin(tau), x0)
        x_tau = c * x0 + s * z
        x_in = x_tau / sd
        guidance = w if self.sampled_guidance else None

        if d.mode == "scd":
            fixed_one = not self.sampled_guidance and d.cfg_scale == 1.0
            dxdt = self.teacher_velocity(x_tau, tau, context, pooled, None if fixed_one else w)
        else:
            dxdt = trigflow.sct_velocity(x0, z, tau)

        F, u, J = self.student_passes(model, x_in, tau, dxdt, context, pooled, guidance)
        # theta^- = stop-grad theta: F^- is the with-grad pass's own value, so F - F^- is exactly zero and the
        # gradient is the tangent's alone. An F^- from another pass (the fp32 tangent pass under bf16 autocast)
        # leaves their rounding difference in the loss and biases the gradient (issue 11).
        F_minus = F.detach()
        r = trigflow.tangent_warmup(self.step, d.tangent_warmup_steps, d.tangent_warmup)
        g = trigflow.scd_tangent(F_minus, J, dxdt, x_tau, tau, sd, r)  # (B, C, H, W), float64
        finite = torch.isfinite(g).flatten(1).all(1)
        g = torch.where(finite[:, None, None, None], g, 0.0)
        g, g_norm = trigflow.normalize_tangent(g, d.tangent_norm_eps)

        # The loss in at least fp32.
        dtype = torch.promote_types(F_minus.dtype, torch.float32)
        finite = finite & torch.isfinite(F.detach()).flatten(1).all(1)
        mse = (F.to(dtype) - F_minus.to(dtype) - g.to(dtype)).pow(2).flatten(1).mean(1)
        if d.weighting == "adaptive":
            per_sample = trigflow.prior_weight(tau, sd).to(dtype) * torch.exp(-u.to(dtype)) * mse + u.to(dtype)
        else:
            per_sample = mse
        # Non-finite guard: such a sample contributes zero (the loop skips a step whose gradient is non-finite).
        per_sample = torch.where(finite, per_sample, torch.zeros_like(per_sample))
        return per_sample.mean(), self.metrics(per_sample.detach(), tau, r, g_norm, u, finite)

    def jvp_pass(self) -> str:
        """distill.jvp_pass with ``auto`` resolved: fused, which measured as exact as the others in fp32 and
        under bf16 autocast, and saves a forward (docs/PERFORMANCE.md)."""
        chosen = self.cfg.distill.jvp_pass
        return "fused" if chosen == "auto" else chosen

    def tangent_precision(self, device_type: str) -> str:
        """distill.tangent_precision under bf16 autocast; fp32 otherwise: an fp32 (or float64) run's tangent is
        computed at its primal's precision."""
        return self.cfg.distill.tangent_precision if torch.is_autocast_enabled(device_type) else "fp32"

    def student_passes(self, model: nn.Module, x_in, tau, dxdt, context, pooled, guidance):
        """(F, u) with grad and J without: F's rearranged JVP along the teacher's dx/dtau at theta^- =
        stop-grad theta (no EMA target).

        fused: one pass; the primal records its graph, the tangent is computed next to it without grad (rCM's
        fused step; saves a forward). separate: a no-grad tangent pass, then the with-grad pass. forward_ad:
        the tangent pass through ``torch.func.jvp``, then the with-grad pass. The tangent passes' own primal is
        discarded: F^- is the with-grad F (see ``objective``). Under bf16 autocast, distill.tangent_precision
        sets the tangent's matmuls (``tangent.matmul_precision``); a separate or forward_ad tangent pass runs
        its primal in fp32, or under the loop's autocast when the tangent is bf16 anyway.
        """
        sd = self.cfg.distill.sigma_d
        device_type = x_in.device.type
        how, precision = self.jvp_pass(), self.tangent_precision(device_type)
        tangents = trigflow.rearranged_tangents(tau, dxdt, sd)
        if how == "fused":
            with tangent.matmul_precision(precision):
                F, u, J = model(x_in, tau, context, pooled, guidance, tangents=tangents)
            return F, u, trigflow.check_tangent(F, J)
        autocast = contextlib.nullcontext() if precision == "bf16" else torch.autocast(device_type, enabled=False)
        with tangent.matmul_precision(precision), autocast:
            if how == "separate":
                with torch.no_grad():
                    primal, _, J = model(x_in, tau, context, pooled, guidance, tangents=tangents)
                J = trigflow.check_tangent(primal, J)
            else:
                _, J = trigflow.rearranged_jvp(
                    lambda x, t: model(x, t, context, pooled, guidance)[0], x_in, tau, dxdt, sd
                )
        F, u = model(x_in, tau, context, pooled, guidance)  # under the loop's autocast
        return F, u, J

    def teacher_velocity(self, x_tau, tau, context, pooled, w) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("the sCD teacher is not loaded: call recipe.init_model(student) first")
        return self.teacher.velocity(x_tau, tau, context, pooled, w)

    @staticmethod
    def metrics(per_sample, tau, r, g_norm, u, finite) -> dict[str, torch.Tensor]:
        """Warmup r, mean ||g|| before normalisation, mean u, the count of guarded samples, and the loss per
        quarter of [0, pi/2] as sums and counts (the loop averages each over ranks; the ratio is the mean)."""
        device = per_sample.device
        kept = finite.float()
        out = {
            "tangent_warmup_r": torch.tensor(float(r), device=device),
            "tangent_norm": (torch.nan_to_num(g_norm.float()) * kept).sum() / kept.sum().clamp(min=1),
            "logvar_mean": u.detach().float().mean() if u is not None else torch.zeros((), device=device),
            "nonfinite_samples": (~finite).float().sum(),
            "tau_mean": tau.detach().float().mean(),
        }
        bucket = (tau.detach() / (math.pi / 2) * TAU_BUCKETS).long().clamp(0, TAU_BUCKETS - 1)
        for i in range(TAU_BUCKETS):
            hit = (bucket == i) & finite
            out[f"tau{i}_loss_sum"] = per_sample.float()[hit].sum()
            out[f"tau{i}_loss_count"] = hit.float().sum()
        return out

    # ---- validation and sampling --------------------------------------------------------------------

    @torch.no_grad()
    def validation_losses(self, model: nn.Module, batches: list[dict], seed: int) -> dict[str, torch.Tensor]:
        """Consistency error at fixed times: ||f(x_tau, tau) - f(x_tau', tau')||^2 / (sigma_d dtau)^2 per element,
        with x_tau' one step of dtau = 0.05 along the teacher's ODE (sCT: the pair's exact x_tau'). Zero
        for a perfect consistency model; it estimates ||df/dtau||^2, what sCD drives down. The times are
        ``train.val_timesteps`` (RF times) mapped to their equal-SNR tau = arctan(t / (1 - t)). Returns sums
        over samples per time, as the loop expects."""
        d = self.cfg.distill
        sd = d.sigma_d
        out: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            latents = batch["latent"].float()
            B, device = latents.shape[0], latents.device
            gen = torch.Generator(device=device).manual_seed(seed * 7919 + i)
            x0, z = sd * latents, sd * torch.randn(latents.shape, generator=gen, device=device)
            context, pooled = batch["text_tokens"], batch["text_pooled"]
            w = torch.full((B,), d.cfg_scale, device=device)
            guidance = w if self.sampled_guidance else None

            def f(x_tau, tau):
                with torch.autocast(device.type, enabled=False):
                    return trigflow.consistency_fn(model(x_tau / sd, tau, context, pooled, guidance)[0], x_tau, tau, sd)

            for t_val in self.cfg.train.val_timesteps:
                tau = torch.full((B,), min(math.atan2(t_val, 1 - t_val), d.tau_max), device=device)
                tau_prev = (tau - VAL_DTAU).clamp(min=0)
                step = trigflow.expand_like(tau - tau_prev, x0)
                x_tau = trigflow.expand_like(torch.cos(tau), x0) * x0 + trigflow.expand_like(torch.sin(tau), z) * z
                if d.mode == "scd":
                    x_prev = x_tau - step * self.teacher_velocity(x_tau, tau, context, pooled, w)
                else:
                    x_prev = (trigflow.expand_like(torch.cos(tau_prev), x0) * x0
                              + trigflow.expand_like(torch.sin(tau_prev), z) * z)
                err = ((f(x_tau, tau) - f(x_prev, tau_prev)) / (sd * step)).pow(2).flatten(1).mean(1)
                key = f"{t_val:g}"
                out[key] = out.get(key, 0.0) + err.sum()
        return out

    # ---- evaluation grids ----------------------------------------------------------------------------

    TEACHER_STEPS = 50

    @torch.no_grad()
    def reference_samples(self, context: torch.Tensor, pooled: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """The teacher's grid for the same prompts (Euler, 50 steps, CFG at distill.cfg_scale), computed once:
        the teacher is frozen. Same starting noise as the student's grids (shared seed and shape)."""
        if self.teacher is None:
            return {}
        if self._teacher_grid is None:
            size = self.cfg.data.latent_size
            gen = torch.Generator(device=context.device).manual_seed(seed)
            noise = torch.randn((context.shape[0], self.cfg.model.in_channels, size, size), generator=gen,
                                device=context.device)
            self._teacher_grid = flow.euler_sample(
                self.teacher.net, noise, context, pooled, steps=self.TEACHER_STEPS,
                cfg_scale=self.cfg.distill.cfg_scale, shift=self.cfg.sample.shift,
                empty_context=self.empty_context.to(context.device), empty_pooled=self.empty_pooled.to(context.device),
            )
            reshard(self.teacher.net)
        return {"teacher": self._teacher_grid}

    @torch.no_grad()
    def sample(
        self, model: nn.Module, context: torch.Tensor, pooled: torch.Tensor, generator: torch.Generator,
        steps: int | None = None, cfg_scale: float | None = None, shift: float | None = None,
        mid_times: list[float] | None = None,
    ) -> torch.Tensor:
        """1- or multi-step consistency samples as latents (B, C, H, W). ``steps`` defaults to 2 (one
        intermediate time, distill.sample_mid_times[0]); ``cfg_scale`` is the w fed to a student with a
        guidance embedding (default distill.cfg_scale) and is otherwise baked into the student; ``shift``
        does not apply to TrigFlow sampling and is ignored."""
        d = self.cfg.distill
        mid = d.sample_mid_times if mid_times is None else mid_times
        times = trigflow.sampling_times(steps or min(2, 1 + len(mid)), d.tau_max, mid)
        B, size = context.shape[0], self.cfg.data.latent_size
        noise = torch.randn(
            (B, self.cfg.model.in_channels, size, size), generator=generator, device=generator.device
        ).to(context.device)
        w = torch.full((B,), d.cfg_scale if cfg_scale is None else cfg_scale, device=context.device)
        guidance = w if self.sampled_guidance else None
        x0 = trigflow.consistency_sample(
            lambda x, t: model(x, t, context, pooled, guidance)[0], noise, d.sigma_d, times, generator
        )
        reshard(model)
        return x0 / d.sigma_d
