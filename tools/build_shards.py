"""Build pre-grouped latent shards from a source checkout: the same as ``python -m gd.build_shards`` and
``gd-build-shards`` (see gd/build_shards.py for the settings, ranks and resumption)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gd.build_shards import main  # noqa: E402

if __name__ == "__main__":
    main()
