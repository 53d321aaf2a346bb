"""zopro: zeroth-order preference optimisation (ZOPrO) of LLMs."""
