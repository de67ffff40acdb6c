"""``python -m rlhfkit.labelling ...`` is the same as ``rlhfkit label ...``."""

from .cli import label_app

if __name__ == "__main__":
    label_app()
