"""The workloads of ``bench_batchnorm.py``: its models, data and correctness checks.

One BatchNorm layer (``LayerBench``) and a small CNN's training step (``CnnBench``), each with ``nn.BatchNorm2d``
("torch"), our ``SynchronizedBatchNorm2d`` ("ours") or the established library's layer re-implemented
("established") under ``DataParallelWithCallback`` with 2 CPU replicas, and the checks of the synchronized ones
against one ``nn.BatchNorm2d`` on the whole batch. See ``bench_batchnorm.py`` for what is measured and why.
"""

from __future__ import annotations

import established_batchnorm  # beside this file, on the path of whoever imports this one (as wrapper_cost's imports)
import torch
import torch.nn.functional as F
from torch import nn

import syncbn_ext

REPLICAS = 2
TOLERANCE = {"layer": 1e-4, "cnn": 1e-3}  # largest scaled error against the unreplicated torch reference
SYNCHRONIZED = ("ours", "established")  # torch's BatchNorm under replication is not meant to match: not checked

LAYER_SHAPE = (64, 64, 32, 32)  # N, C, H, W
CNN_BATCH, CNN_CHANNELS, CNN_SIZE, CNN_BLOCKS, CNN_CLASSES = 32, 32, 32, 8, 10

# --------------------------------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------------------------------


def make_bn(variant: str, num_features: int) -> nn.Module:
    if variant == "torch":
        return nn.BatchNorm2d(num_features)
    if variant == "ours":
        return syncbn_ext.SynchronizedBatchNorm2d(num_features)
    if variant == "established":
        return established_batchnorm.SynchronizedBatchNorm2d(num_features)
    raise ValueError(f"unknown variant {variant!r}")


def make_cnn(variant: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for _ in range(CNN_BLOCKS):
        layers += [
            nn.Conv2d(in_channels, CNN_CHANNELS, 3, padding=1, bias=False),
            make_bn(variant, CNN_CHANNELS),
            nn.ReLU(inplace=True),
        ]
        in_channels = CNN_CHANNELS
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CNN_CHANNELS, CNN_CLASSES)]
    return nn.Sequential(*layers)


def wrap(module: nn.Module) -> nn.Module:
    return syncbn_ext.DataParallelWithCallback(module, device_ids=["cpu"] * REPLICAS)


def _layer_reference() -> nn.BatchNorm2d:
    """The layer's initial state: non-trivial affine parameters, the same for every variant."""
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(LAYER_SHAPE[1])
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    return ref


def _layer_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(LAYER_SHAPE, generator=gen) * 2.0 + 0.5
    g = torch.randn(LAYER_SHAPE, generator=gen)
    return x, g


def _cnn_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(CNN_BATCH, 3, CNN_SIZE, CNN_SIZE, generator=gen)
    labels = torch.randint(0, CNN_CLASSES, (CNN_BATCH,), generator=gen)
    return images, labels


class LayerBench:
    """One BatchNorm layer of ``variant`` under 2 CPU replicas; ``step()`` is one forward + backward."""

    def __init__(self, variant: str) -> None:
        self.module = make_bn(variant, LAYER_SHAPE[1])
        self.module.load_state_dict(_layer_reference().state_dict())
        self.dp = wrap(self.module)
        x, self.g = _layer_data()
        self.x = x.requires_grad_()

    def step(self) -> None:
        out = self.dp(self.x)
        out.backward(self.g)
        del out
        self.x.grad = None
        self.module.zero_grad(set_to_none=True)


class CnnBench:
    """The small CNN with ``variant``'s BatchNorm under 2 CPU replicas; ``step()`` is one SGD step."""

    def __init__(self, variant: str) -> None:
        torch.manual_seed(0)
        reference = make_cnn("torch")
        self.model = make_cnn(variant)
        self.model.load_state_dict(reference.state_dict())
        self.dp = wrap(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.images, self.labels = _cnn_data()

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.dp(self.images), self.labels)
        loss.backward()
        self.optimizer.step()


# --------------------------------------------------------------------------------------------------------------
# Correctness, before timing
# --------------------------------------------------------------------------------------------------------------


def _scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = max(1.0, expected.abs().max().item())
    return (actual.detach() - expected.detach()).abs().max().item() / scale


def check_layer(variant: str) -> float:
    """Largest scaled error of ``variant`` under 2 replicas against one nn.BatchNorm2d on the whole batch."""
    ref = _layer_reference()
    module = make_bn(variant, LAYER_SHAPE[1])
    module.load_state_dict(ref.state_dict())
    dp = wrap(module)
    x, g = _layer_data()
    errors = []
    for _ in range(2):  # twice: the second pass starts from updated running statistics and replicates again
        xr, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref = ref(xr)
        out_ref.backward(g)
        out = dp(xv)
        out.backward(g)
        errors += [
            _scaled_error(out, out_ref),
            _scaled_error(xv.grad, xr.grad),
            _scaled_error(module.weight.grad, ref.weight.grad),
            _scaled_error(module.bias.grad, ref.bias.grad),
            _scaled_error(module.running_mean, ref.running_mean),
            _scaled_error(module.running_var, ref.running_var),
        ]
    return max(errors)


def check_cnn(variant: str) -> float:
    """Largest scaled error of the CNN's loss and parameter gradients against the unreplicated torch CNN."""
    torch.manual_seed(0)
    ref = make_cnn("torch")
    model = make_cnn(variant)
    model.load_state_dict(ref.state_dict())
    images, labels = _cnn_data()
    loss_ref = F.cross_entropy(ref(images), labels)
    loss_ref.backward()
    loss = F.cross_entropy(wrap(model)(images), labels)
    loss.backward()
    errors = [_scaled_error(loss, loss_ref)]
    for p, p_ref in zip(model.parameters(), ref.parameters(), strict=True):
        errors.append(_scaled_error(p.grad, p_ref.grad))
    return max(errors)
