"""TemporalAdapter: identity until trained, frame-order awareness, persistence with the BLIP encoder."""
import pytest
import torch

from pisces_rl.encoders import BlipVideoTextEncoder
from pisces_rl.encoders.temporal import TemporalAdapter

PROMPTS = ["a red circle moving left", "two blue squares moving up"]


def videos(b=2, f=5, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, f, 3, size, size, generator=g)


def _trained_like(encoder, seed=1):
    """Give the adapter non-zero weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.temporal.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return encoder


def test_zero_initialised_adapter_changes_nothing():
    plain, adapted = BlipVideoTextEncoder.tiny(seed=0), BlipVideoTextEncoder.tiny(seed=0, temporal_frames=5)
    v = videos()
    a, b = plain.encode_video(v), adapted.encode_video(v)
    assert torch.allclose(a.tokens, b.tokens, atol=1e-6)
    assert torch.allclose(a.pooled_embedding, b.pooled_embedding, atol=1e-6)
    text = plain.encode_text(PROMPTS)
    assert torch.allclose(plain.match_probability(text, a), adapted.match_probability(text, b), atol=1e-6)


def test_without_an_adapter_a_reversed_clip_scores_the_same():
    encoder = BlipVideoTextEncoder.tiny(seed=0)
    v = videos()
    fwd, back = encoder.encode_video(v), encoder.encode_video(v.flip(1))
    text = encoder.encode_text(PROMPTS)
    assert torch.allclose(fwd.pooled_embedding, back.pooled_embedding, atol=1e-5)
    assert torch.allclose(encoder.match_probability(text, fwd), encoder.match_probability(text, back), atol=1e-5)


def test_a_trained_adapter_tells_a_clip_from_its_reversal():
    encoder = _trained_like(BlipVideoTextEncoder.tiny(seed=0, temporal_frames=5))
    v = videos()
    fwd, back = encoder.encode_video(v), encoder.encode_video(v.flip(1))
    text = encoder.encode_text(PROMPTS)
    assert (fwd.pooled_embedding - back.pooled_embedding).norm(dim=-1).min() > 1e-2
    assert (encoder.match_probability(text, fwd) - encoder.match_probability(text, back)).abs().min() > 1e-4
    # a still clip (every frame the same) is its own reversal
    still = v[:, :1].expand(-1, 5, -1, -1, -1)
    assert torch.allclose(encoder.encode_video(still).pooled_embedding,
                          encoder.encode_video(still.flip(1)).pooled_embedding, atol=1e-6)


def test_gradients_reach_videos_through_the_adapter():
    encoder = _trained_like(BlipVideoTextEncoder.tiny(seed=0, temporal_frames=5))
    v = videos().requires_grad_(True)
    encoder.encode_video(v).pooled_embedding.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.temporal.parameters())      # frozen


def test_frame_table_interpolates_other_frame_counts():
    adapter = TemporalAdapter(hidden_size=4, num_frames=3)
    with torch.no_grad():
        adapter.frame_embedding.copy_(torch.tensor([[0.0] * 4, [1.0] * 4, [2.0] * 4]))
    table = adapter.frame_table(5)
    assert table.shape == (5, 4) and torch.allclose(table[:, 0], torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0]))
    assert adapter.ramp(1).abs().sum() == 0 and torch.isclose(adapter.ramp(4).abs().sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"states \[B, F, 1\+P, 4\]"):
        adapter(torch.zeros(2, 3, 5, 8))


def test_save_and_load_keep_the_adapter(tmp_path):
    encoder = _trained_like(BlipVideoTextEncoder.tiny(seed=0, num_frames=5, temporal_frames=5))
    encoder.save_pretrained(tmp_path / "enc")
    loaded = BlipVideoTextEncoder.from_pretrained(tmp_path / "enc")
    assert loaded.temporal is not None and loaded.temporal.num_frames == 5
    assert all(not p.requires_grad for p in loaded.parameters())
    v = videos(f=9)
    assert torch.equal(encoder.encode_video(v).tokens, loaded.encode_video(v).tokens)
    assert loaded.to(dtype=torch.float64).encode_video(v.double()).tokens.dtype == torch.float64
    (tmp_path / "enc" / "pisces_temporal.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="temporal adapter.*missing"):
        BlipVideoTextEncoder.from_pretrained(tmp_path / "enc")


def test_adapter_width_must_match_the_vision_tower():
    encoder = BlipVideoTextEncoder.tiny(seed=0)
    with pytest.raises(ValueError, match="hidden_size 32"):
        BlipVideoTextEncoder(encoder.model, encoder.tokenizer, temporal=TemporalAdapter(16, 4))


def test_motion_moments_are_features_times_velocity():
    """One patch feature moving one column right per frame on a 4x4 grid: (m_x, m_y) = (phi * slope_x, 0), the
    sign flips when the clip is reversed, and static content contributes nothing."""
    b, f, side, d = 1, 5, 4, 3
    phi = torch.tensor([1.0, -2.0, 0.5])
    states = torch.zeros(b, f, 1 + side * side, d)
    states[:, :, 1:] += torch.tensor([0.3, 0.3, 0.3])                       # static background in every patch
    for t in range(4):                                                      # row 1, columns 0..3, then stays
        states[0, t, 1 + side * 1 + t] += phi
    states[0, 4, 1 + side * 1 + 3] += phi
    ramp = TemporalAdapter.ramp(f)
    cols = torch.linspace(-1, 1, side)
    x = torch.tensor([cols[0], cols[1], cols[2], cols[3], cols[3]])
    expected_x = phi * float((ramp * x).sum()) / (side * side)
    m = TemporalAdapter.motion_moments(states, ramp)
    assert torch.allclose(m[0, :d], expected_x, atol=1e-6) and float((ramp * x).sum()) > 0
    assert torch.allclose(m[0, d:], torch.zeros(d), atol=1e-6)             # the row does not change
    assert torch.allclose(TemporalAdapter.motion_moments(states.flip(1), ramp), -m, atol=1e-6)


def test_an_adapter_saved_without_motion_moments_loads_with_them_at_zero():
    adapter = TemporalAdapter(8, 5)
    old = {k: v for k, v in adapter.state_dict().items() if not k.startswith("moments")}
    fresh = TemporalAdapter(8, 5)
    with torch.no_grad():
        fresh.moments.weight.fill_(1.0)
    fresh.load_state_dict(old)
    assert torch.count_nonzero(fresh.moments.weight) == 0
