"""OT quality / semantic rewards on the tiny BLIP encoder: maths, ablation switches, gradients, errors."""
import numpy as np
import ot
import pytest
import torch

from pisces_rl.encoders import BlipVideoTextEncoder
from pisces_rl.ot.sinkhorn import marginal_relaxation
from pisces_rl.rewards._ot_cost import OTAttentionFuser, fuse_attention, token_transport_cost
from pisces_rl.rewards.ot_quality import OTQualityReward
from pisces_rl.rewards.ot_semantic import OTSemanticReward

PROMPTS = ["a red circle moving left", "two blue squares", "a red circle moving left"]


@pytest.fixture(scope="module")
def encoder():
    return BlipVideoTextEncoder.tiny(seed=0)


@pytest.fixture(scope="module")
def encoder64():
    """Tiny fp64 encoder with 16x16 frames (2x2 patches) for gradcheck."""
    return BlipVideoTextEncoder.tiny(seed=1, image_size=16, patch_size=8).to(torch.float64)


def videos(b=3, f=3, size=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (0.1 + 0.8 * torch.rand(b, f, 3, size, size, generator=g)).to(dtype)


# ----------------------------------------------------------------------------------------- cost and fusion
def _random_attention(b, h, n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(b, h, n, m, generator=g, dtype=torch.float64), dim=-1)


def test_transport_cost_matches_formula():
    b, h, n, m, d = 2, 3, 5, 7, 4
    g = torch.Generator().manual_seed(0)
    attn = _random_attention(b, h, n, m)
    y = torch.nn.functional.normalize(torch.randn(b, n, d, generator=g, dtype=torch.float64), dim=-1)
    x = torch.nn.functional.normalize(torch.randn(b, m, d, generator=g, dtype=torch.float64), dim=-1)
    t = torch.rand(m, generator=g, dtype=torch.float64)
    s = torch.rand(m, 2, generator=g, dtype=torch.float64)
    lexical = torch.tensor([[False, True, True, True, False], [False, True, True, False, False]])
    cost = token_transport_cost(attn, y, x, t, s, lexical, gamma=0.3, eta=0.7)
    assert cost.shape == (b, h, n, m)

    def minmax(z):
        return (z - z.min()) / (z.max() - z.min())

    for bi in range(b):
        rows = lexical[bi].nonzero().flatten()
        for hi in range(h):
            a = attn[bi, hi][rows]
            sem = torch.stack([torch.stack([1 - y[bi, i] @ x[bi, j] for j in range(m)]) for i in rows])
            tau, pi = a @ t, a @ s
            tem = (tau[:, None] - t[None, :]).abs()
            spa = torch.stack([torch.stack([(pi[k] - s[j]).norm() for j in range(m)]) for k in range(len(rows))])
            expected = minmax(minmax(sem) + 0.3 * minmax(tem) + 0.7 * minmax(spa))
            torch.testing.assert_close(cost[bi, hi][rows], expected)
        assert torch.all(cost[bi, :, ~lexical[bi]] == 0)
    assert cost.min() == 0 and cost.max() == 1


def test_fuse_attention_rows_and_limits():
    attn = _random_attention(2, 2, 4, 6).requires_grad_()
    lexical = torch.tensor([[False, True, True, False], [True, True, True, True]])
    plan = torch.rand(2, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    fused = fuse_attention(attn, plan * 1e-3, lexical)       # plan scale must not matter (row-normalised)
    torch.testing.assert_close(fused, fuse_attention(attn, plan, lexical))
    torch.testing.assert_close(fused.sum(-1), torch.ones(2, 2, 4, dtype=torch.float64))
    assert torch.equal(fused[0, :, [0, 3]], attn[0, :, [0, 3]])
    expected = (attn + 1e-6) * (plan.detach() / plan.detach().sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(fused[1], (expected / expected.sum(-1, keepdim=True))[1])
    uniform = fuse_attention(attn, torch.ones_like(attn), lexical)
    torch.testing.assert_close(uniform, attn, atol=1e-5, rtol=0)  # a uniform plan leaves A (almost) unchanged
    (fused * torch.arange(6.0, dtype=torch.float64)).sum().backward()
    assert plan.grad is None and attn.grad.abs().sum() > 0  # gradients reach A, the plan is a constant


def test_fuser_plan_matches_pot_oracle(encoder):
    text, video = encoder.encode_text(PROMPTS[:2]), encoder.encode_video(videos(2))
    fuser = OTAttentionFuser(text, video, epsilon=0.05, mass=0.9, max_iter=5000, tol=1e-10)
    seen = {}

    def recording(layer, attn, **qk):
        seen[layer] = (attn, qk)
        return fuser(layer, attn, **qk)

    recording.wants_layer_qk = fuser.wants_layer_qk
    encoder.match_probability(text, video, recording)
    assert fuser.calls == encoder.cross_attention_layers
    cost = fuser.cost(seen[1][0], **seen[1][1]).double()
    plan = fuser.plans[1]
    rho = marginal_relaxation(0.05, 0.9)
    for b in range(2):
        rows = text.lexical_mask[b].nonzero().flatten().numpy()
        c = cost[b, 2].numpy()[rows]
        a = np.full(len(rows), 1.0 / len(rows))
        nu = np.full(c.shape[1], 1.0 / c.shape[1])
        # reg_type="kl" with reference measure c = 1 is POT's reg_type="entropy" without its notice warning
        oracle = ot.unbalanced.sinkhorn_unbalanced(a, nu, c, reg=0.05, reg_m=rho, reg_type="kl", c=np.ones_like(c),
                                                   numItermax=20000, stopThr=1e-12)
        np.testing.assert_allclose(plan[b, 2].double().numpy()[rows], oracle, rtol=1e-3, atol=1e-8)
        assert plan[b, 2][~text.lexical_mask[b]].abs().max() == 0


def _recording(fuser):
    """Wrap ``fuser`` so that each layer's attention and query/key projections are kept in ``.seen``."""
    def call(layer, attn, **qk):
        call.seen[layer] = (attn, qk)
        return fuser(layer, attn, **qk)

    call.seen, call.wants_layer_qk = {}, fuser.wants_layer_qk
    return call


def test_layer_qk_cost_is_the_cosine_of_the_layers_query_and_key(encoder):
    """``cost_embeddings="layer_qk"``: the semantic term of cross-attention layer L is ``1 − cos(y_i, x_j)`` with
    ``y = query_L(text states entering L's cross-attention)`` and ``x = key_L(visual tokens)``, full width (all heads
    concatenated, bias included), one matrix for all heads (roar-ai/pisces @f8606b0,
    ``fastvideo/partial_optimal_transport.py`` ``build_partial_ot_prior``: ``video_embeddings =
    key_layer[0].transpose(0, 1).reshape(M, -1)``, ``text_embeddings = query_embeddings[0, valid_tokens]``;
    ``compute_spatiotemporal_cost``: ``1 − normalize(y) @ normalize(x).T``; called from ``xbert.py``
    ``BertSelfAttention.forward`` with ``mixed_query_layer = self.query(hidden_states)`` and ``key_layer``).
    With γ = η = 0 our cost is that term min–max normalised over the lexical rows."""
    text, video = encoder.encode_text(PROMPTS), encoder.encode_video(videos())
    layers = encoder.model.text_encoder.encoder.layer
    entering = {}
    handles = [layers[i].crossattention.register_forward_pre_hook(
        lambda mod, args, i=i: entering.__setitem__(i, args[0].detach())) for i in encoder.cross_attention_layers]
    qk_fuser = OTAttentionFuser(text, video, gamma=0.0, eta=0.0, cost_embeddings="layer_qk")
    itc_fuser = OTAttentionFuser(text, video, gamma=0.0, eta=0.0, cost_embeddings="itc_proj")
    qk, itc = _recording(qk_fuser), _recording(itc_fuser)
    try:
        p_qk = encoder.match_probability(text, video, qk)
    finally:
        for h in handles:
            h.remove()
    p_itc = encoder.match_probability(text, video, itc)
    assert qk.wants_layer_qk and not itc.wants_layer_qk and itc.seen[0][1] == {}
    costs = {}
    for layer in encoder.cross_attention_layers:
        attn, kw = qk.seen[layer]
        cross = layers[layer].crossattention.self
        q = entering[layer] @ cross.query.weight.T + cross.query.bias                 # [B, N, d]
        k = video.tokens @ cross.key.weight.T + cross.key.bias                        # [B, M, d]
        assert kw["query"].shape == q.shape and kw["key"].shape == k.shape == (3, video.tokens.shape[1], 32)
        cosine = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(1, 2)
        costs[layer] = qk_fuser.cost(attn, **kw)
        for b in range(3):
            rows = text.lexical_mask[b]
            sem = 1 - cosine[b][rows]
            expected = (sem - sem.min()) / (sem.max() - sem.min())
            for head in range(attn.shape[1]):
                torch.testing.assert_close(costs[layer][b, head][rows], expected, atol=2e-5, rtol=0)
        itc_cost = itc_fuser.cost(itc.seen[layer][0])
        assert (costs[layer] - itc_cost).abs().max() > 0.1                           # other embeddings
    assert (costs[0] - costs[1]).abs().max() > 0.1                                     # per layer, not shared
    assert (p_qk - p_itc).abs().max() > 1e-4                                           # and another VTM score


def test_visual_cls_is_frame_minus_one_at_minus_one_minus_one(encoder):
    """The visual [CLS] sits at frame −1 and position (−1, −1), patches at their frame number and on a
    ``linspace(0, 1, g)`` grid (roar-ai/pisces @f8606b0 ``fastvideo/partial_optimal_transport.py``
    ``build_video_token_geometry``; frame numbers are not rescaled there, the temporal term is divided by the index
    range instead, which our per-term min–max makes irrelevant). So the spatial distance from any text token that
    attends to patches only is largest at the [CLS], and the temporal distance to it is one frame more than to
    frame 0."""
    f, (gh, gw) = 3, encoder.grid
    t, s = encoder.token_positions(f)
    axis = torch.linspace(0, 1, gh)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    torch.testing.assert_close(t, torch.cat([torch.tensor([-1.0]), torch.arange(f).float().repeat_interleave(gh * gw)]))
    torch.testing.assert_close(s, torch.cat([torch.tensor([[-1.0, -1.0]]), grid.repeat(f, 1)]))
    attn = _random_attention(1, 2, 4, len(t), seed=3).float()
    attn[..., 0] = 0
    attn = attn / attn.sum(-1, keepdim=True)
    pi, tau = attn @ s, attn @ t                                                    # [1, 2, 4, 2], [1, 2, 4]
    spatial = torch.cdist(pi, s.expand(1, 2, -1, -1))
    assert torch.all(spatial.argmax(-1) == 0)
    torch.testing.assert_close((tau[..., None] - t).abs()[..., 0], tau + 1)
    # and the cost follows: spatial term only (η) -> the [CLS] column is the most expensive for every lexical row
    x = torch.nn.functional.normalize(torch.ones(1, len(t), 4), dim=-1)
    cost = token_transport_cost(attn, x[:, :4], x, t, s, torch.ones(1, 4, dtype=torch.bool), gamma=0.0, eta=1.0)
    assert torch.all(cost[0].argmax(-1) == 0)


# ----------------------------------------------------------------------------------------- semantic reward
def test_semantic_shapes_range_and_ablation(encoder):
    v = videos()
    full = OTSemanticReward(encoder)(v, PROMPTS)
    vanilla = OTSemanticReward(encoder, use_ot=False)(v, PROMPTS)
    assert full.shape == (3,) and not full.requires_grad
    assert torch.all((full > 0) & (full < 1))
    assert (full - vanilla).abs().max() > 1e-3             # the OT fusion changes the score
    text, video = encoder.encode_text(PROMPTS), encoder.encode_video(v)
    torch.testing.assert_close(vanilla, encoder.match_probability(text, video))
    balanced = OTSemanticReward(encoder, mass=1.0)(v, PROMPTS)
    assert (balanced - full).abs().max() > 1e-6            # partial vs balanced transport differ
    assert OTSemanticReward(encoder).cost_embeddings == "layer_qk"
    itc = OTSemanticReward(encoder, cost_embeddings="itc_proj")(v, PROMPTS)
    assert (itc - full).abs().max() > 1e-4                 # the cost embeddings change the reward
    assert torch.all((itc > 0) & (itc < 1))


def test_semantic_layer_qk_needs_an_encoder_that_passes_query_and_key(encoder):
    class NoQK:
        def match_probability(self, text, video, attention_fuser=None):
            return attention_fuser(0, torch.ones(1, 1, 1, 2) / 2)

    with pytest.raises(ValueError, match="supports_layer_qk"):
        OTSemanticReward(NoQK())
    OTSemanticReward(NoQK(), cost_embeddings="itc_proj")
    OTSemanticReward(NoQK(), use_ot=False)                 # vanilla attention needs no projections
    with pytest.raises(ValueError, match="cost_embeddings must be one of"):
        OTSemanticReward(encoder, cost_embeddings="qk")
    text, video = encoder.encode_text(PROMPTS[:1]), encoder.encode_video(videos(1))
    with pytest.raises(ValueError, match="needs the query/key projections of cross-attention layer 0"):
        encoder.match_probability(text, video, lambda layer, a: OTAttentionFuser(text, video)(layer, a))


def test_semantic_handles_prompt_without_lexical_tokens(encoder):
    scores = OTSemanticReward(encoder)(videos(2), ["", "two blue squares"])
    vanilla = OTSemanticReward(encoder, use_ot=False)(videos(2), ["", "two blue squares"])
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores[0], vanilla[0])      # nothing to fuse for an empty prompt


def test_semantic_gradcheck_vanilla(encoder64):
    reward = OTSemanticReward(encoder64, use_ot=False)
    v = videos(1, 2, size=4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: reward(x, PROMPTS[:1]), (v,), eps=1e-6, atol=1e-6)


def test_semantic_gradient_with_ot_equals_fixed_plan_gradient(encoder64):
    """P is detached, so the reward's gradient is that of the map x -> R_s(x; P fixed at x0), which we gradcheck."""
    reward = OTSemanticReward(encoder64)
    v0 = videos(1, 2, size=4, seed=2, dtype=torch.float64)
    text = encoder64.encode_text(PROMPTS[:1])
    fuser = reward.attention_fuser(text, encoder64.encode_video(v0))
    encoder64.match_probability(text, encoder64.encode_video(v0), fuser)
    plans = fuser.plans

    def fixed(x):
        return reward.score_features(text, encoder64.encode_video(x), plans=plans)

    v = v0.clone().requires_grad_()
    assert torch.autograd.gradcheck(fixed, (v,), eps=1e-6, atol=1e-6)
    (grad_reward,) = torch.autograd.grad(reward(v, PROMPTS[:1]).sum(), v)
    (grad_fixed,) = torch.autograd.grad(fixed(v).sum(), v)
    torch.testing.assert_close(grad_reward, grad_fixed)
    assert grad_reward.abs().sum() > 0
    with pytest.raises(KeyError, match="no fixed transport plan for cross-attention layer 1"):
        reward.score_features(text, encoder64.encode_video(v0), plans={0: plans[0]})


# ----------------------------------------------------------------------------------------- quality reward
class Negate(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(-1.0))

    def forward(self, x):
        return self.scale * x


def test_quality_raw_cosine_and_map(encoder):
    v = videos()
    raw = OTQualityReward(encoder)(v, PROMPTS)
    text, video = encoder.encode_text(PROMPTS), encoder.encode_video(v)
    torch.testing.assert_close(raw, (text.cls_embedding * video.pooled_embedding).sum(-1))
    assert raw.shape == (3,) and torch.all(raw.abs() <= 1)
    identity = OTQualityReward(encoder, ot_map=torch.nn.Identity())(v, PROMPTS)
    torch.testing.assert_close(identity, raw)
    negated = OTQualityReward(encoder, ot_map=Negate())(v, PROMPTS)
    torch.testing.assert_close(negated, -raw)
    ablated = OTQualityReward(encoder, ot_map=Negate(), use_ot=False)(v, PROMPTS)
    torch.testing.assert_close(ablated, raw)


def test_quality_gradcheck(encoder64):
    reward = OTQualityReward(encoder64, ot_map=Negate().double())
    v = videos(2, 2, size=4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: reward(x, PROMPTS[:2]), (v,), eps=1e-6, atol=1e-6)


def test_quality_map_errors(encoder, tmp_path):
    with pytest.raises(ValueError, match=r"same shape.*embed_dim=32"):
        OTQualityReward(encoder, ot_map=torch.nn.Linear(32, 8))(videos(1), PROMPTS[:1])
    with pytest.raises(FileNotFoundError, match="fit-ot-map"):
        OTQualityReward(encoder, ot_map=tmp_path / "missing")
    with pytest.raises(TypeError, match="ot_map must be callable"):
        OTQualityReward(encoder, ot_map=3)


# ----------------------------------------------------------------------------------------- both rewards
@pytest.mark.parametrize("make", [lambda e: OTQualityReward(e, ot_map=Negate()), lambda e: OTSemanticReward(e)])
def test_grad_policy_and_frozen_encoder(encoder, make):
    reward = make(encoder)
    assert reward.differentiable is True and reward.device == torch.device("cpu")
    v = videos(2).requires_grad_()
    with torch.no_grad():
        assert not reward(v, PROMPTS[:2]).requires_grad
    assert not reward(videos(2), PROMPTS[:2]).requires_grad   # RL scoring: no graph
    with torch.enable_grad():
        out = reward(v, PROMPTS[:2])
    out.sum().backward()
    assert v.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())
    if isinstance(reward, OTQualityReward):
        assert reward.ot_map.scale.grad is None


def test_repeated_prompts_encoded_once(encoder):
    calls = []
    original = encoder.encode_text

    def counting(prompts):
        calls.append(list(prompts))
        return original(prompts)

    encoder.encode_text = counting
    try:
        grouped = OTSemanticReward(encoder)(videos(), PROMPTS)
    finally:
        del encoder.encode_text
    assert calls == [PROMPTS[:2]]
    one_by_one = torch.cat([OTSemanticReward(encoder)(videos()[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(grouped, one_by_one, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [OTQualityReward, OTSemanticReward])
def test_input_errors_name_the_reward(encoder, cls):
    reward = cls(encoder)
    name = reward.name
    with pytest.raises(ValueError, match=f"{name}: got 3 videos but 2 prompts"):
        reward(videos(), PROMPTS[:2])
    with pytest.raises(ValueError, match=rf"{name}: videos must have values in \[0, 1\]"):
        reward(videos() * 4, PROMPTS)
    with pytest.raises(ValueError, match=rf"{name}: videos must have shape \[B, F, C, H, W\]"):
        reward(videos()[0], PROMPTS)
    with pytest.raises(TypeError, match="VideoTextEncoder"):
        cls(None)


def test_semantic_rejects_bad_hyperparameters(encoder):
    for kwargs, message in [({"mass": 0.0}, "mass must lie in"), ({"epsilon": 0}, "epsilon must be > 0"),
                            ({"gamma": -1}, "gamma must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            OTSemanticReward(encoder, **kwargs)


def test_cost_embeddings_config_reaches_the_semantic_reward(encoder):
    from pisces_rl.config import ConfigError, GRPOConfig, load_config
    from pisces_rl.rewards import build_reward_server

    assert load_config(GRPOConfig, None, []).rewards.cost_embeddings == "layer_qk"
    with pytest.raises(ConfigError, match="rewards.cost_embeddings"):
        load_config(GRPOConfig, None, ["rewards.cost_embeddings=qk"])
    cfg = load_config(GRPOConfig, None, ["rewards.cost_embeddings=itc_proj"]).rewards
    server = build_reward_server({"weights": {"ot_semantic": 1.0, "ot_quality": 1.0}, "encoder": encoder,
                                  "cost_embeddings": cfg.cost_embeddings})
    semantic = [fn for fn, _ in server.rewards.values() if isinstance(fn, OTSemanticReward)]
    assert len(semantic) == 1 and semantic[0].cost_embeddings == "itc_proj"
