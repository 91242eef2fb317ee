"""DiffusionNFT: online RL on the forward process (Zheng et al., arXiv 2509.16117; NVlabs/DiffusionNFT).

No likelihoods, no SDE, no stored trajectories: the policy is trained by a flow-matching regression on its
own clean samples, pulled toward the good ones and pushed from the bad ones through an *implicit negative*.
One iteration, per process (B videos = whole prompt groups; ``T`` sampler steps; reference lines are
``scripts/train_nft_sd3.py`` of NVlabs/DiffusionNFT@24af555)::

    x0 [B, C, F, h, w]  <- ODE sampler (nft.eta = 0), CFG-free (nft.guidance_scale = 1), with the OLD policy
    R [B]               <- RewardServer(decode(x0)).total                                (weighted reward sum)
    A = (R - mean_group R) / (std R + 1e-4)       std over every reward of the iteration, all processes (T:750)
    r = clamp(clamp(A, -c, c) / c / 2 + 0.5, 0, 1)  in [0, 1], c = train.adv_clip_max = 5      (T:910-929)
    per video, K_t = int(0.99 T) grid levels of the sampler's own schedule, a random subset    (T:569, 810-816)
    for each level t = sigma_j: eps ~ N(0, I) fresh,  x_t = (1 - t) x0 + t eps                      (T:868-870)
        v_old = v_old(x_t, t) (no grad),  v = v_theta(x_t, t),  v_ref = LoRA disabled (no grad)      (T:873-904)
        v+ = beta v + (1 - beta) v_old          v- = (1 + beta) v_old - beta v                      (T:934-937)
        L+- = mean((x_t - t v+- - x0)^2) / sg(max(mean|x_t - t v+- - x0|, 1e-5))   adaptive, x0 space (T:940-957)
        loss = c * mean_B[(r L+ + (1 - r) L-) / beta] + kl_weight * mean((v - v_ref)^2)             (T:959-970)
        backward(loss / (gradient_accumulation_steps * K_t))      one optimiser step per window     (T:983-1004)
    after the iteration: eta = min(rate * (optimizer steps - start), max)   (0 before start)        (T:169-189)
                         old <- eta * old + (1 - eta) * theta                                         (T:1034-1039)

The old policy is a copy of the trainable parameters, swapped into the live model for sampling and for
``v_old`` (:class:`OldPolicy`, the :class:`~pisces_rl.trainer.backprop.LoraEMA` mechanism): it works with LoRA
and full fine-tuning, single process, DDP and ZeRO-2, where every process holds the whole weights. ZeRO-3
partitions them, so a swap would write into shards: NFTTrainer refuses it with a clear error. The copy and
its optimiser-step count are checkpointed, so a resumed run continues exactly.

The run around the update (group sampler, RewardServer, logging, evaluation, checkpoints, resume) is
:class:`~pisces_rl.trainer.base.TrainerBase`, shared with GRPO. Everything random is a pure function of
``(seed, iteration, process)``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor

from ..config import GRPOConfig
from ..config.nft import nft_batch_arithmetic
from ..rollout import sample_rollout
from .accel import gradient_sync, zero_stage
from .advantages import group_index
from .backprop import LoraEMA
from .base import RewardsArg, TrainerBase, seed_for

__all__ = ["NFTTrainer", "NFTBatch", "OldPolicy", "nft_loss", "nft_advantages", "optimality_weight",
           "old_policy_decay"]


# ---------------------------------------------------------------------- the maths, as plain functions
def _column(x: Tensor, like: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` broadcastable against ``like``."""
    return x.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def old_policy_decay(step: int, start: int = 0, rate: float = 1e-3, maximum: float = 0.5) -> float:
    """``eta = 0`` for ``step < start``, else ``min(rate * (step - start), maximum)`` (reference ``return_decay``,
    T:169-189: type 1 = (0, 0.001, 0.5), type 2 = (75, 0.0075, 0.999), type 0 = rate 0)."""
    return 0.0 if step < start else min(rate * (step - start), maximum)


