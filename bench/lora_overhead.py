"""Cost of unmerged LoRA hooks in a training step, measured side by side in one run.

    python bench/lora_overhead.py [--hidden 512] [--tokens 1024] [--rank 16] [--steps 10] [--device cpu]

Builds a FLUX-shaped transformer (random weights), then times forward+backward of the plain model (gradients to
the input only) against the same model with a rank-r LoRA on every block Linear (gradients to the LoRA), and
prints the median step times and their ratio. Timings on shared machines are noisy: read the ratio.
"""

import argparse
import statistics
import time

import torch

from trainer.flow import image_ids, text_ids
from trainer.lora import LoRAConfig, LoRANetwork
from trainer.models.flux import Flux, FluxParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024, help="image tokens (a square of side sqrt(tokens))")
    ap.add_argument("--text", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    heads = args.hidden // 128 or 1
    params = FluxParams(vec_in_dim=768, context_in_dim=4096, hidden_size=args.hidden, mlp_hidden_dim=4 * args.hidden,
                        num_heads=heads, depth=args.depth, depth_single_blocks=args.single,
                        axes_dim=(16, 56, 56) if args.hidden // heads == 128 else (4, 14, 14))
    torch.manual_seed(0)
    model = Flux(params).to(args.device, dtype).requires_grad_(False)
    side = int(args.tokens**0.5)
    img = torch.randn(1, side * side, 64, device=args.device, dtype=dtype)
    inputs = dict(img_ids=image_ids(1, 2 * side, 2 * side, device=args.device),
                  txt=torch.randn(1, args.text, 4096, device=args.device, dtype=dtype),
                  txt_ids=text_ids(1, args.text, device=args.device), timesteps=torch.tensor([0.5], device=args.device),
                  y=torch.randn(1, 768, device=args.device, dtype=dtype),
                  guidance=torch.tensor([1.0], device=args.device))

    def step() -> float:
        x = img.clone().requires_grad_(True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(img=x, **inputs).float().square().mean().backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def median(n: int) -> float:
        step()  # warm-up
        return statistics.median(step() for _ in range(n))

    network = LoRANetwork.create(LoRAConfig(network_dim=args.rank, network_alpha=args.rank), model, dtype=dtype)
    rounds = []
    for _ in range(2):  # interleave to spread machine noise over both
        plain = median(args.steps)
        network.attach()
        hooked = median(args.steps)
        network.detach()
        rounds.append((plain, hooked))
    plain = min(r[0] for r in rounds)
    hooked = min(r[1] for r in rounds)
    print(f"device {args.device}, {args.dtype}, hidden {args.hidden}, blocks {args.depth}+{args.single}, "
          f"{side * side} image tokens, LoRA rank {args.rank} on {len(network.loras)} layers")
    print(f"plain model  {plain * 1000:8.1f} ms/step")
    print(f"with LoRA    {hooked * 1000:8.1f} ms/step")
    print(f"ratio        {hooked / plain:8.3f}")


if __name__ == "__main__":
    main()
