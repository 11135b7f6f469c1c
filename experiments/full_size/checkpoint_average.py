"""Held-out field accuracy of a run's kept checkpoints and of the average of the weights
of its last K (stochastic weight averaging after the fact; Izmailov et al. 2018), the
lead for issue 35's end-of-run swing (docs/recipe_study.md, "At full size").

    .venv/bin/python experiments/full_size/checkpoint_average.py RUN_DIR [DATA_DIR]

RUN_DIR is a train_mcnn.py --model_dir run with --keep_checkpoints above 1; DATA_DIR
its data set (default: the one its data manifest names).
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import tf_env  # noqa: E402,F401  (before TensorFlow)
import horovod.tensorflow as hvd  # noqa: E402
import tensorflow as tf  # noqa: E402

import data_pipeline  # noqa: E402
import evaluation  # noqa: E402
import model_files  # noqa: E402


def accuracy(predict, batches):
    right = total = 0
    for images, labels, _ in batches:
        logits, _ = predict(images)
        right += int(np.sum(np.argmax(logits.numpy(), axis=1) == labels.numpy()))
        total += len(labels)
    return right / total


def held_out(run_dir, data_dir=None, batch_size=8):
    """(model, its predict (evaluation.make_predict), the held-out (image, label,
    provenance) batches as a list, the manifest) of a train_mcnn.py run: its exported
    weights (else its newest checkpoint), read in bf16 where the CPU has it, and the
    held-out fields of `data_dir` (default: the data set its data manifest names)."""
    hvd.init()
    model, manifest = model_files.load_trained(run_dir, tf_env.resolve_precision("auto")[0])
    data_dir = data_dir or manifest["source"]
    print(f"held-out fields of {data_dir}", flush=True)
    batches = list(data_pipeline.make_dataset(
        data_pipeline.read_manifest(data_dir), "eval",
        data_pipeline.Feed(batch_size, 0, 1, provenance=True)))
    predict = evaluation.make_predict(model, manifest["image_shape"],
                                      data_pipeline.DTYPES[manifest["dtype"]])
    return model, predict, batches, manifest


def main(run_dir, data_dir=None):
    model, predict, batches, _ = held_out(run_dir, data_dir)
    newest_first = model_files.checkpoints_in(os.path.join(run_dir, "checkpoints"))
    weights = []
    for path in newest_first:
        tf.train.Checkpoint(model=model).restore(path).expect_partial()
        weights.append(model.get_weights())
        print(f"{os.path.basename(path)}: {accuracy(predict, batches):.4f}", flush=True)
    for last in range(2, len(weights) + 1):
        model.set_weights([np.mean(w, axis=0) for w in zip(*weights[:last])])
        print(f"average of the last {last}: {accuracy(predict, batches):.4f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
