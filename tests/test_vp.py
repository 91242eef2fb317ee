"""VP (ε / v-prediction) models in flow coordinates: the deterministic DDIM step of diffusers'
``DDIMScheduler.step`` (Song et al. 2021, Eq. 12, η = 0) equals the Euler step of pisces_rl's flow sampler."""
import pytest
import torch
from diffusers import DDIMScheduler

from pisces_rl.models.vp import (alpha_bar_at, alpha_bar_from_sigma, sigma_from_alpha_bar, vp_flow_schedule,
                                 vp_to_flow, vp_velocity)


@pytest.mark.parametrize("prediction_type,spacing,one", [("epsilon", "leading", False), ("v_prediction", "trailing", True),
                                                          ("sample", "leading", True)])
def test_ddim_step_is_the_flow_euler_step(prediction_type, spacing, one):
    sched = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=one, steps_offset=1,
                          prediction_type=prediction_type, timestep_spacing=spacing)
    n = 10
    timesteps, sigmas = vp_flow_schedule(sched, n, torch.device("cpu"))
    assert timesteps.shape == (n,) and sigmas.shape == (n + 1,)
    assert bool((sigmas[1:] < sigmas[:-1]).all()) and (float(sigmas[-1]) == 0.0) == one
    sched.set_timesteps(n)
    assert torch.equal(timesteps.long(), sched.timesteps.long())
    gen = torch.Generator().manual_seed(0)
    z, out = torch.randn(2, 4, 3, 8, 8, generator=gen), torch.randn(2, 4, 3, 8, 8, generator=gen)
    for i in (0, n // 2, n - 1):
        ref = sched.step(out, int(timesteps[i]), z, eta=0.0).prev_sample
        ab = alpha_bar_at(sched, timesteps[i].expand(2), z)
        x_next = vp_to_flow(z, ab) + (sigmas[i + 1] - sigmas[i]) * vp_velocity(out, z, ab, prediction_type)
        assert torch.allclose(vp_to_flow(ref, alpha_bar_from_sigma(sigmas[i + 1])), x_next, atol=1e-5)


def test_sigma_and_alpha_bar_are_inverse_and_uneven_grids_are_refused():
    ab = torch.linspace(0.0, 1.0, 11)
    assert torch.allclose(alpha_bar_from_sigma(sigma_from_alpha_bar(ab)), ab, atol=1e-6)
    sched = DDIMScheduler(timestep_spacing="trailing")
    with pytest.raises(ValueError, match="evenly spaced"):
        vp_flow_schedule(sched, 7, torch.device("cpu"))
    with pytest.raises(ValueError, match="prediction_type"):
        vp_velocity(torch.zeros(1, 2), torch.zeros(1, 2), torch.full((1, 1), 0.5), "flow")
