"""SM2 for a small decoder-only Transformer on byte-level WikiText-2, as in the paper's third experiment.

Run::

    sm2jax prepare wikitext2          # once: downloads, or says where to place wikitext-2-raw-v1.zip
    sm2jax run --config experiments/wikitext2_transformer/config.py --dir runs/wikitext2-sm2
    sm2jax run --config experiments/wikitext2_transformer/config.py --quick   # small: about a minute on a CPU

Expected: about an hour on one GPU. The metric is validation perplexity per byte (lower is better).
Not yet run by us: no figures are claimed.
"""

from sm2jax.presets import wikitext2_transformer


def get_config(quick: bool = False):
    return wikitext2_transformer(quick=quick)
