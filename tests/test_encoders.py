"""BlipVideoTextEncoder: shapes, equivalence with the BLIP image model, attention fusion hook, persistence, errors."""
import copy
import threading

import pytest
import torch

from pisces_rl.encoders import (BlipVideoTextEncoder, TextFeatures, VideoFeatures, VideoTextEncoder,
                                build_tiny_tokenizer, load_encoder)

PROMPTS = ["a red circle moving left", "two blue squares", "three stars above a green triangle"]


@pytest.fixture(scope="module")
def encoder():
    return BlipVideoTextEncoder.tiny(seed=0)


def videos(b=3, f=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, f, 3, size, size, generator=g)


def test_protocol_and_frozen(encoder):
    assert isinstance(encoder, VideoTextEncoder)
    assert encoder.embed_dim == 32
    assert not encoder.model.training
    assert all(not p.requires_grad for p in encoder.parameters())
    assert encoder.cross_attention_layers == [0, 1]


def test_tokenizer_covers_any_ascii_caption():
    tok = build_tiny_tokenizer()
    ids = tok(["Zebra-crossing #42, quickly!"])["input_ids"][0]
    assert tok.unk_token_id not in ids
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id


def test_text_features(encoder):
    text = encoder.encode_text(PROMPTS)
    assert isinstance(text, TextFeatures)
    b, n = text.input_ids.shape
    assert b == 3 and text.token_embeddings.shape == (3, n, 32) and text.cls_embedding.shape == (3, 32)
    torch.testing.assert_close(text.token_embeddings.norm(dim=-1), torch.ones(3, n))
    torch.testing.assert_close(text.cls_embedding, text.token_embeddings[:, 0])
    special = {encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id, encoder.tokenizer.pad_token_id}
    for ids, mask, lex in zip(text.input_ids, text.attention_mask, text.lexical_mask):
        expected = torch.tensor([bool(m) and int(i) not in special for i, m in zip(ids, mask)])
        assert torch.equal(lex, expected)
    assert text.lexical_mask[1].sum() == 3  # "two blue squares"


def test_video_features_shapes_and_positions(encoder):
    out = encoder.encode_video(videos(2, 3))
    assert isinstance(out, VideoFeatures)
    h, w = encoder.grid
    m = 1 + 3 * h * w
    assert out.tokens.shape == (2, m, 32) and out.token_embeddings.shape == (2, m, 32)
    torch.testing.assert_close(out.pooled_embedding, out.token_embeddings[:, 0])
    torch.testing.assert_close(out.pooled_embedding.norm(dim=-1), torch.ones(2))
    assert out.frame_index.shape == (m,) and out.patch_position.shape == (m, 2)
    # the PISCES code's geometry: visual CLS at frame -1 and (-1, -1); patches at frame numbers, linspace(0, 1) grid
    assert out.frame_index[0] == -1 and torch.equal(out.patch_position[0], torch.tensor([-1.0, -1.0]))
    assert torch.equal(out.frame_index[1:].unique(), torch.tensor([0.0, 1.0, 2.0]))
    assert out.patch_position[1:].min() == 0 and out.patch_position[1:].max() == 1
    # frame-major: tokens 1..h*w belong to frame 0, with row-major patch positions
    assert torch.all(out.frame_index[1:1 + h * w] == 0)
    torch.testing.assert_close(out.patch_position[2], torch.tensor([0.0, 1 / (w - 1)]))
    t1, s1 = encoder.token_positions(1)                    # one frame: still CLS at -1, patches at frame 0
    assert t1.tolist() == [-1.0] + [0.0] * (h * w) and s1[0].tolist() == [-1.0, -1.0]


def test_single_frame_equals_blip_image_model(encoder):
    """With F = 1 the adapter must reproduce transformers' own ITM and ITC scores."""
    images = videos(2, 1, seed=3)
    text = encoder.encode_text(PROMPTS[:2])
    video = encoder.encode_video(images)
    pixels = (images[:, 0] - encoder.image_mean) / encoder.image_std
    with torch.no_grad():
        itm = encoder.model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels)
        itc = encoder.model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels,
                            use_itm_head=False)
    torch.testing.assert_close(encoder.match_probability(text, video), itm.itm_score.softmax(-1)[:, 1])
    torch.testing.assert_close((text.cls_embedding * video.pooled_embedding).sum(-1), itc.itm_score.diagonal())


