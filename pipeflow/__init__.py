"""pipeflow: train Glow normalizing flows by parts.

A flow f = f_P o ... o f_1 is cut into P contiguous parts; part k minimises its own
truncated objective on the detached output of the parts before it, so no gradient (and,
across devices, no message) ever travels backwards. A short end-to-end fine-tuning of the
glued flow follows.
"""

from pipeflow.glow import Glow
from pipeflow.objective import bits_per_dim, part_objective
from pipeflow.parts import Part, split_into_parts

__version__ = "0.1.0"
__all__ = ["Glow", "Part", "bits_per_dim", "part_objective", "split_into_parts", "__version__"]
