"""Tokenization of the federated text benchmarks, done once at conversion.

Every function here follows TensorFlow Federated's baseline preprocessing
(`tff.simulation.baselines`, which Reddi et al. 2021 used) token for token,
written in numpy, so the converted int32 arrays are what TFF's pipeline feeds
its models. The conventions, shared by the next-token models:

* Token ids: pad = 0, the vocabulary 1..V, one out-of-vocabulary bucket V+1,
  beginning of sequence V+2, end of sequence V+3; a model's output size is
  V + 4 (Shakespeare: 86 characters -> 90; Stack Overflow: 10,000 words ->
  10,004). So pad, oov, bos and eos are 0 and the last three ids.
* Next-token examples are `x = sequence[:-1]`, `y = sequence[1:]`.

Deviations from TFF, all at the data level: TFF shuffles a client's examples
before taking `max_elements` each time it iterates (a different subset every
round); a conversion done once keeps a client's first `max_examples` examples
in the file's order.
"""

from __future__ import annotations

import numpy as np

# TFF's Shakespeare character vocabulary (86 characters), in TFF's order: the
# id of a character is its position + 1.
SHAKESPEARE_CHARS = ("dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY"
                     "]!%)-159\r")
SHAKESPEARE_SEQUENCE_LENGTH = 80  # McMahan et al. 2017, TFF's default
STACKOVERFLOW_SEQUENCE_LENGTH = 20  # Reddi et al. 2021, TFF's default


def special_tokens(vocab_size: int) -> dict[str, int]:
  """`{pad, oov, bos, eos}` for a vocabulary of `vocab_size` real tokens."""
  return {"pad": 0, "oov": vocab_size + 1, "bos": vocab_size + 2, "eos": vocab_size + 3}


def _char_table() -> np.ndarray:
  """Byte value -> token id (oov for bytes outside the vocabulary)."""
  oov = special_tokens(len(SHAKESPEARE_CHARS))["oov"]
  table = np.full(256, oov, np.int32)
  for i, ch in enumerate(SHAKESPEARE_CHARS):
    table[ord(ch)] = i + 1
  return table


_CHAR_TABLE = _char_table()


def shakespeare_sequences(snippet: bytes,
                          sequence_length: int = SHAKESPEARE_SEQUENCE_LENGTH) -> np.ndarray:
  """One snippet as `[k, sequence_length + 1]` token rows (TFF's char preprocessing).

  The snippet's bytes (TFF splits bytes, not Unicode characters, so a
  non-ASCII character is several OOV tokens) become ids, framed by bos and
  eos, padded with 0 to a multiple of `sequence_length + 1` and cut into rows.
  """
  specials = special_tokens(len(SHAKESPEARE_CHARS))
  ids = _CHAR_TABLE[np.frombuffer(snippet, np.uint8)]
  tokens = np.concatenate([[specials["bos"]], ids, [specials["eos"]]]).astype(np.int32)
  width = sequence_length + 1
  padded = np.zeros(-(-len(tokens) // width) * width, np.int32)
  padded[:len(tokens)] = tokens
  return padded.reshape(-1, width)


def read_word_counts(path: str, vocab_size: int) -> list[str]:
  """The `vocab_size` most frequent words of TFF's `stackoverflow.word_count` file.

  The file lists `word count` per line, most frequent first; like TFF we take
  the first `vocab_size` lines.
  """
  words = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      parts = line.split()
      if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"{path}, line {number}: expected 'word count', got {line.strip()!r}.")
      words.append(parts[0])
      if len(words) == vocab_size:
        break
  if len(words) < vocab_size:
    raise ValueError(f"{path} lists {len(words)} words; the vocabulary needs {vocab_size}.")
  return words


def read_tag_counts(path: str, num_tags: int) -> list[str]:
  """The `num_tags` most frequent tags of TFF's `stackoverflow.tag_count` (a JSON map
  tag -> count), sorted by decreasing count as TFF does (a stable sort: ties
  keep the file's order)."""
  import json
  with open(path, encoding="utf-8") as f:
    counts = json.load(f)
  if not isinstance(counts, dict) or not all(isinstance(v, int) for v in counts.values()):
    raise ValueError(f"{path} is not a JSON map from tag to count.")
  tags = [t for t, _ in sorted(counts.items(), key=lambda item: item[1], reverse=True)]
  if len(tags) < num_tags:
    raise ValueError(f"{path} lists {len(tags)} tags; the task needs {num_tags}.")
  return tags[:num_tags]


class WordTokenizer:
  """Stack Overflow word ids: vocabulary word i (0-based) -> i + 1, others -> oov."""

  def __init__(self, vocab: list[str]):
    self.vocab_size = len(vocab)
    self.ids = {w: i + 1 for i, w in enumerate(vocab)}
    self.specials = special_tokens(self.vocab_size)

  def lookup(self, words: list[str]) -> list[int]:
    oov = self.specials["oov"]
    return [self.ids.get(w, oov) for w in words]

  def next_word_row(self, tokens: bytes,
                    sequence_length: int = STACKOVERFLOW_SEQUENCE_LENGTH) -> np.ndarray:
    """One sentence as a `[sequence_length + 1]` row (TFF's word preprocessing).

    Words are split on single spaces (as `tf.strings.split(sep=' ')`) and
    truncated to `sequence_length`; eos is appended only when the sentence
    is shorter than that; bos is prepended; the row is padded with 0.
    """
    words = tokens.decode("utf-8").split(" ")
    ids = self.lookup(words[:sequence_length])
    if len(ids) < sequence_length:
      ids.append(self.specials["eos"])
    row = np.zeros(sequence_length + 1, np.int32)
    row[0] = self.specials["bos"]
    row[1:1 + len(ids)] = ids
    return row

  def bag_row(self, tokens: bytes, title: bytes, max_words: int) -> tuple[np.ndarray, bool]:
    """Word ids of `tokens + ' ' + title` split on whitespace (TFF's tag task), padded
    with 0 to `max_words`; and whether words were cut (a deviation: TFF keeps
    every word in its bag, a fixed-width array keeps `max_words`)."""
    words = (tokens + b" " + title).decode("utf-8").split()
    ids = self.lookup(words[:max_words])
    row = np.zeros(max_words, np.int32)
    row[:len(ids)] = ids
    return row, len(words) > max_words


def tag_row(tags: bytes, tag_ids: dict[str, int], max_tags: int) -> np.ndarray:
  """Tag ids (0-based, in-vocabulary tags only, as TFF's multi-hot drops its OOV
  column) of a '|'-separated tag string, padded with -1 to `max_tags`."""
  ids = [tag_ids[t] for t in tags.decode("utf-8").split("|") if t in tag_ids][:max_tags]
  row = np.full(max_tags, -1, np.int32)
  row[:len(ids)] = ids
  return row


__all__ = ["SHAKESPEARE_CHARS", "SHAKESPEARE_SEQUENCE_LENGTH", "STACKOVERFLOW_SEQUENCE_LENGTH",
           "WordTokenizer", "read_tag_counts", "read_word_counts", "shakespeare_sequences",
           "special_tokens", "tag_row"]
