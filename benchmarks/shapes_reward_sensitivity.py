"""Which defects do the rewards see? Real ShapesWorld clips against corrupted copies of themselves.

    python benchmarks/shapes_reward_sensitivity.py [--videos 256] [--output FILE.json]

Takes held-out real clips of the world's corpus (captions the encoder never trained on), applies one corruption
at a time, and scores clean and corrupted clips with the same caption. For every reward it reports the pair
accuracy ``P(reward(clean) > reward(corrupted))``, ties counted as half (0.5 = the reward cannot tell), and the
mean drop. No generated
video and no judge is involved: this measures the rewards alone, on defects named before any result was seen.

Corruptions, ``videos [B, F, C, H, W]`` in [0, 1]:

* quality: ``noise`` (Gaussian, std 0.08), ``blur`` (3x3 box filter per frame), ``flicker`` (odd frames 25 %
  darker), ``flicker_even`` (even frames 25 % darker; the encoder samples 5 of 9 frames, the even ones), ``jitter`` (every frame shifted by up to 2 pixels at random), ``low_contrast`` (halfway to grey);
* semantic, for reference: ``recolour`` (RGB channels rolled, every colour becomes another) and ``reversed``
  (time reversed, clips whose objects all move).

Rows: the full PISCES rewards (``ot_quality`` with the Neural OT map, ``ot_semantic`` with token-level OT) and the
"w/o OT" ablation (raw [CLS] cosine, vanilla-attention VTM). Needs the ShapesWorld cache (``make world``).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from pisces_rl.rewards import build_reward_server
from pisces_rl.worlds.shapes import shapes_corpus, videos_to_tensor


def _shift(frame: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``[C, H, W]`` shifted by ``(dy, dx)`` pixels with edge replication."""
    pad = F.pad(frame[None], (2, 2, 2, 2), mode="replicate")[0]
    h, w = frame.shape[-2:]
    return pad[:, 2 + dy:2 + dy + h, 2 + dx:2 + dx + w]


def corrupt(videos: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """One corruption of ``videos [B, F, C, H, W]`` in [0, 1] (see the module docstring); same shape, in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    b, f, c, h, w = videos.shape
    if kind == "noise":
        out = videos + 0.08 * torch.randn(videos.shape, generator=gen)
    elif kind == "blur":
        flat = videos.reshape(b * f, c, h, w)
        out = F.avg_pool2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), 3, stride=1).reshape(videos.shape)
    elif kind == "flicker":
        scale = torch.ones(f)
        scale[1::2] = 0.75
        out = videos * scale.view(1, f, 1, 1, 1)
    elif kind == "flicker_even":
        scale = torch.ones(f)
        scale[2:-1:2] = 0.75          # frames 2, 4, 6: inner frames the reward's encoder does sample
        out = videos * scale.view(1, f, 1, 1, 1)
    elif kind == "jitter":
        d = torch.randint(-2, 3, (b, f, 2), generator=gen)
        out = torch.stack([torch.stack([_shift(videos[i, t], int(d[i, t, 0]), int(d[i, t, 1])) for t in range(f)])
                           for i in range(b)])
    elif kind == "low_contrast":
        out = 0.5 * videos + 0.25
    elif kind == "recolour":
        out = videos[:, :, [2, 0, 1]]
    elif kind == "reversed":
        out = videos.flip(1)
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return out.clamp(0, 1)


QUALITY = ("noise", "blur", "flicker", "flicker_even", "jitter", "low_contrast")
SEMANTIC = ("recolour", "reversed")


def measure(num_videos: int, seed: int = 1) -> dict:
    ds = shapes_corpus(num_videos, seed=seed, split="heldout", num_frames=9, size=32)
    videos = videos_to_tensor(ds.with_format("numpy", dtype="uint8")["video"])
    prompts = list(ds["caption"])
    moving = np.array([all(m != "still" for m in ms) for ms in ds["motions"]])
    servers = {"PISCES": build_reward_server({"weights": {"ot_quality": 1.0, "ot_semantic": 1.0},
                                              "encoder": "shapes", "ot_map": "shapes", "max_batch_size": 64}),
               "w/o OT": build_reward_server({"weights": {"ot_quality": 1.0, "ot_semantic": 1.0},
                                              "encoder": "shapes", "use_ot": False, "max_batch_size": 64})}
    out: dict = {"videos": num_videos, "moving_videos": int(moving.sum()), "rows": {}}
    for row, server in servers.items():
        clean = server(videos, prompts).scores.float()
        for kind in QUALITY + SEMANTIC:
            keep = torch.as_tensor(moving) if kind == "reversed" else torch.ones(len(prompts), dtype=torch.bool)
            idx = torch.nonzero(keep).flatten().tolist()
            bad = server(corrupt(videos[idx], kind), [prompts[i] for i in idx]).scores.float()
            for r, name in enumerate(server.names):
                diff = clean[idx, r] - bad[:, r]
                out["rows"].setdefault(row, {}).setdefault(name, {})[kind] = {
                    "pair_accuracy": float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean()),
                    "unchanged": float((diff == 0).float().mean()), "mean_drop": float(diff.mean()),
                    "clean_std": float(clean[:, r].std())}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=256, help="held-out real clips")
    p.add_argument("--output", default=None, help="also write the result as JSON here")
    args = p.parse_args()
    result = measure(args.videos)
    print(f"{'row':<8}{'reward':<13}" + "".join(f"{k:>13}" for k in QUALITY + SEMANTIC))
    for row, rewards in result["rows"].items():
        for name, kinds in rewards.items():
            print(f"{row:<8}{name:<13}" + "".join(f"{kinds[k]['pair_accuracy']:>13.3f}" for k in QUALITY + SEMANTIC))
    print("(pair accuracy: share of clips whose clean version outscores the corrupted one, ties half; 0.5 = blind)")
    unchanged = [k for k in QUALITY + SEMANTIC
                 if all(kinds[k]["unchanged"] == 1 for r in result["rows"].values() for kinds in r.values())]
    if unchanged:
        print(f"every reward is exactly unchanged by: {', '.join(unchanged)} (frames the encoder never samples)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