def nft_advantages(rewards: Tensor, group_ids, all_rewards: Optional[Tensor] = None, reward_std: str = "global",
                   eps: float = 1e-4) -> Tensor:
    """``A_i = (R_i - mean_{g(i)} R) / (std + eps)``, float64 ``[B]`` (``flow_grpo/stat_tracking.py:26-31``).

    ``std`` is the population std of ``all_rewards`` (every process's rewards of the iteration; default:
    ``rewards``) for ``reward_std="global"``, or of the group for ``"group"``. Group means are local: the
    group sampler keeps whole groups on a process. NaN rewards ("not applicable") are left out of every
    statistic and get ``A = NaN`` (the loss ignores them).
    """
    R = rewards.detach().double().cpu()
    valid = ~torch.isnan(R)
    inv, n = group_index(group_ids)
    zeros = R.new_zeros(n)
    count = zeros.index_add(0, inv, valid.double())
    mean = zeros.index_add(0, inv, torch.where(valid, R, 0.0)) / count.clamp(min=1)
    centred = R - mean[inv]
    if reward_std == "global":
        pool = (rewards if all_rewards is None else all_rewards).detach().double().cpu()
        pool = pool[~torch.isnan(pool)]
        std = pool.std(unbiased=False) if pool.numel() else R.new_zeros(())
    elif reward_std == "group":
        sq = zeros.index_add(0, inv, torch.where(valid, centred, 0.0) ** 2)
        std = (sq / count.clamp(min=1)).sqrt()[inv]
    else:
        raise ValueError(f"reward_std must be 'global' or 'group', got {reward_std!r} (nft.reward_std)")
    return centred / (std + eps)


def optimality_weight(advantages: Tensor, clip: float = 5.0) -> Tensor:
    """``r = clamp(clamp(A, -c, c) / c / 2 + 0.5, 0, 1)`` in [0, 1]; ``A = 0`` gives ``r = 1/2`` (T:910-929)."""
    return (advantages.clamp(-clip, clip) / clip / 2.0 + 0.5).clamp(0.0, 1.0)


def _x0_loss(x0_hat: Tensor, x0: Tensor, adaptive: bool) -> Tensor:
    """Per-sample ``mean((x0_hat - x0)^2)``, divided by ``sg(max(mean|x0_hat - x0|, 1e-5))`` (float64) if adaptive."""
    dims = tuple(range(1, x0.dim()))
    sq = (x0_hat - x0) ** 2
    if not adaptive:
        return sq.mean(dims)
    with torch.no_grad():
        weight = (x0_hat.double() - x0.double()).abs().mean(dims, keepdim=True).clamp(min=1e-5)
    return (sq / weight).mean(dims).to(x0.dtype)


