"""The project's figures: matplotlib drawing to files (no screen), and one way to save
them. report.py and studies.py draw with it."""
import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402


def save(figure, path):
    """Writes `figure` to `path` (PNG at 110 dpi, laid out tight), closes it, says where."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"wrote {path}")
