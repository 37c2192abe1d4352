"""The original TempBalance usage pattern, unchanged except for the import.

Build param groups -> SGD -> train an epoch -> global lr decay -> ``tb_scheduler.step(optimizer, lr)``,
exactly as a script written for the original ``Tempbalance`` does it, on a CNN with BatchNorm and
on a small transformer (synthetic data, a few epochs, CPU, seconds).

    PYTHONPATH=. python examples/original_usage_cnn.py
"""
import math

import torch
import torch.nn as nn
import torch.optim as optim

# from tempbalance import Tempbalance     # the original
from tbfast import Tempbalance             # the only changed line


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, 2)
        self.layer3 = BasicBlock(32, 64, 2)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(out.mean(dim=(2, 3)))


class TinyViT(nn.Module):
    def __init__(self, d=64, depth=3, num_classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.blocks = nn.ModuleList(
            [nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(dim=1))


def train(net, name, epochs=4, lr=0.05, **tb_kwargs):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]
    criterion = nn.CrossEntropyLoss()

    # ---- the original usage pattern ----
    tb_scheduler = Tempbalance(net=net, pl_fitting="median", xmin_pos=2, filter_zeros=False,
                               remove_first_layer=True, remove_last_layer=True, esd_metric_for_tb="alpha",
                               assign_func="tb_linear_map", lr_min_ratio=0.5, lr_max_ratio=1.5,
                               batchnorm=True, batchnorm_type="name", **tb_kwargs)
    tb_param_group, _ = tb_scheduler.build_optimizer_param_group(untuned_lr=lr, initialize=True)
    optimizer = optim.SGD(tb_param_group, momentum=0.9, weight_decay=5e-4)
    for epoch in range(epochs):
        net.train()
        for x, y in data:
            optimizer.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            optimizer.step()
        untuned_lr = 0.5 * lr * (1 + math.cos(math.pi * (epoch + 1) / epochs))
        tb_scheduler.step(optimizer, untuned_lr)
        # ------------------------------------
        lrs = [round(grp["lr"], 5) for grp in optimizer.param_groups]
        print(f"{name} epoch {epoch}: loss {loss.item():.3f}, untuned lr {untuned_lr:.4f}, group lrs {lrs}")


if __name__ == "__main__":
    torch.manual_seed(0)
    train(TinyResNet(), "resnet")
    torch.manual_seed(0)
    # the transformer's matrices are 64 wide, so keep the original's eigs_thresh=50 and add layernorm coupling
    train(TinyViT(), "vit", lr=0.01, layernorm=True)
