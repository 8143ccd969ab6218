"""Shared, framework-free helpers of fedimaging (atomic file output, home folder).

Nothing here imports Flower or MONAI, so every other package may use it.
"""

__version__ = "0.1.0"