def test_frame_subsampling_and_resizing():
    sub = BlipVideoTextEncoder.tiny(seed=0, num_frames=3)
    full = BlipVideoTextEncoder.tiny(seed=0)
    v = videos(2, 5)
    torch.testing.assert_close(sub.encode_video(v).tokens, full.encode_video(v[:, [0, 2, 4]]).tokens)
    odd = torch.rand(1, 2, 3, 20, 44)  # any resolution is resized to the vision image size
    assert full.encode_video(odd).tokens.shape == (1, 1 + 2 * 16, 32)


def test_fuser_called_once_per_cross_attention_layer(encoder):
    text, video = encoder.encode_text(PROMPTS), encoder.encode_video(videos())
    vanilla = encoder.match_probability(text, video)
    calls = []

    def identity(layer, attn):
        calls.append((layer, tuple(attn.shape)))
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
        return attn

    same = encoder.match_probability(text, video, attention_fuser=identity)
    n, m = text.input_ids.shape[1], video.tokens.shape[1]
    assert calls == [(0, (3, 4, n, m)), (1, (3, 4, n, m))]
    assert torch.equal(same, vanilla)
    uniform = encoder.match_probability(text, video, lambda layer, a: torch.full_like(a, 1.0 / a.shape[-1]))
    assert (uniform - vanilla).abs().max() > 1e-3
    # the hook is inert again after the call
    assert torch.equal(encoder.match_probability(text, video), vanilla) and len(calls) == 2


def test_fuser_asking_for_layer_qk_gets_each_layers_query_and_key(encoder):
    """A fuser with ``wants_layer_qk`` gets ``query=`` the layer's query linear applied to the text states entering
    its cross-attention and ``key=`` its key linear applied to the visual tokens (as the PISCES code's POT hook
    receives ``mixed_query_layer`` and ``key_layer``, roar-ai/pisces @f8606b0 ``xbert.py``
    ``BertSelfAttention.forward``); a plain fuser gets neither, and nothing is recorded outside the context."""
    text, video = encoder.encode_text(PROMPTS), encoder.encode_video(videos())
    layers = encoder.model.text_encoder.encoder.layer
    entering, got = {}, {}
    handles = [layers[i].crossattention.register_forward_pre_hook(
        lambda mod, args, i=i: entering.__setitem__(i, args[0].detach())) for i in (0, 1)]

    def fuser(layer, attn, **qk):
        got[layer] = qk
        return attn

    fuser.wants_layer_qk = True
    try:
        same = encoder.match_probability(text, video, fuser)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(same, encoder.match_probability(text, video))
    n, m = text.input_ids.shape[1], video.tokens.shape[1]
    for layer in (0, 1):
        cross = layers[layer].crossattention.self
        assert got[layer]["query"].shape == (3, n, 32) and got[layer]["key"].shape == (3, m, 32)
        torch.testing.assert_close(got[layer]["query"], entering[layer] @ cross.query.weight.T + cross.query.bias)
        torch.testing.assert_close(got[layer]["key"], video.tokens @ cross.key.weight.T + cross.key.bias)
        assert not got[layer]["query"].requires_grad
    assert not torch.equal(got[0]["query"], got[1]["query"])
    plain = []
    encoder.match_probability(text, video, lambda layer, a, **qk: plain.append(qk) or a)
    assert plain == [{}, {}]
    assert encoder.supports_layer_qk


def test_fuser_state_restored_after_error_and_isolated_per_thread(encoder):
    text, video = encoder.encode_text(PROMPTS[:1]), encoder.encode_video(videos(1))
    vanilla = encoder.match_probability(text, video)

    def boom(layer, attn):
        raise RuntimeError("fuser failed")

    with pytest.raises(RuntimeError, match="fuser failed"):
        encoder.match_probability(text, video, boom)
    assert torch.equal(encoder.match_probability(text, video), vanilla)

    seen, results = [], []
    with encoder.fusing(lambda layer, a: seen.append(layer) or torch.full_like(a, 1.0 / a.shape[-1])):
        worker = threading.Thread(target=lambda: results.append(encoder.match_probability(text, video)))
        worker.start()
        worker.join()
    assert seen == [] and torch.equal(results[0], vanilla)


