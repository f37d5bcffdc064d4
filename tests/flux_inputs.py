"""Random inputs for a FLUX-shaped transformer's forward (tests of the block runners)."""

import torch


def random_inputs(params, seed: int, mask: bool = False) -> dict:
    """Two samples of 16 image and 8 text tokens drawn from `seed`; with `mask`, the first sample's text is 5 tokens."""
    g = torch.Generator().manual_seed(seed)
    batch, n_img, n_txt = 2, 16, 8
    out = dict(
        img=torch.randn(batch, n_img, params.in_channels, generator=g),
        img_ids=torch.randint(0, 4, (batch, n_img, 3), generator=g).float(),
        txt=torch.randn(batch, n_txt, params.context_in_dim, generator=g),
        txt_ids=torch.zeros(batch, n_txt, 3),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, params.vec_in_dim, generator=g),
        guidance=torch.full((batch,), 3.5),
    )
    if mask:
        out["txt_attention_mask"] = torch.arange(n_txt)[None].expand(batch, -1) < torch.tensor([[5], [8]])
    return out
