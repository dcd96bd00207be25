"""The weight initialization every model in the zoo starts from."""
from torch import nn


def init_weights(net: nn.Module) -> None:
    """Kaiming normal (He et al. 2015, "Delving Deep into Rectifiers", fan_out) for convs and unit
    BatchNorm, as torchvision's resnet.py does; linear layers keep PyTorch's default."""
    # A network built on the meta device (sizes and FLOPs only) has no values to draw, and drawing them
    # there runs in Python: half of the build's time.
    if any(parameter.is_meta for parameter in net.parameters()):
        return
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
