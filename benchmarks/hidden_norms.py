"""Where the squared norm of a dense model's hidden states sits: per block exit, the share of the largest token and of
the largest channel, on the recipe's calibration windows.

    python benchmarks/hidden_norms.py --threads 2                     # SmolLM2-135M, 8 calibration windows
    python benchmarks/hidden_norms.py --recipe recipes/qwen2.5-coder-0.5b/levers.yaml \
        --output hidden_norms_qwen2.5-coder-0.5b.json

Block refinement's default objective (``refine_loss: hidden``) is the relative squared error of all exit states
together, a sum that the tokens and channels with the largest states own; ``refine_loss: token`` weights each token by
its own norm (docs/method.md section 14). This script measures how lopsided the sum is: for each block exit, over the
windows, the share of the squared norm that the largest token of each window holds (mean and max over windows, with
that token's position), and the share of the largest channel over all tokens. Writes
benchmarks/results/hidden_norms_smollm2.json.
"""

from __future__ import annotations

import argparse

import torch
from common import ROOT, environment, set_threads, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m" / "levers.yaml"))
    ap.add_argument("--windows", type=int, default=8, help="calibration windows read (the recipe's first ones)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default="hidden_norms_smollm2.json")
    args = ap.parse_args()
    set_threads(args.threads)
    from air_ft.config import load_recipe
    from air_ft.data import load_texts, sample_windows
    from air_ft.pipeline.commands import load_dense

    recipe = load_recipe(args.recipe)
    model, tok = load_dense(recipe)
    c = recipe.compress
    windows = sample_windows(tok, load_texts(recipe.data.calibration), c.num_samples, c.seq_len,
                             c.seed)[:args.windows]  # the windows compression draws, its first ones
    token_share, token_pos, channel_energy = [], [], None
    with torch.no_grad():
        for w in windows:
            states = torch.stack(model(w[None], output_hidden_states=True).hidden_states[1:])[:, 0].double()
            energy = states.square()  # (blocks, tokens, channels)
            per_token = energy.sum(-1)
            share, pos = (per_token / per_token.sum(-1, keepdim=True)).max(-1)
            token_share.append(share)
            token_pos.append(pos)
            channel_energy = energy.sum(1) if channel_energy is None else channel_energy + energy.sum(1)
    token_share, token_pos = torch.stack(token_share), torch.stack(token_pos)  # (windows, blocks)
    channel_share, channel = (channel_energy / channel_energy.sum(-1, keepdim=True)).max(-1)
    last = token_share.shape[1] - 1  # transformers hands the last block's exit after the final norm
    rows = [{"block": b, "after_final_norm": b == last, "largest_token_share_mean": float(token_share[:, b].mean()),
             "largest_token_share_max": float(token_share[:, b].max()),
             "largest_token_positions": token_pos[:, b].tolist(),
             "largest_channel_share": float(channel_share[b]), "largest_channel": int(channel[b])}
            for b in range(token_share.shape[1])]
    print("| block | largest token's share (mean / max over windows) | its positions | largest channel's share |\n"
          "|---|---|---|---|")
    for r in rows:
        where = f"{r['block']} (after the final norm)" if r['after_final_norm'] else r['block']
        print(f"| {where} | {r['largest_token_share_mean']:.3f} / {r['largest_token_share_max']:.3f} | "
              f"{r['largest_token_positions']} | {r['largest_channel_share']:.3f} (channel {r['largest_channel']}) |")
    path = write_json(args.output, {"recipe": str(args.recipe), "windows": int(windows.shape[0]),
                                    "seq_len": int(windows.shape[1]), "blocks": rows, "environment": environment()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
