"""Tiny models and locally trained tokenizers for tests: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaTokenizerFast,
)

from trainer.data import synthetic_sentiment


def corpus() -> list[str]:
    data = synthetic_sentiment(400, 50)
    return [*data["train"].texts, "an unrelated sentence with other words , punctuation and UNKNOWN tokens !"]


def wordpiece_tokenizer(folder: Path, vocab_size: int = 300, lowercase: bool = True) -> BertTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    fast = BertTokenizerFast(tokenizer_object=tok, do_lower_case=lowercase)
    fast.save_pretrained(folder)
    return fast


def bpe_tokenizer(folder: Path, vocab_size: int = 400) -> RobertaTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")))
    fast = RobertaTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(folder)
    return fast


def _common(tokenizer: PreTrainedTokenizerFast) -> dict:
    return {"vocab_size": len(tokenizer), "num_labels": 2, "pad_token_id": tokenizer.pad_token_id}


def tiny_bert(tokenizer, hidden: int = 32, layers: int = 2, dropout: float = 0.0, seed: int = 0,
              init_std: float = 0.02):
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, classifier_dropout=dropout,
                        initializer_range=init_std, **_common(tokenizer))
    return BertForSequenceClassification(config)


def tiny_roberta(tokenizer, hidden: int = 32, layers: int = 2, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    config = RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                           intermediate_size=2 * hidden, max_position_embeddings=70, hidden_dropout_prob=dropout,
                           attention_probs_dropout_prob=dropout, classifier_dropout=dropout,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           **_common(tokenizer))
    return RobertaForSequenceClassification(config)


def tiny_distilbert(tokenizer, hidden: int = 32, layers: int = 2, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    config = DistilBertConfig(dim=hidden, n_layers=layers, n_heads=2, hidden_dim=2 * hidden,
                              max_position_embeddings=64, dropout=dropout, attention_dropout=dropout,
                              seq_classif_dropout=dropout, **_common(tokenizer))
    return DistilBertForSequenceClassification(config)


def save(model, tokenizer, folder: Path) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
