"""Networks: the backbones, 1-Lipschitz layers and their Lipschitz bounds, and the compute
precision of a backbone.

    backbones           `get_backbone(name, ...)` and the builders, re-exported
    standard_backbones  the paper's CIFAR ResNet-18 and a small ConvNet
    lipschitz_backbone  the 1-Lipschitz ConvNet (`--backbone=lipschitz`)
    backbone_inputs     what every backbone takes (input shape, normalization, width)
    aol_layers          AOL convolution and dense layers (1-Lipschitz for any weights)
    lipschitz_layers    1-Lipschitz layers without weights (MaxMin, space-to-depth, pooling)
    lipschitz           l2 Lipschitz bounds of a backbone (exact by construction, or a product)
    precision           float32, or a float16/bfloat16 backbone under float32 heads
"""

from clustr_tf.nets import backbone_inputs
from clustr_tf.nets import aol_layers
from clustr_tf.nets import lipschitz_layers
from clustr_tf.nets import lipschitz
from clustr_tf.nets import standard_backbones
from clustr_tf.nets import lipschitz_backbone
from clustr_tf.nets import backbones
from clustr_tf.nets import precision
