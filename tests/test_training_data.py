"""training_data.py: the synthetic data set is made once, whoever asks for it."""
import os
from concurrent.futures import ThreadPoolExecutor

import training_data


def test_concurrent_callers_generate_the_synthetic_set_once(tmp_path):
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: training_data.synthetic_dataset(
            str(tmp_path), 128, 128, 2, 1, 1, images_per_shard=1), range(3)))
    assert len(set(paths)) == 1
    made = sorted(p for p in os.listdir(tmp_path) if not p.endswith(".lock"))
    assert made == sorted([os.path.basename(paths[0]),
                           os.path.basename(paths[0]).replace("_by-compound", "_screen")])
