"""SM2 for a small decoder-only Transformer on byte-level WikiText-2, as in the paper's third experiment.

Run (downloads WikiText-2 raw through our TFDS builder, or reads it from ``manual_dir``)::

    sm2jax run --preset wikitext2 --dir runs/wikitext2-sm2

Expected: about an hour on one GPU. The metric is validation perplexity per byte (lower is better).
Not yet run by us: no figures are claimed.
"""

from sm2jax.presets import wikitext2_transformer


def get_config():
    return wikitext2_transformer()
