"""distrifusion: displaced patch parallelism for diffusion models (DistriFusion, CVPR 2024)."""
