"""The benchmark's building blocks (the ``bench`` verb is ``jobs/bench.py``): the PyTorch peer that every
engine figure is compared with in the same run."""
