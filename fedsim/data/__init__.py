"""Data: datasets in memory, their file formats, and how they are split among clients.

The public face of the package; the formats (``images``, ``text``, ``shakespeare``,
``hf``) load only when their dataset does.
"""

from fedsim.data.dataset import (
    HF_PREFIX,
    PAD_ID,
    PRELOAD_VAR,
    TOKENIZATION,
    UNK_ID,
    Dataset,
    check_labels,
    check_node_data,
    check_node_folder,
    load_checked,
    load_dataset,
    load_digits,
    stratified_split,
    token_array,
    vocab_record,
)
from fedsim.data.partition import label_counts, natural_users, partition, partition_dataset
from fedsim.registry import IMAGE, NEXT_CHAR, TASKS, TEXT_CLASSIFICATION

__all__ = [
    "HF_PREFIX",
    "IMAGE",
    "NEXT_CHAR",
    "PAD_ID",
    "PRELOAD_VAR",
    "TASKS",
    "TEXT_CLASSIFICATION",
    "TOKENIZATION",
    "UNK_ID",
    "Dataset",
    "check_labels",
    "check_node_data",
    "check_node_folder",
    "label_counts",
    "load_checked",
    "load_dataset",
    "load_digits",
    "natural_users",
    "partition",
    "partition_dataset",
    "stratified_split",
    "token_array",
    "vocab_record",
]
