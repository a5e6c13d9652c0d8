"""Preference data: readers -> tokenized (1 + L)-candidate arrays -> resumable, process-sharded grain batches."""

from mcpo_jax.data.example import DataError, PreferenceExample
from mcpo_jax.data.pipeline import bucket_for, bucket_lengths, make_batch_iterator, num_batches, padding_report
from mcpo_jax.data.readers import FORMATS, LoadedExamples, load_examples, parse_nectar_prompt
from mcpo_jax.data.tokenize import TokenizedDataset, load_tokenizer, tokenize_examples

__all__ = [
    "DataError",
    "bucket_for",
    "bucket_lengths",
    "padding_report",
    "FORMATS",
    "LoadedExamples",
    "PreferenceExample",
    "TokenizedDataset",
    "load_examples",
    "load_tokenizer",
    "make_batch_iterator",
    "num_batches",
    "parse_nectar_prompt",
    "tokenize_examples",
]
