"""The M-CNN of mcnn_model.py in PyTorch, for one comparison: a training step's peak
resident memory against TensorFlow's (memory_probe.py's `step` phase), same model,
batch held in memory, SGD with Nesterov momentum and weight decay, label smoothing.

    python mcnn_torch.py --batch 4 [--precision bfloat16] [--height 1024 --width 1280]

Prints one JSON line: the batch, precision, parameters, and the peak RSS in GB after
the runtime and model (`state`) and after two training steps (`step`). Not a part
of the project: it runs in a virtual environment with torch (see `run`).
"""
import argparse
import json
import resource

import torch
from torch import nn

FILTERS_PER_SCALE = (16, 16, 16, 32, 32, 32, 64)  # mcnn_model.py's table
MERGE_FILTERS, HIDDEN_UNITS, KERNEL_SIZE = 1024, 512, 5


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def column(channels, scale):
    """Pool by 2**scale, three 5x5 convolutions with ReLU, pool to 1/64."""
    layers = [nn.MaxPool2d(2 ** scale)] if scale else []
    for i in range(3):
        layers += [nn.Conv2d(channels if i == 0 else FILTERS_PER_SCALE[scale],
                             FILTERS_PER_SCALE[scale], KERNEL_SIZE, padding="same"), nn.ReLU()]
    if scale < 6:
        layers.append(nn.MaxPool2d(64 // 2 ** scale))
    return nn.Sequential(*layers)


class MCNN(nn.Module):
    def __init__(self, height, width, channels, classes):
        super().__init__()
        self.columns = nn.ModuleList(column(channels, k) for k in range(7))
        self.merge = nn.Sequential(nn.Conv2d(sum(FILTERS_PER_SCALE), MERGE_FILTERS, 1), nn.ReLU(),
                                   nn.MaxPool2d(2), nn.Flatten())
        self.hidden = nn.Linear(height // 128 * width // 128 * MERGE_FILTERS, HIDDEN_UNITS)
        self.logits = nn.Linear(HIDDEN_UNITS, classes)

    def forward(self, images):
        x = images.float() / 255
        x = torch.cat([c(x) for c in self.columns], dim=1)
        return self.logits(self.hidden(self.merge(x)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=6)
    args = parser.parse_args()
    model = MCNN(args.height, args.width, 3, args.classes).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9, nesterov=True,
                                weight_decay=5e-5)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    images = torch.randint(0, 256, (args.batch, 3, args.height, args.width), dtype=torch.uint8
                           ).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (args.batch,))
    peaks = {"state": peak_rss_gb()}
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bfloat16"):
            loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
    peaks["step"] = peak_rss_gb()
    print(json.dumps({"framework": f"torch {torch.__version__}", "batch": args.batch,
                      "precision": args.precision,
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "peak_rss_gb": peaks}))


if __name__ == "__main__":
    main()
