import os

import torch

# Tests are small: one intra-op thread keeps them deterministic and fair on a shared 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
