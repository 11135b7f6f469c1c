"""The project's figures: matplotlib drawing to files (no screen), and one way to save
them. report.py, studies.py and illumination.py draw with it."""
import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402


def save(figure, path, say=print):
    """Writes `figure` to `path` (PNG at 110 dpi, laid out tight), closes it, and
    `say`s where."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    say(f"wrote {path}")
