"""Datasets as plain Python splits, plus Lightning DataModules that tokenize and batch them."""
from opdf_exp.data.sources import TextExamples, TextSplits, bbc_news, glue
from opdf_exp.data.text import TextClassificationDataModule

__all__ = ["TextExamples", "TextSplits", "bbc_news", "glue", "TextClassificationDataModule"]
