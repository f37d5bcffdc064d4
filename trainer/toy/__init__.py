"""A toy FLUX family: a tiny autoencoder and a tiny FLUX transformer in the real architectures and file layouts,
pretrained on procedurally drawn coloured shapes (pretrain.py), so the demo can show a LoRA teaching a new shape."""
