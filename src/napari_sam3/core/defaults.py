"""The defaults the CLI, the Python API and the widget share, defined once.

Plain constants only (no imports), so the CLI's ``--help`` and the widget's
construction read them without loading torch, transformers or anything heavy.
"""

DEFAULT_MODEL = "facebook/sam3"  # hub id of the checkpoint holding tracker + detector
DEVICES = ("auto", "cpu", "cuda", "mps")

DEFAULT_TILE = 1008  # SAM3's input size: no resampling inside a tile
DEFAULT_OVERLAP = DEFAULT_TILE // 4  # 252: cells up to ~250 px across are never cut

DIRECTIONS = ("both", "forward", "backward")  # propagation; the first is the default
DEFAULT_DIRECTION = DIRECTIONS[0]
DEFAULT_STOP_AFTER = 3  # slices in a row without the object before it is dropped

DEFAULT_THRESHOLD = 0.5  # concept score kept by default
DEFAULT_MIN_SCORE = 0.05  # concept candidates kept for later threshold changes

MAX_ID = 2**31 - 1  # labels are int32
