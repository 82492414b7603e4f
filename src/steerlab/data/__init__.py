"""Contrast datasets (A/B items, paired texts, prompts), chat templating and token positions, a pinned fetcher."""

from steerlab.data.batching import ReadSpec, batches_by_length, pad_batch
from steerlab.data.builtin import list_builtin, load_builtin
from steerlab.data.cloze import ClozeItem, load_cloze
from steerlab.data.contrast import (
    ABDataset,
    ABItem,
    load_ab,
    load_anthropic_jsonl,
    load_caa_json,
    normalise_label,
    option_spans,
    parse_options,
)
from steerlab.data.errors import DataFormatError
from steerlab.data.experiment import Experiment, load_experiment
from steerlab.data.fetch import CAA_BEHAVIOURS, CAA_SPLITS, IntegrityError, caa_url, fetch_caa, load_caa
from steerlab.data.sources import DataRef, load_dataset, load_texts, load_word_lists
from steerlab.data.templating import (
    AnswerLocation,
    adds_bos,
    encode,
    format_prompt,
    join_answer,
    locate_answers,
)
from steerlab.data.texts import PairedTexts, PromptSet, load_paired_texts, load_prompts

__all__ = [
    "ReadSpec",
    "batches_by_length",
    "pad_batch",
    "CAA_BEHAVIOURS",
    "CAA_SPLITS",
    "ABDataset",
    "ABItem",
    "ClozeItem",
    "AnswerLocation",
    "DataFormatError",
    "DataRef",
    "Experiment",
    "IntegrityError",
    "PairedTexts",
    "PromptSet",
    "adds_bos",
    "caa_url",
    "encode",
    "fetch_caa",
    "format_prompt",
    "join_answer",
    "list_builtin",
    "load_ab",
    "load_anthropic_jsonl",
    "load_builtin",
    "load_caa",
    "load_caa_json",
    "load_cloze",
    "load_dataset",
    "load_experiment",
    "load_paired_texts",
    "load_prompts",
    "load_texts",
    "load_word_lists",
    "locate_answers",
    "normalise_label",
    "option_spans",
    "parse_options",
]