def test_fuser_reaches_a_deep_copy_only_through_the_copy(encoder):
    clone = copy.deepcopy(encoder)
    text, video = encoder.encode_text(PROMPTS[:1]), encoder.encode_video(videos(1))
    seen = []
    clone.match_probability(text, video, lambda layer, a: seen.append(layer) or a)
    assert seen == [0, 1]
    with clone.fusing(lambda layer, a: seen.append(("clone", layer)) or a):
        encoder.match_probability(text, video)  # the original's layers are not targeted
    assert seen == [0, 1]


def test_fuser_wrong_shape_is_reported(encoder):
    text, video = encoder.encode_text(PROMPTS[:1]), encoder.encode_video(videos(1))
    with pytest.raises(ValueError, match=r"attention_fuser must return .* layer 0"):
        encoder.match_probability(text, video, lambda layer, a: a[..., :-1])


def test_gradients_reach_videos_not_parameters(encoder):
    v = videos(2).requires_grad_()
    text = encoder.encode_text(PROMPTS[:2])
    video = encoder.encode_video(v)
    (encoder.match_probability(text, video).sum() + video.pooled_embedding.sum()).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())


def test_save_and_from_pretrained_round_trip(encoder, tmp_path):
    encoder.num_frames = 2
    try:
        encoder.save_pretrained(tmp_path / "enc")
    finally:
        encoder.num_frames = None
    loaded = BlipVideoTextEncoder.from_pretrained(tmp_path / "enc")
    assert loaded.num_frames == 2 and all(not p.requires_grad for p in loaded.parameters())
    v = videos(3, 2)
    a_text, b_text = encoder.encode_text(PROMPTS), loaded.encode_text(PROMPTS)
    assert torch.equal(a_text.input_ids, b_text.input_ids)
    assert torch.equal(a_text.token_embeddings, b_text.token_embeddings)
    a_video, b_video = encoder.encode_video(v), loaded.encode_video(v)
    assert torch.equal(a_video.tokens, b_video.tokens)
    assert torch.equal(encoder.match_probability(a_text, a_video), loaded.match_probability(b_text, b_video))
    again = load_encoder(str(tmp_path / "enc"), num_frames=1, dtype="fp64")
    assert again.num_frames == 1 and again.dtype == torch.float64


def test_missing_or_wrong_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*encoder='tiny'"):
        BlipVideoTextEncoder.from_pretrained(tmp_path / "nope")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(ValueError, match="holds a 'clip' model.*own adapter"):
        BlipVideoTextEncoder.from_pretrained(tmp_path / "clip")


@pytest.mark.parametrize("bad, error, message", [
    (torch.rand(4, 3, 32, 32), ValueError, r"\[B, F, C, H, W\].*unsqueeze\(0\)"),
    (torch.rand(1, 4, 32, 32, 3), ValueError, r"channels-last.*permute"),
    (torch.rand(1, 2, 3, 8, 8) * 2 - 1, ValueError, r"values in \[0, 1\].*\(videos \+ 1\) / 2"),
    ((torch.rand(1, 2, 3, 8, 8) * 255).to(torch.uint8), TypeError, r"floating point.*/ 255"),
    (torch.full((1, 2, 3, 8, 8), float("nan")), ValueError, "NaN"),
])
def test_bad_videos_are_rejected(encoder, bad, error, message):
    with pytest.raises(error, match=message):
        encoder.encode_video(bad)


def test_bad_text_and_pairing(encoder):
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode_text("a red circle")
    with pytest.raises(ValueError, match="got 2 texts and 1 videos"):
        encoder.match_probability(encoder.encode_text(PROMPTS[:2]), encoder.encode_video(videos(1)))