def nft_loss(v: Tensor, v_old: Tensor, x_t: Tensor, x0: Tensor, t: Tensor, r: Tensor, beta: float,
             adaptive: bool = True, scale: float = 5.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The negative-aware flow-matching loss per video (module docstring, T:934-960).

    Args:
        v: ``[B, C, F, h, w]`` velocity of the trained policy (with grad); ``v_old`` the old policy's (no grad).
        x_t: ``[B, ...]`` noised samples ``(1 - t) x0 + t eps``; ``x0`` the clean samples.
        t: ``[B]`` noise levels sigma in (0, 1]; ``r``: ``[B]`` optimality weights in [0, 1].
        beta: NFT beta (> 0); ``scale``: the reference's ``adv_clip_max`` factor.
    Returns:
        ``(loss [B], stats)``: ``scale * (r L+ + (1 - r) L-) / beta`` and the detached ``L+``, ``L-`` means.
    """
    v_old = v_old.detach()
    positive = beta * v + (1.0 - beta) * v_old
    negative = (1.0 + beta) * v_old - beta * v
    tt = _column(t, x_t)
    l_pos = _x0_loss(x_t - tt * positive, x0, adaptive)
    l_neg = _x0_loss(x_t - tt * negative, x0, adaptive)
    r = r.to(l_pos.dtype)
    loss = scale * (r * l_pos + (1.0 - r) * l_neg) / beta
    return loss, {"positive_loss": l_pos.detach().mean(), "negative_loss": l_neg.detach().mean()}


class OldPolicy(LoraEMA):
    """The old (data-generating) policy: a float32 copy of the trainable parameters, ``swapped()`` into the
    live model for sampling and ``v_old``; ``update_from_live(eta)``: ``old <- eta * old + (1 - eta) * theta``.

    ``optimizer_steps`` (the step of the decay schedule) is part of the checkpointed state.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]):
        super().__init__(named_parameters, decay=0.0)
        self.optimizer_steps = 0

    def update_from_live(self, eta: float) -> None:
        if not 0 <= eta < 1:
            raise ValueError(f"old-policy decay must be in [0, 1), got {eta}")
        self.decay = float(eta)
        self.update()

    @torch.no_grad()
    def distance(self) -> float:
        """``||theta - old|| / ||old||`` over all trainable parameters (0 when old is zero)."""
        diff = sum(float((p.detach().float() - self.shadow[n]).square().sum()) for n, p in self.params.items())
        norm = sum(float(s.square().sum()) for s in self.shadow.values())
        return math.sqrt(diff / norm) if norm > 0 else 0.0

    def state_dict(self) -> dict:
        return {**super().state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.optimizer_steps = int(state["optimizer_steps"])


@dataclass
class NFTBatch:
    """One process's samples of one iteration (B videos, groups of G contiguous)."""

    latents: Tensor                            # [B, C, F, h, w] clean samples x0 (the sampler's last latent), fp32
    videos: Optional[Tensor]                   # [B, F, C, H, W] decoded x0 in [0, 1] (dropped once scored)
    prompts: list[str]                         # B
    group_ids: Tensor                          # [B] long
    prompt_embeds: Tensor                      # [B, L, D]
    negative_prompt_embeds: Optional[Tensor]   # [B, L, D] when nft.guidance_scale > 1, else None

    def __len__(self) -> int:
        return len(self.prompts)


# ---------------------------------------------------------------------- the trainer
class NFTTrainer(TrainerBase):
    """DiffusionNFT post-training (``train.algorithm: nft``), usable from Python or through a recipe.

    Args:
        config: a :class:`~pisces_rl.config.GRPOConfig`; NFT's own knobs are ``config.nft``.
        rewards: ``None`` (build from ``config.rewards``), a :class:`RewardServer`, or ``{name: reward}`` /
            ``{name: (reward, weight)}`` (black-box rewards are fine: NFT needs no reward gradient).
        policy: an already built :class:`~pisces_rl.models.VideoPolicy` (default: from ``config.model``).
        prompts: prompts overriding ``config.data.prompts``.

    Example::

        trainer = NFTTrainer(load_config(GRPOConfig, "recipes/configs/nft_tiny_cpu.yaml", ["train.max_steps=2"]))
        trainer.train()
    """

    name = "NFT"

    def __init__(self, config: GRPOConfig, rewards: RewardsArg = None, policy=None, prompts: Optional[list] = None):
        self._setup(config, rewards, policy, nft_batch_arithmetic)
        cfg, acc = self.config, self.accelerator
        if zero_stage(acc) == 3:
            raise ValueError("NFT keeps a copy of the whole trainable weights as the old policy and swaps it in for "
                             "sampling; ZeRO-3 partitions them across processes. Launch with ZeRO-2 or DDP "
                             "(recipes/accelerate/zero2.yaml, ddp.yaml)")
        self._setup_prompts(prompts)
        self._setup_optimizer(self.batch["optimizer_steps_per_iteration"] * cfg.train.max_steps)
        self.old = OldPolicy([(n, p) for n, p in self.policy.transformer.named_parameters() if p.requires_grad])
        acc.register_for_checkpointing(self.old)
        self.rollout_sampling = dataclasses.replace(cfg.sampling, eta=cfg.nft.eta,
                                                    guidance_scale=cfg.nft.guidance_scale)
        self.timesteps, self.sigmas = self.policy.flow_schedule(
            cfg.sampling.num_inference_steps, (cfg.sampling.num_frames, cfg.sampling.height, cfg.sampling.width))  # [T], [T+1]

    # ------------------------------------------------------------------ one iteration
    def train_step(self, iteration: int) -> dict[str, float]:
        """Sample with the old policy, score, optimality weights, regression updates, old-policy update."""
        batch = self.sample(iteration)                                        # x0 [B, C, F, h, w]
        scores = self.rewards(batch.videos, batch.prompts)                    # [B, R], [B]
        batch.videos = None                                                   # the update needs latents only
        r = self.optimality(scores.total, batch.group_ids)                    # [B]
        metrics = self.update(batch, r)
        metrics["train/update_ratio"] = self.old.distance()                   # ||theta - old|| / ||old||
        eta = old_policy_decay(self.old.optimizer_steps, self.config.nft.old_decay_start,
                               self.config.nft.old_decay_rate, self.config.nft.old_decay_max)
        self.old.update_from_live(eta)
        metrics["train/old_eta"] = eta
        metrics.update(self._reward_metrics(scores))
        return metrics

    def sample(self, iteration: int) -> NFTBatch:
        """This process's clean samples for ``iteration``, drawn by the old policy with ``nft.eta`` / CFG."""
        prompts, group_ids = self.sampler.prompts_for_iteration(iteration)
        sbs = self.config.train.sample_batch_size
        gen = torch.Generator(device="cpu").manual_seed(seed_for(self.config.train.seed, iteration,
                                                              self.accelerator.process_index))
        self.policy.transformer.eval()
        chunks = []
        with torch.no_grad(), self.old.swapped():
            for i in range(0, len(prompts), sbs):
                roll = sample_rollout(self.policy, prompts[i:i + sbs], self.rollout_sampling, generator=gen)
                chunks.append((roll.latents[:, -1].float(), roll.videos, roll.prompt_embeds,
                               roll.negative_prompt_embeds))
        negative = None if chunks[0][3] is None else torch.cat([c[3] for c in chunks])
        return NFTBatch(torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]), list(prompts),
                        torch.as_tensor(group_ids), torch.cat([c[2] for c in chunks]), negative)

    def optimality(self, total: Tensor, group_ids: Tensor) -> Tensor:
        """``r [B]`` from the weighted reward totals; NaN where a video has no reward (left out of the loss)."""
        acc = self.accelerator
        everyone = acc.gather(total.float().to(acc.device).contiguous()).cpu()            # [B * processes]
        adv = nft_advantages(total, group_ids, everyone, self.config.nft.reward_std)
        return optimality_weight(adv, self.config.train.adv_clip_max).float()

    def update(self, batch: NFTBatch, r: Tensor) -> dict[str, float]:
        """Inner epochs over micro-batches x K_t grid levels; one optimiser step per window of
        ``gradient_accumulation_steps`` micro-batches x K_t backward passes (:func:`gradient_sync` marks it)."""
        t, acc = self.config.train, self.accelerator
        k = self.batch["train_timesteps_per_video"]
        window = t.gradient_accumulation_steps * k
        total = t.num_iterations * math.ceil(len(batch) / t.train_batch_size) * k
        gen = torch.Generator().manual_seed(seed_for(t.seed + 1, self.step, acc.process_index))
        known = r[~torch.isnan(r)]
        stats: dict[str, list[float]] = {"r_mean": [float(known.mean())] if len(known) else [],
                                         "r_std": [float(known.std(unbiased=False))] if len(known) else [],
                                         "rewarded_fraction": [len(known) / len(r)]}
        self.model.train()
        n = 0
        for _ in range(t.num_iterations):
            order = torch.randperm(len(batch), generator=gen)
            for mb in order.split(t.train_batch_size):
                for s in self._micro_batch_losses(batch, r, mb, k, gen):
                    n += 1
                    boundary = n % window == 0 or n == total
                    with gradient_sync(acc, self.model, sync=boundary):
                        acc.backward(s.pop("_loss") / window)
                    if boundary:
                        s["grad_norm"] = self._optimizer_step()
                        self.old.optimizer_steps += 1
                    for key, value in s.items():
                        stats.setdefault(key, []).append(float(value))
        return {f"train/{key}": sum(v) / len(v) for key, v in stats.items() if v}

    def training_levels(self, k: int, count: int, gen: torch.Generator) -> Tensor:
        """``[count, k]`` grid indices: per video a random permutation of the T sampler levels, the first k."""
        steps = self.config.sampling.num_inference_steps
        return torch.stack([torch.randperm(steps, generator=gen)[:k] for _ in range(count)])

    def _micro_batch_losses(self, batch: NFTBatch, r: Tensor, mb: Tensor, k: int, gen: torch.Generator):
        """Yield, for each of the micro-batch's K_t levels, ``{"_loss": loss with grad, stats...}``.

        The old policy's (and reference's) velocities of all K_t levels are computed first, in one swap, so
        the trained forwards and their backward passes always see the live weights.
        """
        nft, t = self.config.nft, self.config.train
        timesteps, sigmas = self.timesteps, self.sigmas                                          # [T], [T+1]
        x0 = batch.latents[mb]
        levels = self.training_levels(k, len(mb), gen).to(x0.device)                             # [b, K_t]
        noise = torch.randn((len(mb), k, *x0.shape[1:]), generator=gen).to(x0.device)         # [b, K_t, C, F, h, w]
        sig = sigmas[levels]                                                                    # [b, K_t]
        x_t = [(1 - _column(sig[:, j], x0)) * x0 + _column(sig[:, j], x0) * noise[:, j] for j in range(k)]
        embeds = batch.prompt_embeds[mb]
        negative = None if batch.negative_prompt_embeds is None else batch.negative_prompt_embeds[mb]
        cond = (embeds, negative, nft.guidance_scale)
        with torch.no_grad():
            with self.old.swapped():
                v_old = [self.policy.predict_velocity(x_t[j], timesteps[levels[:, j]], *cond) for j in range(k)]
            v_ref = None
            if nft.kl_weight > 0:
                with self.policy.lora_disabled():
                    v_ref = [self.policy.predict_velocity(x_t[j], timesteps[levels[:, j]], *cond) for j in range(k)]
        rr = r[mb].to(x0.device)
        valid = ~torch.isnan(rr)
        rr = torch.where(valid, rr, torch.full_like(rr, 0.5))
        for j in range(k):
            v = self.policy.predict_velocity(x_t[j], timesteps[levels[:, j]], *cond)
            per_video, s = nft_loss(v, v_old[j], x_t[j], x0, sig[:, j], rr, nft.beta, nft.adaptive_weight,
                                    scale=t.adv_clip_max)
            policy_loss = (per_video * valid.to(per_video.dtype)).mean()
            loss = policy_loss
            s["old_deviation"] = ((v.detach() - v_old[j]) ** 2).mean()
            if v_ref is not None:
                kl = ((v - v_ref[j]) ** 2).mean()
                s["kl"] = kl.detach()
                loss = loss + nft.kl_weight * kl
            s.update(policy_loss=policy_loss.detach(), loss=loss.detach(), sigma=sig[:, j].mean(), _loss=loss)
            yield s
