"""Word-level tokenizer and tiny text encoder that stand in for UMT5 inside WanPipeline.

WanPipeline._get_t5_prompt_embeds calls
    tokenizer(prompts, padding="max_length", max_length=L, truncation=True,
              add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
and then text_encoder(input_ids, attention_mask).last_hidden_state, reading `.dtype` and the
device of the encoder; both classes here honour exactly that contract.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .spec import EOS, PAD, UNK, VOCAB

_WORD = re.compile(r"[a-z]+")


@dataclass
class TokenBatch:
    """The two fields WanPipeline reads from a tokenizer result (plus dict-style access)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)


class WordTokenizer:
    """Lower-cases, keeps letter runs as words, maps unknown words to <unk>, appends <eos>.

    The empty prompt becomes just <eos>: that is the unconditional input used for CFG.
    """

    def __init__(self, vocab: tuple[str, ...] = VOCAB) -> None:
        self.vocab = vocab
        self.index = {w: i for i, w in enumerate(vocab)}
        self.pad_token_id = self.index[PAD]
        self.eos_token_id = self.index[EOS]
        self.unk_token_id = self.index[UNK]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.index.get(w, self.unk_token_id) for w in _WORD.findall(text.lower())]
        return ids + [self.eos_token_id] if add_special_tokens else ids

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` that ``encode`` maps to <unk>."""
        return [w for w in _WORD.findall(text.lower()) if w not in self.index]

    def __call__(
        self,
        text: str | list[str],
        padding: bool | str = "longest",
        max_length: int | None = None,
        truncation: bool = False,
        add_special_tokens: bool = True,
        return_attention_mask: bool = True,
        return_tensors: str | None = "pt",
        **_: Any,  # accept (and ignore) the rest of the HF tokenizer keyword surface
    ) -> TokenBatch:
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.encode(t, add_special_tokens) for t in texts]
        if truncation and max_length is not None:
            # Keep <eos> as the last token of a truncated prompt, as T5 tokenizers do.
            rows = [r if len(r) <= max_length else r[: max_length - 1] + r[-1:] for r in rows]
        if padding == "max_length" and max_length is not None:
            width = max(max_length, *(len(r) for r in rows))
        elif padding:
            width = max(len(r) for r in rows)
        else:
            width = max(len(r) for r in rows)  # tensors need a rectangle anyway
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return TokenBatch(input_ids=ids, attention_mask=mask)

    def __len__(self) -> int:
        return len(self.vocab)


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor


class TinyTextEncoder(nn.Module):
    """Token + position embedding and one pre-norm transformer layer over the unpadded words.

    Padded positions are zeroed on output, which is what WanPipeline does to the tail anyway;
    doing it here too makes training see exactly the embeddings the pipeline will pass on.
    """

    def __init__(self, vocab_size: int, dim: int, num_heads: int, ffn_dim: int, max_positions: int) -> None:
        super().__init__()
        self.config = {
            "vocab_size": vocab_size,
            "dim": dim,
            "num_heads": num_heads,
            "ffn_dim": ffn_dim,
            "max_positions": max_positions,
        }
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_positions, dim)
        self.layer = nn.TransformerEncoderLayer(
            dim, num_heads, ffn_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.tokens.weight, std=0.5)
        nn.init.normal_(self.positions.weight, std=0.02)

    @property
    def dtype(self) -> torch.dtype:
        return self.tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tokens.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> EncoderOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask.gt(0)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.tokens(input_ids) + self.positions(pos)[None]
        h = self.layer(h, src_key_padding_mask=~keep)
        h = self.norm(h) * keep[..., None].to(h.dtype)
        return EncoderOutput(last_hidden_state=h)
