"""distrifusion: displaced patch parallelism for diffusion models (DistriFusion, CVPR 2024).

    pipe = distrifusion.parallelize(pipe, comm, distrifusion.ParallelConfig())
"""

from .parallel_config import ParallelConfig
from .parallel_pipeline import parallelize

__all__ = ["ParallelConfig", "parallelize"]
