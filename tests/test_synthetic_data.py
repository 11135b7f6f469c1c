"""synthetic_data.py: the embedded screen is deterministic and its classes differ."""
import numpy as np

import synthetic_data


def test_synthetic_screen_is_deterministic_by_seed(tmp_path):
    def screen_bytes(seed, name):
        synthetic_data.write_screen(str(tmp_path / name), 128, 128, num_classes=3,
                                    compounds_per_class=2, fields_per_treatment=1, seed=seed,
                                    workers=2)
        return {str(p.relative_to(tmp_path / name)): p.read_bytes()
                for p in sorted((tmp_path / name).rglob("*")) if p.is_file()}

    first, again, other = screen_bytes(0, "a"), screen_bytes(0, "b"), screen_bytes(1, "c")
    assert first == again
    assert len([p for p in first if p.endswith(".tif")]) == 3 * 3 * 2 * 2  # 3 channels
    assert first.keys() == other.keys() and first != other


def test_synthetic_classes_differ_in_their_phenotype():
    """Nuclear (DNA) area per field separates DMSO from DNA damage on average."""
    def dna_fraction(moa):
        rng = np.random.default_rng(0)
        return np.mean([(synthetic_data.render_field(256, 320, synthetic_data.PHENOTYPES[moa],
                                                     rng)[..., 0] > 0.4).mean()
                        for _ in range(10)])

    assert dna_fraction("DNA damage") > 1.3 * dna_fraction("DMSO")


def test_split_counts_match_the_screen_converted_by_compound():
    fields = synthetic_data.plan_screen(6, 3, 7, plates=3, seed=0)
    assert len(fields) == sum(synthetic_data.split_counts(6, 3, 7)) == 252
    assert synthetic_data.split_counts(6, 3, 7) == (168, 84)  # the demo's, as converted
