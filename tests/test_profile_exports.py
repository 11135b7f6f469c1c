"""A run on the synthetic screen with two batches: NSC, NSCB and mAP by the reference
protocol beside the baselines', and exports that reproduce them (train_mcnn.py and
predict.py --profiles, each run once as a user runs it)."""
import json

import pandas as pd
import pytest

from conftest import PYTHON, ROOT, run
from test_profiles import nsc_by_pandas

CLASSES, COMPOUNDS, FIELDS = 3, 2, 3


@pytest.fixture(scope="module")
def batched_run(tmp_path_factory):
    """(model dir, stdout) of a short run on the screen imaged in two batches."""
    folder = tmp_path_factory.mktemp("batched")
    result = run([PYTHON, f"{ROOT}/train_mcnn.py", "--image_height=128", "--image_width=128",
                  f"--synthetic_classes={CLASSES}", f"--synthetic_compounds_per_class={COMPOUNDS}",
                  f"--synthetic_fields_per_treatment={FIELDS}", "--synthetic_batches=2",
                  "--epochs=2", "--warmup_epochs=0.2", "--per_rank_batch=4", "--nonsc",
                  f"--synthetic_cache={folder / 'data'}", f"--model_dir={folder / 'model'}"],
                 cwd=ROOT)
    return folder / "model", result.stdout


def test_nsc_nscb_and_map_by_each_normalisation_beside_the_baselines(batched_run):
    model_dir, stdout = batched_run
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["final_profile_normalization"] == "tvn"
    assert set(summary["final_nsc_by_normalization"]) == {"none", "plate", "tvn"}
    # Compounds 1 and 2 of each MoA are in different batches: NSCB has neighbours.
    assert summary["final_nscb_queries"] == 4 and summary["final_nscb"] is not None
    assert 0 <= summary["final_map_activity"] <= 1
    assert 0 <= summary["final_map_consistency_retrieved"] <= 1
    baselines = summary["final_baselines"]
    assert set(baselines) == {"untrained", "intensity"}
    for figures in baselines.values():
        assert set(figures["nsc_by_normalization"]) == {"none", "plate", "tvn"}
        assert figures["nsc_all_queries"] == 2 * COMPOUNDS * (CLASSES - 1)
    assert "NSCB's batches: the week of each plate's name (WeekN_..., as BBBC021's)" in stdout
    assert "baseline, untrained profiles: NSC (tvn)" in stdout
    assert "baseline, intensity profiles: NSC (tvn)" in stdout
    page = (model_dir / "evaluation" / "index.html").read_text()
    assert "2batches_by-compound: held-out evaluation of model</title>" in page
    assert "<td>intensity</td>" in page and "NSCB&#x27;s batches" in page


def test_the_runs_exports_cover_every_field_and_reproduce_its_nsc(batched_run):
    model_dir, _ = batched_run
    summary = json.loads((model_dir / "summary.json").read_text())
    manifest = json.loads((model_dir / "data_manifest.json").read_text())
    folder = model_dir / "evaluation"
    fields = pd.read_parquet(folder / "profiles.parquet")
    assert len(fields) == sum(split["count"] for split in manifest["splits"].values())
    assert set(fields["Metadata_Batch"]) == {"Week1", "Week2"}
    assert set(fields["Metadata_Site"]) == {"1", "2", "3"}
    treatments = pd.read_parquet(folder / "treatment_profiles.parquet")
    assert nsc_by_pandas(treatments) == (summary["final_nsc"], summary["final_nscb"],
                                         summary["final_nsc_all"])


def test_predicted_profiles_with_an_moa_table_have_their_figures(batched_run, tmp_path):
    model_dir, _ = batched_run
    screen = next((model_dir.parent / "data").glob("*_screen"))
    output = tmp_path / "predictions.csv"
    result = run([PYTHON, f"{ROOT}/predict.py", f"--model_dir={model_dir}", f"--output={output}",
                  "--profiles", f"--image_table={screen / 'BBBC021_v1_image.csv'}",
                  f"--image_root={screen / 'images'}",
                  f"--moa_table={screen / 'BBBC021_v1_moa.csv'}"], cwd=ROOT)
    figures = json.loads((tmp_path / "predictions_profile_figures.json").read_text())
    # Every treatment is a query: predict.py knows no split.
    assert figures["nsc_all_queries"] == 2 * COMPOUNDS * (CLASSES - 1)
    assert figures["nsc_queries"] == 0 and figures["map_activity"] is not None
    assert "NSC of all treatments (tvn): " in result.stdout
    wells = pd.read_parquet(tmp_path / "predictions_well_profiles.parquet")
    assert set(wells["Metadata_Batch"]) == {"Week1", "Week2"}
    assert len(pd.read_csv(tmp_path / "predictions_profiles.csv")) == len(pd.read_csv(output))
