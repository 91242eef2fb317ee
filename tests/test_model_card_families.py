"""The model card's loading snippet follows the family: one call per Wan 2.2 expert file, LoRA support for the
ModelScope UNet first, the plain ``load_lora_weights`` otherwise."""
from pisces_rl.trainer.model_card import _load_snippet

SAMPLING = {"num_frames": 9, "height": 32, "width": 32}


def snippet(tmp_path, family, files):
    for name in files:
        (tmp_path / name).write_bytes(b"")
    return _load_snippet("org/model", "Pipe", "out/lora", "a prompt", SAMPLING, 8, {"family": family}, str(tmp_path))


def test_wan22_card_loads_each_expert_file(tmp_path):
    both = snippet(tmp_path, "wan", ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_transformer_2.safetensors"])
    assert 'pipe.load_lora_weights("out/lora")\n' in both
    assert 'weight_name="pytorch_lora_weights_transformer_2.safetensors", load_into_transformer_2=True)' in both


def test_wan22_card_with_only_the_low_noise_expert(tmp_path):
    low = snippet(tmp_path, "wan", ["pytorch_lora_weights_transformer_2.safetensors"])
    assert 'pipe.load_lora_weights("out/lora")\n' not in low and "load_into_transformer_2=True" in low


def test_wan21_and_other_families(tmp_path):
    assert 'pipe.load_lora_weights("out/lora")' in snippet(tmp_path, "wan", ["pytorch_lora_weights.safetensors"])
    ms = snippet(tmp_path, "text_to_video_sd", ["pytorch_lora_weights.safetensors"])
    assert ms.index("enable_unet_lora(pipe)") < ms.index('pipe.load_lora_weights("out/lora")')
    assert 'pipe.load_lora_weights("out/lora")' in snippet(tmp_path, "cogvideox", [])
