import os
import sys

import torch

# One intra-op thread: the parent never starts an OpenMP pool, so forking rank processes is safe,
# and two cores are not oversubscribed by four ranks.
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
