"""Does a trained run read how densely cells lie as an MoA? Each held-out field is
classified as it is and overlaid (pixel maximum) with a copy of itself rolled round by
half its height and width (data_pipeline.overlaid: twice its cells, each as it was), and
the calls are compared class by class (issue 35: the held-out DMSO fields the full-size model calls DNA damage are the sparse
ones; docs/recipe_study.md, "Which control fields fail").

    .venv/bin/python experiments/full_size/density_probe.py RUN_DIR [DATA_DIR]

RUN_DIR is a train_mcnn.py --model_dir run (its export, else its newest checkpoint);
DATA_DIR its data set (default: the one its data manifest names). Prints, per true
class, the held-out fields right as they are and doubled, and each changed call.
"""
import collections
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import data_pipeline  # noqa: E402
from checkpoint_average import held_out  # noqa: E402


def calls(predict, batches):
    """(true labels, calls as they are, calls doubled, compounds) of every field."""
    truth, plain, dense, compounds = [], [], [], []
    for images, labels, provenance in batches:
        truth += labels.numpy().tolist()
        plain += np.argmax(predict(images)[0].numpy(), axis=1).tolist()
        doubled = data_pipeline.overlaid(images, images.shape[1] // 2, images.shape[2] // 2)
        dense += np.argmax(predict(doubled)[0].numpy(), axis=1).tolist()
        compounds += [c.decode() for c in provenance["compound"].numpy()]
    return np.array(truth), np.array(plain), np.array(dense), compounds


def main(run_dir, data_dir=None):
    _, predict, batches, manifest = held_out(run_dir, data_dir, batch_size=4)
    truth, plain, dense, compounds = calls(predict, batches)
    classes = manifest["classes"]
    print(f"right as they are {np.mean(plain == truth):.4f}, doubled "
          f"{np.mean(dense == truth):.4f}")
    for k, name in enumerate(classes):
        mine = truth == k
        changed = collections.Counter(
            f"{classes[a]} -> {classes[b]}" for a, b in zip(plain[mine], dense[mine]) if a != b)
        print(f"{name}: {int(np.sum(plain[mine] == k))} / {int(np.sum(mine))} right as they "
              f"are, {int(np.sum(dense[mine] == k))} doubled; changed calls: "
              + (", ".join(f"{n} x {c}" for c, n in changed.most_common()) or "none"))
    print("compounds of changed calls: " + ", ".join(sorted(
        {c for c, a, b in zip(compounds, plain, dense) if a != b})))


if __name__ == "__main__":
    main(*sys.argv[1:3])
