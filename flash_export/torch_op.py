"""`import flash_export.torch_op` registers `flash_export::attention`, as before the layers.

An alias of `flash_export.nn.torch_op`, where the operator lives: the path user code names.
"""

import sys

from flash_export.nn import torch_op as _torch_op

sys.modules[__name__] = _torch_op
