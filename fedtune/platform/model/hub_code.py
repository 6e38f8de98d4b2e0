"""What every model load passes so that no code from outside the node runs in it.

transformers 5.2x defaults ``use_kernels=True``: a model loaded with ``from_pretrained`` is
"kernelized", and on CUDA that fetches kernels from the Hugging Face hub and runs them (seen
on an H200: ``model.train()`` went to fetch ``kernels-community/rotary``; only the kernels
library's publisher check stopped it). A hospital node runs no code it did not install, and
an air-gapped one has no hub to reach: every load turns it off.
"""

from __future__ import annotations

from typing import Any

NO_HUB_CODE: dict[str, Any] = {"use_kernels": False}
