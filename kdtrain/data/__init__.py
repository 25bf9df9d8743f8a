"""Data pipeline: tokenizer, demo corpus, indexed token files and GPT training windows."""

from kdtrain.data.blend import BlendedWindowDataset
from kdtrain.data.demo_corpus import build_demo_corpus
from kdtrain.data.gpt_dataset import GPTWindowDataset
from kdtrain.data.indexed import IndexedTokens, open_indexed_dataset, write_indexed_dataset
from kdtrain.data.preprocess import encode_files
from kdtrain.data.sources import iter_documents
from kdtrain.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "BlendedWindowDataset",
    "GPTWindowDataset",
    "IndexedTokens",
    "Tokenizer",
    "build_demo_corpus",
    "encode_files",
    "iter_documents",
    "open_indexed_dataset",
    "train_tokenizer",
    "write_indexed_dataset",
]
