"""One intra-op thread for the tests' tiny models unless OMP_NUM_THREADS says otherwise.

On a 2-core machine shared with other jobs, torch's two intra-op threads wait on each other (and on the other jobs)
and make these tests several times slower than one thread; the results compared are the same.
"""

import os

import torch

if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)
