"""netadapt host side: the NetAdapt engine, device client and command-line tools.

Importing `host` installs one import hook: the first `import torchvision` in this process (the
user's code, or unpickling a torchvision model in a proposal worker) first declares the two
torchvision op schemas its import needs when its compiled ops cannot load with this torch (see
`host.models.torchvision_zoo`). Nothing else happens, and torch is not imported, until then.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType


class _TorchvisionOps(importlib.abc.MetaPathFinder):
    """Runs `declare_missing_ops` before torchvision is imported; finds nothing itself."""

    busy = False

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torchvision" or self.busy:
            return None
        type(self).busy = True
        try:
            from host.models.torchvision_zoo import declare_missing_ops

            declare_missing_ops()
        finally:
            type(self).busy = False
        return None


if not any(isinstance(f, _TorchvisionOps) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionOps())
